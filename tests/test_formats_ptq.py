"""NF4, FP8, W8A8 and AWQ's in_scale: containers, kernels, safetensors and checkpoint round trips."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from leanq.config import MethodConfig, QuantSpec, Recipe
from leanq.errors import LeanqError
from leanq.formats.intq import bits_per_weight, expected_shapes
from leanq.formats.nf4 import NF4_LEVELS, quantize_nf4
from leanq.formats.fp8 import FP8_MAX, quantize_fp8
from leanq.formats.w8a8 import quantize_tokens, quantize_w8a8
from leanq.methods import get_method
from leanq.modules import QuantLinear

NF4 = QuantSpec(fmt="nf4", bits=4, group_size=64)
FP8 = QuantSpec(fmt="fp8", bits=8, group_size=None, sym=True)
W8A8 = QuantSpec(fmt="w8a8", bits=8, group_size=None, sym=True)


def test_nf4_levels():
    lv = NF4_LEVELS
    assert lv.shape == (16,) and torch.all(lv[1:] > lv[:-1])
    assert lv[0] == -1 and lv[15] == 1 and lv[7] == 0
    # the QLoRA table, to 4 decimals (computed here from normal quantiles, not copied)
    assert abs(float(lv[8]) - 0.0796) < 1e-4 and abs(float(lv[0 + 1]) + 0.6962) < 1e-4


def test_nf4_round_trip_and_idempotence():
    torch.manual_seed(0)
    w = torch.randn(16, 200) * 0.05  # 200 = 3 blocks of 64 + a short block of 8
    q = quantize_nf4(w, NF4)
    assert q.qweight.shape == (16, 100) and q.absmax.shape == (16, 4) and q.absmax.dtype == torch.float16
    d = q.dequantize()
    # each value is a level times its block's absmax; quantizing that again reproduces it bit for bit
    q2 = quantize_nf4(d, NF4, clip_search=False)
    assert torch.equal(q2.dequantize(), d)
    assert torch.equal(q2.qweight, q.qweight)
    rel = float((d - w).norm() / w.norm())
    assert rel < 0.12


def test_fp8_round_trip():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = quantize_fp8(w, FP8)
    assert q.weight.dtype == torch.float8_e4m3fn and q.scales.dtype == torch.float16
    assert q.weight.float().abs().max() <= FP8_MAX
    d = q.dequantize()
    # 3 mantissa bits: relative error at most 2^-4 per value in the normal range (plus fp16 scale rounding)
    big = w.abs() > w.abs().amax(1, keepdim=True) / 64
    assert torch.all(((d - w).abs() / w.abs())[big] <= 2**-4 + 1e-3)
    assert torch.equal(quantize_fp8(d, FP8).dequantize(), d)


def test_fp8_safetensors_bitwise(tmp_path):
    from safetensors.torch import load_file, save_file

    q = quantize_fp8(torch.randn(8, 64), FP8)
    save_file({"w": q.weight}, str(tmp_path / "a.safetensors"))
    back = load_file(str(tmp_path / "a.safetensors"))["w"]
    assert back.dtype == torch.float8_e4m3fn and torch.equal(back.view(torch.uint8), q.weight.view(torch.uint8))


def test_w8a8_kernel_exact_vs_reference():
    """torch._int_mm (int32 sums) equals the float64 emulation exactly, for many rows and for one
    (the padded path).  On CPU the reference is what runs (``_int_mm`` is slow there)."""
    from leanq.kernels import select
    from leanq.kernels.ptq_formats import w8a8_int_mm, w8a8_reference

    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.1
    m = QuantLinear.from_int_weight(quantize_w8a8(w, torch.rand(64) + 0.5, W8A8), torch.randn(48))
    for x in (torch.randn(3, 40, 64), torch.randn(1, 64)):
        assert select(m, x).name == "reference-w8a8"
        assert torch.equal(w8a8_int_mm(m, x), w8a8_reference(m, x))
    if torch.cuda.is_available():
        mc, xc = m.to("cuda"), torch.randn(3, 40, 64, device="cuda")
        assert select(mc, xc).name == "int-mm-w8a8"
        assert torch.equal(w8a8_int_mm(mc, xc), w8a8_reference(mc, xc))


def test_w8a8_reference_is_integer_exact():
    torch.manual_seed(1)
    x = torch.randn(5, 1536) * 10
    q, a = quantize_tokens(x, torch.ones(1536))
    wq = torch.randint(-127, 128, (8, 1536), dtype=torch.int8)
    exact = q.long() @ wq.long().t()
    assert torch.equal((q.double() @ wq.double().t()).long(), exact)
    assert q.abs().max() == 127 and torch.allclose(q.float() * a[:, None], x, atol=float(a.max()) / 2 + 1e-6)


def test_bits_per_weight_accounting():
    assert bits_per_weight(NF4, 576, 576) == pytest.approx(4 + 16 / 64)
    assert bits_per_weight(FP8, 576, 1536) == pytest.approx(8 + 16 / 1536)
    assert bits_per_weight(W8A8, 576, 1536) == pytest.approx(8 + 16 / 1536 + 16 / 576)
    plain = bits_per_weight(QuantSpec(bits=4, group_size=128), 576, 1536)
    awq = bits_per_weight(QuantSpec(bits=4, group_size=128, in_scale=True), 576, 1536)
    assert awq - plain == pytest.approx(16 / 576)
    assert expected_shapes(QuantSpec(bits=4, in_scale=True), 8, 64)["in_scale"] == ((64,), torch.float16)


def test_spec_validation_and_old_recipes():
    with pytest.raises(LeanqError):
        QuantSpec(fmt="nf4", bits=3)
    with pytest.raises(LeanqError):
        QuantSpec(fmt="fp8", bits=8, group_size=128, sym=True)
    with pytest.raises(LeanqError):
        QuantSpec(fmt="nf4", bits=4, in_scale=True)
    old = {"fmt": "int", "bits": 4, "group_size": 128, "sym": False, "dtype": "float16"}  # before in_scale existed
    assert QuantSpec.from_dict(old).in_scale is False
    assert MethodConfig.from_dict({"name": "gptq"}).smooth == 0.5


CASES = [("hqq", 3, 32), ("awq", 4, 32), ("awq+gptq", 3, 32), ("nf4", 4, 64), ("fp8", 8, None),
         ("w8a8", 8, None)]


@pytest.mark.parametrize("method,bits,group", CASES)
def test_save_load_bitwise(tmp_path, method, bits, group):
    from leanq import checkpoint
    from leanq.api import _round_kept
    from leanq.pipeline import quantize_blocks

    model = tiny_model("llama", vocab_size=96, intermediate_size=96)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    info = get_method(method)
    fields = dict(fmt=info.fmt, bits=bits, group_size=group)
    fields.update(dict(info.spec))
    spec, cfg = QuantSpec(**fields), MethodConfig(name=method, mse_clip=False)
    mods = quantize_blocks(model, spec, cfg, ids, progress=False)
    _round_kept(model, "float16")
    rec = Recipe(source="tiny", model_type="llama", method=cfg, default_spec=spec, modules=mods)
    checkpoint.save(model, None, rec, tmp_path / "ck")
    back, _, rec2 = checkpoint.load(tmp_path / "ck")
    assert rec2.modules == rec.modules
    sa, sb = model.state_dict(), back.state_dict()
    for k, v in sa.items():
        if any(k.startswith(n + ".") for n in mods):
            assert sb[k].dtype == v.dtype and torch.equal(sb[k].view(torch.uint8) if v.element_size() == 1 else sb[k],
                                                          v.view(torch.uint8) if v.element_size() == 1 else v), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_cli_flags():
    from leanq.cli import _quantize_kwargs, build_parser

    a = build_parser().parse_args(["quantize", "m", "--method", "w8a8", "--smooth", "0", "--out", "o"])
    kw = _quantize_kwargs(a)
    assert kw["smooth"] == 0.0 and kw["group_size"] == "auto"
    a = build_parser().parse_args(["quantize", "m", "--method", "nf4", "--out", "o"])
    assert get_method(a.method).default_group == 64
