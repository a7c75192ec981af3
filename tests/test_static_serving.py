"""The serving engine through the static-cache decoder (serve/static_decoder.py): which decoder
`nf4tune.dispatch` picks per device and switch, and, forced on CPU, the engine's replies through the
static decoder are the replies of its CPU path (the native decoder, or generate without AVX-512)."""

import logging
import re
from types import SimpleNamespace

import pytest
import torch

import nf4tune
from nf4tune import dispatch
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.cli.main import main
from nf4tune.errors import Nf4tuneError
from nf4tune.serve import Engine, Request, Sampling
from nf4tune.serve.generate_runner import GenerateRunner
from nf4tune.serve.static_decoder import StaticDecoder

CUDA = SimpleNamespace(device=torch.device("cuda"))  # the choice only looks at the device


@pytest.fixture
def env(monkeypatch):
    def set_(**switches):
        for name in (dispatch.STATIC_DECODER_ENV, dispatch.COMPILE_ENV):
            monkeypatch.delenv(name, raising=False)
        for name, value in switches.items():
            monkeypatch.setenv(name, value)
    return set_


def test_dispatch_picks_the_cuda_graph_decoder_on_cuda_and_keeps_the_cpu_decoder_on_cpu(env, capsys):
    env()
    assert dispatch.path("decode", CUDA).name == "static-graphs"
    cpu = dispatch.path("decode", torch.zeros(1))
    assert cpu.name == (dispatch.NATIVE if dispatch.path("decode_attention", torch.zeros(1)).fast else dispatch.REFERENCE)
    env(NF4TUNE_COMPILE="0")
    chosen = dispatch.path("decode", CUDA)
    assert chosen.name == "static-eager" and "NF4TUNE_COMPILE=0" in chosen.reason
    env(NF4TUNE_STATIC_DECODER="0")
    assert dispatch.path("decode", CUDA).name == dispatch.REFERENCE
    env(NF4TUNE_STATIC_DECODER="graphs")
    assert dispatch.path("decode", torch.zeros(1)).name == "static-compiled"  # graphs need a GPU
    env(NF4TUNE_STATIC_DECODER="eager")
    assert dispatch.path("decode", torch.zeros(1)).name == "static-eager"
    assert main(["doctor"]) == 0  # lists the decode path with its reason
    assert re.search(r"^  decode +static-eager +NF4TUNE_STATIC_DECODER=eager", capsys.readouterr().out, re.M)
    env(NF4TUNE_STATIC_DECODER="fast")
    with pytest.raises(Nf4tuneError, match="NF4TUNE_STATIC_DECODER"):
        dispatch.path("decode", CUDA)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # weights 5x the default's spread: logits with clear winners, not bf16-rounding near-ties between
    # the two decoders' different (equally right) summation orders
    return build_tiny_checkpoint(tmp_path_factory.mktemp("static-serving") / "llama", "llama",
                                 hidden_size=128, intermediate_size=256, initializer_range=0.1)


def _replies(engine: Engine, prompts: list[str], sampling: Sampling) -> list[str]:
    """The prompts submitted together (held back until all are queued, so they share a batch)."""
    engine.gate.clear()
    requests = [engine.submit(Request(p, sampling=sampling)) for p in prompts]
    engine.gate.set()
    try:
        return [r.wait(120).text for r in requests]
    finally:
        engine.close()


def test_the_engine_replies_alike_through_the_static_decoder(checkpoint, env):
    model, tokenizer = nf4tune.load_model(checkpoint, device="cpu", progress=False)
    prompts = ["Once upon a time, in a land far away", "Hi"]  # two lengths, decoded concurrently
    sampling = Sampling(max_new_tokens=12)
    env()
    current = Engine(model, tokenizer, max_batch=4)
    assert not isinstance(current.decoder, StaticDecoder)
    expected = _replies(current, prompts, sampling) + _replies(Engine(model, tokenizer), prompts[1:], sampling)
    env(NF4TUNE_STATIC_DECODER="eager")
    static = Engine(model, tokenizer, max_batch=4)
    assert isinstance(static.decoder, StaticDecoder) and static.decode_path.name == "static-eager"
    assert _replies(static, prompts, sampling) == expected[:2]
    assert static.decoder.capacity == 256  # the prompt and reply rounded up
    assert expected[2] == expected[1] and all(len(t) > 0 for t in expected)  # a reply is the same alone


def test_the_engine_falls_back_saying_why_where_the_static_decoder_cannot_serve(checkpoint, env, caplog, tmp_path):
    env(NF4TUNE_STATIC_DECODER="eager")
    fp32, tokenizer = nf4tune.load_model(checkpoint, device="cpu", compute_dtype=torch.float32, progress=False)
    with caplog.at_level(logging.INFO, logger="nf4tune"):
        engine = Engine(fp32, tokenizer)
    engine.close()
    assert isinstance(engine.decoder, GenerateRunner) and engine.decode_path.name == dispatch.REFERENCE
    assert "bfloat16" in engine.decode_path.reason and "static-cache decoder cannot serve" in caplog.text
    # several adapters, each request under its own: the CPU decoder's (or generate's) work
    tuned, _ = nf4tune.load_model(checkpoint, device="cpu", progress=False, lora=nf4tune.LoraConfig(r=4, alpha=8))
    nf4tune.save_adapter(tuned, tmp_path / "adapter")
    model, _ = nf4tune.load_model(checkpoint, device="cpu", progress=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nf4tune"):
        engine = Engine(model, tokenizer, {"a": str(tmp_path / "adapter")})
    engine.close()
    assert not isinstance(engine.decoder, StaticDecoder) and "their own adapters" in caplog.text
    assert engine.decode_path.name in (dispatch.NATIVE, dispatch.REFERENCE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_cuda_the_engine_decodes_through_the_cuda_graph_step(checkpoint, env):
    env()
    model, tokenizer = nf4tune.load_model(checkpoint, device="cuda", progress=False)
    prompts = ["Once upon a time, in a land far away", "Hi"]
    sampling = Sampling(max_new_tokens=12)
    engine = Engine(model, tokenizer, max_batch=4)
    assert engine.decode_path.name == "static-graphs" and engine.decoder.mode == "graphs"
    replies = _replies(engine, prompts, sampling)
    compiled = StaticDecoder(model, 4, 64, mode="compiled")  # the graph replays this step's kernels
    for prompt, reply in zip(prompts, replies):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        [tokens] = compiled.generate(ids, sampling, eos_ids=engine.eos_ids)
        assert reply == tokenizer.decode([t for t in tokens if t not in engine.eos_ids], skip_special_tokens=True)
