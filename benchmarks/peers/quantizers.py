"""One function per peer library: quantize one linear weight with the library, give back
what it would compute with (its own dequantization) and what it stores.

Each ``fn(weight: float32 [out, in]) -> LayerResult``. The runner writes ``deq`` back into
the same float model (fake-quant scoring: every library's weights evaluated by the same
leanq perplexity code in the same float model). Imports of the libraries are inside the
functions so that one missing library fails only its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bpw import dtype_bits, layer_bits, pick_group, side_bits


@dataclass
class LayerResult:
    deq: torch.Tensor  # float32 [out, in]: the library's dequantized weight
    bits: float  # stored bits of this layer: codes + scales + zeros (see bpw.py)
    group: int | None  # group size used along the input dim (None: per channel)


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * dtype_bits(t.dtype)


# ---- torchao ---------------------------------------------------------------------------------

def torchao_int8(w: torch.Tensor) -> LayerResult:
    """torchao Int8WeightOnlyConfig (v2, per-row symmetric int8), applied with quantize_."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    quantize_(lin, Int8WeightOnlyConfig())
    qw = lin.weight
    deq = qw.dequantize().float()
    side = [side_bits(qw.scale.numel(), qw.scale.dtype, model_dtype_float=True)]
    for name in getattr(qw, "optional_tensor_data_names", []) or []:
        t = getattr(qw, name, None)
        if isinstance(t, torch.Tensor):
            side.append(_tensor_bits(t))
    return LayerResult(deq, layer_bits(w.numel(), dtype_bits(qw.qdata.dtype), side), None)


def torchao_int4(w: torch.Tensor, group: int = 128) -> LayerResult:
    """torchao int4 weight-only (Int4WeightOnlyConfig's tinygemm scheme: asymmetric, bf16 scale and
    bf16 zero in the float domain), through torchao's own qparam/quantize/dequantize primitives.

    Int4WeightOnlyConfig's packed tensors (tile-packed / plain / preshuffled) are built only on
    CUDA/XPU/NPU (they call CUDA-only packing or mslk kernels), so on this CPU we call the same
    primitives the tile-packed path calls, minus the CUDA packing. Like that path, the weight is
    taken to bf16 first. torchao skips (leaves float) a weight whose in_features the group does not
    divide; we use g64 there instead (576 = 4.5 x 128).
    """
    from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                        _dequantize_affine_tinygemm, _quantize_affine_tinygemm)

    g = pick_group(w.shape[1], group)
    hp = w.to(torch.bfloat16)
    block = [1, g]
    scale, zero = _choose_qparams_affine_tinygemm(hp, mapping_type=MappingType.ASYMMETRIC, block_size=tuple(block),
                                                  target_dtype=torch.int32, quant_min=0, quant_max=15,
                                                  scale_dtype=hp.dtype, zero_point_dtype=hp.dtype)
    q = _quantize_affine_tinygemm(hp, block, scale, zero, torch.int32, quant_min=0, quant_max=15)
    deq = _dequantize_affine_tinygemm(q, block, scale, zero, torch.int32, quant_min=0, quant_max=15,
                                      output_dtype=torch.bfloat16).float()
    return LayerResult(deq, layer_bits(w.numel(), 4, [_tensor_bits(scale), _tensor_bits(zero)]), g)


# ---- HQQ ---------------------------------------------------------------------------------------

def hqq(w: torch.Tensor, nbits: int, group: int) -> LayerResult:
    """HQQLinear with hqq's BaseQuantizeConfig defaults (axis=1, optimize=True, fp16 meta).

    HQQ groups the *flattened* weight in runs of ``group`` (axis=1), so a group may straddle
    two rows of a 576-wide layer: that is the library's own behaviour, kept as is.
    """
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group)
    hl = HQQLinear(lin, cfg, compute_dtype=torch.float16, device="cpu", initialize=True, del_orig=True)
    deq = hl.dequantize().float().reshape(w.shape)
    m = hl.meta
    side = [_tensor_bits(m[k]) for k in ("scale", "zero") if isinstance(m.get(k), torch.Tensor)]
    code_bits = _tensor_bits(hl.W_q) / w.numel()  # real packed storage (3-bit: 10 codes per int32)
    return LayerResult(deq, layer_bits(w.numel(), code_bits, side), group)


# ---- optimum-quanto ----------------------------------------------------------------------------

def quanto(w: torch.Tensor, qtype_name: str) -> LayerResult:
    """optimum.quanto quantize() + freeze() on the linear, library defaults (int4/int2: group 128,
    float shift; int8: per-channel). Dequantized with the weight tensor's own dequantize()."""
    import optimum.quanto as oq

    lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    lin[0].weight.data.copy_(w)
    oq.quantize(lin, weights=getattr(oq, qtype_name))
    oq.freeze(lin)
    qw = lin[0].weight
    deq = qw.dequantize().float().reshape(w.shape)
    bits = qw.qtype.bits
    data = qw._data
    # int4/int2 codes are packed into uint8 (PackedTensor); count the packed bytes as stored
    raw = getattr(data, "_data", data)
    code_bits = _tensor_bits(raw) / w.numel()
    side = [side_bits(qw._scale.numel(), qw._scale.dtype, model_dtype_float=True)]
    shift = getattr(qw, "_shift", None)
    if isinstance(shift, torch.Tensor):
        side.append(side_bits(shift.numel(), shift.dtype, model_dtype_float=shift.is_floating_point()))
    group = getattr(qw, "_group_size", None)
    if bits == 8:
        group = None
    return LayerResult(deq, layer_bits(w.numel(), code_bits, side), group)


# ---- bitsandbytes ------------------------------------------------------------------------------

def bnb_nf4(w: torch.Tensor, block: int = 64) -> LayerResult:
    """bitsandbytes quantize_4bit(quant_type='nf4', blocksize=64) on the CPU backend, no double
    quantization (Linear4bit's default): fp32 absmax per block of 64."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.contiguous(), blocksize=block, quant_type="nf4")
    deq = F.dequantize_4bit(packed, state).float().reshape(w.shape)
    side = [_tensor_bits(state.absmax)]
    return LayerResult(deq, layer_bits(w.numel(), _tensor_bits(packed) / w.numel(), side), block)


LAYER_PEERS = {
    "torchao-int8": lambda w: torchao_int8(w),
    "torchao-int4-g128": lambda w: torchao_int4(w, 128),
    "hqq-4-g128": lambda w: hqq(w, 4, 128),
    "hqq-3-g128": lambda w: hqq(w, 3, 128),
    "hqq-2-g64": lambda w: hqq(w, 2, 64),
    "hqq-8-g128": lambda w: hqq(w, 8, 128),
    "quanto-int8": lambda w: quanto(w, "qint8"),
    "quanto-int4": lambda w: quanto(w, "qint4"),
    "quanto-int2": lambda w: quanto(w, "qint2"),
    "bnb-nf4-b64": lambda w: bnb_nf4(w, 64),
}
