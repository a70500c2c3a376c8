"""Kernels compute with stored formats.  Each has a pure-torch reference.

The dispatch table maps (format, device type) to an ordered list of
candidates; the first whose ``supports(module, x)`` holds runs.  The
reference is always last, so every format runs everywhere.
``explain(model)`` prints which kernel each layer would use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Kernel:
    name: str
    fmt: str
    devices: tuple[str, ...]
    supports: Callable[[torch.nn.Module, torch.Tensor], bool]
    run: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    priority: int = 0
    # the m._cache slot of the kernel layout it computes with (built at first eager use, see cached_layout);
    # inside torch.compile a kernel whose layout was never built steps aside: building it there would put the
    # repack in the graph, and the missing entry would break the graph on every call
    layout: str | None = None


KERNELS: list[Kernel] = []


def register_kernel(k: Kernel) -> Kernel:
    KERNELS.append(k)
    KERNELS.sort(key=lambda k: -k.priority)
    return k


def _allowed(k: Kernel) -> bool:
    # LEANQ_KERNELS=reference pins every layer to the pure-torch reference (debugging, A/B checks)
    return os.environ.get("LEANQ_KERNELS", "") != "reference" or k.name.startswith("reference")


def select(module: torch.nn.Module, x: torch.Tensor) -> Kernel:
    built = getattr(module, "_cache", {}) if torch.compiler.is_compiling() else None
    for k in KERNELS:
        if not _allowed(k):
            continue
        if built is not None and k.layout is not None and k.layout not in built:
            continue
        if k.fmt == module.fmt and (x.device.type in k.devices or "any" in k.devices) and k.supports(module, x):
            return k
    raise RuntimeError(f"no kernel for format {module.fmt!r} on {x.device.type}")


def explain(model: torch.nn.Module, batch: int = 1, device: str | None = None,
            dtype: torch.dtype = torch.float32) -> list[tuple[str, str]]:
    """(module name, kernel name) for every quantized layer at a given batch size and activation dtype."""
    rows = []
    for name, m in model.named_modules():
        if hasattr(m, "fmt") and hasattr(m, "in_features"):
            dev = device or next(iter(m.buffers())).device.type
            rows.append((name, _select_by(m, dev, batch, dtype)))
    return rows


def _select_by(m: torch.nn.Module, dev: str, batch: int, dtype: torch.dtype = torch.float32) -> str:
    probe = torch.empty(batch, m.in_features, device="meta", dtype=dtype)
    for k in KERNELS:
        if k.fmt == m.fmt and (dev in k.devices or "any" in k.devices):
            try:
                ok = k.supports(m, probe)
            except Exception:  # a kernel's probe that needs real data: treat as unsupported
                ok = False
            if ok:
                return k.name
    return "none"


def cached_layout(m: torch.nn.Module, slot: str, only: str, build: Callable[[], dict],
                  names: tuple[str, ...] = ("qweight", "scales", "zeros")) -> dict:
    """A kernel layout of quantized layer ``m``, built by ``build()`` at first use and cached in ``m._cache[slot]``.

    Keyed on the stored buffers' (``names``) storage and version counters, so loading new weights in place
    (load_state_dict) invalidates it.  Inside torch.compile, or once ``m._cache[only]`` is set (the stored
    buffers were released), the key is not checked.
    """
    cache = m._cache
    if torch.compiler.is_compiling() or only in cache:
        return cache[slot][1]
    key = tuple((t.data_ptr(), t._version, t.device) for t in (getattr(m, n) for n in names))
    hit = cache.get(slot)
    if hit is None or hit[0] != key:
        cache[slot] = hit = (key, build())
    return hit[1]


RELEASED = ("triton_int_only", "kn_only", "rk_only")  # m._cache marks: a kernel's release kept only its layout


def int_layer_for(m: torch.nn.Module, bits: tuple[int, ...], own: str):
    """The spec of ``m`` when it is an int-format layer of one of ``bits`` that a row-weight kernel can take: no
    AWQ input scale (the triton_int kernels handle it), and its stored codes not dropped by another kernel's
    release (``own``: this kernel's own release mark).  None otherwise."""
    spec = getattr(m, "spec", None)
    if getattr(m, "fmt", None) != "int" or spec is None or spec.bits not in bits:
        return None
    if getattr(m, "in_scale", None) is not None:
        return None
    cache = getattr(m, "_cache", {})
    if own not in cache and any(k in cache for k in RELEASED if k != own):
        return None
    return spec


def drop_stored(m: torch.nn.Module) -> int:
    """Free a quantized layer's stored-format buffers (once a kernel layout holds the same codes); bytes freed."""
    freed = 0
    for name in ("qweight", "scales", "zeros"):
        t = getattr(m, name)
        freed += t.numel() * t.element_size()
        setattr(m, name, t.new_empty(0))
    return freed


from . import reference  # noqa: E402,F401
from . import ptq_formats  # noqa: E402,F401  (nf4, fp8, w8a8)
from . import cpu_int4  # noqa: E402,F401  (4-bit on CPUs: PyTorch's packed int4 matmul)
from . import vq_ref  # noqa: E402,F401  (vq reference)


def _load_gpu_kernels() -> None:
    """GPU kernels (CUDA C++ through NVRTC, and Triton), only where a CUDA device is present: importing
    triton costs ~1 s and a CPU-only install need not have it (the reference covers every format)."""
    if not torch.cuda.is_available():
        return
    try:  # needs no Triton: CUDA C++ compiled at first use by NVRTC (its own check, cuda_rt.nvrtc_available)
        from . import cuda_int  # noqa: F401  (batch-1 2/4/8-bit GEMV, ahead of the Triton kernels)
    except Exception as e:  # a torch without what it needs must not break leanq
        import warnings

        warnings.warn(f"leanq: CUDA int kernel disabled ({type(e).__name__}: {e})")
    try:
        from . import triton_int  # noqa: F401
        from . import triton_fast  # noqa: F401  (v4 kernels, ahead of triton_int in the table)
        from . import triton_vq  # noqa: F401  (vq LUT GEMV + dequantize)
        from . import triton_vq_kn  # noqa: F401  (batch-1 vq GEMV on the K-major index layout)
        from . import cuda_vq  # noqa: F401  (batch-1 vq GEMV in CUDA C++ via NVRTC, ahead of triton_vq_kn)
        from . import cuda_vq_cluster  # noqa: F401  (16-codeword books: one kernel, a cluster's reduction)
        from . import triton_half2  # noqa: F401  (batch-1 2/4-bit GEMV in paired fp16)
        from . import triton_kn  # noqa: F401  (batch-1 2/4/8-bit GEMV on the K-major layout, ahead of h2)
    except ImportError:  # no triton: the reference kernels serve the GPU too
        pass
    except Exception as e:  # a triton/torch pairing that breaks at import must not break leanq
        import warnings

        warnings.warn(f"leanq: Triton kernels disabled ({type(e).__name__}: {e}); using the reference kernels")


_load_gpu_kernels()
