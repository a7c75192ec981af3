"""`nf4tune chat`, `nf4tune generate` and `nf4tune serve`: a 4-bit model (and adapters) put to use."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import Nf4tuneError


def _model_args(p: argparse.ArgumentParser, many_adapters: bool = False) -> None:
    p.add_argument("model", help="base model folder or Hub id (16-bit or *-bnb-4bit)")
    if many_adapters:
        p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="serve the adapter in DIR under the model name NAME (repeatable)")
    else:
        p.add_argument("--adapter", help="LoRA adapter folder (nf4tune or PEFT)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if available)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--format", choices=["auto", "template", "guanaco"], default="auto",
                   help="chat prompt: the tokenizer's chat template, or Guanaco's '### Human:' format (auto: template if any)")


def _sampling(args):
    from ..serve.sampling import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed).check()


def _engine(args, adapters: dict[str, str] | None = None, **kw):
    from ..models.load import load_model
    from ..serve.engine import Engine

    single = getattr(args, "adapter", None) if isinstance(getattr(args, "adapter", None), str) else None
    model, tokenizer = load_model(args.model, device=args.device, adapter=single)
    if tokenizer is None:
        raise Nf4tuneError(f"{args.model} has no tokenizer files.")
    return Engine(model, tokenizer, adapters, **kw)


def add_parsers(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a model in the terminal, streaming its replies",
                          description="Interactive chat. Commands: /reset (forget the conversation), /system TEXT "
                          "(set the system prompt), /exit.")
    _model_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(run=run_chat)

    gen = sub.add_parser("generate", help="generate completions for a JSONL file of prompts, batched",
                         description='Each input line is {"prompt": "..."} or {"messages": [...]}; each output line '
                         "repeats it with a \"completion\".")
    _model_args(gen)
    _sampling_args(gen)
    gen.add_argument("--prompts", required=True, help="input JSONL")
    gen.add_argument("--out", required=True, help="output JSONL")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.set_defaults(run=run_generate)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server, with several adapters on one base",
                           description="Serves GET /v1/models, POST /v1/chat/completions and /v1/completions (streamed "
                           "or not) and a chat page at /. Binds to loopback unless --host says otherwise.")
    _model_args(serve, many_adapters=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--max-batch", type=int, default=8)
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 429")
    serve.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                       help="a reply ends where it is this long after its request came (finish_reason 'length')")
    serve.add_argument("--format", choices=["auto", "template", "guanaco"], default="auto")
    serve.set_defaults(run=run_serve)


def run_chat(args) -> int:
    from ..serve.engine import Request, render_chat

    engine = _engine(args)
    sampling = _sampling(args)
    system, history = args.system, []
    print("nf4tune chat: /reset, /system TEXT, /exit", file=sys.stderr)
    try:
        for line in sys.stdin:
            text = line.rstrip("\n")
            if text.strip() in ("/exit", "/quit"):
                break
            if text.strip() == "/reset":
                history = []
                print("(conversation reset)", flush=True)
                continue
            if text.startswith("/system"):
                system = text[len("/system"):].strip() or None
                print(f"(system prompt {'set' if system else 'cleared'})", flush=True)
                continue
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            request = engine.submit(Request(render_chat(engine.tokenizer, messages, args.format), sampling=sampling))
            print("assistant: ", end="", flush=True)
            for piece in request.stream():
                print(piece, end="", flush=True)
            print(flush=True)
            history.append({"role": "assistant", "content": request.wait().text})
    finally:
        engine.close()
    return 0


def run_generate(args) -> int:
    from tqdm.auto import tqdm

    from ..serve.engine import Request, render_chat

    rows = []
    path = Path(args.prompts)
    if not path.is_file():
        raise Nf4tuneError(f"prompts file {path} does not exist.")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise Nf4tuneError(f"{path}, line {number}: not valid JSON ({e}).") from e
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            raise Nf4tuneError(f'{path}, line {number}: expected {{"prompt": "..."}} or {{"messages": [...]}}.')
        rows.append(row)
    if not rows:
        raise Nf4tuneError(f"{path} has no prompts.")
    engine = _engine(args, max_batch=args.batch_size, max_queue=len(rows))
    sampling = _sampling(args)
    requests = [engine.submit(Request(row["prompt"] if "prompt" in row else
                                      render_chat(engine.tokenizer, row["messages"], args.format), sampling=sampling))
                for row in rows]
    out = Path(args.out)
    try:
        with out.open("w", encoding="utf-8") as f, tqdm(total=len(rows), desc="generating", unit="prompt") as bar:
            for row, request in zip(rows, requests):
                request.wait()
                if request.error:
                    raise Nf4tuneError(request.error)
                f.write(json.dumps({**row, "completion": request.text, "finish_reason": request.finish_reason}) + "\n")
                bar.update(1)
    finally:
        engine.close()
    print(f"wrote {len(rows)} completions to {out}")
    return 0


def run_serve(args) -> int:
    from ..serve.server import Server

    adapters = {}
    for item in args.adapter:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise Nf4tuneError(f"--adapter {item!r}: write NAME=DIR.")
        adapters[name] = directory
    engine = _engine(args, adapters, max_batch=args.max_batch, max_queue=args.max_queue,
                     request_timeout=args.request_timeout)
    server = Server(engine, base_name=Path(str(args.model)).name or "base", api_key=args.api_key,
                    chat_style=args.format, host=args.host, port=args.port)
    host, port = server.address
    print(f"serving {', '.join(server.models())} on http://{host}:{port} (OpenAI API under /v1, chat page at /)",
          flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
