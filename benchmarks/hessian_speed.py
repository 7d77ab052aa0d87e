"""Per-layer Hessian traces on ResNet-20 / CIFAR-10: hawq vs PyHessian vs the autograd floor.

All in one run, same 256 test images, same probe count (tol=0, so nobody stops early):

* hawq: ``hawq.analyze(metric="trace")``: one graph, one HVP per probe for all layers.
* PyHessian (``pip install pyhessian``) used per layer as HAWQ users do: one ``hessian`` object
  per layer with every other parameter frozen, its own ``trace(maxIter=probes)`` loop.
* floor: one forward + create_graph backward, then one plain double-backward per probe.

Also: the exact empirical-Fisher trace (per-sample gradients) — its cost relative to Hutchinson
and its Spearman rank correlation with the Hessian trace across layers; peak RSS.

    python benchmarks/hessian_speed.py --json benchmarks/results/hessian_speed.json
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import spearmanr

from hawq.data import load_cifar10
from hawq.hessian import analyze, select_layers
from hawq.io import write_json
from hawq.models import build_model


def floor_time(model, x, y, params, probes, seed):
    gen = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    for _ in range(probes):
        vs = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
        torch.autograd.grad(g, params, vs, retain_graph=True)
    return time.perf_counter() - t


def pyhessian_traces(model, x, y, names, probes):
    from pyhessian import hessian

    mods = dict(model.named_modules())
    out = []
    t = time.perf_counter()
    for name in names:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        mods[name].weight.requires_grad_(True)
        h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        out.append(float(np.mean(h.trace(maxIter=probes, tol=0.0))))
        del h
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    return time.perf_counter() - t, np.array(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timing repeats for hawq/floor")
    p.add_argument("--pyhessian-repeats", type=int, default=1)
    p.add_argument("--skip-pyhessian", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="benchmarks/results/hessian_speed.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model("resnet20", data_dir=args.data_dir)
    x, y = load_cifar10(args.data_dir, "test", args.samples).tensors
    mods = select_layers(model, None)
    names = [n for n, _ in mods]
    params = [m.weight for _, m in mods]
    P = args.probes

    ours_t, ours = [], None
    for r in range(args.repeats):
        res = analyze(model, (x, y), metric="trace", tol=0.0, max_probes=P, seed=r)
        ours_t.append(res.seconds)
        ours = ours or res
    floor_t = [floor_time(model, x, y, params, P, r) for r in range(args.repeats)]
    t = time.perf_counter()
    fisher = analyze(model, (x, y), metric="fisher")
    fisher_t = time.perf_counter() - t
    tr = np.array([lh.trace for lh in ours.layers])
    se = np.array([lh.stderr for lh in ours.layers])
    out = {"samples": args.samples, "probes": P, "layers": len(names), "threads": args.threads,
           "hawq_seconds": ours_t, "floor_seconds": floor_t,
           "hawq_per_probe": statistics.median(ours_t) / P,
           "floor_per_probe": statistics.median(floor_t) / P,
           "hawq_over_floor": statistics.median(ours_t) / statistics.median(floor_t),
           "fisher_seconds": fisher_t,
           "fisher_over_hutchinson": fisher_t / statistics.median(ours_t),
           "spearman_fisher_vs_hessian": float(spearmanr([lh.trace for lh in fisher.layers],
                                                         tr)[0]),
           "per_layer": [{"name": n, "hawq_trace": float(a), "hawq_stderr": float(s),
                          "fisher_trace": float(f.trace)}
                         for n, a, s, f in zip(names, tr, se, fisher.layers)]}
    if not args.skip_pyhessian:
        ph_t, ph = [], None
        for _ in range(args.pyhessian_repeats):
            secs, vals = pyhessian_traces(model, x, y, names, P)
            ph_t.append(secs)
            ph = vals if ph is None else ph
        rel = np.abs(ph - tr) / np.abs(tr)
        out |= {"pyhessian_seconds": ph_t,
                "pyhessian_per_probe": statistics.median(ph_t) / P,
                "pyhessian_per_layer_per_probe": statistics.median(ph_t) / P / len(names),
                "speedup_vs_pyhessian": statistics.median(ph_t) / statistics.median(ours_t),
                "pyhessian_over_floor": statistics.median(ph_t) / statistics.median(floor_t),
                "median_rel_diff_vs_pyhessian": float(np.median(rel)),
                "spearman_vs_pyhessian": float(spearmanr(ph, tr)[0])}
        for row, v in zip(out["per_layer"], ph):
            row["pyhessian_trace"] = float(v)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"ResNet-20, {args.samples} CIFAR-10 test images, {P} probes, {len(names)} layers, "
          f"{args.threads} threads (medians of {args.repeats} runs)")
    print("| method | s per probe (all layers) | vs floor |\n|---|---|---|")
    print(f"| floor (1 double-backward/probe) | {out['floor_per_probe']:.3f} | 1.00 |")
    print(f"| hawq.analyze | {out['hawq_per_probe']:.3f} | {out['hawq_over_floor']:.2f} |")
    if "pyhessian_per_probe" in out:
        print(f"| PyHessian per layer | {out['pyhessian_per_probe']:.3f} | "
              f"{out['pyhessian_over_floor']:.2f} |")
        print(f"\nspeed-up vs PyHessian: {out['speedup_vs_pyhessian']:.1f}x; PyHessian "
              f"{out['pyhessian_per_layer_per_probe']:.3f} s per layer per probe; agreement: "
              f"median relative difference {out['median_rel_diff_vs_pyhessian']:.3f}, Spearman "
              f"{out['spearman_vs_pyhessian']:.3f}")
    print(f"Fisher trace (exact, per-sample grads): {fisher_t:.2f} s = "
          f"{out['fisher_over_hutchinson']:.2f}x the Hutchinson run; Spearman with Hessian "
          f"trace {out['spearman_fisher_vs_hessian']:.3f}")
    print(f"peak RSS {out['peak_rss_mb']:.0f} MB")
    write_json(args.json, out)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
