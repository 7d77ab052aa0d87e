"""End to end on models hawq was not written for, handed in as objects with their own data and
task: analyse, allocate, quantize, evaluate, export (packed round trip), report.

Models: a MobileNet-like CNN (depthwise conv, GELU), an ``nn.TransformerEncoder`` classifier on
token ids, a tiny causal LM, a sentence-embedding encoder, a model returning a dict of losses,
and (when transformers is installed) a randomly initialised ``BertForSequenceClassification``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hawq
import usermods
from usermods import Encoder, LossDictNet, TinyLM, TinyMobileNet
from hawq.base.errors import DataError
from hawq.post.config import CompressConfig
from hawq.post.export import load_quantized, roundtrip_equal, save_quantized
from hawq.ui.report import write_report
from hawq.workflows.workflow import compress

FAST = dict(target_compression=8, bits=(2, 4, 8), hessian_samples=32, max_probes=6,
            calib_samples=32, refine_samples=32, refine_candidates=4)


class TokenClassifier(usermods.TokenClassifier):
    """The user module's token classifier with two encoder blocks."""

    def __init__(self):
        super().__init__(layers=2)


def _check_run(out, model, example, res):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == res.metric and metrics["value"] == pytest.approx(res.value)
    assert 7.0 <= res.budget["weight_compression"] <= 8.5
    plan = hawq.BitPlan.from_json(out / "plan.json")
    assert set(plan.layers) == {r["name"] for r in res.layers}
    exp = save_quantized(model, out / "model.safetensors")
    assert exp.payload_bytes > 0
    loaded = load_quantized(out / "model.safetensors", model=lambda: _fresh_like(model))
    assert roundtrip_equal_any(model, loaded, example)
    rep = write_report(out)
    html = (out / "report.html").read_text()
    assert res.metric in html or "accuracy" in html
    return rep


def _fresh_like(model):
    import copy

    return copy.deepcopy(_FRESH[type(model)])


_FRESH: dict = {}


def roundtrip_equal_any(model, loaded, example):
    with torch.no_grad():
        model.eval(), loaded.eval()
        if isinstance(example, dict):
            a, b = model(**example), loaded(**example)
        elif isinstance(example, tuple):
            a, b = model(*example), loaded(*example)
        else:
            return roundtrip_equal(model, loaded, example)
    if isinstance(a, dict):
        return all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


_separable_images = usermods.images_of


def _train(model, batches, loss_fn, steps=60, lr=0.02):
    return usermods.train(model, batches, loss_fn, steps=steps, lr=lr)


def test_mobilenet_like_cnn(tmp_path):
    torch.manual_seed(0)
    model = TinyMobileNet()
    _FRESH[TinyMobileNet] = TinyMobileNet()
    x, y = _separable_images(192, 0)
    _train(model, [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)],
           lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    data = {"calib": (x[:64], y[:64]), "heldout": (x[64:128], y[64:128]),
            "test": torch.utils.data.TensorDataset(x[128:], y[128:])}
    res = compress(model, data, task="classification", config=CompressConfig(**FAST),
                   out_dir=tmp_path)
    assert res.metric == "accuracy" and res.fp32_accuracy > 0.5
    assert {r["name"] for r in res.layers} == {"stem", "dw", "pw", "fc"}
    assert res.uniform["w_bits"] == 4 and res.uniform["value"] is not None
    _check_run(tmp_path, model, x[:2], res)


def test_transformer_encoder_on_token_ids(tmp_path):
    torch.manual_seed(0)
    model = TokenClassifier()
    _FRESH[TokenClassifier] = TokenClassifier()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (96, 10), generator=g)
    y = (ids[:, 0] % 3)
    _train(model, [(ids[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)],
           lambda m, b: F.cross_entropy(m(b[0]), b[1]), steps=40)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids[:64], y[:64]),
                                         batch_size=16)
    res = compress(model, {"calib": loader, "test": (ids[64:], y[64:])},
                   config=CompressConfig(**FAST, refine=False), out_dir=tmp_path)
    names = {r["name"] for r in res.layers}
    assert any("self_attn" in n and "out_proj" not in n for n in names), names  # Q/K/V
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the run
    _check_run(tmp_path, model, ids[:2], res)


def test_causal_lm_with_dict_batches(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    _FRESH[TinyLM] = TinyLM()
    ids = torch.randint(0, 24, (64, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[::3, -3:] = 0
    data = {"calib": {"input_ids": ids[:32], "attention_mask": mask[:32]},
            "heldout": {"input_ids": ids[32:48], "attention_mask": mask[32:48]},
            "test": {"input_ids": ids[48:], "attention_mask": mask[48:]}}
    res = compress(model, data, task="causal-lm", config=CompressConfig(**FAST),
                   out_dir=tmp_path)
    assert res.metric == "perplexity" and res.accuracy is None
    assert 1.0 < res.value < 2 * res.fp32_value and res.fp32_value < 40  # vocab 24: ~24
    _check_run(tmp_path, model, {"input_ids": ids[:2]}, res)


def test_embedding_encoder_without_labels(tmp_path):
    torch.manual_seed(0)
    model = Encoder()
    _FRESH[Encoder] = Encoder()
    x = torch.randn(96, 12, generator=torch.Generator().manual_seed(3))
    res = compress(model, {"calib": x[:48], "test": x[48:]}, task="embedding",
                   config=CompressConfig(**FAST, refine=False), out_dir=tmp_path)
    assert res.metric == "cosine" and res.fp32_value == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < res.value < 1.0
    _check_run(tmp_path, model, x[:2], res)


def test_model_returning_a_dict_of_losses(tmp_path):
    torch.manual_seed(0)
    model = LossDictNet()
    _FRESH[LossDictNet] = LossDictNet()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(96, 10, generator=g)
    targets = {"labels": torch.randint(0, 3, (96,), generator=g),
               "boxes": torch.randn(96, 4, generator=g)}

    def part(a, b):
        return (x[a:b], {k: v[a:b] for k, v in targets.items()})

    res = compress(model, {"calib": part(0, 48), "test": part(48, 96)}, task="loss-dict",
                   config=CompressConfig(**FAST, refine=False), out_dir=tmp_path)
    assert res.metric == "loss" and res.value > 0
    _check_run(tmp_path, model, part(0, 2), res)


def test_bert_for_sequence_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (64, 8), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": ids[:, 1] % 3}
    calib = {k: v[:32] for k, v in batch.items()}
    test = {k: v[32:] for k, v in batch.items()}
    res = compress(model, {"calib": calib, "test": test},
                   config=CompressConfig(**FAST, refine=False), out_dir=tmp_path)
    names = {r["name"] for r in res.layers}
    assert any("attention.self.query" in n for n in names)
    assert res.metric == "accuracy"
    assert (tmp_path / "metrics.json").is_file()
    write_report(tmp_path)


def test_data_that_does_not_fit_the_task_names_it():
    model = TinyLM()
    with pytest.raises(DataError, match="causal-lm"):
        compress(model, torch.randn(8, 5), task="causal-lm", config=CompressConfig(**FAST))
    with pytest.raises(DataError, match="classification"):
        compress(TinyMobileNet(), torch.randn(8, 3, 16, 16), config=CompressConfig(**FAST))
    with pytest.raises(DataError, match="classification.*expects"):
        compress(TokenClassifier(), (torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)),
                 config=CompressConfig(**FAST))


def test_a_module_inside_the_config_is_refused_with_the_right_call():
    with pytest.raises(hawq.ConfigError, match=r"hawq.compress\(model, data"):
        CompressConfig(model=TinyMobileNet())
    with pytest.raises(DataError, match="needs data"):
        compress(TinyMobileNet())


_TRAINED: dict = {}


def _cnn_and_data():
    """A trained TinyMobileNet (trained once, then copied) and its images."""
    import copy

    x, y = _separable_images(160, 7)
    if "cnn" not in _TRAINED:
        torch.manual_seed(0)
        model = TinyMobileNet()
        _train(model, [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)],
               lambda m, b: F.cross_entropy(m(b[0]), b[1]), steps=40)
        _TRAINED["cnn"] = model
    return copy.deepcopy(_TRAINED["cnn"]), x, y


def test_zeroq_channelwise_and_finetune_take_the_users_model(tmp_path):
    from hawq.post.config import ZeroQConfig
    from hawq.post.finetune import FinetuneConfig
    from hawq.workflows.workflow import finetune_plan, zeroq

    model, x, y = _cnn_and_data()
    zq = zeroq(model, {"test": (x[96:], y[96:])}, out_dir=tmp_path / "zq",
               config=ZeroQConfig(input_shape=(3, 16, 16), distill_iters=5, distill_batch=8,
                                  bits=(4, 8), target_compression=5.0))
    assert zq.distill is not None and zq.fp32_accuracy is not None
    assert (tmp_path / "zq" / "distill.png").is_file()
    model, x, y = _cnn_and_data()
    cw = compress(model, {"calib": (x[:64], y[:64]), "test": (x[96:], y[96:])},
                  config=CompressConfig(method="cw-hessian", bits=(2, 4, 8), hessian_samples=32,
                                        max_probes=4, calib_samples=32))
    assert cw.allocation["method"] == "cw-hessian"
    assert all(isinstance(r["w_bits"], list) for r in cw.layers)
    model, x, y = _cnn_and_data()
    plan = hawq.BitPlan.uniform(4, 8)
    ft = finetune_plan(model, plan, tmp_path / "ft", data={"calib": (x[:96], y[:96]),
                                                         "test": (x[96:], y[96:])},
                       config=FinetuneConfig(epochs=1, batch_size=32, steps_per_epoch=2,
                                             calib_samples=32, augment="none"))
    assert ft["metric"] == "accuracy" and (tmp_path / "ft" / "finetune.json").is_file()
    assert ft["accuracy"] > 0.3
