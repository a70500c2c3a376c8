"""Batched group quantization helpers shared by AWQ and HQQ.

``group_params`` of :mod:`leanq.formats.intq` walks the groups one by one;
the scale search of AWQ calls it ~20 times per layer, so here all full groups
of a matrix are reshaped into rows and handed to ``find_params`` at once (it
works row by row, so the result is identical), and the shorter last group, if
any, separately.
"""

from __future__ import annotations

import torch

from ..config import QuantSpec
from ..formats.intq import find_params


def batched_group_params(w: torch.Tensor, spec: QuantSpec, mse_clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros float32 [out, ngroups] for ``w`` [out, in]; same values as intq.group_params."""
    out, n = w.shape
    g = n if spec.group_size is None else spec.group_size
    nfull = n // g
    parts_s, parts_z = [], []
    if nfull:
        s, z = find_params(w[:, : nfull * g].reshape(out * nfull, g), spec, mse_clip)
        parts_s.append(s.reshape(out, nfull))
        parts_z.append(z.reshape(out, nfull))
    if n % g:
        s, z = find_params(w[:, nfull * g :], spec, mse_clip)
        parts_s.append(s[:, None])
        parts_z.append(z[:, None])
    return torch.cat(parts_s, 1), torch.cat(parts_z, 1)


def expand(p: torch.Tensor, g: int, n: int) -> torch.Tensor:
    """[out, ngroups] -> [out, n]: each group's value repeated over its columns."""
    return p.repeat_interleave(g, 1)[:, :n]


def rtn_quant(w: torch.Tensor, spec: QuantSpec, mse_clip: bool):
    """(codes, scales, zeros, dequantized) of round-to-nearest; codes float [out, in]."""
    out, n = w.shape
    g = n if spec.group_size is None else spec.group_size
    sc, z = batched_group_params(w, spec, mse_clip)
    s, zz = expand(sc, g, n), expand(z, g, n)
    codes = torch.clamp(torch.round(w / s) + zz, 0, (1 << spec.bits) - 1)
    return codes, sc, z, (codes - zz) * s
