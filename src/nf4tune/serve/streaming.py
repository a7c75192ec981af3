"""`BatchStreamer`: the text of a batch's replies, made as their tokens arrive (incrementally decoded,
cut at stop strings, with logprob entries) and sent to each request as `Delta`s."""

from __future__ import annotations

import bisect

import torch

from .request import Delta, Request


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may be the start of a stop string."""
    for k in range(min(max(map(len, stops)) - 1, len(text)), 0, -1):
        if any(len(s) > k and text.endswith(s[:k]) for s in stops):
            return k
    return 0


class ReplyRow:
    """One request's reply as it is generated: its tokens, its text, how much of it was sent."""

    def __init__(self, request: Request):
        self.request, self.ids, self.text, self.sent = request, [], "", 0
        self.window = (0, 0)  # where the decode window starts, where its new tokens start
        self.ends: list[int] = []  # per token: where its text ends in self.text
        self.pending: list[dict] = []  # logprob entries not yet sent with a delta
        self.finished = False


class BatchStreamer:
    """Makes the text of a batch's replies from their tokens, for `engine` (the `Engine`: its tokenizer,
    eos_ids, and `_failed` for a row that fails alone); each request's text goes to it as `Delta`s.

    Text is decoded incrementally (as text-generation-inference does): each new token's text is the
    decode of a short window ending in it minus the decode of the window without it, so a step costs
    the same at token 10 as at token 2000; a window ending inside a multi-byte character waits for
    the rest of its bytes. Stop strings are searched across token boundaries; text that may be the
    start of one is held back until the next tokens decide. (Which tokens each row gets is its
    decoder's: the engine hands them over with `take`.)"""

    def __init__(self, engine):
        self.engine = engine

    def take(self, row: ReplyRow, token: int, logits: torch.Tensor | None) -> None:
        """Give `row` its next token; a row whose text cannot be made (its decode, its logprobs) ends
        alone, failed and answered with its error, and the batch goes on without it."""
        try:
            self._token(row, token, logits)
        except Exception as e:
            row.finished = True
            self.engine._failed([row.request], e)

    def _token(self, row: ReplyRow, token: int, logits: torch.Tensor | None) -> None:
        request, eos, decode = row.request, self.engine.eos_ids, self.engine.tokenizer.decode
        if request.abandoned():
            return self.finish(row, "cancelled")
        if token in eos:
            return self.finish(row, "stop")
        row.ids.append(token)
        request.completion_tokens = len(row.ids)
        start, new = row.window
        before = decode(row.ids[start:new], skip_special_tokens=True)
        after = decode(row.ids[start:], skip_special_tokens=True)
        searched = max(0, len(row.text) - max(map(len, request.stop), default=0) + 1)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            row.window = (new, len(row.ids))
            row.text += after[len(before):]
        row.ends.append(len(row.text))
        if request.logprobs is not None and logits is not None:
            row.pending.append(self._logprob_entry(token, logits, request.logprobs))
        cut = min((i for i in (row.text.find(s, searched) for s in request.stop) if i >= 0), default=-1)
        if cut >= 0:
            row.text = row.text[:cut]
            return self.finish(row, "stop")
        if len(row.ids) >= request.sampling.max_new_tokens or request.expired():
            return self.finish(row, "length")
        self._send(row, len(row.text) - (_held_back(row.text, request.stop) if request.stop else 0))

    def _logprob_entry(self, token: int, logits: torch.Tensor, top: int) -> dict:
        logprobs = torch.log_softmax(logits.float(), -1)
        decode = self.engine.tokenizer.decode
        entry = {"token": decode([token]), "logprob": float(logprobs[token]), "top_logprobs": []}
        if top:
            values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
            entry["top_logprobs"] = [{"token": decode([i]), "logprob": float(v)} for v, i in zip(values.tolist(), ids.tolist())]
        return entry

    def _send(self, row: ReplyRow, upto: int, tokens: int | None = None) -> None:
        """Send the text up to `upto`, with the logprob entries of its first `tokens` tokens (default:
        those whose text it holds whole)."""
        request, entries = row.request, []
        if request.logprobs is not None:
            tokens = bisect.bisect_right(row.ends, upto) if tokens is None else tokens
            take = max(0, tokens - len(request.token_logprobs))
            entries, row.pending = row.pending[:take], row.pending[take:]
        if upto <= row.sent and not entries:
            return
        piece = Delta(row.text[row.sent:upto])
        piece.logprobs = entries
        request.token_logprobs.extend(entries)
        row.sent = max(row.sent, upto)
        request.text = row.text[:row.sent]
        request.deltas.put(piece)

    def finish(self, row: ReplyRow, reason: str) -> None:
        """End `row` with `reason` (stop, length, cancelled): its held-back text is sent."""
        row.finished = True
        row.request.finish_reason = reason
        length = len(row.text)
        # a stop string cut the text: the tokens that began before the cut belong to the reply
        tokens = len(row.ends) if not row.ends or row.ends[-1] <= length else \
            (0 if length == 0 else min(bisect.bisect_left(row.ends, length) + 1, len(row.ends)))
        self._send(row, length, tokens)
        row.request.completion_tokens = len(row.ids)
