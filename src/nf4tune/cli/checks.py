"""What the commands check before loading anything: values in range, paths usable, the port free.

A model takes seconds to minutes to load; a typo found after that wastes the wait, and a zero batch
size or queue length would hang. Every check here is cheap and raises `Nf4tuneError` with one
sentence, or (the argparse types) makes argparse print one. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
from pathlib import Path

from ..errors import Nf4tuneError


def count(minimum: int = 1, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            where = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
            raise argparse.ArgumentTypeError(f"must be {where}, got {value}")
        return value
    parse.__name__ = "count"
    return parse


def number(low: float, high: float = math.inf, low_open: bool = False, what: str | None = None):
    """An argparse type: a finite float in [low, high] (or (low, high] with `low_open`)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"must be {what or _range(low, high, low_open)}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _range(low: float, high: float, low_open: bool) -> str:
    if high == math.inf:
        return f"more than {low:g}" if low_open else f"{low:g} or more"
    return f"{'more than' if low_open else 'from'} {low:g} {'and at most' if low_open else 'to'} {high:g}"


def looks_local(name: str) -> bool:
    """Whether a model name can only mean a local path (a Hub id is `owner/name`)."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1


def check_model_location(name: str, what: str = "the model") -> None:
    """A local model path must be a folder or a .gguf file; say so now rather than after other work."""
    if name.startswith("pip:"):
        return  # the .gguf an installed package ships: found (or refused with a sentence) when loading
    if name.startswith("tiny-random:"):
        from ..checkpoint.tiny import BUILTIN

        if name.removeprefix("tiny-random:") not in BUILTIN:
            raise Nf4tuneError(f"unknown built-in model {name!r}; built-in models: "
                               + ", ".join(f"tiny-random:{k}" for k in BUILTIN) + ".")
        return
    if not looks_local(name):
        return  # a Hub id: resolved (downloaded) when loading
    path = Path(name).expanduser()
    if not path.exists():
        raise Nf4tuneError(f"{what} {name} is not a folder (it does not exist); give the folder of a Hugging Face "
                           "checkpoint (config.json + *.safetensors), a .gguf file or a Hub id.")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return
    if not path.is_dir():
        raise Nf4tuneError(f"{what} {name} is not a folder; give the folder of a Hugging Face checkpoint "
                           "(config.json + *.safetensors), not a file in it.")


def resolve_builtin(name: str) -> str:
    """`tiny-random:NAME` as the folder it is built into (on first use); other names as they are."""
    if not str(name).startswith("tiny-random:"):
        return name
    from ..checkpoint.tiny import builtin_path

    return str(builtin_path(name))


def check_adapter_dir(directory: str | None, flag: str = "--adapter") -> None:
    if directory is None:
        return
    path = Path(directory)
    if not path.is_dir():
        raise Nf4tuneError(f"{flag} {directory} is not a folder; give the folder holding adapter_config.json.")
    if not (path / "adapter_config.json").is_file():
        raise Nf4tuneError(f"{flag} {directory} has no adapter_config.json; is it a LoRA adapter folder?")


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """A file we will create or replace: its folder exists and is writable, and it is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise Nf4tuneError(f"{flag} {path} is a folder; give a file name (e.g. {path / 'out.jsonl'}).")
    parent = path.parent
    if not parent.is_dir():
        raise Nf4tuneError(f"{flag} {path}: the folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Nf4tuneError(f"{flag} {path}: the folder {parent} is not writable.")
    if path.exists() and not os.access(path, os.W_OK):
        raise Nf4tuneError(f"{flag} {path} exists and is not writable.")
    return path


def read_text_file(path: str | Path, flag: str) -> str:
    """The UTF-8 text of a file the user named, or one sentence saying why it cannot be read."""
    path = Path(path)
    if path.is_dir():
        raise Nf4tuneError(f"{flag} {path} is a folder; give a file.")
    if not path.is_file():
        raise Nf4tuneError(f"{flag} {path} does not exist.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Nf4tuneError(f"{flag} {path} cannot be read ({e.strerror}).") from e
    if b"\0" in data[:8192]:
        raise Nf4tuneError(f"{flag} {path} is a binary file, not UTF-8 text (JSON Lines expected).")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Nf4tuneError(f"{flag} {path} is not UTF-8 text (byte {e.start} cannot be decoded); "
                           "save it as UTF-8 JSON Lines.") from e


def check_data_file(path: str, key: str) -> None:
    """A local data file (.jsonl, .json, .csv) must be a readable file of UTF-8 text: said now, not after
    the tokenizer and model load. Hub dataset names and other files are left to the reader."""
    from ..rows import TEXT_SUFFIXES, not_utf8, not_utf8_error

    p = Path(path)
    if p.suffix.lower() not in TEXT_SUFFIXES or not p.exists():
        return  # a Hub dataset, or a missing file: the reader names it
    if p.is_dir():
        raise Nf4tuneError(f"{key} {path} is a folder; give a data file.")
    try:
        where = not_utf8(p)
    except OSError as e:
        raise Nf4tuneError(f"{key} {path} cannot be read ({e.strerror}).") from e
    if where is not None:
        raise not_utf8_error(path, where)


def check_port_free(host: str, port: int) -> None:
    """Bind and release `host:port` now, so a port in use is reported before the model loads."""
    if port == 0:
        return  # any free port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Nf4tuneError(f"--host {host}: not an address this machine can listen on ({e.strerror}).") from e
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise Nf4tuneError(f"port {port} on {host} is already in use; stop what listens there or choose "
                                   "another with --port.") from e
            if e.errno == errno.EACCES:
                raise Nf4tuneError(f"port {port} needs administrator rights; use a port above 1023.") from e
            raise Nf4tuneError(f"cannot listen on {host}:{port} ({e.strerror}).") from e

