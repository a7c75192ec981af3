"""The engine's transformers-`generate` path: the families nf4tune's CPU decoder does not take, and T5.

Oracle: transformers' own greedy `generate` on the same 4-bit model, its new tokens decoded. (The engine
used to put the prompt into its streamer itself, and generate() puts it too: every such family failed
with "list index out of range", and T5's replies began with the decoder's start token.) Also: a 500 is
logged with its traceback under the id the client is answered with."""

import http.client
import json
import logging

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint, char_tokenizer
from nf4tune.cli.main import main
from nf4tune.serve import Engine, Request, Sampling
from nf4tune.serve.generate_runner import GenerateRunner
from nf4tune.serve.server import Server

PROMPTS = ["Hello there, how", "Once upon"]  # different lengths: the batch is left-padded
NEW = 8

# Each is sent to transformers' generate: a family nf4tune's decoding step does not cover (registry
# FamilySpec.decoder), or a Llama whose down_proj rows (160 wide) are not whole 64-blocks (no fused kernel).
GENERATE_FAMILIES = {
    "olmo2": ("olmo2", {}),
    "llama-160": ("llama", {"intermediate_size": 160}),
}


def _load(path):
    return nf4tune.load_model(path, device="cpu", progress=False)


def _engine_on_generate(model, tokenizer, **kw) -> Engine:
    engine = Engine(model, tokenizer, **kw)
    assert isinstance(engine.decoder, GenerateRunner), engine.decode_path  # else the test would not test the generate path
    return engine


def _reference(model, tokenizer, prompts: list[str], new: int) -> list[tuple[str, int]]:
    """transformers' greedy continuation of the left-padded `prompts` as one batch: per prompt, the
    text of its new tokens up to the first end-of-sequence token, and how many tokens that is."""
    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=list(eos))
    answers = []
    for row in out[:, width:].tolist():
        ended = next((i for i, t in enumerate(row) if t in eos), len(row))
        answers.append((tokenizer.decode(row[:ended], skip_special_tokens=True), ended))
    return answers


def _batched(engine: Engine, prompts: list[str], new: int) -> list[Request]:
    """`prompts` generated as one batch: the worker is held at its gate until all are queued."""
    engine.gate.clear()
    engine.submit(Request("warm", sampling=Sampling(max_new_tokens=1))).wait(60)  # the worker is now at the gate
    requests = [engine.submit(Request(p, sampling=Sampling(max_new_tokens=new, temperature=0.0))) for p in prompts]
    engine.gate.set()
    return [r.wait(120) for r in requests]


@pytest.mark.parametrize("name", list(GENERATE_FAMILIES))
def test_the_generate_path_replies_as_transformers_generate_does(tmp_path, name):
    arch, overrides = GENERATE_FAMILIES[name]
    model, tokenizer = _load(build_tiny_checkpoint(tmp_path / name, arch, **overrides))
    engine = _engine_on_generate(model, tokenizer)
    try:
        requests = _batched(engine, PROMPTS, NEW)
    finally:
        engine.close()
    expected = _reference(model, tokenizer, PROMPTS, NEW)
    assert all(r.error is None for r in requests), [r.error for r in requests]
    assert [(r.text, r.completion_tokens) for r in requests] == expected
    assert any(tokens for _, tokens in expected)  # the model said something, so the comparison means something


def test_t5_replies_without_its_decoder_start_token(tmp_path):
    tokenizer = char_tokenizer()
    start = tokenizer.convert_tokens_to_ids(">")  # a start token that would show in the text, not a special one
    model, tokenizer = _load(build_tiny_checkpoint(tmp_path / "t5", "t5", decoder_start_token_id=start))
    engine = _engine_on_generate(model, tokenizer)
    try:
        request = engine.generate(PROMPTS[0], max_new_tokens=NEW, temperature=0.0)
    finally:
        engine.close()
    ids = tokenizer(PROMPTS[0], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert out[0, 0].item() == start  # generate's output begins with the decoder start token; the reply must not
    new = out[0, 1:].tolist()
    new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert request.error is None and new
    assert (request.text, request.completion_tokens) == (tokenizer.decode(new, skip_special_tokens=True), len(new))


def test_t5_prompt_reaches_the_encoder_as_in_training(tmp_path):
    """The engine encodes an encoder-decoder's prompt as training fed the encoder: with the tokenizer's own
    special tokens (T5's tokenizer appends </s>), so a fine-tune is served the inputs it learned from."""
    from tokenizers.processors import TemplateProcessing

    from nf4tune.train.data import tokenize_seq2seq_example
    from nf4tune.train.formats import Example

    model, tokenizer = _load(build_tiny_checkpoint(tmp_path / "t5", "t5"))
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.eos_token_id)])
    engine = _engine_on_generate(model, tokenizer)
    try:
        request = engine.generate(PROMPTS[0], max_new_tokens=2, temperature=0.0)
    finally:
        engine.close()
    trained, _ = tokenize_seq2seq_example(Example(source=PROMPTS[0], target="x"), tokenizer, 512, 8)
    assert request.prompt_ids == trained.input_ids and request.prompt_ids[-1] == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    """A olmo2 checkpoint (served by generate) and a server over it."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("olmo2") / "olmo2", "olmo2")
    model, tokenizer = _load(path)
    server = Server(_engine_on_generate(model, tokenizer), base_name="olmo2", port=0)
    server.start()
    yield path, model, tokenizer, server
    server.stop()


def _post(server: Server, body: dict) -> tuple[int, dict, str]:
    """POST /v1/completions: the status, the x-request-id header and the body as text."""
    conn = http.client.HTTPConnection(*server.address, timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("x-request-id"), response.read().decode()
    finally:
        conn.close()


def test_the_server_and_the_generate_command_answer_as_transformers_generate_does(olmo2, tmp_path):
    path, model, tokenizer, server = olmo2
    [(text, tokens)] = _reference(model, tokenizer, PROMPTS[:1], NEW)
    status, request_id, body = _post(server, {"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0})
    reply = json.loads(body)
    assert status == 200, body
    assert reply["choices"][0]["text"] == text and reply["usage"]["completion_tokens"] == tokens
    assert request_id == reply["id"] and request_id.startswith("cmpl-")

    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert main(["generate", str(path), "--prompts", str(prompts), "--out", str(out), "--temperature", "0",
                 "--max-new-tokens", str(NEW), "--batch-size", "2", "--device", "cpu"]) == 0
    completions = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert completions == [t for t, _ in _reference(model, tokenizer, PROMPTS, NEW)]


def _records(caplog, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if request_id in r.getMessage()]


def test_a_failed_generation_is_logged_with_its_traceback_under_the_answers_request_id(olmo2, caplog, monkeypatch):
    path, model, tokenizer, server = olmo2
    caplog.set_level(logging.INFO, logger="nf4tune")

    def broken(*args, **kwargs):
        raise RuntimeError("the forward broke")

    monkeypatch.setattr(server.engine.model, "generate", broken)
    status, request_id, body = _post(server, {"prompt": "Hi", "max_tokens": 4})
    assert status == 500 and "the forward broke" in json.loads(body)["error"]["message"]
    records = _records(caplog, request_id)
    with_traceback = [r for r in records if r.exc_info]
    assert len(with_traceback) == 1 and "the forward broke" in caplog.text  # the traceback, once
    assert with_traceback[0].exc_info[0] is RuntimeError and with_traceback[0].levelno == logging.ERROR
    assert any("500" in r.getMessage() for r in records)  # the server's line for the answer

    # a stream answers 200 before it breaks off: its error event is logged under its id too
    status, request_id, body = _post(server, {"prompt": "Hi", "max_tokens": 4, "stream": True})
    assert status == 200 and '"error"' in body and "the forward broke" in body
    assert [bool(r.exc_info) for r in _records(caplog, request_id)].count(True) == 1


def test_a_bug_in_the_server_is_logged_with_its_traceback_under_the_answers_request_id(olmo2, caplog, monkeypatch):
    path, model, tokenizer, server = olmo2
    caplog.set_level(logging.INFO, logger="nf4tune")

    def broken(requests):
        raise KeyError("no such thing")

    monkeypatch.setattr(server.engine, "submit_all", broken)  # what the server queues its requests with
    status, request_id, body = _post(server, {"prompt": "Hi", "max_tokens": 4})
    assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
    [record] = _records(caplog, request_id)
    assert record.levelno == logging.ERROR and record.exc_info[0] is KeyError and "500" in record.getMessage()
