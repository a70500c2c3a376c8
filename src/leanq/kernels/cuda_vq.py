"""Batch-1 codebook GEMV in CUDA C++ with a shared-memory table of codeword·activation products.

Why CUDA here: the Triton kernel (:mod:`leanq.kernels.triton_vq_kn`) looks every codeword up through
L1, where a warp's 32 scattered 8-byte reads touch up to 16 cache lines and cost as many tag
lookups; that holds it near 2.3 lookups per clock per SM.  Shared memory serves a scattered warp
read in as many passes as the busiest of its 32 banks needs (3.3 on average for random indices,
measured), and Triton 3.x gives no way to gather from a shared-memory buffer by computed index.

Same layout as triton_vq_kn ("vq-kn", :func:`leanq.kernels.triton_vq_kn.repack_vq_kn`): indices
uint8 [1, nvec, N] (N contiguous), the float16 codebooks, fp32 scales [nsg, N].  A block owns VC
consecutive vectors (VC·D inputs):

1. every thread issues its VC index loads for NPT outputs (one 4/8/16-byte load per vector);
2. meanwhile the block stages its activations in shared memory (fp32) and fills a table
   T[v, c] = <codeword c of v's column tile, x[v·D : v·D+D]> for its VC vectors and all KK codewords;
3. after a barrier, output n gets Σ_v T[v, idx[v, n]]: one shared-memory read and one add per
   (vector, output), against D multiply-adds and an 8-byte L1 lookup in the Triton kernel;
4. per-group scales (when a scale group spans whole blocks) multiply before one fp32 atomic add per
   output into a scratch vector; a second kernel (``vq_finish``) applies per-row scales and the bias,
   writes the output dtype and zeroes the scratch.

Two kernels share these steps.  "tile" (``vq_lut_gemv``): a block owns THREADS·NPT outputs, one step.
"stationary" (``vq_lut_gemv_s``): a block owns NR outputs, builds its table once and walks them
THREADS·NPT at a time, the next step's index loads issued before this step's lookups; NR is chosen for
about ``bps`` blocks per SM.  The tile kernel can also finish in place (``fuse``: the last block to add
into an output range, found with a release/acquire ticket, does step 4's second half), measured slower
than the second kernel on the H100.

Launch options beside the shape of the work (threads, outputs per thread, vectors per block, kernel):
``gd`` programmatic dependent launch (index and codeword loads before the wait for the previous kernel);
``ec`` each thread's codewords read before that wait; ``cpw`` codewords per thread in the table build (one read
of a vector's activations serves cpw entries, stored in one wide store); ``vc1`` fewer vectors per block where a
stationary block would get a single step (:func:`launch_vc`); ``th`` the table in fp16 for 16-bit activations,
each block's activations scaled by a power of two so entries stay in range (prepared, off by default).

Supports one codebook per column tile (no row tiles, one book: the vq presets), index bits <= 8,
activations fp32/fp16/bf16.  Compiled at first use through NVRTC (``torch.cuda._compile_kernel``,
PyTorch >= 2.8) and launched through the driver (capturable in CUDA graphs; under torch.compile it
is one opaque custom op, ``leanq::cuda_vq_linear``); where NVRTC is missing or fails, the Triton
kernel serves (``LEANQ_CUDA_VQ=0`` chooses it).  The oracle is
:func:`leanq.kernels.triton_vq_kn.reference_vq_kn` and the stored format's ``VQWeight.dequantize``.
"""

from __future__ import annotations

import functools

import torch

from . import Kernel, register_kernel
from .cuda_rt import (PRELUDE, XT, Launcher, compile_kernels, device_index, nvrtc_available, on_device_of, pdl_mode,
                      sm90, sm_count)

# threads per block, outputs per thread, vectors per block, kernel (and its blocks per SM), finishing step fused:
# by (D, index bits) the best on the five Llama shapes in the H100 runs of docs/PERFORMANCE.md, "Codebook (vq)
# kernels, session 6" (benchmarks/kernels/results/vq-cuda-h100-2026-11-27-*)
DEFAULT_CFG = dict(threads=256, npt=4, vc=16, mode="tile", fuse=False)
# gd 1 (programmatic dependent launch) since session 15: +6-17% (vq2) and +7-17% (vq3) on the H200 in one run
# (benchmarks/kernels/results/h200-2026-11-28-s15-pdl15); pdl_mode turns it off before sm_90. ec 1 (codewords read
# before the wait): +0-9% (vq2), +4-7% (vq3) in one run (s15-ec). cpw 4 (vq2 only): +2-3% on four shapes, -2.5% on
# the fifth, in one run (s15-cpw); no change for vq3, where a thread's codeword already serves four vectors
# vc1 8: see launch_vc
TUNED: dict = {(4, 8): dict(threads=128, npt=4, vc=16, vc1=8, mode="stationary", bps=4, gd=1, ec=1, cpw=4),  # 2-bit
               (2, 6): dict(threads=256, npt=4, vc=16, mode="tile", fuse=False, gd=1, ec=1)}  # 3-bit

# Device helpers of the vq kernels (here and kernels.cuda_vq_cluster) under programmatic dependent launch: the wait
# (and early trigger) step, and loads of the layer's own data that ptxas keeps ahead of it
PDL_LOADS = r"""
// programmatic dependent launch (launch option gd, sm_90 on): every kernel here may start while the kernel before it
// in the stream ends. What comes before this step reads only the layer's own data (indices, codewords); after it, x,
// any scratch sums and the output. gd 1 also lets the next grid in at once (a finishing kernel, or the next layer's
// GEMV); gd 2 only at the end.
__device__ __forceinline__ void gdc_step() {
#if GD
  gdc_wait();
#if GD == 1
  gdc_launch();
#endif
#endif
}

// a load of layer data as volatile inline PTX: kept before gdc_step's wait in the SASS (a plain load of read-only
// data may be moved past it, and was, in vq_lut_gemv_s)
__device__ __forceinline__ void ld_ordered(u32& v, const void* p) {
  asm volatile("ld.global.b32 %0, [%1];" : "=r"(v) : "l"(p));
}
__device__ __forceinline__ void ld_ordered(uint2& v, const void* p) {
  asm volatile("ld.global.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
}
__device__ __forceinline__ void ld_ordered(uint4& v, const void* p) {
  asm volatile("ld.global.v4.b32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
}

"""

_SRC = r"""
#if NPT == 16
typedef uint4 IdxT;
#elif NPT == 8
typedef uint2 IdxT;
#else
typedef u32 IdxT;
#endif
#define WORDS (NPT / 4)

__device__ __forceinline__ u32 word_of(const IdxT& q, int w) {
#if NPT == 16
  return w == 0 ? q.x : w == 1 ? q.y : w == 2 ? q.z : q.w;
#elif NPT == 8
  return w == 0 ? q.x : q.y;
#else
  return q;
#endif
}

// the index loads of VC vectors x NPT outputs from n (zeros where absent); ORDERED: as volatile PTX (before gdc_step)
template <bool ORDERED>
__device__ __forceinline__ void load_idx(IdxT* q, const u8* __restrict__ idx, int v0, int n, bool live, int N,
                                         int NVEC) {
#pragma unroll
  for (int j = 0; j < VC; ++j) {
    if (live && v0 + j < NVEC) {
      const IdxT* p = (const IdxT*)(idx + (size_t)(v0 + j) * N + n);
      if (ORDERED) ld_ordered(q[j], p);
      else q[j] = *p;
    } else {
      q[j] = IdxT();
    }
  }
}

// launch option ec: each thread's codewords read before the wait, as raw words (D halves: one 4/8/16-byte load),
// when the block's VC vectors share one column tile (the usual case; else build_table reads them as before).
// Layer data, not written by the kernel before this one: the wait does not order them, ld_ordered only keeps
// them ahead of it in the SASS, so their latency overlaps the previous kernel's tail and the x staging.
// launch option cpw: in the table build a thread owns CPW consecutive codewords (CG groups of them) and every VG-th
// vector, so one read of a vector's activations serves CPW entries, and the CPW entries go out in one wide store
// (cpw 0: a thread owns codewords c, c + THREADS, ...; each entry reads the activations again)
#if CPW
#define CG (KK / CPW)
#define VG (THREADS / CG)
#define CPT CPW
#elif THREADS >= KK
#define CPT 1
#else
#define CPT ((KK + THREADS - 1) / THREADS)
#endif
#if EC && D == 2
#define EARLY_CB 1
typedef u32 CbT;
#elif EC && D == 4
#define EARLY_CB 1
typedef uint2 CbT;
#elif EC && D == 8
#define EARLY_CB 1
typedef uint4 CbT;
#else
#define EARLY_CB 0
typedef u32 CbT;
#endif

__device__ __forceinline__ bool one_tile_of(int v0, int NVEC, int COLS) {
  return v0 + VC - 1 < NVEC && ((v0 + VC - 1) * D) / COLS == (v0 * D) / COLS;
}

__device__ __forceinline__ void load_cb(CbT* wc, const u16* __restrict__ cb, int v0, int NVEC, int COLS) {
#if EARLY_CB
#if CPW
  const int c_first = (threadIdx.x % CG) * CPW, c_step = 1;
#elif THREADS >= KK
  const int c_first = threadIdx.x % KK, c_step = KK;
#else
  const int c_first = threadIdx.x, c_step = THREADS;
#endif
  if (!one_tile_of(v0, NVEC, COLS)) return;
  const size_t off = (size_t)((v0 * D) / COLS) * KK * D;
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    const int c = c_first + i * c_step;
    if (c < KK) ld_ordered(wc[i], cb + off + (size_t)c * D);
  }
#endif
}

// half j of a codeword's raw words
__device__ __forceinline__ float cb_half(const CbT& w, int j) {
#if EARLY_CB
  const u32* p = (const u32*)&w;
  return h2f((u16)(p[j >> 1] >> (16 * (j & 1))));
#else
  return 0.f;
#endif
}

// launch option th (16-bit activations only): the table in fp16, half the shared memory per lookup (about 2.8
// bank passes per warp read against 3.2 for fp32 words, for random indices) and per store. The block scales its
// activations by a power of two, 2^-E with every |x| < 2^E, through the codewords it multiplies them with (exact),
// so entries stay in fp16's range; the lookups' sums are scaled back by 2^E (exact) before they leave the block.
#if TH
typedef u16 TabT;
#else
typedef float TabT;
#endif
__device__ __forceinline__ float from_tab(TabT v) {
#if TH
  return h2f(v);
#else
  return v;
#endif
}
__device__ __forceinline__ TabT to_tab(float t) {
#if TH
  u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(t)); return h;
#else
  return t;
#endif
}

// activations (fp32) and each vector's codebook offset (codeword 0 of its column tile; -1 past NVEC) into shared
// memory, then the table tab[vl * KK + c] = <codeword c, x_vl>.  A thread owns codeword c (and every
// (THREADS / KK)-th vector when THREADS > KK); when all VC vectors share one column tile (the usual case) the
// codeword is read once and each entry costs one broadcast read of x, D multiply-adds and one store.
// Returns what the lookups' sums are multiplied by (th: 2^E; else 1).
__device__ __forceinline__ float build_table(TabT* tab, float* xs, int* toff, u32* wmax, const void* XR x,
                                             const u16* __restrict__ cb, int v0, int NVEC, int K_IN, int COLS,
                                             const CbT* wc) {
#if TH
  u32 mb = 0;  // the largest |x| this thread staged, as bits (non-negative floats order as unsigned ints)
#endif
  for (int i = threadIdx.x; i < VC * D; i += THREADS) {
    const int k = v0 * D + i;
    const float v = k < K_IN ? ldx(x, k) : 0.f;
    xs[i] = v;
#if TH
    mb = max(mb, __float_as_uint(fabsf(v)));
#endif
  }
  for (int i = threadIdx.x; i < VC; i += THREADS) {
    const int v = v0 + i;
    toff[i] = v < NVEC ? ((v * D) / COLS) * KK * D : -1;
  }
#if TH
#pragma unroll
  for (int o = 16; o; o >>= 1) mb = max(mb, __shfl_xor_sync(0xffffffffu, mb, o));
  if ((threadIdx.x & 31) == 0) wmax[threadIdx.x >> 5] = mb;
#endif
  __syncthreads();
  float sc = 1.f, inv = 1.f;
#if TH
  mb = 0;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) mb = max(mb, wmax[w]);
  if (mb >= 0x00800000u) {  // a normal largest |x| (zeros, subnormals: no scaling)
    const int E = min((int)((mb >> 23) & 0xFFu) - 126, 126);  // |x| < 2^E
    sc = __uint_as_float((u32)(127 - E) << 23);
    inv = __uint_as_float((u32)(127 + E) << 23);
  }
#endif
#if THREADS >= KK
  const int c_first = threadIdx.x % KK, c_step = KK, vl_first = threadIdx.x / KK, vl_step = THREADS / KK;
#else
  const int c_first = threadIdx.x, c_step = THREADS, vl_first = 0, vl_step = 1;
#endif
  const bool one_tile = toff[VC - 1] >= 0 && toff[VC - 1] == toff[0];
#if CPW && !(ABLATE & 2)
  if (one_tile) {
    const int cg = threadIdx.x % CG, vg = threadIdx.x / CG;
    float w[CPW][D];
#pragma unroll
    for (int i = 0; i < CPW; ++i)
#pragma unroll
      for (int j = 0; j < D; ++j)
        w[i][j] = sc * (EARLY_CB ? cb_half(wc[i], j) : h2f(cb[(size_t)toff[0] + (cg * CPW + i) * D + j]));
#pragma unroll
    for (int k = 0; k < VC / VG; ++k) {
      const int vl = vg + k * VG;
      float xv[D], t[CPW];
#pragma unroll
      for (int j = 0; j < D; ++j) xv[j] = xs[vl * D + j];
#pragma unroll
      for (int i = 0; i < CPW; ++i) {
        t[i] = 0.f;
#pragma unroll
        for (int j = 0; j < D; ++j) t[i] += w[i][j] * xv[j];
      }
      TabT* dst = tab + vl * KK + cg * CPW;
#if TH && CPW % 4 == 0
#pragma unroll
      for (int i = 0; i < CPW; i += 4) *(uint2*)(dst + i) = make_uint2(f2h2(t[i], t[i + 1]), f2h2(t[i + 2], t[i + 3]));
#elif TH && CPW == 2
      *(u32*)dst = f2h2(t[0], t[1]);
#elif !TH && CPW % 4 == 0
#pragma unroll
      for (int i = 0; i < CPW; i += 4) *(float4*)(dst + i) = make_float4(t[i], t[i + 1], t[i + 2], t[i + 3]);
#elif !TH && CPW == 2
      *(float2*)dst = make_float2(t[0], t[1]);
#else
#pragma unroll
      for (int i = 0; i < CPW; ++i) dst[i] = to_tab(t[i]);
#endif
    }
    __syncthreads();
    return inv;
  }
#endif
#if !(ABLATE & 2)
#if EARLY_CB
#pragma unroll
  for (int ci = 0; ci < CPT; ++ci) {
    const int c = c_first + ci * c_step;
    if (c >= KK) break;
#else
  for (int c = c_first, ci = 0; c < KK; c += c_step, ++ci) {
#endif
    float w[D];
    if (one_tile) {
#pragma unroll
      for (int i = 0; i < D; ++i)
        w[i] = sc * (EARLY_CB && !CPW ? cb_half(wc[ci % CPT], i) : h2f(cb[(size_t)toff[0] + c * D + i]));
#pragma unroll
      for (int vl = vl_first; vl < VC; vl += vl_step) {
        float t = 0.f;
#pragma unroll
        for (int i = 0; i < D; ++i) t += w[i] * xs[vl * D + i];
        tab[vl * KK + c] = to_tab(t);
      }
    } else {
      int have = -2;
      for (int vl = vl_first; vl < VC; vl += vl_step) {
        const int off = toff[vl];
        float t = 0.f;
        if (off >= 0) {
          if (off != have) {
#pragma unroll
            for (int i = 0; i < D; ++i) w[i] = sc * h2f(cb[(size_t)off + c * D + i]);
            have = off;
          }
#pragma unroll
          for (int i = 0; i < D; ++i) t += w[i] * xs[vl * D + i];
        }
        tab[vl * KK + c] = to_tab(t);
      }
    }
  }
#endif
  __syncthreads();
  return inv;
}

// a[t] = inv * sum_j T[j, idx byte t of q[j]]: one shared-memory read and one add per (vector, output)
__device__ __forceinline__ void lookups(float* a, const IdxT* q, const TabT* tab, float inv) {
#pragma unroll
  for (int t = 0; t < NPT; ++t) a[t] = 0.f;
#pragma unroll
  for (int j = 0; j < VC; ++j) {
#pragma unroll
    for (int t = 0; t < NPT; ++t) {
      const u32 b = (word_of(q[j], t >> 2) >> (8 * (t & 3))) & 0xFFu;
#if ABLATE & 4
      a[t] += (float)b;
#else
      a[t] += from_tab(tab[j * KK + b]);
#endif
    }
  }
#if TH
#pragma unroll
  for (int t = 0; t < NPT; ++t) a[t] *= inv;
#endif
}

// per-group scales (when a group spans whole blocks), then one fp32 atomic add per output
__device__ __forceinline__ void add_out(float* __restrict__ acc, const float* __restrict__ s, float* a, int n, int v0,
                                        int N, int G, int NSG) {
#if GROUP_SCALE
  const int g = min((v0 * D) / G, NSG - 1);
#pragma unroll
  for (int t = 0; t < NPT; ++t) a[t] *= s[(size_t)g * N + n + t];
#endif
#pragma unroll
  for (int t = 0; t < NPT; t += 4)
#if ABLATE & 1
    *(float4*)(acc + n + t) = make_float4(a[t], a[t + 1], a[t + 2], a[t + 3]);
#else
    atomicAdd((float4*)(acc + n + t), make_float4(a[t], a[t + 1], a[t + 2], a[t + 3]));
#endif
}

// "tile": a block owns VC vectors and THREADS * NPT outputs; grid (ceil(N / (THREADS * NPT)), ceil(NVEC / VC)).
// Its index loads go out first and stay in flight while the table is built.  With FUSE, the last block to add
// into an output range finishes it (as vq_finish: scales, bias, output dtype, sums and counter back to zero):
// after a barrier one thread per block publishes the block's adds (release) and takes a ticket; the block
// holding the last ticket reads the sums after an acquire.
extern "C" __global__ void __launch_bounds__(THREADS) vq_lut_gemv(
    const void* XR x, float* __restrict__ acc, const u8* __restrict__ idx, const u16* __restrict__ cb,
    const float* __restrict__ s, int N, int NVEC, int K_IN, int COLS, int G, int NSG,
    int* __restrict__ cnt, void* __restrict__ out, const void* __restrict__ bias, int HAS_BIAS, int FUSE)
{
  __shared__ __align__(16) TabT tab[VC * KK];
  __shared__ float xs[VC * D];
  __shared__ u32 wmax[THREADS / 32];
  __shared__ int toff[VC];
  __shared__ int last;
  const int n = (blockIdx.x * THREADS + threadIdx.x) * NPT;
  const int v0 = blockIdx.y * VC;
  const bool live = n < N;
  IdxT q[VC];
  CbT wc[CPT];
  load_idx<GD != 0>(q, idx, v0, n, live, N, NVEC);
  load_cb(wc, cb, v0, NVEC, COLS);
  gdc_step();
  const float inv = build_table(tab, xs, toff, wmax, x, cb, v0, NVEC, K_IN, COLS, wc);
  if (live) {
    float a[NPT];
    lookups(a, q, tab, inv);
    add_out(acc, s, a, n, v0, N, G, NSG);
  }
  if (!FUSE) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    int ticket;
    asm volatile("fence.acq_rel.gpu;\n\tatom.add.acq_rel.gpu.s32 %0, [%1], 1;" : "=r"(ticket) : "l"(cnt + blockIdx.x)
                 : "memory");
    last = ticket == (int)gridDim.y - 1;
  }
  __syncthreads();
  if (!last) return;
  if (live) {
#pragma unroll
    for (int t = 0; t < NPT; ++t) {
      const int i = n + t;
      float y = __ldcg(acc + i);
#if !GROUP_SCALE
      y *= s[i];
#endif
      if (HAS_BIAS) y += ldx(bias, i);
      stx(out, i, y);
      __stcg(acc + i, 0.f);
    }
  }
  if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
}

// "stationary": a block owns VC vectors and NR outputs (a multiple of THREADS * NPT); it builds its table once and
// walks the outputs THREADS * NPT at a time, the next step's index loads issued before this step's lookups.
// grid (ceil(N / NR), ceil(NVEC / VC)).  Fewer tables are built than by "tile" (one per NR outputs, not per
// THREADS * NPT), at the price of more atomic adds when NR > THREADS * NPT would not otherwise fill the GPU.
extern "C" __global__ void __launch_bounds__(THREADS) vq_lut_gemv_s(
    const void* XR x, float* __restrict__ acc, const u8* __restrict__ idx, const u16* __restrict__ cb,
    const float* __restrict__ s, int N, int NVEC, int K_IN, int COLS, int G, int NSG, int NR)
{
  __shared__ __align__(16) TabT tab[VC * KK];
  __shared__ float xs[VC * D];
  __shared__ u32 wmax[THREADS / 32];
  __shared__ int toff[VC];
  const int v0 = blockIdx.y * VC;
  const int ne = min(N, (blockIdx.x + 1) * NR);
  int n = blockIdx.x * NR + threadIdx.x * NPT;
  IdxT q[VC], qn[VC];
  CbT wc[CPT];
  load_idx<GD != 0>(q, idx, v0, n, n < ne, N, NVEC);
  load_cb(wc, cb, v0, NVEC, COLS);
  gdc_step();
  const float inv = build_table(tab, xs, toff, wmax, x, cb, v0, NVEC, K_IN, COLS, wc);
  float a[NPT];
  for (; n < ne; n += THREADS * NPT) {
    const int nn = n + THREADS * NPT;
    load_idx<false>(qn, idx, v0, nn, nn < ne, N, NVEC);
    lookups(a, q, tab, inv);
    add_out(acc, s, a, n, v0, N, G, NSG);
#pragma unroll
    for (int j = 0; j < VC; ++j) q[j] = qn[j];
  }
}

// out = sums (* row scale) (+ bias) in the activation dtype; the sums are zeroed for the next launch
extern "C" __global__ void vq_finish(float* __restrict__ acc, void* __restrict__ out, const void* __restrict__ bias,
                                     const float* __restrict__ s, int N, int HAS_BIAS, int ROW_SCALE)
{
  gdc_step();
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float y = acc[n];
  if (ROW_SCALE) y *= s[n];
  if (HAS_BIAS) y += ldx(bias, n);
  stx(out, n, y);
  acc[n] = 0.f;
}
"""


def source(d: int, kk: int, xt: int, threads: int, npt: int, vc: int, group_scale: bool, ablate: int = 0,
           gd: int = 0, ec: int = 0, cpw: int = 0, th: int = 0) -> str:
    """The CUDA source for one configuration (the kernel's constants as #defines); ``gd`` programmatic dependent
    launch (see gdc_step; the launcher must pass ``pdl``); ``ec`` the codewords loaded before the wait (load_cb;
    D of 2, 4 or 8, else ignored); ``cpw`` codewords per thread in the table build (0: the old mapping; else
    a divisor of ``kk`` with ``threads`` a multiple of kk / cpw and ``vc`` of the vector groups, see cpw_ok);
    ``th`` the table in fp16 (16-bit activations; see TabT).

    ``ablate`` (timing experiments only; the results are wrong): bit 1 plain stores instead of atomic adds,
    bit 2 no table build, bit 4 no table reads."""
    assert npt in (4, 8, 16) and kk <= 256 and d >= 1 and gd in (0, 1, 2) and ec in (0, 1), (npt, kk, d, gd, ec)
    assert cpw == 0 or cpw_ok(kk, threads, vc, cpw), (kk, threads, vc, cpw)
    assert th in (0, 1) and not (th and xt == 0), (th, xt)  # fp32 activations keep the fp32 table
    defs = dict(D=d, KK=kk, XT=xt, THREADS=threads, NPT=npt, VC=vc, GROUP_SCALE=int(group_scale), ABLATE=ablate,
                GD=gd, EC=ec, CPW=cpw, TH=th)
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + PDL_LOADS + _SRC


def cpw_ok(kk: int, threads: int, vc: int, cpw: int) -> bool:
    """The build mapping of ``cpw`` codewords per thread covers the table exactly: kk / cpw codeword groups, the
    block's threads a whole number of them, and the vectors a whole number of rounds of the vector groups."""
    if cpw < 1 or kk % cpw or threads % (kk // cpw):
        return False
    return vc % (threads // (kk // cpw)) == 0


def available() -> bool:
    """NVRTC compilation through PyTorch is possible here (a CUDA device, torch.cuda._compile_kernel)."""
    return nvrtc_available("LEANQ_CUDA_VQ")


@functools.lru_cache(maxsize=None)
def _compiled(d: int, kk: int, xt: int, threads: int, npt: int, vc: int, group_scale: bool, device: int,
              ablate: int = 0, gd: int = 0, ec: int = 0, cpw: int = 0, th: int = 0):
    src = source(d, kk, xt, threads, npt, vc, group_scale, ablate, gd, ec, cpw, th)
    with torch.cuda.device(device):
        kernels = compile_kernels(src, ["vq_lut_gemv", "vq_lut_gemv_s", "vq_finish"])
    return tuple(Launcher(k, "cuda-vq") for k in kernels)


_BROKEN: set = set()


def layout_ok(pk: dict, cfg: dict | None = None) -> bool:
    """The vq-kn layout ``pk`` is one this kernel computes (else the Triton kernel serves)."""
    cfg = cfg or _cfg(pk)
    span = cfg["vc"] * pk["D"]
    smem = cfg["vc"] * ((1 << pk["IB"]) + pk["D"] + 1) * 4  # table, activations, tile offsets
    return (smem <= 48 * 1024 and pk["NB"] == 1 and pk["nrt"] == 1 and pk["IB"] <= 8 and pk["N"] % cfg["npt"] == 0
            and (pk["nsg"] == 1 or pk["group"] % span == 0))


def _cfg(pk: dict) -> dict:
    return TUNED.get((pk["D"], pk["IB"]), DEFAULT_CFG)


def run_vq_cuda(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [1, K] (fp16/bf16/fp32, contiguous) -> [1, N] of x2.dtype."""
    from .triton_kn import _scratch

    M, K = x2.shape
    assert M == 1 and K == pk["K"] and x2.is_contiguous(), (M, K, pk["K"])
    cfg = cfg or _cfg(pk)
    if not layout_ok(pk, cfg):
        raise ValueError("cuda-vq: layout not supported (row tiles, several books, or scale groups across blocks)")
    N, threads, npt = pk["N"], cfg["threads"], cfg["npt"]
    row_scale = pk["nsg"] == 1
    dev = device_index(x2)
    stationary = cfg.get("mode", "tile") != "tile"
    vc = launch_vc(pk, cfg, sm_count(dev) if stationary else 0)
    gd = pdl_mode(int(cfg.get("gd", 0)), sm90(dev))
    cb = pk["cb"].view(torch.float16) if pk["packed"] else pk["cb"]
    cb_aligned = cb.data_ptr() % 16 == 0  # ec's word loads
    cpw = int(cfg.get("cpw", 0))
    cpw = cpw if cpw and cpw_ok(1 << pk["IB"], threads, vc, cpw) else 0
    tile, stat, finish = _compiled(pk["D"], 1 << pk["IB"], XT[x2.dtype], threads, npt, vc, not row_scale, dev,
                                   cfg.get("ablate", 0), gd, int(cfg.get("ec", 0)) if cb_aligned else 0, cpw,
                                   int(cfg.get("th", 0)) if x2.dtype != torch.float32 else 0)
    acc, cnt = _scratch(x2.device, N)
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    bn = threads * npt
    vblocks = (pk["nvec"] + vc - 1) // vc
    args = [x2, acc, pk["idx"], cb, pk["scales"], N, pk["nvec"], K, pk["cols"], pk["group"], pk["nsg"]]
    if not stationary:
        fuse = bool(cfg.get("fuse", False))
        tile(grid=((N + bn - 1) // bn, vblocks, 1), block=(threads, 1, 1),
             args=args + [cnt, out, bias if bias is not None else out, int(bias is not None), int(fuse)], pdl=gd > 0)
        if fuse:
            return out
    else:
        nr = outputs_per_block(N, bn, vblocks, cfg, sm_count(dev))
        stat(grid=((N + nr - 1) // nr, vblocks, 1), block=(threads, 1, 1), args=args + [nr], pdl=gd > 0)
    finish(grid=((N + 255) // 256, 1, 1), block=(256, 1, 1),
           args=[acc, out, bias if bias is not None else out, pk["scales"], N, int(bias is not None), int(row_scale)],
           pdl=gd > 0)
    return out


def launch_vc(pk: dict, cfg: dict, sms: int) -> int:
    """Vectors per block for this layer: ``cfg['vc']``, or ``cfg['vc1']`` for a stationary config that would give each
    block a single step of outputs (4096x4096 on 132 SMs): a half-size table then serves two steps, so each table
    entry is built for twice the lookups and the second step's index loads overlap the first step's lookups
    (vq2 at 4096x4096 on the H200: +7-10% in three runs, docs/PERFORMANCE.md version 16)."""
    vc = cfg["vc"]
    if cfg.get("mode", "tile") == "tile" or "vc1" not in cfg:
        return vc
    bn = cfg["threads"] * cfg["npt"]
    if outputs_per_block(pk["N"], bn, (pk["nvec"] + vc - 1) // vc, cfg, sms) > bn:
        return vc
    return cfg["vc1"]


def outputs_per_block(n: int, bn: int, vblocks: int, cfg: dict, sms: int) -> int:
    """Outputs per block of the stationary kernel: a multiple of ``bn`` (threads x outputs per thread) that
    gives about ``cfg['bps']`` blocks per SM (default 2), or ``cfg['nr']`` steps of ``bn`` when given."""
    steps_total = (n + bn - 1) // bn
    if "nr" in cfg:
        steps = int(cfg["nr"])
    else:
        splits = max(1, round(cfg.get("bps", 2) * sms / vblocks))
        steps = (steps_total + splits - 1) // splits
    return bn * max(1, min(steps, steps_total))


def _fields(m) -> dict:
    """The layout_ok fields of vq layer ``m`` from its spec, without building the layout."""
    from ..formats.vq import geometry

    geo = geometry(m.spec, m.out_features, m.in_features)
    return dict(NB=m.spec.vq_books, nrt=geo["nrt"], IB=m.spec.bits, N=m.out_features, nsg=geo["nsg"],
                group=geo["group"], D=m.spec.vq_dim)


def _supports(m, x) -> bool:
    from .triton_vq_kn import _supports as kn_supports

    if not available() or id(m) in _BROKEN or not kn_supports(m, x):
        return False
    return x.device.type in ("cuda", "meta") and layout_ok(_fields(m))


def _impl(x: torch.Tensor, idx: torch.Tensor, cb: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
          N: int, K: int, D: int, IB: int, nvec: int, cols: int, group: int, nsg: int, packed: bool) -> torch.Tensor:
    """The kernels as one opaque op, so torch.compile (and its CUDA graphs) take them whole."""
    pk = dict(idx=idx, cb=cb, scales=scales, N=N, K=K, D=D, IB=IB, NB=1, nrt=1, nvec=nvec, cols=cols, group=group,
              nsg=nsg, packed=packed)
    return on_device_of(x, run_vq_cuda, x, pk, bias)


try:
    _op = torch.library.custom_op("leanq::cuda_vq_linear", mutates_args=())(_impl)

    @_op.register_fake
    def _(x, idx, cb, scales, bias, N, K, D, IB, nvec, cols, group, nsg, packed):
        return x.new_empty(x.shape[0], N)
except Exception:  # an older torch without custom_op: compiled models use the Triton kernel
    _op = None


def _linear(m, x: torch.Tensor) -> torch.Tensor:
    from .triton_vq_kn import packed_vq_kn

    pk = packed_vq_kn(m)
    x2, b = batch1_operands(m, x)
    args = (x2, pk["idx"], pk["cb"], pk["scales"], b, pk["N"], pk["K"], pk["D"], pk["IB"], pk["nvec"], pk["cols"],
            pk["group"], pk["nsg"], pk["packed"])
    return run_op(m, x, args, _impl, _op, "cuda-vq-lut-gemv", _BROKEN)


def batch1_operands(m, x: torch.Tensor) -> tuple:
    """x as one contiguous row [1, K], and the layer's bias in x's dtype (or None)."""
    x2 = x.reshape(1, -1)
    return (x2 if x2.is_contiguous() else x2.contiguous()), (m.bias.to(x.dtype) if m.bias is not None else None)


def run_op(m, x: torch.Tensor, args: tuple, impl, op, name: str, broken: set) -> torch.Tensor:
    """A vq CUDA kernel on ``args`` (x2 and bias first): its custom op ``op`` under torch.compile (taken whole, CUDA
    graphs included), else ``impl``. Where the kernel fails eagerly (NVRTC missing or failing, a launch refused),
    warn once and let the Triton kernel serve layer ``m`` from then on (its id joins ``broken``)."""
    from .triton_vq_kn import packed_vq_kn, run_vq_kn

    x2, b = args[0], args[4]
    if torch.compiler.is_compiling():
        y = op(*args) if op is not None else run_vq_kn(x2, packed_vq_kn(m), b)
        return y.reshape(*x.shape[:-1], m.out_features)
    try:
        y = impl(*args)
    except RuntimeError as e:
        import warnings

        warnings.warn(f"leanq: {name} unavailable ({str(e)[:200]}); using triton-vq-kn-gemv")
        broken.add(id(m))
        y = run_vq_kn(x2, packed_vq_kn(m), b)
    return y.reshape(*x.shape[:-1], m.out_features)


# priority 35: ahead of the Triton K-major GEMV (30) at batch 1
VQ_CUDA = register_kernel(Kernel("cuda-vq-lut-gemv", "vq", ("cuda",), _supports, _linear, priority=35,
                                     layout="triton_vq_kn"))
