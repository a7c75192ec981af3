"""`nf4tune judge` against a local fake judge: rankings, position bias, retries, the cache, and Elo."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nf4tune.cli.main import main
from nf4tune.evaluate.elo import elo, elo_over_orders
from nf4tune.evaluate.judge import PROMPTS, judge, parse_verdict

_ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


class FakeJudge:
    """An OpenAI-style /v1/chat/completions endpoint whose verdict comes from `policy(answer_a, answer_b)`.
    `fail_first` requests per distinct prompt are answered 429/500 first."""

    def __init__(self, policy, fail_first: int = 0):
        self.policy, self.fail_first = policy, fail_first
        self.requests, self.bodies, self.failures = 0, [], {}
        judge_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    judge_.requests += 1
                    judge_.bodies.append(body)
                    text = body["messages"][-1]["content"]
                    seen = judge_.failures.get(text, 0)
                    judge_.failures[text] = seen + 1
                if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != "Bearer sk-test":
                    self.send_response(404)
                    self.end_headers()
                    return
                if seen < judge_.fail_first:
                    self.send_response(429 if seen % 2 == 0 else 500)
                    self.end_headers()
                    self.wfile.write(b'{"error": "busy"}')
                    return
                answers = dict(_ANSWER.findall(text))
                reply = judge_.policy(answers["A"], answers["B"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _prefer_longer(a: str, b: str) -> str:
    return "A is more complete. [[A]]" if len(a) > len(b) else "B is more complete. [[B]]" if len(b) > len(a) else "[[C]]"


@pytest.fixture
def answer_files(tmp_path):
    """Three models answering 6 prompts: `long` always longest, `short` always shortest."""
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[:6]]
    paths = []
    for name, words in (("short", 2), ("long", 12), ("medium", 6)):
        path = tmp_path / f"{name}.jsonl"
        with path.open("w") as f:
            for i, p in enumerate(prompts):
                f.write(json.dumps({"prompt": p, "completion": " ".join(["word"] * words + [str(i)])}) + "\n")
        paths.append(str(path))
    return paths


def test_shipped_prompts():
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    assert len(rows) == 40 and all(r["prompt"].strip() for r in rows)
    assert {r["category"] for r in rows} == {"writing", "reasoning", "coding", "math", "roleplay"}


def test_judge_preferring_length_ranks_models_by_it(answer_files, tmp_path):
    fake = FakeJudge(_prefer_longer, fail_first=2)  # every request first meets a 429 and a 500
    try:
        result = judge(answer_files, fake.url, "fake", api_key="sk-test", concurrency=4, orders=200,
                       reference="medium", cache=str(tmp_path / "cache.jsonl"), backoff=0.01)
        assert sorted(result.elo, key=result.elo.get) == ["short", "medium", "long"]
        assert result.win_rate == {"short": 0.0, "medium": 0.5, "long": 1.0}
        assert all(p.tie == 0 and p.inconsistent == 0 and p.win + p.loss == 6 for p in result.pairs)
        long_vs = next(p for p in result.pairs if {p.model_a, p.model_b} == {"long", "short"})
        assert (long_vs.win if long_vs.model_a == "long" else long_vs.loss) == 6
        assert result.percent_of_reference["short"] == 0.0 and result.percent_of_reference["long"] is None
        games = 3 * 6 * 2
        assert fake.requests == games * 3
        assert all(b["temperature"] == 0 and b["model"] == "fake" for b in fake.bodies)
        lo, hi = result.elo_ci["long"]
        assert lo <= result.elo["long"] <= hi and lo > 1000

        again = judge(answer_files, fake.url, "fake", api_key="sk-test", orders=200, reference="medium",
                      cache=str(tmp_path / "cache.jsonl"))
        assert fake.requests == games * 3  # everything came from the cache
        assert again.elo == result.elo
    finally:
        fake.close()


def test_judge_favouring_first_position_gives_ties_and_equal_ratings(answer_files):
    fake = FakeJudge(lambda a, b: "The first one. [[A]]")
    try:
        result = judge(answer_files, fake.url, "fake", api_key="sk-test", orders=100)
    finally:
        fake.close()
    assert all(p.tie == 6 and p.inconsistent == 6 and p.win == p.loss == 0 for p in result.pairs)
    assert result.inconsistent == 18
    assert set(result.elo.values()) == {1000.0}
    assert set(result.win_rate.values()) == {0.5}


def test_unparseable_verdicts_are_retried_counted_and_left_out(answer_files):
    fake = FakeJudge(lambda a, b: "Hard to say." if "0" in a + b else _prefer_longer(a, b))  # prompt 0 never parses
    try:
        result = judge(answer_files[:2], fake.url, "fake", api_key="sk-test", orders=50, parse_retries=2)
    finally:
        fake.close()
    (pair,) = result.pairs
    assert pair.unparsed == 1 and pair.win + pair.loss + pair.tie == 5
    assert fake.requests == 2 * 3 + 10  # prompt 0: both orders asked three times; the others once


def test_elo_matches_the_formula_on_a_fixed_match_list():
    matches = [("a", "b", 1.0), ("b", "c", 0.5), ("a", "c", 0.0), ("c", "b", 1.0), ("a", "b", 1.0), ("b", "a", 0.5)]
    r = {"a": 1000.0, "b": 1000.0, "c": 1000.0}
    for x, y, s in matches:  # written out: expected score, then K (actual - expected) to each side
        ex = 1 / (1 + 10 ** ((r[y] - r[x]) / 400))
        ey = 1 / (1 + 10 ** ((r[x] - r[y]) / 400))
        r[x], r[y] = r[x] + 32 * (s - ex), r[y] + 32 * ((1 - s) - ey)
    assert elo(matches, ["a", "b", "c"]) == pytest.approx(r, abs=1e-9)
    # One order is the list itself: the mean over orders of a one-match list is that match's result.
    mean, ci = elo_over_orders(matches[:1], ["a", "b", "c"], orders=5)
    assert mean == pytest.approx({"a": 1016.0, "b": 984.0, "c": 1000.0})
    assert ci["a"] == pytest.approx((1016.0, 1016.0))
    # Over many orders, the mean equals the average of `elo` over those same permutations.
    import torch

    mean, _ = elo_over_orders(matches, ["a", "b", "c"], orders=7, seed=3)
    g = torch.Generator().manual_seed(3)
    perms = torch.argsort(torch.rand(7, len(matches), generator=g), dim=1)
    direct = [elo([matches[int(j)] for j in p], ["a", "b", "c"]) for p in perms]
    assert mean == pytest.approx({m: sum(d[m] for d in direct) / 7 for m in "abc"}, abs=1e-9)


def test_parse_verdict():
    assert parse_verdict("Both are fine, but [[A]] is my pick... final: [[B]]") == "B"
    assert parse_verdict("tie [[C]]") == "C"
    assert parse_verdict("A is better") is None


def test_cli_json_and_errors(answer_files, capsys, tmp_path):
    fake = FakeJudge(_prefer_longer)
    try:
        args = ["judge", *answer_files, "--judge-base-url", fake.url, "--judge-model", "fake", "--judge-api-key", "sk-test",
                "--orders", "50"]
        assert main([*args, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert set(out) >= {"elo", "elo_ci", "win_rate", "pairs", "inconsistent"}
        assert max(out["elo"], key=out["elo"].get) == "long"
        assert main([*args, "--reference", "short"]) == 0
        table = capsys.readouterr().out
        assert "% of short" in table and table.index("long") < table.index("medium") < table.rindex("short")
    finally:
        fake.close()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["judge", answer_files[0], str(bad), "--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]) == 2
    assert "bad.jsonl, line 1" in capsys.readouterr().err
    assert main(["judge", answer_files[0], "--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]) == 2
    assert "at least two" in capsys.readouterr().err
