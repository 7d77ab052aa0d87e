"""ZeroQ on CIFAR-10 ResNets: zero-shot quantization from distilled data vs real / noise data.

For each model it distils 32 inputs from the BatchNorm statistics (ZeroQ's defaults: Adam, lr
0.5, 500 iterations, batch 32), once with ZeroQ's loss alone ("distilled") and once with a
cross-entropy term toward round-robin class labels ("distilled+labels", hawq's default), and, for
each setting

* W8A8, W6A6, W4A8: uniform weight / activation bits,
* MP4A8: weights mixed over {2,4,8} at the size of uniform 4-bit (8x), KL sensitivity on the
  calibration inputs (the first 32) + Pareto frontier, activations 8-bit,

quantizes the FP32 model (symmetric per-channel min/max weights, per-tensor min/max activations)
and calibrates activation ranges on four input sources: the two distilled sets (zero-shot), 512 real
training images, and 32 N(0, 1) noise images (the size of the distilled batch). All accuracies are
on the 10,000 CIFAR-10 test images. It then runs the whole zero-shot pipeline
(:func:`hawq.analysis.zeroq.zeroq`, MP4A8 from distilled+labels data) and reports its wall time split by stage.

    python benchmarks/zeroq.py --models resnet20 --threads 2
    python benchmarks/zeroq.py --models resnet20,resnet56 --threads 2
    python benchmarks/zeroq.py --quick          # smoke run: 1,000 test images, 60 iterations
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hawq
from hawq.maths.budgets import Budget
from hawq.maths.allocation import allocate
from hawq.feed.data import load_cifar10
from hawq.analysis.distill import distill_data
from hawq.base.io import write_json
from hawq.modules.models import build_model
from hawq.post.config import ZeroQConfig
from hawq.workflows.workflow import zeroq
from hawq.analysis.zeroq import gaussian_data, kl_sensitivity

SETTINGS = [("W8A8", 8, 8), ("W6A6", 6, 6), ("W4A8", 4, 8), ("MP4A8", None, 8)]
SOURCES = ("distilled", "distilled+labels", "real", "noise")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_model(name: str, args: argparse.Namespace, test, real) -> dict:
    model = build_model(name, data_dir=args.data_dir)
    t = time.perf_counter()
    fp32 = hawq.evaluate(model, test).accuracy
    t_eval = time.perf_counter() - t
    print(f"\n{name}: FP32 {100 * fp32:.2f}% on {len(test.tensors[1])} test images "
          f"({t_eval:.1f} s per evaluation)")
    infos = hawq.layers(model, test.tensors[0][:1])
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)

    t, c = time.perf_counter(), _cpu()
    dres = distill_data(model, (3, 32, 32), iterations=args.iters, seed=args.seed, progress=True)
    distill = dres.to_dict() | {"cpu_seconds": _cpu() - c, "wall_seconds": time.perf_counter() - t}
    print(f"distilled 32 inputs: BN loss {dres.initial_loss:.4g} -> {dres.final_loss:.4g} "
          f"({dres.reduction:.0f}x) in {distill['wall_seconds']:.1f} s")
    t, c = time.perf_counter(), _cpu()
    lres = distill_data(model, (3, 32, 32), iterations=args.iters, seed=args.seed,
                        label_weight=args.label_weight, progress=True)
    distill_labels = lres.to_dict() | {"cpu_seconds": _cpu() - c,
                                       "wall_seconds": time.perf_counter() - t}
    print(f"distilled 32 inputs with a label term (weight {args.label_weight:g}): BN loss "
          f"{lres.initial_loss:.4g} -> {lres.final_loss:.4g} ({lres.reduction:.0f}x)")
    data = {"distilled": dres.data, "distilled+labels": lres.data, "real": real,
            "noise": gaussian_data((3, 32, 32), 32, args.seed)}
    rows = []
    plans = {}
    for source in SOURCES:
        x = data[source]
        for label, wb, ab in SETTINGS:
            t = time.perf_counter()
            extra = {}
            if wb is None:
                kl = kl_sensitivity(model, x[:32], names, (2, 4, 8))
                alloc = allocate(kl, params, (2, 4, 8), Budget("compression", 8), "frontier")
                wbits = [int(b) for b in alloc.bits]
                extra = {"w_bits": wbits, "kl_total": alloc.total_omega}
                plans[source] = wbits
            else:
                wbits = [wb] * len(names)
            q = copy.deepcopy(model)
            plan = hawq.BitPlan({n: hawq.LayerSpec(b, ab) for n, b in zip(names, wbits)})
            hawq.quantize_(q, plan)
            hawq.calibrate_(q, x)
            acc = hawq.evaluate(q, test).accuracy
            size = hawq.budget_report(infos, plan, hawq.count_params(q))
            rows.append({"model": name, "setting": label, "source": source,
                         "calib_samples": int(x.shape[0]), "accuracy": acc,
                         "drop": fp32 - acc, "weight_compression": size.weight_compression,
                         "avg_bits": size.avg_bits, "seconds": time.perf_counter() - t,
                         **extra})
            print(f"  {label:6s} {source:9s} {100 * acc:6.2f}%  "
                  f"({size.weight_compression:.2f}x, {time.perf_counter() - t:.1f} s)")

    # the whole zero-shot pipeline, as 'hawq zeroq' runs it
    t, c = time.perf_counter(), _cpu()
    res = zeroq(ZeroQConfig(model=name, data_dir=args.data_dir, target_compression=8,
                            bits=(2, 4, 8), distill_iters=args.iters, seed=args.seed,
                            distill_label_weight=args.label_weight,
                            test_samples=args.test_samples),
                out_dir=Path(args.out) / name if args.out else None)
    pipe = {"seconds": res.seconds, "wall_seconds": time.perf_counter() - t,
            "cpu_seconds": _cpu() - c, "accuracy": res.accuracy,
            "plan_w_bits": [r["w_bits"] for r in res.layers],
            "distill_share": res.seconds["distill"] / res.seconds["total"],
            "same_distilled_data_as_table": res.distill["final_loss"] == lres.final_loss,
            "same_plan_as_table": [r["w_bits"] for r in res.layers] == plans["distilled+labels"]}
    print(f"zero-shot pipeline (zeroq): {pipe['wall_seconds']:.1f} s wall "
          f"({100 * pipe['distill_share']:.0f}% distillation), top-1 {100 * res.accuracy:.2f}%")
    return {"model": name, "fp32_accuracy": fp32, "eval_seconds": t_eval, "distill": distill,
            "distill_labels": distill_labels,
            "rows": rows, "pipeline": pipe}


def print_table(results: list[dict]) -> None:
    print("\nTop-1 on the CIFAR-10 test set (activation ranges calibrated on each source):")
    head = f"{'model':9s} {'setting':7s} {'size':>6s} " + " ".join(f"{s:>16s}" for s in SOURCES)
    print(head + f" {'FP32':>7s}")
    print("-" * len(head + " FP32   "))
    for r in results:
        by = {(row["setting"], row["source"]): row for row in r["rows"]}
        for label, _, _ in SETTINGS:
            size = by[(label, "distilled")]["weight_compression"]
            cells = " ".join(f"{100 * by[(label, s)]['accuracy']:15.2f}%" for s in SOURCES)
            print(f"{r['model']:9s} {label:7s} {size:5.2f}x {cells} {100 * r['fp32_accuracy']:6.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=500, help="distillation iterations (500)")
    ap.add_argument("--label-weight", type=float, default=10.0,
                    help="label term of the 'distilled+labels' source and of the pipeline (10)")
    ap.add_argument("--test-samples", type=int, default=None)
    ap.add_argument("--out", default=None, help="also keep the pipeline's output directory")
    ap.add_argument("--quick", action="store_true", help="1,000 test images, 60 iterations")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.test_samples, args.iters = args.test_samples or 1000, 60
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    test = load_cifar10(args.data_dir, "test", args.test_samples)
    real = load_cifar10(args.data_dir, "train", 512).tensors[0]
    results = [run_model(m.strip(), args, test, real) for m in args.models.split(",")]
    print_table(results)
    out = args.json or f"benchmarks/results/zeroq{'_quick' if args.quick else ''}.json"
    write_json(out, {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                     "threads": args.threads, "torch": torch.__version__,
                     "machine": platform.machine(), "quick": args.quick,
                     "test_samples": len(test.tensors[1]), "wall_seconds":
                     time.perf_counter() - t0, "results": results})
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
