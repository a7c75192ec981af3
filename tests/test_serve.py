"""Inference: the OpenAI-compatible server (through the official client), batch generation, chat."""

import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.cli.main import main
from nf4tune.layers.lora import lora_layers
from nf4tune.serve import Engine, QueueFull, Request, Sampling
from nf4tune.serve.server import Server

openai = pytest.importorskip("openai", reason="the official client is the oracle for the wire format")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = build_tiny_checkpoint(root / "base")
    for name, seed in (("alpha", 1), ("beta", 2)):
        model, _ = nf4tune.load_model(base, device="cpu", lora=nf4tune.LoraConfig(r=4, alpha=32, dropout=0.0))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.5)
        nf4tune.save_adapter(model, root / name)
    model, tok = nf4tune.load_model(base, device="cpu")
    engine = Engine(model, tok, {"alpha": str(root / "alpha"), "beta": str(root / "beta")}, max_batch=4, max_queue=8)
    server = Server(engine, base_name="tiny", api_key="secret", port=0)
    server.start()
    host, port = server.address
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="secret", max_retries=0)
    yield root, base, engine, server, client
    server.stop()


def _direct(base, adapter_dir, prompt, n):
    """The greedy reply of a model loaded with this one adapter alone, through its own engine (no server, no
    other adapters): what the server must return. (The decoder against transformers: tests/test_decoder.py.)"""
    model, tok = nf4tune.load_model(base, device="cpu", adapter=adapter_dir)
    own = Engine(model, tok)
    try:
        return own.generate(prompt, max_new_tokens=n, temperature=0.0).text
    finally:
        own.close()


def test_models_chat_and_completions_in_the_openai_format(setup):
    root, base, engine, server, client = setup
    assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta"]
    messages = [{"role": "user", "content": "Hello!"}]
    reply = client.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0)
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    streamed = client.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in streamed]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1  # it really streamed

    prompt = "Is 12 even? "
    done = client.completions.create(model="beta", prompt=prompt, max_tokens=10, temperature=0)
    assert done.choices[0].text == _direct(base, root / "beta", prompt, 10)  # the server adds nothing
    stream = client.completions.create(model="beta", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == done.choices[0].text


def test_each_adapter_answers_as_itself_even_when_batched_together(setup):
    root, base, engine, server, client = setup
    prompt = "Tell me a story"
    expected = {"tiny": _direct(base, None, prompt, 8), "alpha": _direct(base, root / "alpha", prompt, 8),
                "beta": _direct(base, root / "beta", prompt, 8)}
    assert len(set(expected.values())) == 3  # the adapters change the model
    results = {}

    def ask(model, i):
        results[(model, i)] = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(m, i)) for m in expected for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[(m, i)] == expected[m] for m in expected for i in range(2)), (results, expected)


def test_errors_are_json_4xx_and_never_crash_the_server(setup):
    root, base, engine, server, client = setup
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt="", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    host, port = server.address
    for body in (b"{not json", b"[1, 2]", json.dumps({"model": "tiny", "messages": "hi"}).encode()):
        conn = http.client.HTTPConnection(host, port)
        conn.request("POST", "/v1/chat/completions", body, {"Authorization": "Bearer secret", "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 400 and "message" in json.loads(response.read())["error"]
    assert client.models.list().data  # still serving


def test_a_full_queue_answers_429(setup):
    root, base, engine, server, client = setup
    engine.gate.clear()  # hold the worker so requests pile up
    engine.submit(Request("warm", sampling=Sampling(max_new_tokens=1))).wait(30)  # the worker is now at the gate
    held = [engine.submit(Request(f"held {i}", sampling=Sampling(max_new_tokens=2))) for i in range(engine.max_queue)]
    with pytest.raises(QueueFull):
        engine.submit(Request("one too many"))
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    engine.gate.set()
    assert all(r.wait(30).done.is_set() and r.error is None for r in held)


def test_chat_page(setup, tmp_path):
    root, base, engine, server, client = setup
    host, port = server.address
    conn = http.client.HTTPConnection(host, port)
    conn.request("GET", "/")
    response = conn.getresponse()
    page = response.read().decode()
    assert response.status == 200 and "<title>nf4tune chat</title>" in page and "/v1/chat/completions" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed; the page was checked over HTTP only")
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    "--virtual-time-budget=5000", f"--screenshot={shot}", f"http://{host}:{port}/"],
                   check=True, timeout=120, capture_output=True)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 5000  # the page rendered


def test_generate_command_writes_completions_and_names_bad_lines(setup, tmp_path, capsys):
    root, base, engine, server, client = setup
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"messages": [{"role": "user", "content": "Yo"}]}\n{"prompt": "Is 7 odd? "}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(base), "--adapter", str(root / "alpha"), "--prompts", str(prompts), "--out", str(out),
                 "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[2]["completion"] == _direct(base, root / "alpha", "Is 7 odd? ", 6)
    prompts.write_text('{"prompt": "Hi"}\n{"prompt": 3}\n')
    capsys.readouterr()
    assert main(["generate", str(base), "--prompts", str(prompts), "--out", str(out), "--device", "cpu"]) == 2
    assert "in.jsonl, line 2" in capsys.readouterr().err


def test_chat_command_streams_and_obeys_its_commands(setup, monkeypatch, capsys):
    root, base, engine, server, client = setup
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/system Be brief.\n/reset\nAgain\n/exit\nnever read\n"))
    assert main(["chat", str(base), "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant: ") == 2 and "(system prompt set)" in out and "(conversation reset)" in out


def test_the_chat_process_exits_cleanly(setup):
    # the engine's worker thread used to outlive main(); the process then aborted at exit
    # ("terminate called without an active exception"), every time with the PyTorch paths
    root, base, engine, server, client = setup
    for native in ("0", "1"):
        done = subprocess.run([sys.executable, "-m", "nf4tune.cli.main", "chat", str(base), "--temperature", "0",
                               "--max-new-tokens", "4", "--device", "cpu"], input="Hello\n/exit\n", text=True,
                              capture_output=True, timeout=300, env={**os.environ, "NF4TUNE_NATIVE": native})
        assert done.returncode == 0 and "assistant: " in done.stdout, done.stderr[-500:]


def test_the_serve_command_answers_decoding_on_its_main_thread_and_stops_on_ctrl_c(setup):
    """`nf4tune serve` as a process: it answers a completion (decoded on its main thread, the HTTP server on
    another) as the engine does in this process, and Ctrl-C (SIGINT) ends it with exit status 0."""
    import signal
    import urllib.request

    root, base, engine, server, client = setup
    # Ctrl-C must reach the server as SIGINT even when the suite runs as a background job (started with SIGINT
    # ignored, which children inherit)
    process = subprocess.Popen([sys.executable, "-m", "nf4tune.cli.main", "serve", str(base), "--port", "0",
                                "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = process.stdout.readline()
        assert line.startswith("serving "), (line, process.stderr.read() if process.poll() is not None else "")
        address = line.split(" on ")[1].split(" ")[0]
        body = json.dumps({"model": "base", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}).encode()
        request = urllib.request.Request(f"{address}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            text = json.loads(answer.read())["choices"][0]["text"]
        model, tokenizer = nf4tune.load_model(base, device="cpu", progress=False)
        assert text == nf4tune.generate(model, tokenizer, ["Once upon a time"], max_new_tokens=6)[0]
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, process.stderr.read()[-500:]
    finally:
        if process.poll() is None:
            process.kill()


def test_closing_the_engine_ends_a_reply_at_its_next_token(setup):
    root, base, engine, server, client = setup
    model, tokenizer = nf4tune.load_model(base, device="cpu", progress=False)
    own = Engine(model, tokenizer)
    own.eos_ids = set()  # nothing ends the reply early
    request = own.submit(Request("Once upon a time", sampling=Sampling(max_new_tokens=4000)))
    next(request.stream())  # it is generating
    own.close()
    assert request.wait(10).done.is_set() and "closed" in request.error
    assert 0 < request.completion_tokens < 4000 and not own._worker.is_alive()


def test_streamed_pieces_add_up_to_the_whole_decode_with_multibyte_characters():
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nf4tune.serve.streaming import BatchStreamer, ReplyRow

    # a byte-level BPE small enough that accented letters, CJK and emoji span several tokens
    text = "héllo wörld, 世界! naïve café 🙂 — ok. " * 3
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=280, special_tokens=["</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens are parts of characters
    request = Request("unused", sampling=Sampling(max_new_tokens=len(ids)))
    streamer = BatchStreamer(SimpleNamespace(tokenizer=tokenizer, eos_ids={tokenizer.eos_token_id}, closed=False))
    row = ReplyRow(request)
    for token in ids:
        streamer.take(row, token, None)
    assert row.finished  # its length
    request.deltas.put(None)
    pieces = list(request.stream())
    assert "".join(pieces) == request.text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > len(text) // 4
    assert request.completion_tokens == len(ids) and request.finish_reason == "length"
