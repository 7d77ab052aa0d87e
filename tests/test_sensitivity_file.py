"""One sensitivity format, checked against the model; run folders owned by one run; negative
traces warned about. ``hawq allocate`` / ``compress`` / ``eval`` run in-process on the built-in
``digits-cnn`` with small sample counts."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hawq.analysis.sensfile import load_sensitivity, parse_sensitivity
from hawq.analysis.sensitivities import (
    clamp_curvature,
    hessian_warnings,
    negative_curvature,
    sensitivity_costs,
)
from hawq.base.errors import ConfigError, DataError, HawqError
from hawq.maths.plan import BitPlan, QuantConfig
from hawq.ui.cli import main

MODEL = "digits-cnn"
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
FAST = ["--hessian-samples", "64", "--max-probes", "6", "--calib-samples", "64",
        "--test-samples", "100"]


def _run(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout/stderr captured; any exception that is not a hawq error (a raw
    traceback for the user) propagates and fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _assert_clean_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("hawq: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The two writers' files for digits-cnn: analyze --json and compress --out's
    sensitivity.json (plus the run folder)."""
    d = tmp_path_factory.mktemp("sens")
    rc, _, err = _run(["analyze", "--model", MODEL, "--hessian-samples", "64", "--max-probes",
                       "6", "--json", str(d / "analyze.json")])
    assert rc == 0, err
    run = d / "run"
    rc, _, err = _run(["compress", *FAST, "--sensitivity", "hawq-v2", "--target-compression",
                       "8", "--out", str(run)])
    assert rc == 0, err
    return {"analyze": d / "analyze.json", "run": run / "sensitivity.json", "run_dir": run}


def _eval_compression(plan_path: Path) -> float:
    """The weight compression 'hawq eval --plan' reports for the plan (its accounting, without
    the evaluation pass)."""
    from hawq.modules.accounting import budget_report, count_params
    from hawq.modules.models import build_model
    from hawq.modules.surgery import layers

    model = build_model(MODEL, pretrained=True)
    infos = layers(model, torch.zeros(1, 1, 8, 8))
    return budget_report(infos, BitPlan.from_json(plan_path), count_params(model)).weight_compression


def _printed_compression(stdout: str) -> float:
    m = re.search(r"avg bits, ([0-9.]+)x, total Omega", stdout)
    assert m, stdout
    return float(m.group(1))


# ----------------------------------------------------------------------------- one format

@pytest.mark.parametrize("which", ["analyze", "run"])
def test_allocate_reads_both_writers_and_eval_agrees(files, which, tmp_path):
    plan = tmp_path / "plan.json"
    rc, out, err = _run(["allocate", "--sensitivity-file", str(files[which]),
                         "--target-compression", "8", "--json", str(plan)])
    assert rc == 0, err
    printed = _printed_compression(out)
    assert sorted(BitPlan.from_json(plan).layers) == sorted(LAYERS)
    rc, eout, err = _run(["eval", "--model", MODEL, "--plan", str(plan), "--test-samples", "50",
                          "--calib-samples", "32", "--json", str(tmp_path / "e.json")])
    assert rc == 0, err
    shown = re.search(r"weights ([0-9.]+)x", eout)
    assert shown and float(shown.group(1)) == pytest.approx(printed, abs=0.006)
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["budget"]["weight_compression"] == pytest.approx(
        json.loads(plan.read_text())["weight_compression"], rel=1e-12)


def test_the_two_forms_parse_to_the_same_layers(files):
    a, r = load_sensitivity(files["analyze"]), load_sensitivity(files["run"])
    assert (a.form, r.form) == ("analysis", "run")
    assert a.names == r.names == LAYERS and a.model == r.model == MODEL
    assert all(isinstance(s, float) and math.isfinite(s) for s in a.scores + r.scores)


# ----------------------------------------------------------------------------- bad files

def _mutated(base: dict, how: str) -> dict | list:
    d = copy.deepcopy(base)
    layers = d["layers"]
    if how == "partial":
        d["layers"] = layers[1:]
    elif how == "duplicate":
        layers.append(copy.deepcopy(layers[1]))
    elif how == "params":
        layers[2]["params"] = 10
    elif how == "noname":
        del layers[0]["name"]
    elif how == "unknown":
        layers[0]["name"] = "nope"
    elif how == "other-model":
        for i, lh in enumerate(layers):
            lh["name"] = f"layer{i}.0.conv1"
    elif how == "string-trace":
        layers[1]["avg_trace"] = "big"
    elif how == "nan-trace":
        layers[1]["avg_trace"] = float("nan")
    elif how == "missing-trace":
        del layers[1]["avg_trace"]
    elif how == "bool-trace":
        layers[1]["avg_trace"] = True
    elif how == "layers-dict":
        d["layers"] = {"conv1": 1.0}
    elif how == "entry-string":
        layers[0] = "conv1"
    elif how == "activation-metric":
        d["metric"] = "activation"
    elif how == "not-object":
        return [1, 2]
    elif how == "no-layers":
        del d["layers"]
    elif how == "version":
        d["version"] = 7
    return d


BAD = {
    "partial": ("has no score for the model's layers ['conv1']",),
    "duplicate": ("lists layer 'conv2' twice",),
    "params": ("'fc1' has 10 weights but the model's has 32768",),
    "noname": ("layer entry #0 has no 'name'",),
    "unknown": ("lists layers ['nope'] that the model does not have",),
    "other-model": ("that the model does not have", "made for another model"),
    "string-trace": ("layer 'conv2' has avg_trace='big', not a finite number",),
    "nan-trace": ("layer 'conv2' has avg_trace=nan",),
    "missing-trace": ("layer 'conv2' has no 'avg_trace'",),
    "bool-trace": ("layer 'conv2' has avg_trace=True",),
    "layers-dict": ("'layers' must be a non-empty list",),
    "entry-string": ("layer entry #0 is a str",),
    "activation-metric": ("metric 'activation' cannot score weight bits",),
    "not-object": ("expected a JSON object",),
    "no-layers": ("has neither 'layers'",),
    "version": ("version 7 is not 1",),
}


@pytest.mark.parametrize("how", sorted(BAD))
def test_bad_sensitivity_file_is_one_clean_error(files, tmp_path, how):
    base = json.loads(files["analyze"].read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_mutated(base, how)))
    rc, _, err = _run(["allocate", "--sensitivity-file", str(bad), "--model", MODEL,
                         "--target-compression", "8", "--json", str(tmp_path / "plan.json")])
    _assert_clean_error(rc, err, *BAD[how])
    assert not (tmp_path / "plan.json").exists()


def test_run_form_is_checked_the_same_way(files, tmp_path):
    data = json.loads(files["run"].read_text())
    data["hessian"]["layers"] = data["hessian"]["layers"][:2]
    bad = tmp_path / "sensitivity.json"
    bad.write_text(json.dumps(data))
    rc, _, err = _run(["allocate", "--sensitivity-file", str(bad), "--target-compression", "8"])
    _assert_clean_error(rc, err, "no score for the model's layers ['fc1', 'fc2']")


def test_run_without_hessian_statistics_says_what_to_do(tmp_path):
    f = tmp_path / "sensitivity.json"
    f.write_text(json.dumps({"names": LAYERS, "omega": [[1.0, 0.0]] * 4, "measured": [],
                             "model": MODEL}))
    rc, _, err = _run(["allocate", "--sensitivity-file", str(f), "--target-compression", "8"])
    _assert_clean_error(rc, err, "holds no Hessian statistics", "hawq analyze")


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[" * 100000, b"{\"layers\": [",
                                     b""])
def test_unreadable_files_are_data_errors(tmp_path, content):
    f = tmp_path / "s.json"
    f.write_bytes(content)
    rc, _, err = _run(["allocate", "--sensitivity-file", str(f), "--model", MODEL,
                       "--target-compression", "8"])
    _assert_clean_error(rc, err, str(f))
    rc, _, err = _run(["allocate", "--sensitivity-file", str(tmp_path), "--model", MODEL,
                       "--target-compression", "8"])
    _assert_clean_error(rc, err, "is a directory")


def test_v1_rule_needs_eigenvalues(files):
    rc, _, err = _run(["allocate", "--sensitivity-file", str(files["analyze"]),
                       "--allocator", "v1-rule", "--target-compression", "8"])
    _assert_clean_error(rc, err, "v1-rule", "--metric eigen")


def test_eigen_file_with_v1_rule_covers_the_model(files, tmp_path):
    base = json.loads(files["analyze"].read_text())
    base["metric"] = "eigen"
    for i, lh in enumerate(base["layers"]):
        lh["eigenvalue"] = [1.0 + i, 0.5]
        lh["avg_trace"] = None
    f = tmp_path / "eig.json"
    f.write_text(json.dumps(base))
    plan = tmp_path / "plan.json"
    rc, out, err = _run(["allocate", "--sensitivity-file", str(f), "--allocator", "v1-rule",
                         "--target-compression", "8", "--json", str(plan)])
    assert rc == 0, err
    assert _printed_compression(out) == pytest.approx(_eval_compression(plan), abs=0.006)


# ----------------------------------------------------------------------------- the model

def test_model_named_by_the_file_is_built_only_when_built_in(files, tmp_path, monkeypatch):
    evil = tmp_path / "evil.py"
    marker = tmp_path / "imported"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                    "def make():\n    raise SystemExit('ran')\n")
    base = json.loads(files["analyze"].read_text())
    for spec in (f"{evil}:make", "os:getcwd", "resnet1000"):
        base["model"] = spec
        f = tmp_path / "s.json"
        f.write_text(json.dumps(base))
        monkeypatch.chdir(tmp_path)
        rc, _, err = _run(["allocate", "--sensitivity-file", str(f), "--target-compression", "8"])
        _assert_clean_error(rc, err, "not a built-in model", "give --model")
        assert not marker.exists()
    # with --model given the file's model name is only a note
    rc, out, err = _run(["allocate", "--sensitivity-file", str(f), "--model", MODEL,
                         "--target-compression", "8"])
    assert rc == 0, err
    assert "made for model 'resnet1000'" in out
    del base["model"]
    f.write_text(json.dumps(base))
    rc, _, err = _run(["allocate", "--sensitivity-file", str(f), "--target-compression", "8"])
    _assert_clean_error(rc, err, "names no model: give --model")


# ----------------------------------------------------------------------------- negative traces

def test_negative_trace_in_file_is_clamped_and_warned(files, tmp_path):
    base = json.loads(files["analyze"].read_text())
    base["layers"][3]["avg_trace"] = -0.5
    base["layers"][3]["trace"] = -320.0
    f = tmp_path / "neg.json"
    f.write_text(json.dumps(base))
    plan = tmp_path / "plan.json"
    rc, out, err = _run(["allocate", "--sensitivity-file", str(f), "--target-compression", "8",
                         "--json", str(plan)])
    assert rc == 0, err
    warn = [ln for ln in out.splitlines() if ln.startswith("warning: negative")]
    assert len(warn) == 1 and "'fc2'" in warn[0] and "clamped at 0" in warn[0]
    assert "--max-probes" in warn[0] and "--tol" in warn[0]
    omega = float(re.search(r"total Omega ([-0-9.e]+)", out).group(1))
    assert omega >= 0  # a negative cost would have been summed in
    saved = json.loads(plan.read_text())
    assert saved["warnings"] == [w[len("warning: "):] for w in warn]
    assert _printed_compression(out) == pytest.approx(_eval_compression(plan), abs=0.006)


def test_hessian_warnings_and_clamp():
    stats = {"hessian": {"metric": "trace", "layers": [
        {"name": "a", "trace": -3.0, "avg_trace": -0.1, "stderr": 1.0},
        {"name": "b", "trace": 2.0, "avg_trace": 0.2, "stderr": 0.01},
        {"name": "c", "eigenvalue": [-1.0], "trace": None}]}}
    assert negative_curvature(stats) == ["a", "c"]
    warns = hessian_warnings(stats)
    assert any("['a', 'c']" in w and "clamped at 0" in w and "--max-probes" in w
               and "--tol" in w for w in warns)
    assert clamp_curvature([-1.0, 0.0, 2.5]).tolist() == [0.0, 0.0, 2.5]
    assert hessian_warnings({"hessian": {"layers": [{"name": "b", "trace": 1.0}]}}) == []


def _negative_analyze(monkeypatch):
    """hawq.analysis.sensitivities.analyze replaced by one that reports fc2's trace negative."""
    import hawq.analysis.sensitivities as sens_mod

    real = sens_mod.analyze

    def fake(model, data, **kw):
        res = real(model, data, **kw)
        lh = res.layers[-1]
        lh.trace, lh.avg_trace = -abs(lh.trace or 1.0), -abs(lh.avg_trace or 1e-3)
        return res

    monkeypatch.setattr(sens_mod, "analyze", fake)


def test_negative_trace_in_compress_is_clamped_and_printed(monkeypatch, tmp_path):
    from hawq.feed.data import load_dataset
    from hawq.modules.models import build_model

    _negative_analyze(monkeypatch)
    model = build_model(MODEL, pretrained=True)
    x, y = load_dataset("digits", "train", None, 64).tensors
    omega, stats = sensitivity_costs(model, (x, y), LAYERS, (2, 4, 8), "hawq-v2", QuantConfig(),
                                     hessian_samples=64, max_probes=4)
    assert np.all(omega[-1] == 0.0) and np.all(omega[:-1] >= 0)
    assert any("negative" in w and "'fc2'" in w for w in stats["warnings"])
    rc, out, err = _run(["compress", *FAST, "--sensitivity", "hawq-v2", "--target-compression",
                         "8", "--out", str(tmp_path / "run")])
    assert rc == 0, err
    assert any(ln.startswith("warning: negative Hessian estimate") and "fc2" in ln
               for ln in out.splitlines())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert any("clamped at 0" in w for w in metrics["warnings"])


# ----------------------------------------------------------------------------- run folders

def test_reused_run_folder_is_refused_before_any_work(files, tmp_path, monkeypatch):
    import hawq.workflows.workflow as wf

    run = tmp_path / "run"
    run.mkdir()
    for name in ("plan.json", "metrics.json", "sensitivity.json", "command.json"):
        (run / name).write_text((files["run_dir"] / name).read_text())
    (run / "model.safetensors").write_bytes(b"old export")
    (run / "model.json").write_text("{}")
    (run / "finetune").mkdir()
    (run / "finetune" / "finetune.json").write_text("{}")
    (run / "notes.txt").write_text("mine")

    def no_work(*a, **k):
        raise AssertionError("the folder must be checked before any work")

    monkeypatch.setattr(wf, "setup", no_work)
    rc, _, err = _run(["compress", *FAST, "--target-compression", "8", "--out", str(run)])
    _assert_clean_error(rc, err, "already holds another run's files", "model.safetensors",
                        "finetune/", "pass a new --out")
    rc, _, err = _run(["zeroq", "--out", str(run)])
    _assert_clean_error(rc, err, "already holds another run's files")
    assert (run / "model.safetensors").read_bytes() == b"old export"  # nothing touched
    monkeypatch.undo()

    res = wf.compress(MODEL, out_dir=run, overwrite=True, sensitivity="hawq-v2",
                      target_compression=8, hessian_samples=64, max_probes=6, calib_samples=64,
                      test_samples=100)
    assert not (run / "model.safetensors").exists() and not (run / "finetune").exists()
    assert (run / "notes.txt").read_text() == "mine"  # only hawq's own files are cleared
    assert any("cleared" in w and "model.safetensors" in w for w in res.warnings)
    marker = json.loads((run / "run.json").read_text())
    assert marker["kind"] == "compress" and len(marker["run_id"]) == 32
    assert sorted(wf.run_files(run)) == sorted(["plan.json", "metrics.json", "sensitivity.json",
                                                "frontier.png", "layers.png"])


def test_cli_overwrite_flag_reaches_compress_and_zeroq(tmp_path, monkeypatch):
    import hawq.workflows.workflow as wf

    seen = {}

    def fake(name):
        def run(*a, overwrite=False, **k):
            seen[name] = overwrite
            raise ConfigError("stop here")
        return run

    monkeypatch.setattr(wf, "compress", fake("compress"))
    monkeypatch.setattr(wf, "zeroq", fake("zeroq"))
    _run(["compress", "--target-compression", "8", "--out", str(tmp_path / "a"), "--overwrite"])
    _run(["zeroq", "--out", str(tmp_path / "b"), "--overwrite"])
    _run(["compress", "--target-compression", "8", "--out", str(tmp_path / "c")])
    assert seen == {"compress": False, "zeroq": True}  # the last call: no --overwrite


def test_out_that_is_a_file_or_unwritable_fails_first(tmp_path, monkeypatch):
    import hawq.workflows.workflow as wf

    monkeypatch.setattr(wf, "setup", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("checked too late")))
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _run(["compress", "--target-compression", "8", "--out", str(f)])
    _assert_clean_error(rc, err, "is an existing file")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            rc, _, err = _run(["compress", "--target-compression", "8",
                               "--out", str(ro / "run")])
            _assert_clean_error(rc, err, "cannot be written", "writable --out")
        finally:
            ro.chmod(0o700)


def test_failed_run_leaves_no_claim_and_a_stopped_one_is_taken_over(tmp_path):
    import hawq.workflows.workflow as wf
    from hawq.base.errors import BudgetError

    run = tmp_path / "run"
    with pytest.raises(BudgetError):  # fails after the claim, in the budget check
        wf.compress(MODEL, out_dir=run, sensitivity="measured", bits=(4, 8),
                    target_compression=16.0, calib_samples=64, test_samples=50)
    assert not run.exists()
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"run_id": "stopped", "kind": "compress"}))
    run_id, removed = wf.claim_run_dir(run, "compress")
    assert removed == [] and json.loads((run / "run.json").read_text())["run_id"] == run_id


def test_write_outputs_checks_the_folder_is_still_this_runs(files, tmp_path):
    import hawq.workflows.workflow as wf

    run = tmp_path / "run"
    run_id, _ = wf.claim_run_dir(run, "compress")
    wf.claim_run_dir(run, "compress")  # another run takes the (still empty) folder
    metrics = json.loads((files["run_dir"] / "metrics.json").read_text())
    res = wf.CompressResult(**{k: v for k, v in metrics.items()})
    with pytest.raises(ConfigError, match="taken by another run"):
        wf.write_outputs(run, res, {}, None, np.ones(4), LAYERS, run_id=run_id)
    assert not (run / "plan.json").exists()


def test_finetune_refuses_a_compress_folder(files, tmp_path):
    plan = tmp_path / "plan.json"
    BitPlan.uniform(4, 8).to_json(plan)
    rc, _, err = _run(["finetune", "--plan", str(plan), "--out", str(files["run_dir"]),
                       "--epochs", "1", "--steps-per-epoch", "1", "--test-samples", "50"])
    _assert_clean_error(rc, err, "holds a compress/zeroq run", "finetune")
    assert not (files["run_dir"] / "last.pt").exists()


# ----------------------------------------------------------------------------- fuzz

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.lists(st.floats(-1e3, 1e3), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                    st.sampled_from(LAYERS + ["resnet20", "digits-cnn", "layer1.0.conv1",
                                              "os:getcwd", "trace", "eigen", "fisher"]))
_TOP = ["model", "metric", "layers", "version"]
_PER_LAYER = ["name", "params", "trace", "avg_trace", "eigenvalue", "stderr"]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(_TOP + _PER_LAYER), st.integers(0, 5),
                                _VALUES), min_size=1, max_size=3),
       give_model=st.booleans(), form=st.sampled_from(["analyze", "run"]))
def test_fuzzed_sensitivity_file_gives_hawq_error_or_a_true_plan(files, tmp_path, edits,
                                                                 give_model, form):
    data = json.loads(files[form].read_text())
    hess = data if form == "analyze" else data["hessian"]
    for field, i, value in edits:
        if field in _TOP:
            (data if field == "model" else hess)[field] = value
        elif isinstance(hess.get("layers"), list) and hess["layers"]:
            lh = hess["layers"][i % len(hess["layers"])]
            if isinstance(lh, dict):
                lh[field] = value
    f = tmp_path / "fuzz.json"
    f.write_text(json.dumps(data))
    plan = tmp_path / "fuzz_plan.json"
    if plan.exists():
        plan.unlink()
    argv = ["allocate", "--sensitivity-file", str(f), "--target-compression", "8",
            "--json", str(plan)] + (["--model", MODEL] if give_model else [])
    rc, out, err = _run(argv)
    if rc == 2:
        _assert_clean_error(rc, err)
        assert not plan.exists()
        return
    assert rc == 0, err
    assert sorted(BitPlan.from_json(plan).layers) == sorted(LAYERS)
    assert _printed_compression(out) == pytest.approx(_eval_compression(plan), abs=0.006)


def test_parse_sensitivity_errors_are_hawq_errors():
    for bad in (None, 3, "x", {"layers": []}, {"hessian": None}, {"hessian": [1]},
                {"layers": [{"name": "a", "avg_trace": 1.0}], "metric": ["trace"]},
                {"layers": [{"name": "a", "avg_trace": 1e400}]},
                {"layers": [{"name": "a", "avg_trace": 1.0, "params": 2.5}]},
                {"layers": [{"name": "a", "avg_trace": 1.0, "params": -3}]},
                {"layers": [{"name": "a", "avg_trace": 1.0}], "version": True}):
        with pytest.raises(HawqError):
            parse_sensitivity(bad, "s.json")
    ok = parse_sensitivity({"layers": [{"name": "a", "avg_trace": -1.0}]}, "s.json")
    assert ok.negative == ["a"] and ok.model is None
    with pytest.raises(DataError):
        load_sensitivity("/nonexistent/s.json")
