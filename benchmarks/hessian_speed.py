"""Per-layer Hessian traces on ResNet-20 / CIFAR-10: hawq vs PyHessian vs the autograd floor.

One run, the same test images and the same probe count for everyone (tol=0: nobody stops early):

* hawq joint: ``analyze(metric="trace", tol=0)``: one graph, one HVP per probe for all layers.
* hawq layer: ``probe_mode="layer"``: one graph, one block product H_ii v_i per layer per probe.
* PyHessian (``pip install pyhessian``) the way HAWQ users run it per layer: one ``hessian``
  object per layer with every other parameter frozen, its own ``trace(maxIter=probes)`` loop.
* floor: one forward + create_graph backward, then one plain double-backward per probe for all
  layers (the least any one-HVP-per-probe method can cost).
* Fisher: the exact empirical-Fisher trace from per-sample gradients (no probes).

Each method runs in its own subprocess (so ``ru_maxrss`` is that method's peak memory), the
repeats are interleaved (ours, floor, PyHessian, ...) so load from other processes hits all of
them alike, and times are medians. Because joint probes have larger per-layer variance (the
cross-layer terms), the script also projects the cost of reaching the *same* relative standard
error on every layer from the measured per-probe times and per-layer sample variances.

    python benchmarks/hessian_speed.py            # writes benchmarks/results/hessian_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAIN_METHODS = ("ours", "floor", "pyhessian")
EXTRA_METHODS = ("ours_layer", "ours_vectorized", "fisher")


def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    from hawq.feed.data import load_cifar10
    from hawq.modules.models import build_model

    model = build_model("resnet20", pretrained=True, data_dir=args.data_dir).eval()
    x, y = load_cifar10(args.data_dir, split="test", limit=args.samples).tensors
    return model, x, y


def worker(args) -> dict:
    """Run one method once; returns its timing, per-layer samples and peak RSS."""
    import torch
    import torch.nn as nn

    from hawq.analysis.hessian import analyze, select_layers

    model, x, y = _setup(args)
    names = [n for n, _ in select_layers(model)]
    P, seed, out = args.probes, args.seed, {"method": args.worker}
    if args.worker in ("ours", "ours_layer", "ours_vectorized"):
        kw = {"ours": {}, "ours_layer": {"probe_mode": "layer"},
              "ours_vectorized": {"probe_batch": 4, "vectorized": True}}[args.worker]
        t = time.perf_counter()
        res = analyze(model, (x, y), metric="trace", tol=0.0, max_probes=P, seed=seed, **kw)
        out["seconds"] = time.perf_counter() - t
        out["trace"] = [lh.trace for lh in res.layers]
        out["stderr"] = [lh.stderr for lh in res.layers]
        out["probes"] = [lh.probes for lh in res.layers]
        out["hvp_count"] = res.hvp_count
        if args.worker == "ours_layer":  # untimed: the cost of one block product per layer
            from hawq.analysis.hessian import HessianOperator, as_batches

            mods = select_layers(model)
            op = HessianOperator(model, mods, as_batches((x, y)), nn.CrossEntropyLoss())
            gen = torch.Generator().manual_seed(seed)
            out["block_seconds"] = []
            for i, (_, m) in enumerate(mods):
                v = torch.randint(0, 2, m.weight.shape, generator=gen).float() * 2 - 1
                ts = []
                for _ in range(2):
                    t = time.perf_counter()
                    op.block_hvp(i, v)
                    ts.append(time.perf_counter() - t)
                out["block_seconds"].append(min(ts))
    elif args.worker == "floor":
        params = [dict(model.named_modules())[n].weight for n in names]
        gen = torch.Generator().manual_seed(seed)
        t = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(P):
            vs = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
            torch.autograd.grad(g, params, vs, retain_graph=True)
        out["seconds"] = time.perf_counter() - t
    elif args.worker == "pyhessian":
        from pyhessian import hessian

        torch.manual_seed(seed)
        mods = dict(model.named_modules())
        samples, per_layer = [], []
        t = time.perf_counter()
        for name in names:
            tl = time.perf_counter()
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            mods[name].weight.requires_grad_(True)
            h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            # tol=-inf: PyHessian's test abs(..)/(trace + 1e-6) < tol is never true (tol=0 would
            # still stop early whenever the running trace is negative)
            samples.append([float(s) for s in h.trace(maxIter=P, tol=float("-inf"))])
            del h
            mods[name].weight.grad = None
            per_layer.append(time.perf_counter() - tl)
        out["seconds"] = time.perf_counter() - t
        out["layer_seconds"] = per_layer
        arr = [np.array(s) for s in samples]
        out["trace"] = [float(a.mean()) for a in arr]
        out["stderr"] = [float(a.std(ddof=1) / np.sqrt(len(a))) for a in arr]
        out["probes"] = [len(a) for a in arr]
    elif args.worker == "fisher":
        t = time.perf_counter()
        res = analyze(model, (x, y), metric="fisher")
        out["seconds"] = time.perf_counter() - t
        out["trace"] = [lh.trace for lh in res.layers]
    elif args.worker != "baseline":
        raise SystemExit(f"unknown worker {args.worker!r}")
    out["names"] = names
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_worker(args, method: str, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--seed", str(seed),
           "--probes", str(args.probes), "--samples", str(args.samples),
           "--threads", str(args.threads), "--data-dir", str(args.data_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(line[-1][7:])
    print(f"  {method:16s} seed {seed}: {res.get('seconds', 0):7.2f} s, peak RSS "
          f"{res['peak_rss_mb']:.0f} MB", flush=True)
    return res


def _pool(runs: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and standard error over all samples of repeated runs (equal probes per run)."""
    tr = np.array([r["trace"] for r in runs])
    se = np.array([r["stderr"] for r in runs])
    n = len(runs)
    return tr.mean(0), np.sqrt((se**2).sum(0)) / n, n * runs[0]["probes"][0]


def summarise(args, runs: dict[str, list[dict]]) -> dict:
    from scipy.stats import spearmanr

    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items() if rs
           and m != "baseline"}
    P = args.probes
    names = runs["ours"][0]["names"]
    L = len(names)
    out = {"model": "resnet20", "samples": args.samples, "probes": P, "layers": L,
           "threads": args.threads, "repeats": args.repeats, "extra_repeats": args.extra_repeats,
           "seconds": {m: [r["seconds"] for r in rs] for m, rs in runs.items() if m != "baseline"},
           "median_seconds": med,
           "per_probe_seconds": {m: med[m] / P for m in med if m != "fisher"},
           "peak_rss_mb": {m: max(r["peak_rss_mb"] for r in rs) for m, rs in runs.items()},
           "probes_per_layer": {m: rs[0]["probes"] for m, rs in runs.items() if "probes" in rs[0]}}
    out["ours_over_floor"] = med["ours"] / med["floor"]
    ours_m, ours_se, ours_n = _pool(runs["ours"])
    per_layer = [{"name": n, "ours_trace": float(a), "ours_stderr": float(s)}
                 for n, a, s in zip(names, ours_m, ours_se)]
    est = {"ours": (ours_m, ours_se, ours_n)}
    for m in ("pyhessian", "ours_layer"):
        if runs.get(m):
            est[m] = _pool(runs[m])
            for row, a, s in zip(per_layer, *est[m][:2]):
                row[f"{m}_trace"], row[f"{m}_stderr"] = float(a), float(s)
    if "pyhessian" in med:
        ph_m, ph_se, _ = est["pyhessian"]
        rel = np.abs(ours_m - ph_m) / np.abs(ph_m)
        z = (ours_m - ph_m) / np.sqrt(ours_se**2 + ph_se**2)
        out |= {"speedup_vs_pyhessian": med["pyhessian"] / med["ours"],
                "pyhessian_over_floor": med["pyhessian"] / med["floor"],
                "rel_diff_vs_pyhessian_median": float(np.median(rel)),
                "rel_diff_vs_pyhessian_max": float(rel.max()),
                "z_vs_pyhessian_abs_max": float(np.abs(z).max()),
                "layers_within_2se_of_pyhessian": int((np.abs(z) <= 2).sum()),
                "spearman_vs_pyhessian": float(spearmanr(ours_m, ph_m)[0])}
        for row, r, zz in zip(per_layer, rel, z):
            row["rel_diff_vs_pyhessian"], row["z_vs_pyhessian"] = float(r), float(zz)
    # equal-error projection: probes needed for layer i to reach relative stderr e is
    # var_i / (e * trace_i)^2 with var_i = n * stderr_i^2 the per-probe variance. Joint probes
    # sample every layer every round, so their cost is set by the worst layer; per-layer
    # probing (hawq layer mode, PyHessian per layer) stops each layer on its own: a sum.
    ref = np.mean([e[0] for e in est.values()], axis=0)  # pooled trace for the denominators
    need = {m: e[2] * e[1]**2 / ref**2 for m, e in est.items()}  # probes for rel. stderr 1
    proj = {"ours": med["ours"] / P * float(need["ours"].max())}
    if "ours_layer" in need:
        bt = np.array(runs["ours_layer"][0]["block_seconds"])
        out["block_seconds"] = bt.tolist()
        proj["ours_layer"] = float((bt * need["ours_layer"]).sum())
    if "pyhessian" in need:
        lt = np.median([r["layer_seconds"] for r in runs["pyhessian"]], axis=0) / P
        proj["pyhessian"] = float((lt * need["pyhessian"]).sum())
        out["equal_error_speedup_vs_pyhessian"] = proj["pyhessian"] / proj["ours"]
        if "ours_layer" in proj:
            out["equal_error_speedup_layer_mode_vs_pyhessian"] = proj["pyhessian"] / proj["ours_layer"]
    out["equal_error_relative_cost"] = {m: c / proj["ours"] for m, c in proj.items()}
    out["equal_error_seconds_at_rel_stderr_1"] = proj  # divide by e^2 for relative stderr e
    out["probes_needed_for_rel_stderr_1"] = {m: v.tolist() for m, v in need.items()}
    out["variance_ratio_joint_over_per_layer"] = (
        [float(a / b) for a, b in zip(need["ours"], need["pyhessian"])] if "pyhessian" in need
        else None)
    if "fisher" in med:
        fisher = np.array(runs["fisher"][0]["trace"])
        out["fisher_over_hutchinson"] = med["fisher"] / med["ours"]
        out["spearman_fisher_vs_hessian"] = float(spearmanr(fisher, ref)[0])
        for row, f in zip(per_layer, fisher):
            row["fisher_trace"] = float(f)
    out["spearman_pooled_reference"] = "mean of the hawq joint, hawq layer and PyHessian estimates"
    out["per_layer"] = per_layer
    return out


def print_table(o: dict) -> None:
    P, pp, rss = o["probes"], o["per_probe_seconds"], o["peak_rss_mb"]
    print(f"\nResNet-20, {o['samples']} CIFAR-10 test images, {P} probes, {o['layers']} layers, "
          f"{o['threads']} threads; medians of {o['repeats']} runs "
          f"({o['extra_repeats']} for the extra rows)")
    print("| method | s per probe (all layers) | vs floor | vs hawq joint | peak RSS MB |")
    print("|---|---|---|---|---|")
    labels = {"floor": "floor (1 double-backward/probe)", "ours": "hawq joint (default)",
              "ours_vectorized": "hawq joint, vectorized x4", "ours_layer": "hawq probe_mode=layer",
              "pyhessian": "PyHessian per layer"}
    for m, lab in labels.items():
        if m in pp:
            print(f"| {lab} | {pp[m]:.3f} | {pp[m] / pp['floor']:.2f} | {pp[m] / pp['ours']:.2f} "
                  f"| {rss[m]:.0f} |")
    print(f"| (model + data loaded, nothing else) | | | | {rss['baseline']:.0f} |")
    if "speedup_vs_pyhessian" in o:
        print(f"\nPyHessian / hawq joint at equal probes: {o['speedup_vs_pyhessian']:.2f}x; "
              f"hawq joint / floor: {o['ours_over_floor']:.2f}x")
        print(f"agreement with PyHessian (pooled over repeats): median relative difference "
              f"{o['rel_diff_vs_pyhessian_median']:.3f} (max {o['rel_diff_vs_pyhessian_max']:.3f}),"
              f" {o['layers_within_2se_of_pyhessian']}/{o['layers']} layers within 2 combined "
              f"stderr (max |z| {o['z_vs_pyhessian_abs_max']:.2f}), Spearman "
              f"{o['spearman_vs_pyhessian']:.3f}")
        vr = np.array(o["variance_ratio_joint_over_per_layer"])
        print(f"per-probe variance, joint / per-layer probing: median {np.median(vr):.2f}, "
              f"max {vr.max():.1f}")
        print("projected cost to reach the same relative stderr on every layer, relative to "
              "hawq joint: " + ", ".join(f"{m} {c:.3f}" for m, c in
                                         o["equal_error_relative_cost"].items()))
        print("projected seconds to reach 10% relative stderr on every layer: " + ", ".join(
            f"{m} {c * 100:.0f}" for m, c in o["equal_error_seconds_at_rel_stderr_1"].items()))
    else:
        print(f"\nhawq joint / floor: {o['ours_over_floor']:.2f}x")
    if "fisher_over_hutchinson" in o:
        print(f"Fisher trace (exact, per-sample grads): {o['median_seconds']['fisher']:.2f} s = "
              f"{o['fisher_over_hutchinson']:.3f}x the hawq joint run; Spearman with the Hessian "
              f"trace across layers {o['spearman_fisher_vs_hessian']:.3f}")
    print("\n| layer | hawq joint | hawq layer | PyHessian | Fisher |\n|---|---|---|---|---|")
    for r in o["per_layer"]:
        cells = [f"{r[k + '_trace']:.3g} ± {r[k + '_stderr']:.2g}" if k + "_trace" in r else "-"
                 for k in ("ours", "ours_layer", "pyhessian")]
        fisher = f"{r['fisher_trace']:.3g}" if "fisher_trace" in r else "-"
        print(f"| {r['name']} | " + " | ".join(cells) + f" | {fisher} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    env = os.environ.get("HAWQ_DATA")
    p.add_argument("--data-dir", default=env or str(ROOT.parent / "shared" / "data"))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (medians quoted)")
    p.add_argument("--extra-repeats", type=int, default=1,
                   help="repeats for the extra rows (layer mode, vectorized, Fisher)")
    p.add_argument("--skip-pyhessian", action="store_true")
    p.add_argument("--skip-extras", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "hessian_speed.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    main_methods = [m for m in MAIN_METHODS if not (m == "pyhessian" and args.skip_pyhessian)]
    runs: dict[str, list[dict]] = {m: [] for m in ("baseline", *main_methods)}
    runs["baseline"].append(run_worker(args, "baseline", 0))
    for r in range(max(args.repeats, args.extra_repeats if not args.skip_extras else 0)):
        todo = (main_methods if r < args.repeats else []) + (
            list(EXTRA_METHODS) if not args.skip_extras and r < args.extra_repeats else [])
        for m in todo:
            runs.setdefault(m, []).append(run_worker(args, m, r))
    out = summarise(args, runs)
    print_table(out)
    from hawq.base.io import write_json

    write_json(args.json, out)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
