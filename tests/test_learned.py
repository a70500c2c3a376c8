"""Learned PTQ (leanq.learned, leanq.fakequant): STE, clipping bounds, block error, checkpoints."""

import copy

import pytest
import torch

from leanq.config import MethodConfig, QuantSpec
from leanq.fakequant import LearnedRoundLinear, LSQLinear, round_ste
from leanq.formats.intq import group_params
from leanq.learned import learned_blocks
from leanq.methods import get_method
from leanq.modules import QuantLinear

from conftest import tiny_model

SPEC = QuantSpec(bits=2, group_size=32)
GPTQ = MethodConfig(name="gptq", act_order=True, mse_clip=True, refit=True)


def _weight(out=24, n=80, seed=0):  # 80 = two groups of 32 and a shorter one of 16
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed))


def test_round_ste_forward_rounds_backward_passes_through():
    x = torch.tensor([-1.7, -0.2, 0.49, 0.51, 2.5, 3.2], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    (y * torch.arange(6.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(6.0))  # d round / dx taken as 1


def test_lsq_scale_gradient_is_lsq():
    """d ŵ/ds = round(w/s) - w/s inside the range, and the clamp level (q - z) outside it (LSQ)."""
    m = LSQLinear(32, 1, QuantSpec(bits=2, group_size=32), bias=False)
    lat = torch.tensor([0.31, -0.12, 0.05, 0.2, 9.0, -5.0])
    s, z = 0.125, 1.0  # 2-bit: codes 0..3, levels (q - 1) * s
    with torch.no_grad():
        m.weight[0, :6] = lat
        m.log_scale.fill_(torch.log(torch.tensor(s)))
        m.zero.fill_(z)
    m.dequantized()[0, :6].sum().backward()
    q = torch.round(lat / s) + z
    inside = (q >= 0) & (q <= 3)
    expect = torch.where(inside, torch.round(lat / s) - lat / s, q.clamp(0, 3) - z)
    # the parameter is log s: d/dlog s = s · d/ds; the weight gradient passes straight through inside the range
    torch.testing.assert_close(m.log_scale.grad[0, 0], s * expect.sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.weight.grad[0, :6], inside.float())


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_start_is_reproduced_exactly(init):
    """Before any step, freezing gives the start's codes (and scales when inside min/max)."""
    w = _weight()
    x = torch.randn(256, 80, generator=torch.Generator().manual_seed(1))
    h = 2 * x.t() @ x / 256
    cfg = MethodConfig(name="gptq", act_order=True, mse_clip=True, refit=False)
    start = get_method(init).fn(w, h, SPEC, cfg)
    frozen = LearnedRoundLinear(w, None, start).freeze()
    assert torch.equal(frozen.codes(), start.codes()) and torch.equal(frozen.zero_points(), start.zero_points())
    # the clipping factors are solved for the start's scale and zero (an exact fit when inside min/max)
    assert (frozen.scales == start.scales).float().mean() > 0.95
    lsq = LSQLinear.from_start(w, None, start).freeze()
    for k in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(lsq, k), getattr(start, k)), k


@pytest.mark.parametrize("sym", [False, True])
def test_learned_clipping_never_widens_beyond_min_max(sym):
    """Even driven hard towards wider ranges, the clipped range stays inside [min, max]."""
    spec = QuantSpec(bits=3, group_size=32, sym=sym)
    w = _weight(seed=3)
    start = get_method("rtn").fn(w, None, spec, MethodConfig())
    m = LearnedRoundLinear(w, None, start)
    s_minmax, _ = group_params(w, spec)  # the plain min/max scales (float16-rounded)
    opt = torch.optim.Adam([m.clip_hi] + ([m.clip_lo] if m.clip_lo is not None else []), lr=0.5)
    for _ in range(200):
        s, _ = m.scale_zero()
        loss = -s.sum()  # wants the widest range it can get
        opt.zero_grad()
        loss.backward()
        opt.step()
    gam, bet = m.clip_factors()
    assert (gam <= 1).all() and (bet <= 1).all() and (gam > 0).all() and (bet > 0).all()
    s, _ = m.scale_zero()
    assert (s.detach() <= s_minmax * (1 + 1e-3)).all()
    assert (m.wmax * gam <= m.wmax).all() and (m.wmin * bet >= m.wmin).all()


def test_rounding_offsets_stay_in_half_step():
    w = _weight()
    m = LearnedRoundLinear(w, None, get_method("rtn").fn(w, None, SPEC, MethodConfig()))
    with torch.no_grad():
        m.v.add_(torch.randn_like(m.v) * 3)
    m.clamp_()
    assert m.v.abs().max() <= 0.5


@pytest.mark.parametrize("init,target", [("rtn", "same"), ("gptq", "float")])
def test_a_few_steps_lower_the_block_error(init, target):
    torch.manual_seed(0)
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    log = []
    cfg = MethodConfig(name="learned", init=init, steps=25, act_order=True, mse_clip=True, refit=True, target=target)
    learned_blocks(model, SPEC, cfg, ids, progress=False, log=log)
    assert len(log) == 2
    for b in log:
        assert b["final_mse"] < b["start_mse"] and b["kept"], b
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("_proj"))


def test_learned_checkpoint_save_load_identity(tiny_hf_folder, text_file, tmp_path):
    from leanq.api import load, quantize

    qm = quantize(str(tiny_hf_folder), method="learned", bits=3, group_size=32, calib=str(text_file), nsamples=4,
                  seqlen=32, steps=5, device="cpu", progress=False)
    out = qm.save(tmp_path / "ck")
    model, _, recipe = load(out)
    assert recipe.method.name == "learned" and recipe.method.steps == 5 and recipe.method.init == "gptq"
    assert recipe.method.target == "float"
    assert {m.method for m in recipe.modules.values()} == {"learned"}
    ids = torch.randint(0, 90, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, qm.model(ids).logits, rtol=0, atol=0)


def test_other_methods_recipes_are_unchanged():
    assert "steps" not in MethodConfig(name="gptq").to_dict()
    d = MethodConfig(name="learned", steps=3).to_dict()
    assert d["steps"] == 3 and MethodConfig.from_dict(d) == MethodConfig(name="learned", steps=3)


def test_learned_refuses_formats_it_cannot_learn():
    from leanq.errors import LeanqError

    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2))
    with pytest.raises(LeanqError, match="starts from rtn or gptq"):
        learned_blocks(copy.deepcopy(model), SPEC, MethodConfig(name="learned", init="awq"), ids, progress=False)


@pytest.mark.parametrize("sym", [False, True])
def test_frozen_weight_is_exactly_what_was_trained(sym):
    """After arbitrary updates the packed weight dequantizes to the module's own weight, bit for bit
    (a straight-through round whose value is not an exact integer once truncated codes to uint8)."""
    spec = QuantSpec(bits=3, group_size=32, sym=sym)
    w = _weight(seed=5)
    start = get_method("rtn").fn(w, None, spec, MethodConfig())
    g = torch.Generator().manual_seed(6)
    m = LearnedRoundLinear(w, None, start)
    lsq = LSQLinear.from_start(w, None, start)
    with torch.no_grad():
        m.v.add_(torch.rand(m.v.shape, generator=g) - 0.5)
        m.clip_hi.sub_(torch.rand(m.clip_hi.shape, generator=g))
        lsq.weight.add_(0.05 * torch.randn(lsq.weight.shape, generator=g))
        lsq.log_scale.add_(0.1 * torch.randn(lsq.log_scale.shape, generator=g))
    m.clamp_()
    for mod in (m, lsq):
        want = mod.dequantized().detach()
        assert torch.equal(mod.freeze().dequantize(), want)
        x = torch.randn(3, 80, generator=g)
        assert torch.equal(QuantLinear.from_int_weight(mod.freeze(), None)(x), mod(x).detach())


def test_negative_settings_are_refused():
    from leanq.errors import LeanqError
    from leanq.learned import with_defaults

    with pytest.raises(LeanqError, match="steps must be positive"):
        with_defaults(MethodConfig(name="learned", steps=-1))
    assert with_defaults(MethodConfig(name="learned")).steps == 200
