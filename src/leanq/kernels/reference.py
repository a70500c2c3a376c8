"""Pure-torch reference kernels: dequantize the whole weight, then F.linear.

They are the CPU path, the test oracle for every fast kernel and the fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Kernel, register_kernel


def int_dequant_linear(m, x: torch.Tensor) -> torch.Tensor:
    w = m.int_weight().dequantize(x.dtype)
    return F.linear(x, w, m.bias)


def float_linear(m, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.weight.to(x.dtype), m.bias)


register_kernel(Kernel("reference-int", "int", ("any",), lambda m, x: True, int_dequant_linear, priority=-100))
register_kernel(Kernel("reference-float", "float", ("any",), lambda m, x: True, float_linear, priority=-100))
