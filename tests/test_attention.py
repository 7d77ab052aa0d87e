"""Attention models: Hessian analysis, quantization and export of nn.MultiheadAttention and
nn.TransformerEncoder, on tiny seeded models, against exact answers where there is one."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import hawq
from hawq.modules.attention import attention_safe, has_attention, pin_slow_path_
from hawq.base.errors import UnsupportedLayerError
from hawq.post.export import load_quantized, save_quantized
from hawq.analysis.hessian import analyze, select_layers
from hawq.maths.plan import BitPlan, LayerSpec
from hawq.modules.qmodules import (ActQuantizer, QMultiheadAttention, QOutProjLinear,
                           RoutedMultiheadAttention, layer_weight)
from hawq.maths.quantizers import fake_quantize, weight_qparams
from hawq.modules.surgery import unsupported_layers

VOCAB, D, HEADS, CLASSES = 20, 16, 2, 3


class TinyTransformer(nn.Module):
    """Embedding -> 2-layer batch-first TransformerEncoder -> mean pool -> linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=32, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class Attn(nn.Module):
    """One attention block, self- or cross-attention, for exact checks."""

    def __init__(self, d=D, heads=HEADS, kdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, kdim=kdim, vdim=kdim)

    def forward(self, x, kv=None, need_weights=False):
        if kv is None:
            kv = x if self.attn._qkv_same_embed_dim else x[..., :self.attn.kdim]
        return self.attn(x, kv, kv, need_weights=need_weights)[0]


class AttnClassifier(nn.Module):
    """Float features -> self-attention -> mean pool -> linear (for exact Hessians)."""

    def __init__(self, d=4, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc = nn.Linear(d, CLASSES)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


def transformer():
    torch.manual_seed(0)
    return TinyTransformer().eval()


def tokens(n=16, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (n, length), generator=g),
            torch.randint(0, CLASSES, (n,), generator=g))


def sdpa_flags():
    cuda = torch.backends.cuda
    return (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled())


IN_PROJ = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
OUT_PROJ = [n + ".out_proj" for n in IN_PROJ]


@pytest.mark.parametrize("fastpath", [True, False])
def test_analyze_transformer_lists_in_proj_and_restores_settings(fastpath):
    model = transformer()
    x, y = tokens()
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        flags = sdpa_flags()
        res = analyze(model, (x, y), metric="trace", max_probes=4)
        assert torch.backends.mha.get_fastpath_enabled() is fastpath
        assert sdpa_flags() == flags
    finally:
        torch.backends.mha.set_fastpath_enabled(old)
    names = [lh.name for lh in res.layers]
    for n in IN_PROJ + OUT_PROJ:
        assert n in names
    by_name = {lh.name: lh for lh in res.layers}
    for n in IN_PROJ:
        assert by_name[n].params == 3 * D * D
        assert by_name[n].probes == 4
        assert torch.isfinite(torch.tensor(by_name[n].trace))
    assert all(type(m) is nn.MultiheadAttention for m in model.modules()
               if isinstance(m, nn.MultiheadAttention))  # classes swapped back


def test_attention_safe_restores_on_error_and_nests():
    model = transformer()
    before = (torch.backends.mha.get_fastpath_enabled(), sdpa_flags())
    mha = model.encoder.layers[0].self_attn
    with pytest.raises(RuntimeError, match="boom"):
        with attention_safe(model):
            assert torch.backends.mha.get_fastpath_enabled() is False
            assert type(mha) is RoutedMultiheadAttention
            with attention_safe(model):
                assert type(mha) is RoutedMultiheadAttention
            assert type(mha) is RoutedMultiheadAttention
            raise RuntimeError("boom")
    assert (torch.backends.mha.get_fastpath_enabled(), sdpa_flags()) == before
    assert type(mha) is nn.MultiheadAttention
    assert has_attention(model) and not has_attention(nn.Linear(2, 2))


def test_routed_attention_is_the_float_function():
    torch.manual_seed(1)
    for kdim in (None, 8):
        m = Attn(kdim=kdim).eval()
        x = torch.randn(3, 5, D)
        kv = torch.randn(3, 7, kdim or D)
        for need in (True, False):
            with torch.no_grad(), attention_safe():
                ref = m.attn(x, kv, kv, need_weights=need)
            with torch.no_grad(), attention_safe(m):
                got = m.attn(x, kv, kv, need_weights=need)
            assert torch.equal(ref[0], got[0])
            assert ref[1] is None and got[1] is None or torch.equal(ref[1], got[1])


def test_layers_table_has_in_proj_with_params_and_macs():
    model = transformer()
    x, _ = tokens(length=6)
    infos = {i.name: i for i in hawq.layers(model, x)}
    order = [i.name for i in hawq.layers(model, x)]
    for n in IN_PROJ:
        info = infos[n]
        assert info.params == 3 * D * D and info.bias_params == 3 * D
        assert info.macs == 6 * 3 * D * D  # 6 tokens, q/k/v: D inputs -> D outputs each
        assert info.out_shape == [1, 6, 3 * D] and "Linear" in info.type
        assert order.index(n) + 1 == order.index(n + ".out_proj")
    for n in OUT_PROJ:
        assert infos[n].macs == 6 * D * D
    assert set(hawq.quantizable_layers(model)) >= set(IN_PROJ + OUT_PROJ)
    mha = model.encoder.layers[0].self_attn
    assert layer_weight(mha) is mha.in_proj_weight  # what the Hessian engine differentiates
    assert [n for n, _ in select_layers(model, IN_PROJ)] == IN_PROJ
    assert unsupported_layers(model) == ["emb"]


def test_quantize_and_calibrate_transformer():
    model = transformer()
    ref = copy.deepcopy(model)
    x, _ = tokens(n=32)
    report = hawq.quantize_(model, BitPlan.uniform(4, 8))
    for n in IN_PROJ + OUT_PROJ:
        assert n in report.quantized
    assert report.unsupported == ["emb"]
    mods = dict(model.named_modules())
    assert all(isinstance(mods[n], QMultiheadAttention) for n in IN_PROJ)
    assert all(isinstance(mods[n], QOutProjLinear) for n in OUT_PROJ)
    assert hawq.calibrate_(model, x) == 32
    for q in model.modules():
        if isinstance(q, ActQuantizer):
            assert q.state == "frozen" and int(q.batches) > 0
    with torch.no_grad():  # eval + no_grad: the fused fast path would bypass the twins
        out, fl = model(x), ref(x)
    with torch.enable_grad():
        slow = model(x)  # grad enabled never takes the fast path
    assert torch.allclose(out, slow.detach(), atol=1e-5)
    rel = float((out - fl).norm() / fl.norm())
    assert 1e-3 < rel < 0.3, rel
    plan = hawq.current_plan(model)
    assert plan.layers[IN_PROJ[0]] == LayerSpec(4, 8)


def test_quantized_mha_matches_float_mha_on_fake_quantized_weights():
    torch.manual_seed(2)
    model = Attn().eval()
    ref = copy.deepcopy(model).requires_grad_(False)
    hawq.quantize_(model, BitPlan.uniform(8, 32))
    model.requires_grad_(False)
    with torch.no_grad():
        for p in (ref.attn.in_proj_weight, ref.attn.out_proj.weight):
            q = fake_quantize(p, weight_qparams(p, 8, True, True))
            assert not torch.equal(p, q)  # the check below is not vacuous
            p.copy_(q)
    x = torch.randn(4, 5, D)
    kv = torch.randn(4, 7, D)
    for args in ((x,), (x, kv)):
        for need in (False, True):
            with torch.no_grad(), attention_safe():
                got = model(*args, need_weights=need)
                want = ref(*args, need_weights=need)
            assert torch.equal(got, want)


def test_quantized_mha_input_quantizer_and_out_proj_only_plan():
    torch.manual_seed(4)
    model = Attn().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 5, D)
    report = hawq.quantize_(model, BitPlan({"attn.out_proj": LayerSpec(4, 8)}))
    assert report.quantized == ["attn.out_proj"] and report.left_float == ["attn"]
    assert isinstance(model.attn, QMultiheadAttention) and model.attn.w_bits == 32
    hawq.calibrate_(model, x)
    with torch.no_grad():
        assert not torch.allclose(model(x), ref(x))  # out_proj twin is not bypassed
    # 8-bit inputs: the same tensor as q, k and v is quantized once, with one range
    model = copy.deepcopy(ref)
    hawq.quantize_(model, BitPlan({"attn": LayerSpec(32, 8)}))
    hawq.calibrate_(model, x)
    act = model.attn.act
    assert float(act.lo) == float(x.min()) and float(act.hi) == float(x.max())
    with torch.no_grad(), attention_safe():
        want = ref(fake_quantize(x, act.qparams()))
        assert torch.equal(model(x), want)


def test_separate_qkv_projections_are_quantized():
    torch.manual_seed(5)
    model = Attn(kdim=8).eval()
    ref = copy.deepcopy(model)
    x, kv = torch.randn(4, 5, D), torch.randn(4, 7, 8)
    report = hawq.quantize_(model, BitPlan.uniform(4, 32))
    assert report.quantized == ["attn", "attn.out_proj"]
    assert model.attn.weight.shape == (D, D + 8 + 8)
    with torch.no_grad():
        got, want = model(x, kv), ref(x, kv)
    rel = float((got - want).norm() / want.norm())
    assert 1e-3 < rel < 0.3
    info = {i.name: i for i in hawq.layers(model, x)}  # kv = x[..., :8]
    assert info["attn"].params == D * (D + 16)
    assert info["attn"].macs == 5 * D * (D + 8 + 8)
    with pytest.raises(UnsupportedLayerError, match="'attn'"):
        save_quantized(model, "/nonexistent/never-written.safetensors")


def test_export_roundtrip_transformer(tmp_path):
    model = transformer()
    x, _ = tokens(n=8)
    hawq.quantize_(model, BitPlan.uniform(4, 8))
    hawq.calibrate_(model, x)
    save_quantized(model, tmp_path / "t.safetensors")
    loaded = load_quantized(tmp_path / "t.safetensors", model=transformer)
    assert isinstance(loaded.encoder.layers[0].self_attn, QMultiheadAttention)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def exact_trace(model, key, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(w):
        return F.cross_entropy(functional_call(model, ({**params, key: w}, buffers), (x,)), y)

    w = params[key]
    with attention_safe(model):
        h = torch.autograd.functional.hessian(f, w)
    return float(h.reshape(w.numel(), w.numel()).trace())


def test_in_proj_trace_matches_exact_hessian():
    torch.manual_seed(6)
    model = AttnClassifier().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, 4, generator=g)
    y = torch.randint(0, CLASSES, (12,), generator=g)
    exact = exact_trace(model, "attn.in_proj_weight", x, y)
    res = analyze(model, (x, y), metric="trace", layers=["attn"], tol=0.04,
                  max_probes=3000, seed=1, probe_batch=100, vectorized=True)
    lh = res.layers[0]
    assert lh.name == "attn" and lh.params == 3 * 4 * 4
    assert abs(lh.trace - exact) <= max(3 * lh.stderr, 1e-9), (lh.trace, exact, lh.stderr)
    assert abs(lh.trace - exact) <= 0.15 * abs(exact), (lh.trace, exact)


def test_in_proj_activation_trace_perturbs_shared_qkv():
    torch.manual_seed(7)
    model = AttnClassifier().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 4, generator=g)
    y = torch.randint(0, CLASSES, (3,), generator=g)
    mha = model.attn

    def f(d):
        def hook(_m, i):
            b = i[0] + d
            return (b, b, b)

        hk = mha.register_forward_pre_hook(hook)
        try:
            return F.cross_entropy(model(x), y, reduction="sum")
        finally:
            hk.remove()

    d0 = torch.zeros_like(x)
    with attention_safe(model):
        exact = float(torch.autograd.functional.hessian(f, d0).reshape(d0.numel(), -1).trace())
    res = analyze(model, (x, y), metric="activation", layers=["attn"], tol=0.04,
                  max_probes=3000, seed=2, probe_batch=100, vectorized=True)
    lh = res.layers[0]
    assert lh.params == x.numel()
    assert abs(lh.trace - exact) <= max(3 * lh.stderr, 1e-9), (lh.trace, exact, lh.stderr)
    assert abs(lh.trace - exact) <= 0.05 * abs(exact) + 1e-9, (lh.trace, exact)


def test_pin_slow_path_only_touches_blocks_with_twins():
    model = transformer()
    assert pin_slow_path_(model) == []
    hawq.quantize_(model, BitPlan({"head": LayerSpec(8)}))
    assert model.encoder.use_nested_tensor  # no twin inside: untouched
    hawq.quantize_(model, BitPlan({"encoder.layers.1.linear1": LayerSpec(8)}))
    assert not model.encoder.use_nested_tensor
    assert model.encoder.layers[1].activation_relu_or_gelu == 0
    assert model.encoder.layers[0].activation_relu_or_gelu == 1
