"""The ``hawq export`` and ``hawq report`` subcommands (wired into :mod:`hawq.cli`)."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from hawq.errors import ConfigError

__all__ = ["add_parsers", "cmd_export", "cmd_report"]


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    """hawq export: packed integer checkpoint (+ ONNX) of a run's plan or of --model/--plan."""
    from pathlib import Path

    from hawq.export import quantized_from_plan, read_manifest, save_quantized, size_check
    from hawq.io import read_json
    from hawq.plan import BitPlan

    if args.run:
        metrics = read_json(Path(args.run) / "metrics.json", "run metrics")
        cfg = metrics["config"]
        plan = BitPlan.from_json(Path(args.run) / "plan.json")
        model_name, data_dir = cfg["model"], args.data_dir or cfg.get("data_dir")
        kw = dict(w_clip=cfg.get("w_clip", "minmax"), calib_samples=cfg.get("calib_samples", 512),
                  hessian_samples=cfg.get("hessian_samples", 256), seed=cfg.get("seed", 0),
                  bias_correct=cfg.get("bias_correct", False))
        out = args.out or str(Path(args.run) / "model.safetensors")
    else:
        if not (args.model and args.plan and args.out):
            raise ConfigError("give --run DIR, or all of --model M --plan plan.json --out FILE")
        plan, model_name, data_dir = BitPlan.from_json(args.plan), args.model, args.data_dir
        kw = dict(w_clip=args.w_clip, calib_samples=args.calib_samples, seed=args.seed)
        out = args.out
    model = quantized_from_plan(model_name, plan, data_dir=data_dir, **kw)
    res = save_quantized(model, out, model_name=model_name, extra={"plan_source": args.run or args.plan})
    check = size_check(res)
    print(f"wrote {res.path} ({res.file_bytes:,} B) + {res.manifest_path} ({res.manifest_bytes:,} B)"
          f"; accounted size {res.accounted_bytes:,.0f} B, stored payload {res.payload_bytes:,} B "
          f"({100 * check['payload_rel_diff']:+.2f}%), overhead {res.overhead_bytes:,} B")
    result = {"export": res.to_dict(), "size_check": check, "manifest": read_manifest(out)["model"]}
    if args.onnx:
        from hawq.onnx_export import export_onnx
        from hawq.data import load_dataset
        from hawq.models import get_spec

        x = load_dataset(get_spec(model_name).dataset, "test", data_dir, 64).tensors[0]
        onx = export_onnx(model, args.onnx, x, int4=not args.no_int4)
        print(f"wrote {onx.path} ({onx.bytes:,} B, opset {onx.opset}); onnxruntime vs PyTorch on "
              f"{len(x)} test inputs: max |diff| {onx.max_abs_diff:.3g}, agreement "
              f"{100 * onx.agreement:.1f}%")
        for note in onx.notes:
            print(f"  note: {note}")
        result["onnx"] = onx.to_dict()
    return result


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    """hawq report: report.html (self-contained) and report.md for a compress run dir."""
    from hawq.report import compute_density, write_report

    if args.density:
        compute_density(args.dir, samples=args.density_samples, progress=True)
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
    from hawq.config import w_clip_names

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
    p.add_argument("--open-html-path", action="store_true",
                   help="print only the HTML file's path (e.g. xdg-open $(hawq report DIR "
                        "--open-html-path))")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="also write the report's summary as JSON to FILE")
    p.set_defaults(func=cmd_report)
