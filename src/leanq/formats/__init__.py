"""Storage formats: how quantized values are laid out in memory and on disk."""

from .intq import IntWeight, bits_per_weight, expected_shapes, group_params, pack_int_weight, quantize_codes
from .packing import pack, packed_len, unpack

__all__ = ["IntWeight", "bits_per_weight", "expected_shapes", "group_params", "pack_int_weight",
           "quantize_codes", "pack", "packed_len", "unpack"]
