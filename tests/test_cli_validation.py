"""Bad inputs to the ``hawq`` commands give one-line hawq errors (exit status 2, the argument
named, no traceback), before any work: user model/data factories that fail, malformed data and
weight files, out-of-range numbers (also through the public config classes), output paths that
cannot be written, malformed plans; Ctrl-C prints one line and returns 130."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import hawq.ui.cli as cli
from hawq.base.errors import ConfigError, DataError, HawqError
from hawq.feed.data import load_cifar10, load_dataset
from hawq.modules.models import CifarResNet, build_model
from hawq.post.config import CompressConfig, ZeroQConfig
from hawq.ui.cli import build_parser, main


def _error(capsys, argv: list[str], *names: str) -> str:
    """Run ``hawq argv``; assert exit status 2 and one 'hawq: error:' line naming ``names``
    with no traceback; return the line."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own exit (hawq's parser prints one line first)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err, err
    assert err.startswith("hawq: error: ") and err.count("\n") == 1, err
    for n in names:
        assert n in err, (n, err)
    return err


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """tmp_path as the current folder, with a module of factories named after it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "vfac_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch, torch.nn as nn

        def raises():
            raise RuntimeError("boom in the factory")

        def needs(n):
            return nn.Linear(n, 2)

        def nonmodule():
            return 42

        def nomodel():
            return {"task": "classification"}

        def good():
            torch.manual_seed(0)
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def data_raises():
            raise ValueError("no data here")

        def data_none():
            return None

        def data_str():
            return "hello"

        def data_wrong_shape():
            return (torch.randn(16, 5), torch.randint(0, 10, (16,)))

        def data_empty():
            return (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))

        def data_labels_out_of_range():
            return (torch.randn(16, 1, 8, 8), torch.randint(50, 60, (16,)))

        def data_float_labels():
            return (torch.randn(16, 1, 8, 8), torch.rand(16))

        def data_ok():
            return (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    """))
    (tmp_path / f"{name}_syntax.py").write_text("def f(:\n    pass\n")
    (tmp_path / f"{name}_imports.py").write_text("import no_such_package_xyz\n\ndef f():\n"
                                                 "    pass\n")
    return tmp_path, name


# ----------------------------------------------------------------------------- --model, --data

@pytest.mark.parametrize("attr, says", [
    ("raises", "boom in the factory"), ("needs", "needs arguments ['n']"),
    ("nonmodule", "int"), ("nomodel", "returned no model"), ("missing", "no attribute")])
@pytest.mark.parametrize("form", ["module", "path"])
def test_model_factories_that_fail_name_the_spec(folder, capsys, attr, says, form):
    tmp, name = folder
    spec = f"{name}:{attr}" if form == "module" else f"{tmp / (name + '.py')}:{attr}"
    _error(capsys, ["layers", "--model", spec], spec, says)


@pytest.mark.parametrize("suffix, says", [("_syntax", "SyntaxError"),
                                          ("_imports", "no_such_package_xyz")])
def test_model_modules_that_fail_to_import_name_the_spec(folder, capsys, suffix, says):
    tmp, name = folder
    for spec in (f"{name}{suffix}:f", f"{tmp / (name + suffix + '.py')}:f"):
        _error(capsys, ["layers", "--model", spec], spec, says)


@pytest.mark.parametrize("attr, says", [
    ("data_raises", "no data here"), ("data_none", "is None"), ("data_str", "string"),
    ("data_wrong_shape", "could not run the model"), ("data_empty", "no samples")])
def test_data_factories_that_fail_or_give_unusable_data(folder, capsys, attr, says):
    _, name = folder
    _error(capsys, ["layers", "--model", f"{name}:good", "--data", f"{name}:{attr}"], says)


@pytest.mark.parametrize("attr", ["data_labels_out_of_range", "data_float_labels"])
def test_eval_checks_user_data_against_the_task_before_quantizing(folder, capsys, attr,
                                                                    monkeypatch):
    import hawq.post.biascorr as biascorr

    _, name = folder
    monkeypatch.setattr(biascorr, "quantize_calibrate_",
                        lambda *a, **k: pytest.fail("quantized before checking the data"))
    _error(capsys, ["eval", "--model", f"{name}:good", "--data", f"{name}:{attr}"],
           "could not compute its loss")


@pytest.mark.parametrize("spec", ["nocolon", "mod:", ":attr"])
def test_data_spec_typos(folder, capsys, spec):
    _, name = folder
    _error(capsys, ["layers", "--model", f"{name}:good", "--data", spec], spec)


# ----------------------------------------------------------------------------- data files

def _resnet_dir(path: Path, **arrays) -> Path:
    """A --data-dir with random ResNet-20 weights and (when given) a cifar10.npz of arrays."""
    path.mkdir()
    torch.save(CifarResNet(20).state_dict(), path / "resnet20_cifar10.pt")
    if arrays:
        np.savez(path / "cifar10.npz", **arrays)
    return path


_X = np.zeros((12, 32, 32, 3), np.uint8)
_Y = np.arange(12) % 10
_BAD_NPZ = {
    "wrong keys": (dict(a=_X, b=_Y), "has no ['x_train', 'y_train']"),
    "channels first": (dict(x_train=_X.transpose(0, 3, 1, 2).copy(), y_train=_Y, x_test=_X,
                            y_test=_Y), "expected uint8 images N×32×32×3"),
    "float images": (dict(x_train=_X.astype(np.float64), y_train=_Y, x_test=_X, y_test=_Y),
                     "float64"),
    "float labels": (dict(x_train=_X, y_train=_Y + 0.5, x_test=_X, y_test=_Y),
                     "integer labels"),
    "labels out of range": (dict(x_train=_X, y_train=_Y + 100, x_test=_X, y_test=_Y),
                            "expected 0..9"),
    "empty": (dict(x_train=_X[:0], y_train=_Y[:0], x_test=_X, y_test=_Y), "no samples"),
    "count mismatch": (dict(x_train=_X, y_train=_Y[:5], x_test=_X, y_test=_Y),
                       "12 images but y_train has 5 labels"),
    "objects": (dict(x_train=np.array([object(), 1], dtype=object), y_train=_Y, x_test=_X,
                     y_test=_Y), "not a readable .npz"),
}


@pytest.mark.parametrize("case", list(_BAD_NPZ))
def test_malformed_cifar10_file_is_a_data_error_naming_it(tmp_path, capsys, case):
    arrays, says = _BAD_NPZ[case]
    d = _resnet_dir(tmp_path / "d", **arrays)
    with pytest.raises(DataError, match="cifar10.npz") as e:
        load_cifar10(d, "train", 4)
    assert says in str(e.value)
    _error(capsys, ["eval", "--model", "resnet20", "--data-dir", str(d), "--calib-samples", "4",
                    "--test-samples", "4"], "cifar10.npz", says)


@pytest.mark.parametrize("content", [b"", b"not a zip" * 20, b"PK\x03\x04" + b"\0" * 50])
def test_truncated_or_garbage_cifar10_file(tmp_path, capsys, content):
    d = _resnet_dir(tmp_path / "d", x_train=_X, y_train=_Y, x_test=_X, y_test=_Y)
    whole = (d / "cifar10.npz").read_bytes()
    (d / "cifar10.npz").write_bytes(content or whole[: len(whole) // 2])
    _error(capsys, ["eval", "--model", "resnet20", "--data-dir", str(d), "--calib-samples", "4",
                    "--test-samples", "4"], str(d / "cifar10.npz"), "not a readable .npz")


def test_a_good_cifar10_file_still_loads(tmp_path):
    d = _resnet_dir(tmp_path / "d", x_train=_X, y_train=_Y, x_test=_X, y_test=_Y)
    ds = load_cifar10(d, "test", 5)
    assert ds.tensors[0].shape == (5, 3, 32, 32) and ds.tensors[1].tolist() == [0, 1, 2, 3, 4]
    assert len(load_cifar10(d, "train")) == 12


@pytest.mark.parametrize("write, says", [
    (lambda p: p.write_bytes(p.read_bytes()[:3000]), "cannot be read"),
    (lambda p: p.write_bytes(b"garbage" * 50), "cannot be read"),
    (lambda p: torch.save({"foo": torch.zeros(3)}, p), "missing"),
    (lambda p: torch.save(CifarResNet(32).state_dict(), p), "unexpected"),
    (lambda p: torch.save(torch.zeros(3), p), "not a state dict"),
])
def test_bad_pretrained_weights_are_a_data_error_naming_the_file(tmp_path, capsys, write, says):
    d = _resnet_dir(tmp_path / "d")
    write(d / "resnet20_cifar10.pt")
    with pytest.raises(DataError, match="resnet20_cifar10.pt"):
        build_model("resnet20", data_dir=d)
    _error(capsys, ["layers", "--model", "resnet20", "--data-dir", str(d)],
           "resnet20_cifar10.pt", says)


def test_good_weights_still_load(tmp_path):
    d = _resnet_dir(tmp_path / "d")
    want = torch.load(d / "resnet20_cifar10.pt", weights_only=True)
    got = build_model("resnet20", data_dir=d).state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("argv, flag", [
    (["eval", "--samples", "-5"], "--samples"),
    (["eval", "--samples", "0"], "--samples"),
    (["eval", "--test-samples", "0"], "--test-samples"),
    (["eval", "--test-samples", "-5"], "--test-samples"),
    (["eval", "--calib-samples", "0"], "--calib-samples"),
    (["eval", "--calib-samples", "-4"], "--calib-samples"),
    (["analyze", "--samples", "-5"], "--samples"),
    (["analyze", "--hessian-samples", "0"], "--hessian-samples"),
    (["analyze", "--max-probes", "0"], "--max-probes"),
    (["analyze", "--tol", "-1"], "--tol"),
    (["analyze", "--tol", "nan"], "--tol"),
    (["analyze", "--batch-size", "0"], "--batch-size"),
    (["layers", "--threads", "-3"], "--threads"),
    (["layers", "--threads", "0"], "--threads"),
    (["layers", "--threads", "x"], "--threads"),
    (["layers", "--seed", "-1"], "--seed"),
    (["compress", "--hessian-samples", "0"], "--hessian-samples"),
    (["compress", "--samples", "-5"], "--samples"),
    (["compress", "--calib-samples", "-3"], "--calib-samples"),
    (["compress", "--test-samples", "0"], "--test-samples"),
    (["compress", "--max-probes", "0"], "--max-probes"),
    (["compress", "--tol", "-1"], "--tol"),
    (["compress", "--target-compression", "0.5"], "--target-compression"),
    (["compress", "--target-compression", "-2"], "--target-compression"),
    (["compress", "--target-compression", "inf"], "--target-compression"),
    (["compress", "--target-avg-bits", "0"], "--target-avg-bits"),
    (["compress", "--target-avg-bits", "50"], "--target-avg-bits"),
    (["compress", "--target-bytes", "-5"], "--target-bytes"),
    (["compress", "--target-fraction", "1.5"], "--target-fraction"),
    (["compress", "--bops", "-1", "--allocator", "ilp"], "--bops"),
    (["compress", "--refine-samples", "0"], "--refine-samples"),
    (["compress", "--episodes", "0"], "--episodes"),
    (["compress", "--finetune", "-1"], "--finetune"),
    (["compress", "--batch-size", "0"], "--batch-size"),
    (["compress", "--lr", "-1"], "--lr"),
    (["compress", "--bits", "2,x,8"], "--bits"),
    (["zeroq", "--distill-iters", "-1"], "--distill-iters"),
    (["zeroq", "--distill-lr", "0"], "--distill-lr"),
    (["zeroq", "--distill-batch", "0"], "--distill-batch"),
    (["zeroq", "--max-probes", "0"], "--max-probes"),
    (["zeroq", "--test-samples", "-5"], "--test-samples"),
    (["zeroq", "--target-compression", "0.5"], "--target-compression"),
    (["zeroq", "--input-shape", "3,x"], "--input-shape"),
    (["finetune", "--plan", "p.json", "--epochs", "-1"], "--epochs"),
    (["finetune", "--plan", "p.json", "--batch-size", "0"], "--batch-size"),
    (["finetune", "--plan", "p.json", "--steps-per-epoch", "0"], "--steps-per-epoch"),
    (["finetune", "--plan", "p.json", "--train-samples", "-5"], "--train-samples"),
    (["finetune", "--plan", "p.json", "--test-samples", "0"], "--test-samples"),
    (["finetune", "--plan", "p.json", "--bn-fold-at", "2"], "--bn-fold-at"),
    (["finetune", "--plan", "p.json", "--distill", "-1"], "--distill"),
    (["finetune", "--plan", "p.json", "--a-avg-bits", "0"], "--a-avg-bits"),
    (["export", "--model", "digits-cnn", "--plan", "p.json", "--out", "m.safetensors",
      "--calib-samples", "0"], "--calib-samples"),
    (["report", "run", "--density", "--density-samples", "0"], "--density-samples"),
    (["compress", "--task", "nope"], "--task"),
])
def test_out_of_range_numbers_fail_at_the_flag(capsys, monkeypatch, argv, flag):
    monkeypatch.setattr(cli, "_inputs", lambda *a, **k: pytest.fail("work started"))
    _error(capsys, argv, flag)


@pytest.mark.parametrize("argv, says", [
    (["compress", "--bits", "1"], "bits=1"), (["compress", "--bits", "99"], "bits=99"),
    (["compress", "--bits", ","], "bits is empty"), (["compress", "--a-bits", "0"], "a_bits=0"),
    (["zeroq", "--input-shape", "0,8"], "input_shape"), (["zeroq", "--w-bits", "1"], "w_bits=1"),
    (["eval", "--w-bits", "1"], "w_bits=1"), (["eval", "--a-bits", "99"], "a_bits=99"),
])
def test_bad_bit_widths_fail_before_the_model_is_built(capsys, monkeypatch, argv, says):
    monkeypatch.setattr(cli, "_inputs", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(cli, "_job_inputs", lambda *a, **k: pytest.fail("work started"))
    _error(capsys, argv, says)


@pytest.mark.parametrize("cls, kw, says", [
    (CompressConfig, dict(test_samples=0), "test_samples=0"),
    (CompressConfig, dict(hessian_samples=-5), "hessian_samples=-5"),
    (CompressConfig, dict(tol=-1.0), "tol=-1.0"),
    (CompressConfig, dict(target_compression=0.5), "target_compression=0.5"),
    (CompressConfig, dict(target_avg_bits=40), "target_avg_bits=40"),
    (CompressConfig, dict(calib_samples=True), "calib_samples=True"),
    (CompressConfig, dict(max_probes=2.5), "max_probes=2.5"),
    (CompressConfig, dict(bits=(2, 4.5)), "bits=4.5"),
    (CompressConfig, dict(bits="2,4"), "bits='2,4'"),
    (CompressConfig, dict(seed=-1), "seed=-1"),
    (ZeroQConfig, dict(distill_iters=-1), "distill_iters=-1"),
    (ZeroQConfig, dict(hessian_tol=float("nan")), "hessian_tol=nan"),
    (ZeroQConfig, dict(input_shape=(3, 0, 8)), "input_shape"),
])
def test_public_configs_reject_the_same_values(cls, kw, says):
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    assert says in str(e.value)


def test_compress_function_rejects_bad_overrides_before_any_work():
    from hawq.workflows.workflow import compress

    x = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(ConfigError, match="test_samples=0"):
        compress(nn.Linear(4, 2), x, test_samples=0)


def test_valid_values_and_defaults_parse_as_before():
    p = build_parser()
    a = p.parse_args(["compress", "--target-compression", "8", "--tol", "0", "--bits", "4,4,8",
                      "--test-samples", "5", "--finetune", "0", "--seed", "3"])
    cfg = cli.config_from_args(CompressConfig, a)
    assert (cfg.target_compression, cfg.tol, cfg.bits, cfg.test_samples, cfg.seed) == (
        8.0, 0.0, (4, 8), 5, 3)
    assert cli.config_from_args(CompressConfig, p.parse_args(["compress"])) == CompressConfig()
    assert cli.config_from_args(ZeroQConfig, p.parse_args(["zeroq"])) == ZeroQConfig()
    e = p.parse_args(["eval"])
    assert (e.calib_samples, e.test_samples, e.seed) == (512, None, 0)
    an = p.parse_args(["analyze", "--samples", "32", "--tol", "0.5", "--threads", "1"])
    assert (an.hessian_samples, an.tol, an.max_probes, an.threads) == (32, 0.5, 200, 1)
    f = p.parse_args(["finetune", "--plan", "p.json", "--distill", "0", "--bn-fold-at", "1"])
    assert (f.epochs, f.lr, f.batch_size, f.distill, f.bn_fold_at) == (1, 0.005, 128, 0.0, 1.0)
    with pytest.raises(ConfigError):
        load_dataset("digits", "test", None, -5)  # the negative slice of before


# ----------------------------------------------------------------------------- plans

@pytest.mark.parametrize("content, says", [
    ("{not json", "not valid JSON"), ("", "not valid JSON"), ("[1, 2]", "'layers'"),
    (json.dumps({"layers": {"conv1": {"w_bits": "x", "a_bits": 8}}}), "w_bits='x'"),
    (json.dumps({"layers": {"conv1": {"w_bits": 4.5, "a_bits": 8}}}), "w_bits=4.5"),
    (json.dumps({"layers": {"conv1": {"w_bits": 1, "a_bits": 8}}}), "w_bits=1"),
    (json.dumps({"layers": {"conv1": {"bits": 4}}}), "plan entry conv1"),
])
def test_malformed_plans_fail_before_the_model_is_built(tmp_path, capsys, monkeypatch,
                                                         content, says):
    monkeypatch.setattr(cli, "_inputs", lambda *a, **k: pytest.fail("work started"))
    plan = tmp_path / "plan.json"
    plan.write_text(content)
    _error(capsys, ["eval", "--plan", str(plan)], says)


def test_a_plan_naming_unknown_layers(folder, capsys):
    tmp, name = folder
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"layers": {"nope": {"w_bits": 4, "a_bits": 8}}}))
    _error(capsys, ["eval", "--model", f"{name}:good", "--data", f"{name}:data_ok", "--plan",
                    str(plan)], "nope", "quantizable layers are ['1']")


# ----------------------------------------------------------------------------- output paths

def _no_work(monkeypatch):
    """Make any start of the work fail the test."""
    import hawq.analysis.hessian as hessian
    import hawq.workflows.workflow as workflow

    def boom(*a, **k):
        pytest.fail("the analysis started before the outputs were checked")

    monkeypatch.setattr(cli, "_inputs", boom)
    monkeypatch.setattr(cli, "_job_inputs", boom)
    monkeypatch.setattr(hessian, "analyze", boom)
    monkeypatch.setattr(workflow, "compress", boom)
    monkeypatch.setattr(workflow, "zeroq", boom)


@pytest.mark.parametrize("command", [["compress"], ["zeroq"], ["analyze"], ["layers"],
                                     ["finetune", "--plan", "p.json"]])
def test_unusable_outputs_fail_before_any_work(tmp_path, capsys, monkeypatch, command):
    _no_work(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    if command[0] in ("compress", "zeroq", "finetune"):
        _error(capsys, [*command, "--out", str(a_file)], "--out", "existing file")
        _error(capsys, [*command, "--out", str(a_file / "sub")], "--out", "is a file")
    _error(capsys, [*command, "--json", str(a_dir)], "--json", "is a folder")
    _error(capsys, [*command, "--json", str(a_file / "x.json")], "--json", "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]
    assert a_file.read_text() == "x" and not any(a_dir.iterdir())


def test_plot_and_onnx_targets_are_checked_first(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    _error(capsys, ["allocate", "--sensitivity-file", "s.json", "--plot", str(a_dir)],
           "--plot", "is a folder")
    _error(capsys, ["export", "--model", "digits-cnn", "--plan", "p.json", "--out",
                    str(a_dir)], "--out", "is a folder")
    _error(capsys, ["export", "--model", "digits-cnn", "--plan", "p.json", "--out",
                    str(tmp_path / "m.safetensors"), "--onnx", str(a_dir)], "--onnx")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _error(capsys, ["report", str(tmp_path), "--out", str(a_file)], "--out", "existing file")
    assert a_file.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes anywhere")
def test_a_read_only_folder_is_refused_first(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _error(capsys, ["compress", "--out", str(ro / "run")], "--out", "cannot be written")
        _error(capsys, ["layers", "--json", str(ro / "x.json")], "--json", "cannot be written")
    finally:
        ro.chmod(0o755)


def test_check_outputs_accepts_new_and_existing_places(tmp_path):
    p = build_parser()
    (tmp_path / "old").mkdir()
    for argv in (["compress", "--out", str(tmp_path / "new" / "deeper")],
                 ["compress", "--out", str(tmp_path / "old"), "--json", str(tmp_path / "r.json")],
                 ["export", "--model", "m", "--plan", "p", "--out", str(tmp_path / "m.st")],
                 ["layers", "--json", "relative.json"]):
        cli.check_outputs(p.parse_args(argv))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["old"]  # nothing created


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_during_the_work_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    import hawq.analysis.hessian as hessian

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(hessian, "analyze", interrupt)
    out = tmp_path / "res.json"
    assert main(["analyze", "--samples", "8", "--json", str(out)]) == 130
    err = capsys.readouterr().err
    assert err == "hawq: interrupted\n"
    assert list(tmp_path.iterdir()) == []  # no result, no half-written temporary file


def test_ctrl_c_while_building_the_parser_or_the_model(capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_inputs", interrupt)
    assert main(["layers"]) == 130
    assert capsys.readouterr().err == "hawq: interrupted\n"
    monkeypatch.setattr(cli, "build_parser", interrupt)
    assert main(["layers"]) == 130
    assert capsys.readouterr().err == "hawq: interrupted\n"


def test_hawq_errors_are_still_hawq_errors():
    assert issubclass(DataError, HawqError) and issubclass(ConfigError, HawqError)


@pytest.mark.parametrize("layers", [[1, 2], "conv1", 3, {"a": {"w_bits": 4}, 5: {"w_bits": 4}}])
def test_plan_whose_layers_is_not_an_object_is_a_config_error(layers):
    from hawq.maths.plan import BitPlan

    with pytest.raises(ConfigError, match="'layers' is an object"):
        BitPlan.from_dict({"layers": layers})
