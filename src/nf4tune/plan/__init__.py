"""Planning a run before it starts: memory estimates."""

from .estimate import Estimate, estimate

__all__ = ["Estimate", "estimate"]
