"""Channel-wise HAWQ: per-channel bits in quantizers/plans/accounting, allocator, DDPG agent."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hawq
from hawq.maths.budgets import Budget
from hawq.analysis.channelwise import (ChannelAllocator, ChannelLayer, ChannelRewardModel,
                              channel_errors, counts_to_bits, hessian_group_plan,
                              ratios_to_counts)
from hawq.maths.ddpg import DDPGConfig, cuts_to_ratios, ddpg_search, truncated_normal
from hawq.maths.quantizers import dequantize, fake_quantize, quantize, weight_qparams


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)  # 2 channels x 4 weights, on 3x3 input: 8 outputs
        self.fc = nn.Linear(8, 3)  # 3 channels x 8 weights

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


# ----------------------------------------------------------------------------- quantizers

@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_per_channel_bits_equal_quantizing_each_channel_alone(clip):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(7, 3, 3, 3, generator=gen) * torch.linspace(0.1, 2, 7).view(-1, 1, 1, 1)
    bits = [2, 3, 4, 8, 2, 5, 6]
    qp = weight_qparams(w, bits, clip=clip)
    got = dequantize(quantize(w, qp), qp)
    for c, b in enumerate(bits):
        qc = weight_qparams(w[c:c + 1], b, clip=clip)
        ref = dequantize(quantize(w[c:c + 1], qc), qc)[0]
        assert torch.equal(got[c], ref), (c, b)
        # integers stay inside the channel's own range
        q = quantize(w, qp)[c]
        assert q.min() >= -2 ** (b - 1) and q.max() <= 2 ** (b - 1) - 1
    assert torch.equal(fake_quantize(w, qp), got)
    # straight-through gradient still flows
    wg = w.clone().requires_grad_(True)
    fake_quantize(wg, qp).sum().backward()
    assert wg.grad is not None and wg.grad.abs().sum() > 0


def test_quantized_twin_uses_per_channel_bits():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(5, 1, 3, 3)
    plan = hawq.BitPlan({"conv": hawq.LayerSpec([2, 8], 32), "fc": hawq.LayerSpec([2, 3, 4], 32)})
    ref_w = {n: model.get_submodule(n).weight.detach().clone() for n in ("conv", "fc")}
    hawq.quantize_(model, plan)
    wq = {}
    for n, bits in (("conv", [2, 8]), ("fc", [2, 3, 4])):
        wq[n] = torch.cat([dequantize(quantize(ref_w[n][c:c + 1], q := weight_qparams(
            ref_w[n][c:c + 1], b)), q) for c, b in enumerate(bits)])
    expect = F.linear(F.relu(F.conv2d(x, wq["conv"], model.conv.bias)).flatten(1), wq["fc"],
                      model.fc.bias)
    assert torch.allclose(model(x), expect, atol=1e-6)
    assert hawq.current_plan(model).layers["fc"].w_bits == [2, 3, 4]


def test_per_channel_length_errors_name_the_layer():
    model = Tiny()
    bad = hawq.BitPlan({"fc": hawq.LayerSpec([2, 4], 32)})
    with pytest.raises(hawq.ConfigError, match=r"'fc'.*3 output channels"):
        hawq.quantize_(model, bad)
    infos = hawq.layers(model, torch.zeros(1, 1, 3, 3))
    with pytest.raises(hawq.ConfigError, match=r"'fc'.*3 output channels"):
        hawq.budget_report(infos, bad, hawq.count_params(model))
    with pytest.raises(hawq.ConfigError):
        hawq.LayerSpec([2, 16])  # float widths are not allowed per channel
    with pytest.raises(hawq.ConfigError):
        weight_qparams(torch.randn(3, 4), [2, 4, 8], per_channel=False)


def test_accounting_counts_per_channel_bits_exactly():
    model = Tiny()
    infos = hawq.layers(model, torch.zeros(1, 1, 3, 3))
    plan = hawq.BitPlan({"conv": hawq.LayerSpec([2, 8], 8), "fc": hawq.LayerSpec([2, 3, 4], 8)})
    rep = hawq.budget_report(infos, plan, hawq.count_params(model))
    # conv: 4 weights/channel -> 4*2 + 4*8 = 40; fc: 8/channel -> 8*(2+3+4) = 72
    assert rep.weight_bits == 112
    assert rep.size_bits == 112 + 32 * (2 + 3)  # biases at 32 bits
    assert rep.avg_bits == pytest.approx(112 / 32)
    # BOPs: conv 32 MACs -> 16/channel: 16*2*8 + 16*8*8; fc 24 MACs -> 8/channel: 8*9*8
    assert rep.bops == 16 * 2 * 8 + 16 * 8 * 8 + 8 * 9 * 8
    # a per-channel list of equal bits accounts like the int
    same = hawq.BitPlan({"conv": hawq.LayerSpec([4, 4], 8), "fc": hawq.LayerSpec(4, 8)})
    uni = hawq.BitPlan({"conv": hawq.LayerSpec(4, 8), "fc": hawq.LayerSpec(4, 8)})
    assert hawq.budget_report(infos, same, 37) == hawq.budget_report(infos, uni, 37)


def test_per_channel_plan_json_round_trip(tmp_path):
    plan = hawq.BitPlan({"conv": hawq.LayerSpec((2, 8), 8), "fc": hawq.LayerSpec(4, 32)},
                        default=hawq.LayerSpec(8, 8))
    assert plan.layers["conv"].w_bits == [2, 8]  # stored as a plain list of ints
    path = plan.to_json(tmp_path / "plan.json")
    back = hawq.BitPlan.from_json(path)
    assert back == plan and back.layers["conv"].w_bits == [2, 8]
    assert hash(back.layers["conv"]) == hash(plan.layers["conv"])
    d = hawq.BitPlan.from_dict({"layers": {"conv": [2, 3]}}).layers["conv"]
    assert d.w_bits == [2, 3] and d.per_channel and d.mean_w_bits() == 2.5


# ----------------------------------------------------------------------------- allocator

def test_ratios_to_counts_and_trace_order():
    counts = ratios_to_counts([0.25, 0.25, 0.5], 10)
    assert counts.sum() == 10 and np.all(np.abs(counts - np.array([2.5, 2.5, 5])) < 1)
    assert ratios_to_counts([1 / 3, 1 / 3, 1 / 3], 16).tolist() == [5, 5, 6]
    traces = [0.1, 5.0, 0.3, 2.0, 0.0]
    bits = counts_to_bits([2, 2, 1], [2, 4, 8], traces)
    assert bits == [2, 8, 4, 4, 2]  # highest trace -> 8 bits, the next two -> 4


def _layers(rng, n_layers):
    layers = []
    for i in range(n_layers):
        c = int(rng.integers(1, 12))
        per = int(rng.integers(1, 30))
        layers.append(ChannelLayer(f"l{i}", c * per, c * per * 10, rng.gamma(1.0, 1.0, c)))
    return layers


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_layers=st.integers(1, 6),
       bits=st.sampled_from([(2, 4, 8), (2, 3, 4, 8), (3, 5), (2, 8)]),
       r=st.floats(0.0, 1.0))
def test_allocator_plans_meet_the_budget_exactly(seed, n_layers, bits, r):
    rng = np.random.default_rng(seed)
    layers = _layers(rng, n_layers)
    alloc = ChannelAllocator(layers, bits, Budget("fraction", r))
    ratios = rng.dirichlet(np.ones(len(bits)), size=n_layers)
    counts = alloc.plan(ratios)
    assert np.array_equal(counts.sum(1), [l.channels for l in layers])
    assert alloc.fits(counts)
    # exact: no single trace-order-keeping promotion of one channel by one width still fits
    size = alloc.size_bits(counts)
    for l, layer in enumerate(layers):
        for j in range(len(bits) - 1):
            if counts[l, j]:
                step = layer.per_channel * (alloc.bits[j + 1] - alloc.bits[j])
                assert size + step > alloc.limit + 1e-6
    # and the plan's accounting agrees with budget_report on the per-channel lists
    per_ch = alloc.to_bits(counts)
    assert sum(l.per_channel * sum(b) for l, b in zip(layers, per_ch)) == size


def test_squeeze_lowers_the_last_layers_first():
    rng = np.random.default_rng(0)
    layers = [ChannelLayer(f"l{i}", 8 * 10, 100, rng.random(8)) for i in range(3)]
    alloc = ChannelAllocator(layers, (2, 4, 8), Budget("avg_bits", 6.0))
    all8 = np.tile([0.0, 0.0, 1.0], (3, 1))
    counts = alloc.squeeze(alloc.counts_from_ratios(all8))
    assert counts[0].tolist() == [0, 0, 8]  # first layer untouched
    assert alloc.fits(counts) and counts[2, 2] < 8
    # HAQ's wall: one width per layer per round, from the last layer back, so a budget of
    # 4 average bits lowers every layer to 4 rather than the last two to 2
    four = ChannelAllocator(layers, (2, 4, 8), Budget("avg_bits", 4.0))
    assert four.squeeze(four.counts_from_ratios(all8)).tolist() == [[0, 8, 0]] * 3
    with pytest.raises(hawq.BudgetError):
        ChannelAllocator(layers, (2, 4, 8), Budget("avg_bits", 1.5))


def test_hessian_group_plan_meets_budget_and_orders_channels():
    torch.manual_seed(0)
    ws = [torch.randn(8, 4, 3, 3), torch.randn(6, 8)]
    errs = [channel_errors(w, (2, 4, 8)) for w in ws]
    layers = [ChannelLayer("a", 288, 2880, np.linspace(10, 1, 8)),
              ChannelLayer("b", 48, 48, np.array([0.1, 3, 0.2, 2, 0.3, 1.0]))]
    counts, chan = hessian_group_plan(layers, errs, (2, 4, 8), Budget("avg_bits", 4.0), groups=4)
    total = sum(l.per_channel * sum(b) for l, b in zip(layers, chan))
    assert total <= 4.0 * 336 and counts.sum() == 14
    assert [len(c) for c in chan] == [8, 6]
    # errors: exact per-channel squared error of the per-channel quantizer
    qp = weight_qparams(ws[1], 4)
    ref = (dequantize(quantize(ws[1], qp), qp) - ws[1]).pow(2).sum(1).numpy()
    np.testing.assert_allclose(errs[1][:, 1], ref, rtol=1e-6)


def test_reward_model_swaps_in_the_same_weights_as_quantize_():
    torch.manual_seed(0)
    model = Tiny().eval()
    x, y = torch.randn(20, 1, 3, 3), torch.randint(0, 3, (20,))
    rm = ChannelRewardModel(model, ["conv", "fc"], (2, 4, 8), (x, y), metric="kl")
    chan = [[2, 8], [4, 2, 8]]
    assert rm([[8, 8], [8, 8, 8]]) > rm([[2, 2], [2, 2, 2]])
    rm.set_bits(chan)
    fast = model(x)
    rm.restore()
    hawq.quantize_(model, hawq.BitPlan({"conv": hawq.LayerSpec(chan[0]),
                                        "fc": hawq.LayerSpec(chan[1])}))
    assert torch.allclose(model(x), fast, atol=1e-6)


# ----------------------------------------------------------------------------- DDPG

def test_truncated_normal_and_cut_points():
    rng = np.random.default_rng(0)
    x = truncated_normal(rng, np.full(20000, 0.9), 0.3)
    assert x.min() >= 0 and x.max() <= 1 and 0.6 < x.mean() < 0.9
    r = cuts_to_ratios(np.array([[0.7, 0.2], [0.0, 1.0]]))
    np.testing.assert_allclose(r, [[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]])


def _toy(seed, episodes=150, warmup=20):
    target = np.array([0.2, 0.5, 0.3])
    res = ddpg_search(np.arange(3.0)[:, None], 3, lambda r: -float(((r - target) ** 2).sum()),
                      config=DDPGConfig(episodes=episodes, warmup=warmup, seed=seed))
    return res, target


def test_ddpg_finds_the_best_ratio_on_a_toy_problem():
    res, target = _toy(0)
    rnd, _ = _toy(0, warmup=150)  # pure random search with the same number of episodes
    assert np.abs(res.best_ratios - target).max() < 0.15
    assert res.best_reward > 2 * rnd.best_reward  # rewards are negative: much closer
    assert res.episodes == 150 and len(res.rewards) == 150


def test_ddpg_same_seed_same_plan():
    a, _ = _toy(3, episodes=40)
    b, _ = _toy(3, episodes=40)
    c, _ = _toy(4, episodes=40)
    assert a.rewards == b.rewards and np.array_equal(a.best_ratios, b.best_ratios)
    assert a.rewards != c.rewards


def test_every_agent_plan_meets_the_budget():
    rng = np.random.default_rng(1)
    layers = _layers(rng, 5)
    alloc = ChannelAllocator(layers, (2, 4, 8), Budget("avg_bits", 3.0))
    seen = []

    def reward(counts):
        seen.append(counts)
        # prefers 8 bits everywhere: the budget must hold anyway
        return float(sum((c * alloc.bits).sum() for c in counts))

    feats = np.array([[i, l.channels, l.params] for i, l in enumerate(layers)], dtype=float)
    res = ddpg_search(feats, 3, reward, make_plan=alloc.plan, dynamic=alloc.used_fraction,
                      config=DDPGConfig(episodes=25, warmup=5, seed=0))
    assert len(seen) == 25
    for counts in seen:
        assert alloc.fits(counts)
    assert alloc.fits(res.best_plan)
    plan = alloc.to_plan(res.best_plan)
    assert all(isinstance(s.w_bits, list) for s in plan.layers.values())


def test_config_validation():
    with pytest.raises(hawq.ConfigError):
        DDPGConfig(episodes=0)
    with pytest.raises(hawq.ConfigError):
        ddpg_search(np.zeros((2, 1)), 1, lambda r: 0.0)
    with pytest.raises(hawq.ConfigError):
        hawq_pipeline_config = __import__("hawq.post.pipeline", fromlist=["x"])
        hawq_pipeline_config.CompressConfig(method="nope")
