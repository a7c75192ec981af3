"""`nf4tune serve` with real clients: clients that leave, kept-alive connections after errors, stop
strings, the context limit, bad values, per-row adapters and sampling in one batch, and the OpenAI
parameters, checked through the official `openai` client, http.client and raw sockets."""

import http.client
import json
import math
import socket
import time

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.lora import lora_layers
from nf4tune.serve import Engine, Request, Sampling
from nf4tune.serve.decoder import Decoder
from nf4tune.serve.sampling import process_logits
from nf4tune.serve.server import Server

openai = pytest.importorskip("openai", reason="the official client is the oracle for the wire format")
CONTEXT = 2048
PROMPT = "Hello there"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    base = build_tiny_checkpoint(root / "base", max_position_embeddings=CONTEXT)
    for name, seed in (("alpha", 1), ("beta", 2)):
        model, _ = nf4tune.load_model(base, device="cpu", progress=False,
                                      lora=nf4tune.LoraConfig(r=4, alpha=32, dropout=0.0))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.5)
        nf4tune.save_adapter(model, root / name)
    model, tok = nf4tune.load_model(base, device="cpu", progress=False)
    engine = Engine(model, tok, {"alpha": str(root / "alpha"), "beta": str(root / "beta")}, max_batch=8, max_queue=16)
    engine.eos_ids = set()  # a random model: replies run to their length unless something stops them
    server = Server(engine, base_name="tiny", api_key="secret", port=0)
    server.start()
    host, port = server.address
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="secret", max_retries=0)
    submitted = []
    real_submit_all = engine.submit_all  # what `submit` and the server's n choices go through
    engine.submit_all = lambda requests: submitted.extend(requests) or real_submit_all(requests)
    yield root, base, engine, server, client, submitted
    server.stop()


def _raw(server, request: bytes) -> socket.socket:
    sock = socket.create_connection(server.address)
    sock.sendall(request)
    return sock


def _post(path: str, body: dict | bytes, extra: str = "") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n").encode() + data


def _alone(engine, prompt, adapter=None, **sampling):
    """The reply the engine gives a request on its own."""
    return engine.submit(Request(prompt, adapter, Sampling(**sampling))).wait(60)


# --- 1. a client that goes away stops costing anything --------------------------------------

@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_is_dropped_at_its_next_token(setup, stream):
    root, base, engine, server, client, submitted = setup
    submitted.clear()
    sock = _raw(server, _post("/v1/completions", {"model": "alpha", "prompt": PROMPT, "max_tokens": 2000,
                                                  "stream": stream}))
    deadline = time.monotonic() + 60
    while (not submitted or not submitted[0].completion_tokens) and time.monotonic() < deadline:  # it is generating
        time.sleep(0.005)
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    dropped = submitted[0].wait(30)
    assert dropped.done.is_set() and dropped.finish_reason == "cancelled"
    assert dropped.completion_tokens < 1000  # not the 2000 it asked for (each token takes ~2 ms here)
    # the next request, for another adapter, is not queued behind the one that left
    start = time.perf_counter()
    reply = client.completions.create(model="beta", prompt=PROMPT, max_tokens=4)
    latency = time.perf_counter() - start
    assert reply.usage.completion_tokens == 4
    print(f"next request after a {'stream' if stream else 'plain request'} was dropped: {latency * 1000:.0f} ms "
          f"(the dropped one stopped after {dropped.completion_tokens} of 2000 tokens)")


def test_a_request_ends_at_its_deadline_and_replies_fit_the_context(setup):
    root, base, engine, server, client, submitted = setup
    engine.request_timeout = 0.2
    try:
        late = engine.submit(Request(PROMPT, sampling=Sampling(max_new_tokens=1500))).wait(30)
    finally:
        engine.request_timeout = None
    assert late.finish_reason == "length" and late.completion_tokens < 1500
    # no max_tokens asked: as many as the context leaves (never a KV cache beyond it)
    prompt = "x" * (CONTEXT - 5)
    reply = client.completions.create(model="tiny", prompt=prompt)
    assert reply.usage.completion_tokens == 5 and reply.usage.prompt_tokens == CONTEXT - 5
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {CONTEXT} tokens.*{CONTEXT + 5} tokens"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {CONTEXT} tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "y" * CONTEXT}])


# --- 2. error replies do not poison kept-alive connections -----------------------------------

def test_errors_leave_a_kept_alive_connection_usable(setup):
    root, base, engine, server, client, submitted = setup
    conn = http.client.HTTPConnection(*server.address)
    good = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
    cases = [("/v1/nothing", {"Authorization": "Bearer secret"}, good, 404),
             ("/v1/completions", {"Authorization": "Bearer wrong"}, good, 401),
             ("/v1/completions", {"Authorization": "Bearer secret"}, json.dumps({"model": "gamma", "prompt": "a"}), 404),
             ("/v1/completions", {"Authorization": "Bearer secret"}, "x" * (2 << 20), 413)]
    for path, headers, body, status in cases:
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        assert response.status == status and "message" in json.loads(response.read())["error"]
        conn.request("POST", "/v1/completions", good, {"Authorization": "Bearer secret"})  # the same connection
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert json.loads(response.read())["usage"]["completion_tokens"] == 2
    for length in ("abc", "-1"):
        sock = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"
                            b"Content-Length: " + length.encode() + b"\r\n\r\n{}")
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(4096):  # the server answers and closes: no hang
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 400") and b"Content-Length" in answer.split(b"\r\n\r\n", 1)[1]


# --- 3. stop strings -------------------------------------------------------------------------

def test_stop_strings_cut_the_reply_across_token_boundaries_streamed_too(setup):
    root, base, engine, server, client, submitted = setup
    full = _alone(engine, PROMPT, "alpha", max_new_tokens=40).text
    # the character tokenizer makes every character a token: a 3-character stop spans 3 tokens
    stop = next(full[i:i + 3] for i in range(8, 30) if full[i:i + 3].strip() and full.find(full[i:i + 3]) == i)
    expected = full[:full.find(stop)]
    reply = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=40, stop=["never here", stop])
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=30)
    chat_text = chat.choices[0].message.content
    chat_stop = chat_text[10:12]
    stopped = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                             stop=chat_stop)
    assert stopped.choices[0].message.content == chat_text[:chat_text.find(chat_stop)]
    assert stopped.choices[0].finish_reason == "stop"
    pieces, reasons = [], []
    for chunk in client.completions.create(model="alpha", prompt=PROMPT, max_tokens=40, stop=stop, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected and reasons[-1] == "stop"
    # a stop string whose start shows up but never whole: that text is held back, then sent
    near = stop[:2] + "\x07"
    streamed = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=40, stop=near, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, stop=list("abcde"))


# --- 4. bad values and errors mid-stream -----------------------------------------------------

def test_bad_values_are_400_and_an_error_mid_stream_is_an_error_event(setup, monkeypatch):
    root, base, engine, server, client, submitted = setup
    for raw in (b'{"model": "tiny", "prompt": "a", "temperature": NaN}',
                b'{"model": "tiny", "prompt": "a", "seed": 18446744073709551616}',
                b'{"model": "tiny", "prompt": "a", "top_p": Infinity}'):
        sock = _raw(server, _post("/v1/completions", raw))
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
        sock.close()

    def broken(tokens):
        raise RuntimeError("the accelerator fell over")

    monkeypatch.setattr(engine.decoder, "step", broken)
    with pytest.raises(openai.APIError, match="fell over"):
        list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            stream=True))
    with pytest.raises(openai.InternalServerError, match="fell over"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5)


# --- 5. different adapters and sampling settings share a batch -------------------------------

def test_requests_with_different_adapters_and_sampling_share_a_batch_and_answer_as_alone(setup, monkeypatch):
    root, base, engine, server, client, submitted = setup
    asks = [("alpha", Sampling(max_new_tokens=12)), ("beta", Sampling(max_new_tokens=7)),
            (None, Sampling(max_new_tokens=9, temperature=1.2, top_k=20, seed=4)),
            ("alpha", Sampling(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=9, repetition_penalty=1.3)),
            ("beta", Sampling(max_new_tokens=11, frequency_penalty=1.5, presence_penalty=0.5))]
    prompts = [PROMPT, "Is 3 odd?", "Once", "A much longer prompt than the others", "Why"]
    alone = [_alone(engine, p, a, **vars(s)).text for p, (a, s) in zip(prompts, asks)]
    assert len(set(alone)) == len(alone)
    live_rows = []
    real_run = engine.decoder.run

    def run(admit, on_step, *args):
        def spy(live, tokens):
            live_rows.append(sum(r is not None for r in live))
            return on_step(live, tokens)
        return real_run(admit, spy, *args)

    monkeypatch.setattr(engine.decoder, "run", run)
    with engine._lock:  # the worker cannot take any of them before all are waiting
        together = [engine.submit(Request(p, a, s)) for p, (a, s) in zip(prompts, asks)]
    assert [r.wait(60).text for r in together] == alone
    assert max(live_rows) == len(asks)  # all in one batch


def test_a_long_request_does_not_hold_up_one_that_comes_later(setup):
    # continuous batching: the later request joins the running batch at the next step, in its own
    # row with its own adapter, and is answered at its own last token
    root, base, engine, server, client, submitted = setup
    expected = _alone(engine, "Why", "beta", max_new_tokens=5, temperature=0.7, seed=1).text
    long = engine.submit(Request(PROMPT, "alpha", Sampling(max_new_tokens=1500)))
    next(long.stream())  # it is generating
    short = engine.submit(Request("Why", "beta", Sampling(max_new_tokens=5, temperature=0.7, seed=1))).wait(60)
    assert short.text == expected and not long.done.is_set()
    long.cancel()
    assert long.wait(30).finish_reason == "cancelled" and long.completion_tokens < 1500


def test_per_row_adapters_decode_bit_for_bit_as_each_alone(setup):
    root, base, engine, server, client, submitted = setup
    bank, decoder = engine.bank, Decoder(engine.model)  # its own: the engine's may be finishing a run
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 90, (1, n), generator=gen) for n in (9, 4, 6)]
    names = ["alpha", None, "beta"]
    width = max(p.shape[1] for p in prompts)
    ids = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1]), torch.ones(1, p.shape[1])], 1) for p in prompts]).long()
    follow = torch.randint(4, 90, (5,), generator=gen)

    def logits(input_ids, attention_mask, rows):
        decoder.adapters = rows
        try:
            out = [decoder.prefill(input_ids, width + 8, attention_mask)]
            return torch.stack(out + [decoder.step(t.repeat(input_ids.shape[0])) for t in follow])
        finally:
            decoder.adapters = None

    together = logits(ids, mask, bank.rows(names))
    for row, (prompt, name) in enumerate(zip(prompts, names)):
        bank.activate(name)
        assert torch.equal(logits(prompt, None, None)[:, 0], together[:, row]), name
    assert not torch.equal(together[:, 0], logits(prompts[0], None, bank.rows([None]))[:, 0])  # adapters matter


# --- 6. OpenAI parameters --------------------------------------------------------------------

def test_openai_parameters_are_honoured(setup):
    root, base, engine, server, client, submitted = setup
    model, tok = engine.model, engine.tokenizer
    # n: several choices; with a seed, choice i draws with seed + i
    many = client.completions.create(model="beta", prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=11)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 18
    assert [c.text for c in many.choices] == [_alone(engine, PROMPT, "beta", max_new_tokens=6, temperature=1.0, seed=11 + i).text
                                              for i in range(3)]
    # logprobs against the model's own forward (transformers) at the same positions
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, logprobs=2)
    lp = done.choices[0].logprobs
    ids = tok(PROMPT + done.choices[0].text, return_tensors="pt", add_special_tokens=False).input_ids
    bank_state = engine.bank.active
    engine.bank.activate(None)
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits[0].float(), -1)
    engine.bank.active = bank_state
    start = len(tok(PROMPT, add_special_tokens=False).input_ids)
    expected = [float(reference[start - 1 + i, ids[0, start + i]]) for i in range(6)]
    assert lp.tokens == [tok.decode([t]) for t in ids[0, start:]] and len(lp.top_logprobs[0]) == 2
    assert all(abs(a - b) < 0.05 for a, b in zip(lp.token_logprobs, expected)), (lp.token_logprobs, expected)
    assert all(math.isclose(max(top.values()), chosen) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content and len(content[0].top_logprobs) == 3
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                              logprobs=True, stream=True)
    assert [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content] \
        == [c.logprob for c in content]
    # echo, max_completion_tokens, include_usage
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, echo=True)
    assert echoed.choices[0].text == PROMPT + _alone(engine, PROMPT, max_new_tokens=3).text
    capped = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_completion_tokens=3)
    assert capped.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    # content as text parts, and the developer role (a system message)
    parts = client.chat.completions.create(model="tiny", max_tokens=5, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}])
    plain = client.chat.completions.create(model="tiny", max_tokens=5, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi\nthere"}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert client.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma")


def test_penalties_match_their_formula_and_unsupported_parameters_are_refused(setup):
    root, base, engine, server, client, submitted = setup
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    generated = [3, 3, 7, 3, 9]
    counts = torch.bincount(torch.tensor(generated), minlength=50).float()
    s = Sampling(frequency_penalty=0.7, presence_penalty=0.4)
    torch.testing.assert_close(process_logits(logits, s, generated=generated),
                               logits - 0.7 * counts - 0.4 * (counts > 0).float())
    penalized = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, frequency_penalty=2.0)
    ids = engine.tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    engine.bank.activate(None)
    [tokens] = Decoder(engine.model).generate(ids, Sampling(max_new_tokens=12, frequency_penalty=2.0))
    assert penalized.choices[0].text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert penalized.choices[0].text != client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12).choices[0].text
    for extra in ({"tools": [{"type": "function", "function": {"name": "f"}}]}, {"logit_bias": {"5": 10}},
                  {"response_format": {"type": "json_object"}}):
        with pytest.raises(openai.BadRequestError, match=next(iter(extra))):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="text parts"):
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}])
