"""benchmarks/gpu_report.py: the report a GPU session runs first, known to work on CPU before a GPU sees it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_a_failing_section_is_recorded_and_the_report_goes_on(tmp_path):
    import argparse

    import gpu_report

    report = gpu_report.Report(tmp_path, argparse.Namespace(device="cpu", quick=True))
    assert report.section("broken", lambda: 1 / 0) is None
    assert report.section("fine", lambda: {"summary": "all good", "rows": [{"a": 1.5, "b": "x|y"}]}) is not None
    report.section("not here", lambda: "needs CUDA")
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    sections = data["sections"]
    assert sections["broken"]["status"] == "error" and "ZeroDivisionError" in sections["broken"]["error"]
    assert sections["fine"]["status"] == "ok" and sections["not here"]["status"] == "skipped"
    md = (tmp_path / "gpu_report.md").read_text()
    assert "## broken: error" in md and "## fine: ok" in md and "| 1.5 | x/y |" in md and "needs CUDA" in md


@pytest.mark.slow
def test_the_quick_report_runs_every_section_on_cpu(tmp_path):
    """The command BENCHMARKS.md gives, with --device cpu --quick: every section ok (paged AdamW skipped:
    CUDA only), the peers measured beside nf4tune, the decoder used."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--out", str(tmp_path),
                           "--device", "cpu", "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    sections = data["sections"]
    errors = {k: v.get("error") for k, v in sections.items() if v["status"] == "error"}
    assert errors == {}
    assert sections["paged AdamW under memory pressure"]["status"] == "skipped"
    from nf4tune import dispatch

    assert {p["op"] for p in sections["environment"]["paths"]} == set(dispatch.OPS)
    training = next(v for k, v in sections.items() if k.startswith("training"))
    measured = {(r["benchmark"].split(",")[0], r["side"]) for r in training["runs"] if r.get("tokens_per_s", 0) > 0}
    assert len(measured) == 4, training["runs"]  # a step and `nf4tune train`, each for nf4tune and the peer
    decoding = next(v for k, v in sections.items() if k.startswith("decoding"))
    rows = decoding["runs"]
    assert {(r["batch"], r["side"]) for r in rows if r.get("decode_tokens_per_s", 0) > 0} == {
        (b, s) for b in (1, 8) for s in ("nf4tune", "transformers+bnb")}
    assert all(r["decoder"] and 0 < r["roofline_pct"] for r in rows if r["side"] == "nf4tune")
    gpu_path = next(v for k, v in sections.items() if k.startswith("compiled layers"))
    losses = [r["first_loss"] for r in gpu_path["training_step"]]  # eager, compiled, offloaded: one loss
    assert len(losses) == 4 and max(losses) - min(losses) <= 1e-3 * abs(losses[0])
    decoders = gpu_path["static_decoder"]
    assert [(r["mode"], r["batch"]) for r in decoders] == [(m, b) for b in (1, 2) for m in ("eager", "compiled")]
    assert all(r["same_tokens_as_eager"] and r.get("same_tokens_token_at_a_time", True) for r in decoders)
    assert sum("same_tokens_token_at_a_time" in r for r in decoders) == 2
    md = (tmp_path / "gpu_report.md").read_text()
    assert all(f"## {name}: " in md for name in sections)
