"""Host memory of loading a model for FSDP on 1 and 2 processes (torchrun, gloo on CPU).

    python benchmarks/dist_load_memory.py [--hidden 1024] [--layers 8] [--quick] [--device cpu|cuda]

A random bf16 Llama (hidden 1024, 8 layers, intermediate 2816, the character tokenizer) is loaded in
NF4 with double quantization and LoRA r=16 on all linear layers, as `nf4tune train` does it
(`Parallel.loading_hook` + `load_model` + `Parallel.wrap`), in two ways:

- `streamed` (what nf4tune does): each decoder layer is sharded as soon as its tensors are read;
- `whole` (what it did before): each rank loads the whole 4-bit model, then shards it.

Per rank it reports the peak of anonymous resident memory while loading (RssAnon, sampled every
2 ms: the file pages of the memory-mapped checkpoint are page cache, shared by the ranks and given
back under pressure, so they are left out), above what the rank held before loading, and the sum
over the node's ranks; with one process both ways are the same. `4-bit model` is the bytes of the
whole quantized model with its adapters (parameters and buffers of one process).

`--device cuda`: the ranks load onto their GPUs (one rank per GPU, NCCL) and `peak/rank` is the GPU
memory the loading allocated at its peak (`torch.cuda.max_memory_allocated` above what the rank held
before); the host's RssAnon peak is shown beside it. It needs at least 2 GPUs and says so and stops
without them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _PeakSampler:
    """The highest RssAnon seen by a thread sampling every 2 ms."""

    def __init__(self):
        self.peak, self._stop = _rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_anon())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_anon())


def child(model: str, mode: str, out: Path, device_name: str = "cpu") -> None:
    """One rank: load as `nf4tune train` does and write what it measured to out/rank<R>.json."""
    import torch

    from nf4tune.models.load import load_model
    from nf4tune.models.loss import loss_sum
    from nf4tune.train.config import recipe_from_dict
    from nf4tune.train.parallel import Parallel, param_bytes

    torch.set_num_threads(1)
    recipe = recipe_from_dict({"model": {"name_or_path": model, "compute_dtype": "float32", "device": device_name},
                               "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
                               "data": {"path": "unused.jsonl"},
                               "training": {"output_dir": str(out / "unused"), "parallel": "fsdp"}})
    par = Parallel.from_environment(recipe)  # NCCL and this rank's GPU under --device cuda
    device = par.device(device_name)
    # A first load of a one-layer model of the same width: imports, kernel builds and compiled
    # quantizers are not what is measured.
    warm, _ = load_model(str(Path(model).parent / "warmup"), compute_dtype=torch.float32, device=device, lora=recipe.lora,
                         progress=False)
    del warm
    gc.collect()
    par.barrier()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        gpu_before = torch.cuda.memory_allocated(device)
    before = _rss_anon()
    sampler = _PeakSampler()
    start = time.time()
    hook = par.loading_hook(recipe, Path(model)) if mode == "streamed" else None
    if mode == "whole" and par.world_size > 1:
        par._decide(recipe, Path(model))
    loaded, _ = load_model(model, compute_dtype=torch.float32, device=device, lora=recipe.lora, progress=False,
                           layer_ready=hook)
    whole = param_bytes(loaded) if hook is None else None
    par.wrap(loaded, recipe, loss_sum, 4096, Path(model))
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.time() - start
    host_peak = sampler.stop() - before
    peak = torch.cuda.max_memory_allocated(device) - gpu_before if cuda else host_peak
    result = {"rank": par.rank, "world_size": par.world_size, "mode": mode, "seconds": seconds,
              "peak_bytes": peak, "host_peak_bytes": host_peak, "held_bytes": param_bytes(par.root or loaded),
              "whole_bytes": whole}
    (out / f"rank{par.rank}.json").write_text(json.dumps(result))
    par.close()


def run(model: Path, nproc: int, mode: str, root: Path, device: str = "cpu") -> list[dict]:
    out = root / f"{mode}-{nproc}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--child", str(model), mode, str(out), device]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{mode} on {nproc} rank(s) failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a smoke run: hidden 256, 4 layers")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo, host memory; cuda: NCCL, one rank per GPU, GPU memory (needs 2 GPUs)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers = 256, 4
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < 2:
            print(f"dist_load_memory: skipped: --device cuda needs at least 2 CUDA GPUs (one rank per GPU, NCCL); "
                  f"this machine has {gpus}.")
            return
    from nf4tune.checkpoint.tiny import build_tiny_checkpoint

    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_checkpoint(root / "model", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_shard_size="50MB")
        build_tiny_checkpoint(root / "warmup", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                              num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
        rows = [run(model, 1, "whole", root, args.device)]
        rows += [run(model, 2, mode, root, args.device) for mode in ("whole", "streamed")]
    whole = rows[0][0]["whole_bytes"]
    cuda = args.device == "cuda"
    print(f"hidden {args.hidden}, {args.layers} layers: 4-bit model with adapters {whole / mib:.1f} MiB")
    if cuda:
        print("peak: GPU memory allocated while loading (torch.cuda.max_memory_allocated); host: RssAnon peak")
    print(f"{'ranks':>5} {'loading':>9} {'peak/rank':>11} {'peak/node':>11} {'held/rank':>11} {'seconds':>8}"
          + (f" {'host/rank':>11}" if cuda else ""))
    for ranks in rows:
        top = max(r["peak_bytes"] for r in ranks)
        node = sum(r["peak_bytes"] for r in ranks)
        held = max(r["held_bytes"] for r in ranks)
        mode = ranks[0]["mode"] if len(ranks) > 1 else "-"
        host = f" {max(r['host_peak_bytes'] for r in ranks) / mib:>7.1f} MiB" if cuda else ""
        print(f"{len(ranks):>5} {mode:>9} {top / mib:>7.1f} MiB {node / mib:>7.1f} MiB {held / mib:>7.1f} MiB "
              f"{max(r['seconds'] for r in ranks):>8.1f}{host}")


if __name__ == "__main__":
    main()
