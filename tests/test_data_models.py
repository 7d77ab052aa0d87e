import pytest
import torch

import hawq
from hawq.feed.data import load_cifar10, load_digits, resolve_data_dir
from hawq.base.errors import ConfigError, DataError
from hawq.modules.models import build_model, get_spec


def test_missing_data_dir_says_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="--data-dir"):
        resolve_data_dir(tmp_path / "absent")
    monkeypatch.setenv("HAWQ_DATA", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="HAWQ_DATA"):
        resolve_data_dir()
    monkeypatch.setenv("HAWQ_DATA", str(tmp_path))
    with pytest.raises(DataError, match="cifar10.npz"):
        load_cifar10()
    with pytest.raises(DataError, match="resnet20_cifar10.pt"):
        build_model("resnet20")


def test_unknown_model_lists_registry():
    with pytest.raises(ConfigError, match="resnet20"):
        get_spec("resnet21")
    with pytest.raises(ConfigError, match="module:factory"):
        get_spec("no_such_module:make")


def test_user_factory_by_path():
    spec = get_spec("torch.nn:Identity")
    assert isinstance(spec.build(), torch.nn.Identity)


def test_resnet_param_counts():
    for depth, n in [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)]:
        assert hawq.count_params(build_model(f"resnet{depth}", pretrained=False)) == n


def test_digits_model_trains_deterministically():
    a, b = build_model("digits-cnn"), build_model("digits-cnn")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    res = hawq.evaluate(a, load_digits("test"))
    assert res.accuracy > 0.95 and res.samples == 450


@pytest.mark.slow
def test_resnet20_fp32_exact_accuracy(data_dir):
    model = build_model("resnet20", data_dir=data_dir)
    test = load_cifar10(data_dir, "test")
    assert test.tensors[0].shape == (10000, 3, 32, 32)
    res = hawq.evaluate(model, test)
    assert res.samples == 10000 and round(res.accuracy * 10000) == 9173


@pytest.mark.slow
def test_resnet20_w8a8_ptq(data_dir):
    model = build_model("resnet20", data_dir=data_dir)
    hawq.quantize_(model, hawq.BitPlan.uniform(8, 8))
    hawq.calibrate_(model, load_cifar10(data_dir, "train", limit=512))
    res = hawq.evaluate(model, load_cifar10(data_dir, "test", limit=2000))
    assert res.accuracy >= 0.905  # 91.69% on all 10,000 (see the foundation note)
