"""Batch-1 codebook GEMV in CUDA C++ with one kernel per layer: split-K reduced inside a thread-block cluster.

Why a second codebook kernel: :mod:`leanq.kernels.cuda_vq` splits K over 64-128 blocks for the 2-bit preset,
whose blocks add into fp32 scratch, and a second kernel finishes. At 4096x4096 on an H200 that skeleton (the scratch
adds, the finishing kernel, the grid dependency between the two) is most of the 5.7 us the layer takes
(docs/PERFORMANCE.md, version 16). Here the CS blocks of one cluster (8 or 16) cover all of K; they add their partial
sums through distributed shared memory and write the output: no scratch, no atomics, no second kernel.

Two codebook shapes, both 2 bits per weight, both one index byte per 4 input columns (a "unit") and output:
- "p4": 2-dim vectors, 16 codewords (``--vq dim=2,index=4``). The byte holds the indices of the unit's two vectors
  (``idx[2u] | idx[2u+1] << 4``); a unit's table row is 2 x 16 fp32 entries, one per bank, so a warp's 32 lookups
  into one row take a single shared-memory pass.
- "b8": 4-dim vectors, 256 codewords (the 2-bit preset). The byte is the vector's index; a unit's row is 256
  entries, where 32 random lookups take about 3.3 passes. Its rows are 8x larger, so K must be small enough for a
  block's share of the table (K / CS inputs) to fit in shared memory.

Layout: indices uint8 [NU, N] (N contiguous: a thread's 4-byte load holds 4 outputs' bytes); codebooks as int32
words (two fp16 each) [nrt * nct * KK * D / 2] (row tile major); per-row fp32 scales [N]. Supports one book,
per-row scales, N a multiple of 4, and row tiles (a codebook per ``rows`` x ``cols`` tile) that are a multiple of the
outputs a block owns, so that each block's table comes from one row tile.

A block (cluster rank r, output chunk c) owns units [r * UB, (r + 1) * UB) and outputs [c * NR, c * NR + NR):
1. every thread issues its index loads (PPT units x 4 outputs), and the block stages its column tiles' codebooks
   (as fp32) in shared memory; then it waits for the previous kernel (programmatic dependent launch, ``gd``);
2. it stages its 4 * UB activations and builds the table (<codeword, x_v> for every codeword of each vector);
3. per output step a thread sums its PPT units' table reads for each of its 4 outputs; the block's TV unit groups
   write their sums side by side in shared memory and add them in a fixed order;
4. after a cluster barrier, rank r adds its share of the chunk's outputs over the cluster's ranks (distributed
   shared memory, fixed order), applies the row scale and bias, and writes the output dtype; a second cluster
   barrier keeps each block's shared memory alive until its peers have read it.
The sums are deterministic (no atomics). The oracle is :func:`reference_vq_cl` (and the stored format's
dequantize); :func:`emulate` follows the kernel's partition in float64 on the CPU.
"""

from __future__ import annotations

import functools

import torch

from . import Kernel, register_kernel
from .cuda_rt import PRELUDE, XT, Launcher, compile_kernels, device_index, nvrtc_available, on_device_of, pdl_mode, sm90
from .cuda_vq import PDL_LOADS

# threads per block, cluster size (blocks over K), the most units per thread, programmatic dependent launch
DEFAULT_CFG = dict(threads=256, cs=16, ppt_max=32, gd=1)
SMEM_LIMIT = 200 * 1024
SHAPES = {(2, 4), (4, 8)}  # (vq_dim, index bits): "p4" (16 codewords) and "b8" (256)


def row_pitch(d: int) -> int:
    """Floats from one unit's table row to the next: 32 for d2; 256 + 4 for d4, so that the build's 16-byte stores
    of 8 consecutive units (one warp phase) fall in 8 distinct bank groups."""
    return 32 if d == 2 else 260


def layout_fields(spec, out_features: int, in_features: int) -> dict | None:
    """The counts of the layout of a layer, or None when this kernel cannot take it."""
    from ..formats.vq import geometry

    geo = geometry(spec, out_features, in_features)
    d, ib = spec.vq_dim, spec.bits
    if ((d, ib) not in SHAPES or spec.vq_books != 1 or geo["nsg"] != 1 or out_features % 4 or geo["cols"] % 4
            or (geo["nrt"] > 1 and geo["rows"] % 4)):
        return None
    return dict(N=out_features, K=in_features, **_counts(d, geo["nvec"]), cols=geo["cols"], nct=geo["nct"],
                rows=geo["rows"], nrt=geo["nrt"])


def _counts(d: int, nvec: int) -> dict:
    """The counts that follow from the vector size: codewords KK, units NU (one index byte per 4 inputs)."""
    return dict(D=d, KK=16 if d == 2 else 256, nvec=nvec, NU=-(-nvec * d // 4))


def repack_vq_cl(qweight: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, spec, in_features: int) -> dict:
    """The layout (module docstring) from the stored tensors."""
    from ..formats.vq import unpack_indices

    n = qweight.shape[0]
    f = layout_fields(spec, n, in_features)
    if f is None:
        raise ValueError("cuda-vq-cluster: layout not supported (needs d 2 with 4-bit or d 4 with 8-bit indices, one "
                         "book, per-row scales, out_features a multiple of 4)")
    idx = unpack_indices(qweight, spec, in_features)[:, 0]  # [N, nvec]
    if f["D"] == 2:
        idx = torch.nn.functional.pad(idx, (0, 2 * f["NU"] - idx.shape[1]))
        idx = idx[:, 0::2] | (idx[:, 1::2] << 4)
    cb = codebooks.reshape(-1, f["KK"], f["D"]).contiguous().view(torch.int32).reshape(-1).clone()
    return dict(P=idx.to(torch.uint8).t().contiguous(), cb=cb, scales=scales.float().reshape(-1).contiguous(), **f)


def _codes(pk: dict) -> torch.Tensor:
    """The layout's indices per vector, [nvec, N] (int64)."""
    p = pk["P"].long()
    if pk["D"] == 2:
        p = torch.stack([p & 15, p >> 4], 1).reshape(-1, pk["N"])
    return p[: pk["nvec"]]


def reference_vq_cl(pk: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] a layout holds (pure torch)."""
    idx = _codes(pk)
    dev = idx.device
    cb = pk["cb"].view(torch.float16).float().reshape(-1, pk["KK"], pk["D"])  # [nrt * nct, KK, D]
    rt = torch.arange(pk["N"], device=dev) // pk["rows"]
    tile = rt[None, :] * pk["nct"] + (torch.arange(pk["nvec"], device=dev) * pk["D"] // pk["cols"])[:, None]
    w = cb[tile, idx].permute(1, 0, 2).reshape(pk["N"], -1)[:, : pk["K"]]  # [N, K]
    return (w * pk["scales"][:, None]).to(dtype)


def plan(pk: dict, cfg: dict) -> dict:
    """The launch geometry for layer ``pk``: threads, unit groups TV (threads per group TN = threads / TV, a
    multiple of 32), units per thread PPT (each block holds UB = TV * PPT units; CS blocks cover all NU), outputs
    per block NR (a multiple of 4) and the output chunks. ``cfg`` may fix ``tv``, ``nr`` or ``steps``."""
    threads, cs = int(cfg["threads"]), int(cfg["cs"])
    ub_need = -(-pk["NU"] // cs)
    tvs = [int(cfg["tv"])] if "tv" in cfg else [t for t in (1, 2, 4, 8, 16, 32) if threads // t >= 32 and threads % t == 0]
    if pk.get("nrt", 1) > 1 and "nr" not in cfg:  # a block's outputs within one row tile: 4 TN steps divides rows
        tvs = [t for t in tvs if pk["rows"] % (4 * (threads // t) * int(cfg.get("steps", 1))) == 0] or tvs[-1:]
    tv = next((t for t in tvs if -(-ub_need // t) <= cfg.get("ppt_max", 32)), tvs[-1])
    ppt = -(-ub_need // tv)
    if pk["D"] == 2:
        ppt += ppt % 2  # even: each group's rows start on a 256-byte boundary (the lookups' byte permute)
    tn = threads // tv
    # outputs per block: one step of the TN threads (4 outputs each) unless fixed; more blocks rather than more
    # steps per block (a step's index loads then wait on the last step's lookups)
    nr = int(cfg["nr"]) if "nr" in cfg else 4 * tn * int(cfg.get("steps", 1))
    chunks = -(-pk["N"] // nr)
    steps = -(-nr // (4 * tn))
    ub = tv * ppt
    ntmax = min(pk["nct"], (4 * ub) // pk["cols"] + 2)
    smem = (ub * row_pitch(pk["D"]) + tv * nr + nr + 4 * ub + ntmax * pk["KK"] * pk["D"]) * 4
    return dict(threads=threads, cs=cs, tv=tv, tn=tn, ppt=ppt, ub=ub, nr=nr, chunks=chunks, steps=steps, smem=smem)


def layout_ok(pk: dict, cfg: dict | None = None) -> bool:
    g = plan(pk, cfg or DEFAULT_CFG)
    return (g["tn"] % 32 == 0 and g["tn"] * g["tv"] == g["threads"] and g["smem"] <= SMEM_LIMIT
            and (pk.get("nrt", 1) == 1 or pk["rows"] % g["nr"] == 0)
            and (g["cs"] == 1 or -(-g["nr"] // g["cs"]) <= g["threads"]) and g["cs"] in (1, 2, 4, 8, 16) and g["ppt"] <= 64)


def emulate(pk: dict, x: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """The kernel's partition in float64 on any device: per block (rank, chunk) its units, per thread group its units
    and output steps, the groups' sums, then the cluster's sum in rank order; each (unit, output) term from the
    layout's dense weight. Fails if a (unit, output) is missed or counted twice. [1, K] -> [1, N] float64."""
    g = plan(pk, cfg or DEFAULT_CFG)
    N, K, NU = pk["N"], pk["K"], pk["NU"]
    w = torch.nn.functional.pad(reference_vq_cl(dict(pk, scales=torch.ones_like(pk["scales"])), torch.float64).cpu(),
                                (0, 4 * NU - K))
    xv = torch.nn.functional.pad(x.reshape(-1).double().cpu(), (0, 4 * NU - K))
    terms = (w.view(N, NU, 4) * xv.view(1, NU, 4)).sum(-1).t()  # [NU, N]: each unit's product with x
    out = torch.zeros(N, dtype=torch.float64)
    covered = torch.zeros(NU, N, dtype=torch.int64)
    for c in range(g["chunks"]):
        n0, ne = c * g["nr"], min(N, c * g["nr"] + g["nr"])
        bsums = []
        for r in range(g["cs"]):
            part = torch.zeros(g["tv"], g["nr"], dtype=torch.float64)
            for tv in range(g["tv"]):
                for i in range(g["ppt"]):
                    u = r * g["ub"] + tv * g["ppt"] + i
                    if u >= NU:
                        continue
                    part[tv, : ne - n0] += terms[u, n0:ne]
                    covered[u, n0:ne] += 1
            bsums.append(part.sum(0))
        out[n0:ne] = torch.stack(bsums).sum(0)[: ne - n0]
    if not bool((covered == 1).all()):
        raise AssertionError("the partition does not cover every (unit, output) exactly once")
    return (out * pk["scales"].double().cpu()).reshape(1, N)


_SRC = r"""
#define TN (THREADS / TV)
#define SOUT (TN * 4)      // outputs per step of a block
#define IPU (UW / 8)       // table-build items per unit (8 entries each)
#define XR_ ((4 * UB + THREADS - 1) / THREADS)   // activation values per thread
#define BR_ ((UB * IPU + THREADS - 1) / THREADS) // build items per thread

#if CS > 1
__device__ __forceinline__ void cluster_sync_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_sync_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// a float of block `rank`'s shared memory at the address of p in this block's
__device__ __forceinline__ float ld_peer(const float* p, u32 rank) {
  const u32 a = (u32)__cvta_generic_to_shared(p);
  u32 b;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(b) : "r"(a), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(b) : "memory");
  return v;
}
#endif

// a thread's PPT index words for outputs n..n+3 (zeros past the units or outputs); ORDERED: volatile (before the wait)
template <bool ORDERED>
__device__ __forceinline__ void load_q(u32 (&q)[PPT], const u32* __restrict__ P, int u0, int n, bool live, int NU,
                                       int N4) {
#pragma unroll
  for (int i = 0; i < PPT; ++i) {
    const int u = u0 + i;
    q[i] = 0u;
    if (live && u < NU) {
      const u32* a = P + (size_t)u * N4 + (n >> 2);
      if (ORDERED) ld_ordered(q[i], a);
      else q[i] = *a;
    }
  }
}

// grid (CS, chunks), clusters of CS blocks along x; dynamic shared memory (fp32): the table (UB rows of UW entries,
// UWP apart), the TV groups'
// sums (TV x NR), the block's sums (NR), the activations (4 UB), the codebooks of the block's column tiles (up to
// NTMAX tiles of KK x D)
extern "C" __global__ void __cluster_dims__(CS, 1, 1) __launch_bounds__(THREADS) vq_cluster_gemv(
    const void* XR x, void* __restrict__ out, const void* __restrict__ bias, const u32* __restrict__ P,
    const u32* __restrict__ cb, const float* __restrict__ s, int N, int NU, int K_IN, int COLS, int NCT, int NR,
    int HAS_BIAS, int ROWS)
{
  extern __shared__ __align__(16) float sm[];
  float* tab = sm;
  float* part = sm + UB * UWP;
  float* bsum = part + TV * NR;
  float* xs = bsum + NR;
  float* cbs = xs + 4 * UB;
  const int r = blockIdx.x;  // the cluster rank (the cluster spans the grid's x)
  const int n0 = blockIdx.y * NR;
  const int ne = min(N, n0 + NR);
  const int tn = threadIdx.x % TN, tv = threadIdx.x / TN;
  const int u0 = r * UB + tv * PPT;
  int n = n0 + tn * 4;
  u32 q[PPT];
  load_q<GD != 0>(q, P, u0, n, n < ne, NU, N >> 2);

  // the block's codebooks (column tiles t0.., of its row tile: all its outputs lie in one) as fp32, before the
  // wait: layer data, not written by the kernel before this one (volatile loads: ptxas keeps them ahead of it)
  const int c0 = 4 * r * UB;  // the block's first input column
  const int t0 = min(c0 / COLS, NCT - 1);
  const int nt = min((c0 + 4 * UB - 1) / COLS, NCT - 1) - t0 + 1;
  const u32* cbt = cb + ((size_t)(n0 / ROWS) * NCT + t0) * (KK * D / 2);
  for (int i = threadIdx.x; i < nt * KK * D / 8; i += THREADS) {
    uint4 w;
    ld_ordered(w, cbt + 4 * i);
    const u32 ww[4] = {w.x, w.y, w.z, w.w};
    float f[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) { f[2 * k] = h2f((u16)(ww[k] & 0xFFFFu)); f[2 * k + 1] = h2f((u16)(ww[k] >> 16)); }
    float4* dst = (float4*)(cbs + 8 * i);
    dst[0] = make_float4(f[0], f[1], f[2], f[3]);
    dst[1] = make_float4(f[4], f[5], f[6], f[7]);
  }
  gdc_step();
  // the block's activations (4 UB values; zeros past K), all loads in flight at once
  {
    float xv[XR_];
#pragma unroll
    for (int k = 0; k < XR_; ++k) {
      const int i = threadIdx.x + k * THREADS, col = c0 + i;
      xv[k] = i < 4 * UB && col < K_IN ? ldx(x, col) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < XR_; ++k) {
      const int i = threadIdx.x + k * THREADS;
      if (i < 4 * UB) xs[i] = xv[k];
    }
  }
  __syncthreads();
  // the table: item i = (unit i / IPU, entries 8 (i % IPU) .. + 7 of its row), from shared memory only.
  // p4: row entry 16 h + c = <codeword c, the unit's vector h>; b8: entry c = <codeword c, the unit's vector>
#pragma unroll
  for (int k = 0; k < BR_; ++k) {
    const int i = threadIdx.x + k * THREADS;
    if (i >= UB * IPU) break;
#if D == 2
    const int ul = i / IPU, g = i % IPU;  // a warp's lanes: 8 units, the same 4 entry groups (codewords broadcast)
    const int h = g >> 1, col = c0 + 4 * ul + 2 * h;  // the vector's first column
    const int cw = (g & 1) * 8;
#else
    const int ul = i % UB, g = i / UB;  // a warp's lanes: 32 units, one entry group (codewords broadcast; rows padded
                                        // to UWP so the lanes' 16-byte stores fall in distinct banks)
    const int col = c0 + 4 * ul;
    const int cw = g * 8;
#endif
    const int tl = min(col / COLS, NCT - 1) - t0;
    const float4* w4 = (const float4*)(cbs + ((size_t)tl * KK + cw) * D);  // 8 codewords, D floats each
    float xv[D];
#if D == 4
    const float4 x4 = *(const float4*)(xs + 4 * ul);  // one 16-byte read: the lanes' units are consecutive
    xv[0] = x4.x; xv[1] = x4.y; xv[2] = x4.z; xv[3] = x4.w;
#else
#pragma unroll
    for (int j = 0; j < D; ++j) xv[j] = xs[col - c0 + j];
#endif
    float e[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      float t = 0.f;
#pragma unroll
      for (int j = 0; j < D; j += 2) {
        const float4 wv = w4[(c * D + j) / 4];
        const float a0 = ((c * D + j) % 4 == 0) ? wv.x : wv.z, a1 = ((c * D + j) % 4 == 0) ? wv.y : wv.w;
        t += a0 * xv[j] + a1 * xv[j + 1];
      }
      e[c] = t;
    }
    float4* dst = (float4*)(tab + ul * UWP + g * 8);
    dst[0] = make_float4(e[0], e[1], e[2], e[3]);
    dst[1] = make_float4(e[4], e[5], e[6], e[7]);
  }
  __syncthreads();

  // p4: this group's first row in bytes from the table's start, a multiple of 256 (PPT even), so one byte permute
  // puts an index's byte offset (index * 4) into its low byte
  const u32 gbase = (u32)(tv * PPT * UW * 4);
  const char* tb = (const char*)tab;
#pragma unroll 1
  for (int st = 0; st < STEPS; ++st) {
    const int nn = n + SOUT;
#if STEPS > 1
    u32 qn[PPT];
    if (st + 1 < STEPS) load_q<false>(qn, P, u0, nn, nn < ne, NU, N >> 2);
#endif
    float a[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < PPT; ++i) {
#if D == 2
      const u32 lo = (q[i] << 2) & 0x3C3C3C3Cu, hi = (q[i] >> 2) & 0x3C3C3C3Cu;
      const char* t0p = tb + i * 128;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        a[j] += *(const float*)(t0p + __byte_perm(lo, gbase, 0x7650u | j)) +
                *(const float*)(t0p + 64 + __byte_perm(hi, gbase, 0x7650u | j));
#else
      const float* row = tab + (size_t)(tv * PPT + i) * UWP;
#pragma unroll
      for (int j = 0; j < 4; ++j) a[j] += row[(q[i] >> (8 * j)) & 0xFFu];
#endif
    }
    if (n < ne) *(float4*)(part + tv * NR + (n - n0)) = make_float4(a[0], a[1], a[2], a[3]);
    n = nn;
#if STEPS > 1
    if (st + 1 < STEPS) {
#pragma unroll
      for (int i = 0; i < PPT; ++i) q[i] = qn[i];
    }
#endif
  }
  __syncthreads();
  for (int j = threadIdx.x; j < ne - n0; j += THREADS) {
    float v = 0.f;
#pragma unroll
    for (int g = 0; g < TV; ++g) v += part[g * NR + j];
    bsum[j] = v;
  }
#if CS == 1
  __syncthreads();
  for (int j = threadIdx.x; j < ne - n0; j += THREADS) {
    float y = bsum[j] * s[n0 + j];
    if (HAS_BIAS) y += ldx(bias, n0 + j);
    stx(out, n0 + j, y);
  }
#else
  cluster_sync_arrive();  // every block's sums written and visible to the cluster
  cluster_sync_wait();
  const int share = (NR + CS - 1) / CS;
  const int j = r * share + (int)threadIdx.x;
  const bool mine = (int)threadIdx.x < share && n0 + j < ne;
  float v = 0.f;
  if (mine) {
#pragma unroll
    for (int b = 0; b < CS; ++b) v += ld_peer(bsum + j, (u32)b);
  }
  cluster_sync_arrive();  // this block's reads of its peers are done
  if (mine) {
    float y = v * s[n0 + j];
    if (HAS_BIAS) y += ldx(bias, n0 + j);
    stx(out, n0 + j, y);
  }
  cluster_sync_wait();  // the peers' reads of this block's sums are done: its shared memory may go
#endif
}
"""


def source(xt: int, d: int, threads: int, tv: int, ppt: int, cs: int, steps: int, gd: int = 0) -> str:
    """The CUDA source of one configuration (``plan``'s geometry as #defines); ``d`` 2 (16 codewords) or 4 (256)."""
    assert threads % tv == 0 and (threads // tv) % 32 == 0 and cs in (1, 2, 4, 8, 16) and gd in (0, 1, 2), (threads, tv, cs)
    assert d in (2, 4) and (d == 4 or ppt % 2 == 0), (d, ppt)
    kk, uw = (16, 32) if d == 2 else (256, 256)
    defs = dict(XT=xt, D=d, KK=kk, UW=uw, UWP=row_pitch(d), THREADS=threads, TV=tv, PPT=ppt, UB=tv * ppt, CS=cs, STEPS=steps, GD=gd)
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + PDL_LOADS + _SRC


def available() -> bool:
    return nvrtc_available("LEANQ_CUDA_VQ")


@functools.lru_cache(maxsize=None)
def _compiled(xt: int, d: int, threads: int, tv: int, ppt: int, cs: int, steps: int, gd: int, device: int) -> Launcher:
    src = source(xt, d, threads, tv, ppt, cs, steps, gd)
    with torch.cuda.device(device):
        (k,) = compile_kernels(src, ["vq_cluster_gemv"])
    return Launcher(k, "cuda-vq-cluster")


def run_vq_cluster(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [1, K] (fp16/bf16/fp32, contiguous) -> [1, N] of x2.dtype."""
    M, K = x2.shape
    assert M == 1 and K == pk["K"] and x2.is_contiguous(), (M, K, pk["K"])
    cfg = cfg or DEFAULT_CFG
    dev = device_index(x2)
    if cfg["cs"] > 8 and dev in _SMALL_CLUSTERS:
        cfg = dict(cfg, cs=8)
    if not layout_ok(pk, cfg):  # (a RuntimeError: the dispatch's caller lets the Triton kernel serve)
        raise RuntimeError("cuda-vq-cluster: no launch geometry for this layer and config")
    g = plan(pk, cfg)
    gd = pdl_mode(int(cfg.get("gd", 0)), sm90(dev))
    kern = _compiled(XT[x2.dtype], pk["D"], g["threads"], g["tv"], g["ppt"], g["cs"], g["steps"], gd, dev)
    out = torch.empty(M, pk["N"], device=x2.device, dtype=x2.dtype)
    try:
        if g["cs"] > 8:
            kern.allow_large_clusters()
        kern(grid=(g["cs"], g["chunks"], 1), block=(g["threads"], 1, 1), smem=g["smem"],
             args=[x2, out, bias if bias is not None else out, pk["P"], pk["cb"], pk["scales"], pk["N"], pk["NU"], K,
                   pk["cols"], pk["nct"], g["nr"], int(bias is not None), pk.get("rows", pk["N"])], pdl=gd > 0)
    except RuntimeError:
        # clusters of 16 are a non-portable size: where the GPU refuses them, clusters of 8 from then on
        if g["cs"] <= 8 or not layout_ok(pk, dict(cfg, cs=8)):
            raise
        _SMALL_CLUSTERS.add(dev)
        return run_vq_cluster(x2, pk, bias, dict(cfg, cs=8))
    return out


_SMALL_CLUSTERS: set = set()  # devices that refused a cluster of 16 blocks


def packed_vq_cl(m) -> dict:
    """The layout of vq QuantLinear ``m``, built at first use and cached (kernels.cached_layout)."""
    from . import cached_layout

    return cached_layout(m, "cuda_vq_cl", "vq_cl_only", lambda: repack_vq_cl(
        m.qweight, m.codebooks, m.scales, m.spec, m.in_features), names=("qweight", "codebooks", "scales"))


_BROKEN: set = set()


def _supports(m, x) -> bool:
    spec = getattr(m, "spec", None)
    if (getattr(m, "fmt", None) != "vq" or spec is None or not available() or id(m) in _BROKEN
            or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.shape[-1] != m.in_features
            or x.numel() != x.shape[-1] or x.device.type not in ("cuda", "meta")):
        return False
    return takes(spec, m.out_features, m.in_features)


def takes(spec, out_features: int, in_features: int) -> bool:
    """The dispatch rule: d2 16-codeword layers with a launch geometry. For d4 (256 codewords) cuda_vq's split-K
    kernel measured faster on every shape this one takes (the cluster form rebuilds 256-entry rows for a K / 16
    slice in every block; docs/PERFORMANCE.md, version 18)."""
    f = layout_fields(spec, out_features, in_features)
    return f is not None and f["D"] == 2 and layout_ok(f, DEFAULT_CFG)


def _impl(x: torch.Tensor, P: torch.Tensor, cb: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
          N: int, K: int, D: int, nvec: int, cols: int, nct: int, rows: int) -> torch.Tensor:
    """The kernel as one opaque op, so torch.compile (and its CUDA graphs) take it whole."""
    pk = dict(P=P, cb=cb, scales=scales, N=N, K=K, **_counts(D, nvec), cols=cols, nct=nct, rows=rows, nrt=-(-N // rows))
    return on_device_of(x, run_vq_cluster, x, pk, bias)


try:
    _op = torch.library.custom_op("leanq::cuda_vq_cluster_linear", mutates_args=())(_impl)

    @_op.register_fake
    def _(x, P, cb, scales, bias, N, K, D, nvec, cols, nct, rows):
        return x.new_empty(x.shape[0], N)
except Exception:  # an older torch without custom_op: compiled models use the other vq kernels
    _op = None


def _linear(m, x: torch.Tensor) -> torch.Tensor:
    from .cuda_vq import batch1_operands, run_op

    pk = packed_vq_cl(m)
    x2, b = batch1_operands(m, x)
    args = (x2, pk["P"], pk["cb"], pk["scales"], b, pk["N"], pk["K"], pk["D"], pk["nvec"], pk["cols"], pk["nct"],
            pk["rows"])
    return run_op(m, x, args, _impl, _op, "cuda-vq-cluster-gemv", _BROKEN)


# priority 36: ahead of cuda-vq-lut-gemv (35) for the d2 16-codeword layouts, at batch 1
VQ_CLUSTER = register_kernel(Kernel("cuda-vq-cluster-gemv", "vq", ("cuda",), _supports, _linear, priority=36,
                                    layout="cuda_vq_cl"))
