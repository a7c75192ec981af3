"""MMLU-style multiple choice, with lm-evaluation-harness's MMLU prompt and two scorings.

The prompt (lm-eval's `mmlu` task, which qlora.py's 5-shot MMLU also uses):
`The following are multiple choice questions (with answers) about {subject}.\n\n`, then the solved examples
`{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {letter}\n\n`, then the question up to `Answer:`.

- `letter` (qlora.py): the argmax of the next-token logits over the first tokens of ` A`, ` B`, ...
- `loglikelihood` (lm-eval): the argmax of the summed log-probability of each continuation ` A`, ` B`, ...,
  the continuation's tokens being those that follow the context in the tokenization of context + ` A`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..errors import Nf4tuneError
from .questions import LETTERS, Question
from .scoring import context_length, tail_logits

log = logging.getLogger("nf4tune")
METHODS = ("letter", "loglikelihood")
NO_SUBJECT = "all"  # the name questions without a subject are reported under


def description(subject: str) -> str:
    if not subject:
        return "The following are multiple choice questions (with answers).\n\n"
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(q: Question) -> str:
    lines = [q.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def build_prompt(q: Question, shots: list[Question]) -> str:
    """The whole prompt: description, solved examples, then the question ending in `Answer:`."""
    solved = "".join(f"{format_question(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return description(q.subject) + solved + format_question(q)


def shots_for(q: Question, dev: list[Question], k: int) -> list[Question]:
    """The first `k` dev questions of the question's subject (lm-eval's `first_n` sampler); all of them
    when neither side has subjects."""
    if k <= 0:
        return []
    return [d for d in dev if d.subject == q.subject][:k]


@dataclass
class MultipleChoiceResult:
    method: str
    accuracy: float  # over questions
    accuracy_subject_mean: float  # unweighted mean over subjects, as qlora.py logs it
    n: int
    per_subject: dict[str, float]
    per_subject_n: dict[str, int]
    predictions: list[str]  # a letter per question, in input order
    shots: int
    shots_dropped: int = 0  # questions that lost few-shot examples to fit the context
    truncated: int = 0  # questions still too long without examples, cut from the left
    scores: list[list[float]] = field(default_factory=list, repr=False)  # per question, per choice

    def table(self) -> str:
        width = max(len(s) for s in self.per_subject) + 2
        lines = [f"{'subject':<{width}}{'n':>6}  accuracy"]
        lines += [f"{s:<{width}}{self.per_subject_n[s]:>6}  {a:.1%}" for s, a in self.per_subject.items()]
        lines.append(f"{'all questions':<{width}}{self.n:>6}  {self.accuracy:.1%}")
        lines.append(f"{'mean over subjects':<{width}}{len(self.per_subject):>6}  {self.accuracy_subject_mean:.1%}")
        return "\n".join(lines + [self.notes()])

    def notes(self) -> str:
        notes = f"{self.shots}-shot, {self.method} scoring"
        if self.shots_dropped:
            notes += f"; {self.shots_dropped} prompt(s) lost examples to fit the context"
        if self.truncated:
            notes += f"; {self.truncated} prompt(s) cut at the start even without examples"
        return notes

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines for a side-by-side table (`evaluate.compare`): accuracy per subject (with
        its question count), over all questions, and the mean over subjects."""
        rows = [(f"{s} ({self.per_subject_n[s]})", f"{a:.1%}") for s, a in self.per_subject.items()]
        return rows + [(f"all questions ({self.n})", f"{self.accuracy:.1%}"),
                       (f"mean over subjects ({len(self.per_subject)})", f"{self.accuracy_subject_mean:.1%}")]

    def as_json(self) -> dict:
        return {"task": "multiple_choice", "method": self.method, "accuracy": self.accuracy,
                "accuracy_subject_mean": self.accuracy_subject_mean, "n": self.n, "per_subject": self.per_subject,
                "per_subject_n": self.per_subject_n, "predictions": self.predictions, "shots": self.shots,
                "shots_dropped": self.shots_dropped, "truncated": self.truncated}


def _encode(tokenizer, text: str) -> list[int]:
    # The tokenizer's own special tokens (a BOS where it adds one), as the model saw text in training.
    return list(tokenizer(text).input_ids)


def _letter_tokens(tokenizer, n_choices: int) -> tuple[list[int], list[int]]:
    """(shared prefix, one token per letter): the first tokens where ` A`, ` B`, ... differ. With a tokenizer
    that has ` A` as one token the prefix is empty; with one that splits off the space, it is that space."""
    encodings = [list(tokenizer(f" {LETTERS[i]}", add_special_tokens=False).input_ids) for i in range(n_choices)]
    prefix = []
    for column in zip(*encodings):
        if len(set(column)) > 1:
            break
        prefix.append(column[0])
    if any(len(e) <= len(prefix) for e in encodings):
        raise Nf4tuneError("the tokenizer encodes the answer letters ' A', ' B', ... the same way; "
                           "the letter scoring cannot tell them apart (use --method loglikelihood).")
    return prefix, [e[len(prefix)] for e in encodings]


def _fit(q: Question, dev: list[Question], shots: int, tokenizer, room: int) -> tuple[str, list[int], bool, bool]:
    """The prompt for `q` and its token ids, dropping examples (the last first) until it fits in `room`
    tokens, then cutting the prompt's start. Returns (text, ids, examples dropped, truncated)."""
    examples = shots_for(q, dev, shots)
    text = build_prompt(q, examples)
    ids = _encode(tokenizer, text)
    dropped = False
    while len(ids) > room and examples:
        examples = examples[:-1]
        dropped = True
        text = build_prompt(q, examples)
        ids = _encode(tokenizer, text)
    if len(ids) > room:
        ids = ids[len(ids) - room:]
        return tokenizer.decode(ids, skip_special_tokens=True), ids, dropped, True
    return text, ids, dropped, False


def evaluate_multiple_choice(model, tokenizer, questions: list[Question], dev: list[Question] | None = None,
                             shots: int | None = None, method: str = "letter", batch_size: int = 8,
                             progress: bool = True) -> MultipleChoiceResult:
    """Accuracy of `model` on `questions`, with `shots` solved examples per question taken from `dev`
    (default 5 when dev questions are given, else 0). Works on nf4tune's 4-bit model or any transformers
    causal LM."""
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise Nf4tuneError(f"unknown scoring method {method!r}; choose {' or '.join(METHODS)}.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise Nf4tuneError("multiple-choice evaluation needs a causal (decoder-only) language model.")
    dev = dev or []
    shots = (5 if dev else 0) if shots is None else shots
    if shots > 0 and not dev:
        raise Nf4tuneError(f"--shots {shots} needs solved examples: give a dev file (--dev) or a Hub dataset with a dev split.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    limit = context_length(model, tokenizer)
    n_choices = {len(q.choices) for q in questions}

    # Each question becomes one or more token sequences and a rule turning their tail logits into scores.
    seqs: list[list[int]] = []
    keep: list[int] = []
    plans = []  # per question: (kind, first sequence index, data)
    dropped = truncated = 0
    letter_cache = {n: _letter_tokens(tokenizer, n) for n in n_choices} if method == "letter" else {}
    for q in questions:
        n = len(q.choices)
        if method == "letter":
            prefix, letters = letter_cache[n]
            _, ids, d, t = _fit(q, dev, shots, tokenizer, limit - len(prefix))
            plans.append(("letter", len(seqs), letters))
            seqs.append(ids + prefix)
            keep.append(1)
        else:
            text, ids, d, t = _fit(q, dev, shots, tokenizer, limit - 8)  # room for the continuation
            if t:
                ids = _encode(tokenizer, text)
            # As lm-eval splits them: the continuation is what follows the context's tokens in context + " A".
            conts = [_encode(tokenizer, text + f" {LETTERS[i]}")[len(ids):] for i in range(n)]
            if any(not c for c in conts):
                raise Nf4tuneError(f"question {q.row}: a continuation ' A'..' {LETTERS[n - 1]}' encodes to no tokens.")
            common = []
            for column in zip(*conts):
                if len(set(column)) > 1:
                    break
                common.append(column[0])
            if all(len(c) == len(common) + 1 for c in conts):  # one forward pass scores every choice
                plans.append(("last", len(seqs), [c[-1] for c in conts]))
                seqs.append(ids + common)
                keep.append(1)
            else:
                plans.append(("sum", len(seqs), conts))
                for c in conts:
                    seqs.append(ids + c[:-1])
                    keep.append(len(c))
        dropped += d
        truncated += t
    if dropped:
        log.info("nf4tune: %d of %d prompts were too long for the %d-token context and lost few-shot examples",
                 dropped, len(questions), limit)

    with tqdm(total=len(seqs), desc="scoring", unit="seq", disable=not progress) as bar:
        fast = packed_scorer(model)
        if fast is not None:
            logits = fast.tail_logits(seqs, keep, batch_size, on_batch=bar.update)
        else:
            logits = tail_logits(model, seqs, keep, batch_size, pad_id, on_batch=bar.update)

    predictions, scores = [], []
    for (kind, first, data) in plans:
        if kind == "letter":
            s = logits[first][-1, data].tolist()
        elif kind == "last":
            s = torch.log_softmax(logits[first][-1], -1)[data].tolist()
        else:
            s = []
            for j, cont in enumerate(data):
                lp = torch.log_softmax(logits[first + j], -1)
                s.append(float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        scores.append(s)
        predictions.append(LETTERS[max(range(len(s)), key=s.__getitem__)])
    return _summarize(method, questions, predictions, scores, shots, dropped, truncated)


def packed_scorer(model):
    """nf4tune's CPU prefill scorer (`packed.PackedScorer`) where it runs `model` (a bf16 4-bit Llama-family
    model on a CPU with the AVX-512 kernels), else None: transformers' forward (`scoring.tail_logits`)."""
    from ..serve.decoder import Decoder

    if Decoder.unsupported(model) is not None:
        return None
    from .packed import PackedScorer

    return PackedScorer(model)


def _summarize(method, questions, predictions, scores, shots, dropped, truncated) -> MultipleChoiceResult:
    hits: dict[str, list[int]] = defaultdict(list)
    for q, p in zip(questions, predictions):
        hits[q.subject or NO_SUBJECT].append(int(LETTERS[q.answer] == p))
    per_subject = {s: sum(h) / len(h) for s, h in sorted(hits.items())}
    correct = sum(sum(h) for h in hits.values())
    return MultipleChoiceResult(
        method=method, accuracy=correct / len(questions), accuracy_subject_mean=sum(per_subject.values()) / len(per_subject),
        n=len(questions), per_subject=per_subject, per_subject_n={s: len(h) for s, h in sorted(hits.items())},
        predictions=predictions, shots=shots, shots_dropped=dropped, truncated=truncated, scores=scores)
