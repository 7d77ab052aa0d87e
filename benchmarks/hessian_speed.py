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

Equal-precision table (``--precision``, issue 32): wall time until every layer's trace has a
relative standard error <= each target (5% and 2%) on the same 128 test images, 2 threads:

* hawq default: ``analyze(metric="trace", tol=e, max_probes=2000)`` (probe_mode "auto", i.e. the
  Gauss-Newton route: exact GN trace from per-sample gradients + per-layer Hutchinson on the
  remainder H_ii - GN_ii, which is exactly 0 on ReLU ResNets);
* hawq per layer: the same with ``probe_mode="layer"``;
* PyHessian per layer: one ``hessian`` object per layer (other weights frozen), ``trace`` adding
  10 probes at a time until that layer's stderr <= e |mean| (2000 probes at most per layer).

Each (method, target, repeat) is one subprocess (peak RSS is its own) and one JSON row, written
as it completes; rows already in the file are kept (a rerun resumes). Methods or targets whose
run would not fit the time budget are given as *projections* from a measured run's per-layer
sample variances and per-probe times (marked ``projected``). Agreement: every method's traces
against the hawq default's (exact on this ReLU network: the remainder samples are exactly 0),
max relative difference and max |z| in combined standard errors.

    python benchmarks/hessian_speed.py --precision   # benchmarks/results/hessian_speed_precision.json
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
    elif args.worker.startswith("prec_"):
        out |= precision_worker(args, model, x, y, names)
    elif args.worker != "baseline":
        raise SystemExit(f"unknown worker {args.worker!r}")
    out["names"] = names
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


PREC_LABELS = {"prec_hawq": "hawq default (auto: Gauss-Newton + remainder)",
               "prec_layer": "hawq probe_mode=layer", "prec_pyhessian": "PyHessian per layer"}


def precision_worker(args, model, x, y, names) -> dict:
    """One equal-precision run: until every layer's relative stderr <= args.target."""
    import torch
    import torch.nn as nn

    from hawq.analysis.hessian import analyze

    e, seed, cap = args.target, args.seed, args.max_probes
    out: dict = {"target": e}
    if args.worker in ("prec_hawq", "prec_layer"):
        kw = {} if args.worker == "prec_hawq" else {"probe_mode": "layer"}
        t = time.perf_counter()
        res = analyze(model, (x, y), metric="trace", tol=e, max_probes=cap, seed=seed, **kw)
        out["seconds"] = time.perf_counter() - t
        out["trace"] = [lh.trace for lh in res.layers]
        out["stderr"] = [lh.stderr for lh in res.layers]
        out["probes"] = [lh.probes for lh in res.layers]
        out["route"] = res.layers[0].route
        out["hvp_count"] = res.hvp_count
        return out
    from pyhessian import hessian

    torch.manual_seed(seed)
    mods = dict(model.named_modules())
    tr, se, probes, per_layer = [], [], [], []
    t = time.perf_counter()
    for name in names:
        tl = time.perf_counter()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        mods[name].weight.requires_grad_(True)
        h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        samples: list[float] = []
        while len(samples) < cap:
            samples += [float(s) for s in h.trace(maxIter=10, tol=float("-inf"))]
            a = np.array(samples)
            if a.std(ddof=1) / np.sqrt(len(a)) <= e * abs(a.mean()):
                break
        del h
        mods[name].weight.grad = None
        a = np.array(samples)
        tr.append(float(a.mean()))
        se.append(float(a.std(ddof=1) / np.sqrt(len(a))))
        probes.append(len(a))
        per_layer.append(time.perf_counter() - tl)
    out["seconds"] = time.perf_counter() - t
    out |= {"trace": tr, "stderr": se, "probes": probes, "layer_seconds": per_layer}
    return out


def precision_main(args) -> None:
    """The equal-precision table: rows resumed from / appended to ``args.precision_json``."""
    from hawq.base.io import read_json, write_json

    path = Path(args.precision_json)
    doc = read_json(path, "precision results") if path.exists() else {}
    if doc.get("samples", args.samples) != args.samples:
        raise SystemExit(f"{path} holds a run on {doc['samples']} samples: give --precision-json")
    doc |= {"model": "resnet20", "samples": args.samples, "threads": args.threads,
            "max_probes": args.max_probes}
    rows = doc.setdefault("rows", [])
    done = {(r["method"], r["target"], r["repeat"]) for r in rows}
    plan = []  # interleaved: repeat 0 of everything first
    for rep_ in range(max(args.prec_repeats, 1)):
        for m in args.prec_methods.split(","):
            for e in [float(v) for v in args.targets.split(",")]:
                full = m == "prec_hawq" or e == max(float(v) for v in args.targets.split(","))
                if (m == "prec_hawq" and rep_ < args.prec_repeats) or (rep_ == 0 and full):
                    plan.append((m, e, rep_))
    for m, e, rep_ in plan:
        if (m, e, rep_) in done:
            continue
        cmd = [sys.executable, __file__, "--worker", m, "--seed", str(rep_), "--target", str(e),
               "--max-probes", str(args.max_probes), "--samples", str(args.samples),
               "--threads", str(args.threads), "--data-dir", str(args.data_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{m} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(line[-1][7:]) | {"method": m, "target": e, "repeat": rep_}
        rows.append(row)
        print(f"  {m:15s} target {e:.2f} repeat {rep_}: {row['seconds']:7.1f} s, "
              f"{sum(row['probes'])} layer-probes, peak RSS {row['peak_rss_mb']:.0f} MB",
              flush=True)
        doc["summary"] = precision_summary(doc)
        write_json(path, doc)
    doc["summary"] = precision_summary(doc)
    write_json(path, doc)
    print_precision(doc)
    print(f"\nwrote {path}")


def precision_summary(doc: dict) -> dict:
    """Per (method, target): median seconds (or a projection), peak RSS, worst relative stderr,
    agreement with the hawq default's traces; ratios against PyHessian."""
    rows = doc["rows"]
    targets = sorted({r["target"] for r in rows}, reverse=True)
    ref_rows = [r for r in rows if r["method"] == "prec_hawq"]
    ref = np.array(ref_rows[0]["trace"]) if ref_rows else None
    ref_se = np.array([s or 0.0 for s in ref_rows[0]["stderr"]]) if ref_rows else None
    out: dict = {"targets": targets, "methods": {}}
    for m in PREC_LABELS:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        res = {}
        for e in targets:
            rs = [r for r in mine if r["target"] == e]
            cell: dict = {}
            if rs:
                tr = np.array(rs[0]["trace"])
                se = np.array([s or 0.0 for s in rs[0]["stderr"]])
                cell = {"seconds": statistics.median(r["seconds"] for r in rs),
                        "runs": [r["seconds"] for r in rs], "projected": False,
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                        "layer_probes": sum(rs[0]["probes"]),
                        "worst_rel_stderr": float((se / np.abs(tr)).max())}
                if ref is not None:
                    rel = np.abs(tr - ref) / np.abs(ref)
                    z = (tr - ref) / np.sqrt(se**2 + ref_se**2 + 1e-30)
                    cell |= {"max_rel_diff_vs_hawq": float(rel.max()),
                             "max_abs_z_vs_hawq": float(np.abs(z).max()),
                             "layers_within_3se": int((np.abs(z) <= 3).sum())}
            else:  # project from the loosest measured target of this method
                src = [r for r in mine if r["target"] == max(r["target"] for r in mine)][0]
                tr = np.abs(np.array(src["trace"]))
                n = np.array(src["probes"], dtype=float)
                var = n * np.array([s or 0.0 for s in src["stderr"]]) ** 2  # per-probe variance
                need = np.maximum(np.ceil(var / (e * tr) ** 2), 2)
                if m == "prec_pyhessian":
                    need = np.ceil(need / 10) * 10
                    per = np.array(src["layer_seconds"]) / n
                    secs = float((per * need).sum())
                else:
                    secs = float(src["seconds"] / n.sum() * need.sum())
                cell = {"seconds": secs, "projected": True, "layer_probes": int(need.sum()),
                        "peak_rss_mb": src["peak_rss_mb"],
                        "note": f"projected from the {src['target']:.0%} run's per-layer "
                                "variances and per-probe times"}
            res[f"{e:g}"] = cell
        out["methods"][m] = res
    ph = out["methods"].get("prec_pyhessian", {})
    for m, res in out["methods"].items():
        for e, cell in res.items():
            if e in ph:
                cell["pyhessian_over_this"] = ph[e]["seconds"] / cell["seconds"]
                cell["rss_over_pyhessian"] = cell["peak_rss_mb"] / ph[e]["peak_rss_mb"]
    return out


def print_precision(doc: dict) -> None:
    s = doc["summary"]
    print(f"\nEqual precision: ResNet-20, {doc['samples']} CIFAR-10 test images, "
          f"{doc['threads']} threads; seconds until every layer's relative stderr <= target")
    print("| method | target | seconds | PyHessian / this | layer-probes | worst rel. stderr | "
          "max rel. diff vs hawq | max abs z | peak RSS MB (x PyHessian) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, res in s["methods"].items():
        for e, c in res.items():
            secs = f"{c['seconds']:.1f}" + (" (projected)" if c["projected"] else
                                            f" (median of {len(c['runs'])})")
            ratio = f"{c['pyhessian_over_this']:.1f}x" if "pyhessian_over_this" in c else "-"
            wr = f"{c['worst_rel_stderr']:.3f}" if "worst_rel_stderr" in c else "-"
            rd = f"{c['max_rel_diff_vs_hawq']:.3f}" if "max_rel_diff_vs_hawq" in c else "-"
            zz = f"{c['max_abs_z_vs_hawq']:.2f}" if "max_abs_z_vs_hawq" in c else "-"
            rss = (f"{c['peak_rss_mb']:.0f} ({c['rss_over_pyhessian']:.2f})"
                   if "rss_over_pyhessian" in c else f"{c['peak_rss_mb']:.0f}")
            print(f"| {PREC_LABELS[m]} | {float(e):.0%} | {secs} | {ratio} | {c['layer_probes']} "
                  f"| {wr} | {rd} | {zz} | {rss} |")


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
    p.add_argument("--samples", type=int, default=None, help="default 256 (128 with --precision)")
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (medians quoted)")
    p.add_argument("--extra-repeats", type=int, default=1,
                   help="repeats for the extra rows (layer mode, vectorized, Fisher)")
    p.add_argument("--skip-pyhessian", action="store_true")
    p.add_argument("--skip-extras", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "hessian_speed.json"))
    p.add_argument("--precision", action="store_true",
                   help="the equal-precision table instead (issue 32; default --samples 128)")
    p.add_argument("--targets", default="0.05,0.02", help="relative stderr targets")
    p.add_argument("--prec-methods", default="prec_hawq,prec_pyhessian,prec_layer")
    p.add_argument("--prec-repeats", type=int, default=3,
                   help="repeats of the hawq default (PyHessian and hawq layer: one run at the "
                        "loosest target, the others projected)")
    p.add_argument("--max-probes", type=int, default=2000, help="probes per layer at most")
    p.add_argument("--precision-json", default=str(ROOT / "benchmarks" / "results"
                                                    / "hessian_speed_precision.json"))
    p.add_argument("--target", type=float, default=0.05, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.samples is None:
        args.samples = 128 if args.precision or (args.worker or "").startswith("prec_") else 256
    if args.precision and not args.worker:
        precision_main(args)
        return
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
