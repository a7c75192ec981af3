"""`nf4tune estimate` for long sequences: memory linear in the sequence (no sequence x sequence term), and
`--max-seq-len`, the longest sequence that fits a budget, consistent with the estimate itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nf4tune.cli.main import main
from nf4tune.plan.estimate import GIB, MAX_SEQ_STEP, estimate, max_seq_len, model_sizes, needed_bytes

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama7b")
    (folder / "config.json").write_text(json.dumps(LLAMA_7B))
    return str(folder)


@pytest.fixture(scope="module")
def sizes(llama):
    return model_sizes(llama)  # read once for the many estimates below


def test_activations_grow_linearly_with_the_sequence(sizes):
    act = {s: estimate(sizes, seq_len=s).activations for s in (16384, 32768, 65536)}
    assert act[65536] - act[32768] == pytest.approx(2 * (act[32768] - act[16384]))  # no square term
    # as many tokens in two rows: the same, but for the attention's score blocks (per row, where chunked attention runs)
    rows = estimate(sizes, seq_len=32768, batch=2).activations - estimate(sizes, seq_len=65536).activations
    assert rows == sizes.attention_blocks(2, 32768) - sizes.attention_blocks(1, 65536)


@pytest.mark.parametrize("gb,plan", [(24, {}), (24, {"batch": 2}), (48, {"r": 16}), (80, {"checkpointing": False}),
                                     (16, {"device": "cpu", "optim": "adamw_torch"})])
def test_the_answer_fits_and_one_step_more_does_not(sizes, gb, plan):
    seq, est = max_seq_len(sizes, gb * GIB, **plan)
    assert seq > 0 and seq % MAX_SEQ_STEP == 0 and est.activations == estimate(sizes, seq_len=seq, **plan).activations
    assert needed_bytes(estimate(sizes, seq_len=seq, **plan)) <= gb * GIB
    assert needed_bytes(estimate(sizes, seq_len=seq + MAX_SEQ_STEP, **plan)) > gb * GIB


def test_more_memory_never_gives_a_shorter_answer(sizes):
    answers = [max_seq_len(sizes, gb * GIB)[0] for gb in (8, 12, 16, 24, 40, 80)]
    assert answers == sorted(answers) and answers[0] < answers[-1]
    assert max_seq_len(sizes, 24 * GIB, batch=2)[0] <= answers[3]
    assert max_seq_len(sizes, 1 * GIB) == (0, None)  # the 4-bit weights alone need more


def test_the_command_answers_the_longest_sequence(llama, capsys):
    assert main(["estimate", "--max-seq-len", "--gpu-gb", "24", llama, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_seq_len"] == max_seq_len(llama, 24 * GIB)[0] and data["estimate"]["total_without_paged_states"] <= 24 * GIB
    assert main(["estimate", "--max-seq-len", "--gpu-gb", "24", llama]) == 0
    out = capsys.readouterr().out
    assert f"longest sequence that fits 24 GB per GPU: {data['max_seq_len']} tokens" in out
    assert "max_position_embeddings" in out  # 4096 positions: a longer answer says so
    assert main(["estimate", "--max-seq-len", "--gpu-gb", "1", llama]) == 0
    assert "not even 256 tokens" in capsys.readouterr().out


@pytest.mark.slow
def test_the_estimate_is_within_15_percent_of_a_measured_cpu_step():
    """benchmarks/estimate_accuracy.py at 4096 tokens: a small Llama's training step on CPU, its peak measured in a
    subprocess (BENCHMARKS.md has 32768), with glibc's mmap threshold fixed so that freed tensors' pages leave the
    resident set (by default glibc keeps them in its heap: the resident set is then up to twice the tensors)."""
    script = Path(__file__).parents[1] / "benchmarks" / "estimate_accuracy.py"
    out = subprocess.run([sys.executable, str(script), "--seq", "4096", "--mmap-threshold", "65536", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ratio"] == pytest.approx(1, abs=0.15), result
