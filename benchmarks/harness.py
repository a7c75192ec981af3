"""What the benchmarks share: memory sampling, and running each side in its own process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples this process's resident memory in a thread while the block runs."""

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def timed_steps(step, n: int) -> tuple[list[float], int]:
    """Run `step()` n times: the seconds of each, and the peak resident memory sampled meanwhile."""
    times = []
    with PeakRSS() as peak:
        for _ in range(n):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return times, peak.peak


def run_side(script: str, side: str, *args: str) -> dict:
    """Run `script --side SIDE ARGS...` in a fresh process and return the JSON it prints last."""
    out = subprocess.run([sys.executable, script, "--side", side, *args], capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{side} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_random_llama(path, config: dict, tie: bool = False, max_shard_size: str | None = "200MB") -> None:
    """A random Llama of `config` (LlamaConfig fields) written to `path` in bf16: built in float32 from
    seed 0 (transformers' initialization), then cast; `max_shard_size` None keeps transformers' default."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=tie)).to(torch.bfloat16)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))


def bnb_nf4_config(compute=None, storage=None):
    """bitsandbytes' QLoRA quantization as users write it: NF4, double quantization, `compute` (bf16 by
    default) compute dtype; `storage`, when given, its `bnb_4bit_quant_storage` (FSDP recipes set it)."""
    import torch
    from transformers import BitsAndBytesConfig

    extra = {} if storage is None else {"bnb_4bit_quant_storage": storage}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute or torch.bfloat16, **extra)


def load_bnb(path, device, compute=None, storage=None):
    """transformers + bitsandbytes: the checkpoint at `path` quantized by `bnb_nf4_config` onto `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    compute = compute or torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_nf4_config(compute, storage),
                                                dtype=compute, device_map=device)


def load_peft_bnb(path, device, r: int = 16, alpha: int = 16, dropout: float = 0.05, compute=None, storage=None):
    """The usual QLoRA script's model: `load_bnb`, `prepare_model_for_kbit_training` (gradient
    checkpointing, non-reentrant), `get_peft_model` with LoRA on every linear layer of the blocks."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(load_bnb(path, device, compute, storage), use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def build_endless_llama(path, env: dict) -> None:
    """A random hidden-512, 4-layer Llama with a tiny vocabulary whose end-of-sequence id it never produces (so
    every reply runs to its token limit), built at `path` by the nf4tune on `env`'s PYTHONPATH (the checkout
    being measured)."""
    subprocess.run([sys.executable, "-c", "import sys; from nf4tune.checkpoint.tiny import build_tiny_checkpoint; "
                    "build_tiny_checkpoint(sys.argv[1], 'llama', eos_token_id=10_000, hidden_size=512, "
                    "intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)",
                    str(path)], check=True, env=env, capture_output=True)
