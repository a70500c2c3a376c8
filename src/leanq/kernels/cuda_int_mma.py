"""Batches 2-16 on tensor cores, straight from the rk words of :mod:`leanq.kernels.cuda_int` (no second layout).

Status: written and checked on the CPU only. The fragment mapping below is emulated in
tests/test_kernels_cuda_int.py, and the source compiles for sm_90 with a local NVRTC. It has not run on a GPU.
Until it has, it is **not in the dispatch table**; ``benchmarks/kernels/bench_cuda_int.py --mma`` times it.

``mma.sync.m16n8k16`` (fp16 in, fp32 accumulate) computes out^T tiles: A = x (16 batch rows, zero-padded
past M; x·2^-e in fp16, one power of two per block's window of K), B = a 16 x 8 slice of weights (k x n).
Thread (g = lane / 4, t = lane % 4) holds B[2t, 2t+1][g] and B[2t+8, 2t+9][g]. In rk, the 16 codes of a
slice of row n lie in 16 / E consecutive words, and code pair p sits in word p / NF at bits
``bits * (p % NF)`` (low half) and ``16 + bits * (p % NF)`` (high half). So pair t and pair t + 4 are one
shift, one AND/OR (1024 + q, exact) and one fp16x2 subtraction of 1024 + z each: exact q - z.

The grid is row tiles (WARPS x NT x 8 rows per block) by K windows (GPB scale groups per block). Per scale
group, the fp32 partial sums of the group are scaled (group scale of the output column) into the warp's
sums. At the end, red.add into an fp32 scratch [M, N]; a second kernel writes the output (+ bias) and
zeroes the scratch.
"""

from __future__ import annotations

import functools

import torch

from .cuda_int import codes_per_chunk
from .cuda_rt import PRELUDE, XT, Launcher, nvrtc_available

DEFAULT_CFG = dict(threads=128, nt=4, gpb=4)

_SRC = r"""
#define E (32 / BITS)
#define NF (E / 2)            // code pairs per word
#define WPS (16 / E)          // words per 16-k slice (4-bit 2, 2-bit 1, 8-bit 4)
#define WARPS (THREADS / 32)
#define QMASK ((1u << BITS) - 1u)

__device__ __forceinline__ u32 lop3_ao(u32 a, u32 b, u32 c) {  // (a & b) | c
  u32 d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
  u32 d; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// the exact q - z pairs of code pairs t and t + 4 (t < 4) of a slice, from its WPS words: b0 and b1 of the B fragment
// (word choices are compile-time or selects, so the words stay in registers)
__device__ __forceinline__ void pairs_of(const u32 (&ws)[WPS], int t, u32 zoff, u32& b0, u32& b1) {
#if BITS == 4
  const u32 w0 = ws[0] >> (4 * t), w1 = ws[1] >> (4 * t);                 // pair t: word 0, pair t + 4: word 1
#elif BITS == 2
  const u32 w0 = ws[0] >> (2 * t), w1 = ws[0] >> (2 * t + 8);             // both in the slice's one word
#else
  const u32 sh = 8 * (t & 1);
  const u32 w0 = ((t >> 1) ? ws[1] : ws[0]) >> sh, w1 = ((t >> 1) ? ws[3] : ws[2]) >> sh;  // words t/2 and 2 + t/2
#endif
  b0 = hsub2(lop3_ao(w0, QMASK | (QMASK << 16), 0x64006400u), zoff);      // 1024 + q, then q - z: exact
  b1 = hsub2(lop3_ao(w1, QMASK | (QMASK << 16), 0x64006400u), zoff);
}

// x: [M, K] (XT), acc: fp32 [M, N] zeroed; w, sz: the rk layout (words [N, KU * 4], group words [N, NG])
extern "C" __global__ void __launch_bounds__(THREADS) int_mma(
    const void* __restrict__ x, float* __restrict__ acc, const u32* __restrict__ w, const u32* __restrict__ sz,
    int M, int N, int K, int KU, int NG, int G)
{
  extern __shared__ u32 xs[];            // [16][XROW] fp16 pairs of x * 2**-e for this block's window of K
  __shared__ float wmax[WARPS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int g0 = blockIdx.y * GPB, g1 = min(NG, g0 + GPB);
  const int kb0 = g0 * G, kw = (g1 - g0) * G;   // the window: columns kb0 .. kb0 + kw
  const int XROW = GPB * G / 2 + 4;             // row stride in pairs: +4 words, so the 8 rows g of a read differ in bank

  // stage the window: max |x| over it, then x * 2**-e as fp16 pairs (zeros past M or K)
  float m = 0.f;
  for (int i = threadIdx.x; i < 16 * kw; i += THREADS) {
    const int r = i / kw, k = kb0 + i % kw;
    if (r < M && k < K) m = fmaxf(m, fabsf(ldx(x, (long long)r * K + k)));
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) wmax[warp] = m;
  __syncthreads();
  m = wmax[0];
#pragma unroll
  for (int i = 1; i < WARPS; ++i) m = fmaxf(m, wmax[i]);
  int e = (int)((__float_as_uint(m) >> 23) & 0xFFu) - 126;
  e = m >= 1.17549435e-38f ? min(max(e, -100), 100) : 0;
  const float inv = __uint_as_float((u32)(127 - e) << 23), xmul = __uint_as_float((u32)(127 + e) << 23);
  for (int i = threadIdx.x; i < 16 * kw / 2; i += THREADS) {
    const int r = i / (kw / 2), k = kb0 + 2 * (i % (kw / 2));
    const float lo = r < M && k < K ? ldx(x, (long long)r * K + k) * inv : 0.f;
    const float hi = r < M && k + 1 < K ? ldx(x, (long long)r * K + k + 1) * inv : 0.f;
    xs[r * XROW + (i % (kw / 2))] = f2h2(lo, hi);
  }
  __syncthreads();

  const int nb = (blockIdx.x * WARPS + warp) * NT * 8;   // this warp's first row
  float c[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
  for (int grp = g0; grp < g1; ++grp) {
    float cg[NT][4];
    u32 zoff[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      cg[j][0] = cg[j][1] = cg[j][2] = cg[j][3] = 0.f;
      const int n = nb + j * 8 + g;                      // the B column this thread decodes
      const float z = n < N ? (float)(__ldg(sz + (size_t)n * NG + grp) & 0xFFFFu) : 0.f;
      zoff[j] = f2h2(1024.f + z, 1024.f + z);
    }
    for (int s = 0; s < G / 16; ++s) {
      const int kl = (grp - g0) * G + s * 16;            // slice start inside the window
      u32 a[4];
      a[0] = xs[g * XROW + kl / 2 + t];
      a[1] = xs[(g + 8) * XROW + kl / 2 + t];
      a[2] = xs[g * XROW + kl / 2 + 4 + t];
      a[3] = xs[(g + 8) * XROW + kl / 2 + 4 + t];
      const int wo = (grp * G + s * 16) / E;             // the slice's first word in its row
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = nb + j * 8 + g;
        u32 ws[WPS], b0, b1;
#pragma unroll
        for (int i = 0; i < WPS; ++i) ws[i] = n < N && wo + i < KU * 4 ? __ldg(w + (size_t)n * KU * 4 + wo + i) : 0u;
        pairs_of(ws, t, zoff[j], b0, b1);
        mma16816(cg[j], a, b0, b1);
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {                       // the group's scale of output columns 2t, 2t + 1
      const int n0 = nb + j * 8 + 2 * t;
      const float s0 = n0 < N ? scale_of(__ldg(sz + (size_t)n0 * NG + grp)) : 0.f;
      const float s1 = n0 + 1 < N ? scale_of(__ldg(sz + (size_t)(n0 + 1) * NG + grp)) : 0.f;
      c[j][0] += s0 * cg[j][0]; c[j][1] += s1 * cg[j][1]; c[j][2] += s0 * cg[j][2]; c[j][3] += s1 * cg[j][3];
    }
  }
#pragma unroll
  for (int j = 0; j < NT; ++j) {                         // C rows g, g + 8 (batch), columns 2t, 2t + 1
    const int n0 = nb + j * 8 + 2 * t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = g + 8 * h;
      if (r >= M) continue;
      if (n0 < N) atomicAdd(acc + (size_t)r * N + n0, c[j][2 * h] * xmul);
      if (n0 + 1 < N) atomicAdd(acc + (size_t)r * N + n0 + 1, c[j][2 * h + 1] * xmul);
    }
  }
}

// out = acc (+ bias) in x's dtype; acc back to zero for the next launch
extern "C" __global__ void int_mma_finish(float* __restrict__ acc, void* __restrict__ out, const void* __restrict__ bias,
                                          int M, int N, int HAS_BIAS)
{
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)M * N) return;
  float y = acc[i];
  if (HAS_BIAS) y += ldx(bias, i % N);
  stx(out, i, y);
  acc[i] = 0.f;
}
"""


def source(bits: int, xt: int, threads: int, nt: int, gpb: int, sbf16: bool) -> str:
    defs = dict(BITS=bits, XT=xt, THREADS=threads, NT=nt, GPB=gpb, SBF16=int(sbf16))
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + _SRC


def available() -> bool:
    return nvrtc_available("LEANQ_CUDA_INT")


@functools.lru_cache(maxsize=None)
def _compiled(bits: int, xt: int, threads: int, nt: int, gpb: int, sbf16: bool, device: int) -> tuple:
    src = source(bits, xt, threads, nt, gpb, sbf16)
    with torch.cuda.device(device):
        return tuple(Launcher(torch.cuda._compile_kernel(src, name), "cuda-int-mma")
                     for name in ("int_mma", "int_mma_finish"))


_SCRATCH: dict = {}


def _scratch(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed fp32 buffer per device (each launch leaves it at zero)."""
    have = _SCRATCH.get(device)
    if have is None or have.numel() < n:
        have = _SCRATCH[device] = torch.zeros(max(n, 1 << 18), dtype=torch.float32, device=device)
    return have


def run_int_mma(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M, K], 2 <= M <= 16 (fp16/bf16/fp32, contiguous) -> [M, N] of x2.dtype."""
    M, K = x2.shape
    assert 1 <= M <= 16 and K == pk["K"] and x2.is_contiguous(), (M, K, pk["K"])
    cfg = dict(cfg or DEFAULT_CFG)
    group = pk["group"]
    assert group % 16 == 0 and codes_per_chunk(pk["bits"]) <= group, group
    threads, nt, gpb = cfg["threads"], cfg["nt"], cfg["gpb"]
    dev = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    mma, finish = _compiled(pk["bits"], XT[x2.dtype], threads, nt, gpb, bool(pk["sbf16"]), dev)
    N = pk["N"]
    acc = _scratch(x2.device, M * N)
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    rows = threads // 32 * nt * 8
    smem = 16 * (gpb * group // 2 + 4) * 4
    mma(grid=(-(-N // rows), -(-pk["NG"] // gpb), 1), block=(threads, 1, 1), smem=smem,
        args=[x2, acc, pk["words"], pk["sz"], M, N, K, pk["KU"], pk["NG"], group])
    finish(grid=(-(-M * N // 256), 1, 1), block=(256, 1, 1),
           args=[acc, out, bias if bias is not None else out, M, N, int(bias is not None)])
    return out


if torch.cuda.is_available():  # the scratch outside any CUDA-graph memory pool
    try:
        _scratch(torch.device("cuda", torch.cuda.current_device()), 1)
    except Exception:
        pass
