"""`nf4tune chat`, `nf4tune generate` and `nf4tune serve`: a 4-bit model (and adapters) put to use.

Everything that can be checked without the model (values, paths, the port, the chat template's
presence) is checked first: a model takes a while to load, and a mistake found after that wastes it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
from pathlib import Path

from ..errors import Nf4tuneError
from ..train.formats import PROMPT_STYLES, prompt_format_of, render_plain_prompt
from .checks import (
    check_adapter_dir,
    check_model_location,
    check_output_file,
    check_port_free,
    count,
    number,
    read_text_file,
    resolve_builtin,
)

CHAT_COMMANDS = "/reset, /system TEXT, /exit"


def _model_args(p: argparse.ArgumentParser, many_adapters: bool = False) -> None:
    p.add_argument("model", help="base model folder or Hub id (16-bit or *-bnb-4bit)")
    if many_adapters:
        p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="serve the adapter in DIR under the model name NAME (repeatable; DIR alone: named after its folder)")
    else:
        p.add_argument("--adapter", help="LoRA adapter folder (nf4tune or PEFT)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if available)")


def _sampling_args(p: argparse.ArgumentParser, formats=("auto",) + PROMPT_STYLES) -> None:
    p.add_argument("--max-new-tokens", type=count(1), default=256)
    p.add_argument("--temperature", type=number(0, what="0 (greedy) or more"), default=0.7, help="0 for greedy")
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=0.9)
    p.add_argument("--top-k", type=count(0), default=0, help="0: no top-k")
    p.add_argument("--repetition-penalty", type=number(0, low_open=True), default=1.0)
    p.add_argument("--seed", type=count(0), default=None)
    p.add_argument("--format", choices=formats, default="auto",
                   help="prompt format: the tokenizer's chat template, Guanaco's '### Human:', Alpaca's, chip2's, or "
                   "raw text (auto: the format the adapter was trained with, else the template if any, else guanaco)")


def _sampling(args):
    from ..serve.sampling import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed).check()


def _has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer files in `folder` carry a chat template (read from the files, no loading)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_model(args) -> None:
    """Check (and resolve) the model and adapter arguments and the prompt format, before loading."""
    check_model_location(args.model)
    if isinstance(args.adapter, str):
        check_adapter_dir(args.adapter)
    args.model_path = resolve_builtin(args.model)
    if getattr(args, "format", None) is None:
        return
    style = args.format
    if style == "auto" and isinstance(args.adapter, str):
        style = prompt_format_of(args.adapter) or "auto"
    # generate's {"prompt": ...} rows go as they are unless a format was asked for or the adapter has one
    args.wrap_prompts = style != "auto"
    folder = Path(args.model_path)
    if folder.is_dir():
        has_template = _has_chat_template(folder)
        if style == "template" and not has_template:
            raise Nf4tuneError(f"--format template: {args.model} has no chat template; use --format guanaco, "
                               "alpaca, chip2 or raw.")
        if style == "auto":
            style = "template" if has_template else "guanaco"
    args.style = style


def _load(args):
    from ..models.load import load_model

    single = args.adapter if isinstance(args.adapter, str) else None
    model, tokenizer = load_model(args.model_path, device=args.device, adapter=single)
    if tokenizer is None:
        raise Nf4tuneError(f"{args.model} has no tokenizer files.")
    return model, tokenizer


def _engine(args, adapters: dict[str, str] | None = None, **kw):
    from ..serve.engine import Engine

    return Engine(*_load(args), adapters, **kw)


def render(tokenizer, messages: list[dict], style: str) -> str:
    """The prompt for `messages` in `style` (one of PROMPT_STYLES, or auto)."""
    if style in ("template", "guanaco", "auto"):
        from ..serve.engine import render_chat

        try:
            return render_chat(tokenizer, messages, style)
        except Exception as e:  # transformers' template errors (no template, a template that rejects the roles)
            raise Nf4tuneError(f"the chat template of this model cannot render the conversation "
                               f"({str(e).splitlines()[0]}); try --format guanaco or raw.") from e
    return render_plain_prompt(messages, style)


def add_parsers(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a model in the terminal, streaming its replies",
                          description=f"Interactive chat. Commands: {CHAT_COMMANDS} (or Ctrl-D). Ctrl-C stops a "
                          "reply; at an empty prompt it exits.")
    _model_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(run=run_chat)

    gen = sub.add_parser("generate", help="generate completions for a JSONL file of prompts, batched",
                         description='Each input line is {"prompt": "..."} or {"messages": [...]}; each output line '
                         'repeats it with a "completion". OUT is written whole at the end; an interrupted run keeps '
                         "its finished lines in OUT.partial, and --resume continues from them.")
    _model_args(gen)
    _sampling_args(gen)
    gen.add_argument("--prompts", required=True, help="input JSONL")
    gen.add_argument("--out", required=True, help="output JSONL")
    gen.add_argument("--batch-size", type=count(1), default=8)
    gen.add_argument("--resume", action="store_true", help="keep the lines an interrupted run finished (OUT.partial)")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace OUT if it exists, and start over from an interrupted run's OUT.partial")
    gen.set_defaults(run=run_generate)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server, with several adapters on one base",
                           description="Serves GET /v1/models, POST /v1/chat/completions and /v1/completions (streamed "
                           "or not) and a chat page at /. Binds to loopback unless --host says otherwise.")
    _model_args(serve, many_adapters=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=count(0, 65535), default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--max-batch", type=count(1), default=8)
    serve.add_argument("--max-queue", type=count(1), default=64, help="requests waiting beyond this get 429")
    serve.add_argument("--request-timeout", type=number(0, low_open=True), default=None, metavar="SECONDS",
                       help="a reply ends where it is this long after its request came (finish_reason 'length')")
    # defaults None: the server's own (serve/http_guard.py; not imported here, serve loads transformers)
    serve.add_argument("--max-connections", type=count(1), default=None,
                       help="connections served at once, one thread each (default 256); those beyond get 503")
    serve.add_argument("--idle-timeout", type=number(0, low_open=True), default=None, metavar="SECONDS",
                       help="a connection with no request, or reading none of its answer, this long is closed (30)")
    serve.add_argument("--read-timeout", type=number(0, low_open=True), default=None, metavar="SECONDS",
                       help="a request's line and headers, then its body, must each arrive within this (10)")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="without --api-key, also accept requests whose Host is NAME (repeatable)")
    serve.add_argument("--format", choices=["auto", "template", "guanaco"], default="auto")
    serve.set_defaults(run=run_serve)


# --- chat --------------------------------------------------------------------------------------

def _read_line(prompt: str) -> str | None:
    """One line from the user, None at end of input (Ctrl-D). A prompt shows only on a terminal."""
    if sys.stdin.isatty():
        print(prompt, end="", flush=True)
        return _read_terminal_line()
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _read_terminal_line() -> str | None:
    """A line typed at the terminal, read so that Ctrl-C always interrupts the wait: with `input()`, a Ctrl-C
    that came between the prompt and its read (or reached another thread than this one, the main thread) was
    handled without interrupting the read, which then waited for Enter. Here Python's signal handler also writes
    to a pipe (`signal.set_wakeup_fd`) that the wait watches beside the terminal, so KeyboardInterrupt is raised
    as soon as the wait ends."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous = signal.set_wakeup_fd(wake_w)
    try:
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([sys.stdin.fileno(), wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 512)  # the signal's Python handler (KeyboardInterrupt for Ctrl-C) runs next
                continue
            chunk = os.read(sys.stdin.fileno(), 65536)  # a terminal in line mode hands over one line per read
            if not chunk:  # Ctrl-D
                return line.decode(errors="replace") if line else None
            line += chunk
        return line[:-1].decode(errors="replace")
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)


def _stop_reply(request) -> None:
    """End `request`'s reply at its next token (Ctrl-C) and wait for it, so its text is what it kept."""
    request.cancel()
    try:
        request.wait(60)
    except KeyboardInterrupt:  # a second Ctrl-C: keep what has arrived
        pass


def run_chat(args) -> int:
    _prepare_model(args)
    from ..serve.request import Request

    sampling = _sampling(args)
    engine = _engine(args)
    system, history = args.system, []
    note = "; each message is answered on its own" if args.style in ("raw", "alpaca") else ""
    print(f"nf4tune chat ({args.style} format{note}): {CHAT_COMMANDS}; Ctrl-C stops a reply, Ctrl-D exits",
          file=sys.stderr)
    try:
        while True:
            try:
                text = _read_line("you: ")
            except KeyboardInterrupt:  # Ctrl-C at the prompt: leave
                print(file=sys.stderr)
                break
            if text is None:
                break
            command = text.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = []
                print("(conversation reset)", flush=True)
                continue
            if command == "/system" or command.startswith("/system "):
                system = command[len("/system"):].strip() or None
                print(f"(system prompt {'set' if system else 'cleared'})", flush=True)
                continue
            if command.startswith("/") and not command.startswith("//"):
                print(f"(unknown command {command.split()[0]}; the commands are {CHAT_COMMANDS}; "
                      "start with // to send a message beginning with /)", flush=True)
                continue
            if not command:
                continue
            text = text[1:] if command.startswith("//") else text
            history.append({"role": "user", "content": text})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            request, stopped = None, False
            try:  # from here on, Ctrl-C stops the reply and keeps the session
                request = engine.submit(Request(render(engine.tokenizer, messages, args.style), sampling=sampling))
                print("assistant: ", end="", flush=True)
                for piece in request.stream():
                    print(piece, end="", flush=True)
                print(flush=True)
                reply = request.wait().text
            except KeyboardInterrupt:
                stopped = True
                if request is not None:
                    _stop_reply(request)  # ends the generation now, rather than after max_new_tokens
                reply = request.text if request is not None else ""
                print(" (reply stopped)", flush=True)
            if request is None or (request.error and not stopped):
                if request is not None:
                    print(f"(error: {request.error})", flush=True)
                history.pop()
                continue
            history.append({"role": "assistant", "content": reply})
    finally:
        engine.close()
    return 0


# --- generate ----------------------------------------------------------------------------------

def _read_prompts(path: str) -> list[dict]:
    rows = []
    text = read_text_file(path, "--prompts")
    for number_, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise Nf4tuneError(f"{path}, line {number_}: not valid JSON ({e}).") from e
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            raise Nf4tuneError(f'{path}, line {number_}: expected {{"prompt": "..."}} or {{"messages": [...]}}.')
        rows.append(row)
    if not rows:
        raise Nf4tuneError(f"{path} has no prompts.")
    return rows


def partial_path(out: Path) -> Path:
    """Where `generate` keeps the finished lines of an unfinished run."""
    return out.with_name(out.name + ".partial")


def _done_lines(partial: Path, rows: list[dict]) -> list[str]:
    """The complete lines of an interrupted run that answer the first prompts, in order."""
    if not partial.is_file():
        return []
    done = []
    for line in partial.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break  # a line cut by the interruption
        if len(done) >= len(rows) or {k: v for k, v in record.items() if k not in ("completion", "finish_reason")} \
                != rows[len(done)]:
            raise Nf4tuneError(f"--resume: {partial} does not answer the first prompts of the --prompts file; "
                               "run without --resume to start over.")
        done.append(line)
    return done


def _check_generate_output(args, out: Path, partial: Path) -> None:
    """OUT is not an input and replaces nothing unasked; an interrupted run's finished lines are not
    thrown away unasked either."""
    from ..outputs import check_output

    check_output(out, [("the --prompts file", args.prompts), ("the model", args.model), ("the adapter", args.adapter)],
                 args.overwrite)
    if partial.is_file() and not args.resume and not args.overwrite:
        raise Nf4tuneError(f"{partial} holds the finished lines of an interrupted run; continue them with --resume, "
                           "or pass --overwrite to start over.")


def run_generate(args) -> int:
    from ..runlock import acquire

    rows = _read_prompts(args.prompts)
    out = check_output_file(args.out)
    partial = partial_path(out)
    _check_generate_output(args, out, partial)
    # One writer of OUT at a time: two runs would interleave their lines in OUT.partial.
    with acquire(out.with_name(out.name + ".lock"), f"{out} is being written by another nf4tune generate",
                 "choose another --out"):
        done = _done_lines(partial, rows) if args.resume else []
        _prepare_model(args)
        sampling = _sampling(args)
        todo = rows[len(done):]
        with open(partial, "w", encoding="utf-8") as f:  # open()'s permissions; renamed onto OUT when complete
            f.writelines(line + "\n" for line in done)
        if todo:
            _generate_into(args, todo, sampling, partial, len(done), len(rows))
        os.replace(partial, out)
    print(f"wrote {len(rows)} completions to {out}" + (f" ({len(done)} kept from the interrupted run)" if done else ""))
    return 0


def _generate_into(args, rows: list[dict], sampling, partial: Path, done: int, total: int) -> int:
    """Generate `rows` and append their lines to `partial`; on interruption say what is kept."""
    from tqdm.auto import tqdm

    from ..serve.generation import iter_completions

    written, completions = done, None
    try:
        model, tokenizer = _load(args)
        prompts = [render(tokenizer, row["messages"], args.style) if "prompt" not in row
                   else render(tokenizer, [{"role": "user", "content": row["prompt"]}], args.style)
                   if args.wrap_prompts else row["prompt"] for row in rows]
        completions = iter_completions(model, tokenizer, prompts, max_new_tokens=sampling.max_new_tokens,
                                       temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                       repetition_penalty=sampling.repetition_penalty, seed=sampling.seed,
                                       batch_size=args.batch_size)
        with open(partial, "a", encoding="utf-8") as f, \
                tqdm(total=total, initial=done, desc="generating", unit="prompt") as bar:
            for row, completion in zip(rows, completions):
                f.write(json.dumps({**row, "completion": completion.text, "finish_reason": completion.finish_reason}) + "\n")
                f.flush()
                written += 1
                bar.update(1)
    except (KeyboardInterrupt, Nf4tuneError) as e:
        kept = (f"{written} of {total} completions are complete in {partial}; {args.out} is unchanged; run the same "
                "command with --resume to continue") if written else f"no completion was finished; {args.out} is unchanged"
        if not written:
            partial.unlink(missing_ok=True)
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(kept) from None
        raise Nf4tuneError(f"{str(e).rstrip('.')}; {kept}.") from e
    finally:
        if completions is not None:
            completions.close()  # the engine stops at once, not when the generator is collected
    return written


# --- serve -------------------------------------------------------------------------------------

def run_serve(args) -> int:
    from ..serve.server import Server

    adapters = {}
    for item in args.adapter:
        name, sep, directory = item.partition("=")
        if not sep and Path(item).is_dir():  # a folder alone: served under its own name
            name, directory = Path(item).resolve().name, item
        elif not sep or not name or not directory:
            raise Nf4tuneError(f"--adapter {item!r}: write NAME=DIR (or the adapter's folder alone).")
        check_adapter_dir(directory)
        adapters[name] = directory
    args.format_choice, args.format = args.format, None
    _prepare_model(args)
    if args.format_choice == "template" and Path(args.model_path).is_dir() and not _has_chat_template(Path(args.model_path)):
        raise Nf4tuneError(f"--format template: {args.model} has no chat template; use --format guanaco.")
    check_port_free(args.host, args.port)
    # decoding on this (the main) thread, the HTTP server on its own: a worker thread's OpenMP team would pay a
    # wake-up at every parallel region beside the one this thread made while loading (BENCHMARKS.md)
    engine = _engine(args, adapters, max_batch=args.max_batch, max_queue=args.max_queue,
                     request_timeout=args.request_timeout, worker=False)
    try:
        server = Server(engine, base_name=Path(str(args.model)).name or "base", api_key=args.api_key,
                        chat_style=args.format_choice, host=args.host, port=args.port, allowed_hosts=args.allow_host,
                        **{k: v for k in ("max_connections", "idle_timeout", "read_timeout")
                           if (v := getattr(args, k)) is not None})
    except OSError as e:  # taken between the check and now
        engine.close()
        raise Nf4tuneError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); choose another --port.") from e
    host, port = server.address
    print(f"serving {', '.join(server.models())} on http://{host}:{port} (OpenAI API under /v1, chat page at /)",
          flush=True)
    server.start()
    try:
        engine.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
