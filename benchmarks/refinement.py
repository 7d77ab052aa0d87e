"""Plan refinement on CIFAR-10 ResNets: the default hybrid ILP plan before and after
:func:`hawq.post.refine.refine_plan` (exchanges measured as KL to FP32 on held-out training images).

Same setting as ``allocation_quality.py`` (bits {2,3,4,8}, weights only, symmetric per-channel
min/max, no fine-tuning, 256 Hessian images / 20 probes, single-layer losses on the first 512
training images); the refinement data are the next ``--refine-samples`` training images, so the
test set is never seen. Prints a table, writes JSON.

    python benchmarks/refinement.py --models resnet20,resnet56 --json benchmarks/results/refinement.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import hawq
from hawq.maths.allocation import allocate
from hawq.maths.budgets import Budget
from hawq.feed.data import load_cifar10
from hawq.base.io import write_json
from hawq.modules.models import build_model
from hawq.analysis.sensitivities import sensitivity_costs
from hawq.post.refine import refine_plan


@torch.no_grad()
def log_probs(model, x):
    model.eval()
    return torch.cat([F.log_softmax(model(xb), -1) for xb in x.split(500)])


def test_scores(model_name, data_dir, names, wbits, test, quant, ref):
    """(accuracy, mean KL to the FP32 outputs) on the test set."""
    model = build_model(model_name, data_dir=data_dir)
    hawq.quantize_(model, hawq.BitPlan({n: hawq.LayerSpec(int(b), 32)
                                        for n, b in zip(names, wbits)}), quant)
    lp = log_probs(model, test.tensors[0])
    acc = float((lp.argmax(-1) == test.tensors[1]).float().mean())
    return acc, float(F.kl_div(lp, ref, log_target=True, reduction="batchmean"))


def run_model(name, args, test, calib, held):
    quant = hawq.QuantConfig(w_clip="minmax")
    model = build_model(name, data_dir=args.data_dir)
    infos = hawq.layers(model, test.tensors[0][:1])
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)
    bits = np.array(args.bits)
    t = time.perf_counter()
    omega, _ = sensitivity_costs(model, calib, names, tuple(args.bits), "hybrid", quant,
                                 hessian_samples=args.hessian_samples, max_probes=args.probes,
                                 probe_mode=args.probe_mode, tol=0.0, seed=args.seed)
    t_sens = time.perf_counter() - t
    fp32 = hawq.evaluate(model, test).accuracy
    ref = log_probs(model, test.tensors[0])
    rows = []
    for comp in args.compressions:
        budget = Budget("compression", comp)
        start = allocate(omega, params, bits, budget, "ilp")
        t = time.perf_counter()
        r = refine_plan(model, held, names, bits, omega, start.choices, params, budget,
                        candidates=args.candidates, config=quant)
        secs = time.perf_counter() - t
        acc0, kl0 = test_scores(name, args.data_dir, names, start.bits, test, quant, ref)
        acc1, kl1 = test_scores(name, args.data_dir, names, r.bits, test, quant, ref)
        row = {"compression": comp, "seconds": secs, "hybrid ilp": acc0, "refined": acc1,
               "kl_start": r.start_value, "kl_refined": r.value,
               "test_kl_start": kl0, "test_kl_refined": kl1,
               "exchanges": len(r.moves), "evaluations": r.evaluations,
               "hybrid ilp bits": [int(b) for b in start.bits],
               "refined bits": [int(b) for b in r.bits], "moves": r.moves}
        rows.append(row)
        print(f"{name} {comp:6.2f}x  hybrid {100 * row['hybrid ilp']:.2f}  refined "
              f"{100 * row['refined']:.2f}  KL held {r.start_value:.4f} -> {r.value:.4f}, test "
              f"{kl0:.4f} -> {kl1:.4f}  ({len(r.moves)} exchanges, {r.evaluations} passes, "
              f"{secs:.0f} s)",
              flush=True)
    return {"model": name, "fp32": fp32, "rows": rows, "seconds_sensitivity": t_sens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20", help="comma list, e.g. resnet20,resnet56")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--compressions", default="6,8,10.666666666666666,12.8")
    p.add_argument("--hessian-samples", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--refine-samples", type=int, default=1024)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--probe-mode", default="joint", choices=["joint", "layer"],
                   help="Hutchinson probes for the hybrid's traces (joint: the library default)")
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="benchmarks/results/refinement.json")
    args = p.parse_args()
    args.bits = [int(b) for b in args.bits.split(",")]
    args.compressions = [float(c) for c in args.compressions.split(",")]
    torch.set_num_threads(args.threads)
    test = load_cifar10(args.data_dir, "test", args.test_samples)
    n_cal = max(args.calib_samples, args.hessian_samples)
    train = load_cifar10(args.data_dir, "train", n_cal + args.refine_samples)
    calib = torch.utils.data.TensorDataset(*(t[:n_cal] for t in train.tensors))
    held = train.tensors[0][n_cal:]
    results = [run_model(m, args, test, calib, held) for m in args.models.split(",")]
    header = ["model", "compr.", "FP32", "hybrid ILP", "refined", "held-out KL", "test KL",
              "exchanges"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        for row in r["rows"]:
            print(f"| {r['model']} | {row['compression']:.2f}x | {100 * r['fp32']:.2f} | "
                  f"{100 * row['hybrid ilp']:.2f} | {100 * row['refined']:.2f} | "
                  f"{row['kl_start']:.4f} -> {row['kl_refined']:.4f} | "
                  f"{row['test_kl_start']:.4f} -> {row['test_kl_refined']:.4f} | "
                  f"{row['exchanges']} |")
    write_json(args.json, {"args": vars(args), "results": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
