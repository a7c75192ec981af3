"""nf4tune's decoding runtime (runtime/step.py) for every family the registry gives it, and the public
`nf4tune.generate`.

Oracles: transformers' forward of the same 4-bit model in float32 (nf4tune's bf16 step must be about as
close to it as transformers' own bf16 forward is) and transformers' greedy `generate`. The tiny models
are initialized 10x wider than transformers' default (initializer_range=0.2), so attention is far from
uniform and every family feature matters: a step that drops Gemma 2's soft-capping, Gemma 3's local rope
base, SmolLM3's rope-less layers, the q/k norms or Granite's multipliers is 5-100x further off (measured)."""

import threading
import time

import pytest
import torch

import nf4tune
from nf4tune import dispatch
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.registry import families
from nf4tune.serve.decoder import Decoder
from nf4tune.serve.sampling import Sampling
from nf4tune.serve.static_decoder import StaticDecoder

needs_kernels = pytest.mark.skipif(not dispatch.path("decode_attention", torch.zeros(1)).fast,
                                   reason="the CPU decoder needs the AVX-512 CPU kernels")
FAMILIES = families("decoder")
WIDE = dict(initializer_range=0.2)
IDS = torch.randint(4, 90, (1, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / request.param, request.param, **WIDE)
    bf16, tokenizer = nf4tune.load_model(path, device="cpu", compute_dtype=torch.bfloat16, progress=False)
    fp32, _ = nf4tune.load_model(path, device="cpu", compute_dtype=torch.float32, progress=False)
    return request.param, bf16.eval(), fp32.eval(), tokenizer


def _assert_about_as_close_as_transformers(ours: torch.Tensor, bf16, fp32) -> None:
    with torch.no_grad():
        reference = fp32(IDS).logits[0, 5:15].double()
        theirs = bf16(IDS).logits[0, 5:15].double()
    ours = ours.double()
    rms, hf_rms = ((ours - reference) ** 2).mean().sqrt(), ((theirs - reference) ** 2).mean().sqrt()
    worst, hf_worst = (ours - reference).abs().max(), (theirs - reference).abs().max()
    assert rms <= 1.5 * hf_rms and worst <= 2.5 * hf_worst, (rms, hf_rms, worst, hf_worst)


@needs_kernels
def test_cpu_decoder_follows_transformers(family):
    name, bf16, fp32, _ = family
    assert Decoder.unsupported(bf16) is None
    decoder = Decoder(bf16)
    ours = [decoder.prefill(IDS[:, :6], capacity=16)] + [decoder.step(t.view(1)) for t in IDS[0, 6:15]]
    _assert_about_as_close_as_transformers(torch.cat(ours), bf16, fp32)


def test_static_decoder_step_follows_transformers(family):
    name, bf16, fp32, _ = family
    decoder = StaticDecoder(bf16, batch=1, capacity=16)
    ours = [decoder.prefill([(0, IDS[0, :6])])]
    for t in range(6, 15):
        ours.append(decoder.step(IDS[:, t], torch.tensor([t]), torch.tensor([0]), t))
    _assert_about_as_close_as_transformers(torch.cat(ours), bf16, fp32)


@needs_kernels
def test_packed_scorer_gives_the_decoders_prefill_logits(family):
    from nf4tune.evaluate.packed import PackedScorer

    name, bf16, _, _ = family
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(4, 90, (12,), generator=gen).tolist()
    seqs = [prefix + torch.randint(4, 90, (n,), generator=gen).tolist() for n in (3, 6)]
    packed = PackedScorer(bf16).tail_logits(seqs, [2, 2], batch_size=2)
    decoder = Decoder(bf16)
    for seq, logits in zip(seqs, packed):
        alone = decoder.prefill(torch.tensor([seq]), len(seq) + 1)[0]
        scale = alone.abs().max()
        assert (logits[-1] - alone).abs().max() <= 0.02 * scale  # bf16 GEMMs of other shapes: rounding only


@needs_kernels
def test_greedy_tokens_are_transformers_and_generate_runs_the_runtime(family):
    """The decoder's greedy tokens are transformers' generate's on the same model up to a near-tie (where
    they part, the float32 model scores both tokens within bf16 rounding); `nf4tune.generate` replies
    with them, through the engine on nf4tune's runtime."""
    name, bf16, fp32, tokenizer = family
    prompt = "Name a colour: "
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = bf16.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    theirs = out[0, ids.shape[1]:].tolist()
    [ours] = Decoder(bf16).generate(ids, Sampling(max_new_tokens=8))
    parted = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if parted is not None:
        with torch.no_grad():
            scores = fp32(torch.tensor([ids[0].tolist() + theirs[:parted]])).logits[0, -1]
        assert (scores[ours[parted]] - scores[theirs[parted]]).abs() <= 0.02 * scores.abs().max(), (name, parted)

    engine = nf4tune.serve.Engine(bf16, tokenizer)
    try:
        assert isinstance(engine.decoder, Decoder), engine.decode_path.reason
        eos = engine.eos_ids
    finally:
        engine.close()
    [reply] = nf4tune.generate(bf16, tokenizer, [prompt], max_new_tokens=8, records=True)
    ended = next((i for i, t in enumerate(ours) if t in eos), None)  # the reply ends at end of sequence
    assert reply.finish_reason == ("length" if ended is None else "stop"), name
    assert reply.text == tokenizer.decode(ours[:ended], skip_special_tokens=True), name


@needs_kernels
def test_generate_batches_as_alone_stops_and_leaves_the_tokenizer_as_it_was(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", **WIDE)
    model, tokenizer = nf4tune.load_model(path, device="cpu", progress=False)
    tokenizer.pad_token, tokenizer.padding_side = None, "right"
    prompts = ["Is 31 even or odd? ", "a", "Name a colour: "]
    settings = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    prefills = []
    real, real_check = Decoder._prefill_into, Sampling.check
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Decoder, "_prefill_into", lambda self, prompts, end: prefills.append(
            (len(prompts), threading.current_thread())) or real(self, prompts, end))
        # slow checks: time for the engine's worker to start on a request queued before the next is checked
        patch.setattr(Sampling, "check", lambda self: time.sleep(0.05) or real_check(self))
        together = nf4tune.generate(model, tokenizer, prompts, batch_size=3, records=True, **settings)
    # submitted together, prefilled together (not the first alone, the rest a step later), in the caller's thread:
    # a worker thread's OpenMP team made the kernels 2.5x slower with two CPU threads
    assert prefills == [(3, threading.current_thread())]
    alone = [nf4tune.generate(model, tokenizer, [p], **settings)[0] for p in prompts]
    assert [c.text for c in together] == alone
    assert all(c.finish_reason == "length" and c.tokens == 12 for c in together if c.text)
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"
    # a stop string ends a reply before it
    text = together[0].text
    stop = text[3:5]
    cut = nf4tune.generate(model, tokenizer, prompts[:1], stop=[stop], records=True, **settings)[0]
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"
    with pytest.raises(nf4tune.Nf4tuneError, match="list of strings"):
        nf4tune.generate(model, tokenizer, "one prompt")
    with pytest.raises(nf4tune.Nf4tuneError, match="adapters"):
        nf4tune.generate(model, tokenizer, ["x"], adapter="chat")


def test_sampling_draw_is_the_one_token_choice():
    """Both decoders draw through `serve.batching.draw`: a greedy row takes the argmax and stops at eos."""
    from nf4tune.serve.batching import Row, draw

    row = Row([1, 2], Sampling(max_new_tokens=3))
    row.logits = torch.tensor([0.0, 1.0, 3.0, 2.0])
    assert draw(row, eos_ids={9}) == 2 and not row.done
    assert draw(row, eos_ids={2}) == 2 and row.done and row.out == [2, 2]


@needs_kernels
def test_real_smollm2_replies_with_transformers_greedy_tokens(smollm2_gguf):
    """The real model (SmolLM2-135M-Instruct, a llama, from its GGUF), 4-bit: `nf4tune.generate` replies with
    transformers' greedy tokens on the same model, token for token, up to where transformers' own two best
    logits tie in bfloat16 (it takes the first; any other order of the sums can tip such a tie): there
    nf4tune's token must be one of the tied."""
    model, tokenizer = nf4tune.load_model(smollm2_gguf, device="cpu", progress=False)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    replies = nf4tune.generate(model, tokenizer, prompts, max_new_tokens=24, records=True)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    compared = 0
    for prompt, reply in zip(prompts, replies):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        [ours] = Decoder(model).generate(ids, Sampling(max_new_tokens=24), eos_ids=eos)
        kept = [t for t in ours if t not in eos]
        assert reply.text == tokenizer.decode(kept, skip_special_tokens=True) and reply.tokens == len(kept)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                                 output_scores=True, return_dict_in_generate=True)
        theirs = out.sequences[0, ids.shape[1]:].tolist()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                scores = out.scores[i][0]
                assert scores[a] == scores.max(), f"token {i}: {a} where transformers' best is {b}, no tie"
                break
            compared += 1
        else:
            assert len(ours) == len(theirs)
    assert compared >= 24  # most of the two replies agree before any tie


def test_prefill_weights_reuse_one_buffer_per_projection_layer_after_layer(tmp_path):
    """The prefill's dequantized weights: the same values as a fresh dequantization (4-bit and 16-bit bases),
    written into the memory the layer before used (no fresh weight-sized tensors per layer)."""
    from nf4tune.runtime.step import ModelStep, dequantized

    path = build_tiny_checkpoint(tmp_path / "llama", "llama", **WIDE)
    for quant_type in ("nf4", "none"):
        model, _ = nf4tune.load_model(path, device="cpu", quant_type=quant_type, progress=False)
        step = ModelStep(model)
        buffers: dict = {}
        first = dequantized(step.layers[0], buffers)
        pointers = {name: t.data_ptr() for name, t in buffers.items()}
        second = dequantized(step.layers[1], buffers)
        fresh = dequantized(step.layers[1])
        assert {id(m) for m in step.layers[1].proj.values()} == set(second) == set(fresh)
        assert all(torch.equal(second[k], fresh[k]) for k in fresh), quant_type
        assert {name: t.data_ptr() for name, t in buffers.items()} == pointers
        assert {w.data_ptr() for w in second.values()} == set(pointers.values()) and len(first) == len(second)
