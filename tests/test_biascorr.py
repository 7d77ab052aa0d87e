"""Empirical bias correction: exact mean matching on small nets, errors, pipeline and export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import hawq
from hawq.base.errors import ConfigError


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 8 * 8, 4)).eval()


def _data(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _channel_means(net: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    out = {}
    h = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: out.update(o=o))
    with torch.no_grad():
        net(x)
    h.remove()
    o = out["o"].double()
    return o.mean(dim=[d for d in range(o.dim()) if d != 1])


def test_single_layer_mean_output_matches_float_exactly():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(10, 4)).eval()
    x = torch.randn(200, 10) + 0.5  # nonzero input mean, so rounding shifts the output mean
    q = copy.deepcopy(ref)
    hawq.quantize_(q, hawq.BitPlan.uniform(2, 32))
    before = (_channel_means(q, "0", x) - _channel_means(ref, "0", x)).abs().max()
    shifts = hawq.bias_correct_(q, ref, x)
    after = (_channel_means(q, "0", x) - _channel_means(ref, "0", x)).abs().max()
    assert before > 1e-3 and after < 1e-5
    assert set(shifts) == {"0"} and shifts["0"] > 0


def test_every_layer_in_order_gets_the_float_mean_and_a_bias_where_it_had_none():
    ref, x = _net(), _data()
    q = copy.deepcopy(ref)
    hawq.quantize_(q, hawq.BitPlan.uniform(2, 32))
    assert q[0].bias is None
    hawq.bias_correct_(q, ref, x)
    assert isinstance(q[0].bias, nn.Parameter) and q[0].bias.shape == (6,)
    # layers are corrected in forward order with the earlier ones already corrected, so each
    # one's mean output equals the float model's on the calibration data
    for layer in ("0", "3", "6"):
        diff = (_channel_means(q, layer, x) - _channel_means(ref, layer, x)).abs().max()
        assert diff < 1e-4, (layer, float(diff))
    # and it lowers the output error of the 2-bit net on the same inputs
    plain = copy.deepcopy(ref)
    hawq.quantize_(plain, hawq.BitPlan.uniform(2, 32))
    with torch.no_grad():
        err_plain = (plain(x) - ref(x)).pow(2).mean()
        err_bc = (q(x) - ref(x)).pow(2).mean()
    assert err_bc < err_plain


def test_float_layers_are_left_alone_and_errors_name_the_fix():
    ref, x = _net(), _data()
    q = copy.deepcopy(ref)
    hawq.quantize_(q, hawq.BitPlan({"3": hawq.LayerSpec(2, 32)}))
    bias6 = q[6].bias.detach().clone()
    assert set(hawq.bias_correct_(q, ref, x)) == {"3"}
    assert torch.equal(q[6].bias, bias6) and q[0].bias is None
    # activations quantized but not calibrated yet
    q2 = copy.deepcopy(ref)
    hawq.quantize_(q2, hawq.BitPlan.uniform(4, 8))
    with pytest.raises(ConfigError, match="calibrate_"):
        hawq.bias_correct_(q2, ref, x)
    # a reference without the layers
    with pytest.raises(ConfigError, match="float model"):
        hawq.bias_correct_(q, nn.Sequential(nn.Linear(2, 2)), x)
    with pytest.raises(hawq.DataError):
        hawq.bias_correct_(q, ref, "images")


def test_bias_corrected_export_round_trip_is_exact(tmp_path):
    from hawq.post.export import load_quantized, save_quantized

    ref, x = _net(), _data()
    q = copy.deepcopy(ref)
    hawq.quantize_(q, hawq.BitPlan.uniform(3, 8))
    hawq.calibrate_(q, x)
    hawq.bias_correct_(q, ref, x)
    hawq.calibrate_(q, x)
    save_quantized(q, tmp_path / "m.safetensors")
    back = load_quantized(tmp_path / "m.safetensors", model=_net(seed=5))
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_compress_and_eval_bias_correct_on_digits(tmp_path, capsys):
    import json

    from hawq.ui.cli import main

    assert main(["eval", "--w-bits", "2", "--a-bits", "8", "--json", str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--w-bits", "2", "--a-bits", "8", "--bias-correct",
                 "--json", str(tmp_path / "b.json")]) == 0
    plain = json.loads((tmp_path / "a.json").read_text())["eval"]["accuracy"]
    corrected = json.loads((tmp_path / "b.json").read_text())["eval"]["accuracy"]
    assert corrected > plain + 0.03  # digits W2A8: 87.11% -> 94.67% when written
    run = tmp_path / "run"
    assert main(["compress", "--target-compression", "8", "--bias-correct", "--out", str(run),
                 "--test-samples", "200"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["bias_correct"] is True
    # export rebuilds the run's model, bias correction included
    assert main(["export", "--run", str(run), "--onnx", str(run / "m.onnx"),
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["onnx"]["agreement"] >= 0.98
    from hawq.post.export import load_quantized

    m = load_quantized(run / "model.safetensors")
    assert m.conv1.bias is not None  # the digits CNN's convs have none until corrected


@pytest.mark.parametrize("layer", ["0", "3", "6"])
def test_measured_loss_with_bias_correct_equals_quantize_then_correct(layer):
    """The sensitivity's analytic one-layer correction (conv of the mean input) gives the loss
    that quantizing that layer alone and running hawq.bias_correct_ gives."""
    import torch.nn.functional as F

    from hawq.analysis.sensitivity import measured_loss_increase

    ref, x = _net(), _data(128)
    y = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(2))
    names = ["0", "3", "6"]
    plain = measured_loss_increase(ref, (x, y), names, [2, 3])
    corr = measured_loss_increase(ref, (x, y), names, [2, 3], bias_correct=True)
    assert ref[0].bias is None  # restored afterwards
    with torch.no_grad():
        base = float(F.cross_entropy(ref(x), y))
    for j, b in enumerate([2, 3]):
        q = copy.deepcopy(ref)
        hawq.quantize_(q, hawq.BitPlan({layer: hawq.LayerSpec(b, 32)}))
        with torch.no_grad():
            assert float(F.cross_entropy(q(x), y)) - base == pytest.approx(
                plain[names.index(layer), j], abs=1e-5)
        hawq.bias_correct_(q, ref, x)
        with torch.no_grad():
            got = float(F.cross_entropy(q(x), y)) - base
        assert got == pytest.approx(corr[names.index(layer), j], abs=1e-4)
    with pytest.raises(ConfigError, match="context"):
        measured_loss_increase(ref, (x, y), names, [2], context=[2, 2, 2], bias_correct=True)
