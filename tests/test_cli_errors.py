"""Bad command lines get one sentence and exit status 2, before any model loads (issue 16, items 3 and 4).

Each row of CASES is (argv, the sentence expected on stderr). The model folders here are not real
checkpoints: had a command started loading one, it would fail differently, so each passing row also
shows the check ran before loading. Everything runs in-process and takes well under a second a row.
"""

import json
import socket
import subprocess
import sys

import pytest

from nf4tune.cli.main import main

RECIPE = "recipes/demo.yaml"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fake model folder (tokenizer config without a chat template), prompts, a binary file."""
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("an earlier result")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "done.jsonl").write_text('{"prompt": "hi", "completion": "hello"}\n')
    (tmp_path / "cut.jsonl.partial").write_text('{"prompt": "hi", "completion": "hello"}\n')
    return tmp_path


def _checkpoint_holding(t, name: str, content) -> str:
    """A run folder `t/name` whose checkpoint-2 holds `content` as its trainer_state.pt."""
    import torch

    checkpoint = t / name / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    torch.save(content, checkpoint / "trainer_state.pt")
    return str(t / name)


class _RunsCode:
    def __reduce__(self):
        return exec, ("raise SystemExit('a checkpoint ran code')",)


def _gen(t, *extra):
    return ["generate", str(t / "model"), "--prompts", str(t / "prompts.jsonl"), "--out", str(t / "o.jsonl"), *extra]


CASES = [
    # (3) every count/size option checked: zero would hang or make nothing
    (lambda t: _gen(t, "--batch-size", "0"), "argument --batch-size: must be 1 or more, got 0"),
    (lambda t: _gen(t, "--max-new-tokens", "0"), "argument --max-new-tokens: must be 1 or more, got 0"),
    (lambda t: _gen(t, "--top-k", "-1"), "argument --top-k: must be 0 or more, got -1"),
    (lambda t: ["serve", str(t / "model"), "--max-batch", "0"], "argument --max-batch: must be 1 or more, got 0"),
    (lambda t: ["serve", str(t / "model"), "--max-queue", "0"], "argument --max-queue: must be 1 or more, got 0"),
    (lambda t: ["serve", str(t / "model"), "--port", "70000"], "argument --port: must be from 0 to 65535, got 70000"),
    (lambda t: ["estimate", str(t / "model"), "--seq-len", "0"], "argument --seq-len: must be 1 or more, got 0"),
    (lambda t: ["estimate", str(t / "model"), "--batch", "0"], "argument --batch: must be 1 or more, got 0"),
    (lambda t: ["estimate", str(t / "model"), "--r", "0"], "argument --r: must be 1 or more, got 0"),
    (lambda t: ["estimate", str(t / "model"), "--gpus", "0"], "argument --gpus: must be 1 or more, got 0"),
    (lambda t: ["quantize", str(t / "model"), str(t / "q"), "--blocksize", "48"], "argument --blocksize: invalid choice"),
    (lambda t: ["chat", str(t / "model"), "--max-new-tokens", "x"], "argument --max-new-tokens: expected a whole number"),
    # (4) values in range, said in words
    (lambda t: ["chat", str(t / "model"), "--temperature", "-1"], "argument --temperature: must be 0 (greedy) or more, got -1"),
    (lambda t: ["chat", str(t / "model"), "--temperature", "nan"], "argument --temperature: must be 0 (greedy) or more"),
    (lambda t: ["chat", str(t / "model"), "--top-p", "0"], "argument --top-p: must be more than 0 and at most 1, got 0"),
    (lambda t: ["chat", str(t / "model"), "--top-p", "1.5"], "argument --top-p: must be more than 0 and at most 1"),
    (lambda t: ["chat", str(t / "model"), "--repetition-penalty", "0"], "argument --repetition-penalty: must be more than 0"),
    # (4) paths checked before loading
    (lambda t: ["generate", str(t / "model"), "--prompts", str(t / "prompts.jsonl"), "--out", "/nonexistent/o.jsonl"],
     "error: --out /nonexistent/o.jsonl: the folder /nonexistent does not exist; create it first."),
    (lambda t: ["generate", str(t / "model"), "--prompts", str(t / "prompts.jsonl"), "--out", str(t / "outdir")],
     "is a folder; give a file name"),
    (lambda t: ["generate", str(t / "model"), "--prompts", str(t / "binary.jsonl"), "--out", str(t / "o.jsonl")],
     "binary.jsonl is a binary file, not UTF-8 text"),
    (lambda t: ["generate", str(t / "model"), "--prompts", str(t / "latin1.jsonl"), "--out", str(t / "o.jsonl")],
     "latin1.jsonl is not UTF-8 text (byte 15 cannot be decoded)"),
    (lambda t: ["generate", str(t / "model"), "--prompts", str(t / "outdir"), "--out", str(t / "o.jsonl")],
     "--prompts " + "{t}/outdir is a folder; give a file."),
    (lambda t: ["generate", str(t / "model"), "--prompts", str(t / "none.jsonl"), "--out", str(t / "o.jsonl")],
     "none.jsonl does not exist."),
    (lambda t: ["chat", str(t / "missing")], "the model {t}/missing is not a folder (it does not exist)"),
    (lambda t: ["chat", str(t / "a_file")], "the model {t}/a_file is not a folder; give the folder of a Hugging Face"),
    (lambda t: ["chat", "tiny-random:nope"],
     "unknown built-in model 'tiny-random:nope'; built-in models: tiny-random:llama-demo."),
    (lambda t: ["chat", str(t / "model"), "--adapter", str(t / "outdir")],
     "has no adapter_config.json; is it a LoRA adapter folder?"),
    (lambda t: ["merge", str(t / "missing"), str(t / "outdir"), str(t / "m")], "the base model {t}/missing is not a folder"),
    (lambda t: ["quantize", str(t / "a_file"), str(t / "q")], "{t}/a_file is not a folder"),
    # (4) the chat template asked for but absent, before loading
    (lambda t: ["chat", str(t / "model"), "--format", "template"],
     "--format template: {t}/model has no chat template; use --format guanaco, alpaca, chip2 or raw."),
    # (4) a recipe's model path that is no folder says so (not "has no tokenizer files")
    (lambda t: ["train", RECIPE, f"model.name_or_path={t}/missing", f"training.output_dir={t}/run"],
     "model.name_or_path {t}/missing is not a folder (it does not exist)"),
    # a data file that is not UTF-8, an output folder that cannot be written, a learning rate that is no number
    (lambda t: ["train", RECIPE, f"data.path={t}/latin1.jsonl", f"training.output_dir={t}/run"],
     "latin1.jsonl is not UTF-8 text (line 1, byte 15 cannot be decoded); save it as UTF-8"),
    (lambda t: ["train", RECIPE, f"training.output_dir={t}/a_file/run"],
     "training.output_dir {t}/a_file/run cannot be written (Not a directory); choose a folder you can write to."),
    (lambda t: ["train", RECIPE, "training.learning_rate=nan"], "training.learning_rate must be a number, got nan."),
    # a checkpoint's training state: never unpickled into code, and of the shape nf4tune writes
    (lambda t: ["train", RECIPE, f"training.output_dir={_checkpoint_holding(t, 'evil', {'x': _RunsCode()})}", "--resume"],
     "{t}/evil/checkpoint-2/trainer_state.pt holds Python objects that only running code could load"),
    (lambda t: ["train", RECIPE, f"training.output_dir={_checkpoint_holding(t, 'odd', [1, 2])}", "--resume"],
     "{t}/odd/checkpoint-2/trainer_state.pt is not a training state nf4tune wrote (it holds list, not a dict)"),
    # no command writes onto its input, or over an existing output without --overwrite
    (lambda t: ["export", str(t / "m.gguf"), str(t / "m.gguf")],
     "{t}/m.gguf is the base model itself ({t}/m.gguf); writing there would destroy what is being read"),
    (lambda t: ["export", str(t / "model"), str(t / "m.gguf")],
     "{t}/m.gguf already exists; pass --overwrite to replace that file (it is replaced only once the new one is complete)"),
    (lambda t: ["merge", str(t / "model"), str(t / "adapter"), str(t / "model"), "--overwrite"],
     "{t}/model is the base model itself"),
    (lambda t: ["merge", str(t / "model"), str(t / "adapter"), str(t / "full")],
     "{t}/full already exists; pass --overwrite to replace that folder"),
    (lambda t: ["quantize", str(t / "model"), str(t / "model")], "{t}/model is the model to quantize itself"),
    (lambda t: ["quantize", str(t / "model"), str(t)], "{t} holds the model to quantize ({t}/model)"),
    (lambda t: _gen(t)[:4] + ["--out", str(t / "prompts.jsonl")], "{t}/prompts.jsonl is the --prompts file itself"),
    (lambda t: _gen(t)[:4] + ["--out", str(t / "done.jsonl")], "{t}/done.jsonl already exists; pass --overwrite"),
    (lambda t: _gen(t)[:4] + ["--out", str(t / "cut.jsonl")],
     "{t}/cut.jsonl.partial holds the finished lines of an interrupted run; continue them with --resume, or pass "
     "--overwrite to start over."),
]


@pytest.mark.parametrize("make_argv, expected", CASES, ids=[" ".join(c[1].split()[:4]) for c in CASES])
def test_bad_input_gets_one_sentence(env, capsys, make_argv, expected):
    code = main(make_argv(env))
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected.format(t=env) in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_port_in_use_is_refused_before_loading(env, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(env / "model"), "--port", str(port)]) == 2
    assert f"error: port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err


def test_chat_template_found_in_tokenizer_files(env):
    from nf4tune.cli.inference import _has_chat_template

    assert not _has_chat_template(env / "model")
    (env / "model" / "chat_template.jinja").write_text("{{ messages }}")
    assert _has_chat_template(env / "model")


def test_help_does_not_import_torch():
    code = ("import sys; from nf4tune.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "main(['generate', '--help']); main(['train', '--help'])\n"
            "assert 'torch' not in sys.modules, 'torch imported at parse time'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)

