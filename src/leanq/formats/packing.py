"""Bit packing: ``bits``-bit unsigned codes <-> a dense little-endian byte stream.

Eight codes of ``b`` bits fill exactly ``b`` bytes, so any width from 1 to 8
packs without waste when the packed dimension is a multiple of 8 (callers pad).
Code ``i`` of a run of eight occupies bits ``[b*i, b*i+b)`` of the 64-bit
little-endian word formed by those ``b`` bytes.
"""

from __future__ import annotations

import torch


def packed_len(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits (n padded up to a multiple of 8)."""
    return (n + 7) // 8 * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``codes`` (uint8, values < 2**bits).

    codes: uint8 [..., n]  ->  uint8 [..., packed_len(n, bits)]
    Missing codes up to a multiple of 8 are padded with zeros.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.dtype != torch.uint8:
        raise ValueError("codes must be uint8")
    n = codes.shape[-1]
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    lead = codes.shape[:-1]
    c = codes.reshape(*lead, -1, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)  # [..., n/8], at most 64 bits; bit ops below are sign-safe
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [..., packed_len(n, bits)] -> uint8 [..., n]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    lead = packed.shape[:-1]
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(f"packed length {packed.shape[-1]} does not hold {n} codes of {bits} bits")
    if bits in (1, 2, 4, 8):
        # widths that divide a byte: shift uint8 lanes directly, no 64-bit words
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, -1)[..., :n]
    wide = torch.int32 if bits <= 3 else torch.int64  # 8 codes of <= 3 bits fit 24 bits
    p = packed.reshape(*lead, -1, bits).to(wide)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=wide) * 8
    word = (p << byte_shifts).sum(-1, dtype=wide)
    shifts = torch.arange(8, device=packed.device, dtype=wide) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, -1)[..., :n]
