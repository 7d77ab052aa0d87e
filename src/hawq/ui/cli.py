"""The ``hawq`` command line. It sits on top of the library; the library never imports it.

The flags of ``hawq compress`` and ``hawq zeroq`` are generated from
:class:`hawq.post.config.CompressConfig` / :class:`hawq.post.config.ZeroQConfig` (their fields' help,
choices from the registries), so a new registered sensitivity, allocator, clipping method or
task is a valid choice at once. One flag name per meaning everywhere: ``--test-samples`` (test
samples), ``--hessian-samples`` (samples for the Hessian), ``--calib-samples`` (calibration
samples); the old ``--samples`` spellings still work (hidden).

``--model`` takes a built-in name or your own ``pkg.module:factory`` / ``path/to/file.py:factory``
(imported with the current folder on the path); ``--data`` your data factory; ``--task`` how
the model is fed and judged. Errors print one line (``hawq: error: ...``) and exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from hawq.post.config import (CompressConfig, ZeroQConfig, a_calibration_names, add_config_args,
                         arg_type, config_from_args, model_help, non_negative_float,
                         non_negative_int, positive_float, positive_int, probe_mode_names,
                         task_names, unit_float, w_clip_names)
from hawq.base import dist
from hawq.base.errors import ConfigError, DataError, HawqError
from hawq.base.io import write_json
from hawq.ui import launch
from hawq.ui.loading import DEFAULT_TASK, settle_task

__all__ = ["build_parser", "check_outputs", "main"]

log = logging.getLogger("hawq")


def _version() -> str:
    """``hawq.__version__`` (the package this module belongs to is already imported)."""
    version = getattr(sys.modules.get("hawq"), "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("hawq")
    return str(version)


# ----------------------------------------------------------------------------- common flags

def _run_args(p: argparse.ArgumentParser, nproc: bool = False) -> None:
    """--json, --threads, --device (and with ``nproc`` --nproc): how a command runs, not what
    it computes."""
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="also write the result as JSON to FILE")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads, >= 1 (default: torch's choice)")
    p.add_argument("--device", default=None, metavar="DEV",
                   help="where the model runs: cpu, cuda or cuda:N (default: cpu; under "
                        "torchrun rank r uses cuda:r when CUDA is available)")
    if nproc:
        p.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                       help="run as N data-parallel processes on this machine (torchrun; gloo "
                            "on CPU, NCCL on GPU): each takes a shard of the data, per-layer "
                            "numbers are all-reduced, the result equals one process's; same as "
                            "'torchrun --nproc-per-node N -m hawq ...'")


def _job_out_args(p: argparse.ArgumentParser) -> None:
    """--out and --overwrite of a job that owns its run folder (compress, zeroq)."""
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for plan, metrics, plots")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse an --out folder holding another run: first remove that run's "
                        "hawq files (only those; the names are reported)")


def _model_args(p: argparse.ArgumentParser, model_default: str | None = "digits-cnn") -> None:
    """--model, --data-dir, --data, --task, --seed (the flags the config classes generate for
    compress/zeroq, written here for the other commands)."""
    p.add_argument("--model", default=model_default,
                   help=model_help() + (f" (default: {model_default})" if model_default else ""))
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder with cifar10.npz and resnet*_cifar10.pt for the built-in models "
                        "(default: $HAWQ_DATA, else ../shared/data)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="your data: 'pkg.module:factory' or 'path/to/file.py:factory' returning "
                        "{'calib': ..., 'heldout': ..., 'test': ...} or one data object "
                        "(default: the built-in model's dataset, or the data your model factory "
                        "returns)")
    p.add_argument("--task", default=DEFAULT_TASK, choices=task_names(),
                   help="how the model is fed and judged (default: the task your model factory "
                        f"returns, else {DEFAULT_TASK})")
    p.add_argument("--seed", type=arg_type(int, "seed"), default=0,
                   help="random seed (default: 0)")


def _common(p: argparse.ArgumentParser, model_default: str | None = "digits-cnn",
            nproc: bool = False) -> None:
    """The model flags and the run flags (``hawq export`` uses it too)."""
    _model_args(p, model_default)
    _run_args(p, nproc)


def _print_table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) if k and c.replace(".", "").replace("-", "").isdigit()
                        else c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ----------------------------------------------------------------------------- model and data

@dataclass
class _Inputs:
    """What a command runs on: the model (built), the task (a Task, a name, a loss callable or
    None), the data splits (keys calib/heldout/test; empty = the built-in dataset)."""

    name: str
    model: Any
    task: Any
    data: dict[str, Any] = field(default_factory=dict)
    builtin: bool = True
    input_shape: tuple[int, ...] = ()
    dataset: str | None = None
    data_spec: str | None = None  # --data, when given (named in errors about the data)


def _is_builtin(name: str | None) -> bool:
    from hawq.modules.models import MODELS

    return name in MODELS and MODELS.get(name).setup is None  # language models: own data


def _inputs(model_name: str | None, data_dir: str | None, data_spec: str | None,
            task_name: str | None, build: bool = True) -> _Inputs:
    """Build the named model (built-in: pretrained; yours: the factory's model, task, data),
    read ``--data`` (it replaces data a factory returned) and settle the task: ``--task`` when it
    names another than the default, else the factory's, else the default. Raises ConfigError
    (one line) for unusable specs."""
    from hawq.ui.loading import call_factory, load_data, resolve_object, unpack_setup
    from hawq.modules.models import MODELS, build_model

    if not model_name:
        raise ConfigError("give --model: a built-in name or 'pkg.module:factory'")
    if _is_builtin(model_name):
        spec = MODELS.get(model_name)
        model = build_model(model_name, pretrained=True, data_dir=data_dir) if build else None
        inp = _Inputs(model_name, model, None, {}, True, tuple(spec.input_shape), spec.dataset)
    elif ":" in model_name or model_name in MODELS:  # yours, hf:DIR, a language model
        factory = resolve_object(model_name, "model")
        setup = unpack_setup(call_factory(factory, model_name, "model"), f"model {model_name!r}")
        if setup.model is None:
            raise ConfigError(f"model {model_name!r} returned no model: return an nn.Module, "
                              "(model, task[, data]) or a dict with 'model'")
        inp = _Inputs(model_name, setup.model.eval(), setup.task, dict(setup.data), False,
                      tuple(getattr(factory, "input_shape", ()) or ()))
    else:
        raise ConfigError(f"--model {model_name!r}: use one of {MODELS.names()} or "
                          "'pkg.module:factory' / 'path/to/file.py:factory' for your own model")
    if data_spec:
        inp.data = load_data(data_spec, inp.model,  # text:FILE needs the model's tokenizer
                             settle_task(task_name, inp.task, DEFAULT_TASK))
        inp.data_spec = data_spec
    if task_name is not None:
        inp.task = settle_task(task_name, inp.task, DEFAULT_TASK)
    return inp


def _args_inputs(args: argparse.Namespace, build: bool = True) -> _Inputs:
    inp = _inputs(args.model, getattr(args, "data_dir", None), getattr(args, "data", None),
                  getattr(args, "task", None), build)
    if getattr(args, "device", None) is not None and inp.model is not None:
        inp.model.to(args.device)  # batches follow the model's device
    return inp


class _Batches:
    """A re-iterable list of batches that is not a list (a list of two tensors would read as one
    (inputs, targets) pair)."""

    def __init__(self, batches: list[Any]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    @property
    def samples(self) -> int:
        from hawq.feed.tasks import batch_len

        return sum(batch_len(b) for b in self.batches)


def _limited(data: Any, limit: int | None, who: str, batch_size: int = 256) -> Any:
    """``data`` cut to ``limit`` samples (as batches of ``batch_size``); ``data`` itself when
    ``limit`` is None."""
    if limit is None:
        return data
    from hawq.feed.tasks import materialize

    return _Batches(materialize(data, batch_size, who, limit=limit))


def _pick(data: dict[str, Any], *keys: str) -> tuple[str | None, Any]:
    for k in keys:
        if data.get(k) is not None:
            return k, data[k]
    return None, None


def _example(inp: _Inputs, data_dir: str | None = None) -> Any:
    """One batch (or data) to run the model on once: the user's data, zeros of the built-in
    input shape, the first built-in test image, or zeros of the factory's ``input_shape`` /
    the shape :func:`hawq.analysis.distill.infer_input_shape` reads from the first layer."""
    _, data = _pick(inp.data, "calib", "test", "heldout")
    if data is not None:
        return data
    if inp.builtin:
        if inp.input_shape:
            return torch.zeros(1, *inp.input_shape)
        from hawq.feed.data import load_dataset

        return load_dataset(inp.dataset, "test", data_dir, limit=1).tensors[0]
    shape = inp.input_shape
    if not shape:
        from hawq.analysis.distill import infer_input_shape

        try:
            shape = infer_input_shape(inp.model)
        except HawqError as e:
            raise ConfigError(f"model {inp.name!r}: {e}; give --data so hawq can run the model "
                              "on real inputs (or set input_shape on the factory)") from None
    return torch.zeros(1, *shape)


def _layer_table(inp: _Inputs, data_dir: str | None, task: Any) -> list[Any]:
    """:func:`hawq.modules.surgery.layers` of the model on :func:`_example`; when the example is a guess
    (your model, no data) and the model rejects it, a ConfigError saying what to give."""
    from hawq.modules.surgery import layers

    example = _example(inp, data_dir)
    try:
        return layers(inp.model, example, task=task)
    except HawqError as e:
        if inp.data and isinstance(e, DataError):  # say which data: --data's or the factory's
            source = (f"--data {inp.data_spec!r}" if inp.data_spec
                      else f"the data model {inp.name!r} returned")
            raise type(e)(f"{source}: {_one_line(e).replace('example_input', 'the data')}") \
                from None
        if inp.builtin or inp.input_shape:
            raise
        raise ConfigError(f"model {inp.name!r} did not run on a guessed input of shape "
                          f"{tuple(example.shape[1:])}: give --data 'pkg.module:factory' (or set "
                          f"input_shape on the factory) — {_one_line(e)}") from None


def _splits(inp: _Inputs, data_dir: str | None, calib_samples: int | None,
            test_samples: int | None) -> tuple[Any, Any, list[str]]:
    """(calibration data, test data, notes): the built-in dataset's train/test splits, or the
    user's (test falls back to held-out, then calibration data, with a note)."""
    if inp.builtin and not inp.data:
        from hawq.feed.data import load_dataset

        return (load_dataset(inp.dataset, "train", data_dir, calib_samples),
                load_dataset(inp.dataset, "test", data_dir, test_samples), [])
    notes = []
    ck, calib = _pick(inp.data, "calib", "heldout", "test")
    tk, test = _pick(inp.data, "test", "heldout", "calib")
    if calib is None:
        raise ConfigError(f"model {inp.name!r} has no data: give --data 'pkg.module:factory' "
                          "returning {'calib': ..., 'test': ...} (or return data from the model "
                          "factory)")
    if ck != "calib":
        notes.append(f"no calibration data given: calibrating on the {ck} data")
    if tk != "test":
        notes.append(f"no test data given: the metric is measured on the {tk} data")
    return calib, _limited(test, test_samples, "test data", 500), notes


def _job_inputs(cfg: Any, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, data, task) for :func:`hawq.workflows.workflow.compress`/``zeroq``: (None, None, task) for a
    built-in model on its own dataset, else the built model and the data."""
    if _is_builtin(cfg.model) and not cfg.data:
        return None, None, None if cfg.task == DEFAULT_TASK else cfg.task
    inp = _inputs(cfg.model, cfg.data_dir, cfg.data, cfg.task)
    if not inp.data and not isinstance(cfg, ZeroQConfig):
        raise ConfigError(f"model {cfg.model!r} has no data: give --data 'pkg.module:factory' "
                          "returning {'calib': ..., 'heldout': ..., 'test': ...} or one data "
                          "object (or return data from the model factory)")
    from hawq.ui.loading import language_model, text_source

    if language_model(cfg.model) is not None or text_source(cfg.data):  # hawq's text: cut it
        n_cal = max(cfg.calib_samples or 0, getattr(cfg, "hessian_samples", 0) or 0)
        for key, n in (("calib", n_cal), ("test", cfg.test_samples)):  # as built-in data is
            if inp.data.get(key) is not None and n:
                inp.data[key] = _limited(inp.data[key], n, f"{key} data", 500)
    return inp.model, (inp.data or None), inp.task


def _score(metric: str | None, value: float | None, fp32: float | None) -> str:
    """"top-1 71.20% (FP32 72.00%)" for accuracy, "perplexity 12.3 (FP32 11.9)" otherwise."""
    if value is None:
        return "not evaluated"
    if (metric or "accuracy") == "accuracy":
        out = f"top-1 {100 * value:.2f}%"
        return out + (f" (FP32 {100 * fp32:.2f}%)" if fp32 is not None else "")
    return f"{metric} {value:.4g}" + (f" (FP32 {fp32:.4g})" if fp32 is not None else "")


def _result_score(res: Any) -> str:
    return _score(getattr(res, "metric", "accuracy"), getattr(res, "value", res.accuracy),
                  getattr(res, "fp32_value", res.fp32_accuracy))


def _metric_cell(metric: str | None, value: float | None) -> str:
    if value is None:
        return "-"
    if (metric or "accuracy") == "accuracy":
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def _print_plans(res: Any, mixed: str) -> None:
    """The result as a small table: FP32, the mixed plan and (when the run measured it) the
    uniform plan of the same size, each with the task's metric and the weight compression."""
    metric = getattr(res, "metric", None) or "accuracy"
    head = "top-1" if metric == "accuracy" else metric
    b = res.budget
    rows = [["FP32", _metric_cell(metric, getattr(res, "fp32_value", res.fp32_accuracy)),
             "1.00x", "32"],
            [mixed, _metric_cell(metric, getattr(res, "value", res.accuracy)),
             f"{b['weight_compression']:.2f}x", f"{b['avg_bits']:.2f}"]]
    u = getattr(res, "uniform", None) or {}
    if u:
        rows.append([f"uniform {u['w_bits']}-bit (same size)",
                     _metric_cell(u.get("metric", metric), u.get("value")),
                     f"{u['weight_compression']:.2f}x", str(u["w_bits"])])
    direction = "" if metric == "accuracy" else (
        " (higher is better)" if (getattr(res, "task", None) or {}).get("higher_is_better")
        else " (lower is better)")
    _print_table(rows, ["plan", head + direction, "weights", "avg bits"])


def _print_warnings(res: Any) -> None:
    for w in getattr(res, "warnings", None) or []:
        print(f"warning: {w}")


# ----------------------------------------------------------------------------- commands

def cmd_layers(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.modules.accounting import count_params
    from hawq.modules.surgery import unsupported_layers
    from hawq.feed.tasks import as_task

    inp = _args_inputs(args)
    infos = _layer_table(inp, args.data_dir, as_task(inp.task))
    rows = [[i.name, i.type, i.params, i.macs, "x".join(map(str, i.in_shape[1:])),
             "x".join(map(str, i.out_shape[1:]))] for i in infos]
    _print_table(rows, ["layer", "type", "params", "MACs", "input", "output"])
    unsupported = unsupported_layers(inp.model)
    print(f"\n{len(infos)} quantizable layers, {sum(i.params for i in infos):,} weights, "
          f"{sum(i.macs for i in infos):,} MACs/sample; model has "
          f"{count_params(inp.model):,} parameters"
          + (f"; unsupported (stay float): {unsupported}" if unsupported else ""))
    return {"model": args.model, "layers": [i.to_dict() for i in infos],
            "unsupported": unsupported}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.modules.accounting import budget_report, count_params
    from hawq.post.biascorr import quantize_calibrate_
    from hawq.modules.evaluate import evaluate
    from hawq.maths.plan import BitPlan, QuantConfig
    from hawq.modules.surgery import layers
    from hawq.feed.tasks import as_task

    # the plan and its bits are checked before the model is built or any data read
    plan = (BitPlan.from_json(args.plan) if args.plan
            else BitPlan.uniform(args.w_bits, args.a_bits))
    config = QuantConfig(w_clip=args.w_clip, a_calibration=args.a_calibration)
    inp = _args_inputs(args)
    model = inp.model
    task = as_task(inp.task).bind(model)
    calib, test, notes = _splits(inp, args.data_dir, args.calib_samples, args.test_samples)
    for n in notes:
        print(f"note: {n}")
    if not inp.builtin or inp.data:  # the user's data: fed to the model before any work
        from collections.abc import Iterator

        for d in (calib, test):
            if not isinstance(d, Iterator):  # a one-shot iterator would lose its first batch
                task.check(model, d)
    example = test.tensors[0][:1] if hasattr(test, "tensors") else test
    infos = layers(model, example, task=task)
    report = quantize_calibrate_(model, plan, config, calib, args.calib_samples,
                                 args.bias_correct, progress=True, task=task)
    res = evaluate(model, test, progress=True, task=task)
    size = budget_report(infos, plan, count_params(model))
    what = "test images" if inp.builtin and not inp.data else "test samples"
    which = "file " + args.plan if args.plan else f"W{args.w_bits}A{args.a_bits}"
    print(f"{args.model}  plan: {which}  {_score(res.metric, res.value, None)} on "
          f"{res.samples} {what} (loss {res.loss:.4f})")
    print(f"size {size.size_bytes / 1024:.1f} KiB vs FP32 {size.fp32_bytes / 1024:.1f} KiB "
          f"(model {size.compression:.2f}x, weights {size.weight_compression:.2f}x, "
          f"{size.avg_bits:.2f} avg bits); BOPs {size.bops / 1e9:.3f} G "
          f"({size.fp32_bops / max(size.bops, 1):.1f}x fewer than FP32)")
    return {"model": args.model, "plan": plan.to_dict(), "eval": res.to_dict(),
            "budget": size.to_dict(), "quantized": report.quantized,
            "left_float": report.left_float, "unsupported": report.unsupported,
            "config": vars(config), "notes": notes}


def cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.analysis.hessian import analyze
    from hawq.feed.tasks import as_task

    inp = _args_inputs(args)
    n = args.hessian_samples
    if inp.builtin and not inp.data:
        from hawq.feed.data import load_dataset

        ds = load_dataset(inp.dataset, args.split, args.data_dir, n)
        data, samples = ds.tensors, len(ds)
        batch_size = args.batch_size or (-(-len(ds) // dist.world()) if dist.world() > 1
                                         else None)
    else:
        key, src = _pick(inp.data, *(("calib", "heldout", "test") if args.split == "train"
                                     else ("test", "heldout", "calib")))
        if src is None:
            raise ConfigError(f"model {inp.name!r} has no data: give --data 'pkg.module:factory'")
        batches = _limited(src, n, f"{key} data", args.batch_size or -(-n // dist.world()))
        data, samples, batch_size = batches, batches.samples, None
    task = as_task(inp.task).bind(inp.model)
    res = analyze(inp.model, data, metric=args.metric, seed=args.seed, tol=args.tol,
                  max_probes=args.max_probes, batch_size=batch_size,
                  probe_mode=args.probe_mode, progress=True, task=task)
    rows = []
    for lh in res.layers:
        eig = lh.eigenvalue[0] if isinstance(lh.eigenvalue, list) else lh.eigenvalue
        rows.append([lh.name, lh.params, "-" if lh.trace is None else f"{lh.trace:.4g}",
                     "-" if lh.avg_trace is None else f"{lh.avg_trace:.4g}",
                     "-" if lh.stderr is None else f"{lh.stderr:.2g}",
                     "-" if eig is None else f"{eig:.4g}", lh.probes or "-"])
    _print_table(rows, ["layer", "params", "trace", "avg trace", "stderr", "eigenvalue",
                        "probes"])
    print(f"\n{args.metric}: {res.hvp_count} Hessian-vector products in {res.seconds:.1f} s on "
          f"{samples} {args.split} samples")
    return res.to_dict() | {"model": args.model}


def cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.workflows.workflow import compress

    cfg = config_from_args(CompressConfig, args)
    model, data, task = _job_inputs(cfg, args)
    res = compress(model, data, task=task, config=cfg, out_dir=args.out, progress=True,
                   overwrite=args.overwrite, device=args.device)
    if args.out:
        from hawq.ui.report import record_command

        record_command(args.out, getattr(args, "argv", None))
    rows = [[r["name"], r["params"], f"{r['avg_trace']:.3g}" if r.get("avg_trace") is not None
             else "-", r.get("mean_w_bits", r["w_bits"]), r["a_bits"]] for r in res.layers]
    _print_table(rows, ["layer", "params", "avg trace", "w_bits", "a_bits"])
    b = res.budget
    if res.refinement is not None:
        r = res.refinement
        print(f"refinement: {len(r['moves'])} exchanges in {r['evaluations']} passes, "
              f"divergence to FP32 {r['start_value']:.4g} -> {r['value']:.4g} on the held-out "
              "data")
    print()
    _print_plans(res, f"mixed [{cfg.sensitivity} + {cfg.allocator}]")
    _print_warnings(res)
    print(f"\n{cfg.model} [{cfg.sensitivity} + {cfg.allocator}]: {_result_score(res)}, weights "
          f"{b['weight_compression']:.2f}x ({b['avg_bits']:.2f} avg bits), model "
          f"{b['size_bytes'] / 1024:.1f} KiB, {b['bops'] / 1e9:.3f} GBOPs")
    if args.out:
        print(f"wrote plan.json, metrics.json, sensitivity.json, frontier.png, layers.png to "
              f"{args.out}")
    out = res.to_dict()
    if args.finetune > 0:
        from hawq.maths.plan import BitPlan
        from hawq.workflows.workflow import finetune_plan

        args.epochs = args.finetune
        ft_dir = f"{args.out}/finetune" if args.out else None
        # the float model again: compress quantized the first one in place
        fresh, fdata, ftask = _job_inputs(cfg, args)
        ft = finetune_plan(fresh if fresh is not None else cfg.model, BitPlan.from_dict(res.plan),
                           ft_dir, data=fdata, task=ftask, config=_finetune_config(args),
                           data_dir=cfg.data_dir, train_samples=args.train_samples,
                           test_samples=cfg.test_samples, a_avg_bits=args.a_avg_bits,
                           progress=True, device=args.device)
        _print_finetune(ft, ft_dir)
        out["finetune"] = ft
    return out


def cmd_allocate(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from hawq.analysis.sensfile import load_sensitivity, resolve_model_name
    from hawq.analysis.sensitivity import omega_matrix, weight_errors
    from hawq.base.errors import DataError
    from hawq.feed.tasks import as_task
    from hawq.maths.allocation import ALLOCATORS, pareto_frontier, uniform_points
    from hawq.maths.plan import BitPlan, LayerSpec, QuantConfig
    from hawq.modules.accounting import budget_report, count_params
    from hawq.post.pipeline import allocate_plan

    if not args.sensitivity_file:
        raise ConfigError("give --sensitivity-file FILE: the JSON written by 'hawq analyze "
                          "--json' or a run's sensitivity.json ('hawq compress --out DIR')")
    # the file is validated before any model is built; sizes come from the model, never the file
    sens = load_sensitivity(args.sensitivity_file)
    ALLOCATORS.check(args.allocator, "--allocator")
    if args.allocator == "v1-rule" and sens.metric != "eigen":
        raise ConfigError(f"--allocator v1-rule orders layers by their top eigenvalue, but "
                          f"{sens.source} holds metric {sens.metric!r}: give the JSON of 'hawq "
                          "analyze --metric eigen --json FILE' or another --allocator")
    model_name, note = resolve_model_name(args.model, sens)
    cfg = config_from_args(CompressConfig, args, model=model_name)
    inp = _inputs(model_name, args.data_dir, args.data, args.task)
    infos = _layer_table(inp, args.data_dir, as_task(inp.task))
    scores = sens.scores_for(infos)  # model order; unknown/missing/resized layers raise
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)
    macs = np.array([i.macs for i in infos], dtype=float)
    bits = cfg.bits
    errors = weight_errors(inp.model, names, bits, QuantConfig(w_clip=cfg.w_clip))
    omega = omega_matrix(scores, errors)
    if not np.all(np.isfinite(omega)):
        bad = [n for n, row in zip(names, omega) if not np.all(np.isfinite(row))]
        raise DataError(f"{sens.source}: the scores of {bad[:5]} overflow when multiplied by the "
                        "quantization error: re-run 'hawq analyze --json' on this model")
    key = "eigenvalue" if sens.metric == "eigen" else "avg_trace"
    checked = {"metric": sens.metric,
               "layers": [{"name": n, "params": int(p), key: float(s)}
                          for n, p, s in zip(names, params, scores)]}
    alloc = allocate_plan(cfg, names, params, macs, omega, {"hessian": checked})
    plan = BitPlan({n: LayerSpec(int(b), cfg.a_bits) for n, b in zip(names, alloc.bits)})
    # the size 'hawq eval --plan' reports: the same accounting over the model's real layers
    size = budget_report(infos, plan, count_params(inp.model))
    warnings = [w for w in (note, sens.negative_warning()) if w]
    _print_table([[n, int(p), int(b)] for n, p, b in zip(names, params, alloc.bits)],
                 ["layer", "params", "w_bits"])
    print(f"\n{alloc.method}: {size.avg_bits:.3f} avg bits, {size.weight_compression:.2f}x, "
          f"total Omega {alloc.total_omega:.4g}")
    for w in warnings:
        print(f"warning: {w}")
    if args.plot:
        from hawq.base.plots import plot_frontier

        plot_frontier(pareto_frontier(omega, params, np.array(bits), max_points=20000),
                      args.plot, chosen=alloc, uniform=uniform_points(omega, params, bits))
        print(f"wrote {args.plot}")
    return plan.to_dict() | {"allocation": alloc.to_dict(), "model": model_name,
                             "weight_compression": size.weight_compression,
                             "warnings": warnings}

def cmd_zeroq(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.workflows.workflow import zeroq

    cfg = config_from_args(ZeroQConfig, args)
    if args.device is not None and torch.device(args.device).type != "cpu":
        raise ConfigError(f"--device {args.device}: 'hawq zeroq' runs on the CPU for now "
                          "(distillation draws its inputs there); drop --device")
    model, data, task = _job_inputs(cfg, args)
    res = zeroq(model, data, task=task, config=cfg, out_dir=args.out, progress=True,
                overwrite=args.overwrite)
    _print_table([[r["name"], r["params"], f"{max(r['omega']):.3g}" if r.get("omega") else "-",
                   r["w_bits"], r["a_bits"]] for r in res.layers],
                 ["layer", "params", f"max {cfg.sensitivity}", "w_bits", "a_bits"])
    d, b = res.distill, res.budget
    if d:
        print(f"\ndistilled {d['batch_size']} inputs in {d['seconds']:.1f} s: BN loss "
              f"{d['initial_loss']:.4g} -> {d['final_loss']:.4g} ({d['reduction']:.0f}x)")
    _print_warnings(res)
    value = getattr(res, "value", res.accuracy)
    score = f"{_result_score(res)} on real test data, " if value is not None else ""
    print(f"{cfg.model} zero-shot [{cfg.data_source} data, {cfg.sensitivity} + {cfg.allocator}]: "
          f"{score}weights {b['weight_compression']:.2f}x ({b['avg_bits']:.2f} avg bits), "
          f"{res.seconds.get('total', sum(res.seconds.values())):.1f} s")
    if args.out:
        print(f"wrote plan.json, metrics.json, sensitivity.json and plots to {args.out}")
    return res.to_dict()


def _finetune_config(args: argparse.Namespace):
    from hawq.post.finetune import FinetuneConfig

    return FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          steps_per_epoch=args.steps_per_epoch, distill=args.distill,
                          staged=args.staged, stages=args.stages, seed=args.seed,
                          learn_steps=not args.fixed_steps,
                          bn_fold_at=None if args.no_bn_fold else args.bn_fold_at)


def _add_finetune_args(p: argparse.ArgumentParser, epochs_flag: str = "--epochs") -> None:
    g = p.add_argument_group("fine-tuning")
    if epochs_flag == "--epochs":
        g.add_argument("--epochs", type=positive_int, default=1,
                       help="epochs of QAT (default: 1)")
    g.add_argument("--lr", type=positive_float, default=0.005,
                   help="SGD learning rate (default: 0.005)")
    g.add_argument("--batch-size", type=positive_int, default=128,
                   help="training batch size (default: 128)")
    g.add_argument("--steps-per-epoch", type=positive_int, default=None,
                   help="cap steps per epoch")
    g.add_argument("--distill", type=unit_float, default=0.5,
                   help="weight of knowledge distillation from FP32 (default: 0.5; 0 = off)")
    g.add_argument("--staged", action="store_true",
                   help="HAWQ-V1 schedule: quantize and fine-tune blocks in decreasing Omega")
    g.add_argument("--stages", type=positive_int, default=None,
                   help="merge blocks into N stages")
    g.add_argument("--bn-fold-at", type=unit_float, default=0.5,
                   help="fraction of training after which BatchNorm is folded (default: 0.5)")
    g.add_argument("--no-bn-fold", action="store_true", help="keep BatchNorm unfolded")
    g.add_argument("--fixed-steps", action="store_true",
                   help="keep quantizer step sizes from min/max/EMA instead of learning them "
                        "(LSQ, the default)")
    g.add_argument("--a-avg-bits", type=arg_type(float, "avg-bits"), default=None,
                   help="mixed-precision activations from activation-Hessian traces at this "
                        "average (e.g. 4 = 8x activation compression); default: plan's a_bits")
    g.add_argument("--train-samples", type=positive_int, default=None,
                   help="limit the training samples (default: all)")


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.maths.plan import BitPlan
    from hawq.workflows.workflow import finetune_plan

    plan = BitPlan.from_json(args.plan)
    if _is_builtin(args.model) and not args.data and args.task == DEFAULT_TASK:
        model, data, task = args.model, None, None
    else:
        inp = _args_inputs(args)
        model, data, task = inp.model, (inp.data or None), inp.task
        if inp.builtin and not inp.data:
            model = args.model  # a built-in model on its own data, with another task
    res = finetune_plan(model, plan, args.out, data=data, task=task,
                        config=_finetune_config(args), data_dir=args.data_dir,
                        train_samples=args.train_samples, test_samples=args.test_samples,
                        a_avg_bits=args.a_avg_bits, resume=args.resume, progress=True,
                        device=args.device)
    _print_finetune(res, args.out)
    return res


def _print_finetune(res: dict[str, Any], out: str | None) -> None:
    for h in res["finetune"]["history"]:
        train = h.get("train_accuracy")
        print(f"epoch {h['epoch']}: loss {h['loss']:.4f}"
              + (f", train top-1 {100 * train:.2f}%" if train is not None else "")
              + f", {h['seconds']:.0f} s")
    metric = res.get("metric", "accuracy")
    fp32 = res.get("fp32_value", res.get("fp32_accuracy"))
    ptq = res.get("ptq_value", res.get("ptq_accuracy"))
    after = res.get("value", res.get("accuracy"))
    if metric == "accuracy":
        print(f"{res['model']}: FP32 {100 * fp32:.2f}%, post-training {100 * ptq:.2f}%, after "
              f"fine-tuning {100 * after:.2f}%")
    else:
        print(f"{res['model']}: {metric} FP32 {fp32:.4g}, post-training {ptq:.4g}, after "
              f"fine-tuning {after:.4g}")
    if out:
        print(f"wrote finetune.json, plan.json, model.pt, last.pt to {out}")


# ----------------------------------------------------------------------------- the parser

class _Parser(argparse.ArgumentParser):
    """``argparse`` with hawq's one-line errors: a bad or missing flag prints ``hawq: error:
    argument --x: ... (see 'hawq COMMAND --help')`` and exits with status 2 (subcommand
    parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"hawq: error: {_one_line(message)} (see '{self.prog} --help')\n")


#: Sample counts of flags added outside this module (``hawq export``/``report``): each must be
#: a positive integer when given.
_COUNT_FLAGS = ("calib_samples", "test_samples", "hessian_samples", "density_samples")


def _check_counts(args: argparse.Namespace) -> None:
    from hawq.post.config import check_value

    for dest in _COUNT_FLAGS:
        v = getattr(args, dest, None)
        if v is not None:
            check_value(v, int, "positive", "--" + dest.replace("_", "-"))


def _check_writable(text: str, flag: str, folder: bool) -> None:
    """Raise ConfigError unless ``text`` can be created or overwritten as a folder
    (``folder``) or a file: it is not the wrong kind of existing thing, the nearest existing
    folder above it is a folder (not a file) and it is writable. Creates nothing."""
    path = Path(text).expanduser()
    if path.exists():
        if folder and not path.is_dir():
            raise ConfigError(f"{flag} {text!r} is an existing file, not a folder: give a new "
                              "folder (hawq creates it) or an existing one")
        if not folder and path.is_dir():
            raise ConfigError(f"{flag} {text!r} is a folder: give a file path, e.g. "
                              f"{str(path / 'result')!r} with the right extension")
        target = path if path.is_dir() else path.parent
    else:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise ConfigError(f"{flag} {text!r} cannot be created: {str(target)!r} is a file, "
                              "not a folder; give a path under a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {text!r} cannot be written: no write permission in "
                          f"{str(target)!r}; give a path in a folder you can write")


def check_outputs(args: argparse.Namespace) -> None:
    """Check every output path a parsed command names before any work starts (``--out``: a
    folder, or the checkpoint file of ``hawq export``; ``--json``, ``--plot``, ``--onnx``:
    files; ``hawq report`` without ``--out`` writes into its run folder). Raises
    :class:`ConfigError` naming the flag: an existing file given for a folder (or the reverse),
    a path under a file, a folder without write permission. Cost: a few ``stat`` calls."""
    command = getattr(args, "command", None)
    out = getattr(args, "out", None)
    if out:
        _check_writable(out, "--out", folder=command != "export")
    for dest, flag in (("json_out", "--json"), ("plot", "--plot"), ("onnx", "--onnx")):
        if getattr(args, dest, None):
            _check_writable(getattr(args, dest), flag, folder=False)
    run_dir = getattr(args, "dir", None)
    if command == "report" and not out and run_dir and Path(run_dir).is_dir():
        _check_writable(run_dir, "DIR", folder=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``hawq`` parser; choice lists are read from the registries now (build a fresh one
    after registering a sensitivity, allocator, task...)."""
    from hawq.analysis.hessian import METRICS

    parser = _Parser(prog="hawq", description="Hessian-aware mixed-precision "
                                     "quantization for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"hawq {_version()}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("layers", help="table of quantizable layers: params, MACs, shapes")
    _common(p)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("eval", help="uniform (or planned) post-training quantization + metric")
    _common(p)
    p.add_argument("--w-bits", type=int, default=8,
                   help="weight bits (1-8, or 32 for float; default: 8)")
    p.add_argument("--a-bits", type=int, default=8,
                   help="activation bits (1-8, or 32; default: 8)")
    p.add_argument("--plan", default=None, help="bit plan JSON instead of --w-bits/--a-bits")
    p.add_argument("--w-clip", default="minmax", choices=w_clip_names(),
                   help="weight clipping (default: minmax)")
    p.add_argument("--bias-correct", action="store_true",
                   help="after quantizing, correct each layer's bias so its mean output per "
                        "channel matches FP32 on the calibration data (hawq.bias_correct_)")
    p.add_argument("--a-calibration", default="minmax", choices=a_calibration_names(),
                   help="activation ranges (default: minmax)")
    p.add_argument("--calib-samples", type=positive_int, default=512,
                   help="calibration samples for the activation ranges (default: 512)")
    p.add_argument("--test-samples", type=positive_int, default=None,
                   help="limit the test samples (default: all)")
    p.add_argument("--samples", dest="test_samples", type=positive_int,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="per-layer Hessian traces / eigenvalues / channel, "
                       "activation or Fisher traces")
    _common(p, nproc=True)
    p.add_argument("--metric", default="trace", choices=list(METRICS),
                   help="what to estimate (default: trace)")
    p.add_argument("--hessian-samples", type=positive_int, default=256,
                   help="samples for the Hessian (default: 256)")
    p.add_argument("--samples", dest="hessian_samples", type=positive_int,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="train (calibration data) or test (default: train)")
    p.add_argument("--tol", type=non_negative_float, default=None,
                   help="relative stderr target (trace, default 1e-2) or eigen tolerance (1e-3)")
    p.add_argument("--max-probes", type=positive_int, default=200,
                   help="Hutchinson probes / power iterations at most (default: 200)")
    p.add_argument("--probe-mode", default="auto", choices=probe_mode_names(),
                   help="trace/channel/activation: 'auto' (default: 'gn' for traces under the "
                        "classification loss, else 'joint'), 'gn' (exact Gauss-Newton trace per "
                        "layer + per-layer Hutchinson on the remainder), 'joint' (one HVP per "
                        "probe for all layers) or 'layer' (each layer alone, L HVPs per probe)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="split the data into chunks of this many samples")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compress", help="the main job: analyse, allocate bits, quantize, evaluate")
    add_config_args(p, CompressConfig)
    _run_args(p, nproc=True)
    _job_out_args(p)
    p.add_argument("--finetune", type=non_negative_int, default=0, metavar="EPOCHS",
                   help="then fine-tune the plan for EPOCHS epochs (QAT; see 'hawq finetune')")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    _add_finetune_args(p, epochs_flag="--finetune")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("finetune", help="quantization-aware fine-tuning of a bit plan")
    _common(p)
    p.add_argument("--plan", required=True, help="bit plan JSON (e.g. from 'hawq compress')")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for checkpoints and results")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--test-samples", type=positive_int, default=None,
                   help="limit the test samples (default: all)")
    _add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("allocate", help="bit plan from a sensitivity JSON under a budget")
    p.add_argument("--sensitivity-file", default=None, metavar="FILE",
                   help="JSON written by 'hawq analyze --json', or a run's sensitivity.json "
                        "from 'hawq compress --out' (required)")
    p.add_argument("--sensitivity", dest="sensitivity_file", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    _common(p, model_default=None)
    add_config_args(p, CompressConfig, only=(
        "allocator", "bits", "a_bits", "target_compression", "target_avg_bits", "target_bytes",
        "target_fraction", "bops_limit", "latency_table", "latency_limit", "pin_first_last",
        "w_clip"))
    p.add_argument("--plot", default=None, metavar="PNG", help="PNG of the Pareto frontier")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("zeroq", help="ZeroQ: data-free mixed precision from distilled data")
    add_config_args(p, ZeroQConfig)
    _run_args(p, nproc=True)
    _job_out_args(p)
    p.set_defaults(func=cmd_zeroq)
    from hawq.ui.cli_export import add_parsers  # hawq export / hawq report

    add_parsers(sub, _common)
    return parser


def _fail(exc: BaseException | str) -> int:
    print(f"hawq: error: {_one_line(exc)}", file=sys.stderr)
    return 2


def _quiet_rank(args: argparse.Namespace) -> None:
    """A rank other than 0 under torchrun: no output files, no tables, no progress bars."""
    for key in ("out", "json_out", "plot", "onnx"):
        if getattr(args, key, None) is not None:
            setattr(args, key, None)
    os.environ["TQDM_DISABLE"] = "1"
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hawq`` console script and ``python -m hawq``. Returns the exit
    status: 0, 2 for an error hawq explains (one line on stderr, no traceback; bad flags
    included), 130 when interrupted (Ctrl-C anywhere: one line, no traceback; files are written
    atomically, so nothing is left half-written). Output paths (``--out``, ``--json``,
    ``--plot``, ``--onnx``) are checked before any work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            parser = build_parser()
        except HawqError as exc:
            return _fail(exc)
        args = parser.parse_args(argv)
        args.argv = argv  # recorded in run dirs
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        try:
            rc = launch.maybe_relaunch(getattr(args, "nproc", None), argv)
            if rc is not None:  # this process started the ranks and waited for them
                return rc
            args.device = launch.setup(getattr(args, "device", None))
            if not dist.is_main():  # rank 0 prints and writes; the others compute
                _quiet_rank(args)
            _check_counts(args)
            check_outputs(args)
            if getattr(args, "threads", None) is not None:
                torch.set_num_threads(args.threads)
            torch.manual_seed(getattr(args, "seed", 0))
            result = args.func(args)
            if getattr(args, "json_out", None) and result is not None:
                write_json(args.json_out, result)
                print(f"wrote {args.json_out}")
        except HawqError as exc:
            return _fail(exc)
    except KeyboardInterrupt:
        print("hawq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
