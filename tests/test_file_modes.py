"""Everything nf4tune writes gets the permissions a plain open()/mkdir gives under the umask (issue 16, item 2),
and building a tiny model leaves the caller's random state alone (item 6)."""

import os
import stat

import pytest
import torch

import nf4tune
from nf4tune.atomic import atomic_write_text, temp_dir
from nf4tune.checkpoint.quantize import quantize_checkpoint
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.models.merge import merge_adapter
from nf4tune.train import state


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root):
    """{relative path: permission bits} of root and everything under it."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, root)] = stat.S_IMODE(os.stat(full).st_mode)
    return found


def _assert_plain_modes(root):
    wrong = {p: oct(m) for p, m in _modes(root).items()
             if m != (0o755 if os.path.isdir(os.path.join(root, p)) else 0o644)}
    assert not wrong, f"not the umask-022 modes (755 folders, 644 files): {wrong}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny")


def test_helpers_follow_the_umask(tmp_path, umask022):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(temp_dir(tmp_path, ".t.")).st_mode) == 0o755
    os.umask(0o077)
    atomic_write_text(tmp_path / "b.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o600


def test_adapter_checkpoint_quantize_merge_modes(tmp_path, tiny, umask022):
    model, tokenizer = nf4tune.load_model(tiny, device="cpu", lora=nf4tune.LoraConfig(r=2), progress=False)
    nf4tune.save_adapter(model, tmp_path / "adapter")
    _assert_plain_modes(tmp_path / "adapter")

    (tmp_path / "run").mkdir()
    ckpt = state.save_checkpoint(tmp_path / "run", 3, model, tokenizer, {"step": 3})
    _assert_plain_modes(ckpt)

    quantize_checkpoint(tiny, tmp_path / "q", progress=False)
    _assert_plain_modes(tmp_path / "q")

    merge_adapter(tiny, tmp_path / "adapter", tmp_path / "merged", progress=False)
    _assert_plain_modes(tmp_path / "merged")


def test_merge_into_an_existing_empty_folder_keeps_its_mode(tmp_path, tiny, umask022):
    model, _ = nf4tune.load_model(tiny, device="cpu", lora=nf4tune.LoraConfig(r=2), progress=False)
    nf4tune.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    os.chmod(tmp_path / "out", 0o750)
    merge_adapter(tiny, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o750
    assert (tmp_path / "out" / "config.json").is_file()


def test_building_a_tiny_model_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_checkpoint(tmp_path / "t")
    assert torch.equal(torch.rand(3), expected)
    # and the model itself is still a function of its own seed
    build_tiny_checkpoint(tmp_path / "u")
    assert (tmp_path / "t" / "model.safetensors.index.json").read_text() == \
        (tmp_path / "u" / "model.safetensors.index.json").read_text()
    from safetensors.torch import load_file
    a = {k: v for f in sorted((tmp_path / "t").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "u").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert all(torch.equal(a[k], b[k]) for k in a)
