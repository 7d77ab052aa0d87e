"""Channel-wise HAWQ on ResNet-20 / CIFAR-10, post-training, weights only, at equal model size.

For each average weight-bit target (over the quantizable weights) it compares, with the same
symmetric per-channel min/max quantizer and activations left float (a_bits 32) in every row:

* uniform (every layer at that width, where it is one of ``--bits``),
* layer-wise HAWQ-V2 (Omega = avg trace x ||Q_b(W) - W||^2, Pareto frontier),
* layer-wise default (``hybrid``: max of the HAWQ-V2 Omega and the measured single-layer loss
  increase, ILP),
* channel-wise, Hessian-only ratios (Omega over 4 trace-sorted channel groups per layer, ILP),
* channel-wise, DDPG ratios (hawq.ddpg; reward = -KL(FP32 || quantized) on a held-out split
  of training images that the Hessian never saw; budget enforced by construction).

Top-1 is measured on the 10,000 CIFAR-10 test images (``--quick``: 1,000 and few episodes).
The reward-split KL of every plan is reported too, so the search is judged on its own objective.

    python benchmarks/cw_hawq.py                  # full: 300 episodes, ~7 min DDPG per target on 2 cores
    python benchmarks/cw_hawq.py --quick          # smoke
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np
import torch

import hawq
from hawq.maths.allocation import allocate
from hawq.maths.budgets import Budget
from hawq.analysis.channelwise import (ChannelAllocator, ChannelLayer, ChannelRewardModel,
                              channel_errors, hessian_group_plan, layer_features,
                              shrink_traces)
from hawq.feed.data import load_cifar10
from hawq.maths.ddpg import DDPGConfig, ddpg_search
from hawq.analysis.hessian import HessianResult, analyze
from hawq.base.io import write_json
from hawq.modules.models import build_model

from _common import library_sensitivity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--avg-bits", default="3,4")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--time-budget", type=float, default=900.0,
                   help="seconds of DDPG search per target at most (default 900)")
    p.add_argument("--hessian-samples", type=int, default=256)
    p.add_argument("--probes", type=int, default=50)
    p.add_argument("--reward-samples", type=int, default=1000)
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--shrink", type=float, default=0.5,
                   help="channel-trace shrinkage toward the layer mean (0 = raw, clipped)")
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke: 1k test images, 12 episodes")
    p.add_argument("--cache", default=None,
                   help="file to keep the channel traces and measured losses in: reused when it "
                        "exists (same model/probes/samples), so reruns only redo the searches")
    p.add_argument("--json", default="benchmarks/results/cw_hawq.json")
    args = p.parse_args()
    if args.quick:
        args.episodes, args.probes, args.test_samples = 12, 8, args.test_samples or 1000
        args.reward_samples, args.time_budget = 300, 60.0
        if args.json == "benchmarks/results/cw_hawq.json":
            args.json = "benchmarks/results/cw_hawq_quick.json"
    torch.set_num_threads(2)
    t_all = time.perf_counter()
    bits = [int(b) for b in args.bits.split(",")]
    targets = [float(b) for b in args.avg_bits.split(",")]
    quant = hawq.QuantConfig()

    test = load_cifar10(args.data_dir, "test", args.test_samples)
    n_cal = max(args.calib_samples, args.hessian_samples)
    train = load_cifar10(args.data_dir, "train", n_cal + args.reward_samples)
    x, y = train.tensors
    held = (x[n_cal:], y[n_cal:])  # reward split: never used by the Hessian or measured losses
    model = build_model(args.model, data_dir=args.data_dir)
    fp32 = hawq.evaluate(model, test).accuracy
    infos = hawq.layers(model, test.tensors[0][:1])
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)
    mods = hawq.quantizable_layers(model)

    times: dict[str, float] = {}
    key = {k: getattr(args, k) for k in ("model", "bits", "probes", "hessian_samples",
                                         "calib_samples", "seed")} | {"cache_format": 2}
    cached = None
    if args.cache and os.path.exists(args.cache):
        cached = torch.load(args.cache, weights_only=False)
        if cached.get("key") != key:
            sys.exit(f"--cache {args.cache} was made with {cached.get('key')}, not {key}: "
                     "delete it or give another path")
        times.update(cached["times"])
        res = HessianResult.from_dict(cached["hessian"])
        omega_v2, omega_hy = cached["omega_v2"], cached["omega_hybrid"]
    else:
        t = time.perf_counter()
        res = analyze(model, (x[:args.hessian_samples], y[:args.hessian_samples]),
                      metric="channel", layers=names, seed=args.seed, tol=0.0,
                      max_probes=args.probes)
        times["channel_traces"] = time.perf_counter() - t
    raw = [np.array(lh.channel_traces) for lh in res.layers]
    clayers = [ChannelLayer(i.name, i.params, i.macs, shrink_traces(t, args.shrink))
               for i, t in zip(infos, raw)]
    neg = float(np.mean(np.concatenate(raw) <= 0))
    if cached is None:
        # the library's hybrid (max of HAWQ-V2 Omega and the measured single-layer loss increase
        # on the calibration images) on the channel analysis' layer traces: no second Hutchinson
        # run; HAWQ-V2's Omega is the one from the same traces
        t = time.perf_counter()
        omega_hy, hy = library_sensitivity("hybrid", model, (x[:args.calib_samples],
                                                             y[:args.calib_samples]),
                                           names, bits, quant, res)
        omega_v2 = np.array(hy["omega_v2"])
        times["measured"] = time.perf_counter() - t
        times["omega_v2"] = times["channel_traces"]
        if args.cache:
            torch.save({"key": key, "hessian": res.to_dict(), "omega_v2": omega_v2,
                        "omega_hybrid": omega_hy,
                        "times": {k: times[k] for k in ("channel_traces", "measured",
                                                        "omega_v2")}}, args.cache)
    t = time.perf_counter()
    cerr = [channel_errors(mods[n].weight, bits, quant) for n in names]
    times["channel_errors"] = time.perf_counter() - t
    reward = ChannelRewardModel(model, names, bits, held, quant, metric="kl")
    t = time.perf_counter()
    reward([[8] * l.channels for l in clayers])
    times["one_reward"] = time.perf_counter() - t

    def test_acc(chan_bits: list[list[int]]) -> float:
        m = build_model(args.model, data_dir=args.data_dir)
        hawq.quantize_(m, hawq.BitPlan({n: hawq.LayerSpec(b, 32)
                                        for n, b in zip(names, chan_bits)}), quant)
        return hawq.evaluate(m, test).accuracy

    rows = []
    for avg in targets:
        budget = Budget("avg_bits", avg)
        plans: dict[str, tuple[list[list[int]], float]] = {}
        if float(avg).is_integer() and int(avg) in bits:
            plans["uniform"] = ([[int(avg)] * l.channels for l in clayers], 0.0)
        for label, om, method in (("layer hawq-v2", omega_v2, "frontier"),
                                  ("layer hybrid", omega_hy, "ilp")):
            t = time.perf_counter()
            a = allocate(om, params, bits, budget, method)
            plans[label] = ([[int(b)] * l.channels for b, l in zip(a.bits, clayers)],
                            time.perf_counter() - t)
        t = time.perf_counter()
        _, chan = hessian_group_plan(clayers, cerr, bits, budget, args.groups)
        plans["channel hessian"] = (chan, time.perf_counter() - t)
        alloc = ChannelAllocator(clayers, bits, budget, cerr)
        t = time.perf_counter()
        search = ddpg_search(layer_features(infos, clayers), len(bits),
                             lambda counts: reward(alloc.to_bits(counts)),
                             make_plan=alloc.plan, dynamic=alloc.used_fraction,
                             config=DDPGConfig(episodes=args.episodes, seed=args.seed,
                                               warmup=min(20, max(args.episodes // 4, 1)),
                                               time_budget=args.time_budget),
                             progress=True)
        plans["channel ddpg"] = (alloc.to_bits(search.best_plan), time.perf_counter() - t)
        for label, (chan, secs) in plans.items():
            acc = test_acc(chan)
            size = sum(l.per_channel * sum(b) for l, b in zip(clayers, chan))
            row = {"avg_bits_target": avg, "method": label, "accuracy": acc,
                   "avg_bits": size / params.sum(), "reward_kl": -reward(chan),
                   "search_seconds": secs,
                   "mean_bits_per_layer": [float(np.mean(b)) for b in chan]}
            if label == "channel ddpg":
                row["ddpg"] = {k: v for k, v in search.to_dict().items() if k != "best_ratios"}
            rows.append(row)
            print(f"avg {avg:g} | {label:16s} | top-1 {100 * acc:6.2f}% | avg bits "
                  f"{row['avg_bits']:.4f} | reward KL {row['reward_kl']:.4f} | search "
                  f"{secs:7.1f} s", flush=True)

    print(f"\n{args.model} FP32 top-1 {100 * fp32:.2f}% on {len(test)} test images; weights only "
          f"(a_bits 32), bits {bits}")
    print(f"{'avg bits':>8} | {'method':16s} | {'top-1':>7} | {'size (avg b)':>12} | "
          f"{'reward KL':>9} | {'search s':>8}")
    for r in rows:
        print(f"{r['avg_bits_target']:8g} | {r['method']:16s} | {100 * r['accuracy']:6.2f}% | "
              f"{r['avg_bits']:12.4f} | {r['reward_kl']:9.4f} | {r['search_seconds']:8.1f}")
    print(f"{100 * neg:.1f}% of channel trace estimates are <= 0 (shrink {args.shrink})")
    print("shared costs (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    times["total"] = time.perf_counter() - t_all
    write_json(args.json, {"command": " ".join(shlex.quote(a) for a in [sys.executable.split('/')[-1],
                                                                       *sys.argv]),
                           "args": vars(args), "fp32_accuracy": fp32, "test_images": len(test),
                           "bits": bits, "a_bits": 32, "rows": rows, "seconds": times,
                           "threads": torch.get_num_threads(),
                           "nonpositive_channel_trace_fraction": neg})
    print(f"wrote {args.json} ({times['total']:.0f} s)")


if __name__ == "__main__":
    main()
