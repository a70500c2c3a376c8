"""Vector-quantized weights: short vectors of input weights replaced by codebook indices.

For a weight W [out, in] and a spec with vector length d = ``vq_dim``, index
width b = ``bits`` bits, B = ``vq_books`` codebooks of K = 2**b entries:

* each row is cut into ``nvec = ceil(in / d)`` vectors of d consecutive input
  weights (the last one zero-padded when d does not divide ``in``);
* rows and columns are tiled: ``vq_rows`` rows × ``vq_cols`` columns share one
  set of B codebooks (None: the whole height / width), so there are
  ``nrt · nct`` tiles, numbered row-tile-major (tile = rt · nct + ct);
* each (row, vector) stores B indices; the vector is
  ``s[row, group] · Σ_b C[tile, b, idx_b]`` where s is a float16 scale per row
  and group of ``group_size`` input columns (None: one per row).

Stored tensors (all counted in bits per weight):

    qweight   uint8   [out, B · packed_len(nvec, b)]  book b's packed indices
                                                      at [:, b·P:(b+1)·P]
    codebooks float16 [nrt · nct, B, K, d]
    scales    float16 [out, nsg]                       nsg = ceil(in / group_size)

Bits per weight ≈ B·b/d + 16·ntiles·B·K·d/(out·in) + 16·nsg/in; e.g. SmolLM2's
576×576 q_proj at d=4, b=8, one codebook per layer, per-row scales:
2 + 0.05 + 0.03 = 2.08.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import QuantSpec
from .packing import pack, packed_len, unpack


def index_bits(spec: QuantSpec) -> int:
    return spec.bits


def geometry(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, int]:
    """Counts that fix the layout: nvec, K, tiles (nrt, nct, rows and columns per tile), scale groups."""
    d = spec.vq_dim
    nvec = math.ceil(in_features / d)
    rows = spec.vq_rows or out_features
    cols = spec.vq_cols or nvec * d
    g = spec.group_size or nvec * d
    return {"nvec": nvec, "K": 1 << index_bits(spec), "rows": rows, "cols": cols, "nrt": math.ceil(out_features / rows),
            "nct": math.ceil(nvec * d / cols), "group": g, "nsg": math.ceil(in_features / g)}


def vq_shapes(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the stored tensors, for building modules and validating checkpoints."""
    geo = geometry(spec, out_features, in_features)
    b, nb = index_bits(spec), spec.vq_books
    return {
        "qweight": ((out_features, nb * packed_len(geo["nvec"], b)), torch.uint8),
        "codebooks": ((geo["nrt"] * geo["nct"], nb, geo["K"], spec.vq_dim), torch.float16),
        "scales": ((out_features, geo["nsg"]), torch.float16),
    }


@dataclass
class VQWeight:
    """A packed vector-quantized weight (tensors as in the module docstring)."""

    qweight: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor
    spec: QuantSpec
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "codebooks": self.codebooks, "scales": self.scales}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def indices(self) -> torch.Tensor:
        """int64 [out, B, nvec] codebook indices."""
        return unpack_indices(self.qweight, self.spec, self.in_features)

    def tile_map(self) -> torch.Tensor:
        """int64 [out, nvec]: the tile of each (row, vector)."""
        return tile_map(self.spec, self.out_features, self.in_features, self.qweight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference dequantization: [out, in] tensor of ``dtype``."""
        return dequantize_parts(self.indices(), self.codebooks.float(), self.scales.float(), self.spec,
                                self.in_features).to(dtype)


def unpack_indices(qweight: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    nvec = math.ceil(in_features / spec.vq_dim)
    b = index_bits(spec)
    p = packed_len(nvec, b)
    return torch.stack([unpack(qweight[:, k * p:(k + 1) * p], b, nvec) for k in range(spec.vq_books)], 1).long()


def tile_map(spec: QuantSpec, out_features: int, in_features: int, device=None) -> torch.Tensor:
    geo = geometry(spec, out_features, in_features)
    rt = torch.arange(out_features, device=device) // geo["rows"]
    ct = torch.arange(geo["nvec"], device=device) * spec.vq_dim // geo["cols"]
    return rt[:, None] * geo["nct"] + ct[None, :]


def dequantize_parts(idx: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, spec: QuantSpec,
                     in_features: int) -> torch.Tensor:
    """float32 [out, in] from indices [out, B, nvec], codebooks [T, B, K, d] and scales [out, nsg]."""
    out, nb, nvec = idx.shape
    d = spec.vq_dim
    geo = geometry(spec, out, in_features)
    tiles = tile_map(spec, out, in_features, idx.device)  # [out, nvec]
    flat = codebooks.reshape(-1, d)  # rows (tile, book, k)
    v = torch.zeros(out, nvec, d, dtype=codebooks.dtype, device=codebooks.device)
    for k in range(nb):
        v += flat[(tiles * nb + k) * geo["K"] + idx[:, k]]
    w = v.reshape(out, nvec * d)
    s = scales.repeat_interleave(geo["group"], 1)[:, : nvec * d]
    if s.shape[1] < nvec * d:  # padding of the last vector beyond the last scale group
        s = torch.nn.functional.pad(s, (0, nvec * d - s.shape[1]), value=1.0)
    return (w * s)[:, :in_features]


def pack_vq_weight(idx: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, spec: QuantSpec,
                   in_features: int) -> VQWeight:
    """Build the container from indices int [out, B, nvec], codebooks float [T, B, K, d], scales [out, nsg]."""
    b = index_bits(spec)
    q = torch.cat([pack(idx[:, k].to(torch.uint8), b) for k in range(idx.shape[1])], 1)
    want = vq_shapes(spec, idx.shape[0], in_features)
    vw = VQWeight(q.contiguous(), codebooks.to(torch.float16).contiguous(), scales.to(torch.float16).contiguous(),
                  spec, in_features)
    for name, t in vw.tensors().items():
        if tuple(t.shape) != want[name][0]:
            raise ValueError(f"vq: {name} has shape {tuple(t.shape)}, expected {want[name][0]}")
    return vw
