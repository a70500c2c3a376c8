"""Registry entries of the trained methods, which work on whole blocks or the whole model.

``learned`` (:mod:`leanq.learned`) and ``qat`` (:mod:`leanq.qat`) cannot be a
per-matrix function of (W, H): they optimise a block's or the model's output.
They are registered here so that they are listed and validated like every
method; :func:`leanq.api.quantize` runs their own drivers.
"""

from __future__ import annotations

from ..errors import LeanqError
from . import register


def _block_level(name: str):
    def fn(w, h, spec, cfg):
        raise LeanqError(f"method {name!r} optimises whole blocks, not one matrix: use leanq.api.quantize "
                         f"(or leanq.{'learned.learned_blocks' if name == 'learned' else 'qat.qat_quantize'})")
    return fn


register("learned", needs_data=True,
         help="learned PTQ: per block, learn clipping + rounding offsets from a GPTQ start against the float "
              "block's outputs (--steps per block)")(_block_level("learned"))
register("qat", needs_data=True,
         help="quantization-aware training: LSQ fake-quant linears from a GPTQ start, KL distillation from the "
              "float model on the calibration text (--steps in all; --resume)")(_block_level("qat"))
