"""Triton int kernels against the pure-torch reference (kernels/reference.py).

Runs on a GPU when there is one, else on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set below before triton is imported); shapes stay tiny so
the interpreter finishes quickly.  Skips when triton is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from leanq.config import QuantSpec  # noqa: E402
from leanq.formats.intq import group_params, pack_int_weight, quantize_codes  # noqa: E402
from leanq.kernels import reference  # noqa: E402
from leanq.kernels import triton_int as ti  # noqa: E402
from leanq.modules import QuantLinear  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter computes in numpy: fp32 activations keep it exact and quick;
# on a GPU the kernels run in bf16 as in use
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32


def make_layer(out_f: int, in_f: int, bits: int, group: int | None, sym: bool, bias: bool, seed: int) -> QuantLinear:
    """A QuantLinear with random codes, scales and zeros (every code value reachable)."""
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, group_size=group, sym=sym)
    w = torch.randn(out_f, in_f, generator=g)
    s, z = group_params(w, spec)
    codes = _codes(w, s, z, spec, group or in_f)
    iw = pack_int_weight(codes, s, z, spec)
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_int_weight(iw, b).to(DEV)


def _codes(w, s, z, spec, g):
    cols = []
    for j, start in enumerate(range(0, w.shape[1], g)):
        cols.append(quantize_codes(w[:, start:start + g], s[:, j], z[:, j], spec))
    return torch.cat(cols, 1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    out, ref = out.float().cpu(), ref.float().cpu()  # kernels' outputs may be on the GPU, the oracle on the CPU
    return ((out - ref).norm() / ref.norm()).item()


def ref_out(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    # the oracle in float64 on the CPU: dequantize, then a plain matmul
    w = m.int_weight().dequantize(torch.float64).cpu()
    out = x.double().cpu() @ w.t()
    if m.bias is not None:
        out = out + m.bias.double().cpu()
    return out


CASES = [  # bits, group, sym, in_features (in_features % group != 0 gives a shorter last group)
    (4, 32, False, 96), (4, 32, True, 80),
    (3, 32, False, 96), (3, 32, True, 72 + 8),
    (2, 32, False, 64), (2, 32, True, 88),
    (8, 32, False, 96), (8, 32, True, 40),
    (4, None, False, 64), (5, 32, False, 64), (6, 32, True, 64), (7, 32, False, 64),
]


@pytest.mark.parametrize("bits,group,sym,in_f", CASES)
def test_gemv_matches_reference(bits, group, sym, in_f):
    m = make_layer(24, in_f, bits, group, sym, bias=bits == 4, seed=bits * 100 + in_f)
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(1)).to(DEV, DTYPE)
    ref = ref_out(m, x)
    bias = m.bias.to(DTYPE) if m.bias is not None else None
    # BM: rows of x per program; 3 rows leave the last program partly empty
    for bm in (1, 2, 4) if (bits, sym) == (4, False) else (4,):
        out = ti.run_gemv(x, ti.packed_for(m), bias, cfg=dict(BM=bm, BN=16, BK=64, num_warps=4, num_stages=1))
        assert out.shape == (3, 24) and out.dtype == DTYPE
        assert rel_err(out, ref) <= 1e-2, bm
    # and the dispatch-table reference agrees with the float64 oracle
    assert rel_err(reference.int_dequant_linear(m, x.float()), ref) <= 1e-4


@pytest.mark.parametrize("bits,group,sym,in_f", [c for c in CASES if c[0] in (2, 3, 4, 8)])
def test_dot_matches_reference(bits, group, sym, in_f):
    m = make_layer(40, in_f, bits, group, sym, bias=sym, seed=bits * 7 + in_f)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(2)).to(DEV, DTYPE)
    out = ti.run_dot(x, ti.packed_for(m), m.bias.to(DTYPE) if m.bias is not None else None,
                     cfg=dict(BM=16, BN=16, BK=64, num_warps=4, num_stages=1, GROUP_M=2))
    assert out.shape == (5, 40)
    assert rel_err(out, ref_out(m, x)) <= 1e-2


@pytest.mark.parametrize("bits,sym", [(4, False), (3, True)])
def test_dequantize_kernel_exact(bits, sym):
    m = make_layer(20, 72, bits, 32, sym, bias=False, seed=3)
    w = ti.dequantize(ti.packed_for(m), torch.float32, BN=8, BK=64)
    assert torch.equal(w.cpu(), m.int_weight().dequantize(torch.float32).cpu())


def test_repack_cache_follows_weights():
    m = make_layer(16, 64, 4, 32, False, bias=False, seed=4)
    pk = ti.packed_for(m)
    assert ti.packed_for(m) is pk  # cached
    other = make_layer(16, 64, 4, 32, False, bias=False, seed=5)
    m.load_state_dict(other.state_dict())  # in-place copy: same storage, new version
    assert ti.packed_for(m) is not pk
    w = ti.dequantize(ti.packed_for(m), torch.float32, BN=8, BK=64)
    assert torch.equal(w.cpu(), other.int_weight().dequantize(torch.float32).cpu())


def test_supports_and_dispatch():
    from leanq.kernels import select

    m = make_layer(16, 64, 4, 32, False, bias=False, seed=6)
    one = torch.empty(1, 64, device="meta", dtype=torch.float16)
    many = torch.empty(3, 7, 64, device="meta", dtype=torch.float16)
    assert ti._supports_gemv(m, one) and not ti._supports_dot(m, one)
    assert ti._supports_dot(m, many) and not ti._supports_gemv(m, many)
    odd = make_layer(8, 48, 4, 24, False, bias=False, seed=7)  # group 24: no 32-code sub-group
    assert not ti._supports_gemv(odd, torch.empty(1, 48, device="meta"))
    if DEV == "cuda":
        x = torch.randn(1, 64, device="cuda", dtype=torch.float16)
        from leanq.kernels import cuda_int

        # the highest-priority GPU kernel that takes it: the CUDA GEMV where NVRTC works, else a Triton one
        name = select(m, x).name
        assert name == "cuda-int-gemv" if cuda_int.available() else name.startswith("triton-")
    else:
        # on CPUs PyTorch's packed int4 op (kernels/cpu_int4.py) where it applies, else the reference
        from leanq.kernels import cpu_int4

        want = "cpu-int4pack" if cpu_int4.HAVE_OPS and cpu_int4.MAX_ROWS >= 1 else "reference-int"
        assert select(m, torch.randn(1, 64)).name == want
        assert select(make_layer(8, 48, 4, 24, False, bias=False, seed=7), torch.randn(1, 48)).name == "reference-int"


def test_compile_op_matches_direct_call():
    """The custom op that torch.compile sees runs the same kernels (and has a shape-only fake)."""
    m = make_layer(16, 64, 4, 32, True, bias=False, seed=8)
    pk = ti.packed_for(m)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)).to(DEV, DTYPE)
    args = (pk["planes"], pk["scales"], pk["zeros"], None, pk["bits"], pk["sym"], pk["K"], pk["N"], pk["Kw"],
            pk["group"], pk["gt"])
    y = torch.ops.leanq.triton_int_linear(x, *args, "gemv")
    assert torch.equal(y, ti.run_gemv(x, pk, None))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.leanq.triton_int_linear(torch.empty(5, 64, dtype=DTYPE, device=DEV), *args, "dot")
    assert fake.shape == (5, 16)


@pytest.mark.skipif(DEV != "cuda", reason="release_stored acts on CUDA layers only")
def test_release_stored_keeps_outputs():
    m = make_layer(16, 64, 4, 32, False, bias=True, seed=9)
    x = torch.randn(1, 64, device="cuda", dtype=DTYPE)
    from leanq.kernels import select

    before = m(x)  # batch 1 runs triton_kn's GEMV, which repacks from the stored codes
    freed = ti.release_stored(torch.nn.Sequential(m))
    assert freed > 0 and m.qweight.numel() == 0
    # afterwards only triton_int's own layout is left, so its kernels serve the layer (other rounding order)
    assert not select(m, x).name.startswith("triton-kn")
    assert rel_err(m(x), before) <= 1e-2
