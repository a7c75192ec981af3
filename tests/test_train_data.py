"""Training data: formats, response-only labels, bad rows, truncation, batching."""

import csv
import json
from pathlib import Path

import pytest

from nf4tune import Nf4tuneError
from nf4tune.checkpoint.tiny import char_tokenizer
from nf4tune.train.data import IGNORE_INDEX, batch_order, collate, load_examples
from nf4tune.train.formats import ALPACA_NO_INPUT

ROOT = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    t = char_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _trained_text(tok, ex):
    return tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX])


@pytest.mark.parametrize(
    "row, fmt, prompt, response",
    [
        ({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca", ALPACA_NO_INPUT.format(instruction="Say hi"), "hi"),
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion", "2+2=", "4"),
        ({"input": "Q?", "output": "A."}, "input_output", "Q?", "A."),
        ({"chosen": "Human: x Assistant: y", "rejected": "z"}, "hh_rlhf", "", "Human: x Assistant: y"),
        ({"text": "### Human: Hi### Assistant: Hello"}, "oasst1", "", "### Human: Hi### Assistant: Hello"),
        ({"text": "<human>: Hi\n<bot>: Hello"}, "chip2", "Hi", "Hello"),
        ({"text": "plain words"}, "text", "", "plain words"),
    ],
)
def test_formats_are_detected_and_only_the_response_is_trained(tmp_path, tok, row, fmt, prompt, response):
    examples, stats = load_examples(_write(tmp_path / "d.jsonl", [row]), "train", "auto", tok, 512, 256, False)
    assert stats.format == fmt
    ex = examples[0]
    assert tok.decode(ex.input_ids) == "<s>" + prompt + response + "</s>"
    assert _trained_text(tok, ex) == response + "</s>"
    with_source, _ = load_examples(str(tmp_path / "d.jsonl"), "train", "auto", tok, 512, 256, True)
    assert _trained_text(tok, with_source[0]) == "<s>" + prompt + response + "</s>"


def test_chat_messages_train_on_every_assistant_turn(tmp_path, tok):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}
    examples, stats = load_examples(_write(tmp_path / "c.jsonl", [row]), "train", "auto", tok, 512, 256, False)
    assert stats.format == "messages"
    assert tok.decode(examples[0].input_ids) == tok.apply_chat_template(row["messages"], tokenize=False)
    assert _trained_text(tok, examples[0]) == "hello</s>\nciao</s>\n"


def test_csv_and_json_files(tmp_path, tok):
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    examples, _ = load_examples(str(tmp_path / "d.csv"), "train", "auto", tok, 64, 64, False)
    assert [_trained_text(tok, e) for e in examples] == ["b</s>", "d</s>"]
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "a", "completion": "b"}]))
    examples, _ = load_examples(str(tmp_path / "d.json"), "train", "auto", tok, 64, 64, False)
    assert len(examples) == 1


def test_bad_rows_name_file_row_and_field_or_are_skipped(tmp_path, tok):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "a", "completion": 3},
            {"prompt": "a", "completion": "  "}, {"prompt": "x", "completion": "y"}]
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(Nf4tuneError, match=r"bad.jsonl, row 2: field 'completion' is missing"):
        load_examples(path, "train", "prompt_completion", tok, 64, 64, False)
    examples, stats = load_examples(path, "train", "prompt_completion", tok, 64, 64, False, on_bad_row="skip")
    assert len(examples) == 2 and stats.skipped == 3 and stats.rows == 5
    assert "must be text" in " ".join(stats.skip_reasons) and "is empty" in " ".join(stats.skip_reasons)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    with pytest.raises(Nf4tuneError, match="broken.jsonl, row 2 is not valid JSON"):
        load_examples(str(tmp_path / "broken.jsonl"), "train", "auto", tok, 64, 64, False)
    # As a new user tries it: 41 rows, one missing its output, and a last line of broken JSON.
    rows = [{"input": f"q{i}", "output": f"a{i}"} for i in range(40)]
    del rows[7]["output"]
    lines = [json.dumps(r) for r in rows] + ['{"input": "q40", "output": ']
    (tmp_path / "41.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(Nf4tuneError, match=r"41.jsonl, row 8: field 'output' is missing"):
        load_examples(str(tmp_path / "41.jsonl"), "train", "auto", tok, 64, 64, False)
    examples, stats = load_examples(str(tmp_path / "41.jsonl"), "train", "auto", tok, 64, 64, False, on_bad_row="skip")
    assert len(examples) == 39 and stats.rows == 41 and stats.skipped == 2
    assert stats.skip_reasons == ["row 8: field 'output' is missing", "row 41 is not valid JSON (Expecting value at column 1)"]
    with pytest.raises(Nf4tuneError, match="gives no usable examples"):
        load_examples(_write(tmp_path / "none.jsonl", [{"prompt": "a"}]), "train", "prompt_completion", tok, 64, 64,
                      False, on_bad_row="skip")
    with pytest.raises(Nf4tuneError, match="does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"), "train", "auto", tok, 64, 64, False)


def test_truncation_is_counted_and_keeps_eos(tmp_path, tok):
    path = _write(tmp_path / "long.jsonl", [{"prompt": "p" * 50, "completion": "c" * 50}, {"prompt": "a", "completion": "b"}])
    examples, stats = load_examples(path, "train", "auto", tok, 10, 8, False)
    assert stats.truncated == 1
    long = examples[0]
    assert len(long.input_ids) == 1 + 10 + 8 and long.input_ids[-1] == tok.eos_token_id
    assert sum(label != IGNORE_INDEX for label in long.labels) == 8


def test_batches_are_deterministic_and_group_by_length():
    lengths = [5, 50, 7, 49, 6, 48, 8, 47] * 20
    a = batch_order(lengths, 4, seed=1, epoch=0, group_by_length=True)
    assert a == batch_order(lengths, 4, seed=1, epoch=0, group_by_length=True)
    assert a != batch_order(lengths, 4, seed=1, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    spread = lambda batches: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)  # noqa: E731
    assert spread(a) < spread(batch_order(lengths, 4, seed=1, epoch=0, group_by_length=False)) / 4
    assert max(lengths[i] for i in a[0]) == max(lengths)  # longest batch first


def test_collate_pads_right_and_masks_labels(tok):
    from nf4tune.train.data import Tokenized

    batch = collate([Tokenized([1, 5, 6], [-100, 5, 6]), Tokenized([1, 7], [-100, 7])], pad_id=3)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_parquet_files(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow reads Parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"instruction": "Add", "input": "1 2", "output": "3"}]), tmp_path / "d.parquet")
    examples, stats = load_examples(str(tmp_path / "d.parquet"), "train", "auto", tok, 256, 16, False)
    assert stats.format == "alpaca" and _trained_text(tok, examples[0]) == "3</s>"


def _examples(lengths):
    from nf4tune.train.data import Tokenized

    return [Tokenized(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1))) for n in lengths]


def test_packing_keeps_each_batch_of_examples_and_says_so():
    from nf4tune.train.data import pack, plan_packing

    # 10 examples of 5 tokens, batches of 4 examples, rows of 10 tokens: batches of 4, 4, 2 examples
    # pack into 2, 2 and 1 rows.
    plan = plan_packing(_examples([5] * 10), batch_size=4, max_len=10, seed=0, group_by_length=False)
    assert (plan.rows, plan.batches, plan.fewest_rows, plan.most_rows) == (5, 3, 1, 2)
    assert plan.describe() == ("10 examples packed into 5 rows of at most 10 tokens per epoch: each batch of 4 examples "
                               "(per_device_train_batch_size counts examples) packs into 1-2 rows; 3 batches per "
                               "epoch, as without packing")
    examples = _examples([3, 7, 2, 9, 4])
    rows = pack(examples, 10)  # first fit in the order given: 3+7 | 2+4 | 9
    assert [len(r.input_ids) for r in rows] == [10, 6, 9]
    assert rows[0].position_ids == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]  # positions restart at each example
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in examples for t in e.input_ids)


def test_packed_training_takes_the_steps_and_losses_of_unpacked_training(tmp_path, caplog):
    """per_device_train_batch_size counts examples under packing: 60 examples in batches of 16 are 4 steps an
    epoch with packing as without, and each step's loss is the unpacked step's (no dropout, float32)."""
    from nf4tune.train.config import recipe_from_dict
    from nf4tune.train.loop import train

    def run(packing):
        recipe = recipe_from_dict({
            "model": {"name_or_path": "tiny-random:llama-demo", "compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"path": str(ROOT / "recipes" / "data" / "parity_train.jsonl"), "max_samples": 60, "source_max_len": 120,
                     "target_max_len": 8, "packing": packing},
            "eval": {"size": 0, "exact_match": False},
            "training": {"output_dir": str(tmp_path / f"packed-{packing}"), "num_train_epochs": 1,
                         "per_device_train_batch_size": 16, "learning_rate": 1e-3, "logging_steps": 1,
                         "save_steps": 100, "seed": 0},
        })
        with caplog.at_level("INFO", logger="nf4tune"):
            result = train(recipe, progress=False)
        losses = [json.loads(line)["loss"] for line in (tmp_path / f"packed-{packing}" / "metrics.jsonl").open()]
        return result, losses

    plain, plain_losses = run(False)
    caplog.clear()
    packed, packed_losses = run(True)
    assert plain.steps == packed.steps == 4 and len(packed_losses) == 4
    assert packed_losses == pytest.approx(plain_losses, rel=1e-4)
    assert packed.tokens == plain.tokens  # the same examples, without the padding
    line = next(r.getMessage() for r in caplog.records if "packed into" in r.getMessage())
    assert line.startswith("nf4tune: 60 examples packed into ") and " rows of at most 130 tokens per epoch" in line
    assert "each batch of 16 examples" in line and "4 batches per epoch" in line
    rows = int(line.split("packed into ")[1].split()[0])
    assert packed.tokens / 130 <= rows < 60 / 2  # several examples a row, and no fewer rows than the tokens need
    assert any("60 training examples" in r.getMessage() for r in caplog.records)
