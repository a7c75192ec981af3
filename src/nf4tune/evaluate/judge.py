"""`nf4tune judge`: pairwise judging of answer files by an OpenAI-compatible chat model, summarized as
win/tie/loss, win rates and Elo ratings.

Every pair of models is judged on every prompt in both orders with a prompt laid out as FastChat's
`pair-v2` (our wording); a verdict that follows the position rather than the answer counts as a tie, as
FastChat's llm_judge does. Judge replies are cached on disk, so an interrupted run continues without
paying twice. Only the standard library talks to the endpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Nf4tuneError
from .elo import Match, elo_over_orders

log = logging.getLogger("nf4tune")
PROMPTS = Path(__file__).with_name("prompts.jsonl")  # 40 prompts written for nf4tune, for `nf4tune generate`

SYSTEM_PROMPT = (
    "You are a careful, impartial reviewer comparing two AI assistants. Read the user's question and the two "
    "answers below, then decide which answer serves the user better. Weigh whether each answer actually does what "
    "was asked, whether it is correct, how useful and specific it is, and whether it is clear. Do not let the "
    "order of the answers, their length, or the assistants' names sway you; a longer answer is better only if "
    "the extra text helps. Explain your comparison briefly, then give your verdict on the last line in exactly "
    'this form: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" if they are equally good.'
)
USER_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)}]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie) from the last `[[X]]` in the judge's reply; None when there is none."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------- answers

@dataclass
class AnswerSet:
    model: str
    path: str
    questions: list[str]
    answers: list[str]


def _question(row: dict) -> str:
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        if len(messages) == 1 or all(m.get("role") != "assistant" for m in messages):
            return "\n\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "system")
        return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
    return ""


def read_answers(path: str | Path) -> AnswerSet:
    """One model's answers, as `nf4tune generate` writes them: JSONL rows with `prompt` (or `messages`) and
    `completion`; the model's name from a `model` field, else the file name."""
    path = Path(path)
    if not path.is_file():
        raise Nf4tuneError(f"answers file {path} does not exist.")
    questions, answers, names = [], [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise Nf4tuneError(f"{path}, line {number}: not valid JSON ({e}).") from e
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str) or not _question(row):
            raise Nf4tuneError(f'{path}, line {number}: expected {{"prompt": ..., "completion": ...}} as nf4tune generate '
                               "writes it.")
        questions.append(_question(row))
        answers.append(row["completion"])
        if isinstance(row.get("model"), str):
            names.add(row["model"])
    if not answers:
        raise Nf4tuneError(f"{path} has no answers.")
    if len(names) > 1:
        raise Nf4tuneError(f"{path} names several models ({', '.join(sorted(names))}); give each model its own file.")
    return AnswerSet(names.pop() if names else path.stem, str(path), questions, answers)


def check_answer_sets(sets: list[AnswerSet]) -> None:
    if len(sets) < 2:
        raise Nf4tuneError("judging needs answer files of at least two models.")
    seen: dict[str, str] = {}
    for s in sets:
        if s.model in seen:
            raise Nf4tuneError(f"{seen[s.model]} and {s.path} are both model {s.model!r}; rename a file or set `model`.")
        seen[s.model] = s.path
    first = sets[0]
    for s in sets[1:]:
        if len(s.questions) != len(first.questions):
            raise Nf4tuneError(f"{s.path} has {len(s.questions)} answers, {first.path} {len(first.questions)}; "
                               "all files must answer the same prompts.")
        for i, (q1, q2) in enumerate(zip(first.questions, s.questions)):
            if q1 != q2:
                raise Nf4tuneError(f"{s.path}, answer {i + 1}: its prompt differs from {first.path}'s; "
                                   "all files must answer the same prompts in the same order.")


# ---------------------------------------------------------------------------------------------- the judge

class JudgeClient:
    """Chat completions from an OpenAI-compatible endpoint at temperature 0, retried with exponential backoff
    on 429, 5xx and connection errors, replies cached in a JSONL file keyed by the request."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, cache: str | Path | None = None,
                 max_retries: int = 6, backoff: float = 1.0, timeout: float = 300, max_tokens: int = 1024):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_retries, self.backoff, self.timeout, self.max_tokens = max_retries, backoff, timeout, max_tokens
        self.cache_path = Path(cache) if cache else None
        self.cache: dict[str, str] = {}
        self.lock = threading.Lock()
        self.requests = 0  # requests sent (not answered from the cache)
        if self.cache_path is not None and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["content"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted run

    def _key(self, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([self.url, self.model, messages], sort_keys=True).encode()).hexdigest()

    def cached(self, messages: list[dict]) -> str | None:
        return self.cache.get(self._key(messages))

    def remember(self, messages: list[dict], content: str) -> None:
        key = self._key(messages)
        with self.lock:
            self.cache[key] = content
            if self.cache_path is not None:
                with self.cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "content": content}) + "\n")

    def complete(self, messages: list[dict]) -> str:
        """The judge's reply to `messages` (not cached here; `remember` caches a reply worth keeping)."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            with self.lock:
                self.requests += 1
            wait = self.backoff * 2 ** attempt
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    raise Nf4tuneError(f"the judge at {self.url} answered {e.code}: {detail}") from e
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), 60.0)
                problem = f"{e.code} {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                problem = str(getattr(e, "reason", e))
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise Nf4tuneError(f"the judge at {self.url} sent a reply that is not a chat completion ({e}).") from e
            if attempt < self.max_retries:
                log.info("nf4tune: judge request failed (%s); retrying in %.1f s", problem, wait)
                time.sleep(wait)
        raise Nf4tuneError(f"the judge at {self.url} kept failing after {self.max_retries + 1} tries: {problem}.")


@dataclass
class Game:
    """One prompt judged with `first` as assistant A and `second` as B."""

    prompt: int
    first: str
    second: str
    verdict: str | None = None  # A, B, C, or None when the judge's replies could not be parsed


def judge_game(client: JudgeClient, game: Game, question: str, answer_a: str, answer_b: str,
               parse_retries: int = 2) -> Game:
    messages = judge_messages(question, answer_a, answer_b)
    content = client.cached(messages)
    if content is not None and parse_verdict(content):
        game.verdict = parse_verdict(content)
        return game
    for _ in range(parse_retries + 1):
        content = client.complete(messages)
        verdict = parse_verdict(content)
        if verdict is not None:
            client.remember(messages, content)  # unparseable replies are not cached: a rerun asks again
            game.verdict = verdict
            return game
    return game


def play_all(sets: list[AnswerSet], client: JudgeClient, concurrency: int = 8, parse_retries: int = 2,
             progress: bool = True) -> list[Game]:
    """Every pair of models on every prompt, in both orders, `concurrency` requests at a time."""
    from tqdm.auto import tqdm

    by_model = {s.model: s for s in sets}
    games = [Game(i, x, y) for a, b in itertools.combinations([s.model for s in sets], 2)
             for i in range(len(sets[0].questions)) for x, y in ((a, b), (b, a))]

    def play(game: Game) -> Game:
        return judge_game(client, game, sets[0].questions[game.prompt], by_model[game.first].answers[game.prompt],
                          by_model[game.second].answers[game.prompt], parse_retries)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            tqdm(total=len(games), desc="judging", unit="game", disable=not progress) as bar:
        futures = [pool.submit(play, g) for g in games]
        for f in futures:
            f.result()
            bar.update(1)
    return games


# ---------------------------------------------------------------------------------------------- results

@dataclass
class PairResult:
    model_a: str
    model_b: str
    win: int = 0  # model_a better in both orders
    tie: int = 0  # a tie in both orders, or verdicts that disagree between orders
    loss: int = 0
    inconsistent: int = 0  # of the ties: verdicts that changed with the order
    unparsed: int = 0  # prompts left out: a verdict could not be read in one of the orders


@dataclass
class JudgeResult:
    models: list[str]
    pairs: list[PairResult]
    elo: dict[str, float]
    elo_ci: dict[str, tuple[float, float]]
    win_rate: dict[str, float]
    matches: list[Match] = field(repr=False, default_factory=list)
    reference: str | None = None
    percent_of_reference: dict[str, float | None] = field(default_factory=dict)

    @property
    def inconsistent(self) -> int:
        return sum(p.inconsistent for p in self.pairs)

    @property
    def unparsed(self) -> int:
        return sum(p.unparsed for p in self.pairs)

    def as_json(self) -> dict:
        out = {"elo": self.elo, "elo_ci": {m: list(ci) for m, ci in self.elo_ci.items()}, "win_rate": self.win_rate,
               "pairs": [p.__dict__ for p in self.pairs], "inconsistent": self.inconsistent, "unparsed": self.unparsed}
        if self.reference:
            out["reference"] = self.reference
            out["percent_of_reference"] = self.percent_of_reference
        return out

    def table(self) -> str:
        width = max(len(m) for m in self.models) + 2
        ranked = sorted(self.models, key=lambda m: -self.elo[m])
        lines = [f"{'model':<{width}}{'Elo':>8}  {'95% interval':>15}  {'win rate':>8}"
                 + (f"  {'% of ' + self.reference:>12}" if self.reference else "")]
        for m in ranked:
            lo, hi = self.elo_ci[m]
            row = f"{m:<{width}}{self.elo[m]:>8.1f}  {f'{lo:.0f} - {hi:.0f}':>15}  {self.win_rate[m]:>8.1%}"
            if self.reference:
                pct = self.percent_of_reference.get(m)
                row += f"  {'-' if pct is None else f'{pct:.1f}%':>12}"
            lines.append(row)
        lines.append("")
        lines.append(f"{'pair':<{2 * width + 4}}{'win':>5}{'tie':>5}{'loss':>5}")
        for p in self.pairs:
            lines.append(f"{p.model_a + ' vs ' + p.model_b:<{2 * width + 4}}{p.win:>5}{p.tie:>5}{p.loss:>5}")
        lines.append(f"{self.inconsistent} verdict(s) changed with the order (counted as ties); "
                     f"{self.unparsed} prompt(s) left out for unreadable verdicts")
        return "\n".join(lines)


def _winner(verdict: str, a: str, b: str) -> str:
    return {"A": a, "B": b, "C": "tie"}[verdict]


def summarize(models: list[str], games: list[Game], orders: int = 10000, seed: int = 0,
              reference: str | None = None) -> JudgeResult:
    """Combine both orders of each (pair, prompt) into one match and rate the models."""
    played = {(g.prompt, g.first, g.second): g.verdict for g in games}
    pairs, matches = [], []
    points = {m: [0.0, 0] for m in models}  # score, matches
    for a, b in itertools.combinations(models, 2):
        result = PairResult(a, b)
        for prompt in sorted({g.prompt for g in games}):
            v1, v2 = played[(prompt, a, b)], played[(prompt, b, a)]
            if v1 is None or v2 is None:
                result.unparsed += 1
                continue
            w1, w2 = _winner(v1, a, b), _winner(v2, b, a)
            if w1 != w2:
                result.inconsistent += 1
                winner = "tie"
            else:
                winner = w1
            score = 1.0 if winner == a else 0.0 if winner == b else 0.5
            result.win += score == 1.0
            result.loss += score == 0.0
            result.tie += score == 0.5
            matches.append((a, b, score))
            points[a][0] += score
            points[b][0] += 1 - score
            points[a][1] += 1
            points[b][1] += 1
        pairs.append(result)
    ratings, ci = elo_over_orders(matches, models, orders, seed)
    win_rate = {m: (s / n if n else 0.0) for m, (s, n) in points.items()}
    percent: dict[str, float | None] = {}
    if reference is not None:
        if reference not in models:
            raise Nf4tuneError(f"--reference {reference!r} is not one of the models: {', '.join(models)}.")
        for m in models:
            if m == reference:
                continue
            p = next(p for p in pairs if {p.model_a, p.model_b} == {m, reference})
            mine, theirs = (p.win, p.loss) if p.model_a == m else (p.loss, p.win)
            denominator = theirs + p.tie / 2
            percent[m] = 100 * (mine + p.tie / 2) / denominator if denominator else None
        percent[reference] = 100.0
    return JudgeResult(models, pairs, ratings, ci, win_rate, matches, reference, percent)


def judge(paths: list[str], base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
          orders: int = 10000, reference: str | None = None, cache: str | None = None, seed: int = 0,
          parse_retries: int = 2, max_retries: int = 6, backoff: float = 1.0, progress: bool = True) -> JudgeResult:
    """Judge the answer files `paths` pairwise with the chat model `model` at `base_url`; see the module doc."""
    if orders < 1 or concurrency < 1:
        raise Nf4tuneError("--orders and --concurrency must be at least 1.")
    sets = [read_answers(p) for p in paths]
    check_answer_sets(sets)
    models = [s.model for s in sets]
    if reference is not None and reference not in models:
        raise Nf4tuneError(f"--reference {reference!r} is not one of the models: {', '.join(models)}.")
    client = JudgeClient(base_url, model, api_key, cache, max_retries=max_retries, backoff=backoff)
    games = play_all(sets, client, concurrency, parse_retries, progress)
    return summarize(models, games, orders, seed, reference)
