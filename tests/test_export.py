"""Packed integer export: bit packing, exact round trips, sizes, ONNX QDQ agreement."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import hawq
from hawq.base.errors import ConfigError, DataError
from hawq.post.export import (load_quantized, pack_bits, read_manifest, row_nbytes, save_quantized,
                         size_check, unpack_bits)


class Tiny(nn.Module):
    """conv+BN, depthwise conv, pointwise conv, linear: 1x8x8 inputs (digits-shaped)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.dw(x))
        x = self.pw(x)  # signed input to fc: asymmetric activation quantizer
        return self.fc(x.flatten(1))


def tiny_factory() -> nn.Module:
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_()
    return m.eval()


tiny_factory.dataset = "digits"
tiny_factory.input_shape = (1, 8, 8)


def _quantized(plan, config=None, seed=0):
    m = tiny_factory()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    hawq.quantize_(m, plan, config)
    hawq.calibrate_(m, x)
    return m, x


def _expected_packed_bits(model) -> tuple[int, int]:
    """(sum of params x bits, sum of row-padded bytes x 8) over quantized layers, brute force."""
    exact = padded = 0
    for _, m in model.named_modules():
        if isinstance(m, hawq.modules.qmodules.QuantMixin) and m.w_bits not in (16, 32):
            rows, k = m.weight.shape[0], m.weight[0].numel()
            bits = m.w_bits if isinstance(m.w_bits, list) else [m.w_bits] * rows
            exact += sum(b * k for b in bits)
            padded += sum(-(-b * k // 8) * 8 for b in bits)
    return exact, padded


# ----------------------------------------------------------------------------- packing

def test_pack_layout_matches_hand_computed_bytes():
    vals = np.array([[1, 2, 3, 4, 5, 6, 7, 0, 5]])
    stream = sum(int(v) << (3 * k) for k, v in enumerate(vals[0]))  # little-endian stream
    expected = np.frombuffer(stream.to_bytes(4, "little"), dtype=np.uint8)  # 27 bits -> 4 B
    assert np.array_equal(pack_bits(vals, 3), expected)
    # two rows at different widths: each row starts on a byte boundary
    two = np.array([[3, 0, 1], [200, 17, 255]])
    out = pack_bits(two, [2, 8])
    assert out.tolist() == [3 | (0 << 2) | (1 << 4), 200, 17, 255]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), row_len=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       per_row=st.booleans())
def test_pack_unpack_roundtrip_property(rows, row_len, seed, per_row):
    rng = np.random.default_rng(seed)
    bits = rng.integers(1, 9, rows) if per_row else np.full(rows, rng.integers(1, 9))
    vals = rng.integers(0, 2 ** bits[:, None], (rows, row_len))
    packed = pack_bits(vals, bits.tolist() if per_row else int(bits[0]))
    assert packed.dtype == np.uint8
    assert packed.size == int(row_nbytes(bits, row_len).sum())
    assert packed.size == sum(-(-int(b) * row_len // 8) for b in bits)
    assert np.array_equal(unpack_bits(packed, bits.tolist(), rows, row_len), vals)


def test_pack_rejects_values_too_wide_and_bad_lengths():
    with pytest.raises(ConfigError, match="does not fit"):
        pack_bits(np.array([[4]]), 2)
    with pytest.raises(ConfigError, match="does not fit"):
        pack_bits(np.array([[-1]]), 2)
    with pytest.raises(DataError, match="needs"):
        unpack_bits(np.zeros(3, np.uint8), 4, 2, 4)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_roundtrip_exact_every_bit_width(tmp_path, bits):
    a_bits = 8 if bits % 2 else bits
    model, x = _quantized(hawq.BitPlan.uniform(bits, a_bits))
    res = save_quantized(model, tmp_path / "m.safetensors")
    loaded = load_quantized(tmp_path / "m.safetensors", model=tiny_factory)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert hawq.current_plan(loaded) == hawq.current_plan(model)
    exact, padded = _expected_packed_bits(model)
    assert res.packed_weight_bytes * 8 == padded
    assert res.padding_bytes == (padded - exact) // 8
    # payload = accounted size + row padding, exactly
    assert res.payload_bytes * 8 == res.accounted_bytes * 8 + (padded - exact)
    assert size_check(res)["ok"], size_check(res)
    assert res.total_bytes == (tmp_path / "m.safetensors").stat().st_size + \
        (tmp_path / "m.json").stat().st_size
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave nothing behind


def test_roundtrip_mixed_per_channel_mse_and_float_layers(tmp_path):
    plan = hawq.BitPlan({"c1": hawq.LayerSpec([2, 3, 4, 5, 6, 7, 8, 2], 8),
                         "dw": hawq.LayerSpec(3, 4), "pw": hawq.LayerSpec(32, 8),
                         "fc": hawq.LayerSpec(2, 32)})
    model, x = _quantized(plan, hawq.QuantConfig(w_clip="mse"))
    res = save_quantized(model, tmp_path / "m.safetensors", model_name="test_export:tiny_factory")
    with pytest.raises(ConfigError, match="model="):  # a manifest's name is never imported
        load_quantized(tmp_path / "m.safetensors")
    loaded = load_quantized(tmp_path / "m.safetensors", model=tiny_factory)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    man = read_manifest(tmp_path / "m.safetensors")
    assert man["layers"]["c1"]["w_bits"] == [2, 3, 4, 5, 6, 7, 8, 2]
    assert man["layers"]["pw"]["packed"] is False
    assert man["model"]["name"] == "test_export:tiny_factory"
    exact, padded = _expected_packed_bits(model)
    assert res.packed_weight_bytes * 8 == padded
    assert size_check(res)["ok"]
    # the loaded model can be re-quantized with a new plan (stored scales are dropped)
    hawq.quantize_(loaded, hawq.BitPlan.uniform(8, 8))
    hawq.calibrate_(loaded, x)
    assert torch.isfinite(loaded(x)).all()


def test_roundtrip_asymmetric_per_tensor_weights(tmp_path):
    cfg = hawq.QuantConfig(w_symmetric=False, w_per_channel=False)
    model, x = _quantized(hawq.BitPlan.uniform(4, 8), cfg)
    save_quantized(model, tmp_path / "m.safetensors")
    loaded = load_quantized(tmp_path / "m.safetensors", model=tiny_factory())
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_registry_model_and_mismatch_errors(tmp_path):
    from hawq.modules.models import build_model

    model = build_model("digits-cnn", pretrained=False)
    x = torch.randn(16, 1, 8, 8)
    hawq.quantize_(model, hawq.BitPlan.uniform(4, 8))
    hawq.calibrate_(model, x)
    path = tmp_path / "d.safetensors"
    save_quantized(model, path, model_name="digits-cnn")
    loaded = load_quantized(path)  # architecture from the registry name
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises((ConfigError,)):
        load_quantized(path, model=tiny_factory)  # wrong architecture
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="SHA-256"):
        load_quantized(path)
    with pytest.raises(ConfigError, match="no quantized layer"):
        save_quantized(build_model("digits-cnn", pretrained=False), tmp_path / "f.safetensors")


# ----------------------------------------------------------------------------- ONNX

def test_onnx_w8a8_and_int4_mixed_agree_with_pytorch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from hawq.post.onnx_export import export_onnx, run_onnx

    model, x = _quantized(hawq.BitPlan.uniform(8, 8))
    res = export_onnx(model, tmp_path / "m.onnx", x)
    with torch.no_grad():
        scale = float(model(x).abs().max())
    # integer kernels may move an activation one step: small, not 0; literal graph: ~exact
    assert res.agreement == 1.0 and res.max_abs_diff < 1e-2 * scale
    assert res.max_abs_diff_unoptimized < 1e-5 * scale
    assert {r["weight_format"] for r in res.layers} == {"int8"}
    assert {r["act_format"] for r in res.layers} == {"uint8"}
    assert res.opset == 20 and not res.notes

    plan = hawq.BitPlan({"c1": hawq.LayerSpec(8, 8), "dw": hawq.LayerSpec(4, 4),
                         "pw": hawq.LayerSpec(2, 3), "fc": hawq.LayerSpec(6, 8)})
    model, x = _quantized(plan)
    res = export_onnx(model, tmp_path / "mixed.onnx", x)
    fmt = {r["name"]: (r["weight_format"], r["act_format"]) for r in res.layers}
    assert fmt == {"c1": ("int8", "uint8"), "dw": ("int4", "uint8"), "pw": ("int4", "uint8"),
                   "fc": ("int8", "uint8")}
    assert res.int4 and res.opset == 21
    assert any("3-bit activations" in n for n in res.notes)
    assert any("6-bit weight values stored in INT8" in n for n in res.notes)
    # the literal QDQ graph matches PyTorch to float rounding; onnxruntime's default integer
    # kernels (QLinearConv, int32 biases) may move a 3-bit activation by one step
    out = run_onnx(tmp_path / "mixed.onnx", x, optimize=False)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()
    assert res.max_abs_diff_unoptimized == pytest.approx(float(np.abs(out - ref).max()))
    assert res.agreement >= 0.9
    import onnx

    proto = onnx.load(str(tmp_path / "mixed.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 8
    assert not any(a.name.startswith("hawq_") for n in proto.graph.node for a in n.attribute)


# ----------------------------------------------------------------------------- CLI

def test_cli_export_model_plan_and_onnx(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from hawq.ui.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    plan = tmp_path / "plan.json"
    hawq.BitPlan.uniform(4, 8).to_json(plan)
    out = tmp_path / "q.safetensors"
    rc = main(["export", "--model", "test_export:tiny_factory", "--plan", str(plan), "--out",
               str(out), "--onnx", str(tmp_path / "q.onnx"), "--calib-samples", "64",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["size_check"]["ok"] and r["onnx"]["agreement"] == 1.0
    loaded = load_quantized(out, model=tiny_factory)  # the user's model: the caller names it
    assert hawq.current_plan(loaded).spec_for("fc") == hawq.LayerSpec(4, 8)
    assert main(["export", "--model", "digits-cnn"]) == 2  # plan/out missing: clear error
    assert "give --run DIR" in capsys.readouterr().err
