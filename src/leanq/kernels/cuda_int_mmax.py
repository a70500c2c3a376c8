"""Batches 2-16 of 4-bit layers on tensor cores with x held in registers (the "x kernel", ``int_mma_x``).

The w kernel (:mod:`leanq.kernels.cuda_int_mma`) gives each warp 16 rows and a range of inputs, stages the block's
x in shared memory once, and reads each super-step's x fragments back from there: 4 KB of shared-memory reads per
KB of weights at batch 16, behind a block-wide staging at the start. This kernel turns the loop around. A warp owns
SP super-steps (128 inputs each) of the block's input range for the whole launch: it loads their x fragments
(the w kernel's B registers, the same order) from global memory into registers once, then walks the block's row
tiles, loading each tile's words straight into registers PF tiles ahead, decoding them into A registers and
multiplying (``tile_wstep``, the w kernel's own). Nothing of x passes through shared memory.

What the warps of a block still share is the sum over their input ranges: after each row tile every warp writes its
C fragments (16 rows x 8 NT batch columns, fp32) into one of two shared buffers, the block meets at one barrier, and
thread o adds value o of the tile over the warps in warp order. When the grid also splits K (``gridDim.y`` > 1),
those sums go to the block's slot of ``part`` and the block that arrives last at its row band's counter adds the
slots in slot order (deterministic, no float atomics) and writes the output.

Launch config (:data:`X_DEFAULT`, :func:`x_launch`): ``nw`` warps per block, ``sp`` super-steps per warp (so a block
covers nw * sp super-steps of K), ``pf`` row tiles in flight ahead of the one being multiplied, ``rb`` row tiles per
block (0: the fewest that keep the grid within one block per SM), ``gd`` programmatic dependent launch (the first
tiles' words are loaded before the wait for the previous grid, x after it), ``rg`` (prepared in session 34, not yet
timed on a GPU; 0 by default) the words through a per-warp ring of rg slots in shared memory filled by cp.async
rg - 1 tiles ahead, so that more bytes are in flight than registers could hold (76 registers at rg 4-8, against 114),
and ``pb`` (prepared likewise, 0 by default) each next tile's rows by pointer increments where the per-tile address
arithmetic took about 50 instructions of the tile's 250 in the SASS.

Measured on an H200 (session 34, graph harness of ``bench_cuda_int.py``, batch 16, BF16 x; benchmarks/kernels/NOTES.md
v35): 8.5 / 16.2 / 15.2 / 19.7 / 18.0 us on 4096x4096, 4096x11008, 11008x4096, 4096x14336, 14336x4096 against the
w kernel's 9.4 / 16.0 / 14.0 / 20.2 / 16.7, so it serves the shapes of :data:`X_SHAPES` only (4096 x 4096: 1.60x BF16
where the w kernel gives 1.46x; 4096 x 14336: 2-3% ahead). What it costs beyond its weight stream (ablations, ``abl``): the per-tile sums over the
warps and their barrier 0.7-2.1 us; the stream itself, without decode and products, ran at about half the copy rate.
Measured and not kept: the sums on mbarriers with 2-4 slots, each warp adding its share of the tile before while the
others go on (0.3-1.4 us slower: the barrier's lockstep is not what it costs), two tiles a barrier (up to 5% slower),
two blocks of 8 warps a SM (6-40% slower). The split's sum once took 1.5-5 us with one output per thread at a time;
FU outputs per thread with their slot loads in flight together took it to the figures above.
"""

from __future__ import annotations

import functools
import os

import torch

from .cuda_int_mma import _HELPERS, _W_TILE, _launcher, _w_scratch, gate_w, split_args
from .cuda_rt import PRELUDE, XT, device_index, pdl_mode, sm90, sm_count

_SRC_X = r"""
#define SPG (GS / 128)       // super-steps per scale group
#define KSL (NW * SP)        // super-steps per block
#define VPL (NT * 4)         // C values per lane of one row tile
#define TOUT (NT * 128)      // outputs of one row tile: 16 rows x 8 NT batch columns
#define FU 8                 // outputs per thread whose slot loads go out together in the split's sum
struct XTile { uint4 qa[SP], qb[SP]; u32 za[SP], zb[SP]; };
#if RG
static_assert(SP == 1 && RG >= 2 && RG <= 8, "the shared-memory ring (rg) holds one super-step a tile, 2-8 slots");
__device__ __forceinline__ void xcp(void* dst, const void* src, int bytes) {  // 16 or 4 bytes, global -> shared
  if (bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src));
}
#endif

// x: [M, K] 16-bit, 16-byte aligned rows (K % 128 == 0); out: [M, N]; w, sz: the rk layout; part, cnt: the slots
// ([gridDim.y][tiles][TOUT] fp32) and the row bands' arrival counters (zero between launches), used when
// gridDim.y > 1; rb: row tiles per block
extern "C" __global__ void __launch_bounds__(NW * 32, 1) int_mma_x(
    const uint4* XR x, void* __restrict__ out, const void* __restrict__ bias, const uint4* __restrict__ w,
    const u32* __restrict__ sz, float* __restrict__ part, int* __restrict__ cnt, int M, int N, int K, int KU, int NG,
    int HAS_BIAS, int rb)
{
  __shared__ float red[2][VPL][NW][32];  // per buffer: value i of lane l of warp q
  __shared__ int last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int NS = K >> 7, NT16 = (N + 15) >> 4;
  const int s0 = blockIdx.y * KSL + warp * SP;  // the warp's first super-step
  const int T0 = blockIdx.x * rb, T1 = min(T0 + rb, NT16);
  bool vs[SP];   // super-steps inside K: the others load nothing and meet zero x
  int sc[SP];
#pragma unroll
  for (int s = 0; s < SP; ++s) { vs[s] = s0 + s < NS; sc[s] = min(s0 + s, NS - 1); }
#if PB
  // pb: each next tile's rows by pointer increments (load_tile and issue_tile take the tiles in order, once each),
  // the clamped rows only for a tile that reaches past N
  const uint4* wrun = w + (size_t)(16 * T0 + g) * KU + t;
  const u32* zrun = sz + (size_t)(16 * T0 + g) * NG;
  auto tile_src = [&](int T, const uint4*& pa, const uint4*& pb, const u32*& ga, const u32*& gb) {
    if (16 * T + 16 <= N) {
      pa = wrun; pb = wrun + (size_t)8 * KU; ga = zrun; gb = zrun + (size_t)8 * NG;
    } else {
      const int ra = min(16 * T + g, N - 1), rbw = min(16 * T + g + 8, N - 1);
      pa = w + (size_t)ra * KU + t; pb = w + (size_t)rbw * KU + t;
      ga = sz + (size_t)ra * NG; gb = sz + (size_t)rbw * NG;
    }
    wrun += (size_t)16 * KU;
    zrun += (size_t)16 * NG;
  };
#endif
  auto load_tile = [&](XTile& d, int T) {
    const int ra = min(16 * T + g, N - 1), rbw = min(16 * T + g + 8, N - 1);
#if ABL & 4  // ablation (timing only, sp 1): the warp's 1 KB read as two 512-byte runs of one row, the block's 16 KB
            // a tile as 16 rows x its K range (nw 16)
    const uint4* pa = w + (size_t)min(16 * T + (warp & 15), N - 1) * KU + 4 * blockIdx.y * KSL + lane - 4 * sc[0];
    const uint4* pb = pa + 32;
#elif PB
    const uint4 *pa, *pb;
    const u32 *ga, *gb;
    tile_src(T, pa, pb, ga, gb);
#else
    const uint4* pa = w + (size_t)ra * KU + t;
    const uint4* pb = w + (size_t)rbw * KU + t;
#endif
#pragma unroll
    for (int s = 0; s < SP; ++s) {
      d.qa[s] = vs[s] ? ldw(pa + 4 * sc[s]) : make_uint4(0, 0, 0, 0);
      d.qb[s] = vs[s] ? ldw(pb + 4 * sc[s]) : make_uint4(0, 0, 0, 0);
#if ABL & 8  // ablation (timing only): no group words loaded
      d.za[s] = d.zb[s] = 0x3C000000u | (u32)s;
#elif PB && !(ABL & 4)
      d.za[s] = vs[s] ? __ldg(ga + sc[s] / SPG) : 0u;
      d.zb[s] = vs[s] ? __ldg(gb + sc[s] / SPG) : 0u;
#else
      d.za[s] = vs[s] ? __ldg(sz + (size_t)ra * NG + sc[s] / SPG) : 0u;
      d.zb[s] = vs[s] ? __ldg(sz + (size_t)rbw * NG + sc[s] / SPG) : 0u;
#endif
    }
  };
#if RG
  extern __shared__ uint4 xring[];  // [NW][RG][2][32] words, then [NW][RG][2][32] group words
  uint4* rq = xring + (size_t)warp * RG * 64 + lane;
  u32* rz = (u32*)(xring + NW * RG * 64) + (size_t)warp * RG * 64 + lane;
  auto issue_tile = [&](int T, int d) {  // tile T's copies into slot d (nothing past K)
#if PB
    const uint4 *pa, *pb;
    const u32 *ga, *gb;
    tile_src(T, pa, pb, ga, gb);
    if (!vs[0]) return;
    xcp(rq + d * 64, pa + 4 * sc[0], 16);
    xcp(rq + d * 64 + 32, pb + 4 * sc[0], 16);
    xcp(rz + d * 64, ga + sc[0] / SPG, 4);
    xcp(rz + d * 64 + 32, gb + sc[0] / SPG, 4);
#else
    if (!vs[0]) return;
    const int ra = min(16 * T + g, N - 1), rbw = min(16 * T + g + 8, N - 1);
    xcp(rq + d * 64, w + (size_t)ra * KU + t + 4 * sc[0], 16);
    xcp(rq + d * 64 + 32, w + (size_t)rbw * KU + t + 4 * sc[0], 16);
    xcp(rz + d * 64, sz + (size_t)ra * NG + sc[0] / SPG, 4);
    xcp(rz + d * 64 + 32, sz + (size_t)rbw * NG + sc[0] / SPG, 4);
#endif
  };
  // the first RG - 1 tiles' copies: they do not depend on the grid before (x does)
#pragma unroll
  for (int d = 0; d < RG - 1; ++d) {
    if (T0 + d < T1) issue_tile(T0 + d, d);
    asm volatile("cp.async.commit_group;");
  }
  (void)load_tile;
#else
  XTile buf[PF + 1];
  // the first PF tiles' words: they do not depend on the grid before (x does)
#pragma unroll
  for (int p = 0; p < PF; ++p)
    if (T0 + p < T1) load_tile(buf[p], T0 + p);
#endif
#if GD
  gdc_wait();
#if GD == 1
  gdc_launch();
#endif
#endif
  // the warp's x fragments for the whole launch: super-step s, step j, batch tile n holds x[g + 8n][128 S + 32 t +
  // 4 j .. + 3] (S = s0 + s; batch rows past M clamped, their outputs never written)
  uint2 xv[SP][8][NT];
#pragma unroll
  for (int s = 0; s < SP; ++s)
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const uint4* src = x + (size_t)min(g + 8 * n, M - 1) * (K >> 3) + sc[s] * 16 + 4 * t;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint4 v = vs[s] ? src[i] : make_uint4(0, 0, 0, 0);
        xv[s][2 * i][n] = make_uint2(v.x, v.y);
        xv[s][2 * i + 1][n] = make_uint2(v.z, v.w);
      }
    }
  const bool split = gridDim.y > 1;
  // one row tile: its products from the words in bq, then the sum over the warps (one barrier) and its outputs
  auto tile_done = [&](const XTile& bq, const int Tq) {
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
    for (int s = 0; s < SP; ++s)
#if ABL & 2  // ablation (timing only): the words are loaded but not decoded or multiplied
      acc[0][0] += __uint_as_float((bq.qa[s].x ^ bq.qa[s].y ^ bq.qa[s].z ^ bq.qa[s].w ^
                                    bq.qb[s].x ^ bq.qb[s].y ^ bq.qb[s].z ^ bq.qb[s].w ^
                                    bq.za[s] ^ bq.zb[s]) & 0x3F7FFFFFu);
#else
      tile_wstep(acc, bq.qa[s], bq.qb[s], bq.za[s], bq.zb[s], xv[s]);
#endif
    const int p = Tq & 1;
#if ABL & 1  // ablation (timing only): no sum over the warps, no barrier; warp 0's values stand for the tile's
    if (warp == 0) {
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[p][4 * n + i][0][lane] = acc[n][i];
    }
    __syncwarp();
#else
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[p][4 * n + i][warp][lane] = acc[n][i];
    __syncthreads();  // buffer p is whole; buffer p ^ 1 was read by everyone before they got here
#endif
    for (int o = threadIdx.x; o < TOUT; o += NW * 32) {
      const int i = o >> 5, l = o & 31;
      float y = 0.f;
#if ABL & 1
      y = red[p][i][0][l];
#else
#pragma unroll
      for (int qw = 0; qw < NW; ++qw) y += red[p][i][qw][l];
#endif
      if (split) {
        part[((size_t)blockIdx.y * NT16 + Tq) * TOUT + o] = y;
      } else {  // value i of lane l: row g' + 8 (i % 4 / 2), batch column 8 (i / 4) + 2 t' + i % 2
        const int r = 16 * Tq + (l >> 2) + 8 * ((i >> 1) & 1), b = 8 * (i >> 2) + 2 * (l & 3) + (i & 1);
        if (r < N && b < M) stx(out, (long long)b * N + r, y + (HAS_BIAS ? ldx(bias, r) : 0.f));
      }
    }
  };
#if RG
  // rg: each tile's words and group words copied by cp.async into a ring of RG slots per warp in shared memory, RG - 1
  // tiles ahead (no registers held by the copies in flight); each lane reads back only what it copied itself
  for (int T = T0, slot = 0; T < T1; ++T) {
    const int ahead = slot == 0 ? RG - 1 : slot - 1;  // the slot of tile T - 1, read in the last iteration
    if (T + RG - 1 < T1) issue_tile(T + RG - 1, ahead);
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group %0;" :: "n"(RG - 1));  // this lane's copies of tile T have landed
    XTile cur;
    cur.qa[0] = rq[slot * 64]; cur.qb[0] = rq[slot * 64 + 32];
    cur.za[0] = vs[0] ? rz[slot * 64] : 0u; cur.zb[0] = vs[0] ? rz[slot * 64 + 32] : 0u;  // past K: scale 0
    tile_done(cur, T);
    slot = slot == RG - 1 ? 0 : slot + 1;
  }
  asm volatile("cp.async.wait_group 0;");
#else
  for (int T = T0; T < T1; T += PF + 1) {
#pragma unroll
    for (int q = 0; q <= PF; ++q) {  // unrolled: every tile's registers have a fixed place (no moves)
      const int Tq = T + q;
      if (Tq >= T1) break;
      if (Tq + PF < T1) load_tile(buf[(q + PF) % (PF + 1)], Tq + PF);
      tile_done(buf[q], Tq);
    }
  }
#endif
  if (!split) return;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(cnt + blockIdx.x, 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  // the band's outputs, FU per thread at a time: each slot's FU loads in flight together, the slots added in order
  const int nu = (T1 - T0) * TOUT;
  for (int u0 = 0; u0 < nu; u0 += FU * NW * 32) {
    float y[FU];
#pragma unroll
    for (int e = 0; e < FU; ++e) y[e] = 0.f;
    for (int sl = 0; sl < (int)gridDim.y; ++sl) {
      const float* ps = part + ((size_t)sl * NT16 + T0) * TOUT;
#pragma unroll
      for (int e = 0; e < FU; ++e) {
        const int u = u0 + threadIdx.x + e * NW * 32;
        if (u < nu) y[e] += __ldcg(ps + u);
      }
    }
#pragma unroll
    for (int e = 0; e < FU; ++e) {
      const int u = u0 + threadIdx.x + e * NW * 32, o = u % TOUT, i = o >> 5, l = o & 31;
      const int r = (T0 + u / TOUT) * 16 + (l >> 2) + 8 * ((i >> 1) & 1), b = 8 * (i >> 2) + 2 * (l & 3) + (i & 1);
      if (u < nu && r < N && b < M) stx(out, (long long)b * N + r, y[e] + (HAS_BIAS ? ldx(bias, r) : 0.f));
    }
  }
  if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
}
"""

# nw warps per block, sp super-steps per warp, pf row tiles ahead, rb row tiles per block (0: see x_launch), gd PDL.
# nw 16 sp 1 (114 registers, one block of 16 warps a SM) was the fastest form on an H200 at batch 16 (session 34: nw 8
# sp 2 18-34% slower on the Llama shapes, two blocks of 8 warps a SM 6-40% slower; pf 1 and 3 within 1% of pf 2)
X_DEFAULT = dict(nw=16, sp=1, pf=2, rb=0, gd=1, rg=0, pb=0)
# (N, K) where the x kernel serves batches 9-16 on a 132-SM part (the w kernel everywhere else). On an H200 (session
# 34, four calls with both kernels in each): 4096 x 4096 8.5 us against the w kernel's 9.4 (1.60-1.63x BF16 against
# 1.45-1.46x), 4096 x 14336 19.6-20.0 against 20.1-20.3; at 4096 x 11008, 11008 x 4096 and 14336 x 4096 it was 1-9%
# slower (NOTES.md v35)
X_SHAPES = {(4096, 4096), (4096, 14336)}
X_ON = os.environ.get("LEANQ_MMA_X", "1") != "0"
BROKEN: set = set()  # devices where compiling or launching failed once (the w kernel serves there)


def source_x(xt: int, nw: int, sp: int, pf: int, nt: int, gs: int, sbf16: bool, gd: int = 0, abl: int = 0,
             rg: int = 0, pb: int = 0) -> str:
    """The x kernel's source. ``abl`` (timing only, wrong outputs): 1 no sum over the warps, 2 no decode or products,
    4 the words read in 512-byte runs of one row, 8 no group words loaded. ``rg`` 2-8 (with sp 1, abl 0 or 1): the
    tiles' words through a ring of that many slots per warp in shared memory, copied by cp.async rg - 1 tiles ahead
    (pf unused); 0: straight into registers pf tiles ahead. ``pb`` 1: each next tile's rows by pointer increments
    (clamped rows only for a tile past N) instead of their addresses computed per tile, the same bytes."""
    assert nw in (1, 2, 4, 8, 16) and 1 <= sp <= 4 and 1 <= pf <= 4 and nt in (1, 2) and gd in (0, 1, 2), \
        (nw, sp, pf, nt, gd)
    assert rg == 0 or (2 <= rg <= 8 and sp == 1 and abl in (0, 1)), (rg, sp, abl)
    defs = dict(BITS=4, XT=xt, NW=nw, SP=sp, PF=pf, NT=nt, GS=gs, SBF16=int(sbf16), GD=int(gd), ABL=abl)
    if rg:
        defs["RG"] = rg
    if pb:
        defs["PB"] = 1
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + _HELPERS + _W_TILE + _SRC_X


def x_launch(M: int, N: int, K: int, cfg: dict | None, sms: int) -> tuple[dict, tuple[int, int]]:
    """The x kernel's config (rb filled in) and grid for x [M, K] and N outputs: K split into blocks of nw * sp
    super-steps (gridDim.y), the row tiles into bands of rb; without a given rb, the fewest tiles per band that keep
    the grid within ``sms`` blocks (one per SM)."""
    c = dict(X_DEFAULT, **(cfg or {}))
    for key in ("nw", "sp", "pf", "rb", "rg", "pb"):
        c[key] = int(c[key])
    if c["nw"] not in (1, 2, 4, 8, 16) or not 1 <= c["sp"] <= 4 or not 1 <= c["pf"] <= 4 or c["rb"] < 0 \
            or (c["rg"] and not (2 <= c["rg"] <= 8 and c["sp"] == 1)) or c["pb"] not in (0, 1):
        raise ValueError(f"cuda-int-mma-x: config {cfg} outside nw 1-16 (powers of 2), sp 1-4, pf 1-4, rb >= 0, "
                         "rg 0 or 2-8 (with sp 1), pb 0 or 1")
    tiles, ns = -(-N // 16), K // 128
    gy = -(-ns // (c["nw"] * c["sp"]))
    if not c["rb"]:
        rb = max(1, -(-tiles * gy // sms))
        while -(-tiles // rb) * gy > sms and rb < tiles:
            rb += 1
        c["rb"] = rb
    return c, (-(-tiles // c["rb"]), gy)


supports_x = gate_w  # what the x kernel computes is what the w kernel does


def chosen(pk: dict, x2: torch.Tensor) -> bool:
    """Whether batches 2-16 of a layer that :func:`supports_x` takes go to the x kernel (the caller checks that):
    batches 9-16 of the shapes in :data:`X_SHAPES` on a 132-SM part (``LEANQ_MMA_X=0`` turns it off)."""
    if not (X_ON and 9 <= x2.shape[0] <= 16 and (pk["N"], pk["K"]) in X_SHAPES and x2.is_cuda):
        return False
    dev = device_index(x2)
    return dev not in BROKEN and sm_count(dev) == 132


def reserve_x(N: int, K: int, device: torch.device) -> None:
    """Grow the shared split-K scratch now for a layer the x kernel serves (see :func:`chosen`), outside any CUDA
    graph's capture."""
    if (N, K) not in X_SHAPES or device.type != "cuda" or sm_count(device_index(device)) != 132:
        return
    _, (gx, gy) = x_launch(16, N, K, None, 132)
    if gy > 1:
        _w_scratch(device, gy * -(-N // 16) * 256, gx)


@functools.lru_cache(maxsize=None)
def _compiled_x(xt: int, nw: int, sp: int, pf: int, nt: int, gs: int, sbf16: bool, gd: int, abl: int, device: int,
                rg: int = 0, pb: int = 0):
    return _launcher(source_x(xt, nw, sp, pf, nt, gs, sbf16, gd, abl, rg, pb), "int_mma_x", "cuda-int-mma-x", device)


def run_int_mma_x(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K], 2 <= M <= 16 (see :func:`supports_x`) -> [M, N] of x2.dtype, the x kernel. Raises ValueError
    when K is split over the grid and its scratch is too small during a CUDA graph's capture (see :func:`reserve_x`)."""
    assert supports_x(pk, x2) and x2.shape[1] == pk["K"], (x2.shape, pk["K"])
    dev, nt = device_index(x2), 1 if x2.shape[0] <= 8 else 2
    c, (gx, gy) = x_launch(x2.shape[0], pk["N"], pk["K"], cfg, sm_count(dev))
    gd = pdl_mode(int(c.get("gd", 0)), sm90(dev))
    kern = _compiled_x(XT[x2.dtype], c["nw"], c["sp"], c["pf"], nt, pk["group"], bool(pk["sbf16"]), gd,
                       int(c.get("abl", 0)), dev, c["rg"], c["pb"])
    scratch = _w_scratch(x2.device, gy * -(-pk["N"] // 16) * nt * 128, gx) if gy > 1 else None
    if gy > 1 and scratch is None:
        raise ValueError("cuda-int-mma-x: split-K scratch too small during CUDA graph capture (reserve_x)")
    out = out if out is not None else torch.empty(x2.shape[0], pk["N"], device=x2.device, dtype=x2.dtype)
    kern(grid=(gx, gy, 1), block=(32 * c["nw"], 1, 1), args=split_args(x2, pk, bias, out, scratch, c["rb"]),
         smem=c["rg"] * c["nw"] * 64 * 20, pdl=bool(gd))  # rg: per warp and slot 64 words of 16 bytes and 64 of 4
    return out
