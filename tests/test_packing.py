"""Exact round trips of the bit packing and the integer container, for every width and group size."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leanq.config import QuantSpec
from leanq.formats import pack, packed_len, unpack
from leanq.formats.intq import bits_per_weight, expected_shapes, group_params, pack_int_weight
from leanq.methods.rtn import rtn_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_len(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_is_dense():
    # 8 codes of 3 bits fill exactly 3 bytes, little-endian
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert pack(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]]


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError):
        unpack(torch.zeros(1, 5, dtype=torch.uint8), 4, 16)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([None, 8, 16, 32, 64, 128]),
       sym=st.booleans(), out=st.integers(1, 9), n=st.sampled_from([8, 24, 40, 72, 136, 200]),
       seed=st.integers(0, 2**31 - 1))
def test_int_weight_round_trip(bits, group, sym, out, n, seed):
    spec = QuantSpec(bits=bits, group_size=group, sym=sym)
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(seed))
    codes, scales, zeros = rtn_codes(w, spec)
    iw = pack_int_weight(codes, scales, zeros, spec)
    for name, (shape, dtype) in expected_shapes(spec, out, n).items():
        t = iw.tensors()[name]
        assert tuple(t.shape) == shape and t.dtype == dtype, name
    assert torch.equal(iw.codes(), codes.to(torch.uint8))
    # every code unpacked and dequantized equals the quantizer's own reconstruction
    g = n if group is None else group
    s = scales.half().float().repeat_interleave(g, 1)[:, :n]
    z = zeros.repeat_interleave(g, 1)[:, :n]
    assert torch.equal(iw.dequantize(), (codes - z) * s)
    # stored bytes are what bits_per_weight claims
    assert iw.nbytes() * 8 == pytest.approx(bits_per_weight(spec, out, n) * out * n)


def test_short_last_group_is_counted():
    spec = QuantSpec(bits=4, group_size=128)
    # 576 = 4 x 128 + 64: five groups per row, the last one short
    assert group_params(torch.randn(3, 576), spec)[0].shape == (3, 5)
    bpw = bits_per_weight(spec, 576, 576)
    # 4 bits of code + 5 16-bit scales + 5 4-bit zeros padded to a whole run of 8 (32 bits) per row
    assert bpw == pytest.approx(4 + (5 * 16 + 32) / 576, rel=1e-6)


def test_zero_is_exact():
    w = torch.randn(4, 64)
    w[:, ::3] = 0
    for sym in (False, True):
        spec = QuantSpec(bits=3, group_size=32, sym=sym)
        codes, scales, zeros = rtn_codes(w, spec)
        iw = pack_int_weight(codes, scales, zeros, spec)
        assert torch.all(iw.dequantize()[:, ::3] == 0)
