"""Empirical bias correction on the post-training plans of ``allocation_quality.py``.

Takes the bit plans stored in an ``allocation_quality`` JSON (the hybrid ILP plan, the default
auto-refined one where refinement applied, HAWQ-V2 by ILP, the uniform plan where one exists) and evaluates each on the 10,000 CIFAR-10 test images twice, with
the same symmetric per-channel min/max weight quantizer (weights only, no fine-tuning): as it is,
and after :func:`hawq.bias_correct_` on 512 training images. Prints a table and writes JSON.

    python benchmarks/bias_correction.py --plans benchmarks/results/allocation_quality_joint.json \
        --json benchmarks/results/bias_correction.json
    python benchmarks/bias_correction.py --plans benchmarks/results/allocation_quality_resnet56_joint.json \
        --compressions 8,10.67 --json benchmarks/results/bias_correction_resnet56.json
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import hawq
from hawq.maths.allocation import allocate
from hawq.maths.budgets import Budget
from hawq.feed.data import load_cifar10
from hawq.base.io import read_json, write_json
from hawq.analysis.sensitivities import sensitivity_costs
from hawq.analysis.sensitivity import omega_matrix
from hawq.modules.models import build_model

# stored plan key -> label; a key a row lacks is skipped (older allocation_quality JSONs have
# "hybrid ilp (default)", newer ones "hybrid ilp" and, where auto-refine applied, "default")
LABELS = {"hybrid ilp (default)": "hybrid (default)", "hybrid ilp": "hybrid ilp",
          "default": "default (auto-refined)", "hawq-v2 ilp": "hawq-v2", "uniform": "uniform"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", default="benchmarks/results/allocation_quality_joint.json")
    p.add_argument("--compressions", default=None, help="comma list (default: all in --plans)")
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--test-samples", type=int, default=None, help="default: all 10,000")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--aware", action="store_true",
                   help="also plan with the sensitivity measured after bias correction: ILP on "
                        "max(HAWQ-V2 Omega, bias-corrected single-layer losses): the library's "
                        "hybrid with bias_correct=True, its Hessian as in --plans (256 images, "
                        "20 probes, that file's probe mode)")
    p.add_argument("--json", default="benchmarks/results/bias_correction.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    whole = read_json(args.plans, "allocation_quality results")
    src, src_args = whole["results"][0], whole["args"]
    name = src["model"]
    test = load_cifar10(args.data_dir, "test", args.test_samples)
    calib = load_cifar10(args.data_dir, "train", args.calib_samples)
    ref = build_model(name, data_dir=args.data_dir).eval()
    names = [i.name for i in hawq.layers(ref, test.tensors[0][:1])]
    want = None if args.compressions is None else [float(c) for c in args.compressions.split(",")]
    aware = {}
    if args.aware:
        t = time.perf_counter()
        params = np.array([i.params for i in hawq.layers(ref, test.tensors[0][:1])], dtype=float)
        bits = np.array(src_args["bits"])
        # the library's hybrid with the losses measured after bias correction
        omega_aware, hy = sensitivity_costs(
            ref, calib, names, tuple(src_args["bits"]), "hybrid", hawq.QuantConfig(),
            hessian_samples=src_args.get("hessian_samples", 256), max_probes=src_args["probes"],
            tol=0.0, seed=src_args["seed"], probe_mode=src_args.get("probe_mode") or "joint",
            bias_correct=True)
        omega_v2 = omega_matrix([lh["avg_trace"] for lh in hy["hessian"]["layers"]],
                                np.array(hy["weight_errors"]))
        for r in src["rows"]:
            comp = r["compression"]
            budget = Budget("compression", comp)
            aware[comp] = allocate(omega_aware, params, bits, budget, "ilp").bits
            same = [int(b) for b in allocate(omega_v2, params, bits, budget, "ilp").bits]
            print(f"{comp:.2f}x: recomputed HAWQ-V2 plan equals the stored one: "
                  f"{same == r['hawq-v2 ilp bits']}", flush=True)
        aware_seconds = time.perf_counter() - t
    rows = []
    for r in src["rows"]:
        comp = r["compression"]
        if want is not None and not any(abs(comp - c) < 0.01 for c in want):
            continue
        labels = dict(LABELS)
        if comp in aware:
            labels["aware"] = "hybrid, bias-aware"
        for key, label in labels.items():
            if key == "uniform":
                if r.get("uniform") is None:
                    continue
                bits = [round(32 / comp)] * len(names)
            elif key == "aware":
                bits = aware[comp]
            elif key == "default" and not r.get("default refined"):
                continue  # not refined: the same plan as "hybrid ilp"
            elif key + " bits" not in r:
                continue
            else:
                bits = r[key + " bits"]
            plan = hawq.BitPlan({n: hawq.LayerSpec(int(b), 32) for n, b in zip(names, bits)})
            m = build_model(name, data_dir=args.data_dir).eval()
            hawq.quantize_(m, plan)
            plain = hawq.evaluate(m, test).accuracy
            t = time.perf_counter()
            hawq.bias_correct_(m, ref, calib, max_samples=args.calib_samples)
            secs = time.perf_counter() - t
            corrected = hawq.evaluate(m, test).accuracy
            rows.append({"compression": comp, "plan": label, "bits": [int(b) for b in bits],
                         "plain": plain, "bias_corrected": corrected,
                         "bias_correct_seconds": secs})
            print(f"{name} {comp:6.2f}x {label:17s} plain {plain:.2%}  bias-corrected "
                  f"{corrected:.2%}  ({secs:.0f} s)", flush=True)
            write_json(args.json, {"command": " ".join(["python"] + sys.argv), "model": name,
                                   "fp32": src["fp32"], "plans_from": args.plans,
                                   "calib_samples": args.calib_samples, "rows": rows,
                                   "aware_plan_seconds": aware_seconds if aware else None,
                                   "seconds": time.perf_counter() - t_all})
    print(f"\n| {name} | plan | plain | bias-corrected |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['compression']:.2f}x | {r['plan']} | {r['plain']:.2%} | "
              f"{r['bias_corrected']:.2%} |")


if __name__ == "__main__":
    main()
