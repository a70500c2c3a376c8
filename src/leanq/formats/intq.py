"""Group-wise integer weights: the quantizer maths and the packed container.

For a weight W [out, in] and a spec (bits b, group size g, sym or asym):

* columns are split into ``ngroups = ceil(in / g)`` groups; the last one is
  shorter when g does not divide ``in``;
* each (row, group) has a scale s (float16) and an integer zero point z in
  [0, 2**b - 1] (asymmetric; stored packed in b bits) or the implicit midpoint
  z = 2**(b-1) (symmetric);
* codes q = clamp(round(w / s) + z, 0, 2**b - 1) and ŵ = (q - z) · s.

Zero is always exactly representable (z is an integer), which matters for
small models whose weights cluster near zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import QuantSpec
from .packing import pack, packed_len, unpack


@dataclass
class IntWeight:
    """A packed group-wise integer weight.

    qweight: uint8 [out, packed_len(in, bits)]  codes, bit-packed along ``in``
    scales:  float16 [out, ngroups]
    zeros:   uint8 [out, packed_len(ngroups, bits)] packed zero points (asym),
             or uint8 [out, 0] (sym: implicit 2**(bits-1))
    in_scale: float16 [in] when ``spec.in_scale`` (AWQ): the stored codes
             represent ``W · diag(in_scale)``, so the weight is that divided
             column-wise by ``in_scale``; None otherwise.
    spec, in_features: how to read them.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    in_features: int
    in_scale: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.in_scale is not None:
            t["in_scale"] = self.in_scale
        return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def codes(self) -> torch.Tensor:
        """uint8 [out, in] unpacked codes."""
        return unpack(self.qweight, self.spec.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        """float32 [out, ngroups] zero points."""
        ng = self.scales.shape[1]
        if self.spec.sym:
            return torch.full((self.out_features, ng), float(1 << (self.spec.bits - 1)), device=self.scales.device)
        return unpack(self.zeros, self.spec.bits, ng).float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference dequantization: [out, in] tensor of ``dtype``."""
        g = group_size_of(self.spec, self.in_features)
        out, n = self.out_features, self.in_features
        ng = self.scales.shape[1]
        q = self.codes()
        if ng * g != n:  # shorter last group: pad to whole groups, slice after
            q = torch.nn.functional.pad(q, (0, ng * g - n))
        q = q.view(out, ng, g).to(torch.float32)
        w = ((q - self.zero_points()[:, :, None]) * self.scales.float()[:, :, None]).view(out, ng * g)[:, :n]
        if self.in_scale is not None:
            w = w / self.in_scale.float()[None, :]
        return w.to(dtype)


def group_size_of(spec: QuantSpec, in_features: int) -> int:
    return in_features if spec.group_size is None else spec.group_size


def num_groups(spec: QuantSpec, in_features: int) -> int:
    return math.ceil(in_features / group_size_of(spec, in_features))


def expected_shapes(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the stored tensors, for validating checkpoints."""
    if spec.fmt != "int":  # the other formats describe themselves
        from .layouts import stored_shapes

        return stored_shapes(spec, out_features, in_features)
    ng = num_groups(spec, in_features)
    shapes = {
        "qweight": ((out_features, packed_len(in_features, spec.bits)), torch.uint8),
        "scales": ((out_features, ng), torch.float16),
        "zeros": ((out_features, 0 if spec.sym else packed_len(ng, spec.bits)), torch.uint8),
    }
    if spec.in_scale:
        shapes["in_scale"] = ((in_features,), torch.float16)
    return shapes


def bits_per_weight(spec: QuantSpec, out_features: int, in_features: int) -> float:
    """Stored bits per weight, every byte of codes, scales and zeros counted."""
    if spec.fmt == "float":
        return 8.0 * torch.empty(0, dtype=getattr(torch, spec.dtype)).element_size()
    total = 0
    for shape, dtype in expected_shapes(spec, out_features, in_features).values():
        total += math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return 8.0 * total / (out_features * in_features)


# ---------------------------------------------------------------------------
# quantizer maths (pure functions on float tensors)


def qrange(spec: QuantSpec) -> tuple[int, int]:
    return 0, (1 << spec.bits) - 1


CLIP_CHUNK = 8192  # weights per slice of the clip search on CPU (~1 MB of trials per array)


def find_params(w: torch.Tensor, spec: QuantSpec, mse_clip: bool = False, grid: int = 40,
                max_shrink: float = 0.8, col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` [rows, n] (one group per row).

    Returns (scale float32 [rows], zero float32 [rows]); scales are rounded to
    float16 first, so that what is stored is exactly what the codes assume.
    With ``mse_clip`` the range is shrunk by the factor (of ``grid`` steps down
    to ``1 - max_shrink``) that minimises the rounding error of the row,
    each column's squared error weighted by ``col_weight`` [n] when given
    (e.g. the Hessian diagonal: how strongly that input is driven).
    """
    w = w.float()
    lo_q, hi_q = qrange(spec)
    wmin = w.min(dim=1).values.clamp(max=0)
    wmax = w.max(dim=1).values.clamp(min=0)

    def params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if spec.sym:
            amax = torch.maximum(-lo, hi)
            # levels -2^(b-1) .. 2^(b-1)-1 around the midpoint; dividing by
            # 2^(b-1)-1 covers the largest weight of either sign
            scale = amax / ((1 << (spec.bits - 1)) - 1)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
            scale = torch.where(scale > 0, scale, torch.full_like(scale, 6e-8))  # fp16 underflow
            zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
        else:
            scale = (hi - lo) / (hi_q - lo_q)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
            scale = torch.where(scale > 0, scale, torch.full_like(scale, 6e-8))  # fp16 underflow
            zero = torch.round(-lo / scale).clamp(lo_q, hi_q)
        return scale, zero

    if not mse_clip:
        return params(wmin, wmax)
    # all shrink factors at once: [P, rows] parameters, [P, rows, n] trial reconstructions,
    # a slice of rows at a time so the trials stay in cache (rows are independent: same result)
    shrink = 1 - torch.arange(int(max_shrink * grid) + 1, device=w.device, dtype=w.dtype) / grid
    s, z = params(wmin[None] * shrink[:, None], wmax[None] * shrink[:, None])
    cw = col_weight.float() if col_weight is not None else None
    step = max(1, CLIP_CHUNK // max(1, w.shape[1])) if w.device.type == "cpu" else w.shape[0]
    best = torch.empty(w.shape[0], dtype=torch.long, device=w.device)
    for r in range(0, w.shape[0], step):
        sc, zc, wc = s[:, r : r + step, None], z[:, r : r + step, None], w[None, r : r + step]
        q = torch.clamp(torch.round(wc / sc) + zc, lo_q, hi_q)
        err = ((q - zc) * sc - wc).pow_(2)
        err = (err * cw).sum(-1) if cw is not None else err.sum(-1)
        best[r : r + step] = err.argmin(0)  # first (widest) range wins ties
    rows = torch.arange(w.shape[0], device=w.device)
    return s[best, rows], z[best, rows]


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (float, integral values) for ``w`` [..., n] with per-row scale/zero [...,]."""
    lo_q, hi_q = qrange(spec)
    return torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], lo_q, hi_q)


def group_params(w: torch.Tensor, spec: QuantSpec, mse_clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [out, ngroups] for a whole matrix ``w`` [out, in]."""
    out, n = w.shape
    g = group_size_of(spec, n)
    scales, zeros = [], []
    for start in range(0, n, g):
        s, z = find_params(w[:, start : start + g], spec, mse_clip)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales, 1), torch.stack(zeros, 1)


def pack_int_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> IntWeight:
    """Build the container from float codes [out, in] and params [out, ngroups]."""
    out, n = codes.shape
    qweight = pack(codes.to(torch.uint8), spec.bits)
    sc = scales.to(torch.float16).contiguous()
    if spec.sym:
        zp = torch.zeros((out, 0), dtype=torch.uint8, device=codes.device)
    else:
        zp = pack(zeros.to(torch.uint8), spec.bits)
    return IntWeight(qweight.contiguous(), sc, zp.contiguous(), spec, n)
