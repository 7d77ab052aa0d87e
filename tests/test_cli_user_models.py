"""``hawq compress`` / ``hawq export --run`` / ``hawq report`` through the command line on the
user's own models and data, from a module in the current folder: a MobileNet-like CNN, an
``nn.TransformerEncoder`` token classifier, a causal LM fed dict batches, a model returning a
dict of losses, and a factory returning model, task and data together. Each run is exported
(rebuilt from the factories, packed, loaded back, the run's metric reproduced) and reported;
ONNX where the model has one float input, a one-line error naming what is unsupported
elsewhere; data that does not fit the task stops with one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hawq.ui.cli import main

MODULE = "usermods_cli"

SOURCE = (Path(__file__).resolve().parent / "usermods.py").read_text()  # the user's module

FAST = ["--target-compression", "8", "--bits", "2,4,8", "--hessian-samples", "32",
        "--max-probes", "4", "--calib-samples", "32", "--refine-samples", "32",
        "--refine-candidates", "4"]


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A folder holding the user's module; its import is forgotten afterwards."""
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    path = list(sys.path)
    yield folder
    sys.modules.pop(MODULE, None)
    sys.path[:] = path


@pytest.fixture
def in_folder(user_folder, monkeypatch):
    """The user's folder as the current one, torch on one thread (tiny models: threads only
    add overhead, and much of it on a shared 2-core machine)."""
    import torch

    monkeypatch.chdir(user_folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield user_folder
    torch.set_num_threads(threads)


def _compress_export_report(folder, capsys, name, model, data=None, extra=(), onnx=True):
    """compress -> export --run (--onnx) -> report; returns (metrics, compress stdout, export
    stdout, export stderr, export exit code)."""
    run = folder / name
    argv = ["compress", "--model", f"{MODULE}:{model}", *(["--data", f"{MODULE}:{data}"]
                                                          if data else []),
            *FAST, *extra, "--out", str(run)]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert 7.0 <= metrics["budget"]["weight_compression"] <= 8.5
    # the user names the factories again: a run's files never name code to import
    rc = main(["export", "--run", str(run), "--model", f"{MODULE}:{model}",
               *(["--data", f"{MODULE}:{data}"] if data else []),
               "--json", str(run / "export.json"),
               *(["--onnx", str(run / "model.onnx")] if onnx else [])])
    cap = capsys.readouterr()
    assert (run / "model.safetensors").is_file() and (run / "model.json").is_file()
    assert "reproduces the run" in cap.out and "outputs equal" in cap.out, cap.out + cap.err
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    html = (run / "report.html").read_text()
    assert metrics["metric"] in html.lower()
    if metrics.get("uniform"):
        assert f"uniform {metrics['uniform']['w_bits']}-bit (same size)" in html
    return metrics, out, cap.out, cap.err, rc


def _summary_shows(out, metrics, head):
    """The compress summary: the metric's name, the mixed plan and the uniform plan."""
    assert head in out and "mixed [hybrid + ilp]" in out
    if metrics.get("uniform"):
        u = metrics["uniform"]
        line = next(ln for ln in out.splitlines() if ln.startswith(f"uniform {u['w_bits']}-bit"))
        assert f"{u['weight_compression']:.2f}x" in line
    for w in metrics["warnings"]:
        assert f"warning: {w}" in out


def test_mobilenet_like_cnn_compress_export_onnx_report(in_folder, capsys):
    pytest.importorskip("onnxruntime")
    metrics, out, eout, eerr, rc = _compress_export_report(in_folder, capsys, "cnn", "mobilenet",
                                                           "images")
    assert rc == 0, eerr
    assert metrics["metric"] == "accuracy" and metrics["uniform"]["w_bits"] == 4
    assert {r["name"] for r in metrics["layers"]} == {"stem", "dw", "pw", "fc"}
    _summary_shows(out, metrics, "top-1")
    exp = json.loads((in_folder / "cnn" / "export.json").read_text())
    assert exp["rebuild"]["reproduces_run"] and exp["rebuild"]["outputs_equal"]
    assert exp["rebuild"]["value"] == pytest.approx(metrics["value"])
    assert exp["onnx"]["agreement"] >= 0.95
    from hawq.base.errors import ConfigError
    from hawq.post.export import load_quantized

    with pytest.raises(ConfigError, match="model="):  # the manifest's factory is not imported
        load_quantized(in_folder / "cnn" / "model.safetensors")
    from usermods_cli import mobilenet

    assert load_quantized(in_folder / "cnn" / "model.safetensors", model=mobilenet) is not None


def test_transformer_encoder_on_token_ids(in_folder, capsys):
    metrics, out, eout, eerr, rc = _compress_export_report(
        in_folder, capsys, "tok", "token_classifier", "tokens", extra=["--no-refine"])
    assert any("self_attn" in r["name"] and "out_proj" not in r["name"]
               for r in metrics["layers"])
    _summary_shows(out, metrics, "top-1")
    # ONNX: the packed export is written, then one line names what is unsupported
    assert rc == 2 and eerr.count("\n") == 1 and "Traceback" not in eerr
    assert "not supported" in eerr and "self_attn" in eerr and "token ids" in eerr


def test_causal_lm_with_dict_batches(in_folder, capsys):
    metrics, out, eout, eerr, rc = _compress_export_report(
        in_folder, capsys, "lm", "lm", "lm_data", extra=["--task", "causal-lm"])
    assert metrics["metric"] == "perplexity" and metrics["config"]["task"] == "causal-lm"
    _summary_shows(out, metrics, "perplexity (lower is better)")
    assert rc == 2 and "keyword inputs" in eerr and eerr.count("\n") == 1


def test_model_returning_a_dict_of_losses(in_folder, capsys):
    metrics, out, eout, eerr, rc = _compress_export_report(
        in_folder, capsys, "det", "detector", "boxes", extra=["--task", "loss-dict", "--no-refine"])
    assert metrics["metric"] == "loss" and metrics["value"] > 0
    _summary_shows(out, metrics, "loss (lower is better)")
    assert rc == 2 and "2 positional inputs" in eerr and eerr.count("\n") == 1


def test_factory_returning_model_task_and_data(in_folder, capsys):
    pytest.importorskip("onnxruntime")
    metrics, out, eout, eerr, rc = _compress_export_report(
        in_folder, capsys, "all", "everything", extra=["--no-refine"])
    assert rc == 0, eerr
    assert metrics["metric"] == "cosine" and metrics["task"]["name"] == "embedding"
    _summary_shows(out, metrics, "cosine (higher is better)")
    exp = json.loads((in_folder / "all" / "export.json").read_text())
    assert exp["rebuild"]["task"] == "embedding" and exp["onnx"]["max_abs_diff_unoptimized"] < 1e-4


def test_data_that_does_not_fit_the_task_is_one_line(in_folder, capsys):
    rc = main(["compress", "--model", f"{MODULE}:mobilenet", "--data", f"{MODULE}:images",
               "--task", "causal-lm", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("hawq: error: task 'causal-lm'") and "token ids" in err


def test_export_of_a_run_made_on_a_model_object_says_what_to_do(in_folder, tmp_path, capsys):
    import torch

    import hawq

    x = torch.randn(64, 12)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    hawq.compress(model, (x, torch.randint(0, 3, (64,))), out_dir=tmp_path, bits=(4, 8),
                  target_compression=5.33, hessian_samples=16, max_probes=2, calib_samples=16,
                  refine=False)
    assert main(["export", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "save_quantized" in err and err.count("\n") == 1


def test_python_dash_m_hawq_runs_from_the_current_folder(user_folder, tmp_path):
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, "-m", "hawq", "compress", "--model",
                        f"{MODULE}:everything", *FAST, "--no-refine", "--threads", "1",
                        "--out", str(tmp_path / "run")],
                       cwd=user_folder, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cosine" in r.stdout and (tmp_path / "run" / "metrics.json").is_file()
