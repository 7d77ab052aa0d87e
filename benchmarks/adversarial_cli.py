"""Adversarial pass over the hawq CLI: bad inputs, as a careful user and as an attacker would try.

Every case runs ``python -m hawq ...`` in a subprocess inside a scratch folder and is sorted into
one of four outcomes:

- ``clear error``: exit status 2 (or 130 for Ctrl-C) with one ``error:``/``interrupted`` line on
  stderr and no traceback;
- ``handled``: the input is legitimate and the command did the right thing (its check passed);
- ``raw traceback``: a Python traceback, or an exit status other than 0/2/130;
- ``silently wrong``: the command succeeded where it should have refused, or its check failed
  (a plan covering other layers than the model's, an unescaped payload in the report, code run
  from a file...).

Usage::

    python benchmarks/adversarial_cli.py            # all cases (~10 min on 2 cores)
    python benchmarks/adversarial_cli.py --only allocate,report

Writes ``benchmarks/results/adversarial_cli.json`` (one row per case, rewritten after each case)
and prints the four-column tally per command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "adversarial_cli.json"
PY = sys.executable
SRC: list[str] = []  # --src: run another checkout's hawq (e.g. the code before a fix)

Check = Callable[["Ctx", subprocess.CompletedProcess], str | None]


@dataclass
class Case:
    command: str            # the hawq sub-command, for the tally
    name: str               # what is being tried
    argv: list[str]         # arguments after 'hawq' (may use {w} for the scratch folder)
    expect: str = "error"   # "error" or "ok"
    setup: Callable[[Ctx], None] | None = None
    check: Check | None = None   # for expect="ok" (and extra checks): None = fine, else why not
    sigint_after: float | None = None  # send Ctrl-C after this many seconds
    tags: list[str] = field(default_factory=list)


class Ctx:
    def __init__(self, work: Path):
        self.w = work

    def p(self, *parts: str) -> Path:
        return self.w.joinpath(*parts)


# ----------------------------------------------------------------------------- fixtures

FACTORIES = '''
import torch, torch.nn as nn

def good():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    return {"calib": (x[:32], torch.randint(0, 10, (32,), generator=g)),
            "heldout": (x[32:64], torch.randint(0, 10, (32,), generator=g)),
            "test": (x[64:], torch.randint(0, 10, (32,), generator=g))}

def raises():
    raise RuntimeError("boom in the factory")

def needs_args(width):
    return good()

def not_a_module():
    return 42

def dict_without_model():
    return {"task": "classification"}

def data_raises():
    raise ValueError("no data today")

def data_bad():
    return "not data"

def data_wrong_shape():
    return {"test": (torch.randn(16, 3, 5, 5), torch.randint(0, 10, (16,)))}

def data_empty():
    return {"test": (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))}
'''

def _pickle_payload(ctx: Ctx, target: Path) -> None:
    """A pickle whose unpickling creates the folder ``ctx.p('PWNED')``."""
    marker = ctx.p("PWNED")
    code = (f"import pickle, os\nclass Evil:\n    def __reduce__(self):\n"
            f"        return (os.makedirs, ({str(marker)!r},))\n"
            f"import torch\ntorch.save({{'model': Evil()}}, {str(target)!r})\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([PY, "-c", code], check=True)


def _poison_model(metrics: dict[str, Any]) -> dict[str, Any]:
    """A run whose metrics name ``os:getcwd`` as the model (top level and config)."""
    metrics["model"] = "os:getcwd"
    if isinstance(metrics.get("config"), dict):
        metrics["config"]["model"] = "os:getcwd"
    return metrics


def _not_pwned(ctx: Ctx, proc: subprocess.CompletedProcess) -> str | None:
    return "the pickle in the file ran (PWNED created)" if ctx.p("PWNED").exists() else None


def base_fixtures(ctx: Ctx) -> None:
    """Factories, a digits run, its sensitivity/plan files and a fake data dir."""
    ctx.p("facs.py").write_text(FACTORIES)
    ctx.p("broken.py").write_text("def f(:\n")
    run = ctx.p("run0")
    if not (run / "plan.json").exists():
        subprocess.run([PY, "-m", "hawq", "compress", "--out", str(run)], cwd=ctx.w, check=True,
                       capture_output=True)
        subprocess.run([PY, "-m", "hawq", "analyze", "--model", "digits-cnn", "--samples", "64",
                        "--max-probes", "20", "--json", str(ctx.p("sens.json"))], cwd=ctx.w,
                       check=True, capture_output=True)
    ctx.p("afile").write_text("x")


def _sens(ctx: Ctx) -> dict[str, Any]:
    return json.loads(ctx.p("sens.json").read_text())


def _write_sens(ctx: Ctx, name: str, edit: Callable[[dict[str, Any]], None]) -> None:
    s = _sens(ctx)
    edit(s)
    ctx.p(name).write_text(json.dumps(s))


def _plan(ctx: Ctx) -> dict[str, Any]:
    return json.loads(ctx.p("run0", "plan.json").read_text())


def _write_plan(ctx: Ctx, name: str, edit: Callable[[dict[str, Any]], None]) -> None:
    p = _plan(ctx)
    edit(p)
    ctx.p(name).write_text(json.dumps(p))


def _fake_data(ctx: Ctx, name: str, arrays: dict[str, Any] | None, raw: bytes | None = None,
               weights: bytes | None = None, weights_pickle: bool = False) -> None:
    import numpy as np

    d = ctx.p(name)
    d.mkdir(exist_ok=True)
    if raw is not None:
        (d / "cifar10.npz").write_bytes(raw)
    elif arrays is not None:
        np.savez(d / "cifar10.npz", **arrays)
    else:
        src = SHARED / "cifar10.npz"
        if not (d / "cifar10.npz").exists():
            (d / "cifar10.npz").symlink_to(src)
    wt = d / "resnet20_cifar10.pt"
    if weights is not None:
        wt.write_bytes(weights)
    elif weights_pickle:
        _pickle_payload(ctx, wt)
    elif not wt.exists():
        wt.symlink_to(SHARED / "resnet20_cifar10.pt")


def _cifar_like(n: int = 20, **over: Any) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    a = {"x_train": rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
         "y_train": rng.integers(0, 10, n).astype(np.uint8),
         "x_test": rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
         "y_test": rng.integers(0, 10, n).astype(np.uint8)}
    a.update(over)
    return {k: v for k, v in a.items() if v is not None}


def _json_check(path: str, pred: Callable[[Any], str | None]) -> Check:
    def check(ctx: Ctx, proc: subprocess.CompletedProcess) -> str | None:
        f = ctx.p(path)
        if not f.is_file():
            return f"{path} was not written"
        return pred(json.loads(f.read_text()))
    return check


def _plan_matches_eval(plan_file: str) -> Check:
    """The allocate JSON covers every layer of the model and eval reports the same compression."""
    def check(ctx: Ctx, proc: subprocess.CompletedProcess) -> str | None:
        f = ctx.p(plan_file)
        if not f.is_file():
            return f"{plan_file} was not written"
        plan = json.loads(f.read_text())
        layers = json.loads(ctx.p("run0", "plan.json").read_text())["layers"]
        if set(plan.get("layers", {})) != set(layers):
            return f"plan covers {sorted(plan.get('layers', {}))}, model has {sorted(layers)}"
        ev = subprocess.run([PY, "-m", "hawq", "eval", "--model", "digits-cnn", "--plan", str(f),
                             "--json", str(ctx.p(plan_file + ".eval.json"))], cwd=ctx.w,
                            capture_output=True, text=True, check=False)
        if ev.returncode != 0:
            return f"eval of the plan failed: {ev.stderr.strip()[-200:]}"
        got = json.loads(ctx.p(plan_file + ".eval.json").read_text())
        want = plan["allocation"]["compression"]
        comp = got.get("budget", got).get("weight_compression", got.get("compression"))
        if comp is None or abs(float(comp) - float(want)) > 1e-6 * max(1.0, float(want)):
            return f"allocate said {want:.3f}x, eval says {comp}"
        return None
    return check


HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def _hostile_run(ctx: Ctx) -> None:
    src, dst = ctx.p("run0"), ctx.p("run_hostile")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for fname in ("metrics.json", "plan.json", "sensitivity.json", "command.json"):
        f = dst / fname
        if not f.exists():
            continue
        obj = json.loads(f.read_text())

        def poison(o: Any) -> Any:
            if isinstance(o, dict):
                return {k: (HOSTILE if isinstance(v, str) and k not in ("name",) else poison(v))
                        for k, v in o.items()}
            if isinstance(o, list):
                return [poison(v) for v in o]
            return o
        obj = poison(obj)
        if isinstance(obj, dict):
            obj["hostile"] = HOSTILE
            if isinstance(obj.get("config"), dict):
                obj["config"]["a_bits"] = HOSTILE
            if isinstance(obj.get("budget"), dict):
                obj["budget"]["compression"] = HOSTILE
        f.write_text(json.dumps(obj))


def _report_escaped(ctx: Ctx, proc: subprocess.CompletedProcess) -> str | None:
    html = list(ctx.p("run_hostile").glob("*.html"))
    if not html:
        return None if proc.returncode == 2 else "no HTML written"
    text = html[0].read_text()
    for bad in ("<script>alert", "<img src=x onerror"):
        if bad in text:
            return f"unescaped {bad!r} in the report"
    return None


def _report_lists(run: str, fname: str) -> Check:
    """The report was written and names ``fname`` among the files it could not use."""
    def check(ctx: Ctx, proc: subprocess.CompletedProcess) -> str | None:
        html = ctx.p(run, "report.html")
        if not html.is_file():
            return "no report written"
        text = html.read_text()
        if "could not be used" not in text or fname not in text:
            return f"the report does not say {fname} could not be used"
        return None
    return check


def _stale_run(ctx: Ctx) -> None:
    d = ctx.p("run_reused")
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(ctx.p("run0"), d)
    (d / "model.safetensors").write_bytes(b"old")
    (d / "model.json").write_text("{}")


def _stale_check(ctx: Ctx, proc: subprocess.CompletedProcess) -> str | None:
    d = ctx.p("run_reused")
    if (d / "model.safetensors").exists() and proc.returncode == 0:
        return "old model.safetensors left beside the new plan"
    return None


def _manifest_case(edit: Callable[[dict[str, Any]], None]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        d = ctx.p("exp")
        if not (d / "model.json").exists():
            subprocess.run([PY, "-m", "hawq", "export", "--model", "digits-cnn", "--plan",
                            str(ctx.p("run0", "plan.json")), "--out",
                            str(d / "model.safetensors")], cwd=ctx.w, check=True,
                           capture_output=True)
        man = json.loads((d / "model.json").read_text())
        edit(man)
        e = ctx.p("exp_edit")
        e.mkdir(exist_ok=True)
        shutil.copy(d / "model.safetensors", e / "model.safetensors")
        (e / "model.json").write_text(json.dumps(man))
    return setup


LOAD_SNIPPET = ("import sys, hawq; from hawq.post.export import load_quantized; "
                "load_quantized(sys.argv[1])")


# ----------------------------------------------------------------------------- cases

def cases() -> list[Case]:
    C = Case
    L: list[Case] = []
    M = ["--model", "digits-cnn"]
    # layers / model factories
    L += [
        C("layers", "unknown model name", ["layers", "--model", "nosuchmodel"]),
        C("layers", "factory os:getcwd (not a Module)", ["layers", "--model", "os:getcwd"]),
        C("layers", "module that does not exist", ["layers", "--model", "nosuchmod:f"]),
        C("layers", "file with a syntax error", ["layers", "--model", "broken.py:f"]),
        C("layers", "factory that raises", ["layers", "--model", "facs.py:raises"]),
        C("layers", "factory needing arguments", ["layers", "--model", "facs.py:needs_args"]),
        C("layers", "factory returning 42", ["layers", "--model", "facs.py:not_a_module"]),
        C("layers", "factory dict without model", ["layers", "--model",
                                                   "facs.py:dict_without_model"]),
        C("layers", "missing attribute", ["layers", "--model", "facs.py:nope"]),
        C("layers", "spec with empty factory", ["layers", "--model", "facs.py:"]),
        C("layers", "good factory", ["layers", "--model", "facs.py:good"], expect="ok"),
        C("layers", "--data-dir that does not exist", ["layers", "--model", "resnet20",
                                                      "--data-dir", "{w}/nodir"]),
        C("layers", "truncated weights file", ["layers", "--model", "resnet20", "--data-dir",
                                               "{w}/dd_trunc_w"],
          setup=lambda c: _fake_data(c, "dd_trunc_w", None, weights=(
              SHARED / "resnet20_cifar10.pt").read_bytes()[:5000])),
        C("layers", "garbage weights file", ["layers", "--model", "resnet20", "--data-dir",
                                             "{w}/dd_garb_w"],
          setup=lambda c: _fake_data(c, "dd_garb_w", None, weights=b"not a checkpoint")),
        C("layers", "weights file carrying a pickle payload",
          ["layers", "--model", "resnet20", "--data-dir", "{w}/dd_pickle_w"],
          setup=lambda c: _fake_data(c, "dd_pickle_w", None, weights_pickle=True),
          check=_not_pwned),
    ]
    # data files
    bad_npz = {
        "truncated cifar10.npz": {"raw": (SHARED / "cifar10.npz").read_bytes()[:100000]
                                      if (SHARED / "cifar10.npz").exists() else b"PK"},
        "empty file cifar10.npz": {"raw": b""},
        "cifar10.npz with wrong keys": {"arrays": {"a": __import__("numpy").zeros(3)}},
        "cifar10.npz wrong image shape": {"arrays": _cifar_like(
            x_test=__import__("numpy").zeros((20, 28, 28), dtype="uint8"))},
        "cifar10.npz labels out of range": {"arrays": _cifar_like(
            y_test=__import__("numpy").full(20, 57, dtype="uint8"))},
        "cifar10.npz label count mismatch": {"arrays": _cifar_like(
            y_test=__import__("numpy").zeros(7, dtype="uint8"))},
        "cifar10.npz with zero images": {"arrays": _cifar_like(n=0)},
        "cifar10.npz float images": {"arrays": _cifar_like(
            x_test=__import__("numpy").full((20, 32, 32, 3), float("nan"), dtype="float32"))},
    }
    for i, (name, kw) in enumerate(bad_npz.items()):
        dname = f"dd_npz{i}"
        L.append(C("eval", name, ["eval", "--model", "resnet20", "--data-dir", "{w}/" + dname,
                                  "--test-samples", "10", "--calib-samples", "8"],
                   setup=(lambda c, dname=dname, kw=kw: _fake_data(c, dname, kw.get("arrays"),
                                                                   raw=kw.get("raw")))))
    L += [
        C("eval", "--data factory that raises", ["eval", "--model", "facs.py:good", "--data",
                                                 "facs.py:data_raises"]),
        C("eval", "--data factory returning a string", ["eval", "--model", "facs.py:good",
                                                        "--data", "facs.py:data_bad"]),
        C("eval", "--data of the wrong shape", ["eval", "--model", "facs.py:good", "--data",
                                                "facs.py:data_wrong_shape"]),
        C("eval", "--data with zero samples", ["eval", "--model", "facs.py:good", "--data",
                                               "facs.py:data_empty"]),
        C("eval", "--data spec without factory", ["eval", "--model", "facs.py:good", "--data",
                                                  "facs.py"]),
        C("eval", "own model + data", ["eval", "--model", "facs.py:good", "--data",
                                       "facs.py:data"], expect="ok"),
    ]
    # numbers
    for cmd, flag, vals in [
        ("analyze", "--samples", ["0", "-5"]), ("analyze", "--max-probes", ["0", "-1"]),
        ("analyze", "--tol", ["-1", "nan"]), ("analyze", "--batch-size", ["0", "-2"]),
        ("analyze", "--threads", ["-3", "0"]),
        ("eval", "--test-samples", ["0", "-5"]), ("eval", "--samples", ["-5"]),
        ("eval", "--calib-samples", ["0", "-1"]), ("eval", "--w-bits", ["0", "1", "99", "-4"]),
        ("eval", "--a-bits", ["0", "-8"]),
        ("compress", "--target-compression", ["0.5", "-8", "0", "inf", "nan"]),
        ("compress", "--target-avg-bits", ["0", "40"]),
        ("compress", "--bits", ["2,x,8", "1", "99", ""]),
        ("compress", "--samples", ["-5"]), ("compress", "--calib-samples", ["0"]),
        ("compress", "--finetune", ["-1"]),
        ("finetune", "--epochs", ["-1"]), ("finetune", "--lr", ["-1", "nan"]),
        ("finetune", "--batch-size", ["0"]), ("finetune", "--train-samples", ["0"]),
        ("zeroq", "--target-compression", ["0"]), ("zeroq", "--bits", ["1"]),
        ("zeroq", "--distill-iters", ["-3"]), ("zeroq", "--distill-batch", ["0"]),
    ]:
        for v in vals:
            extra = ["--plan", "{w}/run0/plan.json", "--steps-per-epoch", "2"] \
                if cmd == "finetune" else []
            if cmd == "compress":
                extra = ["--hessian-samples", "32", "--max-probes", "5"]
            if cmd == "analyze" and flag != "--max-probes":
                extra = ["--max-probes", "5"]
            L.append(C(cmd, f"{flag} {v!r}", [cmd, *M, f"{flag}={v}", *extra]))
    # outputs checked before the work
    L += [
        C("analyze", "--json names a directory", ["analyze", *M, "--samples", "32", "--json",
                                                  "{w}"]),
        C("analyze", "--json under a file", ["analyze", *M, "--samples", "32", "--json",
                                             "{w}/afile/x.json"]),
        C("compress", "--out is an existing file", ["compress", "--out", "{w}/afile"]),
        C("compress", "--out under a file", ["compress", "--out", "{w}/afile/sub"]),
        C("compress", "--bits with a repeated width (deduplicated)",
          ["compress", "--bits", "4,4,8", "--hessian-samples", "32", "--max-probes", "5"],
          expect="ok"),
        *([C("compress", "--out under a read-only folder", ["compress", "--out", "{w}/ro/sub"],
             setup=lambda c: (c.p("ro").mkdir(exist_ok=True), os.chmod(c.p("ro"), 0o500)))]
          if os.geteuid() != 0 else []),  # root writes anywhere: nothing to refuse
        C("compress", "--out reused: another run's export beside", [
            "compress", "--out", "{w}/run_reused"], setup=_stale_run, check=_stale_check),
        C("zeroq", "--out is an existing file", ["zeroq", *M, "--out", "{w}/afile"]),
        C("allocate", "--plot names a directory", ["allocate", "--sensitivity-file",
                                                   "{w}/sens.json", "--plot", "{w}"]),
        C("export", "--onnx names a directory", ["export", "--run", "{w}/run0", "--onnx", "{w}"]),
    ]
    # sensitivity files
    sens_cases: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("only some layers", lambda s: s.update(layers=s["layers"][:1])),
        ("a layer listed twice", lambda s: s.update(layers=s["layers"] + s["layers"][:1])),
        ("a layer without name", lambda s: s["layers"][0].pop("name")),
        ("non-numeric trace", lambda s: s["layers"][0].update(avg_trace="big")),
        ("null trace", lambda s: s["layers"][0].update(avg_trace=None)),
        ("edited params", lambda s: s["layers"][0].update(params=1)),
        ("unknown layer", lambda s: s["layers"][0].update(name="nosuch.layer")),
        ("another model's layers", lambda s: [lh.update(name=f"layer{k}.conv")
                                              for k, lh in enumerate(s["layers"])]),
        ("model os:getcwd in the file", lambda s: s.update(model="os:getcwd")),
        ("layers not a list", lambda s: s.update(layers={"a": 1})),
        ("layers empty", lambda s: s.update(layers=[])),
        ("top-level list", lambda s: None),
    ]
    for k, (name, edit) in enumerate(sens_cases):
        fname = f"sens_{k}.json"
        argv = ["allocate", "--sensitivity-file", "{w}/" + fname, "--target-compression", "8"]
        if name == "top-level list":
            setup = (lambda c, fname=fname: c.p(fname).write_text("[1, 2]"))
        else:
            setup = (lambda c, fname=fname, edit=edit: _write_sens(c, fname, edit))
        L.append(C("allocate", f"sensitivity file: {name}", argv, setup=setup,
                   check=_not_pwned))
    L += [
        C("allocate", "sensitivity file missing", ["allocate", "--sensitivity-file",
                                                   "{w}/nosuch.json"]),
        C("allocate", "sensitivity file not JSON", ["allocate", "--sensitivity-file",
                                                    "{w}/broken.py"]),
        C("allocate", "compress's sensitivity.json", [
            "allocate", "--model", "digits-cnn", "--sensitivity-file",
            "{w}/run0/sensitivity.json", "--target-compression", "8", "--json",
            "{w}/plan_from_compress.json"], expect="ok",
          check=_plan_matches_eval("plan_from_compress.json")),
        C("allocate", "analyze --json file", [
            "allocate", "--sensitivity-file", "{w}/sens.json", "--target-compression", "8",
            "--json", "{w}/plan_from_analyze.json"], expect="ok",
          check=_plan_matches_eval("plan_from_analyze.json")),
        C("allocate", "infeasible budget", ["allocate", "--sensitivity-file", "{w}/sens.json",
                                            "--target-compression", "1000"]),
        C("allocate", "latency table missing", ["allocate", "--sensitivity-file",
                                                "{w}/sens.json", "--latency-table",
                                                "{w}/nosuch.json", "--latency-limit", "3"]),
        C("allocate", "latency table malformed", ["allocate", "--sensitivity-file",
                                                  "{w}/sens.json", "--latency-table",
                                                  "{w}/afile", "--latency-limit", "3"]),
    ]
    # plans
    plan_cases: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("unknown layer", lambda p: p["layers"].update({"nosuch": {"w_bits": 4, "a_bits": 8}})),
        ("non-integer bits", lambda p: next(iter(p["layers"].values())).update(w_bits="four")),
        ("bits 99", lambda p: next(iter(p["layers"].values())).update(w_bits=99)),
        ("fractional bits", lambda p: next(iter(p["layers"].values())).update(w_bits=3.5)),
        ("layers a list", lambda p: p.update(layers=[1, 2])),
        ("no layers", lambda p: p.pop("layers")),
    ]
    for k, (name, edit) in enumerate(plan_cases):
        fname = f"plan_{k}.json"
        L.append(C("eval", f"--plan {name}", ["eval", *M, "--plan", "{w}/" + fname],
                   setup=lambda c, fname=fname, edit=edit: _write_plan(c, fname, edit)))
        L.append(C("finetune", f"--plan {name}", ["finetune", *M, "--plan", "{w}/" + fname,
                                                  "--steps-per-epoch", "2"],
                   setup=lambda c, fname=fname, edit=edit: _write_plan(c, fname, edit)))
    L += [
        C("eval", "--plan missing", ["eval", *M, "--plan", "{w}/nosuch.json"]),
        C("eval", "--plan not JSON", ["eval", *M, "--plan", "{w}/broken.py"]),
        C("eval", "--w-clip unknown", ["eval", *M, "--w-clip", "magic"]),
        C("eval", "--task unknown", ["eval", *M, "--task", "nosuch"]),
        C("eval", "--task causal-lm on an image classifier", ["eval", *M, "--task",
                                                               "causal-lm"]),
    ]
    # finetune checkpoints
    L += [
        C("finetune", "--resume with a pickle payload in last.pt",
          ["finetune", *M, "--plan", "{w}/run0/plan.json", "--out", "{w}/ft_evil", "--resume",
           "--steps-per-epoch", "2"],
          setup=lambda c: _pickle_payload(c, c.p("ft_evil", "last.pt")), check=_not_pwned),
        C("finetune", "--resume with a truncated last.pt",
          ["finetune", *M, "--plan", "{w}/run0/plan.json", "--out", "{w}/ft_trunc", "--resume",
           "--steps-per-epoch", "2"],
          setup=lambda c: (c.p("ft_trunc").mkdir(exist_ok=True),
                           c.p("ft_trunc", "last.pt").write_bytes(b"PK\x03\x04trunc"))),
        C("finetune", "--resume under another plan",
          ["finetune", *M, "--plan", "{w}/plan_other.json", "--out", "{w}/ft_a", "--resume",
           "--steps-per-epoch", "2", "--epochs", "2"],
          setup=lambda c: (subprocess.run(
              [PY, "-m", "hawq", "finetune", *M, "--plan", str(c.p("run0", "plan.json")),
               "--out", str(c.p("ft_a")), "--steps-per-epoch", "2", "--epochs", "1"],
              cwd=c.w, capture_output=True, check=False),
              _write_plan(c, "plan_other.json", lambda p: [
                  v.update(w_bits=8) for v in p["layers"].values()]))),
        C("finetune", "--device cuda without a GPU", ["finetune", *M, "--plan",
                                                      "{w}/run0/plan.json", "--device", "cuda",
                                                      "--steps-per-epoch", "2"]),
        C("finetune", "--device bogus", ["finetune", *M, "--plan", "{w}/run0/plan.json",
                                         "--device", "gpu9", "--steps-per-epoch", "2"]),
    ]
    # export / load
    L += [
        C("export", "--run that does not exist", ["export", "--run", "{w}/nosuch"]),
        C("export", "--run without a plan", ["export", "--run", "{w}/emptyrun"],
          setup=lambda c: c.p("emptyrun").mkdir(exist_ok=True)),
        C("export", "--run whose metrics name os:getcwd as the model",
          ["export", "--run", "{w}/run_evilmodel"],
          setup=lambda c: (shutil.copytree(c.p("run0"), c.p("run_evilmodel"),
                                           dirs_exist_ok=True),
                           c.p("run_evilmodel", "metrics.json").write_text(json.dumps(
                               _poison_model(json.loads(
                                   c.p("run0", "metrics.json").read_text()))))),
          check=_not_pwned),
    ]
    man_cases: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("model.class os:getcwd", lambda m: m.update(model={"class": "os:getcwd"})),
        ("model.name os:getcwd", lambda m: m.update(model={"name": "os:getcwd"})),
        ("tensors ../../etc/hostname", lambda m: m.update(tensors="../../etc/hostname")),
        ("tensors absolute path", lambda m: m.update(tensors="/etc/hostname")),
        ("rows 1e11", lambda m: next(v for v in m["layers"].values() if v.get("packed"))
         .update(rows=10 ** 11)),
        ("layers a list", lambda m: m.update(layers=[1])),
        ("bits a string", lambda m: next(iter(m["layers"].values())).update(w_bits="x")),
        ("missing layers", lambda m: m.pop("layers")),
        ("format_version a string", lambda m: m.update(format_version="x")),
    ]
    for name, edit in man_cases:
        L.append(C("export", f"load_quantized: manifest {name}", ["__load__", "{w}/exp_edit/model.json"],
                   setup=_manifest_case(edit), check=_not_pwned))
    # report
    L += [
        C("report", "run folder missing", ["report", "{w}/nosuch"]),
        C("report", "malformed metrics.json (plan.json fine)", ["report", "{w}/run_badjson"],
          expect="ok", check=_report_lists("run_badjson", "metrics.json"),
          setup=lambda c: (shutil.copytree(c.p("run0"), c.p("run_badjson"), dirs_exist_ok=True),
                           c.p("run_badjson", "metrics.json").write_text("{oops"))),
        C("report", "empty run folder", ["report", "{w}/emptyrun2"],
          setup=lambda c: c.p("emptyrun2").mkdir(exist_ok=True)),
        C("report", "hostile strings in every JSON field", ["report", "{w}/run_hostile"],
          expect="ok", setup=_hostile_run, check=_report_escaped),
        C("report", "metrics.json a list (plan.json fine)", ["report", "{w}/run_listjson"],
          expect="ok", check=_report_lists("run_listjson", "metrics.json"),
          setup=lambda c: (shutil.copytree(c.p("run0"), c.p("run_listjson"),
                                           dirs_exist_ok=True),
                           c.p("run_listjson", "metrics.json").write_text("[1]"))),
    ]
    # Ctrl-C
    L += [
        C("analyze", "Ctrl-C during the analysis", ["analyze", "--model", "resnet20",
                                                   "--samples", "256", "--max-probes", "200"],
          sigint_after=8.0),
        C("compress", "Ctrl-C during compress", ["compress", "--model", "resnet20", "--out",
                                                 "{w}/run_int"], sigint_after=8.0,
          check=lambda c, p: ("plan.json written by an interrupted run"
                              if c.p("run_int", "plan.json").exists() else None)),
    ]
    return L


# ----------------------------------------------------------------------------- runner

def classify(case: Case, proc: subprocess.CompletedProcess, ctx: Ctx) -> tuple[str, str]:
    err = proc.stderr or ""
    tb = "Traceback (most recent call last)" in err
    if tb or proc.returncode not in (0, 2, 130):
        last = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
        return "raw traceback", last[:300]
    why = case.check(ctx, proc) if case.check else None
    if why:
        return "silently wrong", why
    if proc.returncode in (2, 130):
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else ""
        if case.expect == "ok":
            return "silently wrong", f"refused a legitimate input: {msg[:300]}"
        return "clear error", msg[:300]
    if case.expect == "error":
        return "silently wrong", "accepted: " + (proc.stdout.strip().splitlines() or [""])[-1][:200]
    return "handled", ""


def run_case(case: Case, ctx: Ctx, timeout: float) -> dict[str, Any]:
    if case.setup:
        case.setup(ctx)
    argv = [a.replace("{w}", str(ctx.w)) for a in case.argv]
    if argv[0] == "__load__":
        cmd = [PY, "-c", LOAD_SNIPPET, argv[1]]
    else:
        cmd = [PY, "-m", "hawq", *argv]
    t0 = time.perf_counter()
    env = os.environ | {"COLUMNS": "120"}
    if case.sigint_after is None:
        try:
            proc = subprocess.run(cmd, cwd=ctx.w, capture_output=True, text=True,
                                  timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            return {"outcome": "silently wrong", "detail": f"no answer within {timeout:.0f} s",
                    "seconds": timeout}
    else:
        # a shell's background job starts with SIGINT ignored; give the child Python's default
        p = subprocess.Popen(cmd, cwd=ctx.w, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            p.wait(case.sigint_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=timeout)
        proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    outcome, detail = classify(case, proc, ctx)
    if argv[0] == "__load__" and proc.returncode == 1 and "Traceback" in proc.stderr:
        # the library call: a HawqError traceback is the expected way to refuse
        last = proc.stderr.strip().splitlines()[-1]
        if last.startswith("hawq.base.errors."):
            outcome, detail = "clear error", last[:300]
    return {"outcome": outcome, "detail": detail, "rc": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated commands to run")
    ap.add_argument("--work", default="/tmp/hawq_adversarial", help="scratch folder")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--src", default=None, help="a checkout's src/ to run instead of the "
                    "installed hawq (compare before/after a fix)")
    args = ap.parse_args()
    if args.src:
        SRC.append(str(Path(args.src).resolve()))
    work = Path(args.work)
    if work.exists():
        for p in work.rglob("*"):
            if p.is_dir():
                os.chmod(p, 0o700)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ctx = Ctx(work)
    os.environ["PYTHONPATH"] = os.pathsep.join([*SRC, str(work)])  # every subprocess
    base_fixtures(ctx)
    only = set(args.only.split(",")) if args.only else None
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    for case in cases():
        if only and case.command not in only:
            continue
        try:
            r = run_case(case, ctx, args.timeout)
        except Exception as exc:  # noqa: BLE001 - a broken fixture is reported, not fatal
            r = {"outcome": "fixture failed", "detail": repr(exc)[:300]}
        row = {"command": case.command, "case": case.name, "expect": case.expect, **r}
        rows.append(row)
        print(f"{row['outcome']:>15}  {case.command:<9} {case.name}  {row.get('detail', '')}"
              [:200], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows, "summary": tally(rows)}, indent=1) + "\n")
    summary = tally(rows)
    print()
    cols = ["tried", "clear error", "handled", "raw traceback", "silently wrong"]
    print(f"{'command':<10}" + "".join(f"{c:>16}" for c in cols))
    for cmd, t in summary.items():
        print(f"{cmd:<10}" + "".join(f"{t.get(c, 0):>16}" for c in cols))
    print(f"wrote {out}")


def tally(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        for key in (r["command"], "all"):
            t = out.setdefault(key, {"tried": 0})
            t["tried"] += 1
            t[r["outcome"]] = t.get(r["outcome"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == "all", kv[0])))


if __name__ == "__main__":
    main()
