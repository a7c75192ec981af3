// Hand-vectorized AVX-512 kernels for 4-bit weights on CPU, loaded by cpu.py through ctypes.
//
// Why by hand: a 4-bit code is an index into a 16-entry table, and the one instruction that looks
// 16 floats up at once (vpermps) is something torch.compile's C++ backend never emits; it falls back
// to a scalar gather, 20-30x slower than this. The pure-PyTorch reference (blockwise.py) stays the
// definition: tests hold both kernels to it.
//
// Layout (bitsandbytes'): weights are a flat row-major N x K array, two codes per byte, the first
// element in the high nibble; one float absmax per `blocksize` consecutive elements. Dequantizing
// needs blocksize % 32 == 0; the matmul also K % blocksize == 0 (blocks never straddle rows) and
// power-of-two block and nested-block sizes (bitsandbytes' are); cpu.py checks.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

// Codes 2i and 2i+1 of 8 bytes as 16 int32 lanes: high nibble first, as bitsandbytes packs.
static inline __m512i codes16(const uint8_t* p) {
    __m128i bytes = _mm_loadl_epi64((const __m128i*)p);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
}

static inline uint16_t bf16_bits(float f) {  // round to nearest even, as torch
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static inline float to_float(float f) { return f; }
static inline float to_float(uint16_t b) {  // bfloat16 is the top half of a float32
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// float32 -> bfloat16, round to nearest even (inputs are finite: codes times absmax).
static inline __m256i to_bf16(__m512 w) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(w);
#else
    __m512i bits = _mm512_castps_si512(w);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
#endif
}

// out (n_elems) = code[q] * absmax[block], as float32 or rounded to bfloat16 (round to nearest even,
// as torch's .to(torch.bfloat16)).
extern "C" void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code, int64_t n_elems,
                                int64_t blocksize, void* out, int out_bf16, int threads) {
    const __m512 table = _mm512_loadu_ps(code);
    const int64_t blocks = n_elems / blocksize;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const __m512 scale = _mm512_set1_ps(absmax[b]);
        for (int64_t i = b * blocksize; i < (b + 1) * blocksize; i += 16) {
            __m512 w = _mm512_mul_ps(_mm512_permutexvar_ps(codes16(packed + i / 2), table), scale);
            if (out_bf16)
                _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), to_bf16(w));
            else
                _mm512_storeu_ps((float*)out + i, w);
        }
    }
}

// Where a weight's absmax comes from: float32 values, or double quantization's 8-bit codes of the
// dynamic table, each times its group's float32 scale plus the offset (the reference's float_absmax,
// same rounding).
struct Absmax {
    const float* fp32;     // plain absmax, or NULL
    const uint8_t* codes;  // double-quantized absmax
    const float* nested;   // one scale per `group` codes
    const float* table;    // the 256-entry dynamic code
    float offset;
    int group_shift;       // log2 of the codes per scale (a power of two: bitsandbytes' 256)

    // Blocks [first, first + count) as float32 into out. Vectorized (two gathers per 16 blocks):
    // decoded one at a time, this took a third of a decoding matmul.
    inline void row(int64_t first, int64_t count, float* out) const {
        if (fp32) {
            memcpy(out, fp32 + first, count * sizeof(float));
            return;
        }
        const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        for (int64_t i = 0; i < count; i += 16) {
            const __mmask16 live = count - i >= 16 ? 0xFFFF : (__mmask16)((1u << (count - i)) - 1);
            __m512i code = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, codes + first + i));
            __m512 value = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, code, table, 4);
            const int64_t last = first + i + (count - i >= 16 ? 15 : count - i - 1);
            __m512 scale;
            if ((first + i) >> group_shift == last >> group_shift)  // one group: no second gather
                scale = _mm512_set1_ps(nested[(first + i) >> group_shift]);
            else
                scale = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, _mm512_srli_epi32(
                    _mm512_add_epi32(_mm512_set1_epi32((int)(first + i)), lanes), group_shift), nested, 4);
            _mm512_mask_storeu_ps(out + i, live, _mm512_add_ps(_mm512_mul_ps(value, scale), _mm512_set1_ps(offset)));
        }
    }
};

// x laid out for `rows_times_weight_row`, float32: within each 128 values of a row, vector s (16 floats)
// lane i holds x[8i + (s ^ 1)], the weight that nibble s of the kernel's 32-bit lane i codes; the last
// K % 128 values stay in order.
template <typename X>
static void lay_out_x(const X* x, int64_t M, int64_t K, float* out) {
    const int64_t full = K / 128 * 128;
    for (int64_t m = 0; m < M; m++, x += K, out += K) {
        for (int64_t c = 0; c < full; c += 128)
            for (int s = 0; s < 8; s++)
                for (int i = 0; i < 16; i++) out[c + 16 * s + i] = to_float(x[c + 8 * i + (s ^ 1)]);
        for (int64_t c = full; c < K; c++) out[c] = to_float(x[c]);
    }
}

// R rows of x (R <= TILE) times one row of W: R is a template argument so the accumulators live in
// registers. 128 weights (64 bytes) per step, looked up straight from the loaded bytes: vpermps reads only the low
// 4 bits of each 32-bit index, so shifting the bytes by 4s looks up nibble s of every lane (8 shifts and
// 8 lookups, where widening each byte first took twice the shuffles). x is laid out to match
// (`lay_out_x`); lane i covers weights 8i..8i+7, so one scale per lane covers the block. The 8 products
// of a step go to 4 independent sums (a chain of 8 waited on the FMA's latency), added in a fixed order
// whatever R: a row's result does not depend on its batch.
template <int R>
static inline float* rows_times_weight_row(const float* x, int64_t K, const uint8_t* row, const Absmax& absmax,
                                           int64_t first_block, int64_t blocksize, __m512 table, float* sums) {
    const __m512i lane_block = _mm512_srli_epi32(
        _mm512_set_epi32(120, 112, 104, 96, 88, 80, 72, 64, 56, 48, 40, 32, 24, 16, 8, 0), __builtin_ctzll(blocksize));
    float scales[K / blocksize + 16];  // + 16: a step loads 16 floats and uses the first 1 to 4
    absmax.row(first_block, K / blocksize, scales);
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const int64_t full = K / 128 * 128;
    for (int64_t k = 0; k < full; k += 128) {
        const __m512i bytes = _mm512_loadu_si512(row + k / 2);
        __m512 w[8];
        for (int s = 0; s < 8; s++) w[s] = _mm512_permutexvar_ps(s ? _mm512_srli_epi32(bytes, 4 * s) : bytes, table);
        const __m512 scale = _mm512_permutexvar_ps(lane_block, _mm512_loadu_ps(scales + k / blocksize));
        for (int r = 0; r < R; r++) {
            const float* xr = x + r * K + k;
            __m512 p[4];
            for (int s = 0; s < 4; s++) p[s] = _mm512_mul_ps(w[s], _mm512_loadu_ps(xr + 16 * s));
            for (int s = 4; s < 8; s++) p[s - 4] = _mm512_fmadd_ps(w[s], _mm512_loadu_ps(xr + 16 * s), p[s - 4]);
            const __m512 step = _mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3]));
            acc[r] = _mm512_fmadd_ps(step, scale, acc[r]);
        }
    }
    for (int64_t k = full; k < K; k += 32) {  // the last K % 128 weights (a multiple of 32), in order
        const __m512 w0 = _mm512_permutexvar_ps(codes16(row + k / 2), table);
        const __m512 w1 = _mm512_permutexvar_ps(codes16(row + k / 2 + 8), table);
        const __m512 scale = _mm512_set1_ps(scales[k / blocksize]);
        for (int r = 0; r < R; r++) {
            const float* xr = x + r * K + k;
            const __m512 step = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xr)));
            acc[r] = _mm512_fmadd_ps(step, scale, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
    return sums;
}

typedef float* (*RowsKernel)(const float*, int64_t, const uint8_t*, const Absmax&, int64_t, int64_t, __m512, float*);
// Rows of x at most this many at a time: each weight row is decoded once per tile. (8-row tiles ran 1.3x
// slower on a 2752-wide weight on the 2-core Xeon, and within 10% either way on five other shapes.)
constexpr int TILE = 4;
static const RowsKernel ROWS[TILE] = {rows_times_weight_row<1>, rows_times_weight_row<2>, rows_times_weight_row<3>,
                                      rows_times_weight_row<4>};

// x (M rows, laid out by `lay_out_x`) @ W^T in TILE-row tiles, in parallel over W's rows.
static void tile_rows(const float* x, int64_t M, int64_t K, const uint8_t* packed, const Absmax& absmax, int64_t N,
                      int64_t blocksize, __m512 table, int out_bf16, void* out, int threads) {
    for (int64_t m0 = 0; m0 < M; m0 += TILE) {
        const int rows = M - m0 < TILE ? (int)(M - m0) : TILE;
        const RowsKernel kernel = ROWS[rows - 1];
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float sums[TILE];
            kernel(x + m0 * K, K, packed + n * (K / 2), absmax, n * (K / blocksize), blocksize, table, sums);
            for (int r = 0; r < rows; r++) {
                if (out_bf16)
                    ((uint16_t*)out)[(m0 + r) * N + n] = bf16_bits(sums[r]);
                else
                    ((float*)out)[(m0 + r) * N + n] = sums[r];
            }
        }
    }
}

// A buffer on a 64-byte boundary, for x laid out once per call: malloc's 16-byte alignment split every
// 64-byte load of it across two cache lines, which cost up to 1.7x at 4 and 8 rows (BENCHMARKS.md).
template <typename T>
struct Aligned {
    T* ptr;
    explicit Aligned(int64_t n) : ptr((T*)aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)) {}
    ~Aligned() { free(ptr); }
    Aligned(const Aligned&) = delete;
    Aligned& operator=(const Aligned&) = delete;
    T* data() { return ptr; }
};

// A 4-bit weight as `Matmul4bit` in cpu.py describes it once (a ctypes Structure, same field order).
struct Weight4bit {
    const uint8_t* packed;
    const float* absmax_fp32;     // plain absmax, or NULL with double quantization:
    const uint8_t* absmax_codes;  // its 8-bit codes,
    const float* nested;          // their scales (one per `group` codes),
    const float* dynamic_table;   // the 256-entry dynamic code
    float offset;
    int64_t group;                // a power of two
    const float* code;            // the 16 values of the 4-bit code
    int64_t N, K, blocksize;
};

// out (M x N) = x (M x K) @ W^T for a 4-bit W (N x K), x float32 or bfloat16, the sums in float32;
// out is bfloat16 when x is and out_f32 is 0, else float32 (for a bias or adapter still to be added
// before the one rounding). Each weight is decoded once in registers per TILE rows of x:
// for decoding (M = batch), where reading the weights is the whole cost. A row is summed in the same
// order whatever M and whichever tile it falls in, so its result does not depend on its batch.
extern "C" void matmul_4bit(const void* x_in, int bf16, int64_t M, const Weight4bit* w, void* out, int out_f32,
                            int threads) {
    const float* code = w->code;
    const int64_t N = w->N, K = w->K, blocksize = w->blocksize;
    const uint8_t* packed = w->packed;
    int shift = 0;
    while (((int64_t)1 << shift) < w->group) shift++;
    const Absmax absmax{w->absmax_fp32, w->absmax_codes, w->nested, w->dynamic_table, w->offset, shift};
    const __m512 table = _mm512_loadu_ps(code);
    Aligned<float> xs(M * K);
    if (bf16)
        lay_out_x((const uint16_t*)x_in, M, K, xs.data());
    else
        lay_out_x((const float*)x_in, M, K, xs.data());
    tile_rows(xs.data(), M, K, packed, absmax, N, blocksize, table, bf16 && !out_f32, out, threads);
}

#ifdef __AVX512BF16__
// out (M x N, bfloat16) = x (M x K) @ W^T for bfloat16 x and W, M <= 8, K % 32 == 0, summed in float32.
// For the 16-bit output head while decoding, where reading W from memory is the cost: NB rows of W at
// a time (independent accumulators hide the dot product's latency) and W prefetched PREFETCH_ROWS rows
// ahead, without which a batch of 4 read W at half of memory's speed (BENCHMARKS.md). Each output is
// one accumulator summed over k in order, whatever R and NB: a row's logits do not depend on its batch.
constexpr int PREFETCH_ROWS = 8;

template <int R, int NB>
static inline void rows_times_bf16_rows(const uint16_t* x, int64_t K, const uint16_t* w, float* sums) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {  // 32 bfloat16: one cache line of each row of W
        __m512bh xs[R];
        for (int r = 0; r < R; r++) xs[r] = (__m512bh)_mm512_loadu_si512(x + r * K + k);
        for (int j = 0; j < NB; j++) {
            _mm_prefetch((const char*)(w + (j + PREFETCH_ROWS) * K + k), _MM_HINT_T0);
            const __m512bh wj = (__m512bh)_mm512_loadu_si512(w + j * K + k);
            for (int r = 0; r < R; r++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wj, xs[r]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++) sums[r * NB + j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int R>
static void matmul_bf16_rows(const uint16_t* x, int64_t K, const uint16_t* w, int64_t N, uint16_t* out, int threads) {
    constexpr int NB = R <= 4 ? 4 : 2;  // at most 16 accumulators
    const int64_t groups = N / NB;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        float sums[R * NB];
        rows_times_bf16_rows<R, NB>(x, K, w + g * NB * K, sums);
        for (int r = 0; r < R; r++)
            for (int j = 0; j < NB; j++) out[r * N + g * NB + j] = bf16_bits(sums[r * NB + j]);
    }
    for (int64_t n = groups * NB; n < N; n++) {
        float sums[R];
        rows_times_bf16_rows<R, 1>(x, K, w + n * K, sums);
        for (int r = 0; r < R; r++) out[r * N + n] = bf16_bits(sums[r]);
    }
}

typedef void (*Bf16Matmul)(const uint16_t*, int64_t, const uint16_t*, int64_t, uint16_t*, int);
static const Bf16Matmul BF16_ROWS[] = {matmul_bf16_rows<1>, matmul_bf16_rows<2>, matmul_bf16_rows<3>,
                                       matmul_bf16_rows<4>, matmul_bf16_rows<5>, matmul_bf16_rows<6>,
                                       matmul_bf16_rows<7>, matmul_bf16_rows<8>};

extern "C" void matmul_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, uint16_t* out,
                            int threads) {
    BF16_ROWS[M - 1](x, K, w, N, out, threads);
}
#endif

// out (M x N, float32) = x (M x K) @ W^T for float32 x and W: the unmerged LoRA products while
// decoding. Every output is one dot product summed in the same order whatever M is, so a sequence's
// result does not depend on what it is batched with (PyTorch's matrix-vector and matrix-matrix
// paths round differently).
extern "C" void matmul_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* out, int threads) {
    const __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1);
#pragma omp parallel for num_threads(threads) schedule(static) if (M * N * K > 65536)
    for (int64_t n = 0; n < N; n++) {
        const float* wn = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K;
            __m512 acc = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k), _mm512_loadu_ps(wn + k), acc);
            if (tail) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, xm + k), _mm512_maskz_loadu_ps(tail, wn + k), acc);
            out[m * N + n] = _mm512_reduce_add_ps(acc);
        }
    }
}

// The index of each float32 row's largest value (x: M rows of N), as torch.argmax picks it: the first
// maximum, or the first NaN where a row holds one. For greedy decoding: PyTorch's argmax read a
// vocabulary's logits at about 0.5 GB/s on this machine, a few percent of a small model's token.
extern "C" void argmax_rows(const float* x, int64_t M, int64_t N, int64_t* out) {
    for (int64_t m = 0; m < M; m++, x += N) {
        __m512 best = _mm512_set1_ps(-INFINITY);
        bool nan = false;
        int64_t n = 0;
        for (; n + 16 <= N && !nan; n += 16) {
            const __m512 v = _mm512_loadu_ps(x + n);
            nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
            best = _mm512_max_ps(best, v);
        }
        float top = _mm512_reduce_max_ps(best);
        for (; n < N && !nan; n++) {
            nan = x[n] != x[n];
            top = x[n] > top ? x[n] : top;
        }
        int64_t at = -1;
        if (nan) {  // rare: the first NaN, found one value at a time
            for (n = 0; at < 0; n++) at = x[n] != x[n] ? n : -1;
        } else {
            const __m512 wanted = _mm512_set1_ps(top);
            for (n = 0; n + 16 <= N && at < 0; n += 16) {
                const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + n), wanted, _CMP_EQ_OQ);
                if (hit) at = n + __builtin_ctz((unsigned)hit);
            }
            for (; at < 0 && n < N; n++) at = x[n] == top ? n : -1;
        }
        out[m] = at;
    }
}

// ---- A decoding step's small operations (serve/decoder.py): PyTorch's RMSNorm costs
// 10-20 us on two cores where this costs one or two, and its bf16 attention for one query 100-400 us
// per layer, where this one reads the KV cache about as fast as memory allows.

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// out (bfloat16, M x K) = x (float32, M x K) / sqrt(mean(x^2) + eps) * weight (float32, K), row by
// row: RMSNorm as Llama's, with the residual stream kept in float32.
extern "C" void rms_norm(const float* x, int64_t M, int64_t K, const float* weight, float eps, uint16_t* out) {
    for (int64_t m = 0; m < M; m++, x += K, out += K) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __m512 v = _mm512_loadu_ps(x + k);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / K + eps));
        for (int64_t k = 0; k < K; k += 16)
            _mm256_storeu_si256((__m256i*)(out + k), to_bf16(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv),
                                                                           _mm512_loadu_ps(weight + k))));
    }
}

// Rotary embedding (rotate-half convention, as transformers' Llama) of one head's D values.
static inline void rope(const uint16_t* in, const float* cos, const float* sin, int64_t D, float* out) {
    const int64_t h = D / 2;
    for (int64_t i = 0; i < h; i++) {
        float a = bf16_to_float(in[i]), b = bf16_to_float(in[i + h]);
        out[i] = a * cos[i] - b * sin[i];
        out[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

static inline __m512 load_bf16(const uint16_t* p) {  // 16 bfloat16 values widened to float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// One new token's attention for each of B sequences, with a bfloat16 KV cache (B x Hkv x capacity x D,
// per layer). q (B x H x D) and k, v (B x Hkv x D) are the new tokens' projections (bfloat16); the
// rotary embedding (cos, sin: B x D, each sequence at its own position) is applied to q and k here,
// k and v are written at cache slot `pos`, and sequence b attends to slots [start[b], pos] (start
// skips left padding and what a sliding window has left behind). out (bfloat16, B x H x D). Heads
// are shared in groups of H / Hkv (grouped-query attention). D % 16 == 0, D <= 512.
extern "C" void decode_attention(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* cos,
                                 const float* sin, uint16_t* k_cache, uint16_t* v_cache, int64_t capacity,
                                 int64_t pos, const int64_t* start, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                 float scale, uint16_t* out, int threads) {
    for (int64_t bg = 0; bg < B * Hkv; bg++) {  // bg: sequence b = bg / Hkv, KV head g = bg % Hkv
        const int64_t b = bg / Hkv;
        float rotated[512];
        rope(k + bg * D, cos + b * D, sin + b * D, D, rotated);
        for (int64_t i = 0; i < D; i++) k_cache[(bg * capacity + pos) * D + i] = bf16_bits(rotated[i]);
        memcpy(v_cache + (bg * capacity + pos) * D, v + bg * D, D * sizeof(uint16_t));
    }
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> p(pos + 1);  // one buffer per thread, reused across its heads
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, kv = b * Hkv + (bh % H) / (H / Hkv), first = start[b], T = pos + 1 - first;
            const uint16_t* keys = k_cache + (kv * capacity + first) * D;
            const uint16_t* values = v_cache + (kv * capacity + first) * D;
            float qr[512];
            rope(q + bh * D, cos + b * D, sin + b * D, D, qr);
            float top = -INFINITY;
            for (int64_t t = 0; t < T; t++) {
                __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qr), load_bf16(keys + t * D));
                for (int64_t i = 16; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i), load_bf16(keys + t * D + i), acc);
                p[t] = _mm512_reduce_add_ps(acc) * scale;
                top = p[t] > top ? p[t] : top;
            }
            float total = 0;
            for (int64_t t = 0; t < T; t++) total += (p[t] = expf(p[t] - top));
            for (int64_t i = 0; i < D; i += 16) {  // 16 output values at a time, summed in a register
                __m512 o = _mm512_setzero_ps();
                for (int64_t t = 0; t < T; t++) o = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), load_bf16(values + t * D + i), o);
                _mm256_storeu_si256((__m256i*)(out + bh * D + i), to_bf16(_mm512_div_ps(o, _mm512_set1_ps(total))));
            }
        }
    }
}
