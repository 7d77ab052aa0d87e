"""The ``hawq`` command line. It sits on top of the library; the library never imports it."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

from hawq.errors import HawqError
from hawq.hessian import PROBE_MODES
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
    from hawq.biascorr import quantize_calibrate_
    from hawq.data import load_dataset

    spec, model = _load(args)
    test = load_dataset(spec.dataset, "test", args.data_dir, args.samples)
    infos = hawq.layers(model, test.tensors[0][:1])
    plan = (hawq.BitPlan.from_json(args.plan) if args.plan
            else hawq.BitPlan.uniform(args.w_bits, args.a_bits))
    config = hawq.QuantConfig(w_clip=args.w_clip, a_calibration=args.a_calibration)
    calib = load_dataset(spec.dataset, "train", args.data_dir, args.calib_samples)
    report = quantize_calibrate_(model, plan, config, calib, args.calib_samples,
                                 args.bias_correct, progress=True)
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


def cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.data import load_dataset
    from hawq.hessian import analyze

    spec, model = _load(args)
    data = load_dataset(spec.dataset, args.split, args.data_dir, args.samples)
    res = analyze(model, data.tensors, metric=args.metric, seed=args.seed, tol=args.tol,
                  max_probes=args.max_probes, batch_size=args.batch_size,
                  probe_mode=args.probe_mode, progress=True)
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
          f"{len(data)} {args.split} samples")
    return res.to_dict() | {"model": args.model}


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget (give one size target; BOPs/latency need --allocator ilp)")
    g.add_argument("--target-compression", type=float, default=None,
                   help="weight compression vs FP32 (e.g. 8 = average 4 bits); default 8")
    g.add_argument("--target-avg-bits", type=float, default=None, help="average weight bits")
    g.add_argument("--target-bytes", type=float, default=None, help="quantized weight bytes")
    g.add_argument("--target-fraction", type=float, default=None,
                   help="r in [0,1] between all-lowest and all-highest bits (HAWQ-V3)")
    g.add_argument("--bops", type=float, default=None, dest="bops_limit",
                   help="BOPs limit in G (MACs x w_bits x a_bits)")
    g.add_argument("--latency-table", default=None,
                   help="JSON {layer: {bits: latency}} for --latency-limit")
    g.add_argument("--latency-limit", type=float, default=None, help="total latency limit")
    g.add_argument("--bits", type=_bits_list, default=[2, 4, 8],
                   help="candidate weight bit widths (default 2,4,8)")
    g.add_argument("--pin-first-last", type=int, default=None, metavar="BITS",
                   help="keep the first and last layer at BITS (must be in --bits)")


def cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.pipeline import CompressConfig, compress

    cfg = CompressConfig(
        model=args.model, data_dir=args.data_dir, method=args.method,
        sensitivity=args.sensitivity, allocator=args.allocator, bits=tuple(args.bits),
        a_bits=args.a_bits, target_compression=args.target_compression,
        target_avg_bits=args.target_avg_bits, target_bytes=args.target_bytes,
        target_fraction=args.target_fraction, bops_limit=args.bops_limit,
        latency_table=args.latency_table, latency_limit=args.latency_limit,
        pin_first_last=args.pin_first_last, hessian_samples=args.samples,
        max_probes=args.max_probes, probe_mode=args.probe_mode, calib_samples=args.calib_samples,
        test_samples=args.test_samples, w_clip=args.w_clip, seed=args.seed,
        bias_correct=args.bias_correct, refine=args.refine, refine_samples=args.refine_samples,
        refine_candidates=args.refine_candidates,
        episodes=args.episodes, reward_samples=args.reward_samples,
        channel_groups=args.channel_groups)
    res = compress(cfg, out_dir=args.out, progress=True)
    if args.out:
        from hawq.report import record_command

        record_command(args.out, getattr(args, "argv", None))
    rows = [[r["name"], r["params"], f"{r['avg_trace']:.3g}" if r["avg_trace"] is not None
             else "-", r.get("mean_w_bits", r["w_bits"]), r["a_bits"]] for r in res.layers]
    _print_table(rows, ["layer", "params", "avg trace", "w_bits", "a_bits"])
    b = res.budget
    if res.refinement is not None:
        r = res.refinement
        print(f"refinement: {len(r['moves'])} exchanges in {r['evaluations']} passes, KL to FP32 "
              f"{r['start_value']:.4g} -> {r['value']:.4g} on the held-out images")
    print(f"\n{cfg.model} [{cfg.sensitivity} + {cfg.allocator}]: top-1 "
          f"{100 * res.accuracy:.2f}% (FP32 {100 * res.fp32_accuracy:.2f}%), weights "
          f"{b['weight_compression']:.2f}x ({b['avg_bits']:.2f} avg bits), model "
          f"{b['size_bytes'] / 1024:.1f} KiB, {b['bops'] / 1e9:.3f} GBOPs")
    if args.out:
        print(f"wrote plan.json, metrics.json, sensitivity.json, frontier.png, layers.png to "
              f"{args.out}")
    out = res.to_dict()
    if args.finetune > 0:
        from hawq.pipeline import finetune_plan
        from hawq.plan import BitPlan

        args.epochs = args.finetune
        ft_dir = f"{args.out}/finetune" if args.out else None
        ft = finetune_plan(args.model, BitPlan.from_dict(res.plan), ft_dir,
                           config=_finetune_config(args), data_dir=args.data_dir,
                           train_samples=args.train_samples, test_samples=args.test_samples,
                           a_avg_bits=args.a_avg_bits, progress=True, device=args.device)
        _print_finetune(ft, ft_dir)
        out["finetune"] = ft
    return out


def cmd_allocate(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from hawq.allocation import pareto_frontier, uniform_points
    from hawq.io import read_json
    from hawq.pipeline import CompressConfig, allocate_plan
    from hawq.plan import BitPlan, LayerSpec, QuantConfig

    sens = read_json(args.sensitivity, "sensitivity file")
    layers = sens.get("layers") if isinstance(sens, dict) else None
    if not layers:
        raise HawqError(f"{args.sensitivity}: expected the JSON of 'hawq analyze' (with 'layers')")
    names = [lh["name"] for lh in layers]
    params = np.array([lh["params"] for lh in layers], dtype=float)
    bits = tuple(sorted(set(args.bits)))
    model_name = args.model or sens.get("model")
    if model_name is None:
        raise HawqError("give --model: the weights are needed for ||Q(W) - W||^2")
    _, model = _load(argparse.Namespace(model=model_name, data_dir=args.data_dir))
    import hawq
    from hawq.sensitivity import omega_matrix, weight_errors

    from hawq.models import get_spec

    infos = {i.name: i for i in hawq.layers(model, _example(get_spec(model_name), args))}
    macs = np.array([infos[n].macs for n in names], dtype=float)
    errors = weight_errors(model, names, bits, QuantConfig(w_clip=args.w_clip))
    key = "eigenvalue" if sens.get("metric") == "eigen" else "avg_trace"
    scores = [(lh[key][0] if isinstance(lh[key], list) else lh[key]) for lh in layers]
    omega = omega_matrix(scores, errors)
    cfg = CompressConfig(model=model_name, allocator=args.allocator, bits=bits,
                         target_compression=args.target_compression,
                         target_avg_bits=args.target_avg_bits, target_bytes=args.target_bytes,
                         target_fraction=args.target_fraction, bops_limit=args.bops_limit,
                         latency_table=args.latency_table, latency_limit=args.latency_limit,
                         pin_first_last=args.pin_first_last, a_bits=args.a_bits)
    alloc = allocate_plan(cfg, names, params, macs, omega, {"hessian": sens})
    plan = BitPlan({n: LayerSpec(int(b), args.a_bits) for n, b in zip(names, alloc.bits)})
    _print_table([[n, int(p), int(b)] for n, p, b in zip(names, params, alloc.bits)],
                 ["layer", "params", "w_bits"])
    print(f"\n{alloc.method}: {alloc.avg_bits:.3f} avg bits, {alloc.compression:.2f}x, total "
          f"Omega {alloc.total_omega:.4g}")
    if args.plot:
        from hawq.plots import plot_frontier

        plot_frontier(pareto_frontier(omega, params, np.array(bits), max_points=20000),
                      args.plot, chosen=alloc, uniform=uniform_points(omega, params, bits))
        print(f"wrote {args.plot}")
    return plan.to_dict() | {"allocation": alloc.to_dict()}


def cmd_zeroq(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.zeroq import ZeroQConfig, zeroq

    cfg = ZeroQConfig(
        model=args.model, data_dir=args.data_dir, bits=tuple(args.bits), a_bits=args.a_bits,
        w_bits=args.w_bits, target_compression=args.target_compression,
        target_avg_bits=args.target_avg_bits, target_bytes=args.target_bytes,
        target_fraction=args.target_fraction, bops_limit=args.bops_limit,
        latency_table=args.latency_table, latency_limit=args.latency_limit,
        pin_first_last=args.pin_first_last, sensitivity=args.sensitivity,
        allocator=args.allocator, data_source=args.data_source, distill_batch=args.distill_batch,
        distill_iters=args.distill_iters, distill_lr=args.distill_lr,
        distill_label_weight=args.distill_label_weight, calib_samples=args.calib_samples,
        w_clip=args.w_clip, evaluate=not args.no_eval,
        test_samples=args.test_samples, seed=args.seed)
    res = zeroq(cfg, out_dir=args.out, progress=True)
    _print_table([[r["name"], r["params"], f"{max(r['omega']):.3g}" if r["omega"] else "-",
                   r["w_bits"], r["a_bits"]] for r in res.layers],
                 ["layer", "params", f"max {cfg.sensitivity}", "w_bits", "a_bits"])
    d, b = res.distill, res.budget
    if d:
        print(f"\ndistilled {d['batch_size']} inputs in {d['seconds']:.1f} s: BN loss "
              f"{d['initial_loss']:.4g} -> {d['final_loss']:.4g} ({d['reduction']:.0f}x)")
    acc = (f"top-1 {100 * res.accuracy:.2f}% (FP32 {100 * res.fp32_accuracy:.2f}%) on real test "
           "data, " if res.accuracy is not None else "")
    print(f"{cfg.model} zero-shot [{cfg.data_source} data, {cfg.sensitivity} + {cfg.allocator}]: "
          f"{acc}weights {b['weight_compression']:.2f}x ({b['avg_bits']:.2f} avg bits), "
          f"{res.seconds['total']:.1f} s")
    if args.out:
        print(f"wrote plan.json, metrics.json, sensitivity.json and plots to {args.out}")
    return res.to_dict()


def _finetune_config(args: argparse.Namespace):
    from hawq.finetune import FinetuneConfig

    return FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          steps_per_epoch=args.steps_per_epoch, distill=args.distill,
                          staged=args.staged, stages=args.stages, seed=args.seed,
                          learn_steps=not args.fixed_steps,
                          bn_fold_at=None if args.no_bn_fold else args.bn_fold_at)


def _add_finetune_args(p: argparse.ArgumentParser, epochs_flag: str = "--epochs") -> None:
    g = p.add_argument_group("fine-tuning")
    if epochs_flag == "--epochs":
        g.add_argument("--epochs", type=int, default=1, help="epochs of QAT (default 1)")
    g.add_argument("--lr", type=float, default=0.005, help="SGD learning rate (default 0.005)")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--steps-per-epoch", type=int, default=None, help="cap steps per epoch")
    g.add_argument("--distill", type=float, default=0.5,
                   help="weight of knowledge distillation from FP32 (default 0.5; 0 = off)")
    g.add_argument("--staged", action="store_true",
                   help="HAWQ-V1 schedule: quantize and fine-tune blocks in decreasing Omega")
    g.add_argument("--stages", type=int, default=None, help="merge blocks into N stages")
    g.add_argument("--bn-fold-at", type=float, default=0.5,
                   help="fraction of training after which BatchNorm is folded (default 0.5)")
    g.add_argument("--no-bn-fold", action="store_true", help="keep BatchNorm unfolded")
    g.add_argument("--fixed-steps", action="store_true",
                   help="keep quantizer step sizes from min/max/EMA instead of learning them "
                        "(LSQ, the default)")
    g.add_argument("--a-avg-bits", type=float, default=None,
                   help="mixed-precision activations from activation-Hessian traces at this "
                        "average (e.g. 4 = 8x activation compression); default: plan's a_bits")
    g.add_argument("--train-samples", type=int, default=None, help="limit training images")
    g.add_argument("--device", default="cpu",
                   help="where to fine-tune: cpu (default), cuda or cuda:N")


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from hawq.pipeline import finetune_plan
    from hawq.plan import BitPlan

    plan = BitPlan.from_json(args.plan)
    res = finetune_plan(args.model, plan, args.out, config=_finetune_config(args),
                        data_dir=args.data_dir, train_samples=args.train_samples,
                        test_samples=args.test_samples, a_avg_bits=args.a_avg_bits,
                        resume=args.resume, progress=True, device=args.device)
    _print_finetune(res, args.out)
    return res


def _print_finetune(res: dict[str, Any], out: str | None) -> None:
    for h in res["finetune"]["history"]:
        print(f"epoch {h['epoch']}: loss {h['loss']:.4f}, train top-1 "
              f"{100 * h['train_accuracy']:.2f}%, {h['seconds']:.0f} s")
    print(f"{res['model']}: FP32 {100 * res['fp32_accuracy']:.2f}%, post-training "
          f"{100 * res['ptq_accuracy']:.2f}%, after fine-tuning {100 * res['accuracy']:.2f}%")
    if out:
        print(f"wrote finetune.json, plan.json, model.pt, last.pt to {out}")


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
    p.add_argument("--bias-correct", action="store_true",
                   help="after quantizing, correct each layer's bias so its mean output per "
                        "channel matches FP32 on the calibration images (hawq.bias_correct_)")
    p.add_argument("--a-calibration", default="minmax", choices=["minmax", "percentile"])
    p.add_argument("--calib-samples", type=int, default=512,
                   help="training images used to calibrate activation ranges (default 512)")
    p.add_argument("--samples", type=int, default=None, help="limit the test images")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="per-layer Hessian traces / eigenvalues / channel, "
                       "activation or Fisher traces")
    _common(p)
    p.add_argument("--metric", default="trace",
                   choices=["trace", "eigen", "channel", "activation", "fisher"])
    p.add_argument("--samples", type=int, default=256, help="data samples (default 256)")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--tol", type=float, default=None,
                   help="relative stderr target (trace, default 1e-2) or eigen tolerance (1e-3)")
    p.add_argument("--max-probes", type=int, default=200)
    p.add_argument("--probe-mode", default="joint", choices=PROBE_MODES,
                   help="trace/channel/activation: 'joint' (one HVP per probe for all layers) "
                        "or 'layer' (each layer alone, L HVPs per probe, lower variance)")
    p.add_argument("--batch-size", type=int, default=None, help="split data into chunks")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compress", help="the main job: analyse, allocate bits, quantize, evaluate")
    _common(p)
    p.add_argument("--method", default=None,
                   choices=["hawq-v2", "hawq-v1", "ilp", "cw-hawq", "cw-hessian"],
                   help="preset: hawq-v2 = trace Omega + Pareto frontier; hawq-v1 = eigenvalue "
                        "ordering rule; ilp = integer program over --sensitivity; cw-hawq = "
                        "per-channel bits, ratios by DDPG; cw-hessian = per-channel bits by "
                        "Omega over trace-sorted channel groups")
    p.add_argument("--episodes", type=int, default=100, help="cw-hawq: DDPG episodes (100)")
    p.add_argument("--reward-samples", type=int, default=1000,
                   help="cw-hawq: held-out training images for the reward (1000)")
    p.add_argument("--channel-groups", type=int, default=4,
                   help="cw-hessian: channel groups per layer (4)")
    p.add_argument("--sensitivity", default="hybrid",
                   choices=["hybrid", "hawq-v2", "hawq-v1", "measured"],
                   help="how Omega_i(b) is computed (default hybrid: max of the Hessian Omega and "
                        "the measured single-layer loss increase)")
    p.add_argument("--allocator", default="ilp", choices=["ilp", "frontier", "v1-rule"])
    p.add_argument("--a-bits", type=int, default=8, help="activation bits (default 8)")
    p.add_argument("--samples", type=int, default=256, help="images for the Hessian (256)")
    p.add_argument("--max-probes", type=int, default=50, help="Hutchinson probes at most (50)")
    p.add_argument("--probe-mode", default="joint", choices=PROBE_MODES,
                   help="Hutchinson probes: 'joint' (default, one HVP per probe for all layers) "
                        "or 'layer' (each layer alone: L HVPs per probe, lower variance; the "
                        "better choice for --method hawq-v2)")
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--w-clip", default="minmax", choices=["minmax", "mse"])
    p.add_argument("--bias-correct", action="store_true",
                   help="after quantizing, correct each layer's bias so its mean output per "
                        "channel matches FP32 on the calibration images (hawq.bias_correct_)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default="auto",
                   help="after allocating, try exchanges (one layer a bit width up, one down, "
                        "same budget) measured on the whole quantized model: KL to FP32 on "
                        "--refine-samples held-out training images (hawq.refine.refine_plan). "
                        "Default: only hybrid plans averaging <= 3.5 weight bits, where the "
                        "per-layer cost model is weakest; --no-refine: never")
    p.add_argument("--refine-samples", type=int, default=1024)
    p.add_argument("--refine-candidates", type=int, default=16,
                   help="exchanges measured per refinement round (16)")
    p.add_argument("--out", default=None, help="directory for plan, metrics, plots")
    _add_budget_args(p)
    p.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                   help="then fine-tune the plan for EPOCHS epochs (QAT; see 'hawq finetune')")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    _add_finetune_args(p, epochs_flag="--finetune")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("finetune", help="quantization-aware fine-tuning of a bit plan")
    _common(p)
    p.add_argument("--plan", required=True, help="bit plan JSON (e.g. from 'hawq compress')")
    p.add_argument("--out", default=None, help="directory for checkpoints and results")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--test-samples", type=int, default=None)
    _add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("allocate", help="bit plan from a sensitivity JSON under a budget")
    p.add_argument("--sensitivity", required=True, help="JSON written by 'hawq analyze --json'")
    _common(p, model_default=None)
    p.add_argument("--allocator", default="ilp", choices=["ilp", "frontier", "v1-rule"])
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--w-clip", default="minmax", choices=["minmax", "mse"])
    p.add_argument("--plot", default=None, help="PNG of the Pareto frontier")
    _add_budget_args(p)
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("zeroq", help="ZeroQ: data-free mixed precision from distilled data")
    _common(p, model_default="resnet20")
    p.add_argument("--sensitivity", default="kl", choices=["kl", "hessian"],
                   help="kl (ZeroQ) or hessian (HAWQ-V2 trace on distilled data)")
    p.add_argument("--allocator", default="frontier", choices=["frontier", "ilp"])
    p.add_argument("--a-bits", type=int, default=8, help="activation bits (default 8)")
    p.add_argument("--w-bits", type=int, default=None,
                   help="uniform weight bits instead of a mixed-precision budget")
    p.add_argument("--data-source", default="distilled", choices=["distilled", "real", "noise"],
                   help="inputs for sensitivity and calibration (default distilled: zero-shot)")
    p.add_argument("--distill-batch", type=int, default=32)
    p.add_argument("--distill-iters", type=int, default=500)
    p.add_argument("--distill-lr", type=float, default=0.5)
    p.add_argument("--distill-label-weight", type=float, default=10.0,
                   help="weight of a cross-entropy term toward round-robin class labels added to "
                        "ZeroQ's BN loss (default 10; 0 = ZeroQ's own loss)")
    p.add_argument("--calib-samples", type=int, default=512, help="for --data-source real/noise")
    p.add_argument("--w-clip", default="minmax", choices=["minmax", "mse"])
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--no-eval", action="store_true", help="skip the real-test-data report")
    p.add_argument("--out", default=None, help="directory for plan, metrics, plots")
    _add_budget_args(p)
    p.set_defaults(func=cmd_zeroq)
    from hawq.cli_export import add_parsers  # hawq export / hawq report

    add_parsers(sub, _common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hawq`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in run dirs
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
