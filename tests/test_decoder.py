"""The lean CPU decoder (serve/decoder.py) and sampling (serve/sampling.py).

Oracles: the same 4-bit model run by transformers' forward in float32 (the decoder must be about as
close to it as transformers' own bfloat16 forward is), and transformers' logits processors."""

import pytest
import torch

import nf4tune
from nf4tune import dispatch
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.lora import lora_layers
from nf4tune.serve import Engine, Request
from nf4tune.serve.decoder import Decoder
from nf4tune.serve.sampling import Sampling, next_token, process_logits

needs_kernels = pytest.mark.skipif(not dispatch.path("decode_attention", torch.zeros(1)).fast,
                                   reason="the decoder needs the AVX-512 CPU kernels")
# multiples of 128, so the projections take the bf16 dot-product path where the CPU has it
SHAPE = dict(hidden_size=128, intermediate_size=256)


def _pair(path, lora: bool, seed: int = 0):
    """The checkpoint as a bf16-compute and a float32-compute 4-bit model, with identical random
    biases and (when `lora`) identical nonzero adapters."""
    models = []
    for dtype in (torch.bfloat16, torch.float32):
        config = nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0) if lora else None
        model, _ = nf4tune.load_model(path, device="cpu", compute_dtype=dtype, progress=False, lora=config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, layer in sorted(lora_layers(model).items()) if lora else ():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.1)
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    if proj.bias is not None:
                        proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.5)
        models.append(model.eval())
    return models


@needs_kernels
@pytest.mark.parametrize("arch,extra,lora", [
    ("llama", {}, False),                       # grouped-query attention (4 heads, 2 KV heads)
    ("llama", {}, True),                        # unmerged LoRA on every projection
    ("mistral", {"sliding_window": 5}, False),  # positions beyond the window are not attended
    ("qwen2", {}, False),                       # q/k/v biases
    ("llama", {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1}, False),  # 128-wide heads
])
def test_decoder_is_about_as_accurate_as_transformers_bf16_forward(tmp_path, arch, extra, lora):
    path = build_tiny_checkpoint(tmp_path / arch, arch, **{**SHAPE, **extra})
    bf16, fp32 = _pair(path, lora)
    ids = torch.randint(4, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = fp32(ids).logits[0, 5:15].double()
        transformers_bf16 = bf16(ids).logits[0, 5:15].double()
    decoder = Decoder(bf16)
    ours = [decoder.prefill(ids[:, :6], capacity=16)] + [decoder.step(t.view(1)) for t in ids[0, 6:15]]
    ours = torch.cat(ours).double()
    # both differ from float32 by bf16 rounding noise; a wrong rotary, window, bias or adapter is off by
    # 0.1-1 (a decoder ignoring the window: 0.48)
    rms, hf_rms = ((ours - reference) ** 2).mean().sqrt(), ((transformers_bf16 - reference) ** 2).mean().sqrt()
    worst, hf_worst = (ours - reference).abs().max(), (transformers_bf16 - reference).abs().max()
    assert rms <= 1.5 * hf_rms and worst <= 2 * hf_worst, (rms, hf_rms, worst, hf_worst)


@needs_kernels
def test_greedy_tokens_are_the_reference_argmax_and_the_engine_uses_the_decoder(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "llama", "llama", **SHAPE)
    bf16, fp32 = _pair(path, lora=False)
    prompt = torch.randint(4, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    seen = []
    [tokens] = Decoder(bf16).generate(prompt, Sampling(max_new_tokens=12), on_step=seen.append)
    assert seen == [[t] for t in tokens] and len(tokens) == 12
    with torch.no_grad():
        logits = fp32(torch.cat([prompt, torch.tensor([tokens[:-1]])], 1)).logits[0, 6:].float()
    # each choice is the float32 model's best token, up to bfloat16-level near-ties
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert (chosen >= logits.max(1).values - 0.02).all()

    _, tokenizer = nf4tune.load_model(path, device="cpu", progress=False)
    engine = Engine(bf16, tokenizer)
    assert isinstance(engine.decoder, Decoder)
    text = tokenizer.decode(prompt[0])
    reply = engine.submit(Request(text, sampling=Sampling(max_new_tokens=12))).wait(60)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    [expected] = Decoder(bf16).generate(ids, Sampling(max_new_tokens=12), eos_ids=engine.eos_ids)
    assert reply.text == tokenizer.decode(expected, skip_special_tokens=True)
    engine.close()


@needs_kernels
def test_decoder_stops_at_end_of_sequence_and_refuses_other_models(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "llama", "llama", **SHAPE)
    model, _ = nf4tune.load_model(path, device="cpu", progress=False)
    prompt = torch.randint(4, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    [first] = Decoder(model).generate(prompt, Sampling(max_new_tokens=6))
    stop = first[-1]
    assert Decoder(model).generate(prompt, Sampling(max_new_tokens=6), eos_ids={stop}) == [first[:first.index(stop) + 1]]
    with pytest.raises(ValueError, match="batch, length"):
        Decoder(model).generate(prompt[0], Sampling())

    olmo2 = build_tiny_checkpoint(tmp_path / "olmo2", "olmo2")  # a family the model step does not cover
    assert "not olmo2" in Decoder.unsupported(nf4tune.load_model(olmo2, device="cpu", progress=False)[0])
    fp32, _ = nf4tune.load_model(path, device="cpu", compute_dtype=torch.float32, progress=False)
    assert "bfloat16" in Decoder.unsupported(fp32)


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=20, top_p=0.5, repetition_penalty=1.3),
    dict(temperature=0.0, repetition_penalty=0.8),
])
def test_sampling_scores_match_transformers_processors(settings):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(100, generator=gen) * 3
    seen = torch.randint(0, 100, (30,), generator=gen)
    s = Sampling(**settings)
    processors = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.temperature > 0:
        processors.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            processors.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1:
            processors.append(TopPLogitsWarper(s.top_p))
    expected = processors(seen[None], logits[None].clone())[0]
    ours = process_logits(logits, s, seen)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])
    if s.temperature > 0:
        draws = {next_token(logits, s, seen, torch.Generator().manual_seed(i)) for i in range(50)}
        assert draws <= set(torch.nonzero(~torch.isinf(expected))[:, 0].tolist())
        again = {next_token(logits, s, seen, torch.Generator().manual_seed(i)) for i in range(50)}
        assert draws == again


@needs_kernels
def test_a_row_decodes_the_same_alone_and_batched_with_a_shorter_padded_one(tmp_path):
    # a sliding window of 6 over up to 15 positions, left padding, and an adapter: every row's logits
    # are bit for bit what it gets alone, so batching never changes a reply
    path = build_tiny_checkpoint(tmp_path / "mistral", "mistral", **SHAPE, sliding_window=6)
    model, _ = _pair(path, lora=True)
    gen = torch.Generator().manual_seed(5)
    long, short = torch.randint(4, 100, (1, 9), generator=gen), torch.randint(4, 100, (1, 4), generator=gen)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1)]).long()
    follow = torch.randint(4, 100, (6,), generator=gen)
    decoder = Decoder(model)

    def run(ids, attention_mask=None):
        logits = [decoder.prefill(ids, 16, attention_mask)]
        return torch.stack(logits + [decoder.step(t.repeat(ids.shape[0])) for t in follow])

    together = run(batch, mask)
    assert torch.equal(run(long)[:, 0], together[:, 0])
    assert torch.equal(run(short)[:, 0], together[:, 1])
    for sampling in (Sampling(max_new_tokens=5), Sampling(max_new_tokens=5, temperature=1.5, seed=3)):
        tokens = decoder.generate(batch, sampling, attention_mask=mask)
        assert tokens == [decoder.generate(long, sampling)[0], decoder.generate(short, sampling)[0]]
