"""Kernels for the NF4, FP8 and W8A8 formats.

NF4 and FP8 have pure-torch references only (dequantize, then F.linear).
W8A8 has an exact reference and an integer-matmul kernel:

* reference-w8a8: per-token int8 activations, the int8 x int8 product summed
  exactly in float64 (every partial sum is an integer below 127² · in < 2^53),
  then scaled — bit-for-bit what an int32-accumulating kernel computes before
  the final float scaling.
* int-mm-w8a8: the same with ``torch._int_mm`` (int8 in, int32 out), on CUDA.
  ``_int_mm`` wants more than 16 rows and both widths a multiple of 8; shorter
  inputs are padded with zero rows and the padding dropped.  Not used on CPU:
  there torch 2.13's ``_int_mm`` took 3.7 s for a 1024x576 @ 576x1536 product
  against 0.18 s for the float64 reference (one thread), so the reference runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.layouts import container
from ..formats.w8a8 import quantize_tokens
from . import Kernel, register_kernel


def dequant_linear(m, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, container(m).dequantize(x.dtype), m.bias)


def _finish(acc: torch.Tensor, a: torch.Tensor, m, x: torch.Tensor) -> torch.Tensor:
    """float32 [tokens, out] from the exact integer sums ``acc`` and per-token scales ``a``."""
    y = acc.float() * a[:, None] * m.scales.float()[None, :]
    if m.bias is not None:
        y = y + m.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)


def w8a8_reference(m, x: torch.Tensor) -> torch.Tensor:
    xq, a = quantize_tokens(x.reshape(-1, x.shape[-1]), m.smooth)
    acc = xq.double() @ m.qweight.double().t()  # exact integer sums
    return _finish(acc, a, m, x)


def w8a8_int_mm(m, x: torch.Tensor) -> torch.Tensor:
    xq, a = quantize_tokens(x.reshape(-1, x.shape[-1]), m.smooth)
    rows = xq.shape[0]
    if rows <= 16:
        xq = F.pad(xq, (0, 0, 0, 17 - rows))
    wt = m._cache.get("qweight_t")
    if wt is None or wt.device != xq.device:
        # _int_mm wants the weight as [in, out]; a column-major view of the stored [out, in]
        wt = m._cache["qweight_t"] = m.qweight.t()
    acc = torch._int_mm(xq, wt)[:rows]
    return _finish(acc, a, m, x)


def _int_mm_ok(m, x: torch.Tensor) -> bool:
    return hasattr(torch, "_int_mm") and m.in_features % 8 == 0 and m.out_features % 8 == 0


register_kernel(Kernel("reference-nf4", "nf4", ("any",), lambda m, x: True, dequant_linear, priority=-100))
register_kernel(Kernel("reference-fp8", "fp8", ("any",), lambda m, x: True, dequant_linear, priority=-100))
register_kernel(Kernel("reference-w8a8", "w8a8", ("any",), lambda m, x: True, w8a8_reference, priority=-100))
register_kernel(Kernel("int-mm-w8a8", "w8a8", ("cuda",), _int_mm_ok, w8a8_int_mm, priority=10))
