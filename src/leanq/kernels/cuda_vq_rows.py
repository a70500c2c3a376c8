"""Batch-1 codebook GEMV with whole rows per warp (CUDA C++): the integer kernel's design for vq layers.

Status: measured, and slower than the kernel it was meant to replace, so it stays **out of the dispatch
table** (``benchmarks/kernels/bench_vq.py --rows`` times it). On an H100 (2026-11-28, graph harness,
``benchmarks/kernels/results/vq-rows-h100-2026-11-28.jsonl``) its best config reached 1.75-2.16x BF16 for
vq2 and 1.51-1.82x for vq3, against 2.00-3.13x and 1.74-2.22x for ``cuda-vq-lut-gemv``. ncu (on an H200,
vq2 at 4096x4096, ``ncu-h200-2026-11-28-vqrows_2.txt``): 128 blocks of 512 threads, one per SM at 25%
occupancy, 0.28 instructions issued per cycle per scheduler, DRAM at 9% of peak. Each block stages 44 KB of
codebooks before its first index, and one block per SM cannot hide those loads. The layout and its decode
are still checked on the CPU (``tests/test_kernels_vq.py``) and on a GPU.

Why: ``cuda-vq-lut-gemv`` (:mod:`leanq.kernels.cuda_vq`) splits K across blocks and adds into fp32
scratch, then finishes in a second kernel. At 4096x4096 that skeleton alone takes 6.1 us, against the
6.4 us that 2.5x BF16 allows. The integer GEMV (:mod:`leanq.kernels.cuda_int`) has one launch and no
atomics; its skeleton runs at about 2 us plus the weight stream at 2.85-2.9 TB/s. Here the same
skeleton serves codebooks:
- every block stages all of the layer's codebooks in shared memory, one per 192-column tile for the presets:
  vq2 at K = 4096 is 22 x 256 x 4 fp16 = 44 KB; vq3 at K = 14336 is 75 x 64 x 2 fp16 = 19 KB;
- every block stages x as fp16 scaled by one power of two (a block-wide max), a thread per 16-byte unit
  with all its loads in flight at once (what the integer kernel's v5 staging does);
- each index costs one shared-memory read of its codeword and D/2 fp16x2 FMAs.

Layout ("vq-rk"): words [N, nct * CPT * 4] int32. For each codebook tile t, CPT 16-byte chunks hold the
tile's VPT = cols / D vectors, IPC per chunk, zero-padded to CPT * IPC. Index i of a chunk sits in word
i // IPW at bits IB * (i % IPW): IPW = 32 // IB, so 4 for IB 8, 5 for IB 6 (30 bits used) and 8 for IB 4.
A chunk never crosses a tile, so its codebook is fixed. Scales: fp32 [N, nsg]. Supported: one codebook
set for all rows (no row tiles), one book, D in (2, 4), IB in (4, 6, 8), and scales per row or per group
of whole tiles.
"""

from __future__ import annotations

import functools

import torch

from ..formats.vq import geometry, unpack_indices
from .cuda_rt import PRELUDE, XT, Launcher, device_index, nvrtc_available, on_device_of, sm_count

DEFAULT_CFG = dict(threads=256, r=2, u=1)
SMEM_LIMIT = 200 * 1024  # codebooks + staged activations of one block; above, the LUT kernel serves


def ipw(ib: int) -> int:
    return 32 // ib


def layout_fields(spec, out_features: int, in_features: int) -> dict | None:
    """The counts of the vq-rk layout of a layer, or None when this kernel cannot take it."""
    d, ib = spec.vq_dim, spec.bits
    geo = geometry(spec, out_features, in_features)
    if spec.vq_books != 1 or geo["nrt"] != 1 or d not in (2, 4) or ib not in (4, 6, 8) or geo["cols"] % d:
        return None
    if geo["nsg"] != 1 and geo["group"] % geo["cols"]:
        return None
    ipc = 4 * ipw(ib)
    vpt = geo["cols"] // d
    cpt = -(-vpt // ipc)
    s_units = d * ipc // 8  # 16-byte units of fp16 activations per chunk
    cst = s_units + 1 if s_units % 2 == 0 else s_units + 2  # odd stride, one spare unit at least
    nct = geo["nct"]
    smem = nct * cpt * cst * 16 + nct * (1 << ib) * d * 2
    if smem > SMEM_LIMIT or (d * ipc) % 8:
        return None
    return dict(D=d, IB=ib, IPC=ipc, VPT=vpt, CPT=cpt, NCT=nct, KK=1 << ib, CST=cst, S=s_units, nvec=geo["nvec"],
                cols=geo["cols"], nsg=geo["nsg"], group=geo["group"], smem=smem)


def repack_vq_rk(qweight: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, spec, in_features: int) -> dict:
    """The vq-rk layout from the stored tensors (module docstring)."""
    n = qweight.shape[0]
    f = layout_fields(spec, n, in_features)
    if f is None:
        raise ValueError("cuda-vq-rows: layout not supported (row tiles, several books, D, index bits, groups)")
    idx = unpack_indices(qweight, spec, in_features)[:, 0]  # [N, nvec]
    vp = f["NCT"] * f["VPT"]
    idx = torch.nn.functional.pad(idx, (0, vp - idx.shape[1])).view(n, f["NCT"], f["VPT"])
    idx = torch.nn.functional.pad(idx, (0, f["CPT"] * f["IPC"] - f["VPT"]))  # [N, NCT, CPT * IPC]
    w = idx.reshape(n, -1, ipw(f["IB"]))  # [N, words, IPW]
    shifts = torch.arange(ipw(f["IB"]), device=w.device, dtype=torch.int64) * f["IB"]
    words = (w.to(torch.int64) << shifts).sum(-1)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32).contiguous()
    return dict(words=words, cb=codebooks.reshape(-1).clone(), scales=scales.float().contiguous(), N=n,  # cb: 16-B aligned
                K=in_features, **f)


def reference_vq_rk(pk: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] a vq-rk layout holds (pure torch): the kernel's oracle."""
    n, d, ib = pk["N"], pk["D"], pk["IB"]
    w = pk["words"].to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(ipw(ib), device=w.device, dtype=torch.int64) * ib
    idx = ((w.unsqueeze(-1) >> shifts) & ((1 << ib) - 1)).reshape(n, pk["NCT"], -1)[:, :, : pk["VPT"]]  # [N, T, VPT]
    cb = pk["cb"].view(pk["NCT"], pk["KK"], d).float()
    tiles = torch.arange(pk["NCT"], device=w.device)[None, :, None]
    vecs = cb[tiles, idx]  # [N, T, VPT, D]
    dense = vecs.reshape(n, -1)[:, : pk["K"]]
    g = torch.arange(pk["K"], device=w.device) // pk["group"]
    return (dense * pk["scales"][:, g.clamp(max=pk["nsg"] - 1)]).to(dtype)


_SRC = r"""
#define WARPS (THREADS / 32)
#define IPW (32 / IB)
#define IPC (4 * IPW)         // indices per 16-byte chunk
#define QM ((1u << IB) - 1u)


// values staged from scalar loads go back into x's own 16-byte format (pack8, exact: they are x's own values),
// so the conversion pass reads one kind of word (unpack8, cuda_rt.PRELUDE)
__device__ __forceinline__ void pack8(uint4 (&r)[XW], const float (&v)[8]) {
#if XT == 0
  r[0] = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  r[1] = make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]), __float_as_uint(v[7]));
#else
  u32 h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {  // the values are x's own, so converting back is exact
    u16 b16;
#if XT == 1
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b16) : "f"(v[i]));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b16) : "f"(v[i]));
#endif
    h[i] = b16;
  }
  r[0] = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
#endif
}

// the R x U chunks of a warp's tile (row group rg, chunks c0 + lane + 32 u; zeros past the rows or the row end)
__device__ __forceinline__ void load_tile(uint4 (&q)[R][U], const uint4* __restrict__ w, int rg, int c0, int N, int KC,
                                          int lane) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = rg * R + r;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + lane + 32 * u;
      q[r][u] = row < N && c < KC ? ldw(w + (size_t)row * KC + c) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// chunk c (tile c / CPT): its activations (fp16, D values per index, scaled by 2**-e) from xs, its codebook from
// cbs; acc += 2**e * sum over indices <codeword, x> (* the tile's group scale); 2**e is in the chunk's spare unit
__device__ __forceinline__ void compute_tile(float (&acc)[R], const uint4 (&q)[R][U], const uint4* xs, const u32* cbs,
                                             const float* __restrict__ s, int rg, int N, int NSG, int TPG, int c0,
                                             int lane, int KC) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + lane + 32 * u;
    if (c >= KC) continue;
    const int t = c / CPT;
    u32 xh[S * 4];
    const uint4* xc = xs + c * CST;
#pragma unroll
    for (int j = 0; j < S; ++j) {
      const uint4 v = xc[j];
      xh[4 * j] = v.x; xh[4 * j + 1] = v.y; xh[4 * j + 2] = v.z; xh[4 * j + 3] = v.w;
    }
    const float P = __uint_as_float(xc[S].x);
    const u32* cbt = cbs + t * KK * (D / 2);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const u32 wd[4] = {q[r][u].x, q[r][u].y, q[r][u].z, q[r][u].w};
      u32 a = 0u;
#pragma unroll
      for (int i = 0; i < IPC; ++i) {
        const u32 k = (wd[i / IPW] >> (IB * (i % IPW))) & QM;
#if D == 4
        const uint2 cw = *(const uint2*)(cbt + 2 * k);
        a = hfma2(cw.x, xh[2 * i], a);
        a = hfma2(cw.y, xh[2 * i + 1], a);
#else
        a = hfma2(cbt[k], xh[i], a);
#endif
      }
      float y = P * h2sum(a);
      if (NSG > 1) {
        const int row = rg * R + r;
        y *= row < N ? s[(size_t)row * NSG + min(t / TPG, NSG - 1)] : 0.f;
      }
      acc[r] += y;
    }
  }
}

// grid: at most the blocks the GPU holds at once; warps walk row groups of R rows by the grid's stride.
// xs (dynamic shared memory): per chunk CST 16-byte units (S of fp16 activations, one with 2**e), then the codebooks.
extern "C" __global__ void __launch_bounds__(THREADS) vq_rows_gemv(
    const void* __restrict__ x, void* __restrict__ out, const void* __restrict__ bias, const uint4* __restrict__ w,
    const u16* __restrict__ cb, const float* __restrict__ s, int N, int K, int NVEC, int NSG, int TPG, int HAS_BIAS,
    int XVEC)
{
  extern __shared__ uint4 xs[];
  const int KC = NCT * CPT;                          // chunks per row
  u32* cbs = (u32*)(xs + KC * CST);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int NRG = (N + R - 1) / R;
  const int TPR = (KC + 32 * U - 1) / (32 * U);
  const int rg0 = blockIdx.x * WARPS + warp, rstep = gridDim.x * WARPS;
  uint4 q[R][U];
  if (rg0 < NRG) load_tile(q, w, rg0, 0, N, KC, lane);

  // codebooks: NCT * KK * D fp16, 16 bytes at a time (the tensor is 16-byte aligned; its size a multiple of 16)
  for (int i = threadIdx.x; i < NCT * KK * D / 8; i += THREADS) xs[KC * CST + i] = ((const uint4*)cb)[i];
  // activations, a thread per 16-byte unit of 8 values (SB units per thread at once, their loads in flight together):
  // unit j of chunk (t, cc) holds tile vectors cc * IPC + (8 j + i) / D, zero past the tile's VPT vectors or past K.
  // One scale for all of x: 2**e >= max |x| (block-wide maximum), the fp16 values x * 2**-e.
  __shared__ float wmax[WARPS];
  const int NU = KC * S;
  float m = 0.f;
  uint4 raw[SB][XW];  // the units' 16-byte words (16-bit x: one, fp32: two); unaligned or partial units: packed fp32
#pragma unroll
  for (int b = 0; b < SB; ++b) {
    const int u = b * THREADS + threadIdx.x;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.f;
    if (u < NU) {
      const int c = u / S, j = u % S, t = c / CPT;
      const int k0 = t * VPT * D + (c % CPT) * IPC * D + 8 * j;  // the unit's first column
      const int kend = min(min(t * VPT + VPT, NVEC) * D, K);
      if (XVEC && k0 + 8 <= kend) {  // contiguous and 16-byte aligned (K % 8 == 0; tiles and chunks of whole units)
#pragma unroll
        for (int i = 0; i < XW; ++i) raw[b][i] = ((const uint4*)x)[k0 / (8 / XW) + i];
        unpack8(v, raw[b]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = k0 + i < kend ? ldx(x, k0 + i) : 0.f;
        pack8(raw[b], v);
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(v[i]));
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) wmax[warp] = m;
  __syncthreads();  // (also orders the codebook stores above before any read)
  m = wmax[0];
#pragma unroll
  for (int i = 1; i < WARPS; ++i) m = fmaxf(m, wmax[i]);
  int e = (int)((__float_as_uint(m) >> 23) & 0xFFu) - 126;
  e = m >= 1.17549435e-38f ? min(max(e, -100), 100) : 0;
  const float inv = __uint_as_float((u32)(127 - e) << 23);
  const u32 pe = __float_as_uint(__uint_as_float((u32)(127 + e) << 23));
#pragma unroll
  for (int b = 0; b < SB; ++b) {
    const int u = b * THREADS + threadIdx.x;
    if (u >= NU) continue;
    const int c = u / S, j = u % S;
    float v[8];
    unpack8(v, raw[b]);
    xs[c * CST + j] = make_uint4(f2h2(v[0] * inv, v[1] * inv), f2h2(v[2] * inv, v[3] * inv),
                                 f2h2(v[4] * inv, v[5] * inv), f2h2(v[6] * inv, v[7] * inv));
    if (j == 0) xs[c * CST + S] = make_uint4(pe, 0u, 0u, 0u);
  }
  __syncthreads();

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  int rg = rg0, tk = 0;
  while (rg < NRG) {
    int rgn = rg, tkn = tk + 1;
    if (tkn == TPR) { tkn = 0; rgn += rstep; }
    uint4 qn[R][U];
    if (rgn < NRG) load_tile(qn, w, rgn, tkn * 32 * U, N, KC, lane);
    compute_tile(acc, q, xs, cbs, s, rg, N, NSG, TPG, tk * 32 * U, lane, KC);
    if (tkn == 0) finish_rows(acc, rg, lane, N, out, bias, HAS_BIAS, NSG == 1 ? s : nullptr);
    rg = rgn;
    tk = tkn;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) q[r][u] = qn[r][u];
  }
}
"""


def source(f: dict, xt: int, threads: int, r: int, u: int) -> str:
    """The CUDA source of one layout (``layout_fields``) and launch configuration: SB, the activation units per
    thread, covers all of x in one step."""
    sb = -(-f["NCT"] * f["CPT"] * f["S"] // threads)
    defs = dict(D=f["D"], IB=f["IB"], KK=f["KK"], CPT=f["CPT"], NCT=f["NCT"], VPT=f["VPT"], S=f["S"], CST=f["CST"],
                XT=xt, THREADS=threads, R=r, U=u, SB=sb)
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + _SRC


def available() -> bool:
    return nvrtc_available("LEANQ_CUDA_VQ")


@functools.lru_cache(maxsize=None)
def _compiled(key: tuple, xt: int, threads: int, r: int, u: int, device: int) -> Launcher:
    src = source(dict(key), xt, threads, r, u)
    with torch.cuda.device(device):
        return Launcher(torch.cuda._compile_kernel(src, "vq_rows_gemv"), "cuda-vq-rows")



_KEYS = ("D", "IB", "KK", "CPT", "NCT", "VPT", "S", "CST")


def run_vq_rows(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [1, K] (fp16/bf16/fp32, contiguous) -> [1, N] of x2.dtype."""
    M, K = x2.shape
    assert M == 1 and K == pk["K"] and x2.is_contiguous(), (M, K, pk["K"])
    cfg = dict(cfg or DEFAULT_CFG)
    threads, r, u = cfg["threads"], cfg["r"], cfg["u"]
    dev = device_index(x2)
    kern = _compiled(tuple((k, pk[k]) for k in _KEYS), XT[x2.dtype], threads, r, u, dev)
    N = pk["N"]
    if out is None:
        out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    nrg = -(-N // r)
    blocks = max(1, min(-(-nrg // (threads // 32)), kern.blocks_per_sm(threads, pk["smem"]) * sm_count(dev)))
    tpg = max(1, pk["group"] // pk["cols"])  # codebook tiles per scale group
    kern(grid=(blocks, 1, 1), block=(threads, 1, 1), smem=pk["smem"],
         args=[x2, out, bias if bias is not None else out, pk["words"], pk["cb"], pk["scales"], N, K, pk["nvec"],
               pk["nsg"], tpg, int(bias is not None), int(K % 8 == 0 and x2.data_ptr() % 16 == 0)])
    return out


def run(x: torch.Tensor, pk: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """On x's GPU (benchmarks and tests; not in the dispatch table yet)."""
    return on_device_of(x, run_vq_rows, x, pk, bias)
