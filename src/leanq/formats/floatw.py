"""Float weights kept as they are, optionally cast (FP16/BF16)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantSpec


@dataclass
class FloatWeight:
    """weight: [out, in] of dtype ``spec.dtype``."""

    weight: torch.Tensor
    spec: QuantSpec

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)
