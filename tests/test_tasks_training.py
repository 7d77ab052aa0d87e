"""Training and scoring through a Task: fine-tuning token models and encoders, the channel-wise
reward and ZeroQ sensitivities on non-classifiers, and the classification path unchanged."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from hawq import BitPlan, LayerSpec, evaluate
from hawq.analysis.channelwise import ChannelRewardModel
from hawq.base.errors import ConfigError
from hawq.post.finetune import FinetuneConfig, finetune, has_soft_targets
from hawq.feed.tasks import as_task
from hawq.analysis.zeroq import hessian_sensitivity, kl_sensitivity

REPO = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 12, 10


# ----------------------------------------------------------------------------- tiny models

class TinyLM(nn.Module):
    """Token ids (B, S) -> next-token logits (B, S, V); keyword ``attention_mask`` accepted."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return self.fc2(torch.relu(self.fc1(self.emb(input_ids))))


def _lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM().eval()


def _trained_lm(seed=0, steps=150):
    """A TinyLM that has learnt the bigram process (float, eval mode)."""
    model = _lm(seed)
    task = as_task("causal-lm")
    data = _tokens(128, seed=seed + 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        task.loss_on(model, data).backward()
        opt.step()
    return model.eval()


def _tokens(n=96, seed=0):
    """Sequences of a noisy deterministic bigram process (next = 3 t + 1 mod V, 10% random),
    with the last positions of every fourth sequence padded (attention_mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, SEQ, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, SEQ):
        nxt = (3 * ids[:, t - 1] + 1) % VOCAB
        noise = torch.rand(n, generator=g) < 0.1
        ids[:, t] = torch.where(noise, torch.randint(0, VOCAB, (n,), generator=g), nxt)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[::4, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, d):
        self.d = d

    def __len__(self):
        return len(self.d["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.d.items()}


def _loader(n=96, seed=0, batch_size=8):
    return torch.utils.data.DataLoader(DictDataset(_tokens(n, seed)), batch_size=batch_size,
                                       shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


LM_PLAN = BitPlan({"fc1": LayerSpec(4, 8), "fc2": LayerSpec(4, 8)})


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder().eval()


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _history(res):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]


# ----------------------------------------------------------------------------- finetune

def test_finetune_causal_lm_on_a_dataloader_of_dicts_lowers_the_task_loss():
    data = _tokens(64, seed=1)
    task = as_task("causal-lm")
    float_model = _lm()
    before = evaluate(float_model, data, task=task).loss
    model = _lm()
    cfg = FinetuneConfig(epochs=4, lr=0.2, batch_size=8, bn_fold_at=None, calib_samples=16,
                         seed=0)
    res = finetune(model, LM_PLAN, _loader(), cfg, progress=False, task="causal-lm",
                   eval_data=data)
    after = evaluate(model, data, task=task)
    assert after.loss < 0.7 * before  # it learnt the bigrams, quantized at 4 bits
    assert res.steps == 4 * 12  # len(loader) batches per epoch, as given
    assert [h["loss"] for h in res.history] == sorted(h["loss"] for h in res.history)[::-1]
    assert {"train_perplexity", "eval_perplexity"} <= set(res.history[-1])
    assert res.history[-1]["eval_perplexity"] == pytest.approx(after.value)
    assert "train_accuracy" not in res.history[-1]


def test_finetune_causal_lm_with_distillation_and_a_shuffled_dataset_is_deterministic(tmp_path):
    """A map-style Dataset is shuffled by the seeded generator: same seed, same weights; KD on
    token logits runs (per-position KL, padding masked); resume is exact."""
    ds = DictDataset(_tokens(64))
    cfg = FinetuneConfig(epochs=3, lr=0.1, batch_size=8, bn_fold_at=None, calib_samples=16,
                         distill=0.5, seed=4)
    runs = []
    for _ in range(2):
        m = _lm()
        finetune(m, LM_PLAN, ds, cfg, progress=False, task="causal-lm")
        runs.append(m)
    assert _states_equal(*runs)
    assert not torch.equal(runs[0].fc1.weight, _lm().fc1.weight)
    # dict-of-tensors data (in memory), interrupted and resumed: the same run exactly
    data = _tokens(64)
    full = _lm()
    r_full = finetune(full, LM_PLAN, data, cfg, progress=False, task="causal-lm",
                      checkpoint_dir=tmp_path / "a")
    part = _lm()
    finetune(part, LM_PLAN, data, cfg, progress=False, task="causal-lm",
             checkpoint_dir=tmp_path / "b", stop_after_epoch=1)
    resumed = _lm()
    r_res = finetune(resumed, LM_PLAN, data, cfg, progress=False, task="causal-lm",
                     checkpoint_dir=tmp_path / "b", resume=True)
    assert r_res.resumed_from_epoch == 1
    assert _states_equal(full, resumed)
    assert _history(r_full) == _history(r_res)


def test_finetune_embedding_task_keeps_the_encoder_close_to_float(caplog):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    float_model = _encoder()
    task = as_task("embedding").bind(float_model)
    plan = BitPlan({"fc1": LayerSpec(3, 8), "fc2": LayerSpec(3, 8)})
    # post-training quantization only (a zero-step-like run: lr tiny) vs fine-tuned
    ptq = _encoder()
    finetune(ptq, plan, x, FinetuneConfig(epochs=1, lr=1e-9, batch_size=32, bn_fold_at=None,
                                          calib_samples=64, learn_steps=False),
             progress=False, task=task)
    model = _encoder()
    cfg = FinetuneConfig(epochs=6, lr=0.05, batch_size=32, bn_fold_at=None, calib_samples=64,
                         distill=0.5, learn_steps=False)
    with caplog.at_level(logging.WARNING, logger="hawq.post.finetune"):
        res = finetune(model, plan, x, cfg, progress=False, task=task, eval_data=x)
    assert "no logits to distil" in caplog.text  # distill falls back to the task loss
    cos_ptq = evaluate(ptq, x, task=task).value
    cos = evaluate(model, x, task=task).value
    assert cos > 0.98 and cos > cos_ptq
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.history[-1]["eval_cosine"] == pytest.approx(cos)
    assert not has_soft_targets(task) and has_soft_targets(as_task("causal-lm"))
    # an unbound embedding task is bound to the (float) model given: the same run
    again = _encoder()
    finetune(again, plan, x, cfg, progress=False, task="embedding")
    assert _states_equal(again, model)


def _tiny_classifier_setup():
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from test_finetune import PLAN, _data, _model
    finally:
        sys.path.remove(str(REPO / "tests"))
    return PLAN, _data, _model


CLS_CFG = dict(epochs=3, lr=0.05, batch_size=16, bn_fold_at=0.5, staged=True, distill=0.5,
               calib_samples=32, seed=3, learn_steps=True)


def test_classification_default_is_the_same_run_with_task_none_name_or_object():
    PLAN, _data, _model = _tiny_classifier_setup()
    cfg = FinetuneConfig(**{**CLS_CFG, "staged": False})
    runs = []
    for task in (None, "classification", as_task("classification")):
        m = _model()
        r = finetune(m, PLAN, _data(), cfg, progress=False, task=task)
        runs.append((m, _history(r)))
    for m, h in runs[1:]:
        assert _states_equal(runs[0][0], m) and h == runs[0][1]
    assert "train_accuracy" in runs[0][1][-1]
    # a TensorDataset reads the same as the (x, y) pair
    m = _model()
    r = finetune(m, PLAN, torch.utils.data.TensorDataset(*_data()), cfg, progress=False)
    assert _states_equal(runs[0][0], m) and _history(r) == runs[0][1]


def _committed_finetune(folder):
    """hawq.post.finetune as committed (git HEAD), loaded as a separate module from a copy in
    ``folder``; None when the checkout has no git history or that version no longer imports."""
    try:
        src = subprocess.run(["git", "show", "HEAD:src/hawq/post/finetune.py"], cwd=REPO,
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(folder) / "hawq_finetune_committed.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("hawq_finetune_committed", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception:
        sys.modules.pop(spec.name, None)
        return None
    return mod


@pytest.mark.parametrize("extra", [{}, {"augment": "cifar", "staged": False, "distill": 0.0}])
def test_classification_matches_the_committed_finetune_bit_for_bit(extra, tmp_path):
    old = _committed_finetune(tmp_path)
    if old is None:
        pytest.skip("no committed hawq/finetune.py to compare with")
    PLAN, _data, _model = _tiny_classifier_setup()
    a, b = _model(), _model()
    ra = old.finetune(a, PLAN, _data(), old.FinetuneConfig(**{**CLS_CFG, **extra}),
                      progress=False)
    rb = finetune(b, PLAN, _data(), FinetuneConfig(**{**CLS_CFG, **extra}), progress=False)
    assert _states_equal(a, b)
    assert _history(ra) == _history(rb)


def test_finetune_data_errors_say_what_to_give():
    x = torch.randn(32, 8)
    plan = BitPlan({"fc1": LayerSpec(4, 8), "fc2": LayerSpec(4, 8)})
    cfg = FinetuneConfig(epochs=1, batch_size=8, bn_fold_at=None, calib_samples=8)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        finetune(_encoder(), plan, (b for b in x.split(8)), cfg, progress=False,
                 task="embedding")
    with pytest.raises(ConfigError, match="augment='cifar'"):
        finetune(_encoder(), plan, x, FinetuneConfig(**{**cfg.__dict__, "augment": "cifar"}),
                 progress=False, task="embedding")

    class NoLen(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(x.split(8))

    with pytest.raises(ConfigError, match="steps_per_epoch"):
        finetune(_encoder(), plan, NoLen(), cfg, progress=False, task="embedding")
    m = _encoder()
    res = finetune(m, plan, NoLen(), FinetuneConfig(**{**cfg.__dict__, "steps_per_epoch": 3}),
                   progress=False, task="embedding")
    assert res.steps == 3


# ----------------------------------------------------------------------------- reward, ZeroQ

def test_channel_reward_on_a_causal_lm_is_finite_and_drops_with_bits():
    model = _trained_lm()
    fresh = _trained_lm()
    data = _tokens(32, seed=2)
    chans = {"fc1": 32, "fc2": VOCAB}
    for metric in ("kl", "loss", "metric"):
        rm = ChannelRewardModel(model, ["fc1", "fc2"], (2, 4, 8), data, metric=metric,
                                batch_size=8, task="causal-lm")
        r8 = rm([[8] * c for c in chans.values()])
        r4 = rm([[4] * c for c in chans.values()])
        r2 = rm([[2] * c for c in chans.values()])
        assert all(np.isfinite([r8, r4, r2])), metric
        assert r8 > r4 > r2, (metric, r8, r4, r2)
    # the weights are restored after every call
    assert torch.equal(model(data["input_ids"]), fresh(data["input_ids"]))
    # -perplexity is the headline metric's reward (lower perplexity is better)
    ppl = evaluate(model, data, task="causal-lm").value
    rm = ChannelRewardModel(model, ["fc1", "fc2"], (2, 8), data, metric="metric",
                            task="causal-lm", batch_size=8)
    with torch.no_grad():
        rm.set_bits([[8] * c for c in chans.values()])
        q8 = evaluate(model, data, task="causal-lm").value
        rm.restore()
    assert rm([[8] * c for c in chans.values()]) == pytest.approx(-q8)
    assert q8 >= ppl * 0.99


def test_channel_reward_on_an_embedding_task_binds_the_float_model():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    model = _encoder()
    rm = ChannelRewardModel(model, ["fc1", "fc2"], (2, 4, 8), x, metric="metric",
                            task="embedding", batch_size=16)
    r8, r2 = rm([[8] * 32, [8] * 8]), rm([[2] * 32, [2] * 8])
    assert 0.99 < r8 <= 1.0 + 1e-6 and r2 < r8  # cosine to the float model


def test_kl_sensitivity_through_tasks():
    model = _lm()
    data = _tokens(16, seed=3)
    kl = kl_sensitivity(model, data, ["fc1", "fc2"], bits=(2, 4, 8, 32), batch_size=6,
                        task="causal-lm")
    assert kl.shape == (2, 4) and np.all(np.isfinite(kl))
    assert np.all(kl[:, 0] > kl[:, 1]) and np.all(kl[:, 1] > kl[:, 2])
    assert np.all(kl[:, 3] <= 1e-7)
    loop = kl_sensitivity(model, data, ["fc1", "fc2"], bits=(2, 4, 8, 32), batch_size=6,
                          task="causal-lm", vectorize=False)
    np.testing.assert_allclose(kl, loop, rtol=1e-6, atol=1e-12)
    # per position KL averaged over the positions, by brute force for fc2 at 2 bits
    from hawq.maths.quantizers import fake_quantize, weight_qparams

    q = _lm()
    with torch.no_grad():
        q.fc2.weight.copy_(fake_quantize(q.fc2.weight, weight_qparams(q.fc2.weight, 2)))
        p = torch.log_softmax(model(data["input_ids"]).double(), -1)
        r = torch.log_softmax(q(data["input_ids"]).double(), -1)
    want = float((p.exp() * (p - r)).sum(-1).mean())
    assert kl[1, 0] == pytest.approx(want, rel=1e-6)
    # an encoder: the task's divergence (squared error), growing as bits drop
    enc = _encoder()
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    d = kl_sensitivity(enc, x, bits=(2, 4, 8), batch_size=7, task="embedding")
    assert np.all(d[:, 0] > d[:, 1]) and np.all(d[:, 1] > d[:, 2]) and np.all(d > 0)


def test_hessian_sensitivity_of_a_causal_lm():
    import inspect

    from hawq.analysis.hessian import analyze

    if "task" not in inspect.signature(analyze).parameters:
        pytest.skip("hawq.analysis.hessian.analyze has no task= yet")
    model = _lm()
    omega, stats = hessian_sensitivity(model, _tokens(16), bits=(2, 4, 8), max_probes=6,
                                       task="causal-lm")
    assert omega.shape == (2, 3) and np.all(np.isfinite(omega)) and stats["labels"] is None
    assert np.all(omega[:, 0] > omega[:, 2])


# ----------------------------------------------------------------------------- distill label term

def test_distill_label_term_reads_logits_from_model_outputs():
    from hawq.analysis.distill import distill_data

    class Net(nn.Module):
        def __init__(self, wrap):
            super().__init__()
            self.wrap = wrap
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            z = self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
            if self.wrap == "tuple":
                return z, x
            if self.wrap == "dict":
                return {"logits": z}
            if self.wrap == "tokens":
                return z[:, None, :].expand(-1, 3, -1)
            return z

    def run(wrap):
        torch.manual_seed(0)
        m = Net(wrap).eval()
        return distill_data(m, (3, 6, 6), batch_size=5, iterations=6, seed=0, label_weight=1.0)

    plain = run("tensor")
    for wrap in ("tuple", "dict"):
        got = run(wrap)
        assert torch.equal(got.data, plain.data)
        assert got.extra["final_cross_entropy"] == plain.extra["final_cross_entropy"]
    with pytest.raises(ConfigError, match="label_weight=0"):
        run("tokens")
