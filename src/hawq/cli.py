"""The ``hawq`` command line. It sits on top of the library; the library never imports it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

import torch

from hawq.errors import HawqError
from hawq.io import write_json

log = logging.getLogger("hawq")


def _common(p: argparse.ArgumentParser, model_default: str | None = "digits-cnn") -> None:
    p.add_argument("--model", default=model_default,
                   help="registry name (resnet20/32/44/56, digits-cnn) or package.module:factory"
                        f" (default: {model_default})")
    p.add_argument("--data-dir", default=None,
                   help="folder with cifar10.npz and resnet*_cifar10.pt (default: $HAWQ_DATA, "
                        "else ../shared/data)")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="also write the result as JSON to FILE")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _bits_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 2,4,8")


def _print_table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) if k and c.replace(".", "").replace("-", "").isdigit()
                        else c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def _load(args: argparse.Namespace):
    from hawq.models import build_model, get_spec

    spec = get_spec(args.model)
    model = build_model(args.model, pretrained=True, data_dir=args.data_dir)
    return spec, model


def _example(spec, args) -> torch.Tensor:
    from hawq.data import load_dataset

    if spec.input_shape:
        return torch.zeros(1, *spec.input_shape)
    return load_dataset(spec.dataset, "test", args.data_dir, limit=1).tensors[0]


def cmd_layers(args: argparse.Namespace) -> dict[str, Any]:
    import hawq

    spec, model = _load(args)
    infos = hawq.layers(model, _example(spec, args))
    rows = [[i.name, i.type, i.params, i.macs, "x".join(map(str, i.in_shape[1:])),
             "x".join(map(str, i.out_shape[1:]))] for i in infos]
    _print_table(rows, ["layer", "type", "params", "MACs", "input", "output"])
    unsupported = hawq.surgery.unsupported_layers(model)
    print(f"\n{len(infos)} quantizable layers, {sum(i.params for i in infos):,} weights, "
          f"{sum(i.macs for i in infos):,} MACs/sample; model has {hawq.count_params(model):,} "
          f"parameters" + (f"; unsupported (stay float): {unsupported}" if unsupported else ""))
    return {"model": args.model, "layers": [i.to_dict() for i in infos],
            "unsupported": unsupported}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    import hawq
    from hawq.data import load_dataset

    spec, model = _load(args)
    test = load_dataset(spec.dataset, "test", args.data_dir, args.samples)
    infos = hawq.layers(model, test.tensors[0][:1])
    plan = (hawq.BitPlan.from_json(args.plan) if args.plan
            else hawq.BitPlan.uniform(args.w_bits, args.a_bits))
    config = hawq.QuantConfig(w_clip=args.w_clip, a_calibration=args.a_calibration)
    report = hawq.quantize_(model, plan, config)
    calib = load_dataset(spec.dataset, "train", args.data_dir, args.calib_samples)
    hawq.calibrate_(model, calib)
    res = hawq.evaluate(model, test, progress=True)
    size = hawq.budget_report(infos, plan, hawq.count_params(model))
    print(f"{args.model}  plan: {'file ' + args.plan if args.plan else f'W{args.w_bits}A{args.a_bits}'}"
          f"  top-1 {100 * res.accuracy:.2f}% on {res.samples} test images (loss {res.loss:.4f})")
    print(f"size {size.size_bytes / 1024:.1f} KiB vs FP32 {size.fp32_bytes / 1024:.1f} KiB "
          f"(model {size.compression:.2f}x, weights {size.weight_compression:.2f}x, "
          f"{size.avg_bits:.2f} avg bits); BOPs {size.bops / 1e9:.3f} G "
          f"({size.fp32_bops / max(size.bops, 1):.1f}x fewer than FP32)")
    return {"model": args.model, "plan": plan.to_dict(), "eval": res.to_dict(),
            "budget": size.to_dict(), "quantized": report.quantized,
            "left_float": report.left_float, "unsupported": report.unsupported,
            "config": vars(config)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hawq", description="Hessian-aware mixed-precision "
                                     "quantization for PyTorch models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="table of quantizable layers: params, MACs, shapes")
    _common(p)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("eval", help="uniform (or planned) post-training quantization + accuracy")
    _common(p)
    p.add_argument("--w-bits", type=int, default=8, help="weight bits (1-8, or 32 for float)")
    p.add_argument("--a-bits", type=int, default=8, help="activation bits (1-8, or 32)")
    p.add_argument("--plan", default=None, help="bit plan JSON instead of --w-bits/--a-bits")
    p.add_argument("--w-clip", default="minmax", choices=["minmax", "mse"])
    p.add_argument("--a-calibration", default="minmax", choices=["minmax", "percentile"])
    p.add_argument("--calib-samples", type=int, default=512,
                   help="training images used to calibrate activation ranges (default 512)")
    p.add_argument("--samples", type=int, default=None, help="limit the test images")
    p.set_defaults(func=cmd_eval)
    return parser


COMMANDS: dict[str, Callable] = {}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hawq`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(getattr(args, "seed", 0))
    try:
        result = args.func(args)
    except HawqError as exc:
        print(f"hawq: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json_out", None) and result is not None:
        write_json(args.json_out, result)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
