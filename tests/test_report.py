"""hawq report: all sections, missing sections, CLI wiring, and a real headless browser."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hawq.base.errors import DataError
from hawq.ui.report import NOT_COMPUTED, load_run, record_command, write_report

SECTIONS = ["command", "summary", "layers", "frontier", "sensitivity", "density", "finetune",
            "export"]


def _fake_result(L: int = 6):
    """A CompressResult with a real allocation over a made-up Omega (no model, no data)."""
    from hawq.maths.allocation import allocate
    from hawq.maths.budgets import Budget
    from hawq.post.config import CompressConfig
    from hawq.workflows.workflow import CompressResult

    rng = np.random.default_rng(0)
    bits = np.array([2, 4, 8])
    params = rng.integers(200, 5000, L).astype(float)
    omega = np.sort(rng.uniform(0.1, 2.0, (L, 1)) * np.array([[16.0, 1.0, 1 / 16]]), axis=1)[
        :, ::-1].copy()
    alloc = allocate(omega, params, bits, Budget("compression", 8), "frontier")
    cfg = CompressConfig(model="digits-cnn", target_compression=8, allocator="frontier")
    names = [f"layer{i}.conv" for i in range(L)]
    rows = [{"name": n, "type": "Conv2d", "params": int(p), "macs": int(p) * 16,
             "w_bits": int(b), "a_bits": 8, "trace": float(t), "avg_trace": float(t / p),
             "stderr": float(0.05 * t), "eigenvalue": None if i % 2 else float(t / 10),
             "omega": [float(v) for v in omega[i]]}
            for i, (n, p, b, t) in enumerate(zip(names, params, alloc.bits,
                                                 rng.uniform(1, 10, L)))]
    from dataclasses import asdict

    budget = {"total_params": int(params.sum()) + 100, "quantizable_params": int(params.sum()),
              "weight_bits": int(alloc.size_bits), "size_bits": int(alloc.size_bits) + 3200,
              "size_bytes": (alloc.size_bits + 3200) / 8, "fp32_bytes": 4 * (params.sum() + 100),
              "compression": 7.5, "weight_compression": 8.0, "avg_bits": 4.0, "bops": 1e7,
              "fp32_bops": 3e8, "macs": int(params.sum()) * 16}
    res = CompressResult(config=asdict(cfg), plan={"version": 1, "default": None, "layers": {
        n: {"w_bits": int(b), "a_bits": 8} for n, b in zip(names, alloc.bits)}},
        layers=rows, allocation=alloc.to_dict(), fp32_accuracy=0.981, accuracy=0.975,
        budget=budget, seconds={"setup": 1.0, "sensitivity": 2.0})
    return res, omega, params, names


@pytest.fixture
def run_dir(tmp_path) -> Path:
    from hawq.workflows.workflow import write_outputs

    res, omega, params, names = _fake_result()
    out = tmp_path / "run"
    write_outputs(out, res, {"names": names, "omega": omega.tolist()}, omega, params, names)
    return out


def _add_everything(run: Path) -> None:
    record_command(run, ["compress", "--model", "digits-cnn", "--out", str(run)])
    rng = np.random.default_rng(1)
    nodes = [sorted(rng.normal(0, 1, 20).tolist()) for _ in range(2)]
    w = [list(np.full(20, 1 / 20)) for _ in range(2)]
    (run / "density.json").write_text(json.dumps({"nodes": nodes, "weights": w, "dim": 5000,
                                                  "hvp_count": 40, "seconds": 1.5,
                                                  "version": 1}))
    (run / "finetune").mkdir()
    (run / "finetune" / "finetune.json").write_text(json.dumps({
        "fp32_accuracy": 0.98, "ptq_accuracy": 0.9, "accuracy": 0.97,
        "finetune": {"history": [{"epoch": 1, "loss": 0.3, "train_accuracy": 0.95,
                                  "seconds": 3.0}]}}))
    (run / "model.json").write_text(json.dumps({"format": "hawq-packed", "sizes": {
        "accounted_bytes": 1000.0, "payload_bytes": 1004, "file_bytes": 3000,
        "quant_meta_bytes": 100, "buffer_bytes": 200, "header_bytes": 900}}))


def _section(html: str, key: str) -> str:
    m = re.search(rf'<section id="{key}" data-present="(true|false)">(.*?)</section>', html, re.S)
    assert m, f"section {key} missing"
    return m.group(1) + "|" + m.group(2)


def test_report_renders_all_sections(run_dir):
    _add_everything(run_dir)
    res = write_report(run_dir)
    assert res.sections == {k: True for k in SECTIONS}, res.sections
    html = Path(res.html_path).read_text()
    for key in SECTIONS:
        assert _section(html, key).startswith("true|")
    # the only "not computed" cells are the 3 layers without an eigenvalue
    assert html.count(NOT_COMPUTED) == html.count(f"<td class=num>{NOT_COMPUTED}</td>") == 3
    # self-contained: every image is inline data, nothing is fetched
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(imgs) == 3 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "<svg" in html and not re.search(r'(src|href)="(https?:)?//', html)
    assert "<script" not in html and "<link" not in html
    assert "hawq compress --model digits-cnn --out" in html  # the exact recorded command
    assert "97.50%" in html and "98.10%" in html
    assert "± " in html  # trace ± stderr
    md = Path(res.md_path).read_text()
    for title in ("## Command", "## Per-layer sensitivity and bits", "## Pareto frontier",
                  "## Hessian eigenvalue density", "## Packed integer export"):
        assert title in md
    assert "![" in md and "report_files/density.png" in md
    assert (run_dir / "report_files" / "density.png").is_file()
    assert (run_dir / "frontier.png").is_file()
    assert "| layer0.conv |" in md.replace("|  ", "| ")


def test_report_with_missing_pieces_says_not_computed(tmp_path, run_dir):
    # only metrics.json: plots are regenerated, the rest is "not computed"
    only = tmp_path / "only_metrics"
    only.mkdir()
    shutil.copy(run_dir / "metrics.json", only / "metrics.json")
    res = write_report(only)
    assert res.sections["frontier"] and res.sections["sensitivity"]
    assert not res.sections["density"] and not res.sections["command"]
    html = Path(res.html_path).read_text()
    assert _section(html, "density").startswith("false|")
    assert "hawq report DIR --density" in html
    assert "hawq compress" in _section(html, "command")  # rebuilt from the config
    # a folder without a run (only broken files) is refused, naming what could not be read
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "frontier.png").write_bytes(b"not a png")
    (empty / "sensitivity.json").write_text("{broken")
    with pytest.raises(DataError, match=r"holds no readable hawq run.*sensitivity\.json"):
        write_report(empty)
    assert not (empty / "report.html").exists()
    # a plan beside broken files: still a page, the problems listed, no crash
    shutil.copy(run_dir / "plan.json", empty / "plan.json")
    (empty / "metrics.json").write_text("[1, 2]")
    res = write_report(empty)
    assert not any(res.sections[k] for k in SECTIONS if k != "layers")
    assert any("sensitivity.json" in p for p in res.problems)
    assert any("metrics.json" in p for p in res.problems)
    html = Path(res.html_path).read_text()
    assert html.count(NOT_COMPUTED) >= len(SECTIONS) - 2
    with pytest.raises(DataError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_cli_report_and_compress_records_command(tmp_path, run_dir, monkeypatch, capsys):
    import hawq.workflows.workflow
    from hawq.ui.cli import main

    assert main(["report", str(run_dir), "--open-html-path"]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")

    res, *_ = _fake_result()
    monkeypatch.setattr(hawq.workflows.workflow, "compress",
                        lambda model, data, task=None, config=None, out_dir=None,
                        progress=False, **kw: res)
    out = tmp_path / "r2"
    argv = ["compress", "--target-compression", "8", "--out", str(out)]
    assert main(argv) == 0
    cmd = json.loads((out / "command.json").read_text())
    assert cmd["argv"] == ["hawq", *argv]
    assert cmd["command"] == "hawq " + " ".join(argv)
    assert main(["report", str(tmp_path / "missing")]) == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None,
                    reason="chromium not installed (apt-get install chromium); browser check")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    _add_everything(run_dir)
    res = write_report(run_dir)
    url = Path(res.html_path).resolve().as_uri()
    flags = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=60).stdout
    # the browser parsed the page: every plot is an <img> with non-trivial inline data
    srcs = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(srcs) == 3 and all(len(s) > 2000 for s in srcs)
    assert "<svg" in dom and dom.count("<section") == len(SECTIONS)
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,3000", url],
                   capture_output=True, timeout=60)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert img.shape[:2] == (3000, 1200)
    # not a blank page: many colours, real contrast, and plot pixels well below the header
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 200
    assert img.std() > 20
    lower = img[800:2600]
    assert (lower.sum(-1) < 300).mean() > 0.002  # dark strokes (text, axes) further down


def test_reconstructed_command_parses_back_to_the_same_config():
    import shlex
    from dataclasses import asdict

    from hawq.ui.cli import build_parser
    from hawq.post.config import CompressConfig
    from hawq.ui.report import reconstructed_command

    cfg = CompressConfig(model="resnet20", bits=(2, 3, 4, 8), target_avg_bits=3.5,
                         probe_mode="layer", max_probes=20, refine=True, refine_samples=200,
                         refine_candidates=4, bias_correct=True, w_clip="mse")
    cmd = reconstructed_command(asdict(cfg))
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert (args.model, tuple(args.bits), args.target_avg_bits) == ("resnet20", (2, 3, 4, 8), 3.5)
    assert (args.probe_mode, args.max_probes, args.w_clip) == ("layer", 20, "mse")
    assert (args.refine, args.refine_samples, args.refine_candidates) == (True, 200, 4)
    assert args.bias_correct is True
    for refine in ("auto", False):  # the default is omitted; False comes back as --no-refine
        cmd = reconstructed_command(asdict(CompressConfig(refine=refine)))
        assert build_parser().parse_args(shlex.split(cmd)[1:]).refine == refine
