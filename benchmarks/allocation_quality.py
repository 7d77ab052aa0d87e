"""Post-training plan quality on CIFAR-10 ResNets: Hessian plans vs uniform vs random plans.

For each weight-compression target (bits {2,3,4,8}, weights only, activations float, the same
symmetric per-channel quantizer for every plan, no fine-tuning) it evaluates on the CIFAR-10
test set: the HAWQ-V1 rule, HAWQ-V2 Omega on the Pareto frontier and by ILP, the ``hybrid``
sensitivity by ILP, the library's default method (that hybrid ILP plan, refined by
:func:`hawq.post.refine.refine_plan` on ``--refine-samples`` held-out training images when it averages
at most ``AUTO_REFINE_MAX_BITS`` bits, as ``hawq compress`` does), the uniform plan where one has
that size, and the median of 10 random plans of the same budget (an ILP over random costs). It also reports the Spearman rank
correlation of predicted Omega with the measured single-layer loss increase.

By default the Hessian traces follow PyHessian's per-layer protocol, as the HAWQ-V2 reference
figures do: 256 training images, 20 Rademacher probes per layer, each layer probed alone
(``--probe-mode layer``, 20·L block HVPs). ``--probe-mode joint`` uses 20 joint probes instead
(20 HVPs for all layers, noisier per layer).

    python benchmarks/allocation_quality.py --models resnet20 --json benchmarks/results/allocation_quality.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

import hawq
from hawq.maths.allocation import allocate
from hawq.maths.budgets import Budget
from hawq.feed.data import load_cifar10
from hawq.base.io import write_json
from hawq.modules.models import build_model
from hawq.post.refine import auto_refines, refine_plan
from hawq.analysis.sensitivities import sensitivity_costs
from hawq.analysis.sensitivity import omega_matrix


def accuracy(model_name, data_dir, names, wbits, test, quant):
    model = build_model(model_name, data_dir=data_dir)
    hawq.quantize_(model, hawq.BitPlan({n: hawq.LayerSpec(int(b), 32)
                                        for n, b in zip(names, wbits)}), quant)
    return hawq.evaluate(model, test).accuracy


def run_model(name, args, test, calib, held):
    quant = hawq.QuantConfig(w_clip=args.w_clip)
    model = build_model(name, data_dir=args.data_dir)
    infos = hawq.layers(model, test.tensors[0][:1])
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)
    bits = np.array(args.bits)
    t = time.perf_counter()
    # the library's hybrid: max(HAWQ-V2 Omega, measured single-layer loss increase), with the
    # Hessian on the first hessian_samples calibration images and the losses on all of them
    omega_hybrid, hy = sensitivity_costs(model, calib, names, tuple(args.bits), "hybrid", quant,
                                         hessian_samples=args.hessian_samples,
                                         max_probes=args.probes, tol=0.0, seed=args.seed,
                                         probe_mode=args.probe_mode)
    t_hybrid = time.perf_counter() - t
    # HAWQ-V2's Omega from the same traces and weight errors
    omega_v2 = omega_matrix([lh["avg_trace"] for lh in hy["hessian"]["layers"]],
                            np.array(hy["weight_errors"]))
    measured = np.array(hy["measured"])
    t = time.perf_counter()
    _, v1 = sensitivity_costs(model, calib, names, tuple(args.bits), "hawq-v1", quant,
                              hessian_samples=args.hessian_samples, seed=args.seed)
    t_eig = time.perf_counter() - t
    lam = np.array([lh["eigenvalue"] if np.isscalar(lh["eigenvalue"]) else lh["eigenvalue"][0]
                    for lh in v1["hessian"]["layers"]])
    low = bits < 8
    rho_v2 = spearmanr(omega_v2[:, low].ravel(), measured[:, low].ravel())[0]
    rho_hy = spearmanr(omega_hybrid[:, low].ravel(), measured[:, low].ravel())[0]
    fp32 = hawq.evaluate(model, test).accuracy
    rows = []
    rng = np.random.default_rng(args.seed)
    for comp in args.compressions:
        budget = Budget("compression", comp)
        plans = {
            "hawq-v1 rule": allocate(np.array(v1["omega"]), params, bits, budget, "v1-rule",
                                     sensitivity=lam / params).bits,
            "hawq-v2 frontier": allocate(omega_v2, params, bits, budget, "frontier").bits,
            "hawq-v2 ilp": allocate(omega_v2, params, bits, budget, "ilp").bits,
        }
        start = allocate(omega_hybrid, params, bits, budget, "ilp")
        plans["hybrid ilp"] = start.bits
        refined = auto_refines(start.bits, params)
        if refined:
            plans["default"] = refine_plan(model, held, names, bits, omega_hybrid, start.choices,
                                           params, budget, candidates=args.refine_candidates,
                                           config=quant).bits
        row = {"compression": comp}
        for label, wb in plans.items():
            row[label] = accuracy(name, args.data_dir, names, wb, test, quant)
            row[label + " bits"] = [int(b) for b in wb]
        if not refined:
            row["default"], row["default bits"] = row["hybrid ilp"], row["hybrid ilp bits"]
        row["default refined"] = refined
        uni = 32.0 / comp
        row["uniform"] = (accuracy(name, args.data_dir, names, [int(uni)] * len(names), test,
                                   quant) if abs(uni - round(uni)) < 1e-6 and round(uni) in bits
                          else None)
        rand = []
        for _ in range(args.random_plans):
            wb = allocate(rng.random((len(names), len(bits))), params, bits, budget, "ilp").bits
            rand.append(accuracy(name, args.data_dir, names, wb, test, quant))
        row["random median"] = float(np.median(rand)) if rand else None
        rows.append(row)
        print(f"{name} {comp:6.2f}x  " + "  ".join(
            f"{k}={100 * v:.2f}" for k, v in row.items()
            if isinstance(v, float) and k != "compression"), flush=True)
    return {"model": name, "fp32": fp32, "rows": rows, "spearman_v2_vs_measured": rho_v2,
            "spearman_hybrid_vs_measured": rho_hy,
            "seconds": {"hybrid (trace + measured)": t_hybrid, "eigen": t_eig,
                        "trace": hy["hessian"]["seconds"]},
            "hvp_trace": hy["hessian"]["hvp_count"], "hvp_eigen": v1["hessian"]["hvp_count"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20", help="comma list, e.g. resnet20,resnet56")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--compressions", default="6,8,10.666666666666666,12.8")
    p.add_argument("--hessian-samples", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--probe-mode", default="layer", choices=["layer", "joint"],
                   help="Hutchinson probes per layer (PyHessian's protocol: "
                        "probes x layers HVPs) or one joint probe for all layers")
    p.add_argument("--refine-samples", type=int, default=1024,
                   help="held-out training images (after the calibration ones) for refinement")
    p.add_argument("--refine-candidates", type=int, default=16)
    p.add_argument("--random-plans", type=int, default=10)
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--w-clip", default="minmax", choices=["minmax", "mse"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="benchmarks/results/allocation_quality.json")
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
    header = ["model", "compr.", "V1 rule", "V2 front.", "V2 ILP", "hybrid ILP",
              "default (+auto refine)", "uniform", "random med."]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        for row in r["rows"]:
            cells = [r["model"], f"{row['compression']:.2f}x"] + [
                "-" if row[k] is None else f"{100 * row[k]:.2f}" for k in
                ("hawq-v1 rule", "hawq-v2 frontier", "hawq-v2 ilp", "hybrid ilp", "default",
                 "uniform", "random median")]
            print("| " + " | ".join(cells) + " |")
        print(f"{r['model']}: FP32 {100 * r['fp32']:.2f}%; Spearman(Omega_v2, measured dL) = "
              f"{r['spearman_v2_vs_measured']:.3f}, hybrid {r['spearman_hybrid_vs_measured']:.3f}")
    write_json(args.json, {"args": vars(args), "results": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
