"""Batch-1 GEMV for 2-, 3-, 4- and 8-bit group-wise integer weights in CUDA C++, one launch per layer.

Why another kernel: the Triton kn GEMV (:mod:`leanq.kernels.triton_kn`) splits K over thousands of
programs and adds into an fp32 scratch vector, so every layer costs two launches (the GEMV and a
finishing kernel); it stays at 43-63% of the copy bandwidth on the H100.  Here each warp owns whole
rows: no split-K, no atomics, no second kernel (benchmarks/kernels/NOTES.md, v8).

Layout ("rk", row-major): words [N, KU * 4] int32, KU 16-byte chunks per row, CPC = 128 / bits codes per
chunk.  Inside a word of E = 32 / bits codes, code 2i sits at bits ``bits * i`` and code 2i + 1 at
``16 + bits * i``: every code lies in the low 10 bits of its 16-bit half (after one shift of the word for
the upper fields), so one AND (8-bit: one byte permute) leaves a pair of fp16 subnormals
q * 2**(pos - 24), exact, where pos is the code's bit position.  Group scale and zero point of each
(row, group): one int32 ``(scale bits << 16) | zero`` (the stored fp16 or bf16 scale bits).

3-bit rows hold 64 codes per chunk in six words: four in a 16-byte plane (the row's KU chunks, KU even), then two
in an 8-byte plane after it. Pair p < 30 of a chunk (codes 2p, 2p + 1) is field f = p % 5 of word p / 5, whole in
each 16-bit half: at bit 3f for f < 3, at bit 9 + 3 (f - 3) for f = 3, 4 (read from the word >> 9), so one AND
leaves the subnormal q * 2**(pos - 24) as for the other widths, two instructions per pair with the FMA. The spare
bits 15 and 31 of words 3j, 3j + 1, 3j + 2 hold bit 0, 1, 2 of pair 30 + j's codes, assembled at bit 0 (three
shifts, three ANDs or ORs). Before (sessions 9-19) the codes' low two bits and top bits sat in separate planes,
joined by one more AND-OR per pair.

Per block:

1. every thread issues the loads of its first activations (launch option ``xf``, on by default: before the weights,
   so that these L2 hits do not queue behind DRAM reads), then every warp the loads of its first tile (R rows x U
   chunks per lane, 16 bytes each) at once;
2. meanwhile the block stages the activations in shared memory, a thread per 8 values: per chunk,
   e with max |x| <= 2**e (a power of two: exact), each fp16 pair x * 2**(15 - pos - e) for the position
   of the codes it meets, and the chunk's sum of x with 2**(9 + e) in a spare 16 bytes (chunks at an odd
   stride of 16-byte units, so a quarter-warp's reads fall on distinct banks); with launch option ``xs`` (the
   default) what is fixed per thread (its unit of the chunk, the pairs' exponent bases) is computed once and the
   chunk's max and sum are shared by full-warp shuffles; with launch option ``xp`` (2- and 8-bit defaults, rows
   of more than one tile) each warp requests the rest of its first row group into the L2 between x's loads and
   their conversion, so that the DRAM keeps streaming while x is staged;
3. per chunk and row, one fp16x2 FMA per code pair into one sum (products q * x * 2**(-9 - e) of at most
   16 pairs: no overflow, no zero point), then in fp32 ``acc += scale * (2**(9 + e) * sum - zero * sum x)``;
   the next tile's loads are issued before this tile's arithmetic (launch option ``lt``, the default: where that tile
   lies wholly inside the rows and the row's chunks, without a predicate per load and from two pointers a row);
4. a warp's R sums are reduced with shuffles; y = acc (+ bias), in the activation dtype.

Warps walk row groups ``blockIdx.x * WARPS + warp`` stepping by the grid, and the grid holds no more
blocks than the GPU runs at once (the driver's occupancy), so each block stages x once.  Batches 2-16 with
fp16/bf16 activations run on tensor cores from the same words (:mod:`leanq.kernels.cuda_int_mma`); larger
batches (prefill, batched serving) take a GEMM on the same words: 4-bit layers from 64 rows on Hopper's wgmma
(:mod:`leanq.kernels.cuda_int_wgmma`), else the Triton GEMM (:mod:`leanq.kernels.triton_gemm`), else they
dequantize to the activation dtype (``int_dequant``) and call cuBLAS.  Compiled at first use
through NVRTC and launched through the driver (:mod:`leanq.kernels.cuda_rt`); under torch.compile one
custom op, ``leanq::cuda_int_linear``.  Where NVRTC is missing or fails, the Triton kernels serve
(``LEANQ_CUDA_INT=0`` chooses them).  The oracle is :func:`reference_rk` (and the stored format's own
dequantize).  :func:`release_stored_rk` hands a model's layers to this kernel alone (inference).
"""

from __future__ import annotations

import functools
import inspect
import sys
import types

import torch

from ..formats.intq import group_size_of, num_groups
from ..formats.packing import unpack
from . import Kernel, cached_layout, drop_stored, int_layer_for, register_kernel
from . import cuda_int_mma, cuda_int_wgmma, decode_attention, rope_cache
from .cuda_rt import (PRELUDE, XT, Launcher, device_index, nvrtc_available, on_device_of, pdl_mode, sm90,
                      sm_count)

BITS = (2, 3, 4, 8)
# threads per block, rows per warp, chunks per lane per tile, next tile prefetched, cap on blocks per SM (None: as
# many as the SM holds)
DEFAULT_CFG = dict(threads=256, r=2, u=2, pf=1, bps=None, xs=1)
# the streaming form (int_gemv_stream, sm_90) by bits where it would be the default: threads, tiles in flight per
# warp, chunks per lane. Empty: on an H100 it measured slower than the per-warp form at every width (NOTES.md, v10).
STREAM: dict = {}
# by bits: the best geometric mean over the five Llama shapes in H200 sweeps of bench_cuda_int.py with gd 1
# (programmatic dependent launch, sm_90 on: each warp's first tile loaded while the kernel before ends), which
# measured 8-30% faster than the H100-tuned configs without it in a chain of launches (benchmarks/kernels/NOTES.md,
# v15); with it, more bytes per first tile paid (4-bit u 4 over u 2). 4-bit r 2 u 4 (two rows per warp, each x
# value read from shared memory once for both) beat r 1 u 4 on all five shapes in session 19 (NOTES.md, v20).
# xf 1 (x's first staging loads before the first weight tile, v14) serves where gd is off (before sm_90). 3-bit: with
# the one-AND fields (session 20) r 2 u 2 stayed the best of eight geometries (NOTES.md, v21).
# xs 1 (the staging's lean form, session 23: the same bytes in fewer instructions) measured 0-1.5% faster at 4-bit,
# 1.5-2% at 3-bit on the 4096-row long-K shapes, 2-6% at 8-bit, and -2% to +3% at 2-bit over two calls on the five
# shapes (NOTES.md, v24). xp 2 (the rest of each warp's first row group requested into the L2 while x is staged,
# session 31): 2-bit 0.3-0.7 us faster on the long-K 4096-row shapes, 8-bit 0.6-1.3 us on every large shape (91-96%
# of copy); 4- and 3-bit within +-0.15 us then (NOTES.md, v32). lt 1 (the next tile's loads without a predicate
# each wherever the tile is whole, session 32; the same bytes): 0.01-0.32 us faster on 18 of the 20 width and shape
# pairs in one call, 2- and 3-bit 4096x4096 within +0.02 us (NOTES.md, v33). Under lt 1, 4-bit xp 2 took 4096x14336
# from 10.03 to 9.64 us in two calls, 4096x11008 +0.04 us, the rest unchanged (one-tile rows do not build it), so 4-bit
# has it too; 3-bit under lt 1 stayed within 0.1 us with it in a call of session 33 (NOTES.md, v34), so without.
TUNED: dict = {4: dict(threads=512, r=2, u=4, pf=1, bps=None, xf=1, gd=1, xs=1, lt=1, xp=2),
               2: dict(threads=512, r=2, u=2, pf=1, bps=None, xf=1, gd=1, xs=1, xp=2, lt=1),
               8: dict(threads=512, r=1, u=4, pf=1, bps=None, xf=1, gd=1, xs=1, xp=2, lt=1),
               3: dict(threads=512, r=2, u=2, pf=1, bps=None, xf=1, gd=1, xs=1, lt=1)}
# by (bits, N, K), on parts with 132 SMs (the H100 SXM and the H200): a geometry that beat the width's tuned config at
# that very shape in two calls of session 32 on an H200 (NOTES.md, v33), over the TUNED config. 4-bit 4096 x 4096
# (o_proj of a Llama-2-7B / Llama-3-8B): r 2 u 2, 3.89 against 4.43 us (also ahead in every sweep since session 14);
# 2-bit 11008 x 4096: r 3 u 2, 5.88-5.91 against 6.27-6.30 us; 2-bit 14336 x 4096: r 4 u 1, 6.81-6.83 against 7.03 us.
# Session 33 (two calls each, NOTES.md v34), 4096 x 4096 at r 2 u 1 (each row in tiles of 32 chunks): 2-bit 3.1 against
# 3.5 us, 3-bit 3.7 against 4.0-4.1 us.
SHAPES: dict = {(4, 4096, 4096): dict(r=2, u=2), (2, 4096, 4096): dict(r=2, u=1), (3, 4096, 4096): dict(r=2, u=1),
                (2, 11008, 4096): dict(r=3, u=2), (2, 14336, 4096): dict(r=4, u=1)}

# what the batch-1 GEMV's staging computes from its inputs before the products (launch option ``pro``): 0 x itself;
# 1 an RMSNorm folded in, x * g staged and every row's sum scaled by rsqrt(mean x**2 + eps) (g: the norm's weight,
# in x's dtype); 2 SiLU x up folded in, silu(a) * b staged from x = [a | b] (2K values). Used where
# :func:`fold_decoder` folds a decoder layer (release_stored_rk's default).
PROLOGUES = (0, 1, 2)

_SRC = r"""
#if BITS == 3
#define E 16         // 3-bit: 64 codes per chunk, in 16 bytes of the row's first plane and 8 bytes of its second
                     // (the second plane after the row's first)
#else
#define E (32 / BITS)
#endif
#define CPC (4 * E)      // codes per 16-byte chunk of a row
#define S (CPC / 8)      // 16-byte units of fp16 activations per chunk
#define NF (E / 2)       // code pairs per word
#define NPAIR (CPC / 2)
#define WARPS (THREADS / 32)

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
  u32 d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s)); return d;
}
// chunk c's S 16-byte units of staged activations start at unit c * (S + 1): an odd stride, so the units that
// the 8 lanes of a quarter-warp read at one step fall on distinct banks; the spare 16 bytes hold the chunk's sum
#define CST (S + 1)

// field f of a word: its bit position inside the (possibly shifted) word, and whether it reads the word >> SH.
// Every field lies in the low 10 bits of its half, so masking alone leaves an fp16 subnormal q * 2**(pos - 24).
#if BITS == 4
#define SH 8
__device__ __forceinline__ constexpr int fpos(int f) { return 4 * (f & 1); }
__device__ __forceinline__ constexpr bool fsh(int f) { return f >= 2; }
#elif BITS == 3
#define SH 9
__device__ __forceinline__ constexpr int fpos(int f) { return f < 3 ? 3 * f : 3 * (f - 3); }  // f: a word's field 0-4
__device__ __forceinline__ constexpr bool fsh(int f) { return f >= 3; }
#elif BITS == 2
#define SH 10
__device__ __forceinline__ constexpr int fpos(int f) { return f < 5 ? 2 * f : 2 * (f - 5); }
__device__ __forceinline__ constexpr bool fsh(int f) { return f >= 5; }
#else
#define SH 0
__device__ __forceinline__ constexpr int fpos(int f) { return 0; }
__device__ __forceinline__ constexpr bool fsh(int f) { return false; }
#endif
#define QMASK ((1u << BITS) - 1u)
// the bit position of pair p of a chunk (the staged activations of pair p are scaled for it); 3-bit: pairs 0-29
// are fields p % 5 of the words, pairs 30 and 31 are assembled from the spare bits at position 0
#if BITS == 3
// (p need not be a constant: the staging's index is not) 2 bits per pair p of fpos(p % 5) / 3, 0 for pairs 30, 31
__device__ __forceinline__ constexpr int ppos(int p) { return 3 * (int)((0x0491244912449124ull >> (2 * p)) & 3u); }
#else
__device__ __forceinline__ constexpr int ppos(int p) { return fpos(p % NF); }
#endif
// 16-byte units per row of the words: 3-bit rows hold KU 16-byte chunks of the first plane, then KU 8-byte chunks of
// the second (KU even, so rows stay 16-byte aligned)
#define ROWU(KU) (BITS == 3 ? (KU) / 2 * 3 : (KU))
#define HPTR(wr, c) ((const uint2*)((wr) + KU) + (c))  // 3-bit: chunk c of the second plane
__device__ __forceinline__ uint2 ldw2(const uint2* p) {
  uint2 r;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}

// the R x U chunks of the tile (row group rg, chunks from c0) of this warp (zeros past the rows / the row end):
// 16-byte loads, and each chunk's group word (group = chunk >> GCS)
__device__ __forceinline__ void load_tile(uint4 (&q)[R][U], uint2 (&qh)[R][U], u32 (&s)[R][U],
                                          const uint4* __restrict__ w, const u32* __restrict__ sz, int rg, int c0,
                                          int N, int KU, int NG, int GCS, int lane, int ce) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = rg * R + r;
    const uint4* wr = w + (size_t)row * ROWU(KU);
    const u32* sr = sz + (size_t)row * NG;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + lane + 32 * u;
      const bool ok = row < N && c < ce;
      q[r][u] = ok ? ldw(wr + c) : make_uint4(0u, 0u, 0u, 0u);
#if BITS == 3
      qh[r][u] = ok ? ldw2(HPTR(wr, c)) : make_uint2(0u, 0u);
#endif
      s[r][u] = ok ? __ldg(sr + (c >> GCS)) : 0u;
    }
  }
}
#if LT
// launch option lt (lean loads): a tile wholly inside the rows and the row's chunks (every tile but a long
// row's last) is loaded without a predicate per load, each row's two pointers formed once and the loads at constant
// offsets from them: (c0 + lane + 32 u) >> GCS = ((c0 + lane) >> GCS) + ((32 u) >> GCS) for GCS <= 5, as c0 is a
// multiple of 32. Other tiles take load_tile. The same words as load_tile's
__device__ __forceinline__ void load_tile_lt(uint4 (&q)[R][U], uint2 (&qh)[R][U], u32 (&s)[R][U],
                                             const uint4* __restrict__ w, const u32* __restrict__ sz, int rg, int c0,
                                             int N, int KU, int NG, int GCS, int lane, int ce) {
  if ((rg + 1) * R <= N && c0 + 32 * U <= ce && GCS <= 5) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = rg * R + r;
      const uint4* wr = w + (size_t)row * ROWU(KU);
      const uint4* wp = wr + (c0 + lane);
      const u32* sp = sz + (size_t)row * NG + ((c0 + lane) >> GCS);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        q[r][u] = ldw(wp + 32 * u);
#if BITS == 3
        qh[r][u] = ldw2(HPTR(wr, c0 + lane + 32 * u));
#endif
        s[r][u] = __ldg(sp + ((32 * u) >> GCS));
      }
    }
  } else {
    load_tile(q, qh, s, w, sz, rg, c0, N, KU, NG, GCS, lane, ce);
  }
}
#endif


// activations 8u .. 8u + 7 one at a time (zeros past K): when K % 8 != 0 or x is not 16-byte aligned
__device__ __forceinline__ void load8(float (&v)[8], const void* XR x, int u, int K) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = 8 * u + i < K ? ldx(x, 8 * u + i) : 0.f;
}

// per chunk and row: A = sum over the chunk of (q * 2**(pos-24)) * (x * 2**(15-pos)) = 2**-9 sum q x in fp16x2
// (subnormal codes times pre-scaled activations, one fp16x2 sum of 16 products at most), then in fp32
// acc += scale * (2**9 A - z * X), X = the chunk's activation sum (staged with the activations)
// 3-bit: six words (q, then qh), five fields each as above, then pairs 30 and 31 from the spare bits 15 and 31 of
// words 3j .. 3j + 2 (bit b of each code in word 3j + b), assembled at bit 0
__device__ __forceinline__ u32 chunk_pairs(const uint4 q, const uint2 qh, const u32 (&xh)[NPAIR]) {
#if BITS == 3
  const u32 w6[6] = {q.x, q.y, q.z, q.w, qh.x, qh.y};
  u32 a3 = 0u;
#pragma unroll
  for (int wi = 0; wi < 6; ++wi) {
    const u32 sh = w6[wi] >> SH;
#pragma unroll
    for (int f = 0; f < 5; ++f) a3 = hfma2((fsh(f) ? sh : w6[wi]) & (0x00070007u << fpos(f)), xh[5 * wi + f], a3);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const u32 v = ((w6[3 * j] >> 15) & 0x00010001u) | ((w6[3 * j + 1] >> 14) & 0x00020002u)
                  | ((w6[3 * j + 2] >> 13) & 0x00040004u);
    a3 = hfma2(v, xh[30 + j], a3);
  }
  return a3;
#else
  (void)qh;
  const u32 wd[4] = {q.x, q.y, q.z, q.w};
  u32 a = 0u;
#pragma unroll
  for (int wi = 0; wi < 4; ++wi) {
#if BITS != 8
    const u32 sh = wd[wi] >> SH;
#endif
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int p = wi * NF + f;
#if BITS == 8
      const u32 v = prmt(wd[wi], 0u, f == 0 ? 0x4240u : 0x4341u);
#else
      const u32 v = (fsh(f) ? sh : wd[wi]) & ((QMASK | (QMASK << 16)) << fpos(f));
#endif
      a = hfma2(v, xh[p], a);
    }
  }
  return a;
#endif
}

// chunk c's staged activations (fp16 pairs), and P = 2**(9 + e) and the chunk's sum of x from its spare unit
__device__ __forceinline__ void chunk_x(u32 (&xh)[NPAIR], float& P, float& X, const uint4* xs, int c) {
  const uint4* xc = xs + c * CST;
#pragma unroll
  for (int j = 0; j < S; ++j) {
    const uint4 v = xc[j];
    xh[4 * j] = v.x; xh[4 * j + 1] = v.y; xh[4 * j + 2] = v.z; xh[4 * j + 3] = v.w;
  }
  const uint4 pad = xc[S];
  P = __uint_as_float(pad.x); X = __uint_as_float(pad.y);
}

// acc plus the chunk's term of the row sum, scale * (2**9 A - z * X); the zero point as float from its bits under
// 2**23's exponent, minus 2**23 (exact, no int-to-float conversion)
__device__ __forceinline__ float chunk_acc(float acc, u32 a, u32 s, float P, float X) {
  const float z = __uint_as_float(0x4B000000u | (s & 0xFFFFu)) - 8388608.f;
  return fmaf(scale_of(s), fmaf(P, h2sum(a), -z * X), acc);
}

__device__ __forceinline__ void compute_tile(float (&acc)[R], const uint4 (&q)[R][U], const uint2 (&qh)[R][U],
                                             const u32 (&s)[R][U], const uint4* xs, int c0, int lane, int ce) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + lane + 32 * u;
    if (c >= ce) continue;
    u32 xh[NPAIR];
    float P, X;
    chunk_x(xh, P, X, xs, c);
#pragma unroll
    for (int r = 0; r < R; ++r) {
#if ABLATE & 1
      acc[r] += __uint_as_float((q[r][u].x ^ q[r][u].y ^ q[r][u].z ^ q[r][u].w ^ s[r][u] ^ xh[0]) & 0x3F7FFFFFu) * P;
      continue;
#endif
      acc[r] = chunk_acc(acc[r], chunk_pairs(q[r][u], qh[r][u], xh), s[r][u], P, X);
    }
  }
}

// activations, a thread per chunk: its CPC values x (fp32), m = max |x| <= 2**e (a power of two: exact), the
// S units of fp16 pairs x * 2**(15 - pos - e) (pos: the bit position of the field holding the pair's codes),
// and in the spare unit P = 2**(9 + e) and the chunk's sum of x
// a thread per 16-byte unit (8 values; a chunk's S units on S neighbouring lanes, which share their max and sum
// by shuffles), SB units per thread at a time with all their loads issued first
// one step of the staging: the 16-byte loads of SB units per thread, from unit u0 (issued together) ...
__device__ __forceinline__ void x_load(uint4 (&raw)[SB][XW], const void* XR x, int u0, int K, int KU,
                                       int XVEC) {
#pragma unroll
  for (int b = 0; b < SB; ++b) {
    const int u = u0 + b * THREADS + threadIdx.x;
#pragma unroll
    for (int i = 0; i < XW; ++i) raw[b][i] = XVEC && u < KU * S && 8 * u + 8 <= K ? ((const uint4*)x)[XW * u + i]
                                                                              : make_uint4(0u, 0u, 0u, 0u);
  }
}
#if XS
// activations 8u .. 8u + 7 as raw bits (zeros past K), in the layout of the step's 16-byte loads
__device__ __forceinline__ void load8raw(uint4 (&r)[XW], const void* XR x, int u, int K) {
  u32 e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#if XT == 0
    e[i] = 8 * u + i < K ? __float_as_uint(((const float*)x)[8 * u + i]) : 0u;
  r[0] = make_uint4(e[0], e[1], e[2], e[3]);
  r[1] = make_uint4(e[4], e[5], e[6], e[7]);
#else
    e[i] = 8 * u + i < K ? (u32)((const u16*)x)[8 * u + i] : 0u;
  r[0] = make_uint4(e[0] | (e[1] << 16), e[2] | (e[3] << 16), e[4] | (e[5] << 16), e[6] | (e[7] << 16));
#endif
}
// unit u's raw words: the step's 16-byte loads where they applied, else its values one at a time
__device__ __forceinline__ void unit_raw(uint4 (&r)[XW], const uint4 (&loaded)[XW], const void* XR x, int u, int K,
                                         int XVEC) {
  if (XVEC && 8 * u + 8 <= K) {
#pragma unroll
    for (int i = 0; i < XW; ++i) r[i] = loaded[i];
  } else {
    load8raw(r, x, u, K);
  }
}
#endif
// ... and their scaled fp16 pairs and chunk sums into shared memory. Unit u of the activations is unit j = u % S of
// chunk c = u / S. XS 1 (launch option ``xs``, the default; the same bytes as XS 0, the form before session 23, in
// fewer instructions): THREADS is a multiple of S and every step starts at a multiple of S, so j, the exponent bits
// 2**(15 - pos) of its four pairs and whether it writes the chunk's spare unit are the same in every step: computed
// once. Whole warps past the end leave the step (a warp-uniform test); lanes of a warp's last chunk past KU compute on
// zeros and store nothing, so the max and sum shuffles take the full mask (XS 0 builds the chunk's lane mask each
// time). The element-load fallback builds the same raw words as the 16-byte loads, so both paths widen them alike.
// PRO (launch option ``pro``; XS only): what is staged is not x itself. PRO 1: x * g (g: a norm's weight, second
// pointer p2), and each thread's sum of x**2 into ss (the block then scales every row's sum by rsqrt(mean x**2 +
// eps): an RMSNorm folded in). PRO 2: silu(a) * b, a = x[0, K), b = x[K, 2K) (p2 = x + K): SiLU x up folded in.
__device__ __forceinline__ void x_store(uint4* xs, const uint4 (&raw)[SB][XW], const void* XR x, int u0,
                                        int K, int KU, int XVEC, int lane, const uint4 (&raw2)[SB][XW],
                                        const void* XR p2, float& ss) {
#if XS
  const int j = threadIdx.x & (S - 1);
  u32 pb[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) pb[i] = (u32)(127 + 15 - ppos(4 * j + i)) << 23;
  const u32 gm = 0xffffffffu;
#endif
#pragma unroll
  for (int b = 0; b < SB; ++b) {
#if XS
    const int w0 = u0 + b * THREADS + (threadIdx.x & ~31);
    if (w0 >= KU * S) break;
    const int u = w0 + lane, c = (int)((unsigned)u / S);
    uint4 rr[XW];
    unit_raw(rr, raw[b], x, u, K, XVEC);
    float v[8];
    unpack8(v, rr);
#if PRO
    {
      uint4 r2[XW];
      unit_raw(r2, raw2[b], p2, u, K, XVEC);
      float g[8];
      unpack8(g, r2);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#if PRO == 1
        ss = fmaf(v[i], v[i], ss);
        v[i] *= g[i];
#else
        // silu(a) = a / (1 + e**-a); e**-a clamped to e**80, where the fast division is still exact enough
        v[i] = __fdividef(v[i], 1.f + __expf(fminf(-v[i], 80.f))) * g[i];
#endif
      }
    }
#endif
    const bool st = c < KU;
#else
    const int u = u0 + b * THREADS + threadIdx.x;
    if (u >= KU * S) break;
    const int c = u / S, j = u % S;
    float v[8];
    if (XVEC && 8 * u + 8 <= K) unpack8(v, raw[b]);
    else load8(v, x, u, K);
    const u32 gm = ((1u << S) - 1u) << (lane & ~(S - 1));
    u32 pb[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) pb[i] = (u32)(127 + 15 - ppos(4 * j + i)) << 23;
    const bool st = true;
#endif
#if ABLATE & 2
    if (st) {
      xs[c * CST + j] = make_uint4(u, 0u, 0u, 0u);
      if (j == 0) xs[c * CST + S] = make_uint4(0x3F800000u, 0u, 0u, 0u);
    }
    continue;
#endif
    float m = 0.f, tot = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) { m = fmaxf(m, fabsf(v[i])); tot += v[i]; }
#pragma unroll
    for (int o = 1; o < S; o <<= 1) {
      m = fmaxf(m, __shfl_xor_sync(gm, m, o));
      tot += __shfl_xor_sync(gm, tot, o);
    }
    // m <= 2**e, e from m's exponent field; a chunk of zeros (or subnormals) keeps e = 0
    int e = (int)((__float_as_uint(m) >> 23) & 0xFFu) - 126;
    e = m >= 1.17549435e-38f ? min(max(e, -100), 100) : 0;
    const u32 eb = (u32)e << 23;
    u32 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float ps = __uint_as_float(pb[i] - eb);  // 2**(15 - pos - e)
      h[i] = f2h2(v[2 * i] * ps, v[2 * i + 1] * ps);
    }
    if (st) {
      xs[c * CST + j] = make_uint4(h[0], h[1], h[2], h[3]);
      if (j == 0)
        xs[c * CST + S] = make_uint4(__float_as_uint(__uint_as_float((u32)(127 + 9 + e) << 23)), __float_as_uint(tot), 0u, 0u);
    }
  }
}
// the staging steps from unit ``from`` on
__device__ __forceinline__ void stage_x(uint4* xs, const void* XR x, int K, int KU, int XVEC, int lane,
                                        const void* XR p2, float& ss, int from = 0) {
  for (int u0 = from; u0 < KU * S; u0 += SB * THREADS) {
    uint4 raw[SB][XW];  // the 16-byte loads of SB units (XVEC), in flight together
    uint4 raw2[SB][XW];  // PRO: the second vector's (unused otherwise)
    x_load(raw, x, u0, K, KU, XVEC);
#if PRO
    x_load(raw2, p2, u0, K, KU, XVEC);
#endif
    x_store(xs, raw, x, u0, K, KU, XVEC, lane, raw2, p2, ss);
  }
}

#if XP
// launch option xp: tiles 1 .. XP of the warp's first row group rg requested into the L2 (prefetch.global.L2: no
// registers held, nothing returned), issued once x's first staging loads are out, so that the DRAM keeps streaming
// this warp's weights while x is converted; the loop's own loads of those tiles then meet them in the L2. Every
// 128-byte line of each row's range (the first plane only at 3 bits), lanes taking lines in turn. Not past the
// first row group: requests for the next row groups (a 4096-column layer: one tile a row) measured slower
__device__ __forceinline__ void prefetch_tiles(const uint4* __restrict__ w, int rg, int TPR, int N, int KU, int cb,
                                               int ce, int lane) {
  constexpr int LPR = 4 * U + 1;  // the most 128-byte lines a row's 32 * U chunks touch
#pragma unroll 1
  for (int tk = 1; tk <= XP && tk < TPR; ++tk) {
    const int c0 = cb + tk * 32 * U, c1 = min(c0 + 32 * U, ce);
    for (int i = lane; i < R * LPR; i += 32) {
      const int row = rg * R + i / LPR;
      if (row >= N || c0 >= c1) continue;
      const uint4* wr = w + (size_t)row * ROWU(KU);
      const size_t a = ((size_t)(wr + c0) & ~(size_t)127) + (size_t)128 * (i % LPR);
      if (a <= (size_t)(wr + c1 - 1)) asm volatile("prefetch.global.L2 [%0];" :: "l"(a));
    }
  }
}
#endif
extern "C" __global__ void __launch_bounds__(THREADS) int_gemv(
    const void* XR x, void* __restrict__ out, const void* __restrict__ bias,
    const uint4* __restrict__ w, const u32* __restrict__ sz, int N, int K, int KU, int NG, int GCS, int HAS_BIAS,
    int XVEC, const void* XR aux, float eps)
{
  extern __shared__ uint4 xs[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int NRG = (N + R - 1) / R;
#if PRO && (SPLIT == 2 || !XS)
#error "pro needs sp 1 and xs 1"
#endif
  // PRO 1: p2 the norm's weight (x's dtype); PRO 2: the second half of x (b of silu(a) * b)
  const void* XR p2 = PRO == 2 ? (const void*)((const char*)x + (size_t)K * (XT == 0 ? 4 : 2)) : aux;
  float ss = 0.f;  // PRO 1: this thread's sum of x**2
#if SPLIT == 2
  // warps 2i and 2i + 1 share each row group: the first half of its chunks and the second, their sums meeting in
  // shared memory at the row's end (named barrier 1 + i, a slot per row-round parity). Meant to even out the last
  // round of rows (14336 rows over 4224 warps leave it 39% full); measured slower than one warp per row at every
  // width and shape on an H100 (benchmarks/kernels/NOTES.md, v10), so launch option ``sp`` stays 1 by default.
  const int pair = warp >> 1, part = warp & 1, KH = (KU + 1) >> 1;
  const int cb = part ? KH : 0, ce = part ? KU : KH;
  const int rg0 = blockIdx.x * (WARPS / 2) + pair, rstep = gridDim.x * (WARPS / 2);
  float* red = (float*)(xs + KU * CST);  // [2][WARPS / 2][R]
  int rnd = 0;
#else
  const int cb = 0, ce = KU;
  const int rg0 = blockIdx.x * WARPS + warp, rstep = gridDim.x * WARPS;
#endif
#if SPLIT == 2
  const int TPR = max(1, (ce - cb + 32 * U - 1) / (32 * U));  // tiles per row group (an empty half: one, empty)
#else
  const int TPR = (KU + 32 * U - 1) / (32 * U);  // tiles per row group
#endif

  uint4 q[R][U];
  uint2 qh[R][U];
  u32 s[R][U];
#if GD
  // programmatic dependent launch (launch option gd): this grid may start while the kernel before it in the stream
  // ends. The weights do not depend on that kernel, so each warp's first tile is loaded at once; x (that kernel's
  // output, in a decode) is read, and out written, only after gdc_wait, which every thread passes
  if (rg0 < NRG) load_tile(q, qh, s, w, sz, rg0, cb, N, KU, NG, GCS, lane, ce);
  gdc_wait();
#if GD == 1
  gdc_launch();  // the next grid may be scheduled now (its blocks take an SM as this grid's blocks leave)
#endif
#if XP
  {
    // x's first staging loads, then the next tiles' L2 requests, then x's conversion (stage_x's first step, split);
    // the launcher builds this only for rows of more than one tile
    uint4 xraw[SB][XW];
    uint4 xraw2[SB][XW];
    x_load(xraw, x, 0, K, KU, XVEC);
#if PRO
    x_load(xraw2, p2, 0, K, KU, XVEC);
#endif
    if (rg0 < NRG) prefetch_tiles(w, rg0, TPR, N, KU, cb, ce, lane);
    x_store(xs, xraw, x, 0, K, KU, XVEC, lane, xraw2, p2, ss);
  }
  stage_x(xs, x, K, KU, XVEC, lane, p2, ss, SB * THREADS);
#else
  stage_x(xs, x, K, KU, XVEC, lane, p2, ss);
#endif
#else
#if XF
  // the activations' first staging step is issued before the weights' first tile, so that its loads (L2 hits) do
  // not queue behind the tile's DRAM reads
  uint4 xraw[SB][XW];
  uint4 xraw2[SB][XW];
  x_load(xraw, x, 0, K, KU, XVEC);
#if PRO
  x_load(xraw2, p2, 0, K, KU, XVEC);
#endif
#endif
  if (rg0 < NRG) load_tile(q, qh, s, w, sz, rg0, cb, N, KU, NG, GCS, lane, ce);

#if XF
  x_store(xs, xraw, x, 0, K, KU, XVEC, lane, xraw2, p2, ss);
  stage_x(xs, x, K, KU, XVEC, lane, p2, ss, SB * THREADS);
#else
  stage_x(xs, x, K, KU, XVEC, lane, p2, ss);
#endif
#endif
  __syncthreads();
#if PRO == 1
  // the block's sum of x**2, in a fixed order (every block gets the same scale): warps' sums in WARPS floats after
  // the staged chunks
  {
    float* red1 = (float*)(xs + KU * CST);
#pragma unroll
    for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) red1[warp] = ss;
    __syncthreads();
    float tot = 0.f;
    for (int i = 0; i < WARPS; ++i) tot += red1[i];
    ss = rsqrtf(tot / (float)K + eps);  // from here on, the norm's scale
  }
#endif

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  // tiles in order: row groups rg0, rg0 + rstep, ...; inside each, K chunks from 0 in steps of 32 * U
  int rg = rg0, tk = 0;
  while (rg < NRG) {
    int rgn = rg, tkn = tk + 1;
    if (tkn == TPR) { tkn = 0; rgn += rstep; }
#if PF
    uint4 qn[R][U];
    uint2 qhn[R][U];
    u32 sn[R][U];
#if LT
    if (rgn < NRG) load_tile_lt(qn, qhn, sn, w, sz, rgn, cb + tkn * 32 * U, N, KU, NG, GCS, lane, ce);
#else
    if (rgn < NRG) load_tile(qn, qhn, sn, w, sz, rgn, cb + tkn * 32 * U, N, KU, NG, GCS, lane, ce);
#endif
#endif
    compute_tile(acc, q, qh, s, xs, cb + tk * 32 * U, lane, ce);
#if SPLIT == 2
    if (tkn == 0) {
      float* slot = red + ((rnd & 1) * (WARPS / 2) + pair) * R;
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int o = 16; o; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
        if (part == 1 && lane == r) slot[r] = acc[r];
      }
      asm volatile("bar.sync %0, 64;" :: "r"(1 + pair) : "memory");
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = rg * R + r;
        if (part == 0 && lane == r && row < N) {
          float y = acc[r] + slot[r];
          if (HAS_BIAS) y += ldx(bias, row);
          stx(out, row, y);
        }
        acc[r] = 0.f;
      }
      ++rnd;
    }
#else
    if (tkn == 0) {
#if PRO == 1
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] *= ss;
#endif
      finish_rows(acc, rg, lane, N, out, bias, HAS_BIAS, nullptr);
    }
#endif
    rg = rgn;
    tk = tkn;
#if PF
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) { q[r][u] = qn[r][u]; qh[r][u] = qhn[r][u]; s[r][u] = sn[r][u]; }
#else
    if (rg < NRG) load_tile(q, qh, s, w, sz, rg, cb + tk * 32 * U, N, KU, NG, GCS, lane, ce);
#endif
  }
}

// ---- the streaming form (sm_90, 2-, 4- and 8-bit: 1-D bulk copies into shared memory) ----
// The per-warp form with its weight loads replaced by bulk copies: each warp walks the same (row, tile) sequence,
// but lane 0 keeps ST tiles of 32 * U chunks in flight through cp.async.bulk into the warp's own ring of shared
// memory (one mbarrier per slot), so many more bytes are in flight per warp than registers could hold. The group
// words go through L1 one tile ahead. Measured on an H100 (benchmarks/kernels/NOTES.md, v10): 10-40% slower than
// the per-warp form at every width and shape, so the GEMV is not short of bytes in flight; it stays an option.
#define UB 16                      // bytes per unit (one chunk)
#define UC 1                       // chunks per unit
#define SEG (32 * U)               // units per tile
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void bulk_load(void* dst, const void* src, u32 bytes, unsigned long long* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void bar_wait(unsigned long long* bar, u32 parity) {
  asm volatile("{\n\t.reg .pred P1;\n\tLAB_WAIT:\n\t"
               "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n\t"
               "@P1 bra DONE;\n\tbra LAB_WAIT;\n\tDONE:\n\t}" :: "r"(smem_addr(bar)), "r"(parity) : "memory");
}
#endif
// the group words of this lane's units of tile (row, tk)
__device__ __forceinline__ void tile_groups(u32 (&s)[U][UC], const u32* __restrict__ sz, int row, int tk, int N,
                                            int UPR, int NG, int GCS, int lane) {
#pragma unroll
  for (int j = 0; j < U; ++j) {
    const int uu = tk * SEG + lane + 32 * j;
#pragma unroll
    for (int h = 0; h < UC; ++h) s[j][h] = row < N && uu < UPR ? __ldg(sz + (size_t)row * NG + ((uu * UC + h) >> GCS)) : 0u;
  }
}
extern "C" __global__ void __launch_bounds__(THREADS) int_gemv_stream(
    const void* XR x, void* __restrict__ out, const void* __restrict__ bias,
    const uint4* __restrict__ w, const u32* __restrict__ sz, int N, int K, int KU, int NG, int GCS, int HAS_BIAS,
    int XVEC)
{
#if __CUDA_ARCH__ >= 900 && BITS != 3
  // shared memory: per warp ST slots of SEG units | per warp ST mbarriers (8 bytes each, 16-byte padded) | staged x
  extern __shared__ __align__(128) uint4 smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint4* ring = smem + (size_t)warp * ST * SEG * (UB / 16);
  unsigned long long* bars = (unsigned long long*)(smem + (size_t)WARPS * ST * SEG * (UB / 16)) + warp * ST;
  uint4* xs = smem + (size_t)WARPS * ST * SEG * (UB / 16) + (WARPS * ST + 1) / 2;
  const int UPR = KU / UC, TPR = (UPR + SEG - 1) / SEG;  // units and tiles per row
  const int rstep = gridDim.x * WARPS;
  const char* wb = (const char*)w;
  // lane 0 issues tile `ni` of the warp's sequence (rows row0, row0 + rstep, ...; tiles 0 .. TPR - 1 of each)
  int irow = blockIdx.x * WARPS + warp, itk = 0, ni = 0;
  if (lane == 0) {
    for (int i = 0; i < ST; ++i)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(bars + i)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    for (; ni < ST && irow < N; ++ni) {
      bulk_load(ring + (size_t)ni * SEG * (UB / 16), wb + ((size_t)irow * UPR + (size_t)itk * SEG) * UB,
                (u32)min(SEG, UPR - itk * SEG) * UB, bars + ni);
      if (++itk == TPR) { itk = 0; irow += rstep; }
    }
  }
#if GD == 3
  // programmatic dependent launch, the next grid let in at once: nothing before the wait below reads or writes
  // memory another grid writes or reads (this grid's ring and barriers, the weights and their group words)
  gdc_launch();
#endif
  int row = blockIdx.x * WARPS + warp, tk = 0;
  u32 s[U][UC];
  tile_groups(s, sz, row, 0, N, UPR, NG, GCS, lane);
#if GD
  // the ring's first ST tiles and the first group words are on their way; x (the kernel before's output, in a
  // decode) is read, and out written, only after this
  gdc_wait();
#if GD == 1
  gdc_launch();
#endif
#endif
  float ss = 0.f;  // (no prologue in this form)
  stage_x(xs, x, K, KU, XVEC, lane, x, ss);
  __syncthreads();

  float acc = 0.f;
  for (int i = 0; row < N; ++i) {
    int rown = row, tkn = tk + 1;
    if (tkn == TPR) { tkn = 0; rown += rstep; }
    u32 sn[U][UC];
    tile_groups(sn, sz, rown, tkn, N, UPR, NG, GCS, lane);
    const int slot = i % ST;
    bar_wait(bars + slot, (u32)((i / ST) & 1));
    const uint4* ub0 = ring + (size_t)slot * SEG * (UB / 16);
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int uu = tk * SEG + lane + 32 * j;
      if (uu >= UPR) continue;
      const uint4* ub = ub0 + (lane + 32 * j) * (UB / 16);
#pragma unroll
      for (int h = 0; h < UC; ++h) {
        u32 xh[NPAIR];
        float P, X;
        chunk_x(xh, P, X, xs, uu * UC + h);
        acc = chunk_acc(acc, chunk_pairs(ub[h], make_uint2(0u, 0u), xh), s[j][h], P, X);
      }
    }
    __syncwarp();  // the warp is done with this slot: lane 0 refills it with the tile ST ahead
    if (lane == 0 && irow < N) {
      bulk_load(ring + (size_t)slot * SEG * (UB / 16), wb + ((size_t)irow * UPR + (size_t)itk * SEG) * UB,
                (u32)min(SEG, UPR - itk * SEG) * UB, bars + slot);
      if (++itk == TPR) { itk = 0; irow += rstep; }
    }
    if (tkn == 0) {  // the row is whole: reduce the warp's sums
#pragma unroll
      for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) {
        float y = acc;
        if (HAS_BIAS) y += ldx(bias, row);
        stx(out, row, y);
      }
      acc = 0.f;
    }
    row = rown; tk = tkn;
#pragma unroll
    for (int j = 0; j < U; ++j)
#pragma unroll
      for (int h = 0; h < UC; ++h) s[j][h] = sn[j][h];
  }
#endif
}

// the dense weight [N, K] in the activation dtype (prefill: batches above 1 run dequantize + cuBLAS); a thread
// per 16-byte chunk, its CPC values written 16 bytes at a time (one at a time in a chunk past K's end or when
// K's rows are not 16-byte aligned)
__device__ __forceinline__ u32 pack2(float lo, float hi) {
#if XT == 1
  return f2h2(lo, hi);
#else
  u32 d; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
#endif
}
extern "C" __global__ void int_dequant(void* __restrict__ out, const uint4* __restrict__ w, const u32* __restrict__ sz,
                                       int N, int K, int KU, int NG, int GCS)
{
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)N * KU) return;
  const int row = (int)(i / KU), c = (int)(i % KU);
  const uint4* wr = w + (size_t)row * ROWU(KU);
  const uint4 q = wr[c];
  const u32 s = sz[(size_t)row * NG + (c >> GCS)];
  const float sc = scale_of(s), z = (float)(s & 0xFFFFu);
  float v[CPC];
#if BITS == 3
  const uint2 qh = *HPTR(wr, c);
  const u32 w6[6] = {q.x, q.y, q.z, q.w, qh.x, qh.y};
#pragma unroll
  for (int p = 0; p < 32; ++p) {
    u32 lo = 0u, hi = 0u;
    if (p < 30) {
      const int f = p % 5, b = (fsh(f) ? SH : 0) + fpos(f);
      lo = (w6[p / 5] >> b) & 7u;
      hi = (w6[p / 5] >> (16 + b)) & 7u;
    } else {
#pragma unroll
      for (int b = 0; b < 3; ++b) {
        lo |= ((w6[3 * (p - 30) + b] >> 15) & 1u) << b;
        hi |= ((w6[3 * (p - 30) + b] >> 31) & 1u) << b;
      }
    }
    v[2 * p] = ((float)lo - z) * sc;
    v[2 * p + 1] = ((float)hi - z) * sc;
  }
#else
  const u32 wd[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int wi = 0; wi < 4; ++wi)
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int p = wi * NF + f;
      const u32 lo = (wd[wi] >> (BITS * f)) & QMASK, hi = (wd[wi] >> (16 + BITS * f)) & QMASK;
      v[2 * p] = ((float)lo - z) * sc;
      v[2 * p + 1] = ((float)hi - z) * sc;
    }
#endif
  const long long base = (long long)row * K + (long long)c * CPC;
  const bool vec = (c + 1) * CPC <= K && (K % (XT == 0 ? 4 : 8)) == 0;
  if (vec) {
#if XT == 0
#pragma unroll
    for (int j = 0; j < CPC; j += 4) *(float4*)((float*)out + base + j) = make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]);
#else
#pragma unroll
    for (int j = 0; j < CPC; j += 8)
      *(uint4*)((u16*)out + base + j) = make_uint4(pack2(v[j], v[j + 1]), pack2(v[j + 2], v[j + 3]),
                                                   pack2(v[j + 4], v[j + 5]), pack2(v[j + 6], v[j + 7]));
#endif
  } else {
#pragma unroll
    for (int j = 0; j < CPC; ++j)
      if (c * CPC + j < K) stx(out, base + j, v[j]);
  }
}
"""


def source(bits: int, xt: int, threads: int, r: int, u: int, pf: int, sbf16: bool, ablate: int = 0, sb: int = 4,
           st: int = 4, sp: int = 1, xf: int = 0, gd: int = 0, xs: int = 0, pro: int = 0, xp: int = 0,
           lt: int = 0) -> str:
    """The CUDA source of one configuration (its constants as #defines): ``sb`` activation units per thread per
    staging step (their loads in flight together); ``gd`` programmatic dependent launch (int_gemv: 1 the first
    weight tile loaded before the wait for the previous grid and the next grid let in after it, 2 the same but the
    next grid let in only as this one ends; the launcher must pass ``pdl`` for it to overlap anything); ``xs`` 1 the
    staging's per-thread constants computed once and its shuffles on the full mask (the same bytes); ``pro`` what
    the staging computes from its inputs (int_gemv only, with ``xs`` 1 and ``sp`` 1; see :data:`PROLOGUES`); ``xp``
    (int_gemv with ``gd``) tiles 1 .. xp of the warp's first row group requested into the L2 after x's first
    staging loads; ``lt`` 1 (int_gemv with ``pf`` 1 and ``sp`` 1; the same bytes) the next tile's loads without a
    predicate each where the tile lies wholly inside the rows and the row's chunks.

    ``ablate`` (timing experiments only; the results are wrong): bit 1 no decode or dot products (the loaded
    words are only XOR-ed), bit 2 no activation staging."""
    assert bits in BITS and threads % 32 == 0 and 1 <= r <= 32 and u >= 1, (bits, threads, r, u)
    assert sp == 1 or (sp == 2 and threads % 64 == 0 and threads <= 960), (sp, threads)  # a named barrier per pair
    assert pf in (0, 1), pf  # a ring of two tiles ahead measured slower on an H200 (NOTES.md, v14; commit 1a92040)
    assert gd in (0, 1, 2, 3), gd  # 3: int_gemv_stream only (the next grid let in at the start)
    assert pro in PROLOGUES and (pro == 0 or (xs == 1 and sp == 1)), (pro, xs, sp)
    assert xp >= 0 and (xp == 0 or gd in (1, 2)), (xp, gd)
    assert lt in (0, 1) and (lt == 0 or (pf == 1 and sp == 1)), (lt, pf, sp)
    defs = dict(BITS=bits, XT=xt, THREADS=threads, R=r, U=u, PF=int(pf), SBF16=int(sbf16), ABLATE=ablate, SB=sb, ST=st,
                SPLIT=sp, XF=int(xf), GD=int(gd), XS=int(xs), PRO=int(pro), XP=int(xp), LT=int(lt))
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + _SRC


def available() -> bool:
    return nvrtc_available("LEANQ_CUDA_INT")


@functools.lru_cache(maxsize=None)
def _compiled(bits: int, xt: int, threads: int, r: int, u: int, pf: int, sbf16: bool, device: int,
              name: str = "int_gemv", ablate: int = 0, sb: int = 4, st: int = 4, sp: int = 1,
              xf: int = 0, gd: int = 0, xs: int = 0, pro: int = 0, xp: int = 0, lt: int = 0) -> Launcher:
    src = source(bits, xt, threads, r, u, pf, sbf16, ablate, sb, st, sp, xf, gd, xs, pro, xp, lt)
    with torch.cuda.device(device):
        return Launcher(torch.cuda._compile_kernel(src, name), "cuda-int")


# ---------------------------------------------------------------------------
# layout


def codes_per_chunk(bits: int) -> int:
    """Codes per 16-byte chunk of a row (3-bit: per 16-byte chunk of its first plane, with 8 bytes of its second)."""
    return 64 if bits == 3 else 4 * (32 // bits)


def chunks_per_row(bits: int, in_features: int) -> int:
    """KU: a row's chunks (3-bit: an even number, so that rows of 24-byte chunks stay 16-byte aligned)."""
    ku = -(-in_features // codes_per_chunk(bits))
    return ku + (ku & 1) if bits == 3 else ku


def words_per_row(bits: int, ku: int) -> int:
    """int32 words per row of the layout: 4 per chunk (3-bit: 6, the first plane's 4 then the second plane's 2)."""
    return ku * (6 if bits == 3 else 4)


def group_ok(group: int, bits: int) -> bool:
    """A scale group this layout holds: a power-of-two number of 16-byte chunks."""
    gc, r = divmod(group, codes_per_chunk(bits))
    return gc >= 1 and r == 0 and gc & (gc - 1) == 0


def _scale_bits(scales: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """The scales as 16-bit patterns (int64) and whether they are bf16; None when a float32 scale fits neither
    fp16 nor bf16 exactly (the layout then does not apply)."""
    if scales.dtype == torch.float16:
        return scales.view(torch.int16).to(torch.int64) & 0xFFFF, False
    if scales.dtype == torch.bfloat16:
        return scales.view(torch.int16).to(torch.int64) & 0xFFFF, True
    for dt, bf in ((torch.float16, False), (torch.bfloat16, True)):
        c = scales.to(dt)
        if torch.equal(c.float(), scales.float()):
            return c.view(torch.int16).to(torch.int64) & 0xFFFF, bf
    return None


def repack_rk(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, sym: bool,
              in_features: int, group: int) -> dict:
    """rk layout from the stored tensors (qweight uint8 [N, packed K], scales [N, ng], zeros packed [N, .])."""
    n = qweight.shape[0]
    cpc = codes_per_chunk(bits)
    if not group_ok(group, bits):
        raise ValueError(f"cuda-int: group {group} is not a power-of-two multiple of {cpc} codes ({bits}-bit)")
    sb = _scale_bits(scales)
    if sb is None:
        raise ValueError("cuda-int: float32 scales that neither fp16 nor bf16 holds exactly")
    ku = chunks_per_row(bits, in_features)
    codes = unpack(qweight, bits, in_features).to(torch.int64)
    codes = torch.nn.functional.pad(codes, (0, ku * cpc - in_features))
    if bits == 3:  # six words per chunk: the first four in the row's first plane, the last two in its second
        w6 = _pack3(codes.view(n, ku, 64))
        del codes
        word = torch.cat([w6[:, :, :4].reshape(n, 4 * ku), w6[:, :, 4:].reshape(n, 2 * ku)], 1).contiguous()
    else:
        word = _pack_words(codes, bits)
        del codes
    ng = scales.shape[1]
    z = (torch.full((n, ng), 1 << (bits - 1), dtype=torch.int64, device=scales.device) if sym
         else unpack(zeros, bits, ng).to(torch.int64))
    szw = _as_int32((sb[0] << 16) | z).contiguous()
    return dict(words=word, sz=szw, bits=bits, K=in_features, N=n, KU=ku, NG=ng, GCS=(group // cpc).bit_length() - 1,
                sbf16=sb[1], group=group)


def _rk3_shifts(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3-bit chunk positions (int64): a regular field's bit [field 5, half 2] (3 f + 16 half), a spare code bit's
    index b [1, 3, 1], and a spare bit's position [half 2] (15 + 16 half)."""
    a = functools.partial(torch.arange, dtype=torch.int64, device=device)
    return 3 * a(5).view(5, 1) + 16 * a(2).view(1, 2), a(3).view(1, 3, 1), 15 + 16 * a(2)


def _pack3(codes: torch.Tensor) -> torch.Tensor:
    """3-bit chunks: codes [N, KU, 64] (int64) -> int32 words [N, KU, 6]. Pair p < 30 (codes 2p, 2p + 1) is field
    p % 5 of word p / 5 at bits 3 (p % 5) and 16 + 3 (p % 5); bit b of pair 30 + j's codes sits at bits 15 and 31 of
    word 3j + b."""
    n, ku = codes.shape[:2]
    sh, b, half = _rk3_shifts(codes.device)
    words = (codes[..., :60].reshape(n, ku, 6, 5, 2) << sh).sum((-2, -1))  # fields do not overlap: the sum is an OR
    spare = codes[..., 60:].reshape(n, ku, 2, 1, 2)  # [.., j, 1, half]
    bits = (((spare >> b) & 1) << half).sum(-1)  # [.., j, b]
    return _as_int32(words | bits.reshape(n, ku, 6))


def _unpack3(words: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_pack3`: int32 [N, KU, 6] -> int64 codes [N, KU, 64]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    n, ku = w.shape[:2]
    sh, b, half = _rk3_shifts(w.device)
    reg = (w.view(n, ku, 6, 1, 1) >> sh) & 7  # [.., word, field, half]
    spare = (((w.view(n, ku, 2, 3, 1) >> half) & 1) << b).sum(-2)  # [.., j, half]
    return torch.cat([reg.reshape(n, ku, 60), spare.reshape(n, ku, 4)], -1)


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 values below 2**32 as the int32 with the same bits."""
    return torch.where(v >= (1 << 31), v - (1 << 32), v).to(torch.int32)


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, C] (int64, C a multiple of 32 / bits) -> int32 [N, C * bits / 32]: code 2i of each word at bits
    ``bits * i``, code 2i + 1 at ``16 + bits * i``."""
    e = 32 // bits
    c = codes.view(codes.shape[0], -1, e // 2, 2)
    shifts = torch.arange(e // 2, device=codes.device, dtype=torch.int64) * bits
    return _as_int32((c[..., 0] << shifts).sum(-1) | (c[..., 1] << (shifts + 16)).sum(-1))  # < 2**32, exact


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`_pack_words` (int64 codes [N, C])."""
    e = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(e // 2, device=w.device, dtype=torch.int64) * bits
    lo = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    hi = (w.unsqueeze(-1) >> (shifts + 16)) & ((1 << bits) - 1)
    return torch.stack([lo, hi], -1).reshape(w.shape[0], -1)


def reference_rk(pk: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] an rk layout holds (pure torch): the kernel's oracle."""
    bits, n = pk["bits"], pk["N"]
    if bits == 3:
        ku = pk["KU"]
        w6 = torch.cat([pk["words"][:, : 4 * ku].reshape(n, ku, 4), pk["words"][:, 4 * ku:].reshape(n, ku, 2)], -1)
        q = _unpack3(w6).reshape(n, -1)
    else:
        q = _unpack_words(pk["words"], bits)
    q = q[:, : pk["K"]].float()
    szw = pk["sz"].to(torch.int64) & 0xFFFFFFFF
    sbits = (szw >> 16).to(torch.int32)
    s = ((sbits << 16).view(torch.float32) if pk["sbf16"]
         else sbits.to(torch.int16).view(torch.float16).float())
    z = (szw & 0xFFFF).float()
    g = torch.arange(pk["K"], device=q.device) // pk["group"]
    return ((q - z[:, g]) * s[:, g]).to(dtype)


def rk_bytes(pk: dict) -> int:
    return sum(t.numel() * t.element_size() for t in (pk["words"], pk["sz"]))


# ---------------------------------------------------------------------------
# launch



def _cfg(bits: int) -> dict:
    return STREAM.get(bits) or TUNED.get(bits, DEFAULT_CFG)


def default_cfg(pk: dict, dev: int) -> dict:
    """The launch config a layer gets when none is given: its width's (:func:`_cfg`), with the geometry of
    :data:`SHAPES` for its shape on a 132-SM part."""
    cfg = _cfg(pk["bits"])
    over = SHAPES.get((pk["bits"], pk["N"], pk["K"])) if sm_count(dev) == 132 else None
    return dict(cfg, **over) if over and cfg.get("mode") != "stream" else cfg


def staging_units(cfg: dict, pk: dict) -> int:
    """Activation units each thread loads at once while staging: enough for one step over all of x, at most 4 (each
    costs registers, which only wide inputs need)."""
    units = pk["KU"] * codes_per_chunk(pk["bits"]) // 8
    return int(cfg.get("sb") or max(1, min(4, -(-units // cfg["threads"]))))


def run_int_cuda(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None,
                 out: torch.Tensor | None = None, pro: int = 0, aux: torch.Tensor | None = None,
                 eps: float = 0.0, chain: bool = False) -> torch.Tensor:
    """x2 [1, K] (fp16/bf16/fp32, contiguous) -> [1, N] of x2.dtype (into ``out`` when given). ``pro`` (see
    :data:`PROLOGUES`): 1 the RMSNorm of weight ``aux`` [K] (x2's dtype) and ``eps`` folded in; 2 x2 is [1, 2K],
    [a | b], and silu(a) * b is what the layer reads. ``chain``: the caller launches one of these GEMVs next on
    the stream (which waits for this one before reading anything), so the next grid is let in early (gd 1) even
    while TorchInductor's PDL mode would leave it to this grid's end (:func:`gdc`)."""
    M, Kx = x2.shape
    K = pk["K"]
    assert M == 1 and Kx == (2 if pro == 2 else 1) * K and x2.is_contiguous(), (M, Kx, K, pro)
    assert pro != 1 or (aux is not None and aux.shape == (K,) and aux.dtype == x2.dtype and aux.is_contiguous())
    dev = device_index(x2)
    cfg = dict(cfg or default_cfg(pk, dev))
    if pro:
        cfg.update(mode=None, sp=1, xs=1)
    gd = gdc(cfg, dev, chain)
    launch = _stream_launch(cfg, pk, x2, dev, gd) if cfg.get("mode") == "stream" else None
    if launch is None:  # the per-warp form (also where the streaming form does not apply: GPU, width, K)
        if cfg.get("mode") == "stream":
            cfg = dict(TUNED.get(pk["bits"], DEFAULT_CFG))
            gd = gdc(cfg, dev, chain)
        launch = _rows_launch(cfg, pk, x2, dev, gd, pro)
    pdl = gd > 0
    kern, threads, blocks, smem = launch
    N = pk["N"]
    if out is None:
        out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    assert out.shape == (M, N) and out.dtype == x2.dtype and out.is_contiguous()
    xvec = int(K % 8 == 0 and x2.data_ptr() % 16 == 0 and (pro != 1 or aux.data_ptr() % 16 == 0))
    kern(grid=(blocks, 1, 1), block=(threads, 1, 1), smem=smem,
         args=[x2, out, bias if bias is not None else out, pk["words"], pk["sz"], N, K, pk["KU"], pk["NG"], pk["GCS"],
               int(bias is not None), xvec, aux if pro == 1 else x2, float(eps)], pdl=pdl)
    return out


def _grid(kern: Launcher, threads: int, smem: int, cfg: dict, groups: int, per_block: int, dev: int) -> int:
    """Blocks of a persistent launch: warps walk their ``groups`` work items by the grid's stride, so the grid is at
    most what the GPU holds at once (a second wave of blocks would start late and finish last); ``bps`` caps the
    blocks per SM below that."""
    per_sm = min(kern.blocks_per_sm(threads, smem), cfg.get("bps") or 64)
    return max(1, min(-(-groups // per_block), per_sm * sm_count(dev)))


def _rows_launch(cfg: dict, pk: dict, x2: torch.Tensor, dev: int, gd: int, pro: int = 0) -> tuple:
    """(kernel, threads, blocks, shared memory) of the per-warp form; ``gd`` its PDL mode (:func:`gdc`), ``pro`` its
    prologue (:data:`PROLOGUES`)."""
    threads, r, u, sp = cfg["threads"], cfg["r"], cfg["u"], int(cfg.get("sp", 1))
    kern = _compiled(pk["bits"], XT[x2.dtype], threads, r, u, int(cfg.get("pf", 1)), bool(pk["sbf16"]), dev,
                     "int_gemv", int(cfg.get("ablate", 0)), staging_units(cfg, pk), 4, sp, int(cfg.get("xf", 0)), gd,
                     int(cfg.get("xs", 0)), pro, _xp(cfg, pk, gd),
                     int(cfg.get("lt", 0)) if int(cfg.get("pf", 1)) == 1 and sp == 1 else 0)
    warps = threads // 32 // sp  # row groups a block walks at once (sp = 2: two warps per row group)
    smem = pk["KU"] * (codes_per_chunk(pk["bits"]) * 2 + 16)  # fp16 activations, a chunk sum per chunk
    smem += 2 * warps * r * 4 if sp == 2 else 0  # the halves' meeting slots
    smem += -(-threads // 32 * 4 // 16) * 16 if pro == 1 else 0  # the warps' sums of x**2
    return kern, threads, _grid(kern, threads, smem, cfg, -(-pk["N"] // r), warps, dev), smem


def _xp(cfg: dict, pk: dict, gd: int) -> int:
    """Launch option ``xp`` as built: only with PDL (gd 1 or 2) and for rows of more than one tile (32 * u chunks);
    rows of one tile keep the plain staging, which measured 0.25 us faster on 2-bit 11008x4096 (NOTES.md, v32)."""
    return int(cfg.get("xp", 0)) if gd in (1, 2) and pk["KU"] > 32 * cfg["u"] else 0


SMEM_MAX = 227 * 1024  # the H100's opt-in shared memory per block


def stream_smem(pk: dict, threads: int, st: int, u: int) -> int:
    """Shared memory of the streaming form: every warp's ring of ``st`` tiles, their mbarriers, staged x."""
    warps = threads // 32
    return warps * st * 32 * u * 16 + (warps * st + 1) // 2 * 16 + pk["KU"] * (codes_per_chunk(pk["bits"]) * 2 + 16)


def gdc(cfg: dict, dev: int, chain: bool = False) -> int:
    """The config's programmatic-dependent-launch mode (``gd``) where the GPU has it (sm_90 on), else 0; 1 becomes
    2 (the next grid let in at this one's end) while TorchInductor's own PDL mode is on (see cuda_rt.inductor_pdl),
    unless ``chain`` (the next kernel is one of these GEMVs, which waits: see :func:`run_int_cuda`)."""
    gd, has_pdl = int(cfg.get("gd", 0)), sm90(dev)
    return 1 if chain and gd == 1 and has_pdl else pdl_mode(gd, has_pdl)


def _stream_launch(cfg: dict, pk: dict, x2: torch.Tensor, dev: int, gd: int = 0):
    """(kernel, threads, blocks, shared memory) of the streaming form, or None where it does not apply (3-bit,
    before sm_90, or shared memory too small for this K); ``gd`` its PDL mode (:func:`gdc`; 3: the next grid let
    in at the start, before this one's wait), ``xs`` in ``cfg`` its staging's lean form."""
    if pk["bits"] == 3 or not sm90(dev):
        return None
    threads, st, u = cfg.get("threads", 256), cfg.get("st", 4), cfg.get("u", 1)
    smem = stream_smem(pk, threads, st, u)
    if smem > SMEM_MAX:
        return None
    kern = _compiled(pk["bits"], XT[x2.dtype], threads, 1, u, 1, bool(pk["sbf16"]), dev, "int_gemv_stream", 0,
                     staging_units(dict(threads=threads), pk), st, 1, 0, gd, int(cfg.get("xs", 0)))
    return kern, threads, _grid(kern, threads, smem, cfg, pk["N"], threads // 32, dev), smem


def dequantize_rk(pk: dict, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (fp16/bf16/fp32), on the GPU (batches above 1)."""
    N, K = pk["N"], pk["K"]
    dev = pk["words"].device
    c = DEFAULT_CFG
    kern = _compiled(pk["bits"], XT[dtype], c["threads"], c["r"], c["u"], 1, bool(pk["sbf16"]), device_index(pk["words"]),
                     "int_dequant")
    out = torch.empty(N, K, device=dev, dtype=dtype)
    kern(grid=(-(-N * pk["KU"] // 256), 1, 1), block=(256, 1, 1),
         args=[out, pk["words"], pk["sz"], N, K, pk["KU"], pk["NG"], pk["GCS"]])
    return out


# ---------------------------------------------------------------------------
# the module side: layout cache, dispatch entry

_BROKEN: set = set()


def packed_rk(m) -> dict:
    spec = m.spec
    return cached_layout(m, "cuda_int", "rk_only", lambda: repack_rk(
        m.qweight, m.scales, m.zeros, spec.bits, spec.sym, m.in_features, group_size_of(spec, m.in_features)))


def _ok(m) -> bool:
    """Layer ``m`` is one this kernel computes (format, width, group, scales; stored codes still held)."""
    spec = int_layer_for(m, BITS, "rk_only")
    if spec is None:
        return False
    cache = getattr(m, "_cache", {})
    if num_groups(spec, m.in_features) < 1 or not group_ok(group_size_of(spec, m.in_features), spec.bits):
        return False
    return m.scales.dtype in (torch.float16, torch.bfloat16, torch.float32) or "rk_only" in cache


def _supports(m, x) -> bool:
    """Batch 1; larger batches (tensor cores up to 16, dequantize + cuBLAS above) only where this layout is the
    layer's only copy."""
    if not available() or id(m) in _BROKEN or not _ok(m):
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.device.type in ("cuda", "meta") and x.shape[-1] == m.in_features
            and (rows == 1 or (rows > 1 and "rk_only" in m._cache))
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


def _cpu_linear(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """Off the GPU: the layout's dense weight (pure torch) and a matmul."""
    return torch.nn.functional.linear(x2, reference_rk(pk, x2.dtype), bias)


def _run(x: torch.Tensor, pk: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> [..., N]: the GEMV at batch 1, tensor cores at 2-16 (:mod:`cuda_int_mma`, 16-bit
    activations), the GEMMs of :func:`_try_gemm` above (dequantize + cuBLAS where neither applies), the pure-torch
    path off the GPU."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    if not x2.is_cuda:
        y = _cpu_linear(x2, pk, bias)
    elif x2.shape[0] == 1:
        y = run_int_cuda(x2, pk, bias)
    else:
        y = cuda_int_mma.try_int_mma(x2, pk, bias)
        if y is None:
            y = _try_gemm(x2, pk, bias)
        if y is None:
            y = torch.nn.functional.linear(x2, dequantize_rk(pk, x2.dtype), bias)
    return y.reshape(*x.shape[:-1], pk["N"])


_GEMM_BROKEN: set = set()


def _try_gemm(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None) -> torch.Tensor | None:
    """Batches above 16: 4-bit layers from 64 rows on Hopper's wgmma (:mod:`leanq.kernels.cuda_int_wgmma`), else the
    Triton GEMM on these words (:mod:`leanq.kernels.triton_gemm`) where it applies, else None (the caller
    dequantizes). A kernel that fails to compile or launch says so once and steps aside on that device."""
    dev = device_index(x2)
    # the wgmma kernel (warp-specialized above 64 rows) measured at least level with the Triton GEMM on all five Llama
    # shapes at 64, 128 and 256 rows (H200, 2026-11-28)
    if cuda_int_wgmma.supports(pk, x2):
        try:
            return cuda_int_wgmma.run_int_wgmma(x2, pk, bias)
        except RuntimeError as e:
            import warnings

            warnings.warn(f"leanq: cuda-int-wgmma unavailable ({str(e)[:200]}); the Triton GEMM serves")
            cuda_int_wgmma._BROKEN.add(dev)
    if dev in _GEMM_BROKEN:
        return None
    try:
        from . import triton_gemm
    except ImportError:
        _GEMM_BROKEN.add(dev)
        return None
    if not triton_gemm.supports(pk, x2):
        return None
    try:
        return triton_gemm.run_gemm_rk(x2, pk, bias)
    except Exception as e:  # a Triton/driver pairing that cannot build or launch it: dequantize + cuBLAS serves
        import warnings

        warnings.warn(f"leanq: triton-gemm unavailable ({type(e).__name__}: {str(e)[:200]}); batches above 16 "
                      "dequantize")
        _GEMM_BROKEN.add(dev)
        return None


# the layout's integer fields, in the order the ops take them
_META = ("bits", "K", "N", "KU", "NG", "GCS", "sbf16", "group")


def _layout_of(words: torch.Tensor, sz: torch.Tensor, meta) -> dict:
    """The layout dict (as :func:`packed_rk` gives) of an op's tensors and integer fields ``meta`` (:data:`_META`)."""
    pk = dict(zip(_META, meta), words=words, sz=sz)
    pk["sbf16"] = bool(pk["sbf16"])
    return pk


def _impl(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None, bits: int, K: int,
          N: int, KU: int, NG: int, GCS: int, sbf16: bool, group: int) -> torch.Tensor:
    """The kernels as one opaque op, so torch.compile (and its CUDA graphs) take them whole: the GEMV at
    batch 1, dequantize + cuBLAS above."""
    pk = _layout_of(words, sz, (bits, K, N, KU, NG, GCS, sbf16, group))
    return on_device_of(x, _run, x, pk, bias)


try:
    _op = torch.library.custom_op("leanq::cuda_int_linear", mutates_args=())(_impl)

    @_op.register_fake
    def _(x, words, sz, bias, bits, K, N, KU, NG, GCS, sbf16, group):
        return x.new_empty(*x.shape[:-1], N)
except Exception:  # an older torch without custom_op: compiled models use the Triton kernels
    _op = None


def prologue(x: torch.Tensor, aux: torch.Tensor | None, pro: int, eps: float) -> torch.Tensor:
    """What a layer with prologue ``pro`` (:data:`PROLOGUES`) reads, in torch (the reference and the path off the
    batch-1 GEMV): 1 transformers' RMSNorm of weight ``aux`` (fp32 statistics, the weight times the normalised x in
    x's dtype); 2 silu(a) * b of x = [a | b]; 0 x."""
    if pro == 1:
        xf = x.float()
        return aux.to(x.dtype) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if pro == 2:
        a, b = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(a) * b
    return x


def _run_pro(x: torch.Tensor, pk: dict, bias: torch.Tensor | None, pro: int, aux: torch.Tensor | None,
             eps: float, res: torch.Tensor | None = None, chain: bool = False) -> torch.Tensor:
    """:func:`_run` with a prologue and, with ``res`` (a layer without a bias), the residual added to the output: at
    batch 1 on a GPU the GEMV's staging computes the prologue and its bias slot adds the residual (one read per row;
    ``chain`` as :func:`run_int_cuda` takes it); elsewhere both in torch around the layer."""
    assert res is None or bias is None, "a residual takes the bias's place"
    if x.is_cuda and x.numel() == x.shape[-1] and x.dtype in XT and (res is None or res.dtype == x.dtype):
        x2 = x.reshape(1, -1).contiguous()
        a = aux.to(x.dtype).contiguous() if pro == 1 else None
        b = res.reshape(-1).contiguous() if res is not None else bias
        return run_int_cuda(x2, pk, b, pro=pro, aux=a, eps=eps, chain=chain).reshape(*x.shape[:-1], pk["N"])
    y = _run(prologue(x, aux, pro, eps), pk, bias)
    return y + res if res is not None else y


def _impl_pro(x: torch.Tensor, aux: torch.Tensor | None, res: torch.Tensor | None, words: torch.Tensor,
              sz: torch.Tensor, bias: torch.Tensor | None, pro: int, eps: float, bits: int, K: int, N: int, KU: int,
              NG: int, GCS: int, sbf16: bool, group: int) -> torch.Tensor:
    """:func:`_impl` with a prologue (:data:`PROLOGUES`) folded in: an RMSNorm before the layer (``aux`` its weight)
    or SiLU x up (x holds both halves); and with ``res``, the residual stream added to the output."""
    pk = _layout_of(words, sz, (bits, K, N, KU, NG, GCS, sbf16, group))
    return on_device_of(x, _run_pro, x, pk, bias, pro, aux, eps, res)


try:
    _op_pro = torch.library.custom_op("leanq::cuda_int_linear_pro", mutates_args=())(_impl_pro)

    @_op_pro.register_fake
    def _(x, aux, res, words, sz, bias, pro, eps, bits, K, N, KU, NG, GCS, sbf16, group):
        return x.new_empty(*x.shape[:-1], N)
except Exception:  # an older torch without custom_op: no folding (fold_decoder declines)
    _op_pro = None


def _run_tail(x: torch.Tensor, res: torch.Tensor, norm_w: torch.Tensor, eps: float, o: dict, gu: dict,
              d: dict) -> torch.Tensor:
    """The rest of a folded decoder layer after its attention (``x`` the attention's output before o_proj, ``res``
    the residual stream): h = o_proj(x) + res, g = gate/up of RMSNorm(h) (``norm_w``, ``eps``; the fused rows),
    down(silu(a) * b of g) + h: :func:`_run_pro` three times. At batch 1 on a GPU that is three GEMVs back to back,
    each letting the next in early (``chain``: nothing else runs between them)."""
    w = norm_w.to(x.dtype).contiguous()  # before the first launch: no other kernel between the three
    h = _run_pro(x, o, None, 0, None, 0.0, res, chain=True)
    return _run_pro(_run_pro(h, gu, None, 1, w, eps, chain=True), d, None, 2, None, 0.0, h)


def _impl_tail(x: torch.Tensor, res: torch.Tensor, norm_w: torch.Tensor, eps: float, o_words: torch.Tensor,
               o_sz: torch.Tensor, gu_words: torch.Tensor, gu_sz: torch.Tensor, d_words: torch.Tensor,
               d_sz: torch.Tensor, meta: list[int]) -> torch.Tensor:
    """:func:`_run_tail` as one op (``meta``: the three layouts' :func:`_meta`, in order), so that under
    torch.compile no kernel of TorchInductor's can come between its GEMVs."""
    pks = [_layout_of(w, z, meta[8 * i:8 * i + 8])
           for i, (w, z) in enumerate(((o_words, o_sz), (gu_words, gu_sz), (d_words, d_sz)))]
    return on_device_of(x, _run_tail, x, res, norm_w, eps, *pks)


try:
    _op_tail = torch.library.custom_op("leanq::cuda_int_layer_tail", mutates_args=())(_impl_tail)

    @_op_tail.register_fake
    def _(x, res, norm_w, eps, o_words, o_sz, gu_words, gu_sz, d_words, d_sz, meta):
        return x.new_empty(*x.shape[:-1], meta[16 + 2])
except Exception:  # an older torch without custom_op: the residual adds stay in torch (fold_decoder)
    _op_tail = None


def _meta(pk: dict) -> tuple:
    """The op's integer arguments of layout ``pk``, in order (:data:`_META`)."""
    return tuple(pk[k] for k in _META)


def _linear(m, x: torch.Tensor) -> torch.Tensor:
    pk = packed_rk(m)
    b = m.bias.to(x.dtype) if m.bias is not None else None
    args = (x, pk["words"], pk["sz"], b) + _meta(pk)
    if torch.compiler.is_compiling():
        if _op is None:
            raise RuntimeError("cuda-int-gemv needs torch.library.custom_op under torch.compile")
        return _op(*args)
    try:
        return _impl(*args)
    except (RuntimeError, ValueError) as e:  # NVRTC missing or failing here: say so once, then Triton serves
        import warnings

        warnings.warn(f"leanq: cuda-int-gemv unavailable ({str(e)[:200]}); using the Triton kernels")
        _BROKEN.add(id(m))
        from . import select

        return select(m, x).run(m, x)


def _fast_forward(m, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear.forward of a layer that release_stored_rk took over: the op on its own buffers, no dispatch.

    A layer fused with its siblings (same input: q/k/v, gate/up) calls the op on the whole fused layout under
    torch.compile and keeps its own rows; the siblings' calls are then identical, and the graph pass
    :class:`DedupeOps` leaves one.  Outside torch.compile it runs on its own rows (views of the fused layout)."""
    b = m.bias.to(x.dtype) if m.bias is not None else None
    compiled = _op is not None and torch.compiler.is_compiling()
    fused = compiled and m.rk_rows is not None
    if hasattr(m, "rk_pro"):  # a prologue folded in (fold_decoder)
        y = _pro_call(m, x, fused=fused, bias=None if fused else b)
    elif fused:
        y = _op(x, m.rk_fused_words, m.rk_fused_sz, None, *m.rk_fused_meta)
    else:
        args = (x, m.rk_words, m.rk_sz, b) + m.rk_meta
        y = _op(*args) if compiled else _impl(*args)
    if not fused:
        return y
    y = y[..., m.rk_rows[0]:m.rk_rows[1]]
    return y + b if b is not None else y


# layers that read the same input in the decoders leanq knows (Llama family: attention, MLP)
FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def _fusable(ms: list, pks: list) -> bool:
    keys = {(p["bits"], p["K"], p["KU"], p["NG"], p["GCS"], p["sbf16"], p["group"], p["words"].device) for p in pks}
    return len(ms) > 1 and len(keys) == 1


def take_over(model: torch.nn.Module, layers: list, fuse: bool = True) -> int:
    """Give ``layers`` (QuantLinear of ``model`` that :func:`_ok` accepts) to this kernel alone: their rk layout
    as buffers, a dispatch-free forward, their stored buffers freed; with ``fuse``, the layers of each
    FUSE_GROUPS set under one parent share one fused layout (rows stacked; each layer keeps views of its
    rows) and the graph pass that merges their calls is installed.  Returns bytes freed.  (No GPU check:
    :func:`release_stored_rk` is the user's entry.)"""
    chosen = {id(m) for m in layers}
    groups = []
    if fuse:
        for parent in model.modules():
            for names in FUSE_GROUPS:
                ms = [getattr(parent, n, None) for n in names]
                if all(m is not None and id(m) in chosen for m in ms) and _fusable(ms, [packed_rk(m) for m in ms]):
                    groups.append(ms)
    freed = 0
    for m in layers:
        pk = packed_rk(m)
        m._cache["rk_only"] = True
        m.rk_meta = _meta(pk)
        m.rk_rows = None
        m.register_buffer("rk_words", pk["words"], persistent=False)
        m.register_buffer("rk_sz", pk["sz"], persistent=False)
        m._fast = _fast_forward
        freed += drop_stored(m)
    for ms in groups:
        pks = [packed_rk(m) for m in ms]
        fw = torch.cat([p["words"] for p in pks])
        fsz = torch.cat([p["sz"] for p in pks])
        fmeta = _meta(dict(pks[0], N=fw.shape[0]))
        r0 = 0
        for m, p in zip(ms, pks):
            r1 = r0 + p["N"]
            p["words"], p["sz"] = fw[r0:r1], fsz[r0:r1]  # views: the separate copies are freed
            m.register_buffer("rk_words", p["words"], persistent=False)
            m.register_buffer("rk_sz", p["sz"], persistent=False)
            m.register_buffer("rk_fused_words", fw, persistent=False)
            m.register_buffer("rk_fused_sz", fsz, persistent=False)
            m.rk_fused_meta, m.rk_rows = fmeta, (r0, r1)
            r0 = r1
    if groups:
        install_dedupe()
    for m in layers:  # 4-bit batches 2-16 on the w kernel: its split-K scratch sized now, outside any CUDA graph
        if m.rk_meta[0] == 4:
            rows = m.rk_fused_meta[2] if m.rk_rows is not None else m.rk_meta[2]
            cuda_int_mma.reserve_w(rows, m.rk_meta[1], m.rk_words.device)
    return freed


def release_stored_rk(model: torch.nn.Module, fuse: bool = True, fold: bool = True, rope: bool = True,
                      attend: bool = True) -> int:
    """Inference only: build every eligible CUDA int layer's rk layout now and free its stored buffers (the
    layer then runs only here: the GEMV at batch 1, tensor cores at 2-16, dequantize + cuBLAS above; its
    forward calls the kernel directly, without the dispatch table).  With ``fuse`` (the default), layers that
    read the same input share one GEMV under torch.compile (:func:`take_over`): on an H100 this took a
    32-layer 7B-shaped decode from 1.84x to 2.00x BF16 (docs/PERFORMANCE.md, version 9).  The kernel is
    compiled and checked on the first layer before any buffer is freed; if that fails, nothing is released.
    ``fold`` (with ``fuse``, the default): also fold transformers' Llama, Mistral and Qwen2 decoder layers' RMSNorms,
    SiLU x up and residual adds into their GEMVs (:func:`fold_decoder`): on an H200 this took the 7B-shaped decode
    from 410 to 497-502 tokens/s (docs/PERFORMANCE.md, version 29); with ``rope`` and ``attend`` (the defaults) the
    attention's rotary embedding, cache write and attention too (:func:`fold_decoder`): 504 to 520 tokens/s, and 459
    to 528 with TorchInductor's PDL mode (docs/PERFORMANCE.md, version 30). Returns bytes freed."""
    layers = [m for m in model.modules()
              if _ok(m) and hasattr(m, "qweight") and m.qweight.numel() and m.qweight.device.type == "cuda"]
    if not layers or not available():
        return 0
    m0 = layers[0]
    x = torch.randn(1, m0.in_features, device=m0.qweight.device, dtype=torch.bfloat16)
    ref = x.float() @ m0.int_weight().dequantize(torch.float32).t()
    try:
        y = run_int_cuda(x, packed_rk(m0), None)
    except (RuntimeError, ValueError) as e:
        import warnings

        warnings.warn(f"leanq: cuda-int-gemv unavailable ({str(e)[:200]}); stored buffers kept")
        return 0
    if not ((y.float() - ref).norm() <= 1e-2 * ref.norm()):
        raise RuntimeError("cuda-int-gemv disagrees with its reference on this GPU; stored buffers kept")
    freed = take_over(model, layers, fuse)
    if fold and fuse:
        fold_decoder(model, rope=rope, attend=attend)
    return freed


# ---------------------------------------------------------------------------
# folding a decoder layer's RMSNorms and SiLU x up into its GEMVs

# decoder layers whose two RMSNorms feed only their attention's q/k/v and their MLP's gate/up (pre-norm, one
# residual stream), and whose MLP is down(act(gate(x)) * up(x))
FOLD_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
FOLD_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _fused_group(ms: list) -> bool:
    """The layers ``ms`` were taken over as one fused group, in this order (their rows stacked)."""
    first = ms[0]
    if getattr(first, "rk_rows", None) is None or first.rk_rows[0] != 0:
        return False
    r = 0
    for m in ms:
        if getattr(m, "rk_rows", None) is None or m.rk_rows[0] != r or m.rk_fused_words is not first.rk_fused_words:
            return False
        r = m.rk_rows[1]
    return r == first.rk_fused_words.shape[0]


def _fold_norm(layer, name: str, ms: list) -> bool:
    norm = getattr(layer, name, None)
    if type(norm).__name__ not in FOLD_NORMS or not _fused_group(ms) or any(hasattr(m, "rk_pro") for m in ms):
        return False
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    w = norm.weight.detach().contiguous()
    for m in ms:
        m.register_buffer("rk_norm_w", w, persistent=False)
        m.rk_pro = (1, eps)
    setattr(layer, name, torch.nn.Identity())
    return True


def _pro_call(m, x: torch.Tensor, res: torch.Tensor | None = None, fused: bool = False,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Layer ``m`` (taken over; its prologue if it has one) on ``x``, with the residual ``res`` or ``bias`` added: its
    own rows, or with ``fused`` all the rows of its fused group."""
    code, eps = getattr(m, "rk_pro", (0, 0.0))
    words, sz, meta = (m.rk_fused_words, m.rk_fused_sz, m.rk_fused_meta) if fused else (m.rk_words, m.rk_sz, m.rk_meta)
    args = (x, getattr(m, "rk_norm_w", None), res, words, sz, bias, code, eps) + meta
    return _op_pro(*args) if torch.compiler.is_compiling() else _impl_pro(*args)


def _folded_mlp_forward(mlp, x: torch.Tensor, res: torch.Tensor | None = None) -> torch.Tensor:
    """The MLP of a folded layer: one GEMV over the fused gate/up rows (with the norm folded in, when it is), then
    down's GEMV, which stages silu(gate) * up from them (and adds ``res``, the residual stream, when given)."""
    return _pro_call(mlp.down_proj, _pro_call(mlp.gate_proj, x, fused=True), res)


def _folded_layer_forward(layer, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """The decoder layer with everything folded: attention with the norm inside q/k/v and without o_proj (an
    identity there), then o_proj adding the residual, then the MLP with the norm inside gate/up and down adding the
    residual, as one op (:func:`_run_tail`). The same arguments reach the attention as in transformers' layer (all
    of them, by keyword)."""
    attn_out, _ = layer.self_attn(hidden_states=hidden_states, **kwargs)
    o, gu, d = layer.leanq_o_proj, layer.mlp.gate_proj, layer.mlp.down_proj
    meta = [int(v) for v in o.rk_meta + gu.rk_fused_meta + d.rk_meta]
    args = (attn_out, hidden_states, gu.rk_norm_w, gu.rk_pro[1], o.rk_words, o.rk_sz, gu.rk_fused_words,
            gu.rk_fused_sz, d.rk_words, d.rk_sz, meta)
    return _op_tail(*args) if torch.compiler.is_compiling() else _impl_tail(*args)


# attention modules whose decode step fold_decoder can take over, with what each passes its attention function
# besides transformers' common arguments (the name of the value, read from the module or its config)
FOLD_ATTENTION = {"LlamaAttention": None, "MistralAttention": "config.sliding_window",
                  "Qwen2Attention": "sliding_window"}


def _cache_layer(attn, cache):
    """The static cache layer ``attn`` writes in ``cache``, when the folded decode step can write it: transformers'
    StaticLayer, initialised (by the prompt's forward), the cache not offloading; else None."""
    layers = getattr(cache, "layers", None)
    i = getattr(attn, "layer_idx", None)
    if not layers or not isinstance(i, int) or i >= len(layers) or getattr(cache, "offloading", False):
        return None
    layer = layers[i]
    if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", False):
        return None
    return layer


# The folded decode step's cache-position advances, one per layer (32 small kernels a step of a 7B-shaped model),
# gathered and made by the model's last folded attention in one torch._foreach_add_ instead. On by default since
# session 30: one kernel instead of 32, 0-2.4% more tokens/s on an H200 over three calls (docs/PERFORMANCE.md,
# version 31; bench_decode.py --attn plain turns it off).
ADVANCE_ONCE = True


def _advance(attn, counter: torch.Tensor) -> None:
    """Advance a cache layer's write position after the folded step wrote it: now, or with ADVANCE_ONCE by the
    model's last folded attention (:func:`_folded_attn_forward`)."""
    pending = getattr(attn, "leanq_pending", None)
    if ADVANCE_ONCE and pending is not None:
        pending.append(counter)
    else:
        counter.add_(1)


def _folded_attn_forward(attn, hidden_states: torch.Tensor, **kwargs):
    """:func:`_folded_attn_step`, and in the model's last folded attention the cache-position advances the others
    left (ADVANCE_ONCE), all in one op."""
    pending = getattr(attn, "leanq_pending", None)
    if pending is not None and "first" in attn.leanq_order:
        pending.clear()  # left over from a step that did not finish
    out = _folded_attn_step(attn, hidden_states, **kwargs)
    if pending and "last" in attn.leanq_order:
        torch._foreach_add_(list(pending), 1)
        pending.clear()
    return out


def _folded_attn_step(attn, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                      **kwargs):
    """The attention of a layer whose q/k/v fold_decoder fused: for one token at batch 1 with a static cache, one
    GEMV over the fused q/k/v rows (the norm inside when folded), then one kernel for the rotary embedding, the cache
    write and the attention (:mod:`.decode_attention`; with ``leanq_attend`` and transformers' sdpa attention,
    which returns no weights), or one for the rotary embedding and the cache write (:mod:`.rope_cache`) followed by
    transformers' attention function; then o_proj. Anything else runs the class's own forward with the same arguments."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layer = _cache_layer(attn, cache) if position_embeddings is not None else None
    q_proj = attn.q_proj
    hq, hkv = attn.leanq_heads
    if layer is not None and hidden_states.shape[:-1] == (1, 1):
        cos, sin = position_embeddings
        qkv = _pro_call(q_proj, hidden_states, fused=True)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) or attention_mask is None else False
        if (attn.leanq_attend and not attn.training and mask is not False
                and getattr(attn.config, "_attn_implementation", None) == "sdpa"  # eager: its weights are wanted
                and decode_attention.fits(qkv, cos, layer.keys, layer.values, layer.cumulative_length, mask, hq, hkv)):
            out = decode_attention.attend(qkv, attn.leanq_qkv_bias, cos, sin, layer.keys, layer.values,
                                          layer.cumulative_length, attn.leanq_ticket, mask, attn.scaling, hq, hkv)
            _advance(attn, layer.cumulative_length)  # as StaticLayer.update advances it (the op only reads it)
            return attn.o_proj(out), None
        if rope_cache.fits(qkv, cos, layer.keys, layer.values, layer.cumulative_length, hq, hkv):
            q = rope_cache.rope_cache(qkv, attn.leanq_qkv_bias, cos, sin, layer.keys, layer.values,
                                      layer.cumulative_length, hq, hkv)
            _advance(attn, layer.cumulative_length)
            rest = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            extra = FOLD_ATTENTION.get(type(attn).__name__)
            if extra is not None:
                obj = attn
                for part in extra.split("."):
                    obj = getattr(obj, part, None)
                rest["sliding_window"] = obj
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
            out, weights = fn(attn, q, layer.keys, layer.values, attention_mask,
                              dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling,
                              **rest)
            return attn.o_proj(out.reshape(1, 1, -1).contiguous()), weights
    return type(attn).forward(attn, hidden_states, position_embeddings=position_embeddings,
                              attention_mask=attention_mask, **kwargs)


def _fold_attention(attn, qkv: list, attend: bool = True) -> bool:
    """Give ``attn``'s decode step to :func:`_folded_attn_forward` (its q/k/v one fused group, their heads known);
    ``attend``: the attention itself in leanq's kernel too (``attn.leanq_attend``, which can be changed later)."""
    if (type(attn).__name__ not in FOLD_ATTENTION or rope_cache.op is None or not _fused_group(qkv)
            or hasattr(attn, "leanq_heads") or not hasattr(attn, "head_dim")):
        return False
    d = attn.head_dim
    rows = [m.rk_rows[1] - m.rk_rows[0] for m in qkv]
    if d % 2 or rows[0] % d or rows[1] != rows[2] or rows[1] % d:
        return False
    hq, hkv = rows[0] // d, rows[1] // d
    if hq % hkv:
        return False
    dev = qkv[0].rk_words.device
    bias = None
    if any(m.bias is not None for m in qkv):
        bias = torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(r, device=dev)
                          for m, r in zip(qkv, rows)]).contiguous()
    attn.register_buffer("leanq_qkv_bias", bias, persistent=False)
    attn.register_buffer("leanq_ticket", torch.zeros(hkv, dtype=torch.int32, device=dev), persistent=False)
    attn.leanq_heads = (hq, hkv)
    attn.leanq_attend = attend
    attn.forward = types.MethodType(_folded_attn_forward, attn)
    return True


def _returns_tensor(layer) -> bool:
    """The layer class's forward returns the hidden states alone (transformers 5's decoder layers; earlier ones
    returned a tuple, which a replaced forward would break)."""
    ann = inspect.signature(type(layer).forward).return_annotation
    return ann is torch.Tensor or ann in ("torch.Tensor", "Tensor")


def fold_decoder(model: torch.nn.Module, residual: bool = True, rope: bool = True, attend: bool = True) -> int:
    """Inference only, after :func:`take_over` with ``fuse`` (``release_stored_rk(model, fold=True)``): in each decoder
    layer of FOLD_LAYERS, the RMSNorm before attention goes into the fused q/k/v GEMV, the one before the MLP into the
    fused gate/up GEMV, and SiLU x up into the down GEMV (:data:`PROLOGUES`); the norms become identities and the
    MLP runs gate/up as one call. With ``residual`` (and all three folded, o_proj and down without a bias), the
    layer's two residual adds go into o_proj's and down's outputs: o_proj moves out of the attention (an identity
    there; the layer keeps it as ``leanq_o_proj``) and the layer's forward calls the attention, o_proj with the
    residual, then the MLP with the residual. At batch 1 on a GPU the GEMVs compute all of it (five kernels fewer a
    layer; o_proj, gate/up and down one op, :func:`_run_tail`); elsewhere the op computes it in torch around the
    layer. With ``rope`` (FOLD_ATTENTION's modules, q/k/v fused), a decode step with a static cache runs one GEMV
    over q/k/v and one kernel for the rotary embedding and the cache write (:func:`_folded_attn_forward`), one or
    two kernels fewer a layer; with ``attend`` the attention too (transformers' sdpa attention replaced by
    :mod:`.decode_attention`'s kernel: one kernel from q/k/v to o_proj). Returns the number of folds."""
    if _op_pro is None:
        return 0
    n = 0
    for layer in model.modules():
        if type(layer).__name__ not in FOLD_LAYERS:
            continue
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        qkv = [getattr(attn, k, None) for k in ("q_proj", "k_proj", "v_proj")]
        gu = [getattr(mlp, k, None) for k in ("gate_proj", "up_proj")]
        down = getattr(mlp, "down_proj", None)
        if all(m is not None for m in qkv) and _fold_norm(layer, "input_layernorm", qkv):
            n += 1
        if rope and all(m is not None for m in qkv) and _fold_attention(attn, qkv, attend):
            n += 1
        if all(m is not None for m in gu):
            if _fold_norm(layer, "post_attention_layernorm", gu):
                n += 1
            act = getattr(mlp, "act_fn", None)
            silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")
            if (silu and _fused_group(gu) and all(m.bias is None for m in gu)
                    and getattr(down, "rk_words", None) is not None
                    and down.rk_rows is None and not hasattr(down, "rk_pro")
                    and 2 * down.in_features == gu[0].rk_fused_words.shape[0]
                    and gu[0].rk_rows[1] == down.in_features):
                down.rk_pro = (2, 0.0)
                mlp.forward = types.MethodType(_folded_mlp_forward, mlp)
                n += 1
        o = getattr(attn, "o_proj", None)
        if (residual and _op_tail is not None and _returns_tensor(layer)
                and isinstance(layer.input_layernorm, torch.nn.Identity)
                and isinstance(layer.post_attention_layernorm, torch.nn.Identity)
                and getattr(gu[0], "rk_pro", (0,))[0] == 1
                and getattr(down, "rk_pro", None) == (2, 0.0) and down.bias is None
                and getattr(o, "rk_words", None) is not None and o.rk_rows is None and o.bias is None
                and not hasattr(o, "rk_pro")):
            # the residual adds go into o_proj's and down's outputs (their bias slot); o_proj leaves the attention
            attn.o_proj = torch.nn.Identity()
            layer.leanq_o_proj = o
            layer.forward = types.MethodType(_folded_layer_forward, layer)
            n += 1
    folded = [m for m in model.modules() if hasattr(m, "leanq_heads")]
    pending: list = []  # one list for the model's folded attentions (ADVANCE_ONCE)
    for i, attn in enumerate(folded):
        attn.leanq_pending = pending
        attn.leanq_order = ("first" if i == 0 else "") + ("last" if i == len(folded) - 1 else "")
    if n:
        install_dedupe()
    return n


# ---------------------------------------------------------------------------
# the graph pass that merges identical calls (torch.compile, inductor's post-grad passes)

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
except Exception:  # an older torch: no custom passes, fused layers then call the op once each
    _PassBase = object


class DedupeOps(_PassBase):
    """Identical calls of ``leanq::cuda_int_linear`` or ``leanq::cuda_int_linear_pro`` (same input node, same layout,
    same arguments) become one: what makes a fused q/k/v or gate/up group one GEMV.  The ops are pure (they mutate
    nothing), so this is safe; ``then``: a pass that was installed before, run first."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, graph) -> None:
        if self.then is not None:
            self.then(graph)
        ops = getattr(torch.ops, "leanq", None)
        targets = {t.default for t in (getattr(ops, "cuda_int_linear", None), getattr(ops, "cuda_int_linear_pro", None))
                   if t is not None}
        if not targets:
            return
        seen: dict = {}
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in targets:
                continue
            key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
            try:
                first = seen.setdefault(key, node)
            except TypeError:  # an unhashable argument: leave the call alone
                continue
            if first is not node:
                node.replace_all_uses_with(first)
                graph.erase_node(node)

    def uuid(self):
        then = getattr(self.then, "uuid", lambda: None)() if self.then is not None else None
        return ("leanq-dedupe-cuda-int-linear-2", then)


def install_dedupe() -> None:
    """Install :class:`DedupeOps` as inductor's post-grad custom pass (after any pass already there), once."""
    try:
        from torch._inductor import config
    except Exception:
        return
    have = config.post_grad_custom_post_pass
    if _PassBase is object or isinstance(have, DedupeOps):
        return
    if isinstance(have, (list, tuple)):  # a torch that takes a list of passes
        if not any(isinstance(p, DedupeOps) for p in have):
            config.post_grad_custom_post_pass = [*have, DedupeOps()]
        return
    config.post_grad_custom_post_pass = DedupeOps(then=have)


# priority 42: ahead of the Triton kn GEMV (40) at batch 1
INT_CUDA = register_kernel(Kernel("cuda-int-gemv", "int", ("cuda",), _supports, _linear, priority=42,
                                   layout="cuda_int"))
