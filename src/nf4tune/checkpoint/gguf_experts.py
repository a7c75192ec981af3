"""A mixture-of-experts layer's experts as llama.cpp stores them: one 3-D tensor per projection, experts first
(ffn_gate_exps / ffn_up_exps [E, I, H], ffn_down_exps [E, H, I] in torch order), as its converter stacks them.

Checkpoints hold the experts in either of transformers' two layouts: one matrix per expert, as the Hub's files
and `save_pretrained` keep them (`mlp.experts.{j}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{j}.w1`),
or fused, as transformers 5 holds them in memory (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows first, and
`mlp.experts.down_proj` [E, H, I]). Both become the stacked names gguf's tensor map knows
(`mlp.experts.gate_proj.weight`, `block_sparse_moe.experts.w1.weight`, ...). The export stays a stream: only
the experts of the projection being stacked are held, one layer at a time in checkpoint order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from ..errors import Nf4tuneError

_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def stack_experts(tensors: Iterable[tuple[str, torch.Tensor]], n_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` (transformers keys, in checkpoint order) with each projection's `n_experts` per-expert matrices
    replaced by one stacked [E, out, in] tensor, and fused gate_up / down tensors split and renamed; every other
    tensor passes as it is. A checkpoint missing experts, or holding more than the config says, is refused."""
    pending: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, w in tensors:
        if (m := _FUSED.match(key)) is not None:
            yield from _split_fused(key, m["prefix"], m["proj"], w, n_experts)
        elif (m := _PER_EXPERT.match(key)) is not None:
            expert = int(m["expert"])
            if expert >= n_experts:
                raise Nf4tuneError(f"the checkpoint holds {key}, but its config has {n_experts} experts; the config "
                                   "does not describe this checkpoint.")
            group = pending.setdefault((m["prefix"], m["proj"]), {})
            group[expert] = w
            if len(group) == n_experts:
                del pending[(m["prefix"], m["proj"])]
                yield f"{m['prefix']}.{m['proj']}.weight", torch.stack([group[j] for j in range(n_experts)])
        else:
            yield key, w
    if pending:
        (prefix, proj), group = next(iter(pending.items()))
        raise Nf4tuneError(f"the checkpoint holds {len(group)} of the {n_experts} experts' {prefix}.*.{proj} weights; it "
                           "is incomplete.")


def _split_fused(key: str, prefix: str, proj: str, w: torch.Tensor, n_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    # transformers' fused layout: gate_up_proj [E, 2I, H] is gate's I rows then up's (its forward chunks it in two)
    if w.dim() != 3 or w.shape[0] != n_experts or (proj == "gate_up_proj" and w.shape[1] % 2):
        raise Nf4tuneError(f"{key} is {list(w.shape)}, not the [experts={n_experts}, out, in] tensor of transformers' fused "
                           "experts; the checkpoint is not one nf4tune can export.")
    if proj == "down_proj":
        yield f"{prefix}.down_proj.weight", w
        return
    half = w.shape[1] // 2
    yield f"{prefix}.gate_proj.weight", w[:, :half]
    yield f"{prefix}.up_proj.weight", w[:, half:]
