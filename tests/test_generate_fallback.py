"""Families nf4tune's decoding step does not cover (a mixture of experts, qwen3_moe; a dense one, olmo2) go
through the same engine as the others (`serve.generate_runner.GenerateRunner`: transformers' generate
behind the decoders' `run` contract): `nf4tune.generate`, its stop strings and lengths, batching, per-row
adapters, logprobs and the server.

Oracle: transformers' own greedy `generate` on the same 4-bit model, and the model's forward for the
logprobs."""

import http.client
import json

import pytest
import torch

import nf4tune
from nf4tune import dispatch
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.runtime.step import ModelStep
from nf4tune.serve import Engine, Request, Sampling
from nf4tune.serve.generate_runner import GenerateRunner, _Steps
from nf4tune.serve.server import Server

PROMPTS = ["Hello there, how", "Once upon", "A b c d e f g h"]  # different lengths: generate left-pads
NEW = 8


def _load(path, **kw):
    return nf4tune.load_model(path, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module", params=["qwen3_moe", "olmo2"])
def family(request, tmp_path_factory):
    """A tiny checkpoint of a family the step does not cover, loaded in 4-bit."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "model", request.param)
    model, tokenizer = _load(path)
    return request.param, path, model, tokenizer


def _reference(model, tokenizer, prompts: list[str], new: int) -> list[str]:
    """transformers' greedy `generate`, each prompt alone: the text of its new tokens up to the first
    end-of-sequence token."""
    eos = model.generation_config.eos_token_id
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new_ids = out[0, ids.shape[1]:].tolist()
        new_ids = new_ids[:new_ids.index(eos)] if eos in new_ids else new_ids
        texts.append(tokenizer.decode(new_ids, skip_special_tokens=True))
    return texts


def test_the_engine_serves_it_through_the_generate_runner(family):
    name, _, model, tokenizer = family
    engine = Engine(model, tokenizer)
    engine.close()
    assert isinstance(engine.decoder, GenerateRunner) and engine.decode_path.name == dispatch.REFERENCE
    assert name in ModelStep.unsupported(model)  # the step's sentence: which families it decodes, not this one


def test_generate_gives_transformers_greedy_tokens_batched_or_one_at_a_time(family):
    _, _, model, tokenizer = family
    expected = _reference(model, tokenizer, PROMPTS, NEW)
    batched = nf4tune.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, records=True)
    alone = nf4tune.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, batch_size=1)  # a call each
    assert [c.text for c in batched] == expected == alone
    assert all((c.tokens, c.finish_reason) == (NEW, "length") for c in batched)
    assert len(set(expected)) > 1 and all(expected)  # the model says different things: the comparison means something


def test_stop_strings_and_max_new_tokens(family):
    _, _, model, tokenizer = family
    [full] = _reference(model, tokenizer, PROMPTS[:1], NEW)
    stop = full[3:5]  # the reply ends before the first place it appears
    [cut] = nf4tune.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=NEW, stop=[stop], records=True)
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    [short] = nf4tune.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=3, records=True)
    assert short.tokens == 3 and short.finish_reason == "length" and full.startswith(short.text)


def test_rows_with_their_own_settings_and_adapters_share_one_engine(family, tmp_path):
    """Rows that differ in adapter or settings go through generate in groups; each answers as alone."""
    name, path, model, tokenizer = family
    with torch.random.fork_rng(devices=[]):  # the same adapter every run (A is drawn from the global generator)
        torch.manual_seed(0)
        tuned, _ = _load(path, lora=nf4tune.LoraConfig(r=4, alpha=32, dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every B, the experts' (PEFT target_parameters) included: the bank must switch them too
        for param_name, param in tuned.named_parameters():
            if param_name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    nf4tune.save_adapter(tuned, tmp_path / "alpha")
    own, _ = _load(path, adapter=tmp_path / "alpha")
    tuned_text = _reference(own, tokenizer, PROMPTS[:1], NEW)[0]
    base_text = _reference(model, tokenizer, PROMPTS[:1], NEW)[0]
    assert tuned_text != base_text  # the adapter changes the model
    replies = nf4tune.generate(model, tokenizer, [PROMPTS[0]] * 3, max_new_tokens=NEW, adapter=["alpha", None, "alpha"],
                               adapters={"alpha": str(tmp_path / "alpha")})
    assert replies == [tuned_text, base_text, tuned_text]
    seeded = [nf4tune.generate(model, tokenizer, PROMPTS[:2], max_new_tokens=NEW, temperature=1.0, seed=3)
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed makes draws repeatable


def test_logprobs_are_the_models_own(family):
    _, _, model, tokenizer = family
    engine = Engine(model, tokenizer)
    try:
        request = engine.submit(Request(PROMPTS[0], sampling=Sampling(max_new_tokens=4), logprobs=2)).wait(60)
    finally:
        engine.close()
    assert request.error is None and len(request.token_logprobs) == request.completion_tokens == 4
    ids = tokenizer(PROMPTS[0], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        first = model(ids).logits[0, -1].float().log_softmax(-1)
    entry = request.token_logprobs[0]
    # greedy: the likeliest token's (the forward and generate's prefill may round the head alike or 1 bf16 ulp apart)
    assert entry["token"] == tokenizer.decode([int(first.argmax())])
    assert entry["logprob"] == pytest.approx(float(first.max()), abs=0.05)
    assert entry["top_logprobs"][0]["logprob"] == entry["logprob"] and len(entry["top_logprobs"]) == 2


def _post(server: Server, path: str, body: dict) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*server.address, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_the_server_answers_for_it(family):
    _, _, model, tokenizer = family
    [expected] = _reference(model, tokenizer, PROMPTS[:1], NEW)
    server = Server(Engine(model, tokenizer, max_batch=4), base_name="tiny", port=0)
    server.start()
    try:
        status, body = _post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0})
        assert status == 200, body
        assert json.loads(body)["choices"][0]["text"] == expected
        status, body = _post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0,
                                                         "stream": True, "stop": [expected[3:5]], "logprobs": 1})
        events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
        assert status == 200 and "".join(e["choices"][0]["text"] for e in events) == expected[:expected.index(expected[3:5])]
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
    finally:
        server.stop()


def test_the_streamer_skips_the_start_ids_and_takes_several_steps_at_once():
    starts = torch.tensor([[5, 6], [0, 7]])
    steps = []
    streamer = _Steps(starts, steps.append)
    streamer.put(starts.clone())  # generate() passes the ids it starts from first
    streamer.put(torch.tensor([[1, 2], [3, 4]]))  # two steps at once (B, k), as assisted generation passes them
    streamer.put(torch.tensor([8, 9]))
    assert steps == [[1, 3], [2, 4], [8, 9]]
