"""Batches 2-16 on tensor cores, straight from the rk words of :mod:`leanq.kernels.cuda_int` (no second layout).

Two kernels, both ``mma.sync.m16n8k16`` (16-bit inputs, fp32 accumulate), both reading a code as M0 + q (OR'd
into the mantissa of M0 = 1024 in fp16, 128 in bf16: exact) minus M0 + z in one x2 subtraction, so the products
are exact (q - z) x and the group scales multiply fp32 sums.

**The w kernel** (``int_mma_w``, 4-bit layers with K and the group multiples of 128; the default where it applies,
``LEANQ_MMA_W=0`` turns it off). The weights are the A operand: a warp owns 16 rows, and in super-step S (inputs
128S .. 128S + 127) lane t of each quad reads 16-byte chunk 4S + t of its two rows; the 16 inputs of each of the
8 tensor-core steps are an order chosen so that those chunks are exactly the lane's A registers (shift, AND/OR,
subtract: 3 instructions per register) and the lane's B registers (x, batch rows as the 8 columns) are 64
contiguous bytes of x per batch row. Per block: RT row tiles x KW input ranges of SPW super-steps; the weights
stream through a per-warp ring of PD slots in shared memory filled by ``cp.async`` (with register destinations
the compiler issued the next step's loads just before their use), each quad copies four steps' group words at a
time (shared by shuffles), and the block's x is staged once, by ``cp.async`` into the order the lanes read.
Partial tiles of the KW ranges meet in shared memory; when the grid also splits K, each block writes its own
slot and the last to arrive at its row group's counter adds the slots in order (deterministic) and writes the
output. :func:`w_config` picks RT and SPW per shape (fewest waves of one block per SM, then the fullest), except
for shapes in :data:`W_SHAPES` (4096 x 4096 on a 132-SM part: KW 1, 8 steps per warp, 2 blocks per SM).
Measured on an H100 (2026-11-28, graph harness, 4-bit g128, the five Llama shapes,
``benchmarks/kernels/results/cuda-int-mma-w-h100-2026-11-28-final.jsonl``): 1.33-1.93x BF16 at batch 16 and
1.56-2.22x at batch 4, where the first kernel gave 0.75-1.04x and 0.96-1.17x in the same run. Ablations
(``mma_w_probe.py``): serving the weights from L2 changes nothing, so DRAM is not the limit; the ring alone
(no decode, no staging) takes 17.6 us of 23.2 at 14336 x 4096, against 13.2 us for the batch-1 GEMV on the
same bytes (ncu of an earlier version: L1/TEX throughput 76%, DRAM 29%). Two launch options stay off: ``mg``
(copies of four steps, 2 rows x 256 bytes per instruction: within a few percent either way on the H100) and ``tw``
(1-4 row tiles per warp sharing each x fragment read from shared memory, with ``rp``). ``rp`` (the weights loaded
into registers instead of the ring) with ``pt`` super-steps per register tile, the next tile's loads out before the
current tile's arithmetic, is the default at batches 2-8 (``W_SMALL``: ``pt`` 4, 4 KB per warp in flight). One step
at a time (``pt`` 1) it had lost to the ring on an H200 (2026-11-28, NOTES.md v20: 1.31-1.43x BF16 at batch 16,
geomean, against 1.48-1.51x); with ``pt`` 4 batch 4 went from 1.71-2.11x to 1.93-2.30x BF16 on the five Llama shapes
(three runs, v22), while at batch 16 (two n8 tiles, 128 registers) it stayed at the ring's level, so batch 16 keeps
the ring. ``xv`` 3 is on by default: the block's x is staged by 16-byte
copies through L1 (``cp.async.ca``), each warp's 32 copies two batch rows x 256 contiguous bytes and each
quarter-warp's 8 neighbouring shared-memory entries, in a layout of step pairs (a lane's 16 bytes: the 8 inputs of
one batch row for two tensor-core steps). Before it, 8-byte copies per step took 5.2 of 19.2 us at 14336 x 4096,
batch 16 (ablation, H200). With it, batch 16 went from 1.33-1.59x to 1.37-1.84x BF16 (two runs) and batch 4 from
1.49-1.98x to 1.55-2.13x (one run) on the five Llama shapes (H200). The same layout copied through L2 only (``xv`` 1)
was 26-60% slower than the 8-byte form, and through L1 in the old copy order (``xv`` 2) 1-5% behind ``xv`` 3.
Measured slower and not kept (session 20, H200; benchmarks/kernels/NOTES.md v21): x staged in chunks on mbarriers so
that warps start on the first chunk (4-16% slower), x through a ring of its own beside the weights with a named
barrier per input range and step (15-30%), the zero point taken out in fp32 with per-step sums of x (up to 7% at
batch 16), and each warp's first steps of weights prefetched into L2 while x is staged (up to 20%). ``rs`` is on
by default: the split sum's schedule, each thread loading all of its outputs' slot values at
once, slot by slot, instead of one output's slots one load at a time. The additions keep their order, so the bytes
are the same as with ``rs`` 0 (whose SASS is the kernel before it). On an H200 (2026-11-28, same run, graph harness) it took
batch 16 from 1.09-1.47x to 1.28-1.57x BF16 over the five Llama shapes, and batch 4 from 1.43-1.90x to 1.51-1.91x.

**The first kernel** (``int_mma``: 2-, 4- and 8-bit, groups multiples of 16; serves what the w kernel does not).
A = x (16 batch rows, read as it is), B = a 16 x 8 slice of weights: thread (g = lane / 4, t = lane % 4) holds
B[2t, 2t+1][g] and B[2t+8, 2t+9][g], pairs t and t + 4 of the slice's rk words. A block owns WR x NT x 8 outputs
and the whole of K (WK = WARPS / WR K ranges meeting in shared memory). Every block reads all of x from L2
through 4-byte loads, which is what limits it at batch 16 (benchmarks/kernels/NOTES.md, v9).
- Session 7's first version (K windows across blocks, x staged and rescaled to fp16 per window, fp32
  red.add and a finishing kernel) ran at 0.58-1.16x BF16 (single-launch harness).
- Issuing the loads of all 8 slices of a group before their arithmetic (launch config ``sc`` 8) was slower
  than one slice at a time (``sc`` 1) at 128 registers.

bf16 activations take 2- and 4-bit weights (128 + q is exact in bf16 up to q = 127); fp16 takes 2, 4 and 8.
3-bit layers (two planes per row) go to dequantize + cuBLAS at these batches. K must be a multiple of 16 and
the group a multiple of 16 (the rk layout's groups are). Otherwise, and for fp32 activations, neither kernel
applies and the caller dequantizes.
"""

from __future__ import annotations

import functools
import os

import torch

from .cuda_rt import (PRELUDE, XT, Launcher, device_index, grow_scratch, nvrtc_available, pdl_mode, sm90,
                      sm_count)

# launch configs (threads, row groups per block, n8 tiles per warp, slices whose loads go out together) by batch:
# the best of the H100 sweeps of 2026-11-28 at batches 4 and 16 (benchmarks/kernels/results/cuda-int-mma-h100-*)
TUNED = {4: dict(threads=256, wr=1, nt=4, sc=1), 16: dict(threads=256, wr=1, nt=4, sc=1)}


def tuned(m: int) -> dict:
    return TUNED[4] if m <= 8 else TUNED[16]

# what both kernels share: the magic constant of the activation dtype (OR a small code into its mantissa: M0 + q,
# exact), the exact x2 subtraction of M0 + z, and the m16n8k16 tensor-core instruction
_HELPERS = r"""
#define QMASK ((1u << BITS) - 1u)
#if XT == 1
#define MAGIC 0x64006400u     // fp16 1024 in both halves: OR q in, 1024 + q exact
#define M0 1024.f
#define MMA_T "f16"
#else
#define MAGIC 0x43004300u     // bf16 128 in both halves: 128 + q exact for q < 128
#define M0 128.f
#define MMA_T "bf16"
#endif

__device__ __forceinline__ u32 lop3_ao(u32 a, u32 b, u32 c) {  // (a & b) | c
  u32 d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 sub2(u32 a, u32 b) {  // a - b per half, exact here (small integers)
  u32 d;
#if XT == 1
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#else
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(b), "r"(0xBF80BF80u), "r"(a));  // b * -1 + a
#endif
  return d;
}
__device__ __forceinline__ u32 pack2(float v) {
  u32 d;
#if XT == 1
  asm("cvt.rn.f16x2.f32 %0, %1, %1;" : "=r"(d) : "f"(v));
#else
  asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(d) : "f"(v));
#endif
  return d;
}
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_T "." MMA_T ".f32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
"""

_SRC = r"""
#define E (32 / BITS)
#define NF (E / 2)            // code pairs per word
#define WPS (16 / E)          // words per 16-k slice (4-bit 2, 2-bit 1, 8-bit 4)
#define WARPS (THREADS / 32)
#define WK (WARPS / WR)       // K ranges per block
#define SL (GS / 16)          // slices per scale group
#define SC (SL < SCM ? SL : SCM)  // slices whose loads go out together (SCM: the launch config's sc)
// the slice's WPS words of one row: one 4-, 8- or 16-byte load
struct Words { u32 v[WPS]; };
__device__ __forceinline__ Words load_words(const u32* p, bool ok) {
  Words r;
#if WPS == 4
  uint4 q = ok ? __ldg((const uint4*)p) : make_uint4(0, 0, 0, 0);
  r.v[0] = q.x; r.v[1] = q.y; r.v[2] = q.z; r.v[3] = q.w;
#elif WPS == 2
  uint2 q = ok ? __ldg((const uint2*)p) : make_uint2(0, 0);
  r.v[0] = q.x; r.v[1] = q.y;
#else
  r.v[0] = ok ? __ldg(p) : 0u;
#endif
  return r;
}
// the exact q - z pairs of code pairs t and t + 4 (t < 4) of a slice: b0 and b1 of the B fragment
__device__ __forceinline__ void pairs_of(const Words& ws, int t, u32 zoff, u32& b0, u32& b1) {
#if BITS == 4
  const u32 w0 = ws.v[0] >> (4 * t), w1 = ws.v[1] >> (4 * t);             // pair t: word 0, pair t + 4: word 1
#elif BITS == 2
  const u32 w0 = ws.v[0] >> (2 * t), w1 = ws.v[0] >> (2 * t + 8);         // both in the slice's one word
#else
  const u32 sh = 8 * (t & 1);
  const u32 w0 = ((t >> 1) ? ws.v[1] : ws.v[0]) >> sh, w1 = ((t >> 1) ? ws.v[3] : ws.v[2]) >> sh;
#endif
  b0 = sub2(lop3_ao(w0, QMASK | (QMASK << 16), MAGIC), zoff);
  b1 = sub2(lop3_ao(w1, QMASK | (QMASK << 16), MAGIC), zoff);
}

// x: [M, K] 16-bit (pairs as u32), out: [M, N] of x's dtype; w, sz: the rk layout (words [N, KU * 4], group
// words [N, NG]); K % 16 == 0, GS % 16 == 0
extern "C" __global__ void __launch_bounds__(THREADS) int_mma(
    const u32* __restrict__ x, void* __restrict__ out, const void* __restrict__ bias, const u32* __restrict__ w,
    const u32* __restrict__ sz, int M, int N, int K, int KU, int NG, int HAS_BIAS)
{
#if WK > 1
  __shared__ float red[(WARPS - WR) * NT * 4 * 32];
#endif
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wr = warp % WR, wk = warp / WR;
  const int nb = (blockIdx.x * WR + wr) * NT * 8;     // the warp's first output
  const int gpw = (NG + WK - 1) / WK, g0 = wk * gpw, g1 = min(NG, g0 + gpw);
  const int K2 = K >> 1, RW = KU * 4;
  const bool r0 = g < M, r1 = g + 8 < M;
  const u32* x0 = x + (size_t)(r0 ? g : 0) * K2 + t;
  const u32* x1 = x + (size_t)(r1 ? g + 8 : 0) * K2 + t;
  float c[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
  const int ngf = K / GS;                             // groups whole inside K (the last may be partial)
  for (int grp = g0; grp < g1; ++grp) {
    u32 zw[NT], sw0[NT], sw1[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int n = nb + j * 8 + g, n0 = nb + j * 8 + 2 * t;
      zw[j] = n < N ? __ldg(sz + (size_t)n * NG + grp) : 0u;
      sw0[j] = n0 < N ? __ldg(sz + (size_t)n0 * NG + grp) : 0u;
      sw1[j] = n0 + 1 < N ? __ldg(sz + (size_t)(n0 + 1) * NG + grp) : 0u;
    }
    float cg[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) cg[j][0] = cg[j][1] = cg[j][2] = cg[j][3] = 0.f;
    const bool whole = grp < ngf;
#pragma unroll
    for (int sb = 0; sb < SL; sb += SC) {
      // every load of SC slices first (predicated, no branch: they issue together), then their arithmetic
      u32 a[SC][4];
      Words ws[SC][NT];
#pragma unroll
      for (int s = 0; s < SC; ++s) {
        const int k0 = grp * GS + (sb + s) * 16;
        const bool ok = whole || k0 < K;
        a[s][0] = r0 && ok ? __ldg(x0 + (k0 >> 1)) : 0u;
        a[s][1] = r1 && ok ? __ldg(x1 + (k0 >> 1)) : 0u;
        a[s][2] = r0 && ok ? __ldg(x0 + (k0 >> 1) + 4) : 0u;
        a[s][3] = r1 && ok ? __ldg(x1 + (k0 >> 1) + 4) : 0u;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int n = nb + j * 8 + g;
          ws[s][j] = load_words(w + (size_t)(n < N ? n : 0) * RW + (ok ? k0 / E : 0), n < N && ok);
        }
      }
      u32 zoff[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) zoff[j] = pack2(M0 + (float)(zw[j] & 0xFFFFu));
#pragma unroll
      for (int s = 0; s < SC; ++s)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          u32 b0, b1;
          pairs_of(ws[s][j], t, zoff[j], b0, b1);
          mma16816(cg[j], a[s], b0, b1);
        }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float s0 = scale_of(sw0[j]), s1 = scale_of(sw1[j]);
      c[j][0] += s0 * cg[j][0]; c[j][1] += s1 * cg[j][1];
      c[j][2] += s0 * cg[j][2]; c[j][3] += s1 * cg[j][3];
    }
  }
#if WK > 1
  if (wk > 0) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[(((warp - WR) * NT + j) * 4 + i) * 32 + lane] = c[j][i];
  }
  __syncthreads();
  if (wk > 0) return;
#pragma unroll
  for (int q = 1; q < WK; ++q)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[j][i] += red[((((q - 1) * WR + wr) * NT + j) * 4 + i) * 32 + lane];
#endif
#pragma unroll
  for (int j = 0; j < NT; ++j) {                      // C rows g, g + 8 (batch), columns 2t, 2t + 1
    const int n0 = nb + j * 8 + 2 * t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = g + 8 * h;
      if (r >= M) continue;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (n0 + e >= N) continue;
        float y = c[j][2 * h + e];
        if (HAS_BIAS) y += ldx(bias, n0 + e);
        stx(out, (long long)r * N + n0 + e, y);
      }
    }
  }
}
"""


# the A registers of a 16-row tile decoded from its rk words and one super-step's products (w and x kernels)
_W_TILE = r"""// the 8 tensor-core steps of one super-step for one row tile: its words qa4 (row g) and qb4 (row g + 8), their group
// words, and the super-step's B registers xv (load_xfrag); the products scaled per row into acc
// the A registers of step j (0-7) of a row tile: the code pairs of words qa (row g) and qb (row g + 8) at shift
// 8 (j % 2) of word j / 2 and 4 further, each as M0 + q less M0 + z (za, zb: M0 + the rows' zero points)
__device__ __forceinline__ void decode_a(u32 (&a)[4], const u32 (&qa)[4], const u32 (&qb)[4], const u32 za,
                                         const u32 zb, const int j) {
  const int wi = j >> 1, sh = 8 * (j & 1);
  a[0] = sub2(lop3_ao(qa[wi] >> sh, 0x000F000Fu, MAGIC), za);
  a[1] = sub2(lop3_ao(qb[wi] >> sh, 0x000F000Fu, MAGIC), zb);
  a[2] = sub2(lop3_ao(qa[wi] >> (sh + 4), 0x000F000Fu, MAGIC), za);
  a[3] = sub2(lop3_ao(qb[wi] >> (sh + 4), 0x000F000Fu, MAGIC), zb);
}
__device__ __forceinline__ void tile_wstep(float (&acc)[NT][4], const uint4 qa4, const uint4 qb4, const u32 swa,
                                           const u32 swb, const uint2 (&xv)[8][NT]) {
  const u32 za = pack2(M0 + (float)(swa & 0xFFFFu)), zb = pack2(M0 + (float)(swb & 0xFFFFu));
  const u32 qa[4] = {qa4.x, qa4.y, qa4.z, qa4.w}, qb[4] = {qb4.x, qb4.y, qb4.z, qb4.w};
  float c[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    u32 a[4];
    decode_a(a, qa, qb, za, zb, j);
    mma16816(c[0], a, xv[j][0].x, xv[j][0].y);
#if NT == 2
    mma16816(c[1], a, xv[j][1].x, xv[j][1].y);
#endif
  }
  const float s0 = scale_of(swa), s1 = scale_of(swb);
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    acc[n][0] = fmaf(s0, c[n][0], acc[n][0]); acc[n][1] = fmaf(s0, c[n][1], acc[n][1]);
    acc[n][2] = fmaf(s1, c[n][2], acc[n][2]); acc[n][3] = fmaf(s1, c[n][3], acc[n][3]);
  }
}

"""


# ---- weights as the A operand ("w" kernel, 4-bit, groups a multiple of 128) ----
# Thread (g, t) of a warp holds A[g | g+8][2t, 2t+1 | 2t+8, 2t+9] of a 16 x 16 weight tile: rows g and g + 8 of the
# warp's 16, and the tile's 16 inputs in an order of our choosing, the same for every row and for x. In super-step S
# (inputs 128S .. 128S + 127, one scale group or part of one), lane t reads 16-byte chunk 4S + t of both rows: 32
# codes each, in its four words. Step j (0-7) of the super-step takes word j / 2 of each row; its pairs at bit
# 8 (j % 2) and 8 (j % 2) + 4 are inputs 128S + 32t + 4j + {0, 1} and + {2, 3}. So B (x: inputs x batch rows) for
# thread (g, t) at step j is x[g][128S + 32t + 4j .. + 3]: the lane's 64 contiguous bytes of x per batch row hold its
# B registers for the whole super-step; the block stages its inputs' x in shared memory in exactly that order (one
# 8- or 16-byte read per lane and step). A = (M0 + q) - (M0 + z), exact; C[row][batch] in fp32 is scaled per
# super-step by the row's group scale. A block holds RT row tiles x KW input ranges of SPW super-steps each; its KW
# partial tiles meet in shared memory. When the grid splits K (gridDim.y > 1), each block writes its sums into its
# own slot of ``part`` ([gridDim.y][N][16] fp32), and the block that arrives last at its row group's counter adds the
# slots in slot order and writes the output (deterministic: no float atomics), then resets the counter.
_SRC_W = r"""
#define WARPS (RT * KW)
#define BROWS (RT * TW * 16)  // a block's rows
#define SPG (GS / 128)        // super-steps per scale group
static_assert(PD >= 2 && PD <= 5, "two slots of group words serve rings of 2 to 5 steps");
static_assert(TW == 1 || RP, "row tiles per warp (tw) above 1 with the register form (rp) only");

// the weights go through a ring of PD steps per warp in shared memory, filled by cp.async: with register
// destinations, the compiler placed the next step's loads just before their use, whatever their order in the source
__device__ __forceinline__ void cp16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src));
}
__device__ __forceinline__ void cp16a(void* dst, const void* src) {  // through L1
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src));
}
__device__ __forceinline__ void cp4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src));
}
__device__ __forceinline__ void cp8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N_>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N_)); }
// step S's weight copies into one ring slot: q, this lane's entry of the slot's [2][32] chunks (rows g, g + 8), read
// back by this lane alone, 16 bytes apart per lane (no bank conflicts). Every address is in bounds (rows clamped by
// the caller, S < NS); rows past N and batch rows past M hold other rows' values, which only reach outputs that are
// never written.
__device__ __forceinline__ void issue_wstep(uint4* q, const uint4* wa, const uint4* wb, int S) {
#if ABL & 8  // ablation (probe only): the step's 1 KB read as one contiguous piece of the row tile (wa: its base + lane)
  cp16(q, wa + 64 * S);
  cp16(q + 32, wa + 64 * S + 32);
#else
  cp16(q, wa + 4 * S);
  cp16(q + 32, wb + 4 * S);
#endif
}
// the group words of four steps at once: lane t of each quad copies those of step S + t (clamped to the warp's last
// step), and step S + i reads them from lane i of its quad by a shuffle (a quarter of the copies of one per step)
__device__ __forceinline__ void issue_sz(uint2* s, const u32* sa, const u32* sb, int S, int t, int slast) {
  const int st = min(S + t, slast);
  cp4(&s->x, sa + st / SPG);
  cp4(&s->y, sb + st / SPG);
}

#if MG
// MG (launch option ``mg``, off by default): the weights of four steps at a time, copied row-wise (each
// instruction: 2 rows x 256 contiguous bytes, where the per-step copies move 8 rows x 64 bytes) into a slot
// [16 rows][16 chunks] whose chunks are swizzled (chunk c of row r at c ^ 4 (r & 1)), so that the lanes' 16-byte
// reads of a step hit all banks. Measured on an H100 (2026-11-28): 2-8% faster than the per-step copies with 7
// warps per block and 32 steps per warp, 1-4% slower with 8 warps and 16 steps: not a clear gain.
__device__ __forceinline__ void issue_macro(uint4* slot, uint2* szs, const uint4* w, const u32* sa, const u32* sb,
                                            int rbase, int N, int KU, int Sm, int slast, int lane, int t) {
  const int c = min(4 * Sm + (lane & 15), KU - 1);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = 2 * i + (lane >> 4);
    cp16(slot + r * 16 + ((lane & 15) ^ ((r & 1) << 2)), w + (size_t)min(rbase + r, N - 1) * KU + c);
  }
  issue_sz(szs, sa, sb, Sm, t, slast);
}
#endif

// the B registers of one super-step from the block's staged x. XV 0: xs is this lane's entry in the step's [8 steps][32
// lanes][NT] uint2, one 8- or 16-byte read per lane and step. XV 1-3 (launch option ``xv``; they differ only in how
// stage_x copies): the step's [4 step pairs][NT][32 lanes] uint4, each the 8 inputs of one batch row that steps 2jp
// and 2jp + 1 take (x[g + 8n][128S + 32t + 8jp .. + 7]): one 16-byte read per lane, step pair and batch half, staged
// by 16-byte copies straight from x's rows. Both conflict-free. XLANE: the lane's offset (in uint2) from the step's base.
#if XV
#define XLANE(lane) (2 * (lane))
#else
#define XLANE(lane) ((lane) * NT)
#endif
__device__ __forceinline__ void load_xfrag(uint2 (&xv)[8][NT], const uint2* xs) {
#if XV
#pragma unroll
  for (int jp = 0; jp < 4; ++jp)
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const uint4 v = ((const uint4*)xs)[(jp * NT + n) * 32];
      xv[2 * jp][n] = make_uint2(v.x, v.y); xv[2 * jp + 1][n] = make_uint2(v.z, v.w);
    }
#else
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#if NT == 2
    const uint4 v = *(const uint4*)(xs + j * 32 * NT);
    xv[j][0] = make_uint2(v.x, v.y); xv[j][1] = make_uint2(v.z, v.w);
#else
    xv[j][0] = xs[j * 32];
#endif
  }
#endif
}

""" + _W_TILE + r"""// one super-step of the warp's row tile: x from the block's staged copy, weights from the ring (or registers)
__device__ __forceinline__ void compute_wstep(float (&acc)[NT][4], const uint4 qa4, const uint4 qb4, const uint2 sw,
                                              const uint2* xs) {
  uint2 xv[8][NT];
  load_xfrag(xv, xs);
  tile_wstep(acc, qa4, qb4, sw.x, sw.y, xv);
}

#if RP
// launch option ``tw`` (with rp): TW row tiles per warp share each x fragment read from shared memory. Per 16 x 16
// weight tile a warp reads 16 batch rows x 16 inputs of x (512 bytes) from shared memory against 128 bytes of codes,
// so with one tile per warp the x reads alone are four times the weight stream through L1/shared memory; TW tiles
// divide that by TW. The x fragments of the super-step are read once, then each tile runs its 8 steps.
__device__ __forceinline__ void compute_wstep_tw(float (&acc)[TW][NT][4], const uint4 (&qa4)[TW],
                                                 const uint4 (&qb4)[TW], const u32 (&swa)[TW], const u32 (&swb)[TW],
                                                 const uint2* xs) {
  uint2 xv[8][NT];
  load_xfrag(xv, xs);
#pragma unroll
  for (int i = 0; i < TW; ++i) tile_wstep(acc[i], qa4[i], qb4[i], swa[i], swb[i], xv);
}
#endif

#if WG
// launch option ``wg`` (with rp, TW 1, RT a multiple of 4; sm_90a): the products on Hopper's warpgroup tensor cores.
// The four warps of a warpgroup hold row tiles rt = 4i .. 4i + 3 of one input range, so one wgmma m64n(8 NT)k16 takes
// their A fragments (decoded as for mma.sync) and x from shared memory: no x fragments in registers, one instruction
// where each warp issued NT, and the tensor cores' work runs asynchronously. x is staged as x': per super-step two
// blocks [8 NT rows][128 bytes] in the 128-byte swizzled K-major layout the B descriptor reads (16-byte chunk c of row
// b at c ^ (b % 8)), input k' = 16 j + kk of the super-step holding x[b][128 S + 32 t + 4 j + e] for the A fragments'
// kk = 2t + (e & 1) + 8 (e >> 1).
// (the wgmma primitives wg_fence, wg_commit, wg_wait, fence_reg and bdesc: cuda_int_wgmma.WGMMA_HELPERS)
// one super-step of the warpgroup's four row tiles: this warp's A registers of its 8 steps (decode_a), 8 wgmmas into
// c on x' at shared address xb, a wait for them, then the group's products scaled per row into acc (the wgmma
// accumulators have the layout of the mma.sync ones: element 4n + i is c[n][i])
__device__ __forceinline__ void wg_wstep(float (&acc)[NT][4], const uint4 qa4, const uint4 qb4, const u32 swa,
                                         const u32 swb, const u32 xb) {
  const u32 za = pack2(M0 + (float)(swa & 0xFFFFu)), zb = pack2(M0 + (float)(swb & 0xFFFFu));
  const u32 qa[4] = {qa4.x, qa4.y, qa4.z, qa4.w}, qb[4] = {qb4.x, qb4.y, qb4.z, qb4.w};
  u32 a[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) decode_a(a[j], qa, qb, za, zb, j);
  float c[4 * NT];
#pragma unroll
  for (int i = 0; i < 4 * NT; ++i) c[i] = 0.f;
  wg_fence();
#pragma unroll
  for (int j = 0; j < 8; ++j)
    wgmma_step(c, a[j][0], a[j][1], a[j][2], a[j][3], bdesc(xb + (j >> 2) * (1024 * NT) + 32 * (j & 3)));
  wg_commit();
  wg_wait<0>();
#pragma unroll
  for (int i = 0; i < 4 * NT; ++i) fence_reg(c[i]);
  const float s0 = scale_of(swa), s1 = scale_of(swb);
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    acc[n][0] = fmaf(s0, c[4 * n], acc[n][0]); acc[n][1] = fmaf(s0, c[4 * n + 1], acc[n][1]);
    acc[n][2] = fmaf(s1, c[4 * n + 2], acc[n][2]); acc[n][3] = fmaf(s1, c[4 * n + 3], acc[n][3]);
  }
}
#endif

// x: [M, K] 16-bit, 16-byte aligned rows (K % 128 == 0); out: [M, N]; w, sz: the rk layout; part, cnt: the slots and
// the row groups' arrival counters (zero between launches), used when gridDim.y > 1; spw: super-steps per warp
extern "C" __global__ void __launch_bounds__(WARPS * 32) int_mma_w(
    const uint4* XR x, void* __restrict__ out, const void* __restrict__ bias, const uint4* __restrict__ w,
    const u32* __restrict__ sz, float* __restrict__ part, int* __restrict__ cnt, int M, int N, int K, int KU, int NG,
    int HAS_BIAS, int spw)
{
#if KW > 1
  __shared__ float red[(KW - 1) * RT * TW * NT * 4 * 32];
#endif
  __shared__ int last;
  extern __shared__ uint4 dsm[];  // the weight rings [WARPS][PD][2][32], group words [WARPS][2][32], then x
  uint4* wq = dsm;
#if MG  // slots of four steps: [WARPS][PD][16 rows][16 chunks], then [WARPS][PD][32] group words
  uint2* wsz = (uint2*)(dsm + WARPS * PD * 256);
  uint2* xs = wsz + WARPS * PD * 32;
#elif RP  // weights in registers: x alone
  uint2* xs = (uint2*)dsm;
#if WG  // x' needs 1024-byte alignment (the launch asks for 1 KB more)
  unsigned char* xsw = (unsigned char*)(((size_t)dsm + 1023) & ~(size_t)1023);
  const u32 xsw0 = (u32)__cvta_generic_to_shared(xsw);
#endif
#else
  uint2* wsz = (uint2*)(dsm + WARPS * PD * 64);
  uint2* xs = wsz + WARPS * 2 * 32;  // [block's super-steps][8 steps][32 lanes][NT]
#endif
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rt = warp % RT, kw = warp / RT;
  const int ra = (blockIdx.x * RT + rt) * TW * 16 + g, rb = ra + 8;  // the warp's first row tile (TW: with rp)
  const int NS = K >> 7;
  const int sb0 = blockIdx.y * KW * spw, sb1 = min(sb0 + KW * spw, NS);  // the block's super-steps
  const int s0 = sb0 + kw * spw, s1 = min(s0 + spw, NS);                  // this warp's
#if ABL & 1  // ablation (probe only): every warp reads row tile 0, so the weights come from L2
  const int rac = min(g, N - 1), rbc = min(g + 8, N - 1);
#else
  const int rac = min(ra, N - 1), rbc = min(rb, N - 1);
#endif
#if ABL & 8
  const uint4* wa = w + (size_t)max(min((blockIdx.x * RT + rt) * 16, N - 16), 0) * KU + lane;
#else
  const uint4* wa = w + (size_t)rac * KU + t;
#endif
  const uint4* wb = w + (size_t)rbc * KU + t;
  const u32* sa = sz + (size_t)rac * NG;
  const u32* sb = sz + (size_t)rbc * NG;
#if MG
  const int rbase = (blockIdx.x * RT + rt) * 16;
  uint4* mq = wq + (size_t)warp * PD * 256;            // [PD][16 rows][16 chunks]
  uint2* ms = wsz + (size_t)warp * PD * 32 + lane;     // [PD][32 lanes] group words
  const int nm = (s1 - s0 + 3) >> 2;                   // this warp's slots of four steps
#elif RP
  (void)wq;
  // the warp's TW row tiles: rows ra + 16 i and rb + 16 i (clamped), their words and group words
  const uint4* wpa[TW];
  const uint4* wpb[TW];
  const u32* spa[TW];
  const u32* spb[TW];
#pragma unroll
  for (int i = 0; i < TW; ++i) {
    const int r0 = min(rac + 16 * i, N - 1), r1 = min(rbc + 16 * i, N - 1);
    wpa[i] = w + (size_t)r0 * KU + t;
    wpb[i] = w + (size_t)r1 * KU + t;
    spa[i] = sz + (size_t)r0 * NG;
    spb[i] = sz + (size_t)r1 * NG;
  }
  uint4 qa[PT][TW], qb[PT][TW];  // PT steps in registers (launch option pt), then the next PT in flight
  u32 za[PT][TW], zb[PT][TW];
  auto load_step = [&](uint4 (&da)[TW], uint4 (&db)[TW], u32 (&ea)[TW], u32 (&eb)[TW], int S) {
#pragma unroll
    for (int i = 0; i < TW; ++i) {
      da[i] = ldw(wpa[i] + 4 * S);
      db[i] = ldw(wpb[i] + 4 * S);
      ea[i] = __ldg(spa[i] + S / SPG);
      eb[i] = __ldg(spb[i] + S / SPG);
    }
  };
#else
  uint4* rq = wq + (size_t)warp * PD * 64 + lane;
  uint2* rs = wsz + (size_t)warp * 2 * 32 + lane;  // two slots of four steps' group words
#endif
  // the block's x first, all of it by cp.async (one group): batch rows 0 .. 8 NT - 1 (rows past M clamped), input
  // k = 128 S + 32 t + 4 j + e of batch row b to step j of lane (b % 8) * 4 + t, entry b / 8, 8 bytes per copy.
  // Thread u takes t = u % 4 and batch row (u / 4) % (8 NT) fastest, so a warp's copies fill neighbouring entries.
#if WG
  // x' (see wg_wstep): a thread per (super-step sl, batch row b, step pair jp), four 16-byte loads x[b][128 S + 32 t +
  // 8 jp ..] (t = 0..3), whose words 2q + kb are word t of k'-chunk 2 (2 jp + q) + kb; rows past M clamped
  auto stage_x = [&]() {
    for (int u = threadIdx.x; u < (sb1 - sb0) * 32 * NT; u += WARPS * 32) {
      const int jp = u & 3, b = (u >> 2) % (8 * NT), sl = (u >> 2) / (8 * NT);
      const uint4* src = x + (size_t)min(b, M - 1) * (K >> 3) + (sb0 + sl) * 16 + jp;
      uint4 p[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) p[t] = src[4 * t];
      unsigned char* row = xsw + (size_t)sl * (2048 * NT) + b * 128;
#pragma unroll
      for (int m = 0; m < 4; ++m) {  // m = 2q + kb
        const int cc = 2 * (2 * jp + (m >> 1)) + (m & 1);
        const uint4 v = m == 0 ? make_uint4(p[0].x, p[1].x, p[2].x, p[3].x)
                      : m == 1 ? make_uint4(p[0].y, p[1].y, p[2].y, p[3].y)
                      : m == 2 ? make_uint4(p[0].z, p[1].z, p[2].z, p[3].z)
                               : make_uint4(p[0].w, p[1].w, p[2].w, p[3].w);
        *(uint4*)(row + (cc >> 3) * (1024 * NT) + (((cc & 7) ^ (b & 7)) << 4)) = v;
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the tensor cores after the barrier
    cp_commit();
  };
#else
  auto stage_x = [&]() {
    for (int u = threadIdx.x; u < (ABL & 4 ? 0 : (sb1 - sb0) * 128 * NT); u += WARPS * 32) {  // ABL 4: no staging
#if XV == 3  // a warp's copies: 2 rows x 16 chunks (512 contiguous bytes per row pair); each quarter-warp one step
            // pair, 8 neighbouring entries (128 contiguous bytes of shared memory)
      const int tt = u & 3, jp = (u >> 3) & 3, b = ((u >> 2) & 1) + 2 * ((u >> 5) % (4 * NT)), sl = (u >> 5) / (4 * NT);
#else
      const int tt = u & 3, b = (u >> 2) % (8 * NT), rest = (u >> 2) / (8 * NT), jp = rest & 3, sl = rest >> 2;
#endif
#if XV  // a lane's 16-byte entry is 16 contiguous bytes of one row of x; XV 1 through L2 only, 2 and 3 through L1
      const uint4* src = x + (size_t)min(b, M - 1) * (K >> 3) + (sb0 + sl) * 16 + 4 * tt + jp;
      uint4* dx = (uint4*)xs + ((size_t)(sl * 4 + jp) * NT + (b >> 3)) * 32 + (b & 7) * 4 + tt;
#if XV == 1
      cp16(dx, src);
#else
      cp16a(dx, src);
#endif
#else
      const uint2* src = (const uint2*)(x + (size_t)min(b, M - 1) * (K >> 3) + (sb0 + sl) * 16 + 4 * tt + jp);
      uint2* d = xs + ((size_t)(sl * 8 + 2 * jp) * 32 + (b & 7) * 4 + tt) * NT + (b >> 3);
      cp8(d, src);
      cp8(d + 32 * NT, src + 1);
#endif
    }
    cp_commit();
  };
#endif
#if !RP
  // the weight ring of PD slots per lane: steps s0 .. s0 + PD - 2 up front, then each step issues the one PD - 1
  // ahead (past the end: step s1 - 1 again, so every wait counts the same number of groups) and waits for its own
  auto ring_prologue = [=]() {  // by value: by reference changed the SASS of every form
    if (s0 < s1) {
#pragma unroll
      for (int d = 0; d < PD - 1; ++d) {
#if MG
        issue_macro(mq + d * 256, ms + d * 32, w, sa, sb, rbase, N, KU, s0 + 4 * min(d, nm - 1), s1 - 1, lane, t);
#else
        issue_wstep(rq + d * 64, wa, wb, min(s0 + d, s1 - 1));
        if ((d & 3) == 0) issue_sz(rs + ((d >> 2) & 1) * 32, sa, sb, s0 + d, t, s1 - 1);
#endif
        cp_commit();
      }
    } else {
#pragma unroll
      for (int d = 0; d < PD - 1; ++d) cp_commit();  // empty groups: the waits count the same
    }
  };
#endif
#if RP
  // rp: the first register tile's weights go out first; with gd they are loaded before the wait for the previous
  // grid (they do not depend on it), x only after it
#pragma unroll
  for (int p = 0; p < PT; ++p)
    if (s0 + p < s1) load_step(qa[p], qb[p], za[p], zb[p], s0 + p);
#if GD
  gdc_wait();
#if GD == 1
  gdc_launch();
#endif
#endif
  stage_x();
  cp_wait<0>();
#elif GD
  // programmatic dependent launch (launch option gd; not with mg): this grid may start while the kernel before
  // it in the stream ends. The ring's first steps (and their group words) do not depend on it and go first; x (that
  // kernel's output, in a decode) is copied, and anything written, only after gdc_wait, which every thread passes.
  // The ring's groups then precede x's, so the prologue waits for all of them.
  ring_prologue();
  gdc_wait();
#if GD == 1
  gdc_launch();  // the next grid may be scheduled now (its blocks take an SM as this grid's blocks leave)
#endif
  stage_x();
  cp_wait<0>();
#else
  stage_x();
  ring_prologue();
  cp_wait<PD - 1>();  // this thread's x copies are done
#endif
  __syncthreads();    // everyone's

  float accs[TW][NT][4];
  float (&acc)[NT][4] = accs[0];
#pragma unroll
  for (int i = 0; i < TW; ++i)
#pragma unroll
    for (int n = 0; n < NT; ++n) accs[i][n][0] = accs[i][n][1] = accs[i][n][2] = accs[i][n][3] = 0.f;
#if MG
  if (s0 < s1) {
    for (int mi = 0; mi < nm; ++mi) {
      __syncwarp();  // every lane is done reading the slot refilled next
      const int ahead = (mi + PD - 1) % PD;
      issue_macro(mq + ahead * 256, ms + ahead * 32, w, sa, sb, rbase, N, KU, s0 + 4 * min(mi + PD - 1, nm - 1),
                  s1 - 1, lane, t);
      cp_commit();
      cp_wait<PD - 1>();
      __syncwarp();  // every lane's copies of this slot are visible
      const int slot = mi % PD;
      const uint2 own = ms[slot * 32];
      const uint4* sq = mq + slot * 256;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int S = s0 + 4 * mi + j;
        if (S >= s1) break;
        const int src = (lane & ~3) | j, sc = (4 * j + t) ^ ((g & 1) << 2);
        const uint2 sw = make_uint2(__shfl_sync(0xffffffffu, own.x, src), __shfl_sync(0xffffffffu, own.y, src));
        compute_wstep(acc, sq[g * 16 + sc], sq[(g + 8) * 16 + sc], sw,
                      xs + (size_t)(S - sb0) * 8 * 32 * NT + XLANE(lane));
      }
    }
    cp_wait<0>();
  }
#elif RP
  // RP (launch option ``rp``, the default at batches 2-8 with pt 4): the weights in registers, PT steps per register
  // tile, the next tile's loads in a block of their own: the compiler keeps such a block's loads ahead of the
  // arithmetic after it (as int_gemv's prefetch does), where loads in the same block as the arithmetic were issued
  // right before their use
  (void)wa; (void)wb; (void)sa; (void)sb;
  if (s0 < s1) {
    for (int S = s0; S < s1; S += PT) {
      uint4 na[PT][TW], nb[PT][TW];
      u32 nza[PT][TW], nzb[PT][TW];
#pragma unroll
      for (int p = 0; p < PT; ++p)
        if (S + PT + p < s1) load_step(na[p], nb[p], nza[p], nzb[p], S + PT + p);
#pragma unroll
      for (int p = 0; p < PT; ++p)
#if ABL & 2  // ablation (probe only): the words are loaded but not decoded or multiplied, x not read
        if (S + p < s1)
          accs[0][0][0] += __uint_as_float((qa[p][0].x ^ qa[p][0].y ^ qa[p][0].z ^ qa[p][0].w ^ qb[p][0].x ^
                                            qb[p][0].y ^ qb[p][0].z ^ qb[p][0].w ^ za[p][0] ^ zb[p][0]) & 0x3F7FFFFFu);
#else
        if (S + p < s1)
#if WG
          wg_wstep(accs[0], qa[p][0], qb[p][0], za[p][0], zb[p][0], xsw0 + (u32)(S + p - sb0) * (2048 * NT));
#else
          compute_wstep_tw(accs, qa[p], qb[p], za[p], zb[p], xs + (size_t)(S + p - sb0) * 8 * 32 * NT + XLANE(lane));
#endif
#endif
#pragma unroll
      for (int p = 0; p < PT; ++p)
#pragma unroll
        for (int i = 0; i < TW; ++i) {
          qa[p][i] = na[p][i]; qb[p][i] = nb[p][i]; za[p][i] = nza[p][i]; zb[p][i] = nzb[p][i];
        }
    }
  }
#else
  if (s0 < s1) {
    for (int S = s0, slot = 0; S < s1; ++S) {
      const int ahead = slot == 0 ? PD - 1 : slot - 1;  // (slot + PD - 1) % PD
      const int i = S - s0, ip = i + PD - 1;  // this step's and the issued one's place in the warp's range
      issue_wstep(rq + ahead * 64, wa, wb, min(S + PD - 1, s1 - 1));
      if ((ip & 3) == 0 && S + PD - 1 < s1) issue_sz(rs + ((ip >> 2) & 1) * 32, sa, sb, S + PD - 1, t, s1 - 1);
      cp_commit();
      cp_wait<PD - 1>();
      const uint2 own = rs[((i >> 2) & 1) * 32];
      const int src = (lane & ~3) | (i & 3);
      const uint2 sw = make_uint2(__shfl_sync(0xffffffffu, own.x, src), __shfl_sync(0xffffffffu, own.y, src));
#if ABL & 2  // ablation (probe only): the words are read from the ring but not decoded or multiplied
      { const uint4 a = rq[slot * 64], b = rq[slot * 64 + 32];
        acc[0][0] += __uint_as_float((a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ sw.x) & 0x3F7FFFFFu); }
#else
      compute_wstep(acc, rq[slot * 64], rq[slot * 64 + 32], sw,
                    xs + (size_t)(S - sb0) * 8 * 32 * NT + XLANE(lane));
#endif
      slot = slot == PD - 1 ? 0 : slot + 1;
    }
    cp_wait<0>();
  }
#endif

#if KW > 1
  if (kw > 0) {
#pragma unroll
    for (int tw = 0; tw < TW; ++tw)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          red[(((((kw - 1) * RT + rt) * TW + tw) * NT + n) * 4 + i) * 32 + lane] = accs[tw][n][i];
  }
  __syncthreads();
  if (kw == 0) {
#pragma unroll
    for (int q = 1; q < KW; ++q)
#pragma unroll
      for (int tw = 0; tw < TW; ++tw)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            accs[tw][n][i] += red[(((((q - 1) * RT + rt) * TW + tw) * NT + n) * 4 + i) * 32 + lane];
  }
#endif
  // C[row ra | rb (+ 16 tw)][batch 8n + 2t, + 1]
  if (gridDim.y == 1) {
    if (kw == 0) {
#pragma unroll
      for (int tw = 0; tw < TW; ++tw)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = (i < 2 ? ra : rb) + 16 * tw, b = 8 * n + 2 * t + (i & 1);
            if (r < N && b < M) stx(out, (long long)b * N + r, accs[tw][n][i] + (HAS_BIAS ? ldx(bias, r) : 0.f));
          }
    }
    return;
  }
  if (kw == 0) {
#pragma unroll
    for (int tw = 0; tw < TW; ++tw)
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int r0 = ra + 16 * tw, r1 = rb + 16 * tw;
        if (r0 < N)
          *(float2*)(part + ((size_t)blockIdx.y * N + r0) * 16 + 8 * n + 2 * t) =
              make_float2(accs[tw][n][0], accs[tw][n][1]);
        if (r1 < N)
          *(float2*)(part + ((size_t)blockIdx.y * N + r1) * 16 + 8 * n + 2 * t) =
              make_float2(accs[tw][n][2], accs[tw][n][3]);
      }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(cnt + blockIdx.x, 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int NB = NT * 8;  // batch columns the slots hold
#if RS
  // all of this thread's outputs at once, slot by slot: PER loads in flight per slot instead of one (the same
  // additions in the same order as below)
#define PER ((BROWS * NT * 8 + WARPS * 32 - 1) / (WARPS * 32))
  float y[PER];
#pragma unroll
  for (int e = 0; e < PER; ++e) y[e] = 0.f;
  for (int sl = 0; sl < (int)gridDim.y; ++sl) {
#pragma unroll
    for (int e = 0; e < PER; ++e) {
      const int i = threadIdx.x + e * WARPS * 32, r = blockIdx.x * BROWS + i / NB, b = i % NB;
      if (i < BROWS * NB && r < N && b < M) y[e] += __ldcg(part + ((size_t)sl * N + r) * 16 + b);
    }
  }
#pragma unroll
  for (int e = 0; e < PER; ++e) {
    const int i = threadIdx.x + e * WARPS * 32, r = blockIdx.x * BROWS + i / NB, b = i % NB;
    if (i < BROWS * NB && r < N && b < M) stx(out, (long long)b * N + r, y[e] + (HAS_BIAS ? ldx(bias, r) : 0.f));
  }
#else
  for (int i = threadIdx.x; i < BROWS * NB; i += WARPS * 32) {
    const int r = blockIdx.x * BROWS + i / NB, b = i % NB;
    if (r >= N || b >= M) continue;
    float y = 0.f;
    for (int sl = 0; sl < (int)gridDim.y; ++sl) y += __ldcg(part + ((size_t)sl * N + r) * 16 + b);
    if (HAS_BIAS) y += ldx(bias, r);
    stx(out, (long long)b * N + r, y);
  }
#endif
  if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
}
"""


def source(bits: int, xt: int, threads: int, wr: int, nt: int, gs: int, sbf16: bool, sc: int = 1) -> str:
    defs = dict(BITS=bits, XT=xt, THREADS=threads, WR=wr, NT=nt, GS=gs, SBF16=int(sbf16), SCM=sc)
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + _HELPERS + _SRC


def available() -> bool:
    return nvrtc_available("LEANQ_CUDA_INT")


_BROKEN: set = set()  # devices where compiling or launching failed once (dequantize + cuBLAS serves there)


@functools.lru_cache(maxsize=None)
def _has_mma(device: int) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)  # mma.m16n8k16 with bf16: sm_80 and later


def supports(pk: dict, x2: torch.Tensor) -> bool:
    """Whether this kernel takes x2 [M, K] on layout ``pk`` (else dequantize + cuBLAS serves)."""
    M, K = x2.shape
    if not (2 <= M <= 16 and x2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16) and K % 16 == 0
            and pk["group"] % 16 == 0 and (x2.dtype == torch.float16 or pk["bits"] <= 4) and pk["bits"] != 3
            and x2.data_ptr() % 4 == 0):
        return False
    dev = device_index(x2)
    return dev not in _BROKEN and _has_mma(dev)


def _launcher(src: str, entry: str, label: str, device: int) -> Launcher:
    """Kernel ``entry`` of source ``src`` compiled by NVRTC for ``device``, behind a driver-level launcher."""
    with torch.cuda.device(device):
        return Launcher(torch.cuda._compile_kernel(src, entry), label)


@functools.lru_cache(maxsize=None)
def _compiled(bits: int, xt: int, threads: int, wr: int, nt: int, gs: int, sbf16: bool, sc: int,
              device: int) -> Launcher:
    return _launcher(source(bits, xt, threads, wr, nt, gs, sbf16, sc), "int_mma", "cuda-int-mma", device)


def run_int_mma(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K], 2 <= M <= 16 (fp16/bf16, contiguous; see :func:`supports`) -> [M, N] of x2.dtype."""
    M, K = x2.shape
    assert 2 <= M <= 16 and K == pk["K"] and x2.is_contiguous(), (M, K, pk["K"])
    cfg = dict(cfg or tuned(M))
    threads, wr, nt = cfg["threads"], cfg["wr"], cfg["nt"]
    assert threads % (32 * wr) == 0, cfg
    dev = device_index(x2)
    kern = _compiled(pk["bits"], XT[x2.dtype], threads, wr, nt, pk["group"], bool(pk["sbf16"]), int(cfg.get("sc", 1)),
                     dev)
    N = pk["N"]
    if out is None:
        out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    kern(grid=(-(-N // (wr * nt * 8)), 1, 1), block=(threads, 1, 1),
         args=[x2, out, bias if bias is not None else out, pk["words"], pk["sz"], M, N, K, pk["KU"], pk["NG"],
               int(bias is not None)])
    return out


# ---- the "w" kernel (weights as the A operand): config, scratch, launch ----
# launch config: RT row tiles of 16 x KW input ranges per block (RT * KW warps), SPW super-steps of 128 inputs per
# warp (None: the one whose grid fills its last wave best, see w_launch), PD ring slots per warp (PD - 1 steps ahead)
W_STEP_BYTES = 32  # shared memory per lane and ring slot: two 16-byte chunks (and two slots of group words per warp)
W_SMEM_MAX = 227 * 1024  # shared memory a block may have (H100; the launch asks for it above 48 KB)
# xv 3: x staged by 16-byte copies through L1, a warp's copies two whole 256-byte row pieces (session 19: batch 16
# 1.50x -> 1.68x BF16, geomean of the five Llama shapes on an H200; benchmarks/kernels/NOTES.md, v20)
W_DEFAULT = dict(rt=4, kw=4, spw=None, pd=4, rs=1, gd=1, xv=3)
# the choice when none is given (w_config): two input ranges per block, a ring of 3, and the rows per block (rt) and
# steps per warp (spw) whose grid needs the fewest waves and fills the last one best, larger spw first among equals.
# On an H100 (2026-11-28 sweeps) long warps (spw 16) won on the large shapes, and SMs left idle by the grid
# (112 of 132 at 14336 x 4096 with rt 8) were what the best config lost most to.
W_RT = (8, 7, 6, 5, 4)
W_SPW = (16, 12, 11, 10, 8, 6, 4, 3, 2, 1)
# batches 2-8 (one n8 tile): the weights in registers, 4 super-steps per register tile (4 KB per warp in flight), in
# the geometry the search gives the ring. On an H200 (2026-11-28, graph harness, the five Llama shapes) batch 4 went
# from 7.9-17.5 us (1.71-2.11x BF16) with the ring to 7.0-14.7 us (1.93-2.30x); at batch 16 (two n8 tiles, twice the
# x fragments: 128 registers) the same form was not faster than the ring (benchmarks/kernels/NOTES.md, v22)
W_SMALL = dict(rp=1, pt=4)
W_ON = os.environ.get("LEANQ_MMA_W", "1") != "0"  # batches 2-16 of 4-bit layers on the w kernel where it applies
TUNED_W: dict = {}  # batch bucket (8: batches 2-8, 16: 9-16) -> config, from the H100 sweeps of bench_cuda_int.py
# (N, K) -> config where a sweep beat the search's choice on a 132-SM part. 4096 x 4096 (an H200, 2026-11-28, two
# runs): 4 row tiles, one input range, 8 steps per warp (256 blocks of 4 warps, K split in 4) took batch 16 from 10.0
# to 9.4 us and batch 4 from 8.7 to 7.9; on the four larger Llama shapes every such config was slower than the search's
# (benchmarks/kernels/NOTES.md, v21)
W_SHAPES = {(4096, 4096): dict(rt=4, kw=1, spw=8, pd=3)}


def source_w(xt: int, rt: int, kw: int, nt: int, gs: int, sbf16: bool, pd: int = 4, abl: int = 0, mg: int = 0,
             rp: int = 0, rs: int = 0, gd: int = 0, tw: int = 1, xv: int = 0, pt: int = 1, wg: int = 0) -> str:
    """``gd`` 1: programmatic dependent launch (the ring's first steps, or with ``rp`` the first register tile,
    loaded before the wait for the previous grid, the next grid let in after it; the launcher must pass ``pdl``), 2
    the same with the next grid let in only as this one ends; not with ``mg``. ``tw``: row tiles per warp, sharing
    each x fragment (with ``rp`` only). ``xv`` 1: x staged by 16-byte copies in step pairs (see load_xfrag), 0 by
    8-byte copies per step (2 and 3: the same through L1, 3 with the copies ordered by x's rows). ``wg`` 1 (with
    ``rp``, ``tw`` 1 and ``rt`` a multiple of 4; sm_90a): the products on warpgroup tensor cores (wgmma), x staged for
    their B descriptor (see wg_wstep), each super-step's wgmmas waited for before the next decode (a form that decoded the
    next super-step while they ran measured the same on an H200 and was removed: NOTES.md, v24)."""
    assert gd in (0, 1, 2) and (not gd or not mg), (gd, mg)
    assert not wg or (rp and tw == 1 and rt % 4 == 0 and abl == 0), (wg, rp, tw, rt, abl)
    assert wg in (0, 1), wg
    assert tw in (1, 2, 3, 4) and (tw == 1 or rp), (tw, rp)
    assert 1 <= pt <= 8 and (pt == 1 or rp), (pt, rp)
    defs = dict(BITS=4, XT=xt, RT=rt, KW=kw, NT=nt, GS=gs, SBF16=int(sbf16), PD=pd, ABL=abl, MG=mg, RP=rp, RS=rs,
                GD=int(gd), TW=tw, XV=int(xv), PT=int(pt), WG=int(wg))
    wgmma = ""
    if wg:
        from .cuda_int_wgmma import WGMMA_HELPERS, _wgmma_asm

        wgmma = WGMMA_HELPERS + _wgmma_asm(8 * nt, xt)
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + _HELPERS + wgmma + _SRC_W


def gate_w(pk: dict, x2: torch.Tensor) -> bool:
    """What the w kernel (and the x kernel, :mod:`leanq.kernels.cuda_int_mmax`) can compute: 4-bit rk layouts with K
    and the group multiples of 128, 16-bit activations with 16-byte aligned rows, batches 2-16, on a GPU with
    mma.m16n8k16."""
    M, K = x2.shape
    if not (2 <= M <= 16 and x2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16) and pk["bits"] == 4
            and K % 128 == 0 and pk["group"] % 128 == 0 and x2.data_ptr() % 16 == 0 and x2.is_contiguous()):
        return False
    return _has_mma(device_index(x2))


def supports_w(pk: dict, x2: torch.Tensor) -> bool:
    """The w kernel's gate: :func:`gate_w`, on a device where it has not failed."""
    return gate_w(pk, x2) and device_index(x2) not in _BROKEN_W


_BROKEN_W: set = set()


def w_smem(c: dict, nt: int) -> int:
    """Dynamic shared memory of a w launch: the weight rings, then the block's staged x (KW * SPW super-steps)."""
    warps = c["rt"] * c["kw"]
    if c.get("mg"):  # slots of four steps: 16 rows x 256 bytes, and the lanes' group words
        return warps * c["pd"] * (4096 + 32 * 8) + c["kw"] * c["spw"] * 8 * 32 * nt * 8
    if c.get("rp"):  # weights in registers: the staged x alone (wg: 1 KB more, for its 1024-byte alignment)
        return c["kw"] * c["spw"] * 8 * 32 * nt * 8 + (1024 if c.get("wg") else 0)
    return warps * (c["pd"] * 32 * W_STEP_BYTES + 2 * 32 * 8) + c["kw"] * c["spw"] * 8 * 32 * nt * 8


def w_launch(M: int, N: int, K: int, cfg: dict | None, sms: int, blocks_per_sm=None) -> tuple[dict, tuple[int, int]]:
    """The w kernel's config (spw filled in) and grid for x [M, K] and N outputs. Without a given spw, the one
    (at least 2 where K allows) whose grid fills its last wave best, ``blocks_per_sm(smem)`` (default 1) giving
    how many blocks an SM holds."""
    c = dict(W_DEFAULT, **(cfg or TUNED_W.get(8 if M <= 8 else 16, {})))
    if not 2 <= c["pd"] <= 5:
        raise ValueError(f"cuda-int-mma-w: pd {c['pd']} outside 2-5")
    for opt in ("tw", "pt"):  # row tiles per warp, steps per register tile: the register form's
        if int(c.get(opt, 1)) != 1 and not c.get("rp"):
            raise ValueError(f"cuda-int-mma-w: {opt} {c[opt]} needs rp")
    tw = int(c.get("tw", 1))
    tiles, ns = -(-N // 16), K // 128
    top = -(-ns // c["kw"])  # no more steps per warp than the K range holds
    nt = 1 if M <= 8 else 2
    gx = -(-tiles // (c["rt"] * tw))
    per_step = c["kw"] * 8 * 32 * nt * 8  # staged x per super-step of every warp's range
    static = (c["kw"] - 1) * c["rt"] * tw * nt * 4 * 32 * 4 + 16  # the kernel's own: partial tiles, last-block flag
    if static > 48 * 1024:
        raise ValueError(f"cuda-int-mma-w: config {cfg} needs more static shared memory than a block has")
    room = (W_SMEM_MAX - static - w_smem(dict(c, spw=0), nt)) // per_step
    if room < 1:
        raise ValueError(f"cuda-int-mma-w: config {cfg} needs more shared memory than a block has")
    top = min(top, room)
    if c.get("spw"):
        c["spw"] = int(min(c["spw"], top))
    else:
        best = None
        for spw in range(min(2, top), top + 1):
            blocks = gx * -(-ns // (c["kw"] * spw))
            try:
                slots = sms * (blocks_per_sm(w_smem(dict(c, spw=spw), nt)) if blocks_per_sm else 1)
            except RuntimeError:  # refused by the device (shared memory): not a candidate
                continue
            eff = blocks / (-(-blocks // slots) * slots)
            if best is None or eff > best[0] + 1e-9:
                best = (eff, spw)
        c["spw"] = best[1]
    return c, (gx, -(-ns // (c["kw"] * c["spw"])))


def w_config(M: int, N: int, K: int, sms: int) -> dict:
    """The launch config for x [M, K] and N outputs when the caller gives none: TUNED_W's for the batch bucket, else
    W_SHAPES's for the shape on a 132-SM part, else over W_RT x W_SPW (kw 2, pd 3) the grid of the fewest waves (one
    block per SM), then the best filled last wave, then the most steps per warp; batches 2-8 add W_SMALL (the
    register form)."""
    bucket = 8 if M <= 8 else 16
    if TUNED_W.get(bucket):
        return dict(TUNED_W[bucket])
    base = W_SHAPES[(N, K)] if sms == 132 and (N, K) in W_SHAPES else _w_search(bucket, N, K, sms)
    return dict(base, **(W_SMALL if bucket == 8 else {}))


@functools.lru_cache(maxsize=None)
def _w_search(M: int, N: int, K: int, sms: int) -> dict:
    """w_config's search, once per (batch bucket, shape, SM count): it runs on every launch without a config."""
    best = None
    for rt in W_RT:
        for spw in W_SPW:
            c, (gx, gy) = w_launch(M, N, K, dict(rt=rt, kw=2, spw=spw, pd=3), sms)
            if c["spw"] != spw:  # clamped: the same grid as a smaller spw already listed
                continue
            slots = sms  # one block per SM: the regime the sweeps measured (16 warps, 60-180 KB of shared memory)
            waves = -(-gx * gy // slots)
            key = (-waves, round(gx * gy / (waves * slots), 2), spw, rt)
            if best is None or key > best[0]:
                best = (key, dict(rt=rt, kw=2, spw=spw, pd=3))
    return best[1]


_WSCRATCH: dict = {}


def _w_scratch(device: torch.device, floats: int, ints: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-device slots (fp32, at least 1M) and zeroed arrival counters (int32) for split-K launches, grown when
    needed; None while a CUDA graph is being captured and they are too small (the caller then avoids the split)."""
    return grow_scratch(_WSCRATCH, device, floats, ints, min_floats=1 << 20)


if torch.cuda.is_available():  # allocate now, outside any CUDA-graph memory pool (see triton_half2._counters)
    _w_scratch(torch.device("cuda", torch.cuda.current_device()), 1, 1)


@functools.lru_cache(maxsize=None)
def _compiled_w(xt: int, rt: int, kw: int, nt: int, gs: int, sbf16: bool, pd: int, abl: int, mg: int, rp: int,
                device: int, rs: int = 0, gd: int = 0, tw: int = 1, xv: int = 0, pt: int = 1, wg: int = 0) -> Launcher:
    src = source_w(xt, rt, kw, nt, gs, sbf16, pd, abl, mg, rp, rs, gd, tw, xv, pt, wg)
    if not wg:
        return _launcher(src, "int_mma_w", "cuda-int-mma-w", device)
    with torch.cuda.device(device):  # wgmma: sm_90a
        return Launcher(torch.cuda._compile_kernel(src, "int_mma_w", compute_capability="90a"), "cuda-int-mma-w")


def run_int_mma_w(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K], 2 <= M <= 16 (see :func:`supports_w`) -> [M, N] of x2.dtype, the w kernel."""
    M, K = x2.shape
    assert supports_w(pk, x2) and K == pk["K"], (M, K, pk["K"])
    N = pk["N"]
    dev = device_index(x2)
    nt = 1 if M <= 8 else 2
    sms = sm_count(dev)
    cfg = cfg or w_config(M, N, K, sms)
    c0 = dict(W_DEFAULT, **cfg)
    gd = pdl_mode(0 if c0.get("mg") else int(c0.get("gd", 0)), sm90(dev))
    kern = _compiled_w(XT[x2.dtype], c0["rt"], c0["kw"], nt, pk["group"], bool(pk["sbf16"]), c0["pd"],
                       int(c0.get("abl", 0)), int(c0.get("mg", 0)), int(c0.get("rp", 0)), dev, int(c0.get("rs", 0)), gd,
                       int(c0.get("tw", 1)), int(c0.get("xv", 0)), int(c0.get("pt", 1)), int(c0.get("wg", 0)))
    threads = 32 * c0["rt"] * c0["kw"]
    c, (gx, gy) = w_launch(M, N, K, cfg, sms, lambda smem: kern.blocks_per_sm(threads, smem))
    scratch = _w_scratch(x2.device, gy * N * 16, gx) if gy > 1 else None
    if gy > 1 and scratch is None:  # capturing with too small a scratch: one input range per block, if it fits
        whole = -(-(K // 128) // c["kw"])
        c, (gx, gy) = w_launch(M, N, K, dict(c, spw=whole), sms)
        if gy > 1:
            raise ValueError("cuda-int-mma-w: split-K scratch too small during CUDA graph capture (reserve_w)")
    out = out if out is not None else torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    kern(grid=(gx, gy, 1), block=(threads, 1, 1), args=split_args(x2, pk, bias, out, scratch, c["spw"]),
         smem=w_smem(c, nt), pdl=bool(gd))
    return out


def split_args(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, out: torch.Tensor, scratch, last: int) -> list:
    """The arguments of a batch 2-16 kernel that may split K over the grid (the w and x kernels): x, out, bias (out
    when none), the rk words and group words, the split's slots and counters (x when it does not split), M, N, K,
    KU, NG, whether there is a bias, and the kernel's own last argument."""
    part, cnt = scratch if scratch is not None else (x2, x2)
    return [x2, out, bias if bias is not None else out, pk["words"], pk["sz"], part, cnt, x2.shape[0], pk["N"],
            pk["K"], pk["KU"], pk["NG"], int(bias is not None), last]


def reserve_w(N: int, K: int, device: torch.device) -> None:
    """Grow the split-K scratch now for a layer of N outputs and K inputs at batches 2-16 (the default configs), so
    that no launch needs to allocate it during a CUDA graph's capture or warm-up."""
    if K % 128 or device.type != "cuda":
        return
    sms = sm_count(device_index(device))
    for m in (8, 16):
        _, (gx, gy) = w_launch(m, N, K, w_config(m, N, K, sms), sms)
        if gy > 1:
            _w_scratch(device, gy * N * 16, gx)
    _cx.reserve_x(N, K, device)


def try_int_mma(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`run_int_mma` where :func:`supports` holds, else None (the caller dequantizes). A failure to compile
    or launch warns once and sends that device's later calls to the caller's path."""
    try:
        if W_ON and supports_w(pk, x2):
            if _cx.chosen(pk, x2):  # the shapes where the x kernel measured faster (X_SHAPES)
                try:
                    return _cx.run_int_mma_x(x2, pk, bias)
                except ValueError:  # no scratch for its split during a capture: the w kernel serves this call
                    pass
                except RuntimeError as e:
                    import warnings

                    warnings.warn(f"leanq: cuda-int-mma-x unavailable ({str(e)[:200]}); the w kernel serves")
                    _cx.BROKEN.add(device_index(x2))
            try:
                return run_int_mma_w(x2, pk, bias)
            except ValueError:  # no launch of it fits here (see run_int_mma_w): the first kernel serves this call
                pass
            except RuntimeError as e:
                import warnings

                warnings.warn(f"leanq: cuda-int-mma-w unavailable ({str(e)[:200]}); the first mma kernel serves")
                _BROKEN_W.add(device_index(x2))
        if not supports(pk, x2):
            return None
        return run_int_mma(x2, pk, bias)
    except RuntimeError as e:
        import warnings

        warnings.warn(f"leanq: cuda-int-mma unavailable ({str(e)[:200]}); batches 2-16 dequantize")
        _BROKEN.add(device_index(x2))
        return None


# the x kernel builds on this module (its tile code, gate, scratch and launch arguments): imported once everything
# above is defined, so that either module may be imported first
from . import cuda_int_mmax as _cx  # noqa: E402
