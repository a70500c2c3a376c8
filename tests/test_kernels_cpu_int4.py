"""CPU packed-int4 kernel (kernels/cpu_int4.py) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from test_kernels_triton import make_layer, ref_out, rel_err

from leanq.kernels import cpu_int4, reference, select

pytestmark = pytest.mark.skipif(not cpu_int4.HAVE_OPS, reason="this torch has no _weight_int4pack_mm_for_cpu")


@pytest.fixture(autouse=True)
def _opt_in(monkeypatch):
    """The kernel is on by default (LEANQ_CPU_INT4_MAX_ROWS=0 turns it off); these tests pin it on."""
    monkeypatch.setattr(cpu_int4, "MAX_ROWS", 32)


@pytest.mark.parametrize("out_f,in_f,group,sym,bias", [
    (48, 256, 128, False, False),   # plain
    (64, 576, 128, False, True),    # SmolLM2 width: shorter last group (64), qgroup 64
    (32, 192, 64, True, False),     # sym
    (16, 128, None, False, False),  # per-channel: group = K
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(out_f, in_f, group, sym, bias, dtype):
    m = make_layer(out_f, in_f, 4, group, sym, bias=bias, seed=in_f + out_f).cpu()
    x = torch.randn(2, 3, in_f, generator=torch.Generator().manual_seed(7)).to(dtype)
    assert select(m, x).name == "cpu-int4pack"
    out = m(x)
    assert out.shape == (2, 3, out_f) and out.dtype == dtype
    ref = ref_out(m, x.reshape(-1, in_f)).reshape(2, 3, out_f)
    assert rel_err(out, ref) <= 1e-2  # the op runs bf16 activations (float32 inputs are rounded: see OP_DTYPE)


def test_qgroup_and_fallback():
    assert cpu_int4.qgroup_for(128, 576) == 64 and cpu_int4.qgroup_for(128, 4096) == 128
    assert cpu_int4.qgroup_for(24, 48) is None
    odd = make_layer(8, 48, 4, 24, False, bias=False, seed=1).cpu()  # group 24: no packed group size fits
    assert select(odd, torch.randn(1, 48)).name == "reference-int"
    m = make_layer(16, 64, 4, 32, False, bias=False, seed=2).cpu()
    assert select(m, torch.randn(cpu_int4.MAX_ROWS, 64)).name == "cpu-int4pack"
    assert select(m, torch.randn(cpu_int4.MAX_ROWS + 1, 64)).name == "reference-int"  # prefill-sized input
    three = make_layer(16, 64, 3, 32, False, bias=False, seed=2).cpu()
    assert select(three, torch.randn(1, 64)).name == "reference-int"
    narrow = make_layer(24, 64, 4, 32, False, bias=False, seed=2).cpu()  # 24 rows: not a multiple of 16
    assert select(narrow, torch.randn(1, 64)).name == "reference-int"


def test_cache_follows_weights_and_release():
    m = make_layer(16, 128, 4, 64, False, bias=False, seed=3).cpu()
    x = torch.randn(1, 128)
    y0 = m(x)
    other = make_layer(16, 128, 4, 64, False, bias=False, seed=4).cpu()
    m.load_state_dict(other.state_dict())  # in place: same storage, new version -> repacked
    assert rel_err(m(x), reference.int_dequant_linear(other, x)) <= 1e-2
    assert rel_err(m(x), y0) > 0.1
    freed = cpu_int4.release_stored(torch.nn.Sequential(m))
    assert freed > 0 and m.qweight.numel() == 0
    assert rel_err(m(x), reference.int_dequant_linear(other, x)) <= 1e-2
    assert m(x.bfloat16()).dtype == torch.bfloat16  # released layers still serve other activation dtypes


def test_runs_under_torch_compile():
    """torch.compile traces the layer (fullgraph) once an eager call has built the packed copy."""
    m = make_layer(32, 256, 4, 128, False, bias=True, seed=5).cpu()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(8))
    eager = m(x)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), eager)
