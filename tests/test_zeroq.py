"""ZeroQ: distilled data from BatchNorm statistics, KL sensitivity, the zero-shot pipeline."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hawq.ui.cli import main
from hawq.analysis.distill import bn_statistics_loss, distill_data, infer_input_shape
from hawq.base.errors import ConfigError
from hawq.maths.quantizers import fake_quantize, weight_qparams
from hawq.post.config import ZeroQConfig
from hawq.workflows.workflow import zeroq
from hawq.analysis.zeroq import hessian_sensitivity, kl_sensitivity


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: a second thread only adds barrier waits on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cnn(seed: int = 0) -> nn.Module:
    """conv-BN-ReLU x2 + head, BN running statistics taken from smooth standardised 'images'."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    g = torch.Generator().manual_seed(seed + 1)
    data = F.interpolate(torch.randn(256, 3, 4, 4, generator=g), size=8, mode="bilinear")
    data = (data - data.mean((0, 2, 3), keepdim=True)) / data.std((0, 2, 3), keepdim=True)
    for b in m:
        if isinstance(b, nn.BatchNorm2d):
            b.momentum = None  # cumulative average: running stats = the data's statistics
    m.train()
    with torch.no_grad():
        m(data)
    return m.eval()


class Shuffled(nn.Module):
    """BN modules registered in the opposite order to the one they run in, with an affine op
    between conv1 and its BN and a BN (``shared``) called twice."""

    def __init__(self):
        super().__init__()
        self.bn_late = nn.BatchNorm2d(6)
        self.shared = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_early = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)
        g = torch.Generator().manual_seed(3)
        for bn in (self.bn_late, self.shared, self.bn_early):
            bn.running_mean.copy_(torch.randn(6, generator=g))
            bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)

    def forward(self, x):
        a = self.bn_early(2.0 * self.conv1(x) + 1.0)
        b = self.shared(F.relu(a))
        c = self.bn_late(self.conv2(b))
        d = self.shared(c)
        return self.head(F.relu(d).mean((2, 3)))


def _brute_term(a: torch.Tensor, bn: nn.BatchNorm2d, eps: float = 1e-6) -> float:
    """ZeroQ's own_loss for mean and std in float64 numpy, straight from the definition."""
    a = a.detach().double().numpy().reshape(a.shape[0], a.shape[1], -1)
    mean, std = a.mean(2), np.sqrt(a.var(2, ddof=1) + eps)
    rm = bn.running_mean.double().numpy()
    rs = np.sqrt(bn.running_var.double().numpy() + eps)
    return float((((rm - mean) ** 2).sum() + ((rs - std) ** 2).sum()) / a.shape[0])


def test_distillation_reduces_bn_loss_100x():
    m = small_cnn()
    res = distill_data(m, (3, 8, 8), batch_size=16, iterations=150, seed=0)
    assert res.initial_loss == pytest.approx(res.losses[0])
    assert res.reduction >= 100.0, (res.initial_loss, res.final_loss)
    # the reported final loss is the loss of the returned data
    total, _ = bn_statistics_loss(m, res.data)
    assert float(total.detach()) == pytest.approx(res.final_loss, rel=1e-5)
    assert res.bn_order == ["1", "4"] and set(res.layer_losses) == {"1", "4", "<input>"}
    assert all(p.requires_grad for p in m.parameters()) and not m.training
    json.dumps(res.to_dict())


def test_label_term_gives_class_confident_samples_and_still_matches_bn():
    m = small_cnn()
    plain = distill_data(m, (3, 8, 8), batch_size=16, iterations=150, seed=0)
    lab = distill_data(m, (3, 8, 8), batch_size=16, iterations=150, seed=0, label_weight=1.0)
    with torch.no_grad():
        out_plain, out_lab = m(plain.data), m(lab.data)
    targets = torch.arange(16) % out_lab.shape[1]
    # the samples are classified as their round-robin labels, unlike ZeroQ's plain samples
    assert (out_lab.argmax(1) == targets).float().mean() >= 0.9
    assert F.cross_entropy(out_lab, targets) < F.cross_entropy(out_plain, targets)
    assert lab.reduction >= 20.0 and lab.extra["label_weight"] == 1.0  # BN still matched
    assert lab.losses[0] == pytest.approx(plain.losses[0])  # losses stay the BN loss
    with pytest.raises(ConfigError, match="label_weight"):
        distill_data(m, (3, 8, 8), iterations=1, label_weight=-1.0)


def test_bn_pairing_follows_forward_hooks_not_registration_order():
    m = Shuffled().eval()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    total, per = bn_statistics_loss(m, x)
    assert list(per) == ["bn_early", "shared", "bn_late", "shared#2", "<input>"]
    with torch.no_grad():  # the tensors each BN receives, by hand
        a_in = 2.0 * m.conv1(x) + 1.0
        b_in = F.relu(m.bn_early(a_in))
        c_in = m.conv2(m.shared(b_in))
        d_in = m.bn_late(c_in)
    expected = {"bn_early": _brute_term(a_in, m.bn_early), "shared": _brute_term(b_in, m.shared),
                "bn_late": _brute_term(c_in, m.bn_late), "shared#2": _brute_term(d_in, m.shared)}
    for k, v in expected.items():
        assert per[k] == pytest.approx(v, rel=1e-4), k
    xin = x.double().numpy().reshape(4, 3, -1)
    prior = float(((xin.mean(2)) ** 2).sum() + ((1 - np.sqrt(xin.var(2, ddof=1) + 1e-6)) ** 2)
                  .sum()) / 4
    assert per["<input>"] == pytest.approx(prior, rel=1e-4)
    assert float(total.detach()) == pytest.approx(sum(expected.values()) + prior, rel=1e-4)
    # pairing by registration order would give different numbers
    assert _brute_term(a_in, m.bn_late) != pytest.approx(per["bn_early"], rel=1e-2)


def test_distillation_is_deterministic_under_seed():
    m = small_cnn()
    state = copy.deepcopy(m.state_dict())
    a = distill_data(m, (3, 8, 8), batch_size=4, iterations=15, seed=7)
    torch.manual_seed(123)  # the global RNG must not matter
    b = distill_data(m, (3, 8, 8), batch_size=4, iterations=15, seed=7)
    c = distill_data(m, (3, 8, 8), batch_size=4, iterations=15, seed=8)
    assert torch.equal(a.data, b.data) and a.losses == b.losses
    assert not torch.equal(a.data, c.data)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())  # model untouched


def test_model_without_batchnorm_is_a_clear_error():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    for call in (lambda: distill_data(m, (3, 8, 8), iterations=2),
                 lambda: bn_statistics_loss(m, torch.zeros(1, 3, 8, 8))):
        with pytest.raises(ConfigError, match="no BatchNorm.*calibrate on real data"):
            call()


def test_input_shape_inference_and_argument_checks():
    assert infer_input_shape(small_cnn()) == (3, 32, 32)
    assert infer_input_shape(nn.Sequential(nn.Linear(7, 2), nn.BatchNorm1d(2))) == (7,)
    with pytest.raises(ConfigError, match="lr"):
        distill_data(small_cnn(), (3, 8, 8), lr=0)
    with pytest.raises(ConfigError, match="init"):
        distill_data(small_cnn(), (3, 8, 8), iterations=1, init="zeros")


def test_batchnorm1d_on_flat_features_uses_batch_statistics():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    m[1].running_mean.fill_(0.5)
    m[1].running_var.fill_(4.0)
    res = distill_data(m, batch_size=8, iterations=200, lr=0.1, input_prior=False, seed=0)
    assert res.input_shape == [8] and res.reduction > 100
    h = m[0](res.data).detach()  # statistics over the batch, per feature
    assert h.mean(0).numpy() == pytest.approx(np.full(6, 0.5), abs=0.02)
    assert h.std(0).numpy() == pytest.approx(np.full(6, 2.0), abs=0.02)


def _brute_kl(model, x, name, bits):
    q = copy.deepcopy(model)
    w = dict(q.named_modules())[name].weight
    with torch.no_grad():
        w.copy_(fake_quantize(w, weight_qparams(w, bits)))
        p = F.log_softmax(model(x).double(), 1).numpy()
        r = F.log_softmax(q(x).double(), 1).numpy()
    return float((np.exp(p) * (p - r)).sum(1).mean())


@pytest.mark.parametrize("vectorize", [True, False])
def test_kl_sensitivity_matches_brute_force_and_orders_bits(vectorize):
    m = small_cnn()
    x = distill_data(m, (3, 8, 8), batch_size=8, iterations=30, seed=0).data
    names = ["0", "3", "8"]
    kl = kl_sensitivity(m, x, names, bits=(2, 3, 4, 8, 32), batch_size=5, vectorize=vectorize)
    assert kl.shape == (3, 5)
    for i, n in enumerate(names):
        for j, b in enumerate((2, 4, 8)):
            assert kl[i, (0, 2, 3)[j]] == pytest.approx(_brute_kl(m, x, n, b), rel=2e-3, abs=1e-9)
    if vectorize:
        assert np.all(kl[:, 4] <= 1e-7)
    else:
        assert np.all(kl[:, 4] == 0.0)  # a 32-bit "quantization" changes nothing
    assert np.all(kl[:, 0] > kl[:, 1]) and np.all(kl[:, 1] > kl[:, 2])
    assert np.all(kl[:, 2] > kl[:, 3]) and np.all(kl[:, 3] > 0)


def test_hessian_sensitivity_on_distilled_data():
    m = small_cnn()
    x = distill_data(m, (3, 8, 8), batch_size=8, iterations=20, seed=0).data
    omega, stats = hessian_sensitivity(m, x, bits=(2, 4, 8), max_probes=6)
    assert omega.shape == (3, 3) and np.all(np.isfinite(omega))
    assert stats["labels"] == m(x).argmax(1).tolist()
    from hawq.analysis.hessian import analyze
    from hawq.analysis.sensitivity import weight_errors

    labels = torch.tensor(stats["labels"])
    res = analyze(m, (x, labels), metric="trace", seed=0, max_probes=6)
    expected = np.array([lh.avg_trace for lh in res.layers])[:, None] * \
        weight_errors(m, ["0", "3", "8"], (2, 4, 8))
    np.testing.assert_allclose(omega, expected, rtol=1e-6)
    assert stats["names"] == ["0", "3", "8"]


def test_zeroq_pipeline_on_digits(tmp_path):
    res = zeroq(model="digits-cnn", distill_iters=60, distill_batch=16, target_compression=8,
                bits=(2, 4, 8), out_dir=tmp_path, test_samples=200)
    assert res.budget["weight_compression"] >= 8.0 - 1e-9
    assert {r["w_bits"] for r in res.layers} <= {2, 4, 8}
    assert res.distill["reduction"] > 10 and res.accuracy > 0.5 and res.fp32_accuracy > 0.9
    assert res.seconds["distill"] > 0 and res.allocation["method"] == "frontier"
    for f in ("plan.json", "metrics.json", "sensitivity.json", "frontier.png", "layers.png",
              "distill.png"):
        assert (tmp_path / f).stat().st_size > 0
    back = json.loads((tmp_path / "metrics.json").read_text())
    assert back == json.loads(json.dumps(res.to_dict()))
    # the plan's layers got exactly the allocated bits
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [plan["layers"][r["name"]]["w_bits"] for r in res.layers] == res.allocation["bits"]


def test_zeroq_uniform_and_config_errors():
    res = zeroq(model="digits-cnn", w_bits=8, distill_iters=20, distill_batch=8,
                evaluate=False)
    assert res.allocation is None and res.accuracy is None
    assert {r["w_bits"] for r in res.layers} == {8}
    with pytest.raises(ConfigError, match="sensitivity"):
        ZeroQConfig(sensitivity="mse")
    with pytest.raises(ConfigError, match="exclude"):
        ZeroQConfig(w_bits=4, target_compression=8)
    with pytest.raises(ConfigError, match="allocator"):
        ZeroQConfig(allocator="v1-rule")


def test_cli_zeroq(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["zeroq", "--model", "digits-cnn", "--distill-iters", "20", "--distill-batch", "8",
               "--target-avg-bits", "5", "--bits", "2,4,8", "--test-samples", "100",
               "--out", str(out), "--json", str(tmp_path / "z.json")])
    assert rc == 0
    d = json.loads((tmp_path / "z.json").read_text())
    assert d["budget"]["avg_bits"] <= 5 + 1e-9 and (out / "plan.json").is_file()
    assert "zero-shot" in capsys.readouterr().out
    assert main(["zeroq", "--model", "digits-cnn", "--target-compression", "20",
                 "--bits", "4,8", "--no-eval"]) == 2  # infeasible budget: exit 2, no traceback
