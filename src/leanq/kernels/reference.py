"""Pure-torch reference kernels: dequantize the whole weight, then F.linear.

They are the CPU path, the test oracle for every fast kernel and the fallback.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import Kernel, register_kernel


_CACHING = False


@contextlib.contextmanager
def reuse_dequantized(modules):
    """Within this block, each integer layer dequantizes once and reuses the float weight.

    For loops that run the same layers over many batches (the calibration
    pipeline): the float copies live only inside the block and are dropped at exit.
    """
    global _CACHING
    prev, _CACHING = _CACHING, True
    try:
        yield
    finally:
        _CACHING = prev
        for m in modules:
            if hasattr(m, "_cache"):
                m._cache.pop("reference-int", None)


def int_dequant_linear(m, x: torch.Tensor) -> torch.Tensor:
    if _CACHING:
        w = m._cache.get("reference-int")
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = m._cache["reference-int"] = m.int_weight().dequantize(x.dtype)
    else:
        w = m.int_weight().dequantize(x.dtype)
    return F.linear(x, w, m.bias)


def float_linear(m, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.weight.to(x.dtype), m.bias)


register_kernel(Kernel("reference-int", "int", ("any",), lambda m, x: True, int_dequant_linear, priority=-100))
register_kernel(Kernel("reference-float", "float", ("any",), lambda m, x: True, float_linear, priority=-100))
