import json

import pytest
import torch
import torch.nn as nn

import hawq
from hawq.base.errors import ConfigError, DataError
from hawq.modules.qmodules import QConv1d, QConv2d, QLinear


class Tiny(nn.Module):
    """conv(3->4, 3x3, pad 1) on 5x5, depthwise conv, conv1d, linear, plus an unsupported 3d conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.c1 = nn.Conv1d(4, 2, 5, bias=False)
        self.fc = nn.Linear(2 * 21, 3)
        self.emb = nn.Embedding(4, 2)  # unsupported: stays float, is listed

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.dw(x)
        x = self.c1(x.flatten(2))
        return self.fc(x.flatten(1))


def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


def test_layers_table_matches_hand_counts():
    infos = {i.name: i for i in hawq.layers(tiny(), torch.randn(2, 3, 5, 5))}
    assert list(infos) == ["conv", "dw", "c1", "fc"]
    assert infos["conv"].params == 4 * 3 * 9 and infos["conv"].bias_params == 4
    assert infos["conv"].macs == 4 * 25 * 27
    assert infos["dw"].macs == 4 * 25 * 9  # depthwise: 9 MACs per output element
    assert infos["c1"].macs == 2 * 21 * 20
    assert infos["fc"].macs == 3 * 42
    assert infos["conv"].in_shape == [1, 3, 5, 5] and infos["conv"].out_shape == [1, 4, 5, 5]


def test_budget_matches_hand_count():
    model = tiny()
    infos = hawq.layers(model, torch.randn(1, 3, 5, 5))
    plan = hawq.BitPlan({"conv": hawq.LayerSpec(4, 8), "fc": hawq.LayerSpec(2, 4)})
    rep = hawq.budget_report(infos, plan, hawq.count_params(model))
    total = hawq.count_params(model)
    q = 108 + 36 + 40 + 126
    assert rep.quantizable_params == q
    assert rep.weight_bits == 108 * 4 + 126 * 2 + (36 + 40) * 32
    assert rep.size_bits == rep.weight_bits + 32 * (total - q)
    assert rep.bops == 2700 * 4 * 8 + 126 * 2 * 4 + (900 + 840) * 32 * 32
    assert rep.avg_bits == pytest.approx(rep.weight_bits / q)
    assert rep.weight_compression == pytest.approx(32 * q / rep.weight_bits)
    uniform = hawq.budget_report(infos, hawq.BitPlan.uniform(4, 4), total)
    assert uniform.weight_compression == pytest.approx(8.0)


def test_quantize_swaps_by_type_and_lists_unsupported():
    model = tiny()
    rep = hawq.quantize_(model, hawq.BitPlan({"conv": hawq.LayerSpec(4, 8), "c1": 8,
                                              "fc": hawq.LayerSpec(3, 32)}))
    assert isinstance(model.conv, QConv2d) and isinstance(model.c1, QConv1d)
    assert isinstance(model.fc, QLinear) and type(model.dw) is nn.Conv2d
    assert rep.quantized == ["conv", "c1", "fc"] and rep.left_float == ["dw"]
    assert rep.unsupported == ["emb"]
    assert hawq.current_plan(model).layers["fc"] == hawq.LayerSpec(3, 32)


def test_32bit_plan_is_bit_identical():
    model = tiny()
    x = torch.randn(6, 3, 5, 5)
    ref = model(x)
    hawq.quantize_(model, hawq.BitPlan.uniform(32, 32))
    hawq.calibrate_(model, x)
    assert torch.equal(model(x), ref)


def test_quantized_weights_use_at_most_2_to_b_levels_per_channel():
    model = tiny()
    hawq.quantize_(model, hawq.BitPlan.uniform(3, 32))
    w = model.conv.quantized_weight().detach()
    for c in range(w.shape[0]):
        assert w[c].unique().numel() <= 8
    assert not torch.equal(w, model.conv.weight)


def test_activation_calibration_freezes_range():
    model = tiny()
    x = torch.randn(16, 3, 5, 5)
    hawq.quantize_(model, hawq.BitPlan.uniform(8, 4))
    hawq.calibrate_(model, x, batch_size=4)
    act = model.fc.act
    assert act.state == "frozen" and act.batches == 4
    lo, hi = float(act.lo), float(act.hi)
    model(x * 100)  # frozen: a bigger input does not move the range
    assert (float(act.lo), float(act.hi)) == (lo, hi)
    out = model.fc.act(torch.linspace(lo, hi, 1000))
    assert out.unique().numel() <= 16
    # the calibrated ranges are ordinary tensors: another model's ranges can be loaded into them
    assert not act.lo.is_inference() and not act.hi.is_inference()
    other = tiny()
    hawq.quantize_(other, hawq.BitPlan.uniform(8, 4))
    hawq.calibrate_(other, x * 3)
    act.load_state_dict(other.fc.act.state_dict())
    assert float(act.hi) == float(other.fc.act.hi) != hi


def test_percentile_calibration_clips_outliers():
    model = tiny()
    x = torch.randn(64, 3, 5, 5)
    x[0, 0, 0, 0] = 1000.0
    hawq.quantize_(model, hawq.BitPlan.uniform(8, 8), hawq.QuantConfig(a_calibration="percentile",
                                                                        a_percentile=99.0))
    hawq.calibrate_(model, x)
    assert float(model.conv.act.hi) < 10.0


def test_uncalibrated_activation_quantizer_is_an_error():
    model = tiny()
    hawq.quantize_(model, hawq.BitPlan.uniform(8, 8))
    with pytest.raises(ConfigError, match="calibrate_"):
        model.conv.act.freeze()


def test_unknown_layer_in_plan_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'nope'.*quantizable layers are"):
        hawq.quantize_(tiny(), hawq.BitPlan({"nope": hawq.LayerSpec(4, 8)}))


def test_plan_json_roundtrip_and_bad_entries(tmp_path):
    plan = hawq.BitPlan({"a": hawq.LayerSpec(4, 8)}, hawq.LayerSpec(8, 8))
    path = plan.to_json(tmp_path / "plan.json")
    assert hawq.BitPlan.from_json(path) == plan
    assert json.loads(path.read_text())["version"] == 1
    with pytest.raises(ConfigError, match="w_bits"):
        hawq.BitPlan.from_dict({"layers": {"a": {"w_bits": 0}}})
    with pytest.raises(ConfigError, match="w_bits"):
        hawq.BitPlan.from_dict({"layers": {"a": {"bits": 4}}})
    with pytest.raises(DataError, match="does not exist"):
        hawq.BitPlan.from_json(tmp_path / "missing.json")


def test_qat_gradients_flow_through_fake_quant():
    model = tiny()
    hawq.quantize_(model, hawq.BitPlan.uniform(4, 32))
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("learn", [False, True])
def test_twin_state_lives_on_the_layer_device(learn):
    """A GPU model's twins must keep every buffer and step beside the weight. The 'meta' device
    stands in for a GPU on CPU-only CI: any tensor made on the default device shows up as cpu."""
    from dataclasses import replace

    from hawq.modules.qmodules import to_twin
    from hawq.maths.quantizers import mse_clip_ratios

    conv = nn.Conv2d(3, 4, 3).to("meta")
    twin = to_twin(conv, hawq.LayerSpec(3, 4),
                   replace(hawq.QuantConfig(), learn_steps=learn, w_clip="mse"))
    devices = {k: t.device.type for k, t in [*twin.named_buffers(), *twin.named_parameters()]}
    assert set(devices.values()) == {"meta"}, devices
    assert mse_clip_ratios(torch.empty(4, 27, device="meta"), 3, True, 0).device.type == "meta"
    assert mse_clip_ratios(torch.empty(4, 27, device="meta"), [2, 3, 4, 8], True, 0).device.type \
        == "meta"
