"""llama.cpp's k-quants the `gguf` package can read but not write: Q4_K and Q6_K, and the Q4_K_M mix.

Ports of llama.cpp's reference quantizers (ggml-quants.c: `quantize_row_q4_K_ref` with `make_qkx2_quants`,
`quantize_row_q6_K_ref` with `make_qx_quants`), vectorized over blocks with numpy in float32 as the C code
computes, writing the same block layouts that `gguf.quants.dequantize` (and llama.cpp) read:

- Q4_K, 144 bytes per 256 weights: f16 super-scale d and super-min dmin, 8 sub-blocks of 32 with 6-bit
  scale and min packed in 12 bytes, 4-bit codes; w = d*sc*q - dmin*m.
- Q6_K, 210 bytes per 256 weights: 16 sub-blocks of 16 with int8 scales, 6-bit codes split into a
  low-nibble and a high-2-bit plane, one f16 d; w = d*sc*(q - 32).

`q4_k_m_type` is llama.cpp's choice of type per tensor for `llama-quantize ... Q4_K_M`
(`llama_tensor_get_type`): the output matrix (or the tied token embedding) and "more bits" layers of
attn_v and ffn_down in Q6_K, the rest in Q4_K, and llama.cpp's fallbacks (Q5_0, Q8_0) for rows that do
not fill 256-weight super-blocks.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a group this small is all zeros


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 and back, as GGML_FP32_TO_FP16 then GGML_FP16_TO_FP32 do."""
    return x.astype(np.float16).astype(np.float32)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"rows of {x.shape[-1]} weights do not fill {QK_K}-weight super-blocks")
    return x.reshape(-1, QK_K)


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, -min) per group of the last axis: an asymmetric nmax-level grid searched over nstep+1
    candidate scales, each refit by weighted least squares (llama.cpp's make_qkx2_quants, use_mad=false)."""
    lo = np.minimum(x.min(-1), 0).astype(np.float32)
    hi = x.max(-1)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)
    span = hi - lo
    flat = span == 0
    safe_span = np.where(flat, 1, span).astype(np.float32)
    iscale = np.float32(nmax) / safe_span
    scale = 1 / iscale
    q = np.clip(np.rint(iscale[..., None] * (x - lo[..., None])), 0, nmax)
    best = (w * (scale[..., None] * q + lo[..., None] - x) ** 2).sum(-1)
    best_scale, best_min = scale, lo
    for step in range(nstep + 1):
        iscale = np.float32(rmin + rdelta * step + nmax) / safe_span
        q = np.clip(np.rint(iscale[..., None] * (x - lo[..., None])), 0, nmax)
        wq = w * q
        sum_l, sum_l2, sum_xl = wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = np.where(ok, det, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), this_scale)
        this_min = np.where(positive, 0, this_min).astype(np.float32)
        err = (w * (this_scale[..., None] * q + this_min[..., None] - x) ** 2).sum(-1)
        better = ok & (err < best)
        best = np.where(better, err, best)
        best_scale = np.where(better, this_scale, best_scale)
        best_min = np.where(better, this_min, best_min)
    best_scale = np.where(flat, 0, best_scale).astype(np.float32)
    return best_scale, (-best_min).astype(np.float32)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K bytes of `x` (rows a multiple of 256), shape (..., cols // 256 * 144), as llama.cpp writes them."""
    shape = x.shape
    b = _blocks(x)
    sub = b.reshape(-1, 8, 32)
    av_x = np.sqrt((sub * sub).sum(-1) / 32).astype(np.float32)  # each sub-block's RMS
    weights = av_x[..., None] + np.abs(sub)
    scales, mins = _make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20)
    max_scale, max_min = scales.max(-1), mins.max(-1)
    inv_scale = np.where(max_scale > 0, 63 / np.where(max_scale > 0, max_scale, 1), 0).astype(np.float32)
    inv_min = np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0).astype(np.float32)
    ls = np.minimum(np.rint(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins), 63).astype(np.uint8)
    d16 = (max_scale / 63).astype(np.float16)
    dmin16 = (max_min / 63).astype(np.float16)
    d = d16.astype(np.float32)[:, None] * ls
    dm = dmin16.astype(np.float32)[:, None] * lm
    safe_d = np.where(d == 0, 1, d)
    q = np.where(d[..., None] == 0, 0, np.clip(np.rint((sub + dm[..., None]) / safe_d[..., None]), 0, 15))
    q = q.astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    packed = np.empty((b.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    out = np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), packed, qs], axis=-1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, codes in [0, 2*nmax)) per group of the last axis: a symmetric grid anchored on the largest
    magnitude, searched over 19 candidate scales weighted by x² (llama.cpp's make_qx_quants, rmse_type=1)."""
    idx = np.abs(x).argmax(-1)
    signed_max = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    zero = np.abs(signed_max) < _EPS
    safe_max = np.where(zero, 1, signed_max).astype(np.float32)
    w = x * x

    def fit(iscale):
        q = np.clip(np.rint(iscale[..., None] * x), -nmax, nmax - 1)
        return q, (w * x * q).sum(-1), (w * q * q).sum(-1)

    q, sumlx, suml2 = fit(np.float32(-nmax) / safe_max)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0).astype(np.float32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand_q, cand_lx, cand_l2 = fit(np.float32(-(nmax + np.float32(0.1) * step)) / safe_max)
        better = (cand_l2 > 0) & (cand_lx * cand_lx > best * cand_l2)
        q = np.where(better[..., None], cand_q, q)
        scale = np.where(better, cand_lx / np.where(cand_l2 > 0, cand_l2, 1), scale).astype(np.float32)
        best = np.where(better, scale * cand_lx, best)
    scale = np.where(zero, 0, scale).astype(np.float32)
    return scale, np.where(zero[..., None], 0, q + nmax)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K bytes of `x` (rows a multiple of 256), shape (..., cols // 256 * 210), as llama.cpp writes them."""
    shape = x.shape
    b = _blocks(x)
    sub = b.reshape(-1, 16, 16)
    scales, codes = _make_qx_quants(sub, 32)
    idx = np.abs(scales).argmax(-1)
    max_scale = np.take_along_axis(scales, idx[:, None], -1)[:, 0]
    zero = np.abs(max_scale) < _EPS
    iscale = np.where(zero, 0, np.float32(-128) / np.where(zero, 1, max_scale)).astype(np.float32)
    d16 = np.where(zero, 0, 1 / np.where(zero, 1, iscale)).astype(np.float16)
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
    d = d16.astype(np.float32)[:, None] * sc
    safe_d = np.where(d == 0, 1, d)
    # A sub-block whose scale rounds to 0 keeps make_qx_quants' codes, as llama.cpp's (they dequantize to 0).
    q = np.where(d[..., None] == 0, codes, np.clip(np.rint(sub / safe_d[..., None]), -32, 31) + 32)
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # per 128 weights: four runs of 32
    ql = np.concatenate([q[:, :, 0] & 0x0F | ((q[:, :, 2] & 0x0F) << 4),
                         q[:, :, 1] & 0x0F | ((q[:, :, 3] & 0x0F) << 4)], axis=-1).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16[:, None].view(np.uint8)], axis=-1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 210)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(gguf_name: str, n_layers: int, n_cols: int, has_output: bool) -> str:
    """The ggml type llama.cpp's Q4_K_M gives a 2-D tensor (llama_tensor_get_type, no importance matrix):
    "Q6_K" for output.weight (token_embd.weight when the output is tied to it) and for attn_v / ffn_down of
    the layers `_use_more_bits` picks, else "Q4_K"; rows that are not a multiple of 256 fall back as
    llama.cpp's do (Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    kind = "Q4_K"
    if gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output):
        kind = "Q6_K"
    elif gguf_name.endswith((".attn_v.weight", ".ffn_down.weight")):
        layer = int(gguf_name.split(".")[1])
        if _use_more_bits(layer, n_layers):
            kind = "Q6_K"
    if n_cols % QK_K:
        kind = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[kind]
    return kind


def quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """`x` (float32, rows of whole blocks) as ggml type `kind`'s bytes: Q4_K and Q6_K here, others by the
    gguf package's own quantizers."""
    if kind == "Q4_K":
        return quantize_q4_k(x)
    if kind == "Q6_K":
        return quantize_q6_k(x)
    import gguf

    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), getattr(gguf.GGMLQuantizationType, kind))
