"""Triton kernels for 4-bit weights (bitsandbytes' layout), used through `kernels.cuda`.

Both index in element space: element i sits in byte i // 2, high nibble first, its absmax in block
i // blocksize. So any shape works, ragged last blocks included.
"""

import triton
import triton.language as tl


@triton.jit
def dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, blocksize, BF16_BITS: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - offs % 2) * 4).to(tl.int32)) & 15
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    scale = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0)
    product = value * scale  # float32, rounded once to the output dtype, as the reference
    if BF16_BITS:  # round to nearest even by hand: the same bits on every backend and in the interpreter
        bits = product.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, product.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def matmul_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, table_ptr, offset, group, code_ptr, out_ptr,
                  N, K, blocksize, DOUBLE_QUANT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        flat = rows[:, None] * K + cols[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - flat % 2) * 4).to(tl.int32)) & 15
        weight = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        block = flat // blocksize
        if DOUBLE_QUANT:  # absmax = dynamic code of its 8-bit code * its group's scale + offset
            codes = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(table_ptr + codes, mask=mask, other=0.0) * tl.load(nested_ptr + block // group,
                                                                               mask=mask, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        x = tl.load(x_ptr + m * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += tl.sum(weight * scale * x[None, :], axis=1)
    tl.store(out_ptr + m * N + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)
