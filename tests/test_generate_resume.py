"""`nf4tune generate` never leaves a half-written OUT: Ctrl-C keeps the finished lines in OUT.partial,
says how many, and --resume completes the file as an uninterrupted run would have (issue 16, item 5)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPTS = 400
ARGS = ["--max-new-tokens", "32", "--temperature", "0", "--batch-size", "1", "--device", "cpu"]


def _cli(*argv, **kw):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # SIGINT at its default, so Python in the child turns it into KeyboardInterrupt even when the suite runs
    # as a background job (a shell starts those with SIGINT ignored, and children inherit that)
    return subprocess.Popen([sys.executable, "-m", "nf4tune.cli.main", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


@pytest.mark.slow
def test_interrupted_generate_keeps_out_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    # enough prompts that the run is still going when the test sees its first lines: the demo model answers
    # in a word, about 80 prompts a second here
    prompts.write_text("".join(json.dumps({"prompt": f"Is {n} even or odd? ", "id": n}) + "\n" for n in range(PROMPTS)))
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier result\n")
    partial = tmp_path / "out.jsonl.partial"
    old_umask = os.umask(0o022)
    try:
        # OUT holds an earlier result: replacing it is asked for (--overwrite), and happens only at the end
        run = _cli("generate", "tiny-random:llama-demo", "--prompts", str(prompts), "--out", str(out), *ARGS,
                   "--overwrite")
        deadline = time.time() + 120
        while time.time() < deadline and run.poll() is None:
            if partial.is_file() and len(partial.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert run.poll() is None, run.communicate()[1][-2000:]
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        os.umask(old_umask)
    assert run.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    kept = partial.read_text().splitlines()
    assert 3 <= len(kept) < PROMPTS
    assert f"{len(kept)} of {PROMPTS} completions are complete in {partial}; {out} is unchanged; run the same command " \
           "with --resume to continue" in err
    assert out.read_text() == "an earlier result\n"
    assert not (tmp_path / "out.jsonl.lock").exists()  # the interrupted run let go of OUT
    assert [json.loads(line)["id"] for line in kept] == list(range(len(kept)))

    # without --overwrite, the earlier OUT is not replaced (and the finished lines stay)
    refused = _cli("generate", "tiny-random:llama-demo", "--prompts", str(prompts), "--out", str(out), *ARGS, "--resume")
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and f"{out} already exists; pass --overwrite" in err
    assert partial.read_text().splitlines() == kept
    resumed = _cli("generate", "tiny-random:llama-demo", "--prompts", str(prompts), "--out", str(out), *ARGS, "--resume",
                   "--overwrite")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert not partial.exists()
    lines = out.read_text().splitlines()
    assert lines[:len(kept)] == kept
    assert stat.S_IMODE(out.stat().st_mode) == 0o644

    # the same lines as a run never interrupted (greedy, one prompt a batch)
    straight = tmp_path / "straight.jsonl"
    fresh = _cli("generate", "tiny-random:llama-demo", "--prompts", str(prompts), "--out", str(straight), *ARGS)
    _, err = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, err[-2000:]
    assert straight.read_text().splitlines() == lines
