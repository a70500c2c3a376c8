"""Pure-torch reference kernel of the vector-quantized format: decode the codebooks, then F.linear.

It runs on every device (the CPU path, ``model.generate`` included), is the
oracle of the Triton LUT kernels (``kernels.triton_vq``) and their fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Kernel, reference, register_kernel


def vq_weight(m, dtype: torch.dtype) -> torch.Tensor:
    """The decoded weight [out, in] of a vq QuantLinear ``m``, in ``dtype``."""
    from ..formats.layouts import container

    return container(m).dequantize(dtype)


def vq_dequant_linear(m, x: torch.Tensor) -> torch.Tensor:
    if reference._CACHING:
        # same cache slot as the integer reference, so reference.reuse_dequantized drops it on exit
        w = m._cache.get("reference-int")
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = m._cache["reference-int"] = vq_weight(m, x.dtype)
    else:
        w = vq_weight(m, x.dtype)
    return F.linear(x, w, m.bias)


register_kernel(Kernel("reference-vq", "vq", ("any",), lambda m, x: True, vq_dequant_linear, priority=-100))
