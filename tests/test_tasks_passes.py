"""Passes through hawq.feed.tasks: evaluate, measured sensitivities, refinement, calibration, layer
tables and bias correction on token models, dict batches, HF-style outputs and embeddings,
checked against hand computations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import hawq
from hawq.maths.budgets import Budget
from hawq.base.errors import DataError, NumericalError
from hawq.modules.evaluate import EvalResult, evaluate
from hawq.post.refine import refine_plan
from hawq.analysis.sensitivity import measured_loss_increase
from hawq.feed.tasks import as_task

V, T, D = 11, 6, 8


class TinyLM(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab); accepts input_ids= and
    attention_mask= keywords like a Hugging Face causal LM."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mix(self.emb(input_ids)))
        h = torch.cumsum(h, dim=1) / torch.arange(1, input_ids.shape[1] + 1).view(1, -1, 1)
        return self.head(h)


class Output:
    """A model output object with ``.logits`` (as transformers' ModelOutput)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class HFClassifier(nn.Module):
    """Dict batches: input_ids (+ attention_mask) -> Output(logits (batch, 3))."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.fc1 = nn.Linear(D, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return Output(self.fc2(torch.tanh(self.fc1(h.mean(1)))))


def _lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


def _tokens(n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def _hf() -> HFClassifier:
    torch.manual_seed(0)
    return HFClassifier().eval()


def _hf_batch(n: int = 20, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::3, -2:] = 0
    return {"input_ids": torch.randint(0, V, (n, T), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=g)}


def _quantized(model: nn.Module, layer: str | None, bits: int) -> nn.Module:
    q = copy.deepcopy(model)
    plan = hawq.BitPlan.uniform(bits, 32) if layer is None else \
        hawq.BitPlan({layer: hawq.LayerSpec(bits, 32)})
    hawq.quantize_(q, plan)
    return q.eval()


# ----------------------------------------------------------------------------- evaluate

def test_causal_lm_perplexity_is_exp_of_the_mean_next_token_cross_entropy():
    model, ids = _lm(), _tokens()
    with torch.no_grad():
        logits = model(ids)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    res = evaluate(model, ids, batch_size=7, task="causal-lm")
    assert res.metric == "perplexity" and res.higher_is_better is False
    assert res.accuracy is None and res.samples == 20
    assert res.value == pytest.approx(math.exp(float(ce)), rel=1e-5)
    # every sequence has T-1 targets, so the per-sample mean loss is the token mean
    assert res.loss == pytest.approx(float(ce), rel=1e-5)
    d = res.to_dict()
    assert d["metric"] == "perplexity" and d["value"] == res.value and d["accuracy"] is None
    # dict batches with a padding mask: masked positions are not predicted
    mask = torch.ones_like(ids)
    mask[:5, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ce_masked = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                ignore_index=-100)
    res = evaluate(model, {"input_ids": ids, "attention_mask": mask}, batch_size=6,
                   task="causal-lm")
    assert res.value == pytest.approx(math.exp(float(ce_masked)), rel=1e-5)


def test_embedding_task_cosine_is_one_on_the_float_model_and_below_after_quantizing():
    torch.manual_seed(3)
    enc = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 8)).eval()
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(4))
    task = as_task("embedding").bind(enc)
    res = evaluate(enc, x, task=task)
    assert res.metric == "cosine" and res.higher_is_better and res.accuracy is None
    assert res.value == pytest.approx(1.0, abs=1e-6) and res.loss == pytest.approx(0.0, abs=1e-10)
    q = _quantized(enc, None, 2)
    res_q = evaluate(q, x, task=task)
    with torch.no_grad():
        cos = F.cosine_similarity(q(x), enc(x), dim=1).mean()
        dist = (q(x) - enc(x)).pow(2).sum(1).mean()
    assert res_q.value < 0.999
    assert res_q.value == pytest.approx(float(cos), rel=1e-5)
    assert res_q.loss == pytest.approx(float(dist), rel=1e-5)
    with pytest.raises(hawq.ConfigError, match="bind"):
        evaluate(enc, x, task="embedding")  # unbound: no float reference


def test_hf_style_classifier_output_with_logits_evaluates_like_a_tensor_model():
    model, batch = _hf(), _hf_batch(30)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
    acc = float((logits.argmax(1) == batch["labels"]).float().mean())
    ce = float(F.cross_entropy(logits, batch["labels"]))
    res = evaluate(model, batch, batch_size=8)
    assert res.accuracy == pytest.approx(acc) and res.value == res.accuracy
    assert res.metric == "accuracy" and res.higher_is_better and res.samples == 30
    assert res.loss == pytest.approx(ce, rel=1e-5)

    # a plain classifier with (x, y): unchanged fields, and the output wrapped in .logits agrees
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).eval()

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return Output(self.inner(x))

    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    a, b = evaluate(net, (x, y), batch_size=16), evaluate(Wrapped(net), (x, y), batch_size=16)
    assert isinstance(a, EvalResult) and a.accuracy == b.accuracy and a.loss == b.loss
    with torch.no_grad():
        assert a.accuracy == int((net(x).argmax(1) == y).sum()) / 40
        assert a.loss == pytest.approx(float(F.cross_entropy(net(x), y)), rel=1e-6)
    assert EvalResult(0.5, 1.0, 10).value == 0.5  # positional construction still works


def test_nan_output_is_a_numerical_error():
    net = nn.Sequential(nn.Linear(3, 2)).eval()
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        evaluate(net, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))


# ----------------------------------------------------------------------------- sensitivities

@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_measured_loss_on_dict_batches_equals_quantized_minus_float_loss(layer):
    model, batch = _hf(), _hf_batch(20)
    names, bits = ["fc1", "fc2"], [2, 4]
    out = measured_loss_increase(model, batch, names, bits, batch_size=7)

    def loss(m):
        with torch.no_grad():
            return float(F.cross_entropy(m(batch["input_ids"], batch["attention_mask"]).logits,
                                         batch["labels"]))

    base = loss(model)
    for j, b in enumerate(bits):
        assert out[names.index(layer), j] == pytest.approx(loss(_quantized(model, layer, b)) - base,
                                                           abs=1e-6)
    # the same numbers from a DataLoader of dict batches
    rows = [{k: v[i] for k, v in batch.items()} for i in range(20)]
    loader = DataLoader(rows, batch_size=6)
    assert measured_loss_increase(model, loader, names, bits) == pytest.approx(out, abs=1e-6)


def test_measured_loss_on_a_token_model_with_the_causal_lm_task():
    model, ids = _lm(), _tokens()
    out = measured_loss_increase(model, ids, ["mix", "head"], [2], task="causal-lm")

    def loss(m):
        with torch.no_grad():
            lg = m(ids)
        return float(F.cross_entropy(lg[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)))

    for i, name in enumerate(["mix", "head"]):
        assert out[i, 0] == pytest.approx(loss(_quantized(model, name, 2)) - loss(model), abs=1e-6)


# ----------------------------------------------------------------------------- refinement

def test_refine_plan_on_a_causal_lm_measures_kl_and_loss_per_sample():
    model, ids = _lm(), _tokens(24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["mix", "head"]
    bits = np.array([2, 4, 8])
    params = np.array([model.get_submodule(n).weight.numel() for n in names], dtype=float)
    budget = Budget("avg_bits", 5)
    start = [0, 0]
    for objective in ("kl", "loss"):
        r = refine_plan(model, ids, names, bits, np.zeros((2, 3)), start, params, budget,
                        objective=objective, candidates=10, batch_size=5, task="causal-lm")
        assert r.value <= r.start_value
        if objective == "kl":
            assert r.moves and r.value < r.start_value   # 2-bit start: raising bits helps
        assert float((params * np.array(r.bits)).sum()) <= 5 * params.sum() + 1e-6
        q = copy.deepcopy(model)
        hawq.quantize_(q, hawq.BitPlan({n: hawq.LayerSpec(int(b), 32)
                                        for n, b in zip(names, r.bits)}))
        with torch.no_grad():
            lq, lf = q(ids), model(ids)
        if objective == "kl":
            want = F.kl_div(F.log_softmax(lq, -1), F.log_softmax(lf, -1), log_target=True,
                            reduction="sum") / (ids.shape[0] * T)   # mean KL per position
        else:
            want = F.cross_entropy(lq[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        assert r.value == pytest.approx(float(want), rel=1e-4, abs=1e-7)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- calibration

class _DictRows(Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def test_calibrate_from_a_dataloader_of_dict_batches_sees_exactly_those_samples():
    model, batch = _hf(), _hf_batch(20)
    hawq.quantize_(model, hawq.BitPlan.uniform(8, 8))
    loader = DataLoader(_DictRows(batch), batch_size=6)
    assert hawq.calibrate_(model, loader, max_samples=15) == 15
    act = model.fc1.act
    assert act.state == "frozen" and int(act.batches) == 3   # 6 + 6 + 3 samples
    # fc1's input by hand on the first 15 samples: the masked mean of the embeddings
    with torch.no_grad():
        h = model.emb(batch["input_ids"][:15]) * batch["attention_mask"][:15].unsqueeze(-1)
        a = h.mean(1)
    assert float(act.lo) == pytest.approx(float(a.min()), abs=1e-6)
    assert float(act.hi) == pytest.approx(float(a.max()), abs=1e-6)
    # a single dict batch and a bare token tensor work too
    m2 = _lm()
    hawq.quantize_(m2, hawq.BitPlan.uniform(8, 8))
    assert hawq.calibrate_(m2, _tokens(9), batch_size=4) == 9
    assert int(m2.head.act.batches) == 3


def test_layers_table_from_a_dict_batch_and_a_single_example_tensor():
    infos = {i.name: i for i in hawq.layers(_hf(), _hf_batch(4))}
    assert list(infos) == ["fc1", "fc2"]
    assert infos["fc1"].in_shape == [1, D] and infos["fc1"].macs == 16 * D
    lm = {i.name: i for i in hawq.layers(_lm(), _tokens(1))}
    assert lm["mix"].in_shape == [1, T, D] and lm["mix"].macs == T * D * D
    assert lm["head"].out_shape == [1, T, V]
    net = nn.Sequential(nn.Linear(5, 3))
    assert hawq.layers(net, torch.randn(1, 5))[0].macs == 15


def test_bias_correction_on_a_token_model_matches_per_feature_means():
    ref, ids = _lm(), _tokens(30)
    q = _quantized(ref, None, 2)
    hawq.bias_correct_(q, ref, ids)
    out = {}

    def grab(net, name):
        h = net.get_submodule(name).register_forward_hook(lambda m, i, o: out.update(o=o))
        with torch.no_grad():
            net(ids)
        h.remove()
        return out["o"].double().mean(dim=(0, 1))

    for name in ("mix", "head"):
        assert q.get_submodule(name).bias.shape == ref.get_submodule(name).bias.shape
        assert (grab(q, name) - grab(ref, name)).abs().max() < 1e-4


# ----------------------------------------------------------------------------- bad data

def test_bad_data_raises_data_errors_naming_the_argument_or_task():
    net = nn.Sequential(nn.Linear(5, 3)).eval()
    x = torch.randn(8, 5)
    with pytest.raises(DataError, match="evaluate data.*string"):
        evaluate(net, "images.npz")
    with pytest.raises(DataError, match="no samples"):
        evaluate(net, torch.empty(0, 5))
    with pytest.raises(DataError, match="classification.*labels"):
        evaluate(net, x)                       # inputs without labels
    with pytest.raises(DataError, match="data.*classification.*labels"):
        measured_loss_increase(net, x, ["0"], [2])
    with pytest.raises(DataError, match="calibration data"):
        hawq.calibrate_(net, "calib.npz")
    with pytest.raises(DataError, match="example_input"):
        hawq.layers(net, "x")
    with pytest.raises(DataError, match="causal-lm"):
        evaluate(_lm(), {"attention_mask": torch.ones(2, T, dtype=torch.long)},
                 task="causal-lm")
    with pytest.raises(DataError, match="bias_correct_ data"):
        hawq.bias_correct_(_quantized(net, None, 2), net, 3.0)


def test_activation_plan_reads_dict_batches_and_token_models():
    from hawq.analysis.activations import activation_plan

    plan = activation_plan(_hf(), _hf_batch(20), total=Budget("avg_bits", 4), samples=12,
                           max_probes=8)
    assert plan.names == ["fc1", "fc2"] and plan.elements == [D, 16.0]
    lm = activation_plan(_lm(), _tokens(10), total=Budget("avg_bits", 4), samples=8,
                         max_probes=8, task="causal-lm")
    assert lm.elements == [T * D, T * D]   # per sample: every position's features
    assert lm.avg_bits <= 4 + 1e-9 and set(lm.bits) <= {2, 4, 8}
