"""Which tensors each storage format keeps: one table for modules, checkpoints and size accounting.

``stored_shapes(spec, out, in)`` gives {buffer name: (shape, dtype)} for any
format; ``container(module)`` rebuilds the format's container from a module's
buffers.  Adding a format means one entry in each.
"""

from __future__ import annotations

import torch

from ..config import QuantSpec


def stored_shapes(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if spec.fmt == "int":
        from .intq import expected_shapes

        return expected_shapes(spec, out_features, in_features)
    if spec.fmt == "float":
        return {"weight": ((out_features, in_features), getattr(torch, spec.dtype))}
    if spec.fmt == "nf4":
        from .nf4 import nf4_shapes

        return nf4_shapes(spec, out_features, in_features)
    if spec.fmt == "fp8":
        from .fp8 import fp8_shapes

        return fp8_shapes(spec, out_features, in_features)
    if spec.fmt == "w8a8":
        from .w8a8 import w8a8_shapes

        return w8a8_shapes(spec, out_features, in_features)
    if spec.fmt == "vq":
        from .vq import vq_shapes

        return vq_shapes(spec, out_features, in_features)
    raise ValueError(f"no layout for format {spec.fmt!r}")


def container(m):
    """The format container held by a QuantLinear ``m`` (its buffers, not copies)."""
    f = m.spec.fmt
    if f == "int":
        return m.int_weight()
    if f == "nf4":
        from .nf4 import NF4Weight

        return NF4Weight(m.qweight, m.absmax, m.spec, m.in_features)
    if f == "fp8":
        from .fp8 import FP8Weight

        return FP8Weight(m.weight, m.scales, m.spec)
    if f == "w8a8":
        from .w8a8 import W8A8Weight

        return W8A8Weight(m.qweight, m.scales, m.smooth, m.spec)
    if f == "vq":
        from .vq import VQWeight

        return VQWeight(m.qweight, m.codebooks, m.scales, m.spec, m.in_features)
    raise ValueError(f"no container for format {f!r}")
