"""Security: nothing a file names is run. Fine-tuning checkpoints are read with
``torch.load(weights_only=True)`` and checked against the run; packed-checkpoint manifests
never name code to import, their paths stay in their folder and their sizes are checked
before any allocation; the report escapes every value it shows; and a grep over ``src/``
keeps it that way."""

from __future__ import annotations

import ast
import builtins
import copy
import importlib
import json
import os
import re
import shutil
import time
import tracemalloc
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import hawq
from hawq.base.errors import ConfigError, DataError, HawqError
from hawq.maths.plan import BitPlan, LayerSpec
from hawq.post.export import load_quantized, read_manifest, save_quantized
from hawq.post.finetune import FinetuneConfig, finetune

SRC = Path(__file__).resolve().parents[1] / "src" / "hawq"


# ----------------------------------------------------------------------------- fine-tuning

def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


PLAN = BitPlan({"0": LayerSpec(4, 8), "2": LayerSpec(8, 8)})
CFG = FinetuneConfig(epochs=2, lr=0.05, batch_size=16, calib_samples=16, seed=1)


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): it creates ``path`` (arbitrary code, harmless)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_checkpoint(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "last.pt"
    torch.save({"model": {}, "epoch": 1, "payload": _CreatesFile(str(marker))}, path)
    return path


def test_crafted_checkpoint_runs_no_code_on_resume(tmp_path):
    # the test can fail: the crafted file does run code when unpickled without weights_only
    probe = tmp_path / "probe"
    ckpt = _crafted_checkpoint(tmp_path / "probe_dir", probe)
    try:
        torch.load(ckpt, weights_only=False).get("payload").close()
    except Exception:
        pass
    assert probe.exists()
    marker = tmp_path / "marker"
    out = tmp_path / "ft"
    _crafted_checkpoint(out, marker)
    with pytest.raises(DataError) as e:
        finetune(_net(), PLAN, _data(), CFG, progress=False, checkpoint_dir=out, resume=True)
    msg = str(e.value)
    assert "last.pt" in msg and "delete it" in msg and "--resume" in msg
    assert not marker.exists()


def test_damaged_and_malformed_checkpoints_are_data_errors(tmp_path):
    out = tmp_path / "ft"
    finetune(_net(), PLAN, _data(), CFG, progress=False, checkpoint_dir=out, stop_after_epoch=1)
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match="last.pt"):
        finetune(_net(), PLAN, _data(), CFG, progress=False, checkpoint_dir=out, resume=True)
    state = torch.load(_save(out, good), weights_only=True)
    for key, value in (("epoch", "1"), ("stage", 7), ("history", {"a": 1}), ("format", "x"),
                       ("made_under", "not json"), ("model", None)):
        torch.save(dict(state, **{key: value}), out / "last.pt")
        with pytest.raises(DataError, match="last.pt"):
            finetune(_net(), PLAN, _data(), CFG, progress=False, checkpoint_dir=out,
                     resume=True)
    # a checkpoint whose weights do not fit the model (another architecture)
    torch.save(dict(state, model={"0.weight": torch.zeros(2, 2)}), out / "last.pt")
    with pytest.raises(DataError, match="does not fit"):
        finetune(_net(), PLAN, _data(), CFG, progress=False, checkpoint_dir=out, resume=True)


def _save(out: Path, data: bytes) -> Path:
    (out / "last.pt").write_bytes(data)
    return out / "last.pt"


def test_resume_under_another_plan_or_config_names_what_differs(tmp_path):
    out = tmp_path / "ft"
    finetune(_net(), PLAN, _data(), CFG, progress=False, checkpoint_dir=out, stop_after_epoch=1)
    cases = [
        (dict(plan=BitPlan({"0": LayerSpec(2, 8), "2": LayerSpec(8, 8)})),
         r"plan\.0: checkpoint \[4, 8\] vs now \[2, 8\]"),
        (dict(config=FinetuneConfig(**{**CFG.__dict__, "lr": 0.1})),
         r"config\.lr: checkpoint 0\.05 vs now 0\.1"),
        (dict(config=FinetuneConfig(**{**CFG.__dict__, "batch_size": 8})),
         r"config\.batch_size: checkpoint 16 vs now 8"),
        (dict(config=FinetuneConfig(**{**CFG.__dict__, "seed": 2, "distill": 0.5})),
         r"config\.distill: checkpoint 0\.0 vs now 0\.5; config\.seed: checkpoint 1 vs now 2"),
        (dict(config=FinetuneConfig(**{**CFG.__dict__, "epochs": 3})), r"config\.epochs"),
        (dict(config=FinetuneConfig(**{**CFG.__dict__, "bn_fold_at": None})),
         r"config\.bn_fold_at: checkpoint 0\.5 vs now absent|config\.bn_fold_at"),
        (dict(data=_data(48)), r"train_samples: checkpoint 64 vs now 48"),
    ]
    for change, pattern in cases:
        kw = dict(plan=PLAN, config=CFG, data=_data()) | change
        with pytest.raises(ConfigError, match=pattern) as e:
            finetune(_net(), kw["plan"], kw["data"], kw["config"], progress=False,
                     checkpoint_dir=out, resume=True)
        assert "another --out" in str(e.value) and "drop --resume" in str(e.value)
    # the same settings resume (and the checkpoint still reads with weights_only=True)
    res = finetune(_net(), PLAN, _data(), CFG, progress=False, checkpoint_dir=out, resume=True)
    assert res.resumed_from_epoch == 1 and len(res.history) == 2
    state = torch.load(out / "last.pt", weights_only=True)
    assert json.loads(state["made_under"])["plan.0"] == [4, 8]


# ----------------------------------------------------------------------------- manifests

@pytest.fixture
def export(tmp_path):
    """A packed export of a tiny quantized model: (folder, tensors path, manifest dict)."""
    model = _net()
    x, _ = _data()
    hawq.quantize_(model, BitPlan({"0": LayerSpec([2, 4, 8, 4, 3, 5, 6, 7], 8),
                                   "2": LayerSpec(4, 8)}))
    hawq.calibrate_(model, x)
    folder = tmp_path / "exp"
    folder.mkdir()
    path = folder / "m.safetensors"
    save_quantized(model, path)
    return folder, path, json.loads((folder / "m.json").read_text())


def _write(folder: Path, man: dict) -> Path:
    (folder / "m.json").write_text(json.dumps(man))
    return folder / "m.json"


class _Spy:
    """Records calls (and passes them on to the real function)."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, *a, **k):
        self.calls.append(a)
        return self.real(*a, **k)


@pytest.mark.parametrize("ident", [{"name": "os:getcwd", "class": "os:getcwd"},
                                   {"name": None, "class": "os:getcwd"},
                                   {"name": "builtins:print", "class": "builtins:print"},
                                   {"name": None, "class": "builtins:print"},
                                   {"class": "collections:OrderedDict"},
                                   {"name": "hawq.ui.cli:main"}])
def test_manifest_never_names_code_to_run(export, monkeypatch, ident):
    folder, path, man = export
    getcwd, printer, imp = _Spy(os.getcwd), _Spy(builtins.print), _Spy(importlib.import_module)
    monkeypatch.setattr(os, "getcwd", getcwd)
    monkeypatch.setattr(builtins, "print", printer)
    monkeypatch.setattr(importlib, "import_module", imp)
    _write(folder, man | {"model": ident})
    for target in (path, folder / "m.json"):
        with pytest.raises(ConfigError, match="model=") as e:
            load_quantized(target)
        assert "never imports" in str(e.value)
    assert getcwd.calls == [] and printer.calls == [] and imp.calls == []
    monkeypatch.undo()
    assert load_quantized(path, model=_net) is not None  # the caller names the architecture


def test_manifest_registry_name_still_builds(tmp_path):
    from hawq.modules.models import build_model

    model = build_model("digits-cnn", pretrained=False)
    x = torch.randn(8, 1, 8, 8)
    hawq.quantize_(model, BitPlan.uniform(4, 8))
    hawq.calibrate_(model, x)
    save_quantized(model, tmp_path / "d.safetensors", model_name="digits-cnn")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "d.safetensors")(x), model(x))


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "..", ".", "",
                                  "sub/m.safetensors", "..\\m.safetensors", "m\0.safetensors",
                                  "link.safetensors", 5, None, ["m.safetensors"]])
def test_manifest_tensors_path_stays_in_its_folder(export, name):
    folder, path, man = export
    (folder / "sub").mkdir()
    shutil.copy(path, folder / "sub" / "m.safetensors")
    outside = folder.parent / "outside.safetensors"
    shutil.copy(path, outside)
    (folder / "link.safetensors").symlink_to(outside)
    mpath = _write(folder, man | {"tensors": name})
    with pytest.raises(DataError, match="'tensors'"):
        load_quantized(mpath)
    with pytest.raises(DataError, match="'tensors'"):
        read_manifest(mpath)


def _timed_small_peak(fn):
    """(exception raised by fn, seconds, peak bytes traced)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned to the caller
        exc = e
    else:
        exc = None
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return exc, seconds, peak


@pytest.mark.parametrize("change", [
    {"rows": 10**11},
    {"rows": 10**11, "weight_shape": [10**11, 8]},
    {"rows": 10**11, "weight_shape": [10**11, 8], "w_bits": 8, "nbytes": 8 * 10**11},
    {"row_len": 10**11},
    {"rows": 10**11, "row_len": 0, "weight_shape": [10**11, 0]},
])
def test_huge_sizes_are_refused_before_any_allocation(export, change):
    folder, path, man = export
    man["layers"]["2"].update(change)
    mpath = _write(folder, man)
    exc, seconds, peak = _timed_small_peak(lambda: load_quantized(mpath, model=_net))
    assert isinstance(exc, DataError), exc
    assert seconds < 5 and peak < 64 * 2**20, (seconds, peak)


def test_packed_size_is_checked_against_the_tensor_file(export):
    folder, path, man = export
    man["layers"]["2"]["w_bits"] = 8  # layout needs more bytes than the file holds
    man["layers"]["2"].pop("nbytes")
    with pytest.raises(DataError, match="needs"):
        load_quantized(_write(folder, man), model=_net)


MALFORMED = [
    ("layers is a list", lambda m: m.update(layers=[{"w_bits": 4}])),
    ("layers empty", lambda m: m.update(layers={})),
    ("layer is a string", lambda m: m["layers"].update({"2": "4-bit"})),
    ("layer is a list", lambda m: m["layers"].update({"2": [4, 8]})),
    ("bits a string", lambda m: m["layers"]["2"].update(w_bits="4")),
    ("bits a float", lambda m: m["layers"]["2"].update(w_bits=4.0)),
    ("bits a bool", lambda m: m["layers"]["2"].update(w_bits=True)),
    ("bits 0", lambda m: m["layers"]["2"].update(w_bits=0)),
    ("bits 9 packed", lambda m: m["layers"]["2"].update(w_bits=9)),
    ("per-row bits too few", lambda m: m["layers"]["0"].update(w_bits=[4, 4])),
    ("per-row bits strings", lambda m: m["layers"]["0"].update(w_bits=["4"] * 8)),
    ("a_bits string", lambda m: m["layers"]["2"].update(a_bits="8")),
    ("missing weight_shape", lambda m: m["layers"]["2"].pop("weight_shape")),
    ("weight_shape negative", lambda m: m["layers"]["2"].update(weight_shape=[-3, 8])),
    ("weight_shape strings", lambda m: m["layers"]["2"].update(weight_shape=["3", "8"])),
    ("missing rows", lambda m: m["layers"]["2"].pop("rows")),
    ("rows string", lambda m: m["layers"]["2"].update(rows="3")),
    ("row_len mismatch", lambda m: m["layers"]["2"].update(row_len=7)),
    ("missing act", lambda m: m["layers"]["2"].pop("act")),
    ("act a list", lambda m: m["layers"]["2"].update(act=[8])),
    ("act state unknown", lambda m: m["layers"]["2"]["act"].update(state="exploded")),
    ("act method unknown", lambda m: m["layers"]["2"]["act"].update(method="max")),
    ("act scale string", lambda m: m["layers"]["2"]["act"].update(scale="0.1")),
    ("act percentile out of range", lambda m: m["layers"]["2"]["act"].update(percentile=7)),
    ("w_symmetric string", lambda m: m["layers"]["2"].update(w_symmetric="yes")),
    ("packed string", lambda m: m["layers"]["2"].update(packed="true")),
    ("per_tensor_scale flipped", lambda m: m["layers"]["2"].update(per_tensor_scale=True)),
    ("missing per_tensor_scale", lambda m: m["layers"]["2"].pop("per_tensor_scale")),
    ("sha256 missing", lambda m: m.pop("sha256")),
    ("sha256 a number", lambda m: m.update(sha256=12)),
    ("format_version a string", lambda m: m.update(format_version="1")),
    ("format_version newer", lambda m: m.update(format_version=99)),
    ("model a string", lambda m: m.update(model="os:getcwd")),
    ("model name a list", lambda m: m.update(model={"name": ["digits-cnn"]})),
    ("unknown layer", lambda m: m["layers"].update({"nope": copy.deepcopy(m["layers"]["2"])})),
    ("manifest a list", None),
]


@pytest.mark.parametrize("what,edit", MALFORMED, ids=[w for w, _ in MALFORMED])
def test_malformed_manifests_are_hawq_errors(export, what, edit):
    folder, path, man = export
    if edit is None:
        man = [man]
    else:
        edit(man)
    mpath = _write(folder, man)
    with pytest.raises((DataError, ConfigError)):
        load_quantized(mpath, model=_net)


def _json_values():
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                     st.sampled_from([10**400, -10**400, 2**63, 10**11, 1e300]),
                     st.floats(), st.text(max_size=20),
                     st.sampled_from(["..", "/etc/hostname", "os:getcwd", "frozen", "minmax",
                                      "m.safetensors", "digits-cnn"]),
                     st.integers(0, 40))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=8)


FIELDS = ([("format_version",), ("tensors",), ("sha256",), ("model",), ("model", "name"),
           ("model", "class"), ("layers",)]
          + [("layers", n, f) for n in ("0", "2")
             for f in ("w_bits", "a_bits", "weight_shape", "w_symmetric", "w_per_channel",
                       "packed", "rows", "row_len", "nbytes", "per_tensor_scale", "act")]
          + [("layers", "2", "act", f) for f in ("bits", "state", "method", "percentile",
                                                 "scale", "zero_point", "learned")])


def test_fuzzed_manifest_fields_give_hawq_errors_or_load(export):
    """Random JSON values put into (or deleted from) a valid manifest's fields: loading
    either succeeds or raises a HawqError, never a KeyError/TypeError/ValueError traceback."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    folder, path, good = export
    outcomes = {"loaded": 0, "error": 0}

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(st.just("<delete>"),
                                                                  _json_values())),
                    min_size=1, max_size=3))
    def run(edits):
        man = copy.deepcopy(good)
        for field_path, value in edits:
            obj = man
            for k in field_path[:-1]:
                obj = obj.get(k) if isinstance(obj, dict) else None
            if not isinstance(obj, dict):
                continue
            if value == "<delete>":
                obj.pop(field_path[-1], None)
            else:
                obj[field_path[-1]] = value
        mpath = _write(folder, man)
        try:
            load_quantized(mpath, model=_net)
            outcomes["loaded"] += 1
        except HawqError:
            outcomes["error"] += 1

    run()
    assert outcomes["error"] > 50  # the fuzzing reached the checks


# ----------------------------------------------------------------------------- report

PAYLOADS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
            '"><svg onload=alert(1)>']


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.handlers = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.handlers += [f"{tag}[{k}]" for k, _ in attrs if k.lower().startswith("on")]


def _hostile_run(folder: Path, numbers_too: bool) -> Path:
    """A run folder whose JSON files carry the payloads in every field the report reads
    (with ``numbers_too``, numeric fields too)."""
    k = iter(range(10**6))

    def p() -> str:
        return PAYLOADS[next(k) % len(PAYLOADS)]

    def num(v):
        return p() if numbers_too else v

    folder.mkdir(parents=True)
    layers = [{"name": p(), "type": p(), "params": num(120), "macs": num(900),
               "w_bits": num(4) if i else ([p(), 4] if numbers_too else [2, 4]),
               "a_bits": p(), "trace": num(1.5), "stderr": num(0.1), "avg_trace": num(0.01),
               "eigenvalue": [num(2.0)] if i else num(None), "omega": [num(1.0), num(0.5)]}
              for i in range(3)]
    metrics = {
        "config": {"model": p(), "sensitivity": p(), "allocator": p(), "bits": [p(), 4],
                   "a_bits": p(), "task": p(), "data": p(), "seed": p()},
        "metric": p(), "fp32_value": num(0.9), "value": num(0.8), "fp32_accuracy": num(0.9),
        "accuracy": num(0.8), "task": {"name": p(), "higher_is_better": p()},
        "uniform": {"w_bits": p(), "value": num(0.7), "size_bytes": num(1000)},
        "budget": {"compression": p(), "weight_compression": p(), "avg_bits": p(),
                   "size_bytes": num(100), "fp32_bytes": num(800), "bops": num(1e6),
                   "fp32_bops": num(1e8), "macs": num(10), "total_params": num(123)},
        "allocation": {"method": p(), "optimal": p()},
        "seconds": {"setup": num(1.0), p(): num(2.0)},
        "layers": layers, "warnings": [p(), p()], "params": {p(): p()},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "command.json").write_text(json.dumps({
        "argv": ["hawq", p(), p()], "command": f"hawq compress --model '{p()}'",
        "cwd": p(), "time": p(), "torch": p()}))
    (folder / "plan.json").write_text(json.dumps({"layers": {p(): {"w_bits": p()}}}))
    (folder / "sensitivity.json").write_text(json.dumps({"names": [p()], "model": p()}))
    (folder / "density.json").write_text(json.dumps({"nodes": [[p()]], "weights": [[1.0]],
                                                     "dim": num(10), "hvp_count": p(),
                                                     "seconds": num(1.0)}))
    (folder / "finetune").mkdir()
    (folder / "finetune" / "finetune.json").write_text(json.dumps({
        "fp32_accuracy": num(0.9), "ptq_accuracy": p(), "accuracy": num(0.8),
        "finetune": {"history": [{"epoch": p(), "loss": num(0.3), "train_accuracy": p(),
                                  "seconds": num(1.0)}]}}))
    (folder / "model.json").write_text(json.dumps({"format": "hawq-packed", "sizes": {
        "accounted_bytes": p(), "payload_bytes": num(10), "file_bytes": p(),
        "quant_meta_bytes": num(3), "buffer_bytes": p(), "header_bytes": num(9)}}))
    return folder


@pytest.mark.parametrize("numbers_too", [False, True])
def test_report_escapes_every_value_from_the_run(tmp_path, numbers_too):
    from hawq.ui.report import write_report

    run = _hostile_run(tmp_path / "run", numbers_too)
    res = write_report(run)
    page = Path(res.html_path).read_text()
    md = Path(res.md_path).read_text()
    for payload in PAYLOADS:
        assert payload not in page
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags and parser.handlers == []
    assert not re.search(r"<(script|img src=x|svg onload)", page, re.I)
    # Markdown: code blocks and code spans show their text verbatim (a viewer renders no HTML
    # there); everywhere else no tag survives
    prose = re.sub(r"(`{3,})[^\n]*\n.*?\n\1\n", "", md, flags=re.S)
    prose = re.sub(r"(`+) .*? \1|`[^`\n]*`", "", prose)
    for payload in PAYLOADS:
        assert payload not in prose
    assert not re.search(r"<(script|img|svg)\b", prose, re.I)
    # the values are shown (escaped), and the report still has its sections
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert res.sections["summary"] and res.sections["layers"] and res.sections["command"]
    assert res.sections["finetune"] and res.sections["export"]


def test_report_survives_files_of_the_wrong_shape(tmp_path):
    from hawq.ui.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"config": "<script>x</script>",
                                                  "layers": "<b>", "budget": [1, 2],
                                                  "seconds": "<i>"}))
    (run / "command.json").write_text(json.dumps(["<script>alert(1)</script>"]))
    (run / "density.json").write_text("[")
    res = write_report(run)
    page = Path(res.html_path).read_text()
    assert "<script>" not in page and "command.json: holds a JSON list" in page


def test_cli_report_on_a_hostile_run_exits_0(tmp_path, capsys):
    from hawq.ui.cli import main

    run = _hostile_run(tmp_path / "run", True)
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    assert PAYLOADS[0] not in (run / "report.html").read_text()


def test_export_and_density_of_a_run_never_import_what_the_run_names(tmp_path, capsys,
                                                                    monkeypatch):
    from hawq.ui.cli import main

    run = tmp_path / "run"
    run.mkdir()
    BitPlan.uniform(4, 8).to_json(run / "plan.json")
    (run / "metrics.json").write_text(json.dumps({"config": {"model": "os:getcwd",
                                                             "data": "builtins:print"}}))
    imp = _Spy(importlib.import_module)
    monkeypatch.setattr(importlib, "import_module", imp)
    assert main(["export", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--model os:getcwd" in err and "never imports" in err and err.count("\n") == 1
    assert main(["export", "--run", str(run), "--model", "mine:factory"]) == 2
    err = capsys.readouterr().err
    assert "'mine:factory'" in err and "'os:getcwd'" in err  # names both
    assert main(["export", "--run", str(run), "--model", "os:getcwd"]) == 2
    err = capsys.readouterr().err
    assert "--data builtins:print" in err
    assert main(["report", str(run), "--density"]) == 2
    assert "--model os:getcwd" in capsys.readouterr().err
    assert not [c for c in imp.calls if c and c[0] in ("os", "builtins")]


# ----------------------------------------------------------------------------- grep over src

#: Functions allowed to import code: each imports a name the user typed (``--model`` /
#: ``--data`` on the command line, or a 'pkg.mod:factory' string passed in Python).
IMPORT_ALLOWED = {("ui/loading.py", "_import_module"), ("modules/models.py", "_user_spec"),
                  ("modules/models.py", "import_user_file"),
                  ("modules/hf.py", "require")}  # optional dependencies hawq's own code names
IMPORT_CALLS = {"import_module", "__import__", "exec_module", "spec_from_file_location",
                "import_from_path"}


def _sources():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    return [(f.relative_to(SRC).as_posix(), f.read_text()) for f in files]


def _calls_with_function(tree):
    """(call node, name of the innermost enclosing function or None) for every call."""
    out = []

    def visit(node, fn):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else fn
            if isinstance(child, ast.Call):
                out.append((child, fn))
            visit(child, name)

    visit(tree, None)
    return out


def _callee(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return ""


def test_no_unpickling_eval_or_file_driven_imports_in_src():
    bad = []
    for rel, text in _sources():
        if "weights_only=False" in text.replace(" ", ""):
            bad.append(f"{rel}: weights_only=False")
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|shelve|marshal)\b", text, re.M) \
                or re.search(r"\b(c?pickle|dill|marshal)\.loads?\(", text):
            bad.append(f"{rel}: pickle")
        tree = ast.parse(text)
        for call, fn in _calls_with_function(tree):
            name = _callee(call)
            if isinstance(call.func, ast.Name) and name in ("eval", "exec", "compile",
                                                            "__import__"):
                bad.append(f"{rel}:{call.lineno}: {name}() builtin")
            if name in IMPORT_CALLS and (rel, fn) not in IMPORT_ALLOWED:
                bad.append(f"{rel}:{call.lineno}: {name} in {fn}() (not an allowed loader)")
            if name == "load" and isinstance(call.func, ast.Attribute) \
                    and getattr(call.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in call.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant)
                        and kw["weights_only"].value is True):
                    bad.append(f"{rel}:{call.lineno}: torch.load without weights_only=True")
            if name == "load" and getattr(call.func, "value", None) is not None \
                    and getattr(call.func.value, "id", None) == "np":
                for k in call.keywords:
                    if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant)
                                                        and k.value.value is False):
                        bad.append(f"{rel}:{call.lineno}: np.load(allow_pickle=...)")
    assert bad == []
    export = (SRC / "post" / "export.py").read_text()
    assert "import_module" not in export and "importlib" not in export


def test_the_grep_finds_what_it_looks_for():
    """The checks above can fail: they flag each forbidden form in a sample."""
    sample = ("import pickle\nx = eval('1')\nm.eval()\n"
              "def f():\n    importlib.import_module('os')\n"
              "torch.load(p, weights_only=False)\ntorch.load(p)\n")
    tree = ast.parse(sample)
    found = [(_callee(c), fn) for c, fn in _calls_with_function(tree)]
    assert ("eval", None) in found and ("import_module", "f") in found
    assert re.search(r"^\s*(import|from)\s+(c?pickle|dill|shelve|marshal)\b", sample, re.M)
    assert [(_callee(c), isinstance(c.func, ast.Name)) for c, _ in _calls_with_function(tree)
            if _callee(c) == "eval"] == [("eval", True), ("eval", False)]
