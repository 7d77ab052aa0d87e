"""The workflows: one skeleton (setup -> sensitivity -> allocate -> refine -> quantize/evaluate ->
write) shared by ``compress`` (HAWQ-V1/V2, hybrid, ILP), ``zeroq`` (data-free) and the
channel-wise methods (``cw-hawq``, ``cw-hessian``). A method differs only in the steps it plugs
in (:class:`Steps`): where its sensitivity data comes from, how it scores layers, how it picks
bits. Every workflow takes the user's own ``nn.Module``, data and task, or a built-in model name.

Public entry points: :func:`compress`, :func:`zeroq`, :func:`finetune_plan`. They return one
result type, :class:`CompressResult`, written by one writer, :func:`write_outputs`.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hawq.modules.accounting import budget_report, count_params
from hawq.post.biascorr import quantize_calibrate_
from hawq.post.config import CHANNELWISE_ALLOCATORS, CompressConfig, ZeroQConfig
from hawq.feed.data import load_dataset
from hawq.base import dist
from hawq.base.errors import ConfigError, DataError
from hawq.modules.evaluate import EvalResult, evaluate
from hawq.base.io import atomic_write_bytes, write_json
from hawq.modules.models import build_model, get_spec
from hawq.post.pipeline import (allocate_plan, allocation_limits, budget_from_config, refine_applies,
                           refine_wanted, resolve_device)
from hawq.maths.plan import BitPlan, LayerSpec, QuantConfig
from hawq.analysis.sensitivities import hessian_warnings, sensitivity_costs
from hawq.modules.surgery import layers as layer_infos
from hawq.feed.tasks import Task, as_task, iter_batches, split_batch

__all__ = ["RUN_DIRS", "RUN_FILES", "RUN_MARKER", "CompressResult", "Setup", "Splits", "Steps",
           "claim_run_dir", "compress", "finetune_plan", "run_files", "run_workflow", "setup",
           "write_outputs", "zeroq"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data and setup

@dataclass
class Splits:
    """The user's data for a workflow: ``calib`` (sensitivity, calibration), ``heldout``
    (refinement / reward; optional) and ``test`` (the reported metric; optional). Each in any
    form :func:`hawq.feed.tasks.iter_batches` reads."""

    calib: Any
    heldout: Any = None
    test: Any = None

    @classmethod
    def of(cls, data: Any) -> "Splits":
        """Splits from a :class:`Splits`, a dict with ``calib``/``heldout``/``test`` keys (or
        ``train`` for ``calib``) or one data object (used as ``calib``)."""
        if isinstance(data, Splits):
            return data
        if isinstance(data, Mapping) and set(data) & {"calib", "heldout", "test", "train"}:
            unknown = set(data) - {"calib", "heldout", "test", "train"}
            if unknown:
                raise DataError(f"data has keys {sorted(unknown)}: use calib, heldout and test")
            calib = data.get("calib", data.get("train"))
            if calib is None:
                raise DataError("data needs 'calib' (calibration data): give "
                                "{'calib': ..., 'heldout': ..., 'test': ...}")
            return cls(calib, data.get("heldout"), data.get("test"))
        return cls(data)


@dataclass
class Setup:
    """What every workflow starts from: the float model, its task (bound to the float model),
    the data splits, the quantizable layers and their sizes, the FP32 metric."""

    model: nn.Module
    task: Task
    splits: Splits
    infos: list[Any]
    quant: QuantConfig
    fp32: EvalResult | None
    name: str
    times: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.infos]

    @property
    def params(self) -> np.ndarray:
        return np.array([i.params for i in self.infos], dtype=float)

    @property
    def macs(self) -> np.ndarray:
        return np.array([i.macs for i in self.infos], dtype=float)


def _limited(data: Any, limit: int | None) -> Any:
    """``data`` cut to ``limit`` samples when it is a whole in-memory dataset."""
    if limit is None or data is None:
        return data
    if isinstance(data, torch.utils.data.TensorDataset):
        return torch.utils.data.TensorDataset(*(t[:limit] for t in data.tensors))
    return data


def _builtin(cfg: Any, extra: int) -> tuple[nn.Module, Splits]:
    """A built-in model by name with its dataset: calibration = the first
    max(calib, hessian) training samples, held-out = the ``extra`` after them, test split."""
    spec = get_spec(cfg.model)
    model = build_model(cfg.model, pretrained=True, data_dir=cfg.data_dir)
    test = load_dataset(spec.dataset, "test", cfg.data_dir, cfg.test_samples)
    n_cal = max(cfg.calib_samples, getattr(cfg, "hessian_samples", 0))
    train = load_dataset(spec.dataset, "train", cfg.data_dir, n_cal + extra)
    calib = torch.utils.data.TensorDataset(*(t[:n_cal] for t in train.tensors))
    held = torch.utils.data.TensorDataset(*(t[n_cal:] for t in train.tensors)) \
        if extra and len(train) > n_cal else None
    return model, Splits(calib, held, test)


def example_batch(data: Any) -> Any:
    """One sample of ``data`` (a batch of size 1) for shape-recording passes."""
    return split_batch(next(iter(iter_batches(data, 1, "calibration data", limit=1))), 1)[0]


def setup(model: nn.Module | None, data: Any, task: Any, cfg: Any, *, extra: int = 0,
          quant: QuantConfig | None = None, evaluate_fp32: bool = True,
          progress: bool = False, device: str | torch.device | None = None) -> Setup:
    """The shared first step: load a built-in model (``model`` None: ``cfg.model`` by name, its
    dataset split into calibration, ``extra`` held-out and test samples) or take the user's
    ``model`` and ``data`` (:class:`Splits` or what :meth:`Splits.of` reads); bind the task to
    the float model, check that the data fits the task (a :class:`DataError` naming the task and
    the batch form it expects), list the quantizable layers, evaluate FP32 on the test data.
    ``device``: move the model there first (batches follow the model's device). Cost: one forward on one sample, plus one pass over the test data when ``evaluate_fp32``."""
    t0 = time.perf_counter()
    if model is None:
        if data is not None:
            raise ConfigError("data= without model=: give your model too, or neither to use the "
                              f"built-in {cfg.model!r} with its own data")
        model, splits = _builtin(cfg, extra)
        name = cfg.model
    else:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model is a {type(model).__name__}: give a torch.nn.Module (or "
                              "None and config.model naming a built-in model)")
        if data is None:
            raise DataError("a model of your own needs data=: calibration data (tensors, "
                            "(inputs, targets), dicts of tensors, a Dataset or a DataLoader), or "
                            "{'calib': ..., 'heldout': ..., 'test': ...}")
        splits = Splits.of(data)
        name = getattr(cfg, "model", None) or type(model).__name__
        if ":" not in name:  # a built-in name says nothing about the user's object
            name = type(model).__name__
    if device is not None:
        model.to(device)
    tk = as_task(task if task is not None else getattr(cfg, "task", None))
    model.eval()
    tk = tk.bind(model)
    tk.check(model, splits.calib)
    warnings: list[str] = []
    if splits.test is None:
        splits.test = splits.heldout if splits.heldout is not None else splits.calib
        which = "held-out" if splits.heldout is not None else "calibration"
        warnings.append(f"no test data given: the reported {tk.metric} is measured on the "
                        f"{which} data; pass data={{'calib': ..., 'test': ...}}")
        log.warning(warnings[-1])
    else:
        tk.check(model, splits.test)
    infos = layer_infos(model, example_batch(splits.calib), task=tk)
    if not infos:
        raise ConfigError(f"{name}: the model has no quantizable layers (Conv1d/Conv2d/Linear/"
                          "attention projections)")
    fp32 = evaluate(model, splits.test, progress=progress, task=tk) if evaluate_fp32 else None
    st = Setup(model, tk, splits, infos, quant or QuantConfig(), fp32, name, warnings=warnings)
    st.times["setup"] = time.perf_counter() - t0
    return st


# ----------------------------------------------------------------------------- results

@dataclass
class CompressResult:
    """Everything a workflow measured; ``to_dict`` is what ``metrics.json`` holds.

    ``metric``/``fp32_value``/``value`` are the task's headline metric (``higher_is_better``
    says its direction); ``accuracy``/``fp32_accuracy`` are the same numbers when the metric is
    top-1 accuracy, else None. ``uniform``: the uniform plan of equal size (bits, metric, size)
    where the bit set has one. ``warnings``: what the user should read (non-converged or
    negative Hessian estimates, data substitutions). ``distill``: ZeroQ's distillation record."""

    config: dict[str, Any]
    plan: dict[str, Any]
    layers: list[dict[str, Any]]
    allocation: dict[str, Any] | None
    fp32_accuracy: float | None
    accuracy: float | None
    budget: dict[str, Any]
    uniform: dict[str, Any] = field(default_factory=dict)
    refinement: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    metric: str = "accuracy"
    fp32_value: float | None = None
    value: float | None = None
    warnings: list[str] = field(default_factory=list)
    distill: dict[str, Any] | None = None
    version: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- run folders

#: the marker that says which run owns a run folder (``run_id``, ``kind``, ``created``)
RUN_MARKER = "run.json"
#: the files hawq's commands write into a run folder (compress/zeroq, record_command, export,
#: report, finetune, density); a new run refuses a folder holding any of them (or clears them)
RUN_FILES = (RUN_MARKER, "plan.json", "metrics.json", "sensitivity.json", "frontier.png",
             "layers.png", "distill.png", "command.json", "density.json", "model.safetensors",
             "model.json", "model.pt", "finetune.json", "last.pt", "report.html", "report.md")
#: the folders hawq's commands write into a run folder
RUN_DIRS = ("finetune", "report_files")


def run_files(out_dir: str | Path) -> list[str]:
    """The names of hawq's own run outputs (:data:`RUN_FILES`, :data:`RUN_DIRS` with a
    trailing ``/``) present in ``out_dir``, the marker excluded. Cost: one stat per name."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [n for n in RUN_FILES if n != RUN_MARKER and (out / n).is_file()]
    return found + [f"{n}/" for n in RUN_DIRS if (out / n).is_dir()]


def _marker_id(out: Path) -> str | None:
    try:
        import json

        return json.loads((out / RUN_MARKER).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def claim_run_dir(out_dir: str | Path, kind: str, overwrite: bool = False
                  ) -> tuple[str, list[str]]:
    """Make ``out_dir`` the folder of one new run, before any work: refuse a path that is a
    file or cannot be written, and a folder that holds another run's outputs (a
    :class:`ConfigError` listing them and saying to pass a new ``--out`` / ``out_dir``); with
    ``overwrite`` remove those outputs instead (only hawq's own :data:`RUN_FILES` /
    :data:`RUN_DIRS`; other files stay). Then write ``run.json`` (a new run id). A folder holding
    only a marker (a run that stopped before writing anything) is taken over. Returns (run id,
    the names removed). Cost: a few file-system calls (plus deleting what ``overwrite`` clears).
    """
    import datetime as _dt
    import shutil
    import uuid

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} is an existing file, not a folder: pass a new "
                          "--out (a folder hawq creates)")
    old = run_files(out)
    removed: list[str] = []
    if old and not overwrite:
        raise ConfigError(f"out_dir {str(out)!r} already holds another run's files {old}: pass a "
                          "new --out (each run folder holds one run), or --overwrite to remove "
                          "just these (from Python: overwrite=True)")
    try:
        for name in old:
            target = out / name.rstrip("/")
            if name.endswith("/"):
                shutil.rmtree(target)
            else:
                target.unlink()
            removed.append(name)
        out.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex
        write_json(out / RUN_MARKER, {
            "run_id": run_id, "kind": kind,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds")})
    except OSError as exc:
        raise ConfigError(f"out_dir {str(out)!r} cannot be written ({exc.strerror or exc}): pass "
                          "a writable --out") from None
    if removed:
        log.warning("cleared %s of a previous run from %s", removed, out)
    return run_id, removed


def _release_run_dir(out_dir: str | Path, run_id: str, created: bool) -> None:
    """Undo :func:`claim_run_dir` after a run failed before writing anything: remove our
    marker (and the folder when the claim created it and it is now empty)."""
    out = Path(out_dir)
    try:
        if _marker_id(out) == run_id and not run_files(out):
            (out / RUN_MARKER).unlink()
            if created and not any(out.iterdir()):
                out.rmdir()
    except OSError:  # best effort: the run's own error is what the user must see
        pass


def _owned_run(out_dir: str | Path | None, kind: str, overwrite: bool,
               work: Callable[[str | None, list[str]], CompressResult]) -> CompressResult:
    """Claim ``out_dir`` (when given) before ``work(run_id, removed)`` runs; release it when the
    work fails before writing anything."""
    if out_dir is None:
        return work(None, [])
    created = not Path(out_dir).exists()
    run_id, removed = claim_run_dir(out_dir, kind, overwrite)
    try:
        return work(run_id, removed)
    except BaseException:
        _release_run_dir(out_dir, run_id, created)
        raise


# ----------------------------------------------------------------------------- the skeleton

@dataclass
class Chosen:
    """An allocation step's answer: per-layer weight bits (an int, or a list per channel), the
    JSON allocation record, and extra per-layer row fields."""

    bits: list[Any]
    allocation: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    refinement: dict[str, Any] | None = None


@dataclass
class Steps:
    """The steps a method plugs into :func:`run_workflow`.

    ``data(setup) -> (data, extras)``: the data for sensitivity and calibration (the calibration
    split, or ZeroQ's distilled inputs); ``sensitivity(setup, data) -> (omega | None, stats)``;
    ``allocate(setup, omega, stats, data) -> Chosen``."""

    data: Callable[[Setup], tuple[Any, dict[str, Any]]]
    sensitivity: Callable[[Setup, Any], tuple[np.ndarray | None, dict[str, Any]]]
    allocate: Callable[[Setup, np.ndarray | None, dict[str, Any], Any], Chosen]
    calib_samples: int | None = 512
    bias_correct: bool = False


def _uniform_bits(cfg: Any, params: np.ndarray, a_bits: int) -> int | None:
    """The bit width whose uniform plan has the size of ``cfg``'s budget, when ``cfg.bits``
    holds one (compression / average-bits / byte targets)."""
    bits = getattr(cfg, "bits", ())
    want = None
    if getattr(cfg, "target_compression", None):
        want = 32.0 / cfg.target_compression
    elif getattr(cfg, "target_avg_bits", None):
        want = cfg.target_avg_bits
    elif getattr(cfg, "target_bytes", None):
        want = 8.0 * cfg.target_bytes / max(float(params.sum()), 1.0)
    if want is None:
        return None
    for b in bits:
        if abs(b - want) <= 1e-6 * max(want, 1.0):
            return int(b)
    return None


def _evaluate_uniform(st: Setup, float_model: nn.Module, b: int, a_bits: int, calib: Any,
                      steps: Steps, progress: bool) -> dict[str, Any]:
    model = float_model
    plan = BitPlan({n: LayerSpec(b, a_bits) for n in st.names})
    quantize_calibrate_(model, plan, st.quant, calib, steps.calib_samples, steps.bias_correct,
                        progress, task=st.task)
    res = evaluate(model, st.splits.test, progress=progress, task=st.task)
    rep = budget_report(st.infos, plan, count_params(model))
    return {"w_bits": b, "a_bits": a_bits, "metric": st.task.metric, "value": res.value,
            "accuracy": res.accuracy, "weight_compression": rep.weight_compression,
            "size_bytes": rep.size_bytes}


def run_workflow(st: Setup, cfg: Any, steps: Steps, out_dir: str | Path | None = None,
                 progress: bool = False, *, run_id: str | None = None,
                 cleared: list[str] | None = None) -> CompressResult:
    """setup -> sensitivity -> allocate (-> refine) -> quantize/calibrate/evaluate -> write.

    The model in ``st`` is quantized in place. With ``compare_uniform`` (config, default on)
    the uniform plan of equal size is evaluated beside the mixed one on a copy of the float
    model (one more calibration and test pass). Returns a :class:`CompressResult`; given
    ``out_dir`` writes it with :func:`write_outputs` (``run_id``: the id
    :func:`claim_run_dir` gave when the caller claimed ``out_dir`` before the work; None claims
    it now; ``cleared``: what that claim removed, reported as a warning)."""
    if cleared:
        st.warnings.append(f"cleared {cleared} of a previous run from {str(out_dir)!r} "
                           "(overwrite=True)")
    times = st.times
    a_bits = cfg.a_bits
    t0 = time.perf_counter()
    data, extras = steps.data(st)
    times.update(extras.pop("seconds", {}))
    stats: dict[str, Any]
    t0 = time.perf_counter()
    omega, stats = steps.sensitivity(st, data)
    times["sensitivity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    chosen = steps.allocate(st, omega, stats, data)
    times["allocation"] = time.perf_counter() - t0 - (chosen.refinement or {}).get("seconds", 0.0)
    if chosen.refinement is not None:
        times["refine"] = chosen.refinement.pop("seconds", 0.0)
    plan = BitPlan({n: LayerSpec(b, a_bits) for n, b in zip(st.names, chosen.bits)})
    ub = _uniform_bits(cfg, st.params, a_bits) if getattr(cfg, "compare_uniform", True) else None
    float_copy = copy.deepcopy(st.model) if ub is not None and st.splits.test is not None else None

    t0 = time.perf_counter()
    quantize_calibrate_(st.model, plan, st.quant, data, steps.calib_samples, steps.bias_correct,
                        progress, task=st.task)
    res = (evaluate(st.model, st.splits.test, progress=progress, task=st.task)
           if st.splits.test is not None else None)
    budget = budget_report(st.infos, plan, count_params(st.model))
    times["quantize_eval"] = time.perf_counter() - t0
    uniform: dict[str, Any] = {}
    if float_copy is not None and res is not None:
        t0 = time.perf_counter()
        uniform = _evaluate_uniform(st, float_copy, ub, a_bits, data, steps, progress)
        times["uniform"] = time.perf_counter() - t0
        del float_copy

    hess = {lh["name"]: lh for lh in (stats.get("hessian") or {}).get("layers", [])}
    rows = []
    for i, info in enumerate(st.infos):
        h = hess.get(info.name, {})
        b = chosen.bits[i]
        row = {"name": info.name, "type": info.type, "params": info.params, "macs": info.macs,
               "w_bits": b, "a_bits": a_bits, "trace": h.get("trace"),
               "avg_trace": h.get("avg_trace"), "stderr": h.get("stderr"),
               "eigenvalue": h.get("eigenvalue"),
               "omega": None if omega is None else [float(v) for v in omega[i]]}
        if chosen.rows:
            row.update(chosen.rows[i])
        rows.append(row)
    warnings = st.warnings + list(stats.get("warnings", []))
    times["total"] = sum(v for k, v in times.items() if k != "total")
    cdict = asdict(cfg)
    cdict["model"] = st.name
    cdict.update(extras.pop("config", {}))
    is_acc = st.task.metric == "accuracy"
    fp32v = None if st.fp32 is None else st.fp32.value
    value = None if res is None else res.value
    result = CompressResult(
        config=cdict, plan=plan.to_dict(), layers=rows, allocation=chosen.allocation,
        fp32_accuracy=fp32v if is_acc else None, accuracy=value if is_acc else None,
        budget=budget.to_dict(), uniform=uniform, refinement=chosen.refinement, seconds=times,
        task=st.task.to_dict(), metric=st.task.metric, fp32_value=fp32v, value=value,
        warnings=warnings, distill=extras.get("distill"))
    if out_dir is not None:
        write_outputs(Path(out_dir), result, stats, omega, st.params, st.names, run_id=run_id)
    return result


def write_outputs(out: Path, result: CompressResult, stats: dict[str, Any],
                  omega: np.ndarray | None, params: np.ndarray, names: list[str], *,
                  run_id: str | None = None) -> None:
    """Write plan.json, metrics.json, sensitivity.json (each atomically) and the plots
    frontier.png, layers.png, distill.png where they apply into ``out``; a plot that fails is
    logged and skipped, never losing the JSON. sensitivity.json is ``stats`` plus ``model``:
    the format ``hawq allocate --sensitivity-file`` reads (see :mod:`hawq.analysis.sensfile`).

    ``out`` belongs to one run: ``run_id`` is the id :func:`claim_run_dir` gave when the
    workflow claimed it before its work (a ConfigError if another run has taken the folder
    since); None claims it now (a ConfigError when it holds another run's files)."""
    from hawq.maths.allocation import Allocation, pareto_frontier, uniform_points
    from hawq.base.plots import plot_distill, plot_frontier, plot_layer_bits

    out = Path(out)
    if run_id is None:
        claim_run_dir(out, "write_outputs")
    elif _marker_id(out) != run_id:
        raise ConfigError(f"out_dir {str(out)!r} was taken by another run while this one ran "
                          f"(its {RUN_MARKER} names another run id): pass a new --out")
    BitPlan.from_dict(result.plan).to_json(out / "plan.json")
    sens = dict(stats)
    sens.setdefault("model", result.config.get("model"))
    write_json(out / "sensitivity.json", sens)
    write_json(out / "metrics.json", result.to_dict())
    title = result.config.get("model") or "model"
    try:
        alloc = result.allocation or {}
        if omega is not None and "choices" in alloc:
            bits = np.array(result.config["bits"])
            front = pareto_frontier(omega, params, bits, max_points=20000)
            known = {f.name for f in fields(Allocation)}
            plot_frontier(front, out / "frontier.png",
                          chosen=Allocation(**{k: v for k, v in alloc.items() if k in known}),
                          uniform=uniform_points(omega, params, bits),
                          title=f"{title}: total Omega vs weight size")
        score = [r["avg_trace"] if r.get("avg_trace") is not None
                 else (float(np.max(r["omega"])) if r.get("omega") else 0.0)
                 for r in result.layers]
        wb = [r.get("mean_w_bits", r["w_bits"]) for r in result.layers]
        plot_layer_bits(names, score, wb, out / "layers.png",
                        title=f"{title}: sensitivity and chosen bits")
        if result.distill is not None and result.distill.get("losses"):
            plot_distill(result.distill, out / "distill.png")
    except Exception as exc:  # a plot must never lose the run's results
        log.warning("plot skipped: %s", exc)


# ----------------------------------------------------------------------------- compress

def _calib_steps(cfg: CompressConfig) -> Callable[[Setup], tuple[Any, dict[str, Any]]]:
    def data(st: Setup) -> tuple[Any, dict[str, Any]]:
        return st.splits.calib, {}
    return data


def _sensitivity_step(cfg: CompressConfig, progress: bool):
    def step(st: Setup, data: Any) -> tuple[np.ndarray, dict[str, Any]]:
        omega, stats = sensitivity_costs(
            st.model, data, st.names, cfg.bits, cfg.sensitivity, st.quant,
            hessian_samples=cfg.hessian_samples, max_probes=cfg.max_probes, tol=cfg.tol,
            seed=cfg.seed, probe_mode=cfg.probe_mode, progress=progress, task=st.task)
        if cfg.allocator == "v1-rule" and (stats.get("hessian") or {}).get("metric") != "eigen":
            # the V1 rule orders layers by their top eigenvalue, whatever Omega was used
            _, eig_stats = sensitivity_costs(st.model, data, st.names, cfg.bits, "hawq-v1",
                                             st.quant, hessian_samples=cfg.hessian_samples,
                                             seed=cfg.seed, progress=progress, task=st.task)
            stats["hessian"] = eig_stats["hessian"]
        return omega, stats
    return step


def _allocate_step(cfg: CompressConfig, limits: dict[str, Any], progress: bool):
    def step(st: Setup, omega: np.ndarray, stats: dict[str, Any], data: Any) -> Chosen:
        alloc = allocate_plan(cfg, st.names, st.params, st.macs, omega, stats, limits)
        refinement = None
        if refine_applies(cfg, alloc.bits, st.params):
            held = st.splits.heldout
            if held is None:  # only "auto" gets here: True raised in compress()
                msg = (f"refine='auto': no held-out data, so the {alloc.avg_bits:.2f}-bit plan "
                       "is not refined; give data={'heldout': ...} or lower calib_samples")
                log.warning(msg)
                st.warnings.append(msg)
            else:
                from hawq.post.refine import refine_plan

                t0 = time.perf_counter()
                ref = refine_plan(st.model, held, st.names, cfg.bits, omega, alloc.choices,
                                  st.params, budget_from_config(cfg), **limits,
                                  candidates=cfg.refine_candidates, config=st.quant,
                                  progress=progress, task=st.task)
                alloc = ref.allocation
                refinement = {k: v for k, v in ref.to_dict().items() if k != "allocation"}
                refinement["seconds"] = time.perf_counter() - t0
        return Chosen([int(b) for b in alloc.bits], alloc.to_dict(), refinement=refinement)
    return step


def _job(model: Any, cls: type, config: Any, overrides: dict[str, Any]) -> tuple[Any, Any]:
    """(model or None, config) of a workflow call: ``model`` may be the config itself (the old
    ``compress(cfg)`` form) or a built-in model's name; keyword ``overrides`` replace config
    fields. Seeds torch's global RNG with the config's seed."""
    if isinstance(model, cls):
        model, config = None, model
    if isinstance(model, str):  # a built-in name
        model, overrides = None, {**overrides, "model": model}
    if config is None:
        cfg = cls(**overrides)
    elif not isinstance(config, cls):
        raise ConfigError(f"config is a {type(config).__name__}: give a {cls.__name__}")
    else:
        cfg = cls(**{**asdict(config), **overrides}) if overrides else config
    torch.manual_seed(cfg.seed)
    return model, cfg


def compress(model: nn.Module | CompressConfig | None = None, data: Any = None, *,
             task: Task | str | Callable | None = None, config: CompressConfig | None = None,
             out_dir: str | Path | None = None, progress: bool = False,
             overwrite: bool = False, device: str | torch.device | None = None,
             **overrides: Any) -> CompressResult:
    """Mixed-precision compression of ``model`` (yours, quantized in place) on ``data`` judged
    by ``task``; or, with ``model`` None, of the built-in ``config.model`` on its own data.

    ``data``: calibration data in any form (tensors, ``(inputs, targets)``, dicts of tensors, a
    Dataset, a DataLoader) or ``{'calib': ..., 'heldout': ..., 'test': ...}``
    (:class:`Splits`); held-out data feeds refinement, test data the reported metric.
    ``task``: a :class:`hawq.feed.tasks.Task`, a registered name (``classification``, ``causal-lm``,
    ``embedding``, ``loss-dict``) or a loss callable; default ``config.task``.
    ``config`` (:class:`hawq.post.config.CompressConfig`) or keyword ``overrides`` of its fields.
    ``compress(CompressConfig(...), out_dir=...)`` (a config first) also works.

    Given ``out_dir``: plan.json, metrics.json, sensitivity.json, frontier.png, layers.png and
    run.json; the folder is claimed before any work (:func:`claim_run_dir`): a ConfigError when
    it holds another run's files, unless ``overwrite`` (which clears only those, and says so
    in ``warnings``). ``device``: where the model runs (default: where it is; built-in models
    load on the CPU). Under ``torchrun`` (a :mod:`torch.distributed` process group) the
    Hessian, Fisher and measured-loss work is data parallel across the ranks
    (:mod:`hawq.base.dist`), every rank returns the same result and only rank 0 writes
    ``out_dir``.
    Cost: the FP32 and quantized passes over the test data, the sensitivity's cost
    (:func:`hawq.analysis.sensitivities.sensitivity_costs`), refinement for low-bit hybrid plans, one
    calibration pass, and with ``compare_uniform`` one more calibration + test pass.
    """
    model, cfg = _job(model, CompressConfig, config, overrides)
    if not dist.is_main():
        out_dir = None  # rank 0 writes
    return _owned_run(out_dir, "compress", overwrite, lambda run_id, cleared: _compress(
        model, data, task, cfg, out_dir, progress, run_id, cleared, device))


def _compress(model, data, task, cfg: CompressConfig, out_dir, progress, run_id, cleared,
              device=None) -> CompressResult:
    if cfg.allocator in CHANNELWISE_ALLOCATORS:
        return _compress_channelwise(model, data, task, cfg, out_dir, progress, run_id, cleared,
                                     device)
    extra = cfg.refine_samples if refine_wanted(cfg) else 0
    st = setup(model, data, task, cfg, extra=extra, quant=QuantConfig(w_clip=cfg.w_clip),
               progress=progress, device=device)
    if cfg.refine is True and st.splits.heldout is None:
        raise DataError("refine=True needs held-out data: give data={'calib': ..., 'heldout': "
                        "...} (built-in models: lower calib_samples so training samples are left)")
    limits = allocation_limits(cfg, st.names, st.macs)
    if cfg.allocator != "v1-rule":  # fail fast on an impossible budget, before any Hessian work
        allocate_plan(cfg, st.names, st.params, st.macs,
                      np.zeros((len(st.names), len(cfg.bits))), {}, limits)
    steps = Steps(_calib_steps(cfg), _sensitivity_step(cfg, progress),
                  _allocate_step(cfg, limits, progress), cfg.calib_samples, cfg.bias_correct)
    return run_workflow(st, cfg, steps, out_dir, progress, run_id=run_id, cleared=cleared)


def _compress_channelwise(model, data, task, cfg: CompressConfig, out_dir, progress,
                          run_id=None, cleared=None, device=None):
    """``method=cw-hawq|cw-hessian``: channel traces, channel-wise plan (DDPG ratios on a
    held-out split, reward from the task metric; or trace-sorted channel groups)."""
    from hawq.analysis.channelwise import (ChannelAllocator, ChannelLayer, ChannelRewardModel,
                                  channel_errors, hessian_group_plan, layer_features,
                                  shrink_traces)
    from hawq.maths.ddpg import DDPGConfig, ddpg_search
    from hawq.analysis.hessian import analyze
    from hawq.modules.surgery import quantizable_layers
    from hawq.feed.tasks import materialize

    if cfg.bops_limit is not None or cfg.latency_table or cfg.latency_limit is not None:
        raise ConfigError(f"method={cfg.method!r} supports size budgets only (target_compression,"
                          " target_avg_bits, target_bytes, target_fraction)")
    extra = cfg.reward_samples if cfg.allocator == "cw-ddpg" else 0
    st = setup(model, data, task, cfg, extra=extra, quant=QuantConfig(w_clip=cfg.w_clip),
               progress=progress, device=device)
    if cfg.allocator == "cw-ddpg" and st.splits.heldout is None:
        raise DataError("method cw-hawq needs held-out data for its reward: give data={'calib': "
                        "..., 'heldout': ...} (built-in models: lower calib_samples/"
                        "hessian_samples so training samples are left)")
    budget = budget_from_config(cfg)
    traces: dict[str, Any] = {}

    def sensitivity(s: Setup, d: Any) -> tuple[None, dict[str, Any]]:
        hd = materialize(d, cfg.hessian_samples, "calibration data", limit=cfg.hessian_samples)
        res = analyze(s.model, hd, metric="channel", layers=s.names, seed=cfg.seed, tol=cfg.tol,
                      max_probes=cfg.max_probes, progress=progress, task=s.task)
        traces["res"] = res
        out = res.to_dict()
        return None, {"hessian": out, "names": s.names,
                      "warnings": hessian_warnings({"hessian": out})}

    def allocate(s: Setup, _omega: Any, _stats: dict[str, Any], _d: Any) -> Chosen:
        res = traces["res"]
        mods = quantizable_layers(s.model)
        clayers = [ChannelLayer(i.name, i.params, i.macs, shrink_traces(lh.channel_traces))
                   for i, lh in zip(s.infos, res.layers)]
        errors = [channel_errors(mods[n].weight, cfg.bits, s.quant) for n in s.names]
        allocator = ChannelAllocator(clayers, cfg.bits, budget, errors)
        search: dict[str, Any] = {}
        if cfg.allocator == "cw-groups":
            counts, chan_bits = hessian_group_plan(clayers, errors, cfg.bits, budget,
                                                   cfg.channel_groups)
        else:
            reward = ChannelRewardModel(s.model, s.names, cfg.bits, s.splits.heldout, s.quant,
                                        task=s.task)
            found = ddpg_search(layer_features(s.infos, clayers), len(allocator.bits),
                                lambda c: reward(allocator.to_bits(c)),
                                make_plan=allocator.plan, dynamic=allocator.used_fraction,
                                config=DDPGConfig(episodes=cfg.episodes, seed=cfg.seed,
                                                  warmup=min(20, max(cfg.episodes // 4, 1))),
                                progress=progress)
            counts = found.best_plan
            chan_bits = allocator.to_bits(counts)
            search = found.to_dict()
        rows = [{"mean_w_bits": float(np.mean(chan_bits[i])),
                 "counts": {int(b): int(c) for b, c in zip(allocator.bits, counts[i])}}
                for i in range(len(s.names))]
        info = {"method": cfg.method or cfg.allocator, "bits": allocator.bits.tolist(),
                "size_bits": allocator.size_bits(counts), "limit_bits": allocator.limit,
                "search": search}
        return Chosen(chan_bits, info, rows)

    steps = Steps(_calib_steps(cfg), sensitivity, allocate, cfg.calib_samples, cfg.bias_correct)
    return run_workflow(st, cfg, steps, out_dir, progress, run_id=run_id, cleared=cleared)


# ----------------------------------------------------------------------------- zeroq

def zeroq(model: nn.Module | ZeroQConfig | None = None, data: Any = None, *,
          task: Task | str | Callable | None = None, config: ZeroQConfig | None = None,
          out_dir: str | Path | None = None, progress: bool = False, overwrite: bool = False,
          **overrides: Any) -> CompressResult:
    """Zero-shot quantization: distil inputs from the model's BatchNorm statistics, measure
    sensitivity on them (KL to FP32, or Hessian), allocate, quantize, calibrate on them, and
    evaluate on real test data (report only: ``data`` may be ``{'test': ...}`` or None to skip).

    ``model`` None: the built-in ``config.model``. ``zeroq(ZeroQConfig(...), out_dir=...)``
    also works. Given ``out_dir``: plan.json, metrics.json, sensitivity.json, frontier.png,
    layers.png, distill.png, run.json (the folder is claimed before any work, as in
    :func:`compress`; ``overwrite`` clears another run's files). Returns a
    :class:`CompressResult` (``distill`` holds the distillation record). Cost: ``distill_iters`` forward+backward passes on ``distill_batch``
    inputs, the sensitivity (KL: 1 + L*B forwards on them), one calibration forward and two
    test passes when ``evaluate``.
    """
    model, cfg = _job(model, ZeroQConfig, config, overrides)
    if not dist.is_main():
        out_dir = None  # rank 0 writes
    return _owned_run(out_dir, "zeroq", overwrite, lambda run_id, cleared: _zeroq(
        model, data, task, cfg, out_dir, progress, run_id, cleared))


def _zeroq(model, data, task, cfg: ZeroQConfig, out_dir, progress, run_id, cleared
           ) -> CompressResult:
    from hawq.analysis.distill import distill_data, infer_input_shape
    from hawq.post.config import DATA_SOURCES
    from hawq.analysis.zeroq import gaussian_data, hessian_sensitivity, kl_sensitivity

    t0 = time.perf_counter()
    if model is None:
        spec = get_spec(cfg.model)
        model = build_model(cfg.model, pretrained=True, data_dir=cfg.data_dir)
        shape = cfg.input_shape or spec.input_shape
        test = load_dataset(spec.dataset, "test", cfg.data_dir, cfg.test_samples) \
            if cfg.evaluate else None
        dataset, name = spec.dataset, cfg.model
    else:
        shape = cfg.input_shape
        splits = Splits.of(data) if data is not None and not (
            isinstance(data, Mapping) and set(data) <= {"test"}) else None
        test = (data or {}).get("test") if isinstance(data, Mapping) else (
            splits.test if splits is not None else None)
        dataset, name = None, type(model).__name__
    if not shape:
        shape = infer_input_shape(model)
    shape = tuple(int(s) for s in shape)
    model.eval()
    tk = as_task(task).bind(model)
    infos = layer_infos(model, torch.zeros(1, *shape), task=tk)
    quant = QuantConfig(w_clip=cfg.w_clip, a_calibration=cfg.a_calibration)
    ccfg = cfg.compress_config()
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)
    macs = np.array([i.macs for i in infos], dtype=float)
    limits = allocation_limits(ccfg, names, macs)
    if cfg.w_bits is None:  # fail fast on an impossible budget, before any distillation
        allocate_plan(ccfg, names, params, macs, np.zeros((len(names), len(cfg.bits))), {},
                      limits)
    evaluate_on = test if cfg.evaluate else None
    fp32 = evaluate(model, evaluate_on, progress=progress, task=tk) \
        if evaluate_on is not None else None
    st = Setup(model, tk, Splits(None, None, evaluate_on), infos, quant, fp32, name)
    st.times["setup"] = time.perf_counter() - t0

    def source(s: Setup) -> tuple[Any, dict[str, Any]]:
        t1 = time.perf_counter()
        if cfg.data_source == "distilled":
            res = distill_data(s.model, shape, batch_size=cfg.distill_batch,
                               iterations=cfg.distill_iters, lr=cfg.distill_lr, seed=cfg.seed,
                               init=cfg.distill_init, label_weight=cfg.distill_label_weight,
                               progress=progress)
            return res.data, {"distill": res.to_dict(),
                              "seconds": {"distill": time.perf_counter() - t1},
                              "config": {"input_shape": list(shape)}}
        if cfg.data_source == "noise":
            d = gaussian_data(shape, cfg.calib_samples, cfg.seed)
        elif dataset is not None:
            d = load_dataset(dataset, "train", cfg.data_dir, cfg.calib_samples).tensors[0]
        else:
            raise ConfigError(f"data_source='real' on your own model needs data: use "
                              f"hawq.compress, or data_source in {DATA_SOURCES}")
        return d, {"seconds": {"data": time.perf_counter() - t1},
                   "config": {"input_shape": list(shape)}}

    def sensitivity(s: Setup, d: Any) -> tuple[np.ndarray | None, dict[str, Any]]:
        stats: dict[str, Any] = {"names": names, "bits": list(cfg.bits),
                                 "sensitivity": cfg.sensitivity, "data_source": cfg.data_source}
        if cfg.w_bits is not None:
            return None, stats
        if cfg.sensitivity == "kl":
            omega = kl_sensitivity(s.model, d, names, cfg.bits, quant, progress=progress)
        else:
            omega, hs = hessian_sensitivity(s.model, d, names, cfg.bits, quant, seed=cfg.seed,
                                            max_probes=cfg.hessian_max_probes,
                                            tol=cfg.hessian_tol, progress=progress)
            # a negative trace estimate is zero curvature (hessian_warnings says so)
            omega = np.maximum(np.asarray(omega, dtype=float), 0.0)
            stats.update(hs)
            stats["warnings"] = hessian_warnings(stats)
        stats["omega"] = omega.tolist()
        return omega, stats

    def allocate(s: Setup, omega: Any, stats: dict[str, Any], d: Any) -> Chosen:
        if cfg.w_bits is not None:
            return Chosen([cfg.w_bits] * len(names), None)
        alloc = allocate_plan(ccfg, names, params, macs, omega, stats, limits)
        return Chosen([int(b) for b in alloc.bits], alloc.to_dict())

    steps = Steps(source, sensitivity, allocate, None, False)
    return run_workflow(st, cfg, steps, out_dir, progress, run_id=run_id, cleared=cleared)


# ----------------------------------------------------------------------------- finetune

#: outputs of compress/zeroq that a fine-tuning folder never holds
_NOT_FINETUNE = ("metrics.json", "sensitivity.json")


def _check_finetune_dir(out: Path) -> None:
    """A fine-tuning folder must be a folder (or not exist yet) and must not be a compress/zeroq
    run folder (its plan.json would be replaced beside that run's metrics): ConfigError."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} is an existing file, not a folder: pass a new "
                          "--out")
    other = [n for n in _NOT_FINETUNE if (out / n).is_file()]
    if other:
        raise ConfigError(f"out_dir {str(out)!r} holds a compress/zeroq run ({other}): fine-tune "
                          f"into its own folder, e.g. --out {str(out / 'finetune')!r} (what "
                          "'hawq compress --finetune' uses) or a new --out")


def finetune_plan(model: nn.Module | str, plan: BitPlan, out_dir: str | Path | None = None, *,
                  data: Any = None, task: Any = None, config: Any = None,
                  data_dir: str | None = None, train_samples: int | None = None,
                  test_samples: int | None = None, a_avg_bits: float | None = None,
                  a_bits_choices: tuple[int, ...] = (2, 4, 8), resume: bool = False,
                  progress: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Fine-tune ``model`` (a built-in name with its data, or your module with ``data`` =
    ``{'calib'/'train': ..., 'test': ...}``) under ``plan``: optionally choose mixed-precision
    activation bits (``a_avg_bits``: HAWQ-V2 activation traces under that average), fine-tune
    with :func:`hawq.post.finetune.finetune`, evaluate before and after, and write ``finetune.json``,
    ``plan.json``, ``model.pt`` (the quantized state dict) and the checkpoint into ``out_dir``.
    Returns the JSON-ready summary. ``device`` ("cpu", "cuda", "cuda:1") is where it trains.

    Cost: the fine-tuning's (see :mod:`hawq.post.finetune`) plus two passes over the test data.
    """
    from hawq.post.finetune import FinetuneConfig, finetune
    from hawq.modules.surgery import calibrate_, quantize_

    cfg = config or FinetuneConfig()
    if out_dir is not None:  # checked before any work, the folder is not created here
        _check_finetune_dir(Path(out_dir))
    dev = resolve_device(device)
    if isinstance(model, str):
        model_name = model
        spec = get_spec(model)
        net = build_model(model, pretrained=True, data_dir=data_dir)
        train = load_dataset(spec.dataset, "train", data_dir, train_samples)
        test = load_dataset(spec.dataset, "test", data_dir, test_samples)
    else:
        if data is None:
            raise DataError("finetune_plan on your own model needs data={'calib': ..., 'test': "
                            "...} (training data under 'calib' or 'train')")
        net, model_name = model, type(model).__name__
        sp = Splits.of(data)
        train, test = sp.calib, sp.test if sp.test is not None else sp.calib
    net = net.to(dev)
    tk = as_task(task).bind(net)
    fp32 = evaluate(net, test, progress=progress, task=tk).value
    act = None
    if a_avg_bits is not None:
        from hawq.analysis.activations import activation_plan
        from hawq.maths.budgets import Budget

        act = activation_plan(net, train, bits=a_bits_choices,
                              total=Budget("avg_bits", a_avg_bits), seed=cfg.seed)
        plan = act.apply(plan)
    ptq = copy.deepcopy(net)
    quantize_(ptq, plan)
    calibrate_(ptq, train, max_samples=cfg.calib_samples, task=tk)
    before = evaluate(ptq, test, progress=progress, task=tk).value
    del ptq
    out = Path(out_dir) if out_dir is not None else None
    res = finetune(net, plan, train, cfg, checkpoint_dir=out, resume=resume,
                   progress=progress, task=tk)
    after = evaluate(net, test, progress=progress, task=tk).value
    summary = {"model": model_name, "plan": plan.to_dict(), "metric": tk.metric,
               "fp32_accuracy": fp32, "ptq_accuracy": before, "accuracy": after,
               "finetune": res.to_dict(),
               "activations": act.to_dict() if act is not None else None}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        plan.to_json(out / "plan.json")
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, buf)
        atomic_write_bytes(out / "model.pt", buf.getvalue())
        write_json(out / "finetune.json", summary)
    return summary
