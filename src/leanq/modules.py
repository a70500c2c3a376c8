"""The quantized linear layer: packed tensors as buffers, a kernel to run them."""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantSpec
from .formats.intq import IntWeight, expected_shapes
from .kernels import select


class QuantLinear(nn.Module):
    """A drop-in for ``nn.Linear`` holding a stored format.

    Buffers (fmt="int"): ``qweight``, ``scales``, ``zeros`` as described in
    :class:`leanq.formats.IntWeight`; (fmt="float"): ``weight`` [out, in].
    ``bias`` [out] is kept in float.  ``forward`` picks a kernel from the
    dispatch table (the pure-torch reference when nothing faster applies).
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.fmt = spec.fmt
        if spec.fmt != "float":  # int, nf4, fp8, w8a8: the format's own table (formats.layouts)
            for name, (shape, dtype) in expected_shapes(spec, out_features, in_features).items():
                self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=getattr(torch, spec.dtype)))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self._cache: dict = {}

    @classmethod
    def from_int_weight(cls, iw: IntWeight, bias: torch.Tensor | None) -> "QuantLinear":
        """Any packed container (IntWeight, NF4Weight, FP8Weight, W8A8Weight): its tensors become the buffers."""
        m = cls(iw.in_features, iw.out_features, iw.spec, bias is not None,
                bias.dtype if bias is not None else torch.float32)
        for name, t in iw.tensors().items():
            setattr(m, name, t)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec) -> "QuantLinear":
        out, n = weight.shape
        m = cls(n, out, spec, bias is not None, bias.dtype if bias is not None else torch.float32)
        m.weight = weight.detach().to(getattr(torch, spec.dtype)).clone()
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def int_weight(self) -> IntWeight:
        return IntWeight(self.qweight, self.scales, self.zeros, self.spec, self.in_features,
                         getattr(self, "in_scale", None))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # set by a kernel that took the layer over for inference (e.g. kernels.cuda_int.release_stored_rk): one call
    # with no dispatch, so torch.compile traces (and guards) as little as for nn.Linear
    _fast = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if fast is not None:
            return fast(self, x)
        return select(self, x).run(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}"
