"""The code tables of the 4-bit (NF4, FP4, INT4) and 8-bit (dynamic) data types.

A code table maps a k-bit index to a value in [-1, 1]; blockwise quantization stores, for each
element, the index of the table value nearest to element / absmax(block).

Every table here is *derived*, not pasted, and reproduces bitsandbytes' float32 values bit for bit
(the tests compare against both the published NF4 values and bitsandbytes itself). INT4 has no
bitsandbytes counterpart: it is here for ablations against NF4.
"""

from __future__ import annotations

import functools

import torch

from ..registry import QUANT_TYPES  # noqa: E402, F401  (re-exported: the 4-bit core checks names against it)

# Outermost quantile of the NF4 construction: (1/2)(1/32 + 1/30) away from 1 (QLoRA paper, eq. 4),
# as bitsandbytes rounds it.
NF4_OFFSET = 0.9677083


@functools.cache
def nf4_code() -> torch.Tensor:
    """The 16 NormalFloat4 values, index = 4-bit code.

    NF4 puts one level at each quantile of N(0, 1) so that every bin holds equal probability mass
    under a normal distribution (weights are roughly normal). Asymmetric, so that 0 is exact:
      - 8 positive levels: Phi^-1(p) for p = 9 evenly spaced points from NF4_OFFSET down to 0.5,
        dropping the last (0.5 itself, which is 0);
      - 7 negative levels: -Phi^-1(p) for 8 evenly spaced points from NF4_OFFSET to 0.5, last dropped;
      - an exact 0;
    sorted and divided by the largest, so the table spans [-1, 1].

    The arithmetic follows bitsandbytes' `create_normal_map` (float32 probabilities, float64 inverse
    CDF, float32 normalization), which is what makes the result match its table exactly.
    """
    ppf = torch.special.ndtri
    positive = ppf(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1].double())
    negative = -ppf(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    return values / values.max()


@functools.cache
def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 values (1 sign, 2 exponent, 1 mantissa bit), index = 4-bit code.

    The high bit of the nibble is the sign; the 3 low bits encode magnitudes 0, 0.0625, 8, 12, 4, 6,
    2, 3 (bitsandbytes' exponent bias of 2 and bit order), normalized by the largest, 12.
    """
    magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    # bitsandbytes writes "-0" as the int 0, so the negative zero is +0.0.
    values = torch.cat([magnitudes, -magnitudes + 0.0])
    return values / values.abs().max()


@functools.cache
def int4_code() -> torch.Tensor:
    """Symmetric 4-bit integers: k / 7 for k = -7..7, index = k + 7, and index 15 a second 0.

    The plain absmax integer quantizer (round(x * 7 / absmax), scale absmax / 7), kept symmetric so that 0
    is exact and +-absmax both representable, as NF4 is; that leaves one of the 16 codes spare, which holds
    0 too (values just above 0 land on it; both decode to 0). The 16-level code (2k - 15) / 15 would use
    every code but has no 0, so a zero weight would not survive the round trip.
    """
    levels = torch.arange(-7, 8, dtype=torch.float32) / 7
    return torch.cat([levels, torch.zeros(1)])


_CODES_4BIT = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}  # QUANT_TYPES -> its table


def code_4bit(quant_type: str) -> torch.Tensor:
    """The 16-entry table of `quant_type` (a name in QUANT_TYPES), float32 on CPU."""
    if quant_type not in _CODES_4BIT:
        raise ValueError(f"unknown quant_type {quant_type!r}: use one of {', '.join(QUANT_TYPES)}.")
    return _CODES_4BIT[quant_type]()


@functools.cache
def on_device(device: torch.device, table, *args) -> torch.Tensor:
    """`table(*args)` on `device`, copied there once: the kernels look tables up on every call, and
    a fresh host-to-device copy per layer per step is work done for nothing. Do not modify it."""
    return table(*args).to(device)


@functools.cache
def dynamic_code(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic code (Dettmers 2015): a dynamic exponent followed by a linear fraction.

    Used for the double-quantized absmax values (signed) and for 8-bit optimizer states (signed for
    the first moment, unsigned for the second). 256 sorted values in [-1, 1] (or [0, 1]).
    For each exponent i the fraction range [0.1, 1] is cut into equal bins whose midpoints, scaled
    by 10^(i - max_exponent_bits + 1), become levels; 0 and 1 are added.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        boundaries = torch.linspace(0.1, 1, 2**fraction_bits + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def bits_per_parameter(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    """Storage cost of 4-bit blockwise quantization per weight, constants included.

    4 bits per code, plus one absmax per block: 32 bits, or with double quantization 8 bits plus one
    fp32 nested absmax per `nested_blocksize` absmax values. NF4 + DQ at block 64: 4.127 bits.
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize
