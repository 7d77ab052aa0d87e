import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from hawq.base.errors import ConfigError
from hawq.maths.quantizers import (check_bits, dequantize, fake_quantize, minmax_qparams,
                             mse_clip_ratios, quantization_error, quantize, weight_qparams)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), per_channel=st.booleans(),
       seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_roundtrip_error_at_most_half_scale(bits, symmetric, per_channel, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, generator=g) * scale
    qp = minmax_qparams(x, bits, symmetric, axis=0 if per_channel else None)
    q = quantize(x, qp)
    assert q.min() >= qp.qmin and q.max() <= qp.qmax
    s, _ = qp.view(x)
    err = (dequantize(q, qp) - x).abs()
    assert torch.all(err <= s / 2 * (1 + 1e-5) + 1e-7)


def test_one_bit_asymmetric_and_unsigned():
    x = torch.tensor([0.0, 0.2, 0.9, 1.0])
    qp = minmax_qparams(x, 1, symmetric=False, unsigned=True)
    assert (qp.qmin, qp.qmax) == (0, 1)
    assert torch.equal(quantize(x, qp), torch.tensor([0, 0, 1, 1], dtype=torch.int32))


def test_per_channel_scales_follow_each_channel():
    w = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-10, 10, 9)])
    qp = minmax_qparams(w, 8, symmetric=True, axis=0)
    assert qp.scale.shape == (2,)
    assert torch.allclose(qp.scale, torch.tensor([1 / 127, 10 / 127]))
    assert qp.zero_point.tolist() == [0, 0]


def test_unsigned_activation_uses_full_range():
    x = torch.relu(torch.randn(1000))
    qp = minmax_qparams(x, 4, unsigned=True)
    assert int(qp.zero_point) == 0
    assert int(quantize(x, qp).max()) == 15


def test_ste_gradient_identity_inside_zero_outside():
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    qp = minmax_qparams(torch.tensor([-1.0, 1.0]), 4, symmetric=True)
    lo = float(qp.qmin * qp.scale)
    hi = float(qp.qmax * qp.scale)
    fake_quantize(x, qp).sum().backward()
    inside = (x.detach() >= lo) & (x.detach() <= hi)
    assert torch.equal(x.grad, inside.float())
    assert inside.any() and (~inside).any()


def test_fake_quantize_value_equals_dequant_quant():
    x = torch.randn(3, 5)
    qp = minmax_qparams(x, 3, symmetric=False)
    assert torch.equal(fake_quantize(x, qp), dequantize(quantize(x, qp), qp))


def test_mse_clipping_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * torch.rand(8, 1, 1, 1)
    w[0, 0, 0, 0] = 8.0  # an outlier makes clipping pay off
    for bits in (2, 3, 4):
        assert quantization_error(w, bits, clip="mse") <= quantization_error(w, bits) + 1e-6
    ratios = mse_clip_ratios(w, 2)
    assert ratios.shape == (8,) and bool((ratios > 0).all() and (ratios <= 1).all())
    assert quantization_error(w, 2, clip="mse") < 0.8 * quantization_error(w, 2)


def test_float_bits_pass_through():
    w = torch.randn(4, 4)
    assert weight_qparams(w, 32) is None and weight_qparams(w, 16) is None
    assert fake_quantize(w, None) is w


@pytest.mark.parametrize("bad", [0, 9, 12, -1, 2.5, True, "4"])
def test_bad_bits_raise_config_error(bad):
    with pytest.raises(ConfigError, match="bits"):
        check_bits(bad)


def test_symmetric_one_bit_rejected_with_reason():
    with pytest.raises(ConfigError, match="symmetric needs at least 2"):
        weight_qparams(torch.randn(3, 3), 1, symmetric=True)
