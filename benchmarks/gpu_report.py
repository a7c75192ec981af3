"""Everything a session with a GPU should measure first, in one command: writes DIR/gpu_report.md and .json.

    python benchmarks/gpu_report.py --out DIR [--device cuda|cpu] [--quick] [--wheels DIR] [--only KEYS]

Sections (each survives the failure of another: its error is recorded and the report goes on; both
files are rewritten after every section, so a run cut short keeps what it measured):

- environment: GPU, driver, torch, triton, transformers, peft, bitsandbytes; `nf4tune doctor`'s paths;
- `pytest -m gpu` (the test files that carry the marker);
- the Triton kernels' first-use self-check (on CPU: run by Triton's interpreter);
- dequantize bandwidth on 4096x4096 and 14336x4096 NF4 weights, GB/s and % of the device's copy bandwidth;
- a training step (`train_step.py`'s sides) and 20 steps of `nf4tune train` (`train_e2e.py`'s sides) at a
  1B-class and a 7B-class Llama shape, against transformers + peft + bitsandbytes;
- batch-1 and batch-8 decoding at the 7B shape (`decode_speed.py`'s sides), with the share of the
  bandwidth roofline;
- paged AdamW with its states larger than the free GPU memory (CUDA only);
- `nf4tune estimate` against the measured training-step peak (CUDA only);
- the compiled training step (`training.compile`) and activation offload (`training.offload_activations`)
  against the eager layers (tokens/s, peak memory), and `serve.static_decoder.StaticDecoder` eager,
  compiled and captured in a CUDA graph at batch 1 and 8 (GEMM prefill time, decode tokens/s, the same
  tokens; eager also against the prompt fed a token at a time), at the 1B-class shape.

--quick: tiny shapes and one step each (what the tests run on CPU, under 3 minutes). --wheels DIR:
where bitsandbytes is not installed, it is installed from the wheels in DIR (`pip install --no-index
--target` into a temporary folder put on the PYTHONPATH of the peer's processes), or, where DIR holds
an unpacked `bitsandbytes/` package (a copy slimmed to one CUDA library fits a device carry), DIR
itself goes on that path. Random weights are
written shard by shard to a temporary folder (`decode_speed.build_random`), the tokenizer and data
are `train_e2e.build`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import decode_speed  # noqa: E402
import train_e2e  # noqa: E402
import train_step  # noqa: E402
from harness import run_side as run_child  # noqa: E402

SCRIPTS = {"train_step.py": train_step, "train_e2e.py": train_e2e, "decode_speed.py": decode_speed}
QUICK = False  # --quick: sides run in this process (no interpreter start-ups; memory figures then mean little)

SHAPE_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
SHAPE_7B = decode_speed.SHAPE_7B
SHAPE_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)
PEER = "transformers+peft+bitsandbytes"


class Report:
    """Sections in order, each {"status": ok|error|skipped, "seconds", ...}; written after each one."""

    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        self.data = {"command": " ".join(sys.argv), "device": args.device, "quick": args.quick,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "sections": {}}

    def section(self, name: str, fn, *fn_args) -> dict | None:
        print(f"[gpu_report] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = fn(*fn_args)
            entry = {"status": "skipped" if isinstance(result, str) else "error" if result.get("failed") else "ok"}
            entry.update({"reason": result} if isinstance(result, str) else result)
        except Exception as e:  # record and go on: one broken section must not cost the others
            entry = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                     "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.perf_counter() - start, 1)
        self.data["sections"][name] = entry
        self.write()
        print(f"[gpu_report] {name}: {entry['status']} ({entry['seconds']} s)", file=sys.stderr, flush=True)
        return entry if entry["status"] == "ok" else None

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_report.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "gpu_report.md").write_text(markdown(self.data))


def markdown(data: dict) -> str:
    lines = [f"# nf4tune GPU report ({data['device']}{', quick' if data['quick'] else ''})", "",
             f"`{data['command']}`, started {data['started']}", ""]
    for name, entry in data["sections"].items():
        lines += [f"## {name}: {entry['status']} ({entry['seconds']} s)", ""]
        if "summary" in entry:
            lines += [entry["summary"], ""]
        if entry["status"] == "error":
            lines += [f"    {entry['error']}", ""]
        elif entry["status"] == "skipped":
            lines += [entry["reason"], ""]
        for key, value in entry.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):  # a table
                cols = list(dict.fromkeys(k for row in value for k in row))
                lines += [f"{key}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in cols) + " |" for row in value]
                lines.append("")
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_side(script: str, side: str, *args: str) -> dict:
    """One side of a benchmark script (`harness.run_side`: its own process), or with --quick in this one."""
    if not QUICK:
        return run_child(script, side, *args)
    module = SCRIPTS[Path(script).name]
    start = time.perf_counter()
    saved, sys.argv = sys.argv, [script, "--side", side, *args]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            module.main()
    finally:
        sys.argv = saved
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    print(f"[gpu_report]   {Path(script).name} {side}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return result


# ---- sections ----

def environment(args) -> dict:
    from nf4tune import __version__, dispatch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    driver = None
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True)
        driver = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    peer = subprocess.run([sys.executable, "-c", "import bitsandbytes; print(bitsandbytes.__version__)"],
                          capture_output=True, text=True)
    versions = {"nf4tune": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "triton": _version("triton"), "transformers": _version("transformers"),
                "peft": _version("peft"),
                "bitsandbytes": peer.stdout.strip() if peer.returncode == 0 else "not importable"}
    doctor = dispatch.report()
    summary = f"GPUs: {', '.join(gpus) or 'none'}; driver {driver}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
    return {"summary": summary, "gpus": gpus, "driver": driver, "versions": versions,
            "cpu_threads": torch.get_num_threads(), "paths": doctor["paths"]}


def gpu_tests(args) -> dict:
    root = HERE.parent
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files],
                          cwd=root, capture_output=True, text=True, timeout=600)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    return {"summary": f"`pytest -m gpu` ({len(files)} files): {tail}", "returncode": done.returncode,
            "output_tail": (done.stdout + done.stderr)[-3000:], "failed": done.returncode not in (0, 5)}


def triton_self_check(args) -> dict:
    if args.device == "cuda":
        from nf4tune.kernels import cuda as cuda_kernels

        rows = []
        for i in range(torch.cuda.device_count()):
            reason = cuda_kernels.check(torch.device("cuda", i))
            rows.append({"device": f"cuda:{i}", "dequantize + matmul": "passed" if reason is None else reason})
        return {"summary": "first-use check of both Triton kernels against the reference", "devices": rows}
    script = "import torch; from nf4tune.kernels import cuda; cuda.self_check(torch.device('cpu')); print('passed')"
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "the self-check failed")
    return {"summary": "the self-check of both Triton kernels passed in Triton's interpreter (TRITON_INTERPRET=1)",
            "devices": [{"device": "cpu (interpreter)", "dequantize + matmul": "passed"}]}


def dequantize_bandwidth(args) -> dict:
    import nf4tune
    from nf4tune import dispatch

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    copy = decode_speed.device_bandwidth(device)
    shapes = [(256, 256), (512, 256)] if args.quick else [(4096, 4096), (14336, 4096)]
    rows = []
    for shape in shapes:
        q = nf4tune.quantize(torch.randn(shape, device=device, dtype=torch.bfloat16))
        q.dequantize(torch.bfloat16)
        sync()
        times = []
        for _ in range(3 if args.quick else 20):
            start = time.perf_counter()
            q.dequantize(torch.bfloat16)
            sync()
            times.append(time.perf_counter() - start)
        moved = q.nbytes + 2 * shape[0] * shape[1]  # read the 4-bit form, write bf16
        rate = moved / statistics.median(times)
        rows.append({"shape": f"{shape[0]}x{shape[1]}", "path": dispatch.path("dequantize_4bit", q).name,
                     "ms": statistics.median(times) * 1e3, "GB/s": rate / 1e9, "% of copy": 100 * rate / copy})
    return {"summary": f"device copy bandwidth {copy / 1e9:.1f} GB/s (decode_speed.device_bandwidth)",
            "copy_GB/s": copy / 1e9, "shapes": rows}


def build_model(root: Path, shape: dict, quick: bool) -> Path:
    """`train_e2e`'s tokenizer and data with a random Llama of `shape` (vocab 32000) in root/model."""
    saved = train_e2e.CONFIG
    train_e2e.CONFIG = {**SHAPE_TINY, "num_hidden_layers": 1}  # the tokenizer and data; its model is replaced
    try:
        train_e2e.build(root)
    finally:
        train_e2e.CONFIG = saved
    model = root / "model"
    for f in model.glob("model*.safetensors*"):
        f.unlink()
    decode_speed.build_random(model, shape)
    if quick:  # a few rows are enough for a step or two
        data = root / "data.jsonl"
        data.write_text("".join(data.read_text().splitlines(keepends=True)[:16]))
    return model


def training(args, label: str, shape: dict, root: Path) -> dict:
    steps_cfg = dict(batch=1, seq=16, steps=1) if args.quick else dict(batch=4, seq=512, steps=3)
    start = time.perf_counter()
    model = build_model(root, shape, args.quick)
    print(f"[gpu_report]   model built: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for side in ("nf4tune", "peft-bnb"):
        try:
            r = run_side(str(HERE / "train_step.py"), side, "--model", str(model), "--steps", str(steps_cfg["steps"]),
                         "--device", args.device, "--batch", str(steps_cfg["batch"]), "--seq", str(steps_cfg["seq"]))
            rows.append({"benchmark": "training step", "side": side if side == "nf4tune" else PEER, **r})
        except BaseException as e:  # noqa: BLE001  (run_side exits on a failed child)
            rows.append({"benchmark": "training step", "side": side, "error": str(e)})
    train_steps = 1 if args.quick else 20
    for side in ("nf4tune", PEER):
        try:
            shutil.rmtree(root / "nf4tune-out", ignore_errors=True)
            r = run_side(str(HERE / "train_e2e.py"), side, "--root", str(root), "--steps", str(train_steps + 1),
                         "--device", args.device)
            if side == "nf4tune":
                records = [json.loads(line) for line in (root / "nf4tune-out" / "metrics.jsonl").read_text().splitlines()]
                r["peak_memory_gib"] = max((x.get("peak_memory_gib", 0) for x in records), default=None)
            rows.append({"benchmark": f"`nf4tune train`, {train_steps} steps", "side": side, **r})
        except BaseException as e:  # noqa: BLE001
            rows.append({"benchmark": f"`nf4tune train`, {train_steps} steps", "side": side, "error": str(e)})
    by = {(r["benchmark"], r["side"]): r for r in rows}
    ratios = []
    for bench in ("training step", f"`nf4tune train`, {train_steps} steps"):
        ours, peer = by.get((bench, "nf4tune"), {}), by.get((bench, PEER), {})
        if "tokens_per_s" in ours and "tokens_per_s" in peer:
            ratios.append(f"{bench}: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x the peer's tokens/s")
    estimate = _estimate_vs_peak(args, model, steps_cfg, by.get(("training step", "nf4tune"), {}))
    return {"summary": f"{label} shape {shape}; " + ("; ".join(ratios) or "no ratio (a side failed)"),
            "runs": rows, **estimate}


def _estimate_vs_peak(args, model: Path, cfg: dict, ours: dict) -> dict:
    from nf4tune.plan.estimate import GIB, estimate

    est = estimate(str(model), seq_len=cfg["seq"], batch=cfg["batch"], r=16)
    # train_step runs forward + backward without an optimizer: compare without the optimizer's states
    predicted = (est.total - est.optimizer_states) / GIB
    row = {"estimate_gib (no optimizer states)": predicted}
    if "peak_cuda_gib" in ours:
        row.update(measured_gib=ours["peak_cuda_gib"], error_pct=100 * (predicted / ours["peak_cuda_gib"] - 1))
    return {"estimate_vs_peak": [row]}


def decoding(args, root: Path) -> dict:
    shape = SHAPE_TINY if args.quick else SHAPE_7B
    model = root / "model"
    model.mkdir(parents=True)
    decode_speed.build_random(model, shape)
    new, prompt = (2, 4) if args.quick else (64, 128)
    rows = []
    for batch in (1, 8):
        for side in ("nf4tune", "transformers+bnb"):
            try:
                r = run_side(str(HERE / "decode_speed.py"), side, "--model", str(model), "--device", args.device,
                             "--new-tokens", str(new), "--prompt", str(prompt), "--lora-r", "0", "--batch", str(batch))
            except BaseException as e:  # noqa: BLE001
                rows.append({"batch": batch, "side": side, "error": str(e)})
                continue
            row = {"batch": batch, "side": side, "decode_tokens_per_s": r["decode_tokens_per_s"],
                   "prefill_ms": r["prefill_s"] * 1e3}
            if "weight_bytes" in r:  # each step reads every weight once: steps/s x bytes vs bandwidth
                achieved = r["weight_bytes"] * r["decode_tokens_per_s"] / batch
                row.update(weight_GB=r["weight_bytes"] / 1e9, achieved_GB_s=achieved / 1e9,
                           roofline_pct=100 * achieved / r["bandwidth"], decoder=r["decoder"])
            rows.append(row)
    speedups = []
    for batch in (1, 8):
        ours = [r for r in rows if r["batch"] == batch and r["side"] == "nf4tune" and "decode_tokens_per_s" in r]
        peer = [r for r in rows if r["batch"] == batch and r["side"] != "nf4tune" and "decode_tokens_per_s" in r]
        if ours and peer:
            speedups.append(f"batch {batch}: {ours[0]['decode_tokens_per_s'] / peer[0]['decode_tokens_per_s']:.2f}x")
    return {"summary": f"shape {shape}, prompt {prompt}, {new} new tokens; nf4tune / bitsandbytes decode tokens/s: "
                       + (", ".join(speedups) or "no ratio (a side failed)"), "runs": rows}


def paged_adamw(args) -> dict | str:
    if args.device != "cuda":
        return "paged AdamW pages to host memory only on CUDA (on CPU paging does nothing)"
    import optim_step

    from nf4tune.optim import PagedAdamW

    device = torch.device("cuda")
    params = optim_step.make_params(200, device)  # ~200M float32 adapter-like parameters: 1.6 GB of states
    states = 8 * sum(p.numel() for p in params)
    free = torch.cuda.mem_get_info()[0]
    ballast = torch.empty(max(free - states // 2, 0), dtype=torch.uint8, device=device)  # half the states fit
    torch.cuda.reset_peak_memory_stats()
    opt = PagedAdamW(params, lr=1e-4, paging="auto")
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    where = {str(t.device) + (" pinned" if t.device.type == "cpu" and t.is_pinned() else "")
             for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()}
    del ballast
    return {"summary": f"{states / 1e9:.2f} GB of states with {free / 1e9:.1f} GB free less a ballast leaving half "
                       f"of them room; steps took {', '.join(f'{t:.3f}' for t in times)} s",
            "step_s": times, "state_locations": sorted(where), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def _fresh_model(path: Path, device: str):
    import nf4tune

    model, _ = nf4tune.load_model(path, device=device, compute_dtype=torch.bfloat16, progress=False,
                                  lora=nf4tune.LoraConfig(r=16, alpha=16, dropout=0.0))
    return model


def _train_runs(args, path: Path, device: str) -> list[dict]:
    """Forward + backward of the chunked loss, eager / compiled layers / offloaded layer inputs."""
    from nf4tune.models.loss import loss_sum
    from nf4tune.train import compile as compile_mod

    batch, seq, steps = (1, 16, 1) if args.quick else (4, 1024, 5)
    # on CPU the compiled run shows the path works; Inductor's C++ code generation would take minutes
    backend = "inductor" if device == "cuda" else "aot_eager"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for label, compile_, offload in (("eager", False, False), (f"compiled ({backend})", True, False),
                                     ("eager + offload", False, True), ("compiled + offload", True, True)):
        model = _fresh_model(path, device).train()
        saved, compile_mod.BACKEND = compile_mod.BACKEND, backend
        try:
            torch._dynamo.reset()
            compile_mod.prepare_layers(model, compile_, offload, True, torch.device(device))
        finally:
            compile_mod.BACKEND = saved
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen).to(device)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        times, losses = [], []
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(steps + 1):  # the first step compiles
            sync()
            start = time.perf_counter()
            total, count = loss_sum(model, data)
            (total / count).backward()
            sync()
            if i:
                times.append(time.perf_counter() - start)
            losses.append(float(total / count))
            model.zero_grad(set_to_none=True)
        row = {"layers": label, "tokens_per_s": batch * seq / statistics.median(times), "first_loss": losses[0],
               "step_s": statistics.median(times)}
        if device == "cuda":
            row["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        del model
    return rows


def _timed_decode(decoder, ids: torch.Tensor, new: int, sync) -> tuple[float, float]:
    """Seconds of the GEMM prefill of the rows of `ids`, and of the `new - 1` greedy steps after it."""
    batch, prompt = ids.shape
    sync()
    start = time.perf_counter()
    logits = decoder.prefill(list(enumerate(ids)))
    sync()
    prefill = time.perf_counter() - start
    slots, starts = torch.full((batch,), prompt), torch.zeros(batch, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(new - 1):
        logits = decoder.step(logits.argmax(-1).cpu(), slots, starts, slots)
        slots = slots + 1
    sync()
    return prefill, time.perf_counter() - start


def _decode_runs(args, path: Path, device: str) -> list[dict]:
    """`StaticDecoder` eager, compiled, and (CUDA) captured in a CUDA graph, at batch 1 and 8 (2 with
    --quick): the GEMM prefill's time, greedy decode tokens/s after it, whether each mode gave the eager
    tokens and (eager) whether the prompts fed through the step a token at a time give them too."""
    from nf4tune.serve.sampling import Sampling
    from nf4tune.serve.static_decoder import StaticDecoder

    new, prompt = (2, 3) if args.quick else (64, 128)
    model = _fresh_model(path, device).eval()
    modes = ["eager", "compiled"] + (["graphs"] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for batch in (1, 2) if args.quick else (1, 8):
        ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
        reference = None
        for mode in modes:
            torch._dynamo.reset()
            decoder = StaticDecoder(model, batch, prompt + new, mode=mode,
                                    backend="inductor" if device == "cuda" else "aot_eager")
            decoder.generate(ids, Sampling(max_new_tokens=2))  # compiles, captures
            tokens = decoder.generate(ids, Sampling(max_new_tokens=new))
            prefill, decode = _timed_decode(decoder, ids, new, sync)
            row = {"mode": mode, "batch": batch, "prefill_ms": prefill * 1e3,
                   "decode_tokens_per_s": batch * (new - 1) / decode}
            if reference is None:
                reference = tokens
                row["same_tokens_token_at_a_time"] = decoder.generate(ids, Sampling(max_new_tokens=new),
                                                                      prefill=False) == tokens
            row["same_tokens_as_eager"] = tokens == reference
            rows.append(row)
    return rows


def gpu_path(args, root: Path) -> dict:
    """What issue 15 added: the compiled training step, activation offload, the CUDA-graph decoder."""
    shape = SHAPE_TINY if args.quick else SHAPE_1B
    model = root / "model"
    model.mkdir(parents=True)
    decode_speed.build_random(model, shape)
    train_rows = _train_runs(args, model, args.device)
    decode_rows = _decode_runs(args, model, args.device)
    eager = train_rows[0]["tokens_per_s"]
    summary = f"shape {shape}; training tokens/s vs eager: " + ", ".join(
        f"{r['layers']} {r['tokens_per_s'] / eager:.2f}x" for r in train_rows[1:])
    summary += "; decode tokens/s after the GEMM prefill: " + ", ".join(
        f"{r['mode']} b{r['batch']} {r['decode_tokens_per_s']:.1f}" for r in decode_rows)
    failed = not all(r["same_tokens_as_eager"] and r.get("same_tokens_token_at_a_time", True) for r in decode_rows)
    return {"summary": summary, "training_step": train_rows, "static_decoder": decode_rows, "failed": failed}


def install_peer(wheels: str | None) -> str | None:
    """Make bitsandbytes importable by the peer's processes (from `wheels` if it is missing); say what was done."""
    if subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True).returncode == 0:
        return None
    if not wheels:
        return "bitsandbytes is not installed and no --wheels folder was given: the peer's runs will fail"
    if (Path(wheels) / "bitsandbytes").is_dir():  # an unpacked copy (slimmed to fit a carry): use it as it is
        target = str(Path(wheels).resolve())
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (target, os.environ.get("PYTHONPATH")) if p)
        sys.path.insert(0, target)
        return f"bitsandbytes taken from the unpacked copy in {target}"
    target = tempfile.mkdtemp(prefix="gpu_report_bnb_")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, "--target",
                           target, "--no-deps", "bitsandbytes"], capture_output=True, text=True)
    if done.returncode:
        return f"pip could not install bitsandbytes from {wheels}: {done.stderr.strip()[-500:]}"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (target, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, target)  # and for the sides --quick runs in this process
    return f"bitsandbytes installed from {wheels} into {target} (on the peer's PYTHONPATH)"


def planned_sections(args) -> list[tuple]:
    """(key for --only, title, function, whether it needs a temporary folder, its extra arguments), in order."""
    tiny = " (tiny shape: --quick)" if args.quick else ""
    shapes = [("train-1b", "1B-class", SHAPE_1B), ("train-7b", "7B-class", SHAPE_7B)]
    return [
        ("environment", "environment", environment, False, ()),
        ("pytest", "pytest -m gpu", gpu_tests, False, ()),
        ("triton", "Triton self-check", triton_self_check, False, ()),
        ("dequantize", "dequantize bandwidth", dequantize_bandwidth, False, ()),
        *[(key, f"training, {label}{tiny}", training, True, (label, SHAPE_TINY if args.quick else shape))
          for key, label, shape in (shapes[:1] if args.quick else shapes)],
        ("decode", f"decoding, 7B-class{tiny}", decoding, True, ()),
        ("paged", "paged AdamW under memory pressure", paged_adamw, False, ()),
        ("gpu-path", f"compiled layers, activation offload, CUDA-graph decoding{tiny}", gpu_path, True, ()),
    ]


SECTION_KEYS = ("environment", "pytest", "triton", "dequantize", "train-1b", "train-7b", "decode", "paged", "gpu-path")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one step each")
    parser.add_argument("--wheels", help="a folder of wheels to install bitsandbytes from where it is missing")
    parser.add_argument("--only", type=lambda v: set(v.split(",")), default=None,
                        help=f"run only these sections (comma-separated: {','.join(SECTION_KEYS)}), e.g. to split "
                             "the report over two calls of a device with a time limit per call")
    args = parser.parse_args(argv)
    if args.only and not args.only <= set(SECTION_KEYS):
        parser.error(f"--only: unknown section(s) {', '.join(sorted(args.only - set(SECTION_KEYS)))}; "
                     f"choose from {', '.join(SECTION_KEYS)}")
    global QUICK
    QUICK = args.quick
    report = Report(args.out, args)
    report.data["peer_install"] = install_peer(args.wheels)
    for key, title, fn, needs_folder, extra in planned_sections(args):
        if args.only and key not in args.only:
            continue
        if needs_folder:
            with tempfile.TemporaryDirectory() as tmp:
                report.section(title, fn, args, *extra, Path(tmp))
        else:
            report.section(title, fn, args, *extra)
    report.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report.write()
    print(f"wrote {args.out / 'gpu_report.md'} and {args.out / 'gpu_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
