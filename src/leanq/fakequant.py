"""Differentiable stand-ins for packed integer weights, used while learning them.

Two modules stand where a :class:`~leanq.modules.QuantLinear` will be, compute
exactly what the frozen integer weight computes, and freeze into an ordinary
:class:`~leanq.formats.intq.IntWeight` (same loader, same kernels):

* :class:`LearnedRoundLinear` (learned PTQ, :mod:`leanq.learned`): the float
  weight stays fixed; learned are per-group clipping factors (OmniQuant's
  learnable weight clipping: the range is ``[β·min, γ·max]`` with β, γ =
  sigmoid(·) in (0, 1), so it can shrink but never widen beyond min/max) and
  per-weight rounding offsets ``v`` in [-0.5, 0.5] (SignRound), on top of a fixed
  offset ``e`` that makes the starting point reproduce the initial method's codes
  (e.g. GPTQ's error-compensated rounding) exactly.
* :class:`LSQLinear` (QAT, :mod:`leanq.qat`): a latent float weight and
  per-group step sizes (LSQ, learned in log space), optional LoRA factors added
  to the latent weight before quantizing; zero points stay the initial integers.
* :class:`VQTrainLinear` (QAT from a codebook start, ``init="vq"``): the
  codebook indices stay fixed; learned are the codewords and a gain on every
  stored scale (AQLM-style fine-tuning of the continuous parameters).  It
  freezes into a :class:`~leanq.formats.vq.VQWeight`.

Rounding passes gradients straight through (STE); every scale goes through
float16 in the forward pass as it will be stored, so the trained module and
the frozen one compute the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantSpec
from .errors import LeanqError
from .formats.intq import IntWeight, group_size_of, num_groups, pack_int_weight
from .formats.vq import VQWeight, dequantize_parts, geometry, pack_vq_weight

# Where a weight starts inside its start code's bin, in steps from the centre
# (see _start_position).  A weight the start rounded against its float value
# (GPTQ's error compensation moves many) starts _BIN from the centre on the
# float value's side: placed at the bin's edge these flipped after a step or
# two of sign descent (every step moves every offset), undoing the compensation
# (SmolLM2 2-bit: block errors 8x the start's after 2 steps; tiny random test
# models did not show it).  At 0.25 a flip needs a quarter step of consistent push.
_BIN = 0.25


def _start_position(r: torch.Tensor) -> torch.Tensor:
    """Offset from the start's code of each weight, given r = w/s - code (in steps).

    Weights the start rounded to nearest (|r| <= 1/2) keep their own fraction,
    kept strictly inside the bin (0.49) so that round() gives the code back
    exactly; the others start at ±_BIN.
    """
    return torch.where(r.abs() <= 0.5, r.clamp(-0.49, 0.49), torch.sign(r) * _BIN)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator).

    Written as round(x) + (x - x.detach()): the forward value is exactly the
    integer (x + (round(x) - x) is not always, and codes are cast to uint8)."""
    return torch.round(x.detach()) + (x - x.detach())


def half_ste(s: torch.Tensor) -> torch.Tensor:
    """s rounded through float16 as it is stored (fp16 underflow mapped to the
    smallest subnormal, as :func:`leanq.formats.intq.find_params` does); identity backward."""
    s = torch.where(s > 0, s, torch.ones_like(s))
    h = s.detach().half().float()
    h = torch.where(h > 0, h, torch.full_like(h, 6e-8))
    return h + (s - s.detach())


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded through float16 as it is stored (sign kept); identity backward."""
    return x.detach().half().float() + (x - x.detach())


def to_groups(w: torch.Tensor, g: int) -> torch.Tensor:
    """[out, in] -> [out, ngroups, g], a shorter last group zero-padded (zeros change no min/max below)."""
    out, n = w.shape
    ng = -(-n // g)
    if ng * g != n:
        w = F.pad(w, (0, ng * g - n))
    return w.reshape(out, ng, g)


def _check_start(iw: IntWeight, w: torch.Tensor) -> None:
    if iw.spec.fmt != "int" or iw.in_scale is not None:
        raise LeanqError("learned quantization and QAT start from plain integer weights (init rtn or gptq)")
    if tuple(w.shape) != (iw.out_features, iw.in_features):
        raise LeanqError(f"start weight shape {tuple(w.shape)} does not match its float weight")


def _start(iw: IntWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred codes k = q - z [out, ng, g], scales and zeros [out, ng] (float32) of a packed weight."""
    g = group_size_of(iw.spec, iw.in_features)
    q = to_groups(iw.codes().float(), g)
    z = iw.zero_points().float()
    return q - z[..., None], iw.scales.float(), z


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def _asym_factors(s0, z0, wmin, wmax, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping factors (γ, β) [out, ng] whose range gives scale s0 and zero z0.

    The range is [lo, lo + qmax·s0] with t = -lo: any t with round(t/s0) = z0
    gives the zero point, so t is chosen in that interval (with a margin) and
    such that the range stays inside [min, max] (β, γ <= 1) when it can; only a
    start scale wider than min/max allows (e.g. from a least-squares refit) is
    then narrowed.
    """
    span = qmax * s0
    t_lo = torch.maximum(torch.maximum((z0 - 0.45) * s0, span - wmax), torch.zeros_like(s0))
    t_hi = torch.minimum(torch.minimum((z0 + 0.45) * s0, -wmin), span)
    t = torch.where(t_lo <= t_hi, torch.minimum(torch.maximum(z0 * s0, t_lo), t_hi),
                    torch.minimum(z0 * s0, -wmin))
    gam = torch.where(wmax > 0, (span - t) / wmax.clamp(min=1e-12), torch.ones_like(s0))
    bet = torch.where(wmin < 0, t / (-wmin).clamp(min=1e-12), torch.ones_like(s0))
    return gam, bet


class LearnedRoundLinear(nn.Module):
    """A linear whose integer weight is learned: clipping factors and rounding offsets.

    Buffers: ``weight`` float32 [out, in] (the float weight, fixed), ``wmin``/``wmax``
    [out, ng] (group min clamped <= 0, max clamped >= 0), ``e`` [out, ng, g] fixed
    offsets of the start, ``bias`` [out] or None.
    Parameters: ``clip_hi`` (and ``clip_lo`` when asymmetric) [out, ng] logits of
    γ, β; ``v`` [out, ng, g] rounding offsets, kept in [-0.5, 0.5] by :meth:`clamp_`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, start: IntWeight):
        super().__init__()
        _check_start(start, weight)
        self.spec: QuantSpec = start.spec
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.g = group_size_of(self.spec, self.in_features)
        self.qmax = (1 << self.spec.bits) - 1
        w = weight.detach().float()
        wg = to_groups(w, self.g)
        self.register_buffer("weight", w.clone())
        self.register_buffer("wmin", wg.amin(-1).clamp(max=0))
        self.register_buffer("wmax", wg.amax(-1).clamp(min=0))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        k0, s0, z0 = _start(start)
        # clipping factors that give the start's scale and zero point (clamped into (0, 1):
        # a start range wider than min/max, e.g. from a least-squares scale refit, is narrowed)
        if self.spec.sym:
            amax = torch.maximum(-self.wmin, self.wmax)
            gam = torch.where(amax > 0, s0 * ((1 << (self.spec.bits - 1)) - 1) / amax.clamp(min=1e-12), torch.ones_like(s0))
            self.clip_hi = nn.Parameter(_logit(gam))
            self.clip_lo = None
        else:
            gam, bet = _asym_factors(s0, z0, self.wmin, self.wmax, self.qmax)
            self.clip_hi = nn.Parameter(_logit(gam))
            self.clip_lo = nn.Parameter(_logit(bet))
        self.v = nn.Parameter(torch.zeros_like(wg))
        with torch.no_grad():
            s, _ = self.scale_zero()
            u = wg / s[..., None]
            # e puts u + e inside the bin of the start's code, near the float weight (_start_position)
            self.register_buffer("e", k0 + _start_position(u - k0) - u)

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [out, ng] from the clipping factors; zero is an integer (rounded with STE)."""
        gam = torch.sigmoid(self.clip_hi)
        if self.spec.sym:
            amax = torch.maximum(-self.wmin, self.wmax) * gam
            s = half_ste(amax / ((1 << (self.spec.bits - 1)) - 1))
            return s, torch.full_like(s, float(1 << (self.spec.bits - 1)))
        hi = self.wmax * gam
        lo = self.wmin * torch.sigmoid(self.clip_lo)
        s = half_ste((hi - lo) / self.qmax)
        z = round_ste(-lo / s).clamp(0, self.qmax)
        return s, z

    def clip_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, β) [out, ng] in (0, 1): the fraction of max and min the range keeps."""
        gam = torch.sigmoid(self.clip_hi)
        return gam, (gam if self.clip_lo is None else torch.sigmoid(self.clip_lo))

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, z = self.scale_zero()
        u = to_groups(self.weight, self.g) / s[..., None] + self.e + self.v
        q = (round_ste(u) + z[..., None]).clamp(0, self.qmax)
        return q, s, z

    def dequantized(self) -> torch.Tensor:
        """ŵ float32 [out, in], differentiable in the clipping logits and v."""
        q, s, z = self._codes()
        return ((q - z[..., None]) * s[..., None]).reshape(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)

    @torch.no_grad()
    def freeze(self) -> IntWeight:
        q, s, z = self._codes()
        q = q.reshape(self.out_features, -1)[:, : self.in_features]
        return pack_int_weight(q, s, z, self.spec)


class LSQLinear(nn.Module):
    """A fake-quantized linear for QAT: latent weight + learned step sizes (LSQ).

    Parameters: ``weight`` float32 [out, in], the latent weight in units of the
    start's step size of its group (buffer ``unit`` [out, ng]): one learning rate
    then means the same fraction of a quantization step in every layer, however
    different their ranges (SmolLM2's run from 0.01 to 5); frozen when LoRA is
    on.  ``log_scale`` [out, ng]: step sizes in log space (Adam's steps are
    relative); codes are round(latent / step) as in LSQ.  ``lora_a`` [r, in] /
    ``lora_b`` [out, r] when ``lora_rank`` > 0 (B starts at zero: the start is
    unchanged), added to the latent weight in weight units.  Buffers: ``zero``
    [out, ng] integer zero points, ``bias`` [out] or None.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool, lora_rank: int = 0):
        """Shapes only (values all zero/one): fill with :meth:`from_start` or a saved state."""
        super().__init__()
        self.spec: QuantSpec = spec
        self.in_features, self.out_features = in_features, out_features
        self.g = group_size_of(spec, in_features)
        self.qmax = (1 << spec.bits) - 1
        ng = num_groups(spec, in_features)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.register_buffer("unit", torch.ones(out_features, ng))
        self.log_scale = nn.Parameter(torch.zeros(out_features, ng))
        self.register_buffer("zero", torch.zeros(out_features, ng))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.lora_rank = lora_rank
        if lora_rank > 0:
            self.weight.requires_grad_(False)
            # A random, B zero: the product starts at zero, so the start is unchanged
            g = torch.Generator().manual_seed(in_features * 7919 + out_features)
            self.lora_a = nn.Parameter(torch.randn(lora_rank, in_features, generator=g) / in_features**0.5)
            self.lora_b = nn.Parameter(torch.zeros(out_features, lora_rank))
        else:
            self.lora_a = self.lora_b = None

    @classmethod
    def from_start(cls, weight: torch.Tensor, bias: torch.Tensor | None, start: IntWeight,
                   lora_rank: int = 0) -> "LSQLinear":
        """Start from a packed weight ``start`` of the float ``weight`` [out, in]."""
        _check_start(start, weight)
        m = cls(weight.shape[1], weight.shape[0], start.spec, bias is not None, lora_rank)
        k0, s0, z0 = _start(start)
        wg = to_groups(weight.detach().float(), m.g)
        # the latent weight starts inside the bin of the start's code (the first forward is
        # exactly the start), near the float weight (_start_position)
        lat = k0 + _start_position(wg / s0[..., None] - k0)  # in steps
        with torch.no_grad():
            m.weight.copy_(lat.reshape(m.out_features, -1)[:, : m.in_features])
            m.unit.copy_(s0)
            m.log_scale.copy_(torch.log(s0))
            m.zero.copy_(z0)
            if bias is not None:
                m.bias.copy_(bias.detach().float())
        return m.to(weight.device)

    def latent(self) -> torch.Tensor:
        """The latent weight [out, in] in weight units."""
        w = self.weight * self.unit.repeat_interleave(self.g, 1)[:, : self.in_features]
        if self.lora_a is not None:
            w = w + self.lora_b @ self.lora_a
        return w

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = half_ste(torch.exp(self.log_scale))
        q = (round_ste(to_groups(self.latent(), self.g) / s[..., None]) + self.zero[..., None]).clamp(0, self.qmax)
        return q, s

    def dequantized(self) -> torch.Tensor:
        q, s = self._codes()
        return ((q - self.zero[..., None]) * s[..., None]).reshape(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze(self) -> IntWeight:
        q, s = self._codes()
        q = q.reshape(self.out_features, -1)[:, : self.in_features]
        return pack_int_weight(q, s, self.zero, self.spec)


class VQTrainLinear(nn.Module):
    """A codebook linear for QAT: fixed indices, learned codewords and scales.

    Parameters: ``codebooks`` float32 [T, B, K, d] (the stored codebooks, in
    the scale-normalised units the vq method fits them in, so one learning
    rate fits every layer); ``log_gain`` [out, nsg], the log of a factor on
    each start scale (buffer ``scale0``), so scale steps are relative.
    Buffers: ``idx`` int64 [out, B, nvec] (fixed), ``bias`` [out] or None.
    The forward pass decodes exactly as :meth:`VQWeight.dequantize` does,
    codewords and scales rounded through float16 (straight-through), so the
    trained module and the frozen one compute the same weight.
    """

    lora_rank = 0

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool):
        """Shapes only (values zero/one): fill with :meth:`from_start` or a saved state."""
        super().__init__()
        if spec.fmt != "vq":
            raise LeanqError(f"VQTrainLinear trains codebook weights, not {spec.describe()}")
        self.spec: QuantSpec = spec
        self.in_features, self.out_features = in_features, out_features
        geo = geometry(spec, out_features, in_features)
        self.codebooks = nn.Parameter(torch.zeros(geo["nrt"] * geo["nct"], spec.vq_books, geo["K"], spec.vq_dim))
        self.log_gain = nn.Parameter(torch.zeros(out_features, geo["nsg"]))
        self.register_buffer("scale0", torch.ones(out_features, geo["nsg"]))
        self.register_buffer("idx", torch.zeros(out_features, spec.vq_books, geo["nvec"], dtype=torch.long))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_start(cls, start: VQWeight, bias: torch.Tensor | None) -> "VQTrainLinear":
        """Start from a packed codebook weight: the first forward is exactly ``start``."""
        m = cls(start.in_features, start.out_features, start.spec, bias is not None)
        with torch.no_grad():
            m.codebooks.copy_(start.codebooks.float())
            m.scale0.copy_(start.scales.float())
            m.idx.copy_(start.indices())
            if bias is not None:
                m.bias.copy_(bias.detach().float())
        return m.to(start.qweight.device)

    @property
    def log_scale(self) -> nn.Parameter:
        """The scale parameters (named as LSQLinear's, so one optimizer group serves both)."""
        return self.log_gain

    def dequantized(self) -> torch.Tensor:
        s = fp16_ste(self.scale0 * torch.exp(self.log_gain))
        return dequantize_parts(self.idx, fp16_ste(self.codebooks), s, self.spec, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze(self) -> VQWeight:
        s = (self.scale0 * torch.exp(self.log_gain)).half()
        return pack_vq_weight(self.idx, self.codebooks.half(), s, self.spec, self.in_features)


class fast_matmul:
    """TF32 matmuls on CUDA while training (the loss needs no more precision);
    the previous setting is restored, so evaluation stays in full float32."""

    def __init__(self, dev: torch.device):
        self.on = dev.type == "cuda"

    def __enter__(self):
        if self.on:
            self.prev = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")

    def __exit__(self, *exc):
        if self.on:
            torch.set_float32_matmul_precision(self.prev)
