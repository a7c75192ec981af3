"""Sampling settings and the next-token choice, with transformers' semantics.

`next_token` applies the repetition penalty, temperature, top-k and top-p in the order (and with
the tie rules) of transformers' `generate` (RepetitionPenaltyLogitsProcessor, then the Temperature,
TopK and TopP warpers), so a model decodes alike through nf4tune's decoder and through `generate`.
OpenAI's frequency and presence penalties (over the tokens generated so far) come after the
repetition penalty and before the temperature, as vLLM applies them.

A temperature below `MIN_TEMPERATURE` decodes greedily, as 0 does (vLLM treats tiny temperatures so
too): dividing the scores by one far smaller overflows float32 to inf, and inf - inf is NaN, so no
distribution is left to draw from. `Sampling.check` writes such settings as greedy ones, so a request
sent with temperature 1e-38 is served (and batched) exactly as one sent with 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .. import dispatch
from ..errors import Nf4tuneError

MIN_TEMPERATURE = 1e-4  # below it, greedy: logits up to ~1e34 divided by it stay finite in float32


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    repetition_penalty: float = 1.0
    seed: int | None = None
    frequency_penalty: float = 0.0  # OpenAI's: minus this times each token's count in the reply so far
    presence_penalty: float = 0.0  # OpenAI's: minus this for each token the reply has used

    def check(self) -> "Sampling":
        """These settings, checked (Nf4tuneError for values that give no distribution) and normalized: a
        greedy one (temperature below MIN_TEMPERATURE) has temperature 0 and the settings only sampling
        reads (top_p, top_k, seed) at their defaults, so greedy requests compare equal."""
        floats = (self.temperature, self.top_p, self.repetition_penalty, self.frequency_penalty, self.presence_penalty)
        if self.max_new_tokens <= 0 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 \
                or self.repetition_penalty <= 0 or not all(math.isfinite(v) for v in floats) \
                or (self.seed is not None and not -(2 ** 63) <= self.seed < 2 ** 63):
            raise Nf4tuneError(f"invalid sampling settings: {dataclasses.asdict(self)}.")
        if self.greedy:
            return dataclasses.replace(self, temperature=0.0, top_p=1.0, top_k=0, seed=None)
        return self

    @property
    def greedy(self) -> bool:
        """Whether the next token is the likeliest one (temperature 0, or below MIN_TEMPERATURE)."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalizes_reply(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)


def process_logits(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None = None,
                   generated: list[int] | None = None) -> torch.Tensor:
    """The float32 scores (vocab,) sampling draws from: penalized, tempered and truncated (-inf).
    `seen`: the prompt and reply tokens (repetition penalty); `generated`: the reply's (OpenAI's penalties)."""
    scores = logits.float()
    penalized = s.repetition_penalty != 1.0 and seen is not None and seen.numel()
    if penalized or (s.penalizes_reply and generated):
        scores = scores.clone()  # changed in place below; the caller's logits stay as they are
    if penalized:
        picked = scores[seen]
        scores[seen] = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
    if s.penalizes_reply and generated:
        counts = torch.bincount(torch.tensor(generated), minlength=scores.numel())[: scores.numel()].float()
        scores -= counts * s.frequency_penalty + (counts > 0).float() * s.presence_penalty
    if s.greedy:
        return scores
    scores = scores / s.temperature
    if s.top_k:
        kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(scores)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), -float("inf"))
    return scores


def next_token(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None = None,
               generator: torch.Generator | None = None, generated: list[int] | None = None) -> int:
    """The next token for one sequence's last logits (vocab,): greedy when temperature is (nearly) 0, else
    drawn. Raises Nf4tuneError when the scores give no distribution (NaN or inf in the logits), rather
    than letting `multinomial` fail obscurely (on CUDA, with a device-side assert that ends the process)."""
    scores = process_logits(logits, s, seen, generated)
    if s.greedy:
        return int(dispatch.argmax(scores))
    probabilities = scores.softmax(-1)
    if not bool(torch.isfinite(probabilities).all()):
        raise Nf4tuneError(f"the next-token scores at temperature {s.temperature:g} are not finite (the logits hold "
                           "NaN or inf, or overflow float32 when divided by it), so there is nothing to draw from.")
    return int(torch.multinomial(probabilities, 1, generator=generator))
