"""Packages whose public names load on first use, so that importing them (the command line does, to
parse its arguments) does not import torch, which takes seconds."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_names(package: str, names: dict[str, str], before: Callable[[], None] | None = None):
    """`__getattr__` and `__dir__` for `package`, whose attribute NAME is `names[NAME]`'s (a relative
    module) attribute of that name, imported on first use; `before()` runs first (once it has, cheaply)."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if before is not None:
            before()
        value = getattr(importlib.import_module(names[name], package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
