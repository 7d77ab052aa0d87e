"""Quantization-aware fine-tuning: resume exactness, BN folding, staged order, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from hawq import BitPlan, LayerSpec, evaluate
from hawq.base.errors import ConfigError, NumericalError
from hawq.post.finetune import (FinetuneConfig, augment_cifar, conv_bn_pairs, default_blocks,
                           finetune, fold_bn_, lr_at, staged_order)
from hawq.modules.qmodules import QuantMixin
from hawq.modules.surgery import quantizable_layers


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv2d(8, 8, 3, padding=1, groups=2))
        self.block.add_module("bn", nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.block.bn(self.block.conv(x))) + x
        return self.fc(x.mean((2, 3)))


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    m = TinyNet()
    x, _ = _data()
    m.train()
    with torch.no_grad():  # non-trivial BN statistics
        for _ in range(3):
            m(x * 2 + 0.5)
    return m.eval()


PLAN = BitPlan({"conv1": LayerSpec(4, 8), "block.conv": LayerSpec(3, 8), "fc": LayerSpec(8, 8)})


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("staged,stop,learn", [(False, 1, False), (True, 1, False),
                                               (False, 2, False), (False, 2, True),
                                               (True, 1, True)])
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, staged, stop, learn):
    # stop=1: interrupted before BN is folded; stop=2: after (the preconditioner's scales
    # must come back from the checkpoint); learn: LSQ step sizes are trained and restored
    cfg = FinetuneConfig(epochs=3, lr=0.05, batch_size=16, bn_fold_at=0.5, staged=staged,
                         distill=0.5, calib_samples=32, seed=3, learn_steps=learn)
    data = _data()
    full = _model()
    r_full = finetune(full, PLAN, data, cfg, progress=False, checkpoint_dir=tmp_path / "a")
    part = _model()
    finetune(part, PLAN, data, cfg, progress=False, checkpoint_dir=tmp_path / "b",
             stop_after_epoch=stop)
    resumed = _model()  # a fresh process: float model, state from the checkpoint only
    r_res = finetune(resumed, PLAN, data, cfg, progress=False, checkpoint_dir=tmp_path / "b",
                     resume=True)
    assert r_res.resumed_from_epoch == stop
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in r_full.history] == [h["loss"] for h in r_res.history]
    x, _ = data
    assert torch.equal(full(x), resumed(x))
    # and the run really trained: weights moved
    fresh = _model()
    assert not torch.equal(fresh.fc.weight, full.fc.weight)
    assert any(k.endswith("w_step") for k in a) == learn


def test_learned_steps_train_fold_and_export_exactly(tmp_path):
    """learn_steps: the step sizes move during QAT, folding scales them with their channel
    (output unchanged), and the exported integer model reproduces the trained model."""
    from hawq.post.export import load_quantized, save_quantized

    x, y = _data(192)
    m = _model()
    cfg = FinetuneConfig(epochs=4, lr=0.05, batch_size=32, augment="none", calib_samples=64,
                         learn_steps=True, bn_fold_at=None)
    finetune(m, PLAN, (x, y), cfg, progress=False)
    mods = quantizable_layers(m)
    q = mods["block.conv"]
    assert q.w_step.shape == (8,) and q.act.learn and q.act.step.requires_grad
    start = _model()
    from hawq.maths.plan import QuantConfig
    from hawq.modules.surgery import quantize_
    quantize_(start, PLAN, QuantConfig(learn_steps=True))
    assert not torch.allclose(start.block.conv.w_step, q.w_step)  # trained, not the init
    # the weight's integer grid uses the learned step: |w_q / step| are integers in range
    wq = q.quantized_weight().detach()
    ints = wq / q.w_step.detach().view(-1, 1, 1, 1)
    torch.testing.assert_close(ints, ints.round(), atol=1e-4, rtol=0)
    assert ints.round().min() >= -4 and ints.round().max() <= 3
    ref = m(x)
    # folding scales each channel's step with its weights: same integers, same output
    step_before = q.w_step.detach().clone()
    fold_bn_(m, conv_bn_pairs(m, x[:2]))
    assert not torch.equal(q.w_step.detach(), step_before)
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
    ref = m(x)
    res = save_quantized(m, tmp_path / "m.safetensors")
    arch = TinyNet()  # the folded architecture: BatchNorms are gone, conv1 has a bias
    fold_bn_(arch, conv_bn_pairs(arch, x[:2]))
    back = load_quantized(tmp_path / "m.safetensors", arch)
    assert res.payload_bytes == res.accounted_bytes + res.padding_bytes  # no step params
    assert res.payload_bytes > 0
    torch.testing.assert_close(back(x), ref, rtol=1e-5, atol=1e-5)


def test_lsq_forward_matches_fake_quantize_and_step_gradient_is_lsq():
    from hawq.maths.quantizers import fake_quantize, lsq_fake_quantize, minmax_qparams

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, generator=g) * 3
    qp = minmax_qparams(x, 3, symmetric=True, axis=0)
    step = (qp.scale * 0.6).clone().requires_grad_(True)
    qp.scale = step.detach().clone()
    xr = x.clone().requires_grad_(True)
    out = lsq_fake_quantize(xr, step, qp, grad_scale=0.5)
    assert torch.equal(out, fake_quantize(x, qp))  # bit for bit: export reproduces it
    out.sum().backward()
    v = x / step.detach().view(-1, 1)
    inside = (v >= -4) & (v <= 3)
    want = torch.where(inside, v.round() - v, v.clamp(-4, 3)).sum(1) * 0.5
    torch.testing.assert_close(step.grad, want)
    torch.testing.assert_close(xr.grad, inside.float())
    # per tensor, asymmetric (activations): zero point shifts the integer range
    a = torch.rand(2, 3, 5, 5, generator=g) * 4 - 0.5
    qa = minmax_qparams(a, 4, symmetric=False, axis=None)
    s0 = (qa.scale * 0.7).clone().requires_grad_(True)
    qa.scale = s0.detach().clone()
    ar = a.clone().requires_grad_(True)
    w = torch.randn(a.shape, generator=g)  # a non-uniform upstream gradient
    out = lsq_fake_quantize(ar, s0, qa)
    assert torch.equal(out, fake_quantize(a, qa))
    (out * w).sum().backward()
    z = float(qa.zero_point)
    lo, hi = qa.qmin - z, qa.qmax - z
    v = a / s0.detach()
    inside = (v >= lo) & (v <= hi)
    torch.testing.assert_close(ar.grad, w * inside)
    want = (w * torch.where(inside, v.round() - v, v.clamp(lo, hi))).sum()
    torch.testing.assert_close(s0.grad, want)


class _ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _conv_bn(seed=0):
    torch.manual_seed(seed)
    m = _ConvBn()
    with torch.no_grad():  # channels with very different g/sqrt(v): the case that needs it
        m.bn.weight.copy_(torch.logspace(-2, 0.5, 8))
        m.bn.running_var.copy_(torch.logspace(-1, 1, 8))
        m.bn.running_mean.normal_()
    return m.eval()


def test_folded_training_is_sgd_on_the_unfolded_weights_with_bn_frozen():
    """fold_precondition: SGD (momentum, weight decay) on W' = s*W with grads scaled by s^2
    equals SGD on W with BatchNorm frozen (running statistics and gamma fixed)."""
    x, y = _data()
    steps, lr, mom, wd = 12, 0.05, 0.9, 1e-2
    cfg = FinetuneConfig(epochs=2, lr=lr, momentum=mom, weight_decay=wd, schedule="constant",
                         batch_size=16, augment="none", bn_fold_at=0.0, fold_lr_scale=1.0,
                         steps_per_epoch=steps // 2, seed=5)
    float_plan = BitPlan({"conv": LayerSpec(32, 32), "fc": LayerSpec(32, 32)})
    folded = _conv_bn()
    finetune(folded, float_plan, (x, y), cfg, progress=False)
    assert isinstance(folded.bn, nn.Identity)

    ref = _conv_bn()
    bn = ref.bn
    bn.weight.requires_grad_(False)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=lr,
                          momentum=mom, weight_decay=0.0)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        perm = torch.randperm(len(x), generator=gen)[:steps // 2 * 16]
        for idx in perm.split(16):
            ref.train()
            bn.eval()
            loss = nn.functional.cross_entropy(ref(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():  # the decay the folded run applies, seen from W and beta
                for p in (ref.conv.weight, ref.fc.weight, ref.fc.bias):
                    p.grad.add_(wd * p)
                bn.bias.grad.add_(wd * (bn.bias - bn.running_mean * s))
            opt.step()
    ref.eval()
    torch.testing.assert_close(folded.conv.weight, ref.conv.weight * s[:, None, None, None],
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(folded(x), ref(x), rtol=1e-4, atol=1e-5)
    # without the preconditioner the same run takes another path
    plain = _conv_bn()
    finetune(plain, float_plan, (x, y), FinetuneConfig(**{**cfg.__dict__,
                                                          "fold_precondition": False}),
             progress=False)
    assert not torch.allclose(plain.conv.weight, folded.conv.weight, atol=1e-4)


def test_bn_pairs_follow_data_flow_and_folding_preserves_output():
    m = _model()
    x, _ = _data()
    pairs = conv_bn_pairs(m, x[:2])
    assert sorted(pairs) == [("block.conv", "block.bn"), ("conv1", "bn1")]
    ref = m(x)
    fold_bn_(m, pairs)
    assert isinstance(m.bn1, nn.Identity) and m.conv1.bias is not None
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


def test_final_model_is_fully_quantized_and_folded_and_learns():
    x, y = _data(192)
    m = _model()
    before = evaluate(m, (x, y)).accuracy
    cfg = FinetuneConfig(epochs=10, lr=0.1, batch_size=32, augment="none", calib_samples=64,
                         staged=True, stages=2)
    res = finetune(m, PLAN, (x, y), cfg, progress=False)
    mods = quantizable_layers(m)
    assert all(isinstance(q, QuantMixin) for q in mods.values())
    assert {n: q.w_bits for n, q in mods.items()} == {"conv1": 4, "block.conv": 3, "fc": 8}
    assert all(q.act.state == "frozen" for q in mods.values())
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert len(res.stages) == 2 and sorted(sum(res.stages, [])) == sorted(mods)
    assert res.history[-1]["train_accuracy"] > 0.5
    assert evaluate(m, (x, y)).accuracy > max(before, 0.5)


def test_staged_order_is_decreasing_lambda_times_error():
    m = _model()
    x, y = _data()
    names = list(quantizable_layers(m))
    blocks, scores = staged_order(m, PLAN, (x, y), names, samples=64)
    assert scores == sorted(scores, reverse=True)
    assert sorted(sum(blocks, [])) == sorted(names)
    # a 2-bit plan on a layer raises its Omega: it moves to the front
    plan2 = BitPlan({**PLAN.layers, "fc": LayerSpec(2, 8)})
    _, s2 = staged_order(m, plan2, (x, y), names, samples=64)
    assert max(s2) >= max(scores)


def test_default_blocks_group_by_parent():
    assert default_blocks(["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "fc"]) \
        == [["conv1"], ["layer1.0.conv1", "layer1.0.conv2"], ["layer1.1.conv1"], ["fc"]]


def test_augment_crops_and_flips_like_a_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = augment_cifar(x, g, pad=1)
    g = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 3, (2,), generator=g), torch.randint(0, 3, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        ref = padded[i, :, oy[i]:oy[i] + 4, ox[i]:ox[i] + 4]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_lr_schedules():
    cfg = FinetuneConfig(lr=0.1)
    assert lr_at(cfg, 0, 100) == pytest.approx(0.1) and lr_at(cfg, 100, 100) == pytest.approx(0)
    step = FinetuneConfig(lr=0.1, schedule="step")
    assert [lr_at(step, s, 100) for s in (0, 50, 80)] == pytest.approx([0.1, 0.01, 0.001])


def test_bad_config_and_nan_loss_raise_our_errors():
    with pytest.raises(ConfigError, match="epochs"):
        FinetuneConfig(epochs=0)
    with pytest.raises(ConfigError, match="schedule"):
        FinetuneConfig(schedule="linear")
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        finetune(_model(), PLAN, _data(), FinetuneConfig(), resume=True, progress=False)
    x, y = _data()
    with pytest.raises(NumericalError, match="lower lr"):
        finetune(_model(), PLAN, (x * float("nan"), y), FinetuneConfig(calib_samples=8),
                 progress=False)


# ----------------------------------------------------------------------------- activation bits

def _brute(omega, elements, bits, total_limit=None, largest=None):
    import itertools

    best, arg = np.inf, None
    for combo in itertools.product(range(len(bits)), repeat=len(omega)):
        b = np.asarray(bits)[list(combo)]
        if total_limit is not None and (elements * b).sum() > total_limit * (1 + 1e-9):
            continue
        if largest is not None and (elements * b).max() > largest * (1 + 1e-9):
            continue
        cost = omega[np.arange(len(omega)), list(combo)].sum()
        if cost < best:
            best, arg = cost, combo
    return best, arg


@pytest.mark.parametrize("seed", range(4))
def test_activation_allocation_is_exact_against_brute_force(seed):
    from hawq.analysis.activations import allocate_activation_bits
    from hawq.maths.budgets import Budget

    rng = np.random.default_rng(seed)
    bits = [2, 4, 8]
    elements = rng.integers(10, 200, 5).astype(float)
    omega = np.sort(rng.random((5, 3)) * rng.random((5, 1)) * 10, axis=1)[:, ::-1].copy()
    avg = 4.0
    largest = float(np.median(elements) * 8)
    best, _ = _brute(omega, elements, bits, avg * elements.sum(), largest)
    got = allocate_activation_bits(omega, elements, bits, Budget("avg_bits", avg), largest)
    b = np.asarray(bits)[got]
    assert (elements * b).sum() <= avg * elements.sum() + 1e-6
    assert (elements * b).max() <= largest + 1e-6
    assert omega[np.arange(5), got].sum() == pytest.approx(best)
    # largest-only: each layer takes its cheapest allowed choice
    got_max = allocate_activation_bits(omega, elements, bits, None, largest)
    assert omega[np.arange(5), got_max].sum() == pytest.approx(_brute(omega, elements, bits,
                                                                        None, largest)[0])


def test_activation_plan_on_a_model_meets_the_budget_and_errors_on_impossible():
    from hawq.analysis.activations import activation_plan
    from hawq.maths.budgets import Budget
    from hawq.base.errors import BudgetError

    m = _model()
    x, y = _data()
    res = activation_plan(m, (x, y), bits=(2, 4, 8), total=Budget("avg_bits", 4), samples=64)
    assert res.avg_bits <= 4 + 1e-9 and len(res.bits) == 3
    assert all(t == t for t in res.traces)  # finite
    plan = res.apply(PLAN)
    assert [plan.layers[n].a_bits for n in res.names] == res.bits
    assert [plan.layers[n].w_bits for n in res.names] == [PLAN.layers[n].w_bits
                                                          for n in res.names]
    with pytest.raises(BudgetError, match="smallest feasible"):
        activation_plan(m, (x, y), bits=(2, 4, 8), largest_bits=1.0, samples=64)


def test_cli_finetune_and_compress_finetune_write_their_outputs(tmp_path, capsys):
    import json

    from hawq.ui.cli import main

    plan = tmp_path / "plan.json"
    BitPlan.uniform(4, 8).to_json(plan)
    out = tmp_path / "ft"
    assert main(["finetune", "--plan", str(plan), "--epochs", "2", "--steps-per-epoch", "3",
                 "--out", str(out), "--test-samples", "200", "--a-avg-bits", "6"]) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert len(res["finetune"]["history"]) == 2 and res["accuracy"] > 0.8 < res["ptq_accuracy"]
    assert res["activations"]["avg_bits"] <= 6 + 1e-9
    assert (out / "model.pt").exists() and (out / "last.pt").exists()
    # resuming a finished run trains nothing more and gives the same accuracy
    assert main(["finetune", "--plan", str(plan), "--epochs", "2", "--steps-per-epoch", "3",
                 "--out", str(out), "--test-samples", "200", "--a-avg-bits", "6",
                 "--resume"]) == 0
    again = json.loads((out / "finetune.json").read_text())
    assert again["accuracy"] == res["accuracy"]
    assert again["finetune"]["resumed_from_epoch"] == 2
    run = tmp_path / "run"
    assert main(["compress", "--target-compression", "6", "--out", str(run), "--finetune", "1",
                 "--steps-per-epoch", "2", "--test-samples", "200"]) == 0
    ft = json.loads((run / "finetune" / "finetune.json").read_text())
    assert res["finetune"]["config"]["learn_steps"] is True  # LSQ is the default
    assert main(["finetune", "--plan", str(plan), "--epochs", "1", "--steps-per-epoch", "2",
                 "--out", str(tmp_path / "fixed"), "--test-samples", "200",
                 "--fixed-steps"]) == 0
    fixed = json.loads((tmp_path / "fixed" / "finetune.json").read_text())
    assert fixed["finetune"]["config"]["learn_steps"] is False
    assert len(ft["finetune"]["history"]) == 1
    assert main(["finetune", "--plan", str(tmp_path / "missing.json")]) == 2


def test_cli_finetune_device_errors_say_what_to_pass(tmp_path, capsys):
    from hawq.ui.cli import main
    from hawq.post.pipeline import resolve_device

    plan = tmp_path / "plan.json"
    BitPlan.uniform(4, 8).to_json(plan)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():  # CI: asking for a GPU that is not there is a clear error
        assert main(["finetune", "--plan", str(plan), "--device", "cuda",
                     "--out", str(tmp_path / "ft")]) == 2
        assert "use --device cpu" in capsys.readouterr().err
        assert not (tmp_path / "ft").exists()
