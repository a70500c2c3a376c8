"""Batches 2-16 on tensor cores, straight from the rk words of :mod:`leanq.kernels.cuda_int` (no second layout).

``mma.sync.m16n8k16`` (16-bit inputs, fp32 accumulate) computes out tiles C[batch row][output]: A = x (16
batch rows, zero past M, read as it is: fp16 or bf16, no conversion), B = a 16 x 8 slice of weights (k x n).
Thread (g = lane / 4, t = lane % 4) holds B[2t, 2t+1][g] and B[2t+8, 2t+9][g]. In rk, the 16 codes of a slice
of row n lie in 16 / E consecutive words, and code pair p sits in word p / NF at bits ``bits * (p % NF)``
(low half) and ``16 + bits * (p % NF)`` (high half). So pair t and pair t + 4 are one shift, one AND/OR
(M0 + q, exact: M0 = 1024 in fp16, 128 in bf16) and one x2 subtraction of M0 + z each: exact q - z. Group
scales multiply the fp32 sums of each group (C += s * C_group), so the weights stay exact.

A block owns WR x NT x 8 outputs and the whole of K: its warps are WR row groups times WK = WARPS / WR K
ranges (whole scale groups). A warp reads its A fragments from x directly (L1/L2) and its words with one
8- or 16-byte load per row and slice. The WK partial tiles of a row group meet in shared memory and one warp
writes the output (+ bias): one launch, no atomics, no scratch.

Measured on an H100 (2026-11-28, graph harness, 4-bit g128, the five Llama shapes;
``benchmarks/kernels/results/cuda-int-mma-h100-2026-11-28-*.jsonl``): 0.99-1.20x BF16 at batch 4 and
0.76-1.05x at batch 16, against 0.31-0.44x for dequantize + cuBLAS, which released layers ran before. So it
serves batches 2-16 of released layers (:func:`leanq.kernels.cuda_int.release_stored_rk`), but it is far
from the 2x at batch 16 that issue 5 asks for. What limits it: every block reads all of x from L2 through
4-byte loads that use half of each sector, so x moves several times the weight bytes at batch 16. The next
version should stage x once per block in shared memory for more rows per block (benchmarks/kernels/NOTES.md,
v9).
- Session 7's first version (K windows across blocks, x staged and rescaled to fp16 per window, fp32
  red.add and a finishing kernel) ran at 0.58-1.16x BF16 (single-launch harness). ncu showed a third of a
  wave of blocks, 12% achieved occupancy, and the staging's integer divisions taking most issue slots.
- Issuing the loads of all 8 slices of a group before their arithmetic (launch config ``sc`` 8) was slower
  than one slice at a time (``sc`` 1) at 128 registers.

bf16 activations take 2- and 4-bit weights (128 + q is exact in bf16 up to q = 127); fp16 takes 2, 4 and 8.
3-bit layers (two planes per row) go to dequantize + cuBLAS at these batches.
K must be a multiple of 16 and the group a multiple of 16 (the rk layout's groups are). Otherwise, and for
fp32 activations, :func:`supports` says no and the caller dequantizes.
"""

from __future__ import annotations

import functools

import torch

from .cuda_rt import PRELUDE, XT, Launcher, device_index, nvrtc_available

# launch configs (threads, row groups per block, n8 tiles per warp, slices whose loads go out together) by batch:
# the best of the H100 sweeps of 2026-11-28 at batches 4 and 16 (benchmarks/kernels/results/cuda-int-mma-h100-*)
TUNED = {4: dict(threads=256, wr=1, nt=4, sc=1), 16: dict(threads=256, wr=1, nt=4, sc=1)}


def tuned(m: int) -> dict:
    return TUNED[4] if m <= 8 else TUNED[16]

_SRC = r"""
#define E (32 / BITS)
#define NF (E / 2)            // code pairs per word
#define WPS (16 / E)          // words per 16-k slice (4-bit 2, 2-bit 1, 8-bit 4)
#define WARPS (THREADS / 32)
#define WK (WARPS / WR)       // K ranges per block
#define SL (GS / 16)          // slices per scale group
#define SC (SL < SCM ? SL : SCM)  // slices whose loads go out together (SCM: the launch config's sc)
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


def source(bits: int, xt: int, threads: int, wr: int, nt: int, gs: int, sbf16: bool, sc: int = 1) -> str:
    defs = dict(BITS=bits, XT=xt, THREADS=threads, WR=wr, NT=nt, GS=gs, SBF16=int(sbf16), SCM=sc)
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + _SRC


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


@functools.lru_cache(maxsize=None)
def _compiled(bits: int, xt: int, threads: int, wr: int, nt: int, gs: int, sbf16: bool, sc: int,
              device: int) -> Launcher:
    src = source(bits, xt, threads, wr, nt, gs, sbf16, sc)
    with torch.cuda.device(device):
        return Launcher(torch.cuda._compile_kernel(src, "int_mma"), "cuda-int-mma")


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


def try_int_mma(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`run_int_mma` where :func:`supports` holds, else None (the caller dequantizes). A failure to compile
    or launch warns once and sends that device's later calls to the caller's path."""
    if not supports(pk, x2):
        return None
    try:
        return run_int_mma(x2, pk, bias)
    except RuntimeError as e:
        import warnings

        warnings.warn(f"leanq: cuda-int-mma unavailable ({str(e)[:200]}); batches 2-16 dequantize")
        _BROKEN.add(device_index(x2))
        return None
