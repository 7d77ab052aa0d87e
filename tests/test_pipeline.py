import json

import pytest

import hawq
from hawq.ui.cli import main
from hawq.base.errors import BudgetError, ConfigError
from hawq.post.config import CompressConfig
from hawq.workflows.workflow import compress


def test_config_presets_and_validation():
    cfg = CompressConfig(method="hawq-v1")
    assert (cfg.sensitivity, cfg.allocator) == ("hawq-v1", "v1-rule")
    assert CompressConfig().target_compression == 8.0
    with pytest.raises(ConfigError, match="one size target"):
        CompressConfig(target_compression=8, target_avg_bits=4)
    with pytest.raises(ConfigError, match="sensitivity"):
        CompressConfig(sensitivity="magic")


@pytest.mark.parametrize("sensitivity,allocator", [("measured", "ilp"), ("hawq-v2", "frontier"),
                                                    ("hybrid", "ilp"), ("hawq-v1", "v1-rule")])
def test_compress_digits_meets_budget(tmp_path, sensitivity, allocator):
    cfg = CompressConfig(model="digits-cnn", sensitivity=sensitivity, allocator=allocator,
                         bits=(2, 4, 8), target_compression=8.0, hessian_samples=64,
                         max_probes=8, calib_samples=128)
    res = compress(cfg, out_dir=tmp_path)
    assert res.budget["weight_compression"] >= 8.0 - 1e-9
    assert res.fp32_accuracy > 0.95 and 0.5 < res.accuracy <= res.fp32_accuracy + 0.02
    assert res.value == res.accuracy and res.metric == "accuracy"
    assert {r["w_bits"] for r in res.layers} <= {2, 4, 8}
    for f in ("plan.json", "metrics.json", "sensitivity.json", "layers.png"):
        assert (tmp_path / f).stat().st_size > 0
    plan = hawq.BitPlan.from_json(tmp_path / "plan.json")
    assert [plan.layers[r["name"]].w_bits for r in res.layers] == [r["w_bits"] for r in res.layers]
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == res.accuracy


def test_compress_refine_keeps_the_budget_and_records_the_search(tmp_path):
    cfg = CompressConfig(model="digits-cnn", sensitivity="hawq-v2", bits=(2, 4, 8),
                         target_avg_bits=3.0, hessian_samples=64, max_probes=6,
                         calib_samples=128, refine=True, refine_samples=300,
                         refine_candidates=8)
    res = compress(cfg, out_dir=tmp_path)
    r = res.refinement
    assert r["objective"] == "kl" and r["value"] <= r["start_value"]
    assert [row["w_bits"] for row in res.layers] == [int(b) for b in r["bits"]]
    assert res.allocation["method"] == "refined"
    assert res.budget["avg_bits"] <= 3.0 + 1e-9
    assert json.loads((tmp_path / "metrics.json").read_text())["refinement"]["evaluations"] \
        == r["evaluations"]
    with pytest.raises(ConfigError, match="refine"):
        CompressConfig(method="hawq-v1", refine=True)


def test_compress_refines_by_default_only_low_bit_hybrid_plans():
    base = dict(model="digits-cnn", bits=(2, 4, 8), hessian_samples=32, max_probes=3,
                calib_samples=64, test_samples=50, refine_samples=200, refine_candidates=4)
    assert CompressConfig().refine == "auto"
    low = compress(CompressConfig(target_avg_bits=3.0, **base))  # hybrid: 3.0 <= 3.5 bits
    assert low.refinement is not None and low.allocation["method"] == "refined"
    assert low.budget["avg_bits"] <= 3.0 + 1e-9
    high = compress(CompressConfig(target_avg_bits=6.0, **base))
    assert high.budget["avg_bits"] > 3.5 and high.refinement is None
    assert compress(CompressConfig(target_avg_bits=3.0, sensitivity="hawq-v2",
                                   **base)).refinement is None  # the paper's method stays plain
    assert compress(CompressConfig(target_avg_bits=3.0, refine=False, **base)).refinement is None
    with pytest.raises(ConfigError, match="refine='sometimes'"):
        CompressConfig(refine="sometimes")
    CompressConfig(method="hawq-v1")  # "auto" never asks a V1-rule plan to refine


def test_auto_refine_without_held_out_images_warns_and_keeps_the_plan(caplog):
    cfg = CompressConfig(model="digits-cnn", bits=(2, 4, 8), target_avg_bits=3.0,
                         hessian_samples=32, max_probes=3, calib_samples=100_000,
                         test_samples=50)
    with caplog.at_level("WARNING", logger="hawq.workflows.workflow"):
        res = compress(cfg)
    assert res.refinement is None and "not refined" in caplog.text


@pytest.mark.parametrize("mode", ["joint", "layer"])
def test_compress_probe_mode_sets_the_hutchinson_cost(tmp_path, mode):
    cfg = CompressConfig(model="digits-cnn", sensitivity="hawq-v2", bits=(2, 4, 8),
                         hessian_samples=32, max_probes=3, tol=0.0, probe_mode=mode,
                         calib_samples=64, test_samples=50)
    compress(cfg, out_dir=tmp_path)
    stats = json.loads((tmp_path / "sensitivity.json").read_text())
    n_layers = len(stats["names"])
    assert stats["probe_mode"] == mode and n_layers > 1
    # joint: one HVP per probe for all layers; layer: one block HVP per layer and probe
    assert stats["hessian"]["hvp_count"] == (3 if mode == "joint" else 3 * n_layers)
    assert all(lh["probes"] == 3 for lh in stats["hessian"]["layers"])
    with pytest.raises(ConfigError, match="probe_mode"):
        CompressConfig(probe_mode="blockwise")


def test_compress_is_deterministic_under_seed():
    cfg = CompressConfig(model="digits-cnn", sensitivity="hawq-v2", bits=(2, 4, 8),
                         target_avg_bits=4.0, hessian_samples=64, max_probes=6,
                         calib_samples=64, test_samples=100)
    a, b = compress(cfg), compress(cfg)
    assert a.layers == b.layers and a.accuracy == b.accuracy


def test_impossible_budget_names_smallest_feasible():
    cfg = CompressConfig(model="digits-cnn", sensitivity="measured", bits=(4, 8),
                         target_compression=16.0, calib_samples=64, test_samples=50)
    with pytest.raises(BudgetError, match="8"):
        compress(cfg)


def test_cli_compress_and_eval_json(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["compress", "--sensitivity", "measured", "--calib-samples", "64",
               "--test-samples", "100", "--target-avg-bits", "5", "--bits", "2,4,8",
               "--out", str(out), "--json", str(tmp_path / "m.json")])
    assert rc == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["budget"]["avg_bits"] <= 5.0 + 1e-9
    assert (out / "plan.json").exists()
    rc = main(["eval", "--plan", str(out / "plan.json"), "--samples", "100", "--calib-samples",
               "64", "--json", str(tmp_path / "e.json")])
    assert rc == 0
    assert json.loads((tmp_path / "e.json").read_text())["budget"]["avg_bits"] == pytest.approx(
        data["budget"]["avg_bits"])


def test_cli_reports_errors_without_traceback(capsys):
    assert main(["eval", "--w-bits", "9"]) == 2
    assert "w_bits=9" in capsys.readouterr().err
    assert main(["compress", "--bits", "4,8", "--target-compression", "100",
                 "--sensitivity", "measured", "--test-samples", "20",
                 "--calib-samples", "32"]) == 2
    assert "achievable compression is 8x" in capsys.readouterr().err
