"""What leanq's CUDA C++ kernels share: NVRTC availability and a driver-level launcher.

The kernels are compiled at first use through ``torch.cuda._compile_kernel`` (NVRTC, PyTorch >= 2.8),
so nothing is built at install time, and launched with ``cuLaunchKernel`` on the current stream, so they
can be captured in CUDA graphs.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

# the activation dtype as the kernels' XT define
XT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# CUfunction_attribute: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_MAX_DYNAMIC_SHARED = 8
# CUfunction_attribute: CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED (clusters of more than 8 blocks, sm_90)
_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
# CUlaunchAttributeID: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union (its first int is the flag used here)
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]

# Device helpers every kernel source starts with: activations of type XT (0 fp32, 1 fp16, 2 bf16; a #define of
# the kernel's configuration) read as fp32 (ldx) and written back rounded to nearest (stx); fp16x2 arithmetic
# (hfma2, f2h2, h2sum: two fp32 to a pair, a pair's sum in fp32); a 16-byte weight load that skips L1 (ldw);
# the end of a warp's row group (finish_rows).
PRELUDE = r"""
// XR qualifies x, the activations, which the kernel before wrote (in a decode). Under programmatic dependent launch
// (a kernel's GD define not 0) x is read by coherent loads, without __restrict__ and so without ld.global.nc:
// ptxas keeps griddepcontrol.wait ahead of coherent loads, and was seen to move read-only (.nc) loads across it.
#if defined(GD) && GD
#define XR
#else
#define XR __restrict__
#endif
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// programmatic dependent launch (sm_90 on; no-ops before): gdc_wait holds the thread until the grids this one
// depends on have completed and their writes are visible (a grid launched with the PDL attribute may start before
// that); gdc_launch lets the next grid in the stream be scheduled once every block of this one has called it or ended
__device__ __forceinline__ void gdc_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void gdc_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ float ldx(const void* x, long long i) {
#if XT == 0
  return ((const float*)x)[i];
#elif XT == 1
  return h2f(((const u16*)x)[i]);
#else
  return bf2f(((const u16*)x)[i]);
#endif
}
__device__ __forceinline__ void stx(void* out, long long i, float f) {
#if XT == 0
  ((float*)out)[i] = f;
#elif XT == 1
  u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); ((u16*)out)[i] = h;
#else
  u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); ((u16*)out)[i] = h;
#endif
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 f2h2(float lo, float hi) {
  u32 d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
__device__ __forceinline__ float h2sum(u32 v) {
  float a, b;
  asm("{.reg .f16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}" : "=f"(a), "=f"(b) : "r"(v));
  return a + b;
}
__device__ __forceinline__ uint4 ldw(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
// activations: XW 16-byte words per unit of 8 values (16-bit x: one, fp32: two), and their values as fp32
#define XW (XT == 0 ? 2 : 1)
__device__ __forceinline__ void unpack8(float (&v)[8], const uint4 (&r)[XW]) {
#if XT == 0
  v[0] = __uint_as_float(r[0].x); v[1] = __uint_as_float(r[0].y); v[2] = __uint_as_float(r[0].z);
  v[3] = __uint_as_float(r[0].w); v[4] = __uint_as_float(r[1].x); v[5] = __uint_as_float(r[1].y);
  v[6] = __uint_as_float(r[1].z); v[7] = __uint_as_float(r[1].w);
#elif XT == 2  // bf16: a value's fp32 bits are its 16 bits at the top (one shift or one AND each)
  const u32 vv[4] = {r[0].x, r[0].y, r[0].z, r[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(vv[i] << 16);
    v[2 * i + 1] = __uint_as_float(vv[i] & 0xFFFF0000u);
  }
#else
  const u32 vv[4] = {r[0].x, r[0].y, r[0].z, r[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) { v[2 * i] = ldx(&vv[i], 0); v[2 * i + 1] = ldx(&vv[i], 1); }
#endif
}
#ifdef SBF16
// an rk group word's scale (its high 16 bits: bf16 when SBF16, else fp16) as fp32
__device__ __forceinline__ float scale_of(u32 s) {
#if SBF16
  return __uint_as_float(s & 0xFFFF0000u);
#else
  return h2f((u16)(s >> 16));
#endif
}
#endif
// a warp's RR row sums, one per lane each: reduced by shuffles; lane r writes row rg * RR + r (times rs[row] when
// rs is given, plus the bias), then the sums restart at zero
template <int RR>
__device__ __forceinline__ void finish_rows(float (&acc)[RR], int rg, int lane, int N, void* out, const void* bias,
                                            int HAS_BIAS, const float* rs) {
#pragma unroll
  for (int r = 0; r < RR; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int row = rg * RR + r;
    if (lane == r && row < N) {
      float y = rs ? v * rs[row] : v;
      if (HAS_BIAS) y += ldx(bias, row);
      stx(out, row, y);
    }
    acc[r] = 0.f;
  }
}
"""


def nvrtc_available(switch: str) -> bool:
    """NVRTC compilation through PyTorch is possible here (a CUDA device, torch.cuda._compile_kernel) and the
    environment variable ``switch`` does not turn it off (``=0``)."""
    return (torch.cuda.is_available() and torch.version.cuda is not None
            and hasattr(torch.cuda, "_compile_kernel") and os.environ.get(switch, "1") != "0")


def compile_kernels(src: str, names: list[str]) -> list:
    """The ``extern "C"`` kernels ``names`` of one source, compiled by NVRTC once and loaded as one module.
    ``torch.cuda._compile_kernel`` compiles (and the driver loads) the whole source once per name; a source with three
    kernels cost three compiles. Any failure on this path (PyTorch's private helpers differ, or the source does not
    compile) falls back to that one, which compiles again and raises its own error."""
    try:
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

        ptx, _ = _nvrtc_compile(src, names[0])
        loaded = _cuda_load_module(ptx, list(names))
        kernels = [loaded[n] for n in names]
        if all(hasattr(k, "func") for k in kernels):  # what Launcher takes
            return kernels
    except Exception:  # noqa: BLE001 - the fallback below decides
        pass
    return [torch.cuda._compile_kernel(src, n) for n in names]


@functools.lru_cache(maxsize=None)
def sm_count(dev: int) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count


@functools.lru_cache(maxsize=None)
def sm90(dev: int) -> bool:
    """Device ``dev`` is sm_90 or later (wgmma, bulk copies, programmatic dependent launch)."""
    return torch.cuda.get_device_capability(dev) >= (9, 0)


def inductor_pdl() -> bool:
    """TorchInductor generates programmatic-dependent-launch code (``torch._inductor.config.triton.enable_pdl``).
    Its kernels skip the wait where they do not read their predecessor's output, so a kernel before them that lets
    them start early (``gdc_launch`` at its start) could end after a later kernel that reads its output: the
    kernels here then leave the trigger to their end (launch option gd 2)."""
    cfg = sys.modules.get("torch._inductor.config")
    return bool(getattr(getattr(cfg, "triton", None), "enable_pdl", False))


# what launch option gd 1 becomes while TorchInductor's PDL mode is on: 2 (the next grid let in at this grid's end)
# or 0 (no programmatic launch: this grid starts after the kernel before it has ended)
INDUCTOR_GD = 2


def pdl_mode(gd: int, has_pdl: bool) -> int:
    """The programmatic-dependent-launch mode a kernel runs with: launch option ``gd`` where the GPU has PDL
    (``has_pdl``: sm_90 on), else 0; 1 (the next grid let in early) becomes :data:`INDUCTOR_GD` while
    TorchInductor's PDL mode is on (see :func:`inductor_pdl`)."""
    if not gd or not has_pdl:
        return 0
    return INDUCTOR_GD if gd == 1 and inductor_pdl() else gd


def device_index(x: torch.Tensor | torch.device) -> int:
    """The CUDA device index of tensor or device ``x`` (the current device for a bare ``cuda``)."""
    d = x.device if isinstance(x, torch.Tensor) else x
    return d.index if d.index is not None else torch.cuda.current_device()


def on_device_of(x: torch.Tensor, fn, *args):
    """fn(*args) with x's GPU as the current device (launches go to the current device's stream)."""
    if x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            return fn(*args)
    return fn(*args)


class Launcher:
    """cuLaunchKernel on the current stream, with the driver library loaded once (PyTorch's own wrapper
    re-opens libcuda on every launch, which costs tens of microseconds).  Capturable in CUDA graphs.

    ``args``: tensors (passed as device pointers), Python ints (passed as C ints) and floats (C floats), in the
    kernel's order.
    """

    _lib = None
    _has_ex = False

    def __init__(self, kernel, name: str = "leanq"):
        self.kernel = kernel  # keeps the module alive
        self.func = kernel.func
        self.name = name
        self.smem_limit = 0  # the dynamic shared memory the function was last allowed (raised before a launch needs more)
        if Launcher._lib is None:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 6 + [
                ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            lib.cuLaunchKernel.restype = ctypes.c_int
            # cuLaunchKernelEx: CUDA 12 drivers on; without it, launches go without PDL
            Launcher._has_ex = hasattr(lib, "cuLaunchKernelEx")
            if Launcher._has_ex:
                lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_void_p]
                lib.cuLaunchKernelEx.restype = ctypes.c_int
            lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
            lib.cuFuncSetAttribute.restype = ctypes.c_int
            lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [
                ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
            lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.restype = ctypes.c_int
            Launcher._lib = lib
        self._occ: dict = {}

    def _smem(self, smem: int) -> None:
        # ask for every new maximum: a function's static shared memory counts against the default 48 KB as well,
        # so a launch with less than 48 KB of dynamic shared memory can still need it raised
        if smem > self.smem_limit:
            rc = Launcher._lib.cuFuncSetAttribute(self.func, _MAX_DYNAMIC_SHARED, smem)
            if rc != 0:
                raise RuntimeError(f"{self.name}: {smem} bytes of shared memory refused (CUDA error {rc})")
            self.smem_limit = smem

    def allow_large_clusters(self) -> None:
        """Let the function run in thread-block clusters of more than 8 blocks (up to 16 on sm_90: its
        ``__cluster_dims__`` then name a non-portable size)."""
        if not getattr(self, "_large_clusters", False):
            rc = Launcher._lib.cuFuncSetAttribute(self.func, _NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)
            if rc != 0:
                raise RuntimeError(f"{self.name}: clusters above 8 blocks refused (CUDA error {rc})")
            self._large_clusters = True

    def blocks_per_sm(self, threads: int, smem: int = 0) -> int:
        """How many blocks of ``threads`` threads and ``smem`` bytes of dynamic shared memory one SM holds at
        once (registers, shared memory, threads), from the driver; cached."""
        key = (threads, smem)
        if key not in self._occ:
            self._smem(smem)
            n = ctypes.c_int(0)
            rc = Launcher._lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), self.func, threads, smem)
            if rc != 0:
                raise RuntimeError(f"{self.name}: occupancy query failed (CUDA error {rc})")
            self._occ[key] = max(1, n.value)
        return self._occ[key]

    def __call__(self, grid, block, args, smem: int = 0, pdl: bool = False) -> None:
        """``pdl``: launched with programmatic stream serialization (cuLaunchKernelEx), so the grid may start before
        the kernel before it in the stream has completed: the kernel must call gdc_wait before it reads what that
        kernel wrote or writes anything (sm_90 on)."""
        self._smem(smem)
        vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
                else ctypes.c_float(a) if isinstance(a, float) else ctypes.c_int(a) for a in args]
        arr = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        stream = torch.cuda.current_stream().cuda_stream
        if pdl and Launcher._has_ex:  # launched without the attribute, the kernels' gdc_wait returns at once
            attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            cfg = _LaunchConfig(grid[0], grid[1], grid[2], block[0], block[1], block[2], smem, stream,
                                ctypes.pointer(attr), 1)
            rc = Launcher._lib.cuLaunchKernelEx(ctypes.byref(cfg), self.func, arr, None)
        else:
            rc = Launcher._lib.cuLaunchKernel(self.func, grid[0], grid[1], grid[2], block[0], block[1], block[2], smem,
                                              stream, arr, None)
        if rc != 0:
            raise RuntimeError(f"{self.name}: cuLaunchKernel failed with CUDA error {rc}")


def grow_scratch(store: dict, device: torch.device, floats: int, ints: int, min_floats: int = 0):
    """Split-K scratch of a kernel, per device in ``store``: fp32 slots and zeroed int32 arrival counters, grown when
    a launch needs more (never shrunk). None while a CUDA graph is being captured and they are too small: the
    allocation may not happen there, and the caller launches without a split instead."""
    have = store.get(device)
    if have is not None and have[0].numel() >= floats and have[1].numel() >= ints:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    nf = max(floats, have[0].numel() if have else 0, min_floats)
    ni = max(ints, have[1].numel() if have else 0, 1 << 12)
    have = store[device] = (torch.empty(nf, dtype=torch.float32, device=device),
                            torch.zeros(ni, dtype=torch.int32, device=device))
    return have
