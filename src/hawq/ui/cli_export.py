"""The ``hawq export`` and ``hawq report`` subcommands (wired into :mod:`hawq.ui.cli`)."""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import torch

from hawq.base.errors import ConfigError, DataError, HawqError

__all__ = ["add_parsers", "cmd_export", "cmd_report"]


def _rebuild_user(model_name: str, data_spec: str | None, task_name: Any,
                  data_dir: str | None, samples: int) -> tuple[Any, Any, dict[str, Any]]:
    """(float model, task, data splits) of a run on your own model or data, rebuilt from the
    specs the run recorded (as :func:`hawq.ui.cli` read them). Raises ConfigError when the model is
    neither a built-in name nor a factory spec (a run made from Python on a model object)."""
    from hawq.ui.loading import load_object, load_setup, settle_task, unpack_data
    from hawq.modules.models import MODELS, build_model, get_spec

    if model_name in MODELS:
        model = build_model(model_name, pretrained=True, data_dir=data_dir)
        data = unpack_data(load_object(data_spec, "data"), f"data {data_spec!r}")
        return model, settle_task(task_name, None), data
    if not isinstance(model_name, str) or ":" not in model_name:
        raise ConfigError(f"the run's model {model_name!r} is neither a built-in name "
                          f"({MODELS.names()}) nor 'pkg.module:factory': it was handed to "
                          "hawq.compress as an object, so export cannot rebuild it; save the "
                          "compressed model in Python with hawq.post.export.save_quantized(model, "
                          "path), or run 'hawq compress --model pkg.module:factory'")
    setup = load_setup(model_name, data_spec, task_name)
    data = setup.data
    if not data:  # a factory without data: its `dataset` attribute names a built-in one
        dataset = get_spec(model_name).dataset
        if dataset is None:
            raise ConfigError(f"model {model_name!r} has no data to calibrate on: give --data "
                              "'pkg.module:factory' (or return data from the model factory, or "
                              "set a built-in `dataset` attribute on it)")
        from hawq.feed.data import load_dataset

        data = {"calib": load_dataset(dataset, "train", data_dir, samples),
                "test": load_dataset(dataset, "test", data_dir, 64)}
    return setup.model, setup.task, data


def _run_cwd(run: str | None) -> str | None:
    """The folder a run was made in (its command.json), when recorded."""
    import json
    from pathlib import Path

    if not run:
        return None
    try:
        return json.loads((Path(run) / "command.json").read_text()).get("cwd")
    except (OSError, ValueError, AttributeError):
        return None


def _test_split(data: dict[str, Any]) -> Any:
    for key in ("test", "heldout", "calib", "train"):
        if data.get(key) is not None:
            return data[key]
    return None


def _same_outputs(a: Any, b: Any) -> bool:
    from hawq.feed.tasks import leaf_tensors

    ta, tb = leaf_tensors(a), leaf_tensors(b)
    if ta is None or tb is None or len(ta) != len(tb):
        return False
    return all(torch.equal(x, y) for x, y in zip(ta, tb))


def _onnx_input(model: Any, task: Any, batch: Any, name: str, out: str) -> Any:
    """The one float input tensor hawq's ONNX export feeds ``model`` from ``batch``; raises
    UnsupportedLayerError / ConfigError naming everything about the model it cannot export."""
    from hawq.base.errors import UnsupportedLayerError
    from hawq.modules.qmodules import QuantMixin

    reasons, layers = [], []
    for n, m in model.named_modules():
        if n and isinstance(m, QuantMixin) and not isinstance(
                m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            layers.append(f"{n} ({type(m).__name__})")
    if layers:
        reasons.append(f"quantized layers without an ONNX QDQ form: {layers[:6]}")
    x = None
    if task.forward_fn is not None:
        reasons.append(f"task {task.name!r} feeds the model with its own forward_fn")
    else:
        args, kwargs = task.inputs(batch)
        if kwargs or len(args) != 1 or not torch.is_tensor(args[0]):
            what = (f"keyword inputs {sorted(kwargs)}" if kwargs
                    else f"{len(args)} positional inputs")
            reasons.append(f"task {task.name!r} calls the model with {what}")
        elif not args[0].is_floating_point():
            reasons.append(f"its input is an {str(args[0].dtype).replace('torch.', '')} tensor "
                           "(token ids)")
        else:
            x = args[0]
            with torch.no_grad():
                y = model.eval()(x)
            if not torch.is_tensor(y):
                reasons.append(f"it returns a {type(y).__name__}, not one tensor")
    if reasons:
        cls = UnsupportedLayerError if layers else ConfigError
        raise cls(f"--onnx: ONNX export of model {name!r} is not supported: "
                  f"{'; '.join(reasons)}. hawq exports to ONNX models fed one float tensor that "
                  f"return one tensor and whose quantized layers are Conv/Linear; the packed "
                  f"checkpoint {out} was written and loads with hawq.post.export.load_quantized")
    return x


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    """hawq export: packed integer checkpoint (+ ONNX) of a run's plan or of --model/--plan.

    A run (or --model) on your own model or data is rebuilt from the factories you name with
    --model/--data (for a run, they must equal the specs it recorded: nothing named in a
    run's files is imported; a built-in model name may come from the run): the float model
    from the model factory, the calibration data from the data factory (or the model
    factory's data), the task as the run settled it; quantized and calibrated the way the
    workflow did, saved, loaded back and checked (outputs equal; for a run, the run's metric
    reproduced on its test data)."""
    import copy
    from pathlib import Path

    from hawq.post.export import (calibration_split, load_quantized, quantized_from_plan,
                             read_manifest, save_quantized, size_check)
    from hawq.base.io import read_json
    from hawq.modules.models import MODELS
    from hawq.maths.plan import BitPlan

    run_metrics: dict[str, Any] | None = None
    if args.run:
        from hawq.ui.report import confirm_run_specs

        metrics = read_json(Path(args.run) / "metrics.json", "run metrics")
        cfg = metrics.get("config") if isinstance(metrics, dict) else None
        if not isinstance(cfg, dict):
            raise DataError(f"{str(Path(args.run) / 'metrics.json')!r} has no 'config' object: "
                            "it is not a 'hawq compress' run's metrics.json (or is damaged)")
        plan = BitPlan.from_json(Path(args.run) / "plan.json")
        # a factory named in the run's files is imported only when the user names it too
        model_name, data_spec = confirm_run_specs(args.run, cfg.get("model"), cfg.get("data"),
                                                  args.model, args.data)
        data_dir = args.data_dir or cfg.get("data_dir")
        task_name = cfg.get("task")
        kw = dict(w_clip=cfg.get("w_clip", "minmax"), calib_samples=cfg.get("calib_samples", 512),
                  hessian_samples=cfg.get("hessian_samples", 256), seed=cfg.get("seed", 0),
                  bias_correct=cfg.get("bias_correct", False))
        for key, want in (("w_clip", str), ("calib_samples", int), ("hessian_samples", int),
                          ("seed", int), ("bias_correct", bool)):
            if not isinstance(kw[key], want) or (want is int and isinstance(kw[key], bool)):
                raise DataError(f"{str(Path(args.run) / 'metrics.json')!r}: config.{key} is "
                                f"{kw[key]!r}, expected {want.__name__}; rerun 'hawq compress'")
        if task_name is not None and not isinstance(task_name, str):
            raise DataError(f"{str(Path(args.run) / 'metrics.json')!r}: config.task is "
                            f"{task_name!r}, expected a task name; rerun 'hawq compress'")
        if data_dir is not None and not isinstance(data_dir, str):
            raise DataError(f"{str(Path(args.run) / 'metrics.json')!r}: config.data_dir is "
                            f"{data_dir!r}, expected a path; give --data-dir")
        out = args.out or str(Path(args.run) / "model.safetensors")
        run_metrics = metrics
    else:
        if not (args.model and args.plan and args.out):
            raise ConfigError("give --run DIR, or all of --model M --plan plan.json --out FILE")
        plan, model_name, data_dir = BitPlan.from_json(args.plan), args.model, args.data_dir
        data_spec, task_name = args.data, args.task
        kw = dict(w_clip=args.w_clip, calib_samples=args.calib_samples, seed=args.seed)
        out = args.out
    result: dict[str, Any] = {}
    if model_name in MODELS and not data_spec:  # a built-in model on its own dataset
        model = quantized_from_plan(model_name, plan, data_dir=data_dir, **kw)
        task = data = None
        res = save_quantized(model, out, model_name=model_name,
                             extra={"plan_source": args.run or args.plan})
    else:
        from hawq.feed.tasks import as_task, iter_batches

        try:
            float_model, task, data = _rebuild_user(
                model_name, data_spec, task_name, data_dir,
                max(kw["calib_samples"], kw.get("hessian_samples", 256)))
        except ConfigError as e:
            made_in = _run_cwd(args.run)
            if made_in is None or made_in == os.getcwd():
                raise
            raise ConfigError(f"{e} (the run was made in {made_in!r}: run 'hawq export' from "
                              "there)") from None
        skeleton = copy.deepcopy(float_model)
        task = as_task(task).bind(float_model)
        model = quantized_from_plan(float_model, plan, data=data, task=task, **kw)
        res = save_quantized(model, out, model_name=model_name, extra={
            "plan_source": args.run or args.plan, "data": data_spec, "task": task.name})
        loaded = load_quantized(out, model=skeleton)
        batch = next(iter(iter_batches(calibration_split(data), 8, "calibration data",
                                       limit=8)))
        with torch.no_grad():
            same = _same_outputs(task.forward(model.eval(), batch),
                                 task.forward(loaded, batch))
        check: dict[str, Any] = {"outputs_equal": same, "task": task.name}
        print(f"rebuilt {model_name}" + (f" with data {data_spec}" if data_spec else "")
              + f" (task {task.name}); packed round trip: outputs "
              + ("equal" if same else "DIFFER"))
        if run_metrics is not None and run_metrics.get("value") is not None:
            from hawq.modules.evaluate import evaluate

            got = evaluate(loaded, _test_split(data), task=task).value
            want = float(run_metrics["value"])
            ok = abs(got - want) <= 1e-6 * max(1.0, abs(want))
            check.update(metric=task.metric, value=got, run_value=want, reproduces_run=ok)
            if ok:
                print(f"reproduces the run: {task.metric} {got:.6g} (run {want:.6g})")
            else:
                print(f"warning: the exported model's {task.metric} is {got:.6g}, the run's was "
                      f"{want:.6g}: the model or data factory does not return the same thing "
                      "each call (seed it, train deterministically, or save the trained "
                      "weights and load them in the factory)")
        if not same:
            raise ConfigError(f"the packed checkpoint {out} does not reproduce the quantized "
                              "model's outputs (load_quantized differs): please report this")
        result["rebuild"] = check
    sc = size_check(res)
    print(f"wrote {res.path} ({res.file_bytes:,} B) + {res.manifest_path} ({res.manifest_bytes:,} B)"
          f"; accounted size {res.accounted_bytes:,.0f} B, stored payload {res.payload_bytes:,} B "
          f"({100 * sc['payload_rel_diff']:+.2f}%), overhead {res.overhead_bytes:,} B")
    result.update({"export": res.to_dict(), "size_check": sc,
                   "manifest": read_manifest(out)["model"]})
    if args.onnx:
        from hawq.post.onnx_export import export_onnx

        if task is None:
            from hawq.feed.data import load_dataset
            from hawq.modules.models import get_spec

            x = load_dataset(get_spec(model_name).dataset, "test", data_dir, 64).tensors[0]
        else:
            from hawq.feed.tasks import iter_batches

            first = next(iter(iter_batches(_test_split(data), 64, "test data", limit=64)))
            x = _onnx_input(model, task, first, str(model_name), res.path)
        try:
            onx = export_onnx(model, args.onnx, x, int4=not args.no_int4)
        except HawqError:
            raise
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"--onnx: torch.onnx.export failed on model {model_name!r} "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); the "
                              f"packed checkpoint {res.path} was written") from e
        print(f"wrote {onx.path} ({onx.bytes:,} B, opset {onx.opset}); onnxruntime vs PyTorch on "
              f"{len(x)} inputs: max |diff| {onx.max_abs_diff:.3g}"
              + (f", agreement {100 * onx.agreement:.1f}%" if onx.agreement is not None else ""))
        for note in onx.notes:
            print(f"  note: {note}")
        result["onnx"] = onx.to_dict()
    return result


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    """hawq report: report.html (self-contained) and report.md for a compress run dir."""
    from hawq.ui.report import compute_density, write_report

    if args.density:
        compute_density(args.dir, samples=args.density_samples, progress=True,
                        model=args.model, data=args.data)
    res = write_report(args.dir, args.out)
    if args.open_html_path:
        print(res.html_path)
    else:
        missing = [k for k, v in res.sections.items() if not v]
        print(f"wrote {res.html_path} and {res.md_path}"
              + (f" (not computed: {', '.join(missing)})" if missing else ""))
    return res.to_dict()


def add_parsers(sub: Any, common: Callable[..., None]) -> None:
    """Add the export and report subcommands to the hawq CLI (``common`` adds --model etc.)."""
    from hawq.post.config import w_clip_names

    p = sub.add_parser("export", help="packed integer checkpoint (safetensors + manifest), "
                       "optionally ONNX with QDQ")
    p.add_argument("--run", default=None, help="a 'hawq compress --out' directory (its plan)")
    common(p, model_default=None)
    p.add_argument("--plan", default=None, help="bit plan JSON (with --model)")
    p.add_argument("--out", default=None, help="the .safetensors file (default RUN/model."
                   "safetensors); the manifest goes beside it as .json")
    p.add_argument("--onnx", default=None, metavar="FILE", help="also write ONNX (QDQ) here")
    p.add_argument("--no-int4", action="store_true", help="ONNX: 8-bit types only")
    p.add_argument("--w-clip", default="minmax", choices=w_clip_names(),
                   help="weight clipping with --model/--plan (default: minmax; --run: the run's)")
    p.add_argument("--calib-samples", type=int, default=512,
                   help="calibration samples with --model/--plan (default: 512; --run: the run's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="HTML + Markdown report of a 'hawq compress' run")
    p.add_argument("dir", help="the run directory")
    p.add_argument("--out", default=None, help="write the report here (default: DIR)")
    p.add_argument("--density", action="store_true",
                   help="first compute the Hessian eigenvalue density (SLQ) into DIR")
    p.add_argument("--density-samples", type=int, default=256,
                   help="samples for --density (default: 256)")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="--density on a run made on your model factory: the same "
                        "'pkg.module:factory' (a run's files never name code to import)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="--density on a run made on your data factory: the same "
                        "'pkg.module:factory'")
    p.add_argument("--open-html-path", action="store_true",
                   help="print only the HTML file's path (e.g. xdg-open $(hawq report DIR "
                        "--open-html-path))")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="also write the report's summary as JSON to FILE")
    p.set_defaults(func=cmd_report)
