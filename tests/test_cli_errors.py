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
    return tmp_path


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

