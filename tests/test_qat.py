"""QAT (leanq.qat): distillation lowers the KL, resume continues exactly, checkpoints load back."""

import copy

import pytest
import torch

from leanq.config import MethodConfig, QuantSpec
from leanq.errors import LeanqError
from leanq.qat import kl_loss, lr_at, qat_quantize

from conftest import tiny_model

SPEC = QuantSpec(bits=2, group_size=32)
CFG = MethodConfig(name="qat", seqlen=32, steps=6, lr=1e-3, scale_lr=1e-2, train_batch=2, act_order=True,
                   mse_clip=True, refit=True)


def _data():
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(2))
    text = torch.randint(0, 96, (600,), generator=torch.Generator().manual_seed(3))
    return calib, text


def _codes(model):
    return {n: (m.qweight.clone(), m.scales.clone(), m.zeros.clone()) for n, m in model.named_modules()
            if hasattr(m, "qweight")}


def _kl(model, teacher, ids):
    with torch.no_grad():
        return kl_loss(model(ids).logits, teacher(ids).logits).item()


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert abs(kl_loss(a, a).item()) < 1e-6
    assert kl_loss(a, a + torch.randn_like(a)).item() > 0


def test_lr_schedule_warms_up_and_decays_to_zero():
    lrs = [lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] < lrs[4] <= 1.0 and lrs[-1] < 0.01 and max(lrs) <= 1.0


def _start_and_trained(spec: QuantSpec, init: str, lr: float, scale_lr: float):
    """(teacher, start, trained, held-out ids, training log): the start method alone (one step at a
    vanishing rate) and 30 QAT steps from it, on a teacher with outputs peaked enough for quantization to
    matter."""
    calib, text = _data()
    teacher = tiny_model("llama", seed=1, initializer_range=0.1)
    held = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(9))
    start = copy.deepcopy(teacher)
    qat_quantize(start, spec, MethodConfig(name="qat", init=init, seqlen=32, steps=1, lr=1e-12, scale_lr=1e-12,
                                           train_batch=2), calib, text, progress=False)
    trained = copy.deepcopy(teacher)
    log = {}
    qat_quantize(trained, spec, MethodConfig(name="qat", init=init, seqlen=32, steps=30, lr=lr, scale_lr=scale_lr,
                                             train_batch=4), calib, text, progress=False, log=log)
    return teacher, start, trained, held, log


def test_qat_lowers_the_distillation_loss():
    """Trained from an RTN start, the frozen model is closer to the float model on held-out ids."""
    teacher, start, trained, held, log = _start_and_trained(SPEC, "rtn", 1e-3, 1e-2)
    assert _kl(trained, teacher, held) < 0.85 * _kl(start, teacher, held)  # measured: 0.337 -> 0.249
    assert sum(log["losses"][-5:]) < sum(log["losses"][:5])


def test_resume_after_interruption_continues_from_the_saved_step(tmp_path):
    calib, text = _data()
    base = tiny_model("llama", seed=1)
    full = copy.deepcopy(base)
    log_full = {}
    qat_quantize(full, SPEC, CFG, calib, text, progress=False, state=tmp_path / "a.pt", state_every=3, log=log_full)

    seen = []

    def interrupt(step, loss):
        seen.append(step)
        if step == 4:  # the state on disk is the one of step 3
            raise KeyboardInterrupt

    part = copy.deepcopy(base)
    with pytest.raises(KeyboardInterrupt):
        qat_quantize(part, SPEC, CFG, calib, text, progress=False, state=tmp_path / "b.pt", state_every=3,
                     on_step=interrupt)
    assert seen == [1, 2, 3, 4]
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["step"] == 3

    resumed_steps = []
    again = copy.deepcopy(base)
    log = {}
    qat_quantize(again, SPEC, CFG, calib, text, progress=False, state=tmp_path / "b.pt", state_every=3,
                 resume=True, log=log, on_step=lambda s, l: resumed_steps.append(s))
    assert resumed_steps == [4, 5, 6]  # continued from the saved step
    assert log["losses"] == log_full["losses"]
    a, b = _codes(full), _codes(again)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        for x, y in zip(a[n], b[n]):
            assert torch.equal(x, y), n


def test_resume_refuses_a_state_of_other_settings(tmp_path):
    calib, text = _data()
    base = tiny_model("llama", seed=1)
    qat_quantize(copy.deepcopy(base), SPEC, CFG, calib, text, progress=False, state=tmp_path / "s.pt", state_every=3)
    with pytest.raises(LeanqError, match="other settings"):
        qat_quantize(copy.deepcopy(base), QuantSpec(bits=3, group_size=32), CFG, calib, text, progress=False,
                     state=tmp_path / "s.pt", resume=True)


def test_lora_trains_adapters_and_freezes_into_the_same_format():
    calib, text = _data()
    model = tiny_model("llama", seed=1)
    cfg = MethodConfig(name="qat", init="rtn", seqlen=32, steps=3, lr=1e-2, train_batch=2, lora_rank=4)
    rec = qat_quantize(model, SPEC, cfg, calib, text, progress=False)
    assert {r.method for r in rec.values()} == {"qat"}
    assert len(_codes(model)) == 14


def test_qat_checkpoint_save_load_identity(tiny_hf_folder, text_file, tmp_path):
    from leanq.api import load, quantize

    qm = quantize(str(tiny_hf_folder), method="qat", bits=3, group_size=32, calib=str(text_file), nsamples=4,
                  seqlen=32, steps=3, device="cpu", progress=False)
    model, _, recipe = load(qm.save(tmp_path / "ck"))
    assert {m.method for m in recipe.modules.values()} == {"qat"}
    ids = torch.randint(0, 90, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, qm.model(ids).logits, rtol=0, atol=0)


def test_qat_cli_state_file_and_resume(tiny_hf_folder, text_file, tmp_path):
    from leanq.api import load
    from leanq.cli import main

    out = tmp_path / "ck"
    rc = main(["quantize", str(tiny_hf_folder), "--method", "qat", "--bits", "2", "--group-size", "32",
               "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--steps", "4", "--state-every", "2",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert (tmp_path / "ck.qat-state.pt").exists()
    model, _, recipe = load(out)
    assert recipe.method.name == "qat" and recipe.method.steps == 4 and recipe.method.init == "gptq"
    # resuming a finished run trains no further and writes the same weights
    out2 = tmp_path / "ck2"
    rc = main(["quantize", str(tiny_hf_folder), "--method", "qat", "--bits", "2", "--group-size", "32",
               "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--steps", "4",
               "--state", str(tmp_path / "ck.qat-state.pt"), "--resume", "--device", "cpu", "--out", str(out2)])
    assert rc == 0
    assert (out / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()
    ids = torch.randint(0, 90, (1, 20), generator=torch.Generator().manual_seed(0))
    again, _, _ = load(out2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)


# --- QAT from a codebook start (init="vq"): indices fixed, codewords and scales trained ---

VQ_SPEC = QuantSpec(fmt="vq", bits=4, group_size=None, vq_dim=2, vq_books=1, vq_rows=None, vq_cols=32)


def _vq_parts(model):
    return {n: (m.qweight.clone(), m.codebooks.clone(), m.scales.clone()) for n, m in model.named_modules()
            if hasattr(m, "codebooks") and hasattr(m, "qweight")}


def test_vq_train_linear_starts_exactly_at_its_start_and_freezes_to_what_it_computes():
    from leanq.fakequant import VQTrainLinear
    from leanq.formats.vq import geometry, pack_vq_weight, vq_shapes

    g = torch.Generator().manual_seed(0)
    shp = vq_shapes(VQ_SPEC, 24, 70)  # 70 inputs: the last vector is padded, three column tiles
    nvec = geometry(VQ_SPEC, 24, 70)["nvec"]
    idx = torch.randint(0, 16, (24, 1, nvec), generator=g)
    start = pack_vq_weight(idx, torch.randn(shp["codebooks"][0], generator=g), torch.rand(24, 1, generator=g) + 0.5,
                           VQ_SPEC, 70)
    m = VQTrainLinear.from_start(start, torch.randn(24, generator=g))
    assert torch.equal(m.dequantized().detach(), start.dequantize())
    x = torch.randn(5, 70, generator=g)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):  # move codewords and scales
        loss = (m(x) - x[:, :24]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(m.codebooks.detach().half(), start.codebooks)
    frozen = m.freeze()
    assert torch.equal(frozen.qweight, start.qweight)  # indices never move
    assert torch.equal(frozen.dequantize(), m.dequantized().detach())  # fp16 rounding already in the forward


def test_qat_from_vq_lowers_the_loss_and_keeps_the_indices():
    """Trained from the vq start, codewords and scales move, indices do not, and the frozen model is closer
    to the float model on held-out ids."""
    teacher, start, trained, held, log = _start_and_trained(VQ_SPEC, "vq", 1e-2, 1e-2)
    a, b = _vq_parts(start), _vq_parts(trained)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        assert torch.equal(a[n][0], b[n][0]), n  # same indices
        assert not torch.equal(a[n][1], b[n][1]), n  # codewords trained
    assert _kl(trained, teacher, held) < 0.95 * _kl(start, teacher, held)  # measured: 0.239 -> 0.207
    assert sum(log["losses"][-5:]) < sum(log["losses"][:5])


def test_qat_from_vq_checkpoint_loads_back(tiny_hf_folder, text_file, tmp_path):
    from leanq.api import load, quantize

    qm = quantize(str(tiny_hf_folder), method="qat", init="vq", steps=3, bits=2, calib=str(text_file), nsamples=4,
                  seqlen=32, device="cpu", progress=False, vq="dim=2,index=4,cols=32")
    assert {r.method for r in qm.recipe.modules.values()} == {"qat"}
    assert qm.recipe.method.init == "vq" and qm.recipe.default_spec.fmt == "vq"
    model, _, recipe = load(qm.save(tmp_path / "ck"))
    assert recipe.default_spec == qm.recipe.default_spec
    ids = torch.randint(0, 90, (2, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, qm.model(ids).logits, rtol=0, atol=0)


def test_qat_from_vq_is_deterministic(tiny_hf_folder, text_file, tmp_path):
    from leanq.api import quantize

    kw = dict(method="qat", init="vq", bits=2, calib=str(text_file), nsamples=4, seqlen=32, device="cpu",
              progress=False, vq="dim=2,index=4,cols=32", steps=3)
    p1 = quantize(str(tiny_hf_folder), **kw).save(tmp_path / "a")
    p2 = quantize(str(tiny_hf_folder), **kw).save(tmp_path / "b")
    assert (p1 / "model.safetensors").read_bytes() == (p2 / "model.safetensors").read_bytes()


def test_vq_weights_need_a_vq_start():
    calib, text = _data()
    with pytest.raises(LeanqError, match="codebook"):
        qat_quantize(tiny_model("llama", seed=1), VQ_SPEC, MethodConfig(name="qat", init="gptq", seqlen=32, steps=1),
                     calib, text, progress=False)



def test_qat_from_vq_resumes_to_the_same_bytes(tmp_path):
    calib, text = _data()
    base = tiny_model("llama", seed=1)
    cfg = MethodConfig(name="qat", init="vq", seqlen=32, steps=4, lr=1e-2, scale_lr=1e-2, train_batch=2)
    full = copy.deepcopy(base)
    qat_quantize(full, VQ_SPEC, cfg, calib, text, progress=False, state=tmp_path / "a.pt", state_every=2)

    def interrupt(step, loss):
        if step == 3:  # the state on disk is the one of step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qat_quantize(copy.deepcopy(base), VQ_SPEC, cfg, calib, text, progress=False, state=tmp_path / "b.pt",
                     state_every=2, on_step=interrupt)
    again = copy.deepcopy(base)
    steps = []
    qat_quantize(again, VQ_SPEC, cfg, calib, text, progress=False, state=tmp_path / "b.pt", state_every=2,
                 resume=True, on_step=lambda s, l: steps.append(s))
    assert steps == [3, 4]
    a, b = _vq_parts(full), _vq_parts(again)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        for x, y in zip(a[n], b[n]):
            assert torch.equal(x, y), n
