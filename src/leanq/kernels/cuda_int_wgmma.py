"""Batches of 64 and more (prefill, batched serving) on Hopper's warpgroup tensor cores (``wgmma``, sm_90a), straight
from the rk words of :mod:`leanq.kernels.cuda_int`: 4-bit layers, K a multiple of 64, the group a multiple of 64.

A block of WG warpgroups owns R = 64 WG weight rows and BM batch rows (the wgmma's N). It walks K in stages of 64
inputs, NST stages deep, every copy a ``cp.async``:

- x [BM, 64] of the stage, 16-bit, in the 128-byte swizzled K-major layout that the wgmma's B descriptor reads
  (16-byte chunk c of batch row r at chunk c ^ (r % 8) of its 128-byte row);
- the R rows' 32 bytes of rk words (row stride 48 bytes: a warp's eight rows land in distinct banks);
- the R rows' group words (scale in the high 16 bits, zero point in the low 16).

Each warp decodes its 16 rows straight into the wgmma's A registers: in 16-input step j, lane (g = lane / 4,
t = lane % 4) needs inputs 16 j + 2t, 2t + 1 and 16 j + 8 + 2t, 8 + 2t + 1 of rows g and g + 8, which are the
code pair at bits (4t, 16 + 4t) of words 2j and 2j + 1 (:func:`leanq.kernels.cuda_int._pack_words`): one
shift, one LOP3 (M0 + q, exact), one x2 subtraction of M0 + z and one x2 multiplication by s per register. Four
wgmma ``m64nBMk16`` per stage take those registers and the stage's x descriptor (32 bytes further per step).

Split-K (SPLIT > 1) as in :mod:`leanq.kernels.cuda_int_mma`: each block stores its fp32 tile to its own slot in
the accumulator's register order, and the last to arrive at the tile's counter adds the slots in slot order
(deterministic), writes the output and resets the counter.

Stream-K (launch option ``sk``, with ``ws``): one block per SM, the grid's G blocks sharing all T x S units of the
product (T tiles of R rows and BM batch rows, S stages of 64 inputs), the block of ticket b taking units
[b U / G, (b + 1) U / G) (:func:`sk_segments`), so that no SM idles in a last partial wave. Tickets are taken from a
counter as blocks start. A block walks its range from the end as segments, one tile each; its producer runs on into
the next segment while the warpgroups write the last one's outputs. A segment without its tile's last stage (only
a block's first one: its range's end) stores its fp32 partial to the block's slot and raises the block's flag. The
block holding the tile's last stages (its range's start, so its last segment) waits for the flags of the blocks
before it whose range meets the tile, adds their slots to its own registers in ticket order (the same sum every
launch), resets the flags and writes the tile. A block waits only for lower tickets, which have
all started and wait only for lower tickets in turn, so the waits end however few blocks the GPU holds at once.

Warp specialization (launch option ``ws``, the default above 64 batch rows): ``ws`` more warps (2 or 4; 4 by
default, a whole warpgroup) issue every stage's copies, each thread's source offsets computed once, and mark them
landed on a per-stage ``mbarrier`` (``cp.async.mbarrier.arrive.noinc`` per thread); each warpgroup waits on it,
decodes, multiplies and releases the stage on a second ``mbarrier`` once its ``wgmma``s are done. No block-wide
barrier remains in the main loop, so the warpgroups no longer decode and multiply in step. A single producer warp
(session 11's first form) issued about 570 instructions per stage and left every stage twice as long as the
consumers needed (H200, 2026-11-28); four warps issue about 40 each. With ``ws`` 0 the kernel is the
barrier-per-stage form measured in session 11, still the choice at 64 rows and below (two blocks per SM). Once the
main loop ends the producers return and the consumers sync on named barrier 1.

Above 128 rows :func:`config` may pick blocks of 256 batch rows (m64n256 wgmmas, :data:`WS256`): two consumer
warpgroups with 128 accumulators a thread, which fit because ``setmaxnreg`` moves registers from the producer
warpgroup (40 a thread) to them (232). Each decoded weight then meets twice the batch rows.

The outputs (``EPI``, on wherever the tile fits beside the stages): each thread's accumulators, bias added and
rounded, into a [BM][R + 8] tile in shared memory, then out in 16-byte stores along the rows of ``out``
(``LEANQ_WGMMA_EPI=0``: each value stored by the thread that holds it, 2 bytes at a time).

Programmatic dependent launch (launch option ``gd``, warp-specialized forms, on by default there): launched with
programmatic stream serialization, the grid may start while the kernel before it ends. The producers issue the
first NST stages' weight and group-word copies (which no kernel writes), then ``griddepcontrol.wait``, then x's; the
consumers wait before their first stage; stream-K waits before it takes its ticket (the grid before resets that
counter). ``gd`` 1 also lets the next grid in at once (``griddepcontrol.launch_dependents``), 2 only at the end
(chosen by :func:`leanq.kernels.cuda_rt.pdl_mode` while TorchInductor's own PDL mode is on).

Launch option ``abl`` (timing only, wrong outputs) leaves parts out: bit 1 x's copies after the first stages, bit 2
the weights', bit 4 the decode after the first stages, bit 8 the output stores.

The split-K sum issues the loads of all the other slots at once (the slot loop unrolled up to MAX_SPLIT = 4), in
the same order of additions as before.

The oracle is :func:`leanq.kernels.cuda_int.reference_rk`.
"""

from __future__ import annotations

import functools
import os

import torch

from .cuda_rt import PRELUDE, XT, Launcher, device_index, grow_scratch, pdl_mode, sm90, sm_count

ON = os.environ.get("LEANQ_WGMMA", "1") != "0"
EPI_ON = os.environ.get("LEANQ_WGMMA_EPI", "1") != "0"  # outputs staged in shared memory, stored 16 bytes at a time
MIN_M = int(os.environ.get("LEANQ_WGMMA_MIN_M", "64"))
# warpgroups per block, batch rows per block, stages, K split (0: chosen by :func:`config`), the decode of the next stage
# overlapping the current stage's wgmmas, and the blocks per SM the registers are capped for
DEFAULT = dict(wg=2, bm=128, nst=4, split=0, pipe=1, minb=2)
# above 64 rows (BM 128): warp specialization, a producer warpgroup (ws 4) and six stages, one block per SM; gd 1:
# programmatic dependent launch (the first stages' weights loaded while the kernel before ends, the next grid let in
# early), 0.1-1.0 us faster on each of the ten shape x batch rows of 128 and 256 in a chain of launches on an H200
# (benchmarks/kernels/NOTES.md, v26)
WS_DEFAULT = dict(nst=6, minb=1, ws=4, gd=1)
# above 128 rows where :func:`_estimate` favours it: m64n256 wgmmas, two warpgroups with 232 registers a thread
# (``setmaxnreg``; the producer warpgroup keeps 40), four stages of 32 KB of x
WS256 = dict(wg=2, bm=256, nst=4, minb=1, ws=4, gd=1)


def _wgmma_asm(bm: int, xt: int) -> str:
    """The C++ helper issuing one ``wgmma.mma_async m64n{bm}k16`` with A from registers and B from a descriptor."""
    n = bm // 2  # accumulator registers per thread
    t = "f16" if xt == 1 else "bf16"
    outs = ", ".join(f"%{i}" for i in range(n))
    cons = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    return (
        "__device__ __forceinline__ void wgmma_step(float (&d)[%d], u32 a0, u32 a1, u32 a2, u32 a3, "
        "unsigned long long desc) {\n" % n
        + '  asm volatile("{\\n.reg .pred p;\\nsetp.ne.b32 p, %%%d, 0;\\n"\n' % (n + 5)
        + '    "wgmma.mma_async.sync.aligned.m64n%dk16.f32.%s.%s {%s}, {%%%d, %%%d, %%%d, %%%d}, %%%d, p, 1, 1, 0;\\n}"\n'
        % (bm, t, t, outs, n, n + 1, n + 2, n + 3, n + 4)
        + f'    : {cons}\n    : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));\n'
        + "}\n")


# the wgmma primitives this kernel and cuda_int_mma's ``wg`` form share: fence, commit, wait, a register pinned in
# place across the asynchronous products, and the B descriptor of a K-major tile with the 128-byte swizzle
WGMMA_HELPERS = r"""
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
// K-major, 128-byte swizzle: rows of 128 bytes, 8-row groups 1024 bytes apart (SBO); LBO unused
__device__ __forceinline__ unsigned long long bdesc(u32 saddr) {
  return (unsigned long long)((saddr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32)
         | (1ull << 62);
}
"""

_SRC = r"""
#define R (64 * WG)              // weight rows per block
#define MAX_SPLIT 4              // K split at most (run_int_wgmma clamps)
#define CT (128 * WG)            // consumer threads: the warpgroups
#define THREADS (CT + 32 * WS)   // WS: WS more warps (2 or 4), the producers
#define LT (32 * WS)             // producer threads
#if WS
#define XUW ((BM * 8) / LT)      // a producer thread's x chunks per stage
#define WUW ((2 * R) / LT)       // its weight-word chunks
#define ZUW ((R + LT - 1) / LT)  // its group words
#endif
#define NACC (BM / 2)            // accumulator registers per thread
#define XS_BYTES (BM * 128)      // one stage of x: BM rows of 64 16-bit inputs
#define WROW 48                  // bytes per weight row in a stage (32 used)
#define WS_BYTES (R * WROW)
#define SZ_BYTES (R * 4)
// a barrier of the threads that hold outputs (WS: the warpgroups only, on named barrier 1; the producers do not join)
#if WS
#define CSYNC() asm volatile("bar.sync 1, %0;" :: "n"(CT) : "memory")
#else
#define CSYNC() __syncthreads()
#endif

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp16(u32 dst, const void* src, u32 bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp4(u32 dst, const void* src, u32 bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
// mbarriers (WS): init, plain arrive, arrive when this thread's earlier cp.asyncs land, wait for a phase's parity
__device__ __forceinline__ void mbar_init(u32 a, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(a), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 a) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(a) : "memory");
}
__device__ __forceinline__ void mbar_arrive_cp(u32 a) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(a) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 a, u32 parity) {
  asm volatile("{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}"
               :: "r"(a), "r"(parity) : "memory");
}
#if SK
// stream-K: the grid's G blocks share the T x S units (tile, 64-input stage) of the whole product, tiles in order
// (row tiles fastest), the block of ticket b taking units [b U / G, (b + 1) U / G) and walking them from the end: a
// segment is one tile's stages within that range, taken last unit first
struct Seg { int n0, m0, kt0, nk, tile; };
__device__ __forceinline__ bool seg_prev(long long& u, long long u0, int S, int TN, Seg& g) {
  if (u <= u0) return false;
  g.tile = (int)((u - 1) / S);
  const long long t0 = (long long)g.tile * S, lo = t0 > u0 ? t0 : u0;
  g.kt0 = (int)(lo - t0);
  g.nk = (int)(u - lo);
  g.n0 = (g.tile % TN) * R;
  g.m0 = (g.tile / TN) * BM;
  u = lo;
  return true;
}
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v; asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void st_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
#endif
__device__ __forceinline__ u32 mul2(u32 a, u32 b) {
  u32 d;
#if XT == 1
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#else
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#endif
  return d;
}
// a group word's scale in the activations' 16-bit format, in both halves, and M0 + z in both halves
__device__ __forceinline__ void scale_zero(u32 sz, u32& s2, u32& mz2) {
  u32 sb = sz >> 16;
#if (XT == 2) != SBF16
  u16 h;
#if XT == 2
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(h2f((u16)sb)));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(__uint_as_float(sb << 16)));
#endif
  sb = h;
#endif
  s2 = sb | (sb << 16);
  const u32 m0z = (MAGIC & 0xFFFFu) | (sz & 0xFFFFu);   // M0 + z: z OR'd into M0's mantissa (z < 16), exact
  mz2 = m0z | (m0z << 16);
}
__device__ __forceinline__ u32 dec(u32 w, u32 s2, u32 mz2) {
  return mul2(sub2(lop3_ao(w, 0x000F000Fu, MAGIC), mz2), s2);
}

__device__ __forceinline__ uint4 lds128(u32 a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ u32 lds32(u32 a) {
  u32 v; asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory"); return v;
}
// a stage's A registers of this lane (shared addresses: wrow of its first row's words, zrow of its group word; the
// second row is 8 rows further), 16-input steps j = 0..3; sh = 4t
__device__ __forceinline__ void decode_stage(u32 wrow, u32 zrow, u32 sh, u32 (&a)[4][4]) {
  const uint4 wa = lds128(wrow), wb = lds128(wrow + 16);
  const uint4 ua = lds128(wrow + 8 * WROW), ub = lds128(wrow + 8 * WROW + 16);
  u32 s0, z0, s1, z1;
  scale_zero(lds32(zrow), s0, z0);
  scale_zero(lds32(zrow + 32), s1, z1);
  const u32 w[8] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
  const u32 u[8] = {ua.x, ua.y, ua.z, ua.w, ub.x, ub.y, ub.z, ub.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    a[j][0] = dec(w[2 * j] >> sh, s0, z0);
    a[j][1] = dec(u[2 * j] >> sh, s1, z1);
    a[j][2] = dec(w[2 * j + 1] >> sh, s0, z0);
    a[j][3] = dec(u[2 * j + 1] >> sh, s1, z1);
  }
}

#if EPI
// the outputs of a tile through shared memory: each thread's accumulators (bias added, rounded to the activations'
// format) into a [BM][R + 8] staging tile (the 16 bytes of padding put a warp's four batch rows in distinct banks),
// then 16-byte chunks of R / 8 per batch row, each a coalesced store (element stores where N is not a multiple of 8
// or the chunk crosses N); the barriers are those of the threads holding outputs
#define EPI_LD (R + 8)
__device__ __forceinline__ u16 f2x(float f) {
  u16 h;
#if XT == 1
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}
__device__ __forceinline__ void store_tile(const float (&acc)[NACC], u32 epi, void* out, const void* bias, int n0,
                                           int m0, int M, int N, int tid, int row, int t, int has_bias) {
  CSYNC();                                                  // the staging tile's last readers are done
#pragma unroll
  for (int i = 0; i < NACC; ++i) {
    const int n = row + 8 * ((i >> 1) & 1), m = 8 * (i >> 2) + 2 * t + (i & 1);
    float y = acc[i];
    if (has_bias && n0 + n < N) y += ldx(bias, n0 + n);
    asm volatile("st.shared.u16 [%0], %1;" :: "r"(epi + 2 * (m * EPI_LD + n)), "h"(f2x(y)) : "memory");
  }
  CSYNC();
  const bool vec = (N & 7) == 0;
#pragma unroll 4
  for (int c = tid; c < BM * (R / 8); c += CT) {
    const int m = c / (R / 8), j = c % (R / 8), gm = m0 + m, gn = n0 + 8 * j;
    if (gm >= M || gn >= N) continue;
    const uint4 v = lds128(epi + 2 * (m * EPI_LD + 8 * j));
    u16* dst = (u16*)out + (long long)gm * N + gn;
    if (vec && gn + 8 <= N) {
      *(uint4*)dst = v;
    } else {
      const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 8; ++q)
        if (gn + q < N) dst[q] = (u16)(w[q >> 1] >> (16 * (q & 1)));
    }
  }
}
#else
// the outputs of a tile stored by the threads that hold them, one value at a time
__device__ __forceinline__ void store_tile(const float (&acc)[NACC], u32, void* out, const void* bias, int n0, int m0,
                                           int M, int N, int, int row, int t, int has_bias) {
#pragma unroll
  for (int i = 0; i < NACC; ++i) {
    const int n = n0 + row + 8 * ((i >> 1) & 1);
    const int m = m0 + 8 * (i >> 2) + 2 * t + (i & 1);
    if (n < N && m < M) {
      float y = acc[i];
      if (has_bias) y += ldx(bias, n);
      stx(out, (long long)m * N + n, y);
    }
  }
}
#endif

extern "C" __global__ void __launch_bounds__(THREADS, MINB)
int_wgmma(const void* XR x, void* __restrict__ out, const void* __restrict__ bias,
          const u32* __restrict__ words, const u32* __restrict__ szw, float* __restrict__ part, int* __restrict__ cnt,
          int M, int N, int K, int WPR, int NG, int GSH, int HAS_BIAS) {
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = (unsigned char*)(((unsigned long long)smem_raw + 1023) & ~1023ull);
  unsigned char* xs = smem;                                  // NST x stages (1024-byte aligned each)
  unsigned char* ws = smem + NST * XS_BYTES;                 // NST weight stages
  unsigned char* zs = ws + NST * WS_BYTES;                   // NST group-word stages
#if EPI
  const u32 epi = smem_u32(zs + NST * SZ_BYTES);             // the output staging tile (16-byte aligned)
#else
  const u32 epi = 0;
#endif
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
#if SK
#if GD
  // programmatic dependent launch (launch option gd): the ticket counter is reset by the grid before's last block,
  // so every thread waits for that grid first; the next grid is let in after
  gdc_wait();
#if GD == 1
  gdc_launch();
#endif
#endif
  const int S = K >> 6, TN = (N + R - 1) / R;
  const long long U = (long long)TN * ((M + BM - 1) / BM) * S;
  // the block's ticket (taken in the order the blocks start: a block waits only for lower tickets, all of which have
  // started, so the waits end whatever number of blocks the GPU holds at once); the last ticket resets the counter
  __shared__ int sk_ticket;
  if (tid == 0) {
    const int b = atomicAdd(cnt + gridDim.x, 1);
    if (b == (int)gridDim.x - 1) cnt[gridDim.x] = 0;
    sk_ticket = b;
  }
  __syncthreads();
  const int bid = sk_ticket;
  const long long ub0 = (long long)bid * U / gridDim.x, ub1 = (long long)(bid + 1) * U / gridDim.x;
#else
  const int n0 = blockIdx.x * R, m0 = blockIdx.y * BM;
  const int steps = K >> 6;
  const int per = (steps + gridDim.z - 1) / gridDim.z;
  const int kt0 = blockIdx.z * per;
  const int kt1 = min(kt0 + per, steps);
  const int nk = max(kt1 - kt0, 0);
#endif

  // stage IT's four wgmmas on the register set A (the accumulators fenced so the compiler keeps them in place)
#define MMA(A, IT)                                                                   \
  { const u32 xb = xs0 + ((unsigned)(IT) % NST) * XS_BYTES;                          \
    _Pragma("unroll") for (int i = 0; i < NACC; ++i) fence_reg(acc[i]);             \
    wg_fence();                                                                      \
    _Pragma("unroll") for (int j = 0; j < 4; ++j)                                    \
      wgmma_step(acc, A[j][0], A[j][1], A[j][2], A[j][3], bdesc(xb + 32 * j));       \
    wg_commit();                                                                     \
    _Pragma("unroll") for (int i = 0; i < NACC; ++i) fence_reg(acc[i]); }
#if WS
  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
  const u32 xs0 = smem_u32(xs), ws0 = smem_u32(ws), zs0 = smem_u32(zs);
  // warp specialization: warp 4 WG copies every stage (full[s] completes when its copies land), the warpgroups decode
  // and multiply on their own schedule and release a stage (empty[s], one arrival per warp) once its wgmmas are done;
  // no block-wide barrier in the main loop
  __shared__ __align__(8) unsigned long long full_bar[NST], empty_bar[NST];
  const u32 fb0 = smem_u32(full_bar), eb0 = smem_u32(empty_bar);
  if (tid == 0) {
    for (int s = 0; s < NST; ++s) {
      mbar_init(fb0 + 8 * s, LT);
      mbar_init(eb0 + 8 * s, 4 * WG);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int g = lane >> 2, t = lane & 3;
  const int row = warp * 16 + g;
  if (warp >= 4 * WG) {
#if MAXREG
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
#endif
    // producer threads p = 0..LT-1 (LT / 8 a multiple of 8, so a thread's x chunks share one swizzled column);
    // every source offset is computed once, a stage only moves the bases
    const int p = tid - CT;
    const int r0 = p >> 3, c0 = p & 7;
    const u32 xdst0 = r0 * 128 + ((c0 ^ (r0 & 7)) << 4);
#if SK
    u32 gi = 0;                                               // stages issued before this segment
    long long su = ub1;
    Seg sg;
    while (seg_prev(su, ub0, S, TN, sg)) {
    const int n0 = sg.n0, m0 = sg.m0, kt0 = sg.kt0, nk = sg.nk;
#else
    const u32 gi = 0;
#endif
    u32 xoff[XUW], xok = 0;
#pragma unroll
    for (int u = 0; u < XUW; ++u) {
      const int m = m0 + r0 + u * (LT / 8);
      xoff[u] = (u32)(((long long)min(m, M - 1) * K + 8 * c0) * 2);
      xok |= m < M ? 1u << u : 0u;
    }
    const unsigned char* xbase = (const unsigned char*)x + ((long long)kt0 << 7);
    const u32* wsrc[WUW];
    u32 wdst[WUW], wok = 0;
#pragma unroll
    for (int v = 0; v < WUW; ++v) {
      const int i = p + LT * v, r = i >> 1;
      wsrc[v] = words + (long long)min(n0 + r, N - 1) * WPR + 4 * (i & 1) + (kt0 << 3);
      wdst[v] = r * WROW + (i & 1) * 16;
      wok |= n0 + r < N ? 1u << v : 0u;
    }
    const u32* zsrc[ZUW];                                      // group words: rows p + LT z below R
    u32 zok = 0;
#pragma unroll
    for (int z = 0; z < ZUW; ++z) {
      zsrc[z] = szw + (long long)min(n0 + p + LT * z, N - 1) * NG;
      zok |= n0 + p + LT * z < N ? 1u << z : 0u;
    }
    // stage IT_'s weight words and group words into slot S_ where ON_ (OFF_: words past wsrc), then wsrc ADV_ on
#define W_ISSUE(S_, IT_, OFF_, ADV_, ON_)                                                                           \
    _Pragma("unroll") for (int v = 0; v < WUW; ++v) {                                                               \
      if ((!(ABL & 2) || gi + (IT_) < NST) && (ON_))                                                                \
        cp16(ws0 + (S_) * WS_BYTES + wdst[v], wsrc[v] + (OFF_), (wok >> v) & 1 ? 16u : 0u);                        \
      wsrc[v] += (ADV_);                                                                                            \
    }                                                                                                               \
    _Pragma("unroll") for (int z = 0; z < ZUW; ++z)                                                                 \
      if ((!(ABL & 2) || gi + (IT_) < NST) && (ON_) && p + LT * z < R)                                              \
        cp4(zs0 + (S_) * SZ_BYTES + (p + LT * z) * 4, zsrc[z] + ((kt0 + (IT_)) >> GSH), (zok >> z) & 1 ? 4u : 0u);
#if GD && !SK
    // programmatic dependent launch (launch option gd): the first stages' weights and group words, which the grid
    // before does not write, go out before the wait for it; x (its output, in a model) only after
#define WPRE NST
    for (int it = 0; it < nk && it < NST; ++it) { W_ISSUE(it, it, 8 * it, 0, true) }
    gdc_wait();
#if GD == 1
    gdc_launch();
#endif
#else
#define WPRE 0
#endif
    for (int it = 0; it < nk; ++it) {
      const u32 s = (gi + it) % NST;
      if (gi + it >= NST) mbar_wait(eb0 + 8 * s, (((gi + it) / NST) & 1) ^ 1);
      // ABL (timing only, wrong outputs): bit 1, x copied for the first NST stages only; bit 2, the weights and
      // group words likewise; bit 4 (below) the decode of the first two stages reused; bit 8 no output stores
      if (!(ABL & 1) || gi + it < NST) {
#pragma unroll
        for (int u = 0; u < XUW; ++u)
          cp16(xs0 + s * XS_BYTES + xdst0 + u * (LT * 16), xbase + xoff[u], (xok >> u) & 1 ? 16u : 0u);
      }
      xbase += 128;
      W_ISSUE(s, it, 0, 8, it >= WPRE)  // (the first NST stages' went out before the wait, with gd)
      mbar_arrive_cp(fb0 + 8 * s);
    }
#if SK
    gi += nk;
    }
#endif
    cp_wait<0>();
    return;                                                 // no outputs; the epilogue syncs the consumers only
  } else {
#if MAXREG
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(MAXREG) : "memory");
#endif
#if GD && !SK
    gdc_wait();  // every thread passes the wait before anything is written (see the producers)
#if GD == 1
    gdc_launch();
#endif
#endif
    const u32 wrow0 = ws0 + row * WROW, zrow0 = zs0 + row * 4, sh = 4 * t;
    u32 aA[4][4], aB[4][4];
#if SK
    u32 gi = 0;                                               // stages consumed before this segment
    long long su = ub1;
    Seg sg;
    while (seg_prev(su, ub0, S, TN, sg)) {
    const int nk = sg.nk;
#else
    const u32 gi = 0;
#endif
    if (nk > 0) {
      mbar_wait(fb0 + 8 * (gi % NST), (gi / NST) & 1);
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      decode_stage(wrow0 + (gi % NST) * WS_BYTES, zrow0 + (gi % NST) * SZ_BYTES, sh, aA);
    }
#define WSTEP(CUR, NXT, IT)                                                          \
    MMA(CUR, gi + (IT))                                                              \
    wg_wait<1>();                                                                    \
    if ((IT) >= 1 && lane == 0) mbar_arrive(eb0 + 8 * ((gi + (IT) - 1) % NST));      \
    if ((IT) + 1 < nk) {                                                             \
      const u32 s1 = (gi + (IT) + 1) % NST;                                          \
      mbar_wait(fb0 + 8 * s1, ((gi + (IT) + 1) / NST) & 1);                          \
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");                   \
      if (!(ABL & 4) || gi + (IT) < 1)  /* ABL bit 4: the first two stages' decode reused */ \
        decode_stage(wrow0 + s1 * WS_BYTES, zrow0 + s1 * SZ_BYTES, sh, NXT);         \
    }
    for (int it = 0; it < nk; it += 2) {
      WSTEP(aA, aB, it)
      if (it + 1 < nk) { WSTEP(aB, aA, it + 1) }
    }
    wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) fence_reg(acc[i]);
#if SK
    if (nk > 0 && lane == 0) mbar_arrive(eb0 + 8 * ((gi + nk - 1) % NST));  // the segment's last stage is free
    gi += nk;
    if (sg.kt0 + sg.nk < S) {
      // not the tile's last stages: the block's first segment (its range's end), so one slot per block; this
      // block's partial for the block that holds the tile's last stages, then its flag
      float* mine = part + (long long)bid * (R * BM);
#pragma unroll
      for (int i = 0; i < NACC; i += 4)
        *(float4*)(mine + (i / 4) * (CT * 4) + tid * 4) = make_float4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]);
      __threadfence();
      CSYNC();
      if (tid == 0) st_release(cnt + bid, 1);
    } else {
      if (sg.kt0 > 0) {
        // the tile's last stages and not all of them (the block's last segment): the partials of the blocks before
        // this one whose range meets the tile, added to its own in ticket order (the same sum every launch); their
        // flags reset
        const long long t0 = (long long)sg.tile * S;
        int b1 = bid - 1;
        while (b1 > 0 && (long long)b1 * U / gridDim.x > t0) --b1;  // the block holding the tile's first stage
        if (tid == 0)
          for (int b2 = b1; b2 < bid; ++b2) {
            while (ld_acquire(cnt + b2) == 0) {}
            cnt[b2] = 0;
          }
        CSYNC();
        __threadfence();
        for (int b2 = b1; b2 < bid; ++b2) {                 // a slot's loads all in flight at once
          const float* slot = part + (long long)b2 * (R * BM) + tid * 4;
#pragma unroll
          for (int i = 0; i < NACC; i += 4) {
            const float4 q = __ldcg((const float4*)(slot + (i / 4) * (CT * 4)));
            acc[i] += q.x; acc[i + 1] += q.y; acc[i + 2] += q.z; acc[i + 3] += q.w;
          }
        }
      }
      store_tile(acc, epi, out, bias, sg.n0, sg.m0, M, N, tid, row, t, HAS_BIAS);
    }
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
    }
    return;                                                   // every segment's outputs are written above
#endif
  }
#else
  // this thread's copies, the same every stage but for the source offset: XU chunks of x, one chunk of words,
  // one group word (threads below R); rows past M / N read nothing (zero fill)
#define XU ((BM * 8 + THREADS - 1) / THREADS)
  // chunk u of this thread: batch row r0 + u THREADS / 8, the same swizzled column (THREADS / 8 is a multiple of 8)
  const int r0 = tid >> 3, c0 = tid & 7;
  const u32 xdst0 = r0 * 128 + ((c0 ^ (r0 & 7)) << 4);
  u32 xoff[XU], xok = 0;
#pragma unroll
  for (int u = 0; u < XU; ++u) {
    const int r = r0 + u * (THREADS / 8), m = m0 + r;
    xoff[u] = (u32)(((long long)min(m, M - 1) * K + 8 * c0) * 2);
    xok |= (m < M && r < BM) ? 1u << u : 0u;
  }
  const unsigned char* xbase = (const unsigned char*)x + ((long long)kt0 << 7);
  const int wr = tid >> 1, wc = tid & 1;
  const u32* wsrc = words + (long long)min(n0 + wr, N - 1) * WPR + 4 * wc + (kt0 << 3);
  const u32 wdst = wr * WROW + wc * 16, wbytes = n0 + wr < N ? 16u : 0u;
  const u32* zsrc = szw + (long long)min(n0 + (tid % R), N - 1) * NG;
  const u32 zbytes = (tid < R && n0 + tid < N) ? 4u : 0u;
  const u32 xs0 = smem_u32(xs), ws0 = smem_u32(ws), zs0 = smem_u32(zs);
  int lk = kt0;                                              // the next stage to load
  auto load_stage = [&](int buf) {
#pragma unroll
    for (int u = 0; u < XU; ++u)
      if ((BM * 8) % THREADS == 0 || r0 + u * (THREADS / 8) < BM)
        cp16(xs0 + buf * XS_BYTES + xdst0 + u * (THREADS * 16), xbase + xoff[u], (xok >> u) & 1 ? 16u : 0u);
    xbase += 128;
    cp16(ws0 + buf * WS_BYTES + wdst, wsrc, wbytes);
    wsrc += 8;
    if (tid < R) cp4(zs0 + buf * SZ_BYTES + tid * 4, zsrc + (lk >> GSH), zbytes);
    ++lk;
  };

  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.f;

#pragma unroll
  for (int s = 0; s < NST - 1; ++s) {
    if (s < nk) load_stage(s);
    cp_commit();
  }
  const int g = lane >> 2, t = lane & 3;
  const int row = warp * 16 + g;                             // this lane's rows: row, row + 8 (block-local)
  const u32 wrow0 = ws0 + row * WROW, zrow0 = zs0 + row * 4, sh = 4 * t;
  // stage it: wait for its copies, make them visible to the tensor cores, then (all threads past the barrier) reuse
  // the oldest free buffer for stage it + NST - 1
#define ARRIVE(IT, PENDING)                                                          \
  cp_wait<PENDING>();                                                                \
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");                       \
  __syncthreads();
#define REFILL(IT)                                                                   \
  { const int nx = (IT) + NST - 1; if (nx < nk) load_stage((unsigned)nx % NST); cp_commit(); }
#if PIPE
  // the wgmmas of stage it run while stage it + 1 is decoded into the other register set (NST >= 3)
  u32 aA[4][4], aB[4][4];
  if (nk > 0) {
    ARRIVE(0, NST - 2)
    decode_stage(wrow0, zrow0, sh, aA);
  }
#define PSTEP(CUR, NXT, IT)                                                          \
  MMA(CUR, IT)                                                                       \
  wg_wait<1>();                                                                      \
  if ((IT) + 1 < nk) { ARRIVE(IT, NST - 3) } else { __syncthreads(); }               \
  REFILL(IT)                                                                         \
  if ((IT) + 1 < nk) { const u32 nb = (unsigned)((IT) + 1) % NST;                     \
    decode_stage(wrow0 + nb * WS_BYTES, zrow0 + nb * SZ_BYTES, sh, NXT); }
  for (int it = 0; it < nk; it += 2) {
    PSTEP(aA, aB, it)
    if (it + 1 < nk) { PSTEP(aB, aA, it + 1) }
  }
  wg_wait<0>();
#pragma unroll
  for (int i = 0; i < NACC; ++i) fence_reg(acc[i]);
#else
  for (int it = 0; it < nk; ++it) {
    ARRIVE(it, NST - 2)
    REFILL(it)
    u32 a[4][4];
    decode_stage(wrow0 + ((unsigned)it % NST) * WS_BYTES, zrow0 + ((unsigned)it % NST) * SZ_BYTES, sh, a);
    MMA(a, it)
    wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) fence_reg(acc[i]);
  }
#endif
  cp_wait<0>();
#endif

  // accumulator i: row (warp's 16) g + 8 ((i >> 1) & 1), batch column 8 (i >> 2) + 2t + (i & 1)
  // (WS: the producer warps have returned; the consumers sync among themselves on named barrier 1)
#if !SK
  if (gridDim.z > 1) {
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    float* slot = part + ((long long)tile * gridDim.z) * (R * BM);
    float* mine = slot + (long long)blockIdx.z * (R * BM);
#pragma unroll
    for (int i = 0; i < NACC; i += 4)
      if (!WS || tid < CT)
        *(float4*)(mine + (i / 4) * (CT * 4) + tid * 4) = make_float4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]);
    __threadfence();
    CSYNC();
    __shared__ int last;
    if (tid == 0) last = atomicAdd(cnt + tile, 1) == (int)gridDim.z - 1;
    CSYNC();
    if (!last || (WS && tid >= CT)) return;
    __threadfence();
#pragma unroll
    for (int i = 0; i < NACC; i += 4) {
      float4 v = __ldcg((const float4*)(slot + (i / 4) * (CT * 4) + tid * 4));
#pragma unroll
      for (int z = 1; z < MAX_SPLIT; ++z)                    // unrolled: the loads of many i in flight at once
        if (z < (int)gridDim.z) {
          const float4 q = __ldcg((const float4*)(slot + (long long)z * (R * BM) + (i / 4) * (CT * 4) + tid * 4));
          v.x += q.x; v.y += q.y; v.z += q.z; v.w += q.w;
        }
      acc[i] = v.x; acc[i + 1] = v.y; acc[i + 2] = v.z; acc[i + 3] = v.w;
    }
    if (tid == 0) cnt[tile] = 0;
  }
#if WS
  if (tid >= CT) return;                                      // the producer warp has no outputs
#endif
  if (!(ABL & 8)) store_tile(acc, epi, out, bias, n0, m0, M, N, tid, row, t, HAS_BIAS);  // ABL bit 8: no stores
#endif
}
"""


def source(xt: int, sbf16: bool, wg: int, bm: int, nst: int, pipe: int = 1, minb: int = 1, ws: int = 0, sk: int = 0,
           abl: int = 0, epi: int = 0, gd: int = 0) -> str:
    from .cuda_int_mma import _HELPERS

    defs = dict(BITS=4, XT=xt, SBF16=int(sbf16), WG=wg, BM=bm, NST=nst, PIPE=int(pipe and nst >= 3), MINB=minb,
                WS=int(ws), MAXREG=232 if ws == 4 and wg == 2 and bm > 128 else 0, SK=int(bool(sk and ws)), ABL=int(abl), EPI=int(epi),
                GD=int(gd) if ws else 0)
    return ("".join(f"#define {k} {v}\n" for k, v in defs.items()) + PRELUDE + _HELPERS + WGMMA_HELPERS
            + _wgmma_asm(bm, xt) + _SRC)


SMEM_MAX = 227 * 1024  # a Hopper block's dynamic shared memory at most


def smem_bytes(wg: int, bm: int, nst: int, epi: int = 0) -> int:
    """Dynamic shared memory of a launch: the stages, the 1 KB alignment slack, and with ``epi`` the output tile."""
    return nst * (bm * 128 + 64 * wg * 48 + 64 * wg * 4) + 1024 + (bm * (64 * wg + 8) * 2 if epi else 0)


def _epi(wg: int, bm: int, nst: int, minb: int) -> int:
    """The staged output tile where it fits beside the stages (``minb`` blocks per SM), else direct stores."""
    return int(EPI_ON and smem_bytes(wg, bm, nst, 1) * max(1, minb) <= SMEM_MAX - 1024 * max(1, minb))


@functools.lru_cache(maxsize=None)
def _compiled(xt: int, sbf16: bool, wg: int, bm: int, nst: int, pipe: int, minb: int, ws: int, sk: int,
              device: int, abl: int = 0, epi: int = 0, gd: int = 0) -> Launcher:
    with torch.cuda.device(device):
        return Launcher(torch.cuda._compile_kernel(source(xt, sbf16, wg, bm, nst, pipe, minb, ws, sk, abl, epi, gd),
                                                   "int_wgmma",
                                                   compute_capability="90a"), "cuda-int-wgmma")


_BROKEN: set = set()


def supports(pk: dict, x2: torch.Tensor) -> bool:
    """4-bit rk layouts with K and the group multiples of 64, 16-bit activations in contiguous rows (16-byte
    aligned), batches of MIN_M rows or more, on a Hopper GPU (compute capability 9.0)."""
    M, K = x2.shape
    if not (ON and M >= MIN_M and x2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16) and pk["bits"] == 4
            and K % 64 == 0 and pk["group"] % 64 == 0 and x2.is_contiguous() and x2.data_ptr() % 16 == 0
            and pk["words"].shape[1] % 4 == 0):
        return False
    dev = device_index(x2)
    return dev not in _BROKEN and torch.cuda.get_device_capability(dev) == (9, 0)


def sk_segments(tiles: int, stages: int, blocks: int) -> list:
    """The stream-K schedule the kernel walks (``seg_prev``), for checks on any machine: per block (ticket), its
    segments in the order it takes them (its range from the end) as (tile, first stage, stages)."""
    units = tiles * stages
    segs = []
    for b in range(blocks):
        u0, u, mine = b * units // blocks, (b + 1) * units // blocks, []
        while u > u0:
            tile = (u - 1) // stages
            lo = max(tile * stages, u0)
            mine.append((tile, lo - tile * stages, u - lo))
            u = lo
        segs.append(mine)
    return segs


def sk_partials(tiles: int, stages: int, blocks: int, b: int, tile: int) -> list:
    """The blocks whose partials block ``b`` adds to its own (in this order) when it holds the last stages of
    ``tile`` and not all of them (the kernel's search from ``b - 1`` down)."""
    units = tiles * stages
    b1 = b - 1
    while b1 > 0 and b1 * units // blocks > tile * stages:
        b1 -= 1
    return list(range(b1, b))


def config(M: int, N: int, K: int, sms: int) -> dict:
    """The launch config for a batch of M rows (see :func:`_config`; cached, a fresh dict per call). Above 128 rows
    a block of two warpgroups and 256 batch rows (m64n256 wgmmas, :data:`WS256`) competes with the 128-row choice
    on :func:`_estimate`."""
    if M <= 64:
        return dict(_config(64, -(-M // 64), N, K, sms))
    if _stream_k(M, N, K, sms):
        return dict(DEFAULT, split=1, sk=1, **(WS256 if M > 128 else dict(WS_DEFAULT, wg=2, bm=128)))
    c = dict(_config(128, -(-M // 128), N, K, sms))
    if M > 128:
        mt = -(-M // 256)
        split = _fill_split(-(-N // 128) * mt, K, sms)
        if _estimate(256, 2, split, mt, N, K, sms) < _estimate(128, c["wg"], c["split"], -(-M // 128), N, K, sms):
            return dict(DEFAULT, split=split, **WS256)
    return c


def _stream_k(M: int, N: int, K: int, sms: int) -> bool:
    """Stream-K (``sk``) where the H200 runs measured it faster: the blocks of two warpgroups (256 batch rows above
    128, else 128) fill one wave to between half and three quarters of the SMs, over at least 32 stages of K
    (11008 x 4096 at 128 and 256 rows: 86 tiles on 132 SMs, 9% and 7% faster). At 112 tiles (85%) and at 32 (24%)
    it measured slower: its partials' traffic outweighs the idle SMs (benchmarks/kernels/NOTES.md, v25)."""
    tiles = -(-N // 128) * -(-M // (256 if M > 128 else 128))
    return K // 64 >= 32 and sms / 2 <= tiles <= 3 * sms / 4


def _fill_key(tiles: int, split: int, sms: int) -> float:
    """How well ``tiles`` x ``split`` units fill whole waves of one per SM, less 0.06 per extra split."""
    units = tiles * split
    return round(units / (-(-units // sms) * sms) - 0.06 * (split - 1), 2)


def _fill_split(tiles: int, K: int, sms: int) -> int:
    """The K split (1-4, at least 8 stages per block) with the best :func:`_fill_key` (the smallest among equals)."""
    return max((s for s in range(1, 5) if s == 1 or K // 64 >= 8 * s), key=lambda s: _fill_key(tiles, s, sms))


def _estimate(bm: int, wg: int, split: int, mt: int, N: int, K: int, sms: int) -> float:
    """Microseconds of a warp-specialized launch on an H200, roughly: waves x (0.5 us per stage per unit of work +
    a fixed 9.7 us, the pipeline's fill and the split's sum), a unit of work being two warpgroups at 128 batch rows
    (three: 1.5); the 256-row block measured 1.6 units a stage and 14.5 us fixed. Fitted on the five Llama shapes at
    256 rows (benchmarks/kernels/NOTES.md, v13), where it picks the faster block shape on each."""
    units = -(-N // (64 * wg)) * mt * split
    w, fixed = (1.6, 14.5) if bm == 256 else (wg / 2, 9.7)
    return -(-units // sms) * (0.5 * -(-(K // 64) // split) * w + fixed)


@functools.lru_cache(maxsize=4096)
def _config(bm: int, mt: int, N: int, K: int, sms: int) -> tuple:
    """The launch config: BM 128 (64 for batches up to 64), and the warpgroups per block (2, 3 or 4; 2 or 3 at BM 128,
    where a producer warpgroup joins them: :data:`WS_DEFAULT`) and K split (1-4,
    at least 8 stages per block) whose work units fill whole waves of one unit per SM best (an SM's throughput
    measured about the same with one block of 2-4 warpgroups or two blocks of 2), less 0.06 per extra split (each adds
    an fp32 tile per unit of traffic and a longer last-block sum), then the smaller block (two blocks of 2 per SM
    measured faster than one of 4 at 14336 x 4096)."""
    best = None
    for wg in ((2, 3) if bm == 128 else (2, 3, 4)):
        tiles = -(-N // (64 * wg)) * mt
        split = _fill_split(tiles, K, sms)
        key = _fill_key(tiles, split, sms)
        if best is None or key > best[0]:
            best = (key, dict(DEFAULT, wg=wg, bm=bm, split=split, minb=2 if wg == 2 else 1) if bm == 64 else
                    dict(DEFAULT, wg=wg, bm=bm, split=split, **WS_DEFAULT))
    return tuple(best[1].items())


_SCRATCH: dict = {}


def _scratch(device: torch.device, floats: int, ints: int):
    return grow_scratch(_SCRATCH, device, floats, ints)


def run_int_wgmma(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K] (see :func:`supports`) -> [M, N] of x2.dtype."""
    M, K = x2.shape
    assert K == pk["K"] and pk["bits"] == 4, (K, pk["K"], pk["bits"])
    N = pk["N"]
    dev = device_index(x2)
    base = config(M, N, K, sm_count(dev))
    if cfg and cfg.get("over"):  # a given config's keys over the chosen one's
        c = dict(base, **{k: v for k, v in cfg.items() if k != "over"})
    else:
        c = dict(DEFAULT, **cfg) if cfg else base  # a given config: DEFAULT's keys where it has none
    c["wg"] = c["wg"] or base["wg"]  # 0: the chosen one
    if not c["split"]:  # 0: the split that fills the waves best for this block shape
        c["split"] = _fill_split(-(-N // (64 * c["wg"])) * -(-M // c["bm"]), K, sm_count(dev))
    wg, bm, nst = int(c["wg"]), int(c["bm"]), int(c["nst"])
    if bm > 128 or wg > 2 or c.get("ws"):  # m64n256's accumulators, 384-544 threads: one block per SM
        c["minb"] = 1
    ws = int(c.get("ws", 0))
    gx, gy = -(-N // (64 * wg)), -(-M // bm)
    split = max(1, min(int(c["split"] or 1), K // 64, 4))  # MAX_SPLIT
    part = cnt = x2
    sk = 0
    if c.get("sk") and ws:  # stream-K: one block per SM over all (tile, stage) units, one partial slot per block
        blocks = min(int(c.get("blocks") or sm_count(dev)), gx * gy * (K // 64))  # "blocks": more, for tests
        sc = _scratch(x2.device, blocks * 64 * wg * bm, blocks + 1)  # flags, then the ticket counter
        if sc is not None:
            sk, split, part, cnt = 1, 1, sc[0], sc[1]
            gx, gy = blocks, 1
    epi = _epi(wg, bm, nst, int(c.get("minb", 1))) if c.get("epi", 1) else 0
    gd = pdl_mode(int(c.get("gd", 0)), sm90(dev)) if ws else 0
    kern = _compiled(XT[x2.dtype], bool(pk["sbf16"]), wg, bm, nst, int(c.get("pipe", 1)), int(c.get("minb", 1)), ws,
                     sk, dev, int(c.get("abl", 0)) if ws else 0, epi, gd)
    if split > 1:
        sc = _scratch(x2.device, gx * gy * split * 64 * wg * bm, gx * gy)
        if sc is None:
            split = 1
        else:
            part, cnt = sc
    if out is None:
        out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    kern(grid=(gx, gy, split), block=(128 * wg + 32 * ws, 1, 1),
         args=[x2, out, bias if bias is not None else out, pk["words"], pk["sz"], part, cnt, M, N, K,
               pk["words"].shape[1], pk["NG"], (pk["group"] // 64).bit_length() - 1, int(bias is not None)],
         smem=smem_bytes(wg, bm, nst, epi), pdl=bool(gd))
    return out
