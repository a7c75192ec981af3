"""`nf4tune chat` in a real terminal (a pseudo-terminal): it shows it waits, refuses unknown commands,
Ctrl-C stops a reply and keeps the session, Ctrl-C at an empty prompt and Ctrl-D exit (issue 16, item 7)."""

import ctypes
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from nf4tune.checkpoint.tiny import build_tiny_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
SYS_TGKILL = 234  # x86-64: a signal to one thread of a process


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory):
    """A tiny model whose end-of-sequence id it can never produce: every reply runs to max_new_tokens."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "m", eos_token_id=10_000)


class Terminal:
    def __init__(self, argv):
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "TERM": "dumb"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            # Ctrl-C must reach the chat as SIGINT even when the suite runs as a background job (started with
            # SIGINT ignored, which children inherit)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, "-m", "nf4tune.cli.main", *argv], env)
        self.seen = ""

    def expect(self, text: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"waited for {text!r}; the terminal shows:\n{self.seen[-3000:]}")
            try:
                chunk = os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                chunk = ""
            if not chunk:
                raise AssertionError(f"exited before {text!r}; the terminal shows:\n{self.seen[-3000:]}")
            self.seen += chunk
        found = self.seen
        self.seen = self.seen[self.seen.index(text) + len(text):]
        return found

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def exit_status(self, timeout: float = 60) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:  # drain so the child never blocks writing
                if select.select([self.fd], [], [], 0.1)[0]:
                    os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError("chat did not exit")


@pytest.mark.slow
def test_chat_in_a_terminal(endless_model):
    """One session (a process start costs seconds); leaving with Ctrl-D instead of Ctrl-C passed the same
    test when it was parametrized over both."""
    term = Terminal(["chat", str(endless_model), "--device", "cpu", "--format", "raw", "--max-new-tokens", "20000",
                     "--temperature", "1", "--seed", "0"])
    term.expect("you: ")
    term.send("/frobnicate now\n")
    term.expect("unknown command /frobnicate; the commands are /reset, /system TEXT, /exit")
    term.expect("you: ")
    term.send("Is 4 even or odd?\n")
    term.expect("assistant: ")
    time.sleep(1)  # let the reply stream a while
    term.send("\x03")  # Ctrl-C during the reply (20000 tokens: it cannot have ended)
    term.expect("(reply stopped)", timeout=60)
    term.expect("you: ")  # the session goes on
    term.send("/reset\n")
    term.expect("(conversation reset)")
    term.expect("you: ")
    # Ctrl-C at an empty prompt: leave, also where the kernel hands the signal to another thread than the main
    # one (it may: a busy machine made that, or a Ctrl-C just before the read began, leave `input()` waiting
    # for Enter); here it goes to the engine's worker thread on purpose
    if os.uname().machine == "x86_64" and os.path.isdir(f"/proc/{term.pid}/task"):
        worker = max(int(t) for t in os.listdir(f"/proc/{term.pid}/task"))
        assert worker != term.pid
        assert ctypes.CDLL(None, use_errno=True).syscall(SYS_TGKILL, term.pid, worker, signal.SIGINT) == 0
    else:  # no thread-directed signal by this system call here: Ctrl-C through the terminal
        term.send("\x03")
    assert term.exit_status() == 0
