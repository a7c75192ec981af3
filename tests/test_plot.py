"""loss.png: the loss panel, and the recipe's benchmark scores drawn in panels beside it on the same steps."""

from __future__ import annotations

import string
import struct

from nf4tune.train.plot import _FONT, figure_panels, plot_losses

LOSS_ONLY = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 7)] + [
    {"step": 3, "eval_loss": 2.9, "eval_perplexity": 18.2}, {"step": 6, "eval_loss": 2.6, "eval_perplexity": 13.5}]
WITH_BENCHMARKS = LOSS_ONLY + [
    {"step": 0, "mmlu_accuracy": 0.25, "mmlu_accuracy_subject_mean": 0.24, "wiki_perplexity": 30.0},
    {"step": 3, "mmlu_accuracy": 0.3, "mmlu_accuracy_subject_mean": 0.28, "wiki_perplexity": 25.0},
    {"step": 6, "mmlu_accuracy": 0.35, "mmlu_accuracy_subject_mean": 0.33, "wiki_perplexity": 21.0}]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_loss_only_is_one_panel(tmp_path):
    (panel,) = figure_panels(LOSS_ONLY)
    assert panel.ylabel == "loss"
    assert [label for label, _ in panel.series] == ["train loss", "eval loss"]  # eval_perplexity is not a benchmark
    assert dict(panel.series)["eval loss"] == [(3, 2.9), (6, 2.6)]
    single = _png_size(plot_losses(LOSS_ONLY, tmp_path / "loss.png"))
    assert single[1] > 0
    (train_only,) = figure_panels(LOSS_ONLY[:6])
    assert [label for label, _ in train_only.series] == ["train loss"]


def test_benchmark_scores_get_panels_beside_the_loss(tmp_path):
    loss, accuracy, perplexity = figure_panels(WITH_BENCHMARKS)
    assert loss == figure_panels(LOSS_ONLY)[0]
    assert accuracy.ylabel == "accuracy" and perplexity.ylabel == "perplexity"
    assert dict(accuracy.series) == {"mmlu accuracy": [(0, 0.25), (3, 0.3), (6, 0.35)]}  # not the subject mean
    assert dict(perplexity.series) == {"wiki perplexity": [(0, 30.0), (3, 25.0), (6, 21.0)]}
    one = _png_size(plot_losses(LOSS_ONLY, tmp_path / "one.png"))
    three = _png_size(plot_losses(WITH_BENCHMARKS, tmp_path / "three.png"))
    assert three[0] == one[0] and three[1] > one[1]  # the panels are drawn below the loss
    only_accuracy = [{k: v for k, v in r.items() if "perplexity" not in k} for r in WITH_BENCHMARKS]
    assert [p.ylabel for p in figure_panels(only_accuracy)] == ["loss", "accuracy"]


def test_labels_can_be_drawn():
    """Every lower-case letter, digit and '_' of a benchmark name has a glyph in the fallback font."""
    assert set(string.ascii_lowercase + string.digits + "_ .-") <= set(_FONT)
