"""Inference on top of the QLoRA model: the batching engine, the OpenAI-compatible server."""

from .engine import Engine, QueueFull, render_chat
from .request import Request
from .sampling import Sampling

__all__ = ["Engine", "QueueFull", "Request", "Sampling", "render_chat"]
