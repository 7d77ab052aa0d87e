"""Data-parallel analysis on ResNet-20 / CIFAR-10: 1 process x 2 threads vs 2 ranks x 1 thread.

Both configurations use the same 2 cores, the same test images cut into the same chunks, the same
seed and the same total number of probes (every rank draws the same probes; each rank computes
its chunks' share of every product and the per-layer scalars are all-reduced, see
:mod:`hawq.base.dist`), so they compute the same numbers and only the time may differ. Rows:

* ``trace``: Hutchinson, joint probes (one HVP per probe for all layers), ``tol=0``.
* ``trace_layer``: per-layer probes (one block product per layer per probe), ``tol=0``.
* ``eigen``: power iteration, a fixed number of iterations per layer (``tol=0``); the block
  product H_ii v itself is all-reduced every iteration (layer i's weight count of numbers).
* ``fisher``: exact empirical-Fisher traces (one vmapped pass; L sums all-reduced once).
* ``measured``: single-layer loss increases at 2/4/8 bits (layers spread over ranks).
* ``costs`` (1 process, 1 thread, untimed against anything): per-sample seconds of a forward
  pass, a graph-building pass (forward + ``create_graph`` backward) and one double-backward,
  the inputs of the cost model below.

Each configuration runs in a fresh subprocess (``python -m torch.distributed.run --standalone
--nproc-per-node 2`` for the ranks); the timed span starts after model, data and process group
are ready (ranks synchronised by one all-reduce) and ends when the analysis returns (its final
collective failure check makes every rank finish). ``wall`` adds interpreter start, imports,
loading and rendezvous. Repeats are interleaved (1x2, 2x1, 1x2, ...) and medians quoted;
efficiency = t(1 process x 2 threads) / t(2 ranks x 1 thread): 1.0 means the ranks use the two
cores as well as intra-op threads do, above 1 better. Rows are written one by one to the JSON
(``--json``) and a rerun skips the rows already there (delete the file to start over).

    python benchmarks/distributed_scaling.py            # full run, ~15 min on 2 quiet cores
    python benchmarks/distributed_scaling.py --quick    # smoke test: tiny sizes, temp JSON

Cost model on paper: an 8B LLM's per-layer Hessian traces on 8 GPUs
-------------------------------------------------------------------
torchao's ``scripts/hessian_vhp.py`` (prototype mixed precision) documents "4 days with 4 A100
GPUs (80 GB) on a calibration dataset of 512 samples for Llama3-8B", computing one layer's
average trace per run (``--layer_id``), up to 100 Hutchinson iterations (``--max_iter``), each a
full ``torch.autograd.functional.vhp`` (forward + backward + double-backward) over the data.

This design, same data and probe budget. Assumptions (stated, not measured on a GPU here):

* N = 8e9 weights, forward = 2N FLOP/token = 16 GFLOP/token (attention at 2k context adds
  ~10%, ignored). Data T = 512 samples x 2048 tokens = 1.05M tokens (torchao's README runs use
  256-2048 tokens; 2048 is the expensive end).
* One probe over a chunk = one graph-building pass (forward + ``create_graph`` backward) + one
  double-backward. The graph of 1M tokens of an 8B model does not fit in GPU memory, so every
  chunk is rebuilt for every probe (``HessianOperator`` does this automatically): per token and
  probe k_probe x forward, with k_probe = (pass + double-backward) / forward. Autograd's own
  FLOP count is ~3x forward for the pass and ~4-5x for the double-backward, k_probe ~ 7-8; the
  ``costs`` row measures it on ResNet-20 (CPU) and the script prints the projection with the
  measured k_probe as well.
* bf16 weights with float32 HVP accumulation: H100 dense bf16 ~ 990 TFLOP/s peak (A100: 312);
  second-order autograd graphs run at a low model-FLOP utilisation, assumed 25% on H100 (~250
  TFLOP/s effective per GPU).
* Joint probes: one HVP per probe gives a sample of Tr(H_ii) for *every* layer at once (224
  linear layers of Llama3-8B), where torchao runs one layer per job (32 jobs for its per-block
  traces, 224 for per-linear). P = 100 probes, as torchao's ``max_iter``. The joint probe's
  per-layer variance is larger (cross-layer terms; measured 12x median on ResNet-20 in
  ``hessian_speed.json``), so the equal-error comparison is also given with 12x the probes.
* 8 data-parallel ranks, each holding the whole model (16 GB bf16 + activations of one chunk,
  gradient checkpointing not needed at 1-2k tokens per chunk on 80 GB); communication per probe
  is 224 float64 scalars (negligible: microseconds on NVLink).

Time = P x T x k_probe x 2N / (8 GPUs x 250e12 FLOP/s)
     = 100 x 1.05e6 x 7.5 x 16e9 / 2e15  ~ 6.3e3 s ~ 1.7 hours for every layer's trace
     (x12 probes for the joint probe's extra variance: ~21 hours, still below one day; per-layer
     block probes instead cost about L/5 joint probes each, see ``hessian_speed.json``).
torchao: 4 days x 4 A100 = 384 A100-hours; this design: 8 H100 x 1.7 h = 14 H100-hours
(~40 A100-hours at the 3x peak ratio) for all 224 layers at once. Most of the gain is the joint
probe (all layers per HVP instead of one layer per job) and reusing one graph per chunk for its
double-backward; the data parallelism gives the wall-clock division by 8 at O(layers) traffic.
The number that the GPU check should pin down is the effective FLOP/s of the double-backward
(MFU), the largest uncertainty here (25% assumed; 10% would make it 4.2 hours).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("trace", "trace_layer", "eigen", "fisher", "measured")
CONFIGS = {"1x2": (1, 2), "2x1": (2, 1)}  # name -> (processes, threads each)


def _setup(args):
    import torch

    from hawq.feed.data import load_cifar10
    from hawq.modules.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", pretrained=True, data_dir=args.data_dir).eval()
    x, y = load_cifar10(args.data_dir, split="test", limit=args.samples).tensors
    return model, x, y


def worker(args) -> dict | None:
    """One configuration of one metric (every rank runs this); rank 0 returns the row."""
    import numpy as np
    import torch

    from hawq.analysis.hessian import analyze, select_layers
    from hawq.analysis.sensitivity import measured_loss_increase
    from hawq.base import dist
    from hawq.ui.launch import setup

    torch.set_num_threads(args.threads)
    setup("cpu")
    model, x, y = _setup(args)
    names = [n for n, _ in select_layers(model)]
    if args.metric == "costs":
        return _costs(model, x, y, args)
    common = dict(batch_size=args.chunk, seed=args.seed)
    dist.all_reduce_sum(torch.zeros(1))  # start together
    t = time.perf_counter()
    if args.metric == "measured":
        out = measured_loss_increase(model, (x, y), names, [2, 4, 8], batch_size=args.chunk)
        values = np.asarray(out).ravel().tolist()
    else:
        kw = {"trace": dict(metric="trace", tol=0.0, max_probes=args.probes),
              "trace_layer": dict(metric="trace", tol=0.0, probe_mode="layer",
                                  max_probes=max(1, args.probes // 4)),
              "eigen": dict(metric="eigen", tol=0.0, max_iter=args.iters),
              "fisher": dict(metric="fisher")}[args.metric]
        res = analyze(model, (x, y), **common, **kw)
        values = [lh.eigenvalue if args.metric == "eigen" else lh.trace for lh in res.layers]
    seconds = time.perf_counter() - t
    if not dist.is_main():
        return None
    return {"seconds": seconds, "values": values, "ranks": dist.world(),
            "threads": torch.get_num_threads()}


def _costs(model, x, y, args) -> dict:
    """Per-sample seconds of forward, graph-building pass and double-backward (1 thread)."""
    import torch
    import torch.nn.functional as F

    from hawq.analysis.hessian import select_layers

    torch.set_num_threads(1)
    xs, ys = x[:args.chunk], y[:args.chunk]
    params = [m.weight for _, m in select_layers(model)]
    out = {}
    for name in ("forward", "pass", "double_backward"):
        best = float("inf")
        for _ in range(3):
            if name == "double_backward":
                loss = F.cross_entropy(model(xs), ys)
                g = torch.autograd.grad(loss, params, create_graph=True)
                vs = [torch.randint_like(p, 2) * 2 - 1 for p in params]
            t = time.perf_counter()
            if name == "forward":
                with torch.no_grad():
                    model(xs)
            elif name == "pass":
                loss = F.cross_entropy(model(xs), ys)
                torch.autograd.grad(loss, params, create_graph=True)
            else:
                torch.autograd.grad(g, params, vs)
            best = min(best, time.perf_counter() - t)
        out[f"{name}_per_sample_s"] = best / len(xs)
    out["k_probe"] = ((out["pass_per_sample_s"] + out["double_backward_per_sample_s"])
                      / out["forward_per_sample_s"])
    return {"seconds": 0.0, "values": [], "ranks": 1, "threads": 1, **out}


def run(args, config: str, metric: str) -> dict:
    """Start one configuration in fresh processes; returns rank 0's row plus wall time."""
    procs, threads = CONFIGS[config] if metric != "costs" else (1, 1)
    flags = ["--worker", "--metric", metric, "--threads", str(threads), "--samples",
             str(args.samples), "--chunk", str(args.chunk), "--probes", str(args.probes),
             "--iters", str(args.iters), "--seed", str(args.seed), "--data-dir",
             str(args.data_dir)]
    script = str(Path(__file__).resolve())
    cmd = ([sys.executable, script] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={procs}", script])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    proc = subprocess.run(cmd + flags, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{config} {metric} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:]) | {"wall": wall}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, out: dict) -> None:
    from hawq.base.io import write_json

    write_json(path, out)


def summarise(out: dict) -> dict:
    rows = out["rows"]
    table = {}
    for metric in METRICS:
        med, agree = {}, None
        for config in CONFIGS:
            rs = [r for r in rows.values() if r["metric"] == metric and r["config"] == config]
            if rs:
                med[config] = (statistics.median(r["seconds"] for r in rs),
                               statistics.median(r["wall"] for r in rs), len(rs))
        if len(med) == 2:
            a = [r for r in rows.values() if r["metric"] == metric and r["config"] == "1x2"][0]
            b = [r for r in rows.values() if r["metric"] == metric and r["config"] == "2x1"][0]
            diffs = [abs(u - v) / max(abs(u), 1e-12) for u, v in zip(a["values"], b["values"])]
            agree = max(diffs, default=0.0)
            table[metric] = {"seconds_1x2": med["1x2"][0], "seconds_2x1": med["2x1"][0],
                             "wall_1x2": med["1x2"][1], "wall_2x1": med["2x1"][1],
                             "repeats": min(med["1x2"][2], med["2x1"][2]),
                             "efficiency": med["1x2"][0] / med["2x1"][0],
                             "max_rel_diff": agree}
    out["summary"] = table
    costs = [r for r in rows.values() if r["metric"] == "costs"]
    if costs:
        c = costs[0]
        k = c["k_probe"]
        # the docstring's projection with the measured k_probe (see its assumptions)
        hours = 100 * 512 * 2048 * k * 16e9 / (8 * 250e12) / 3600
        out["cost_model"] = {"k_probe_measured_resnet20_cpu": k, "assumed_k_probe": 7.5,
                             "llm_8b_8gpu_hours_at_measured_k": hours,
                             "llm_8b_8gpu_hours_at_assumed_k": 100 * 512 * 2048 * 7.5 * 16e9
                             / (8 * 250e12) / 3600,
                             "torchao_4xA100_hours": 96.0}
    return out


def print_table(out: dict) -> None:
    a = out["args"]
    print(f"\nResNet-20, {a['samples']} CIFAR-10 test images in chunks of {a['chunk']}, "
          f"{a['probes']} probes (layer mode {max(1, a['probes'] // 4)}), power iteration "
          f"{a['iters']} iterations; medians")
    print("| metric | 1 proc x 2 threads s | 2 ranks x 1 thread s | efficiency | wall 1x2 | "
          "wall 2x1 | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for m, r in out.get("summary", {}).items():
        print(f"| {m} | {r['seconds_1x2']:.2f} | {r['seconds_2x1']:.2f} | {r['efficiency']:.2f} "
              f"| {r['wall_1x2']:.1f} | {r['wall_2x1']:.1f} | {r['max_rel_diff']:.1e} |")
    if "cost_model" in out:
        c = out["cost_model"]
        print(f"\ncost model: measured k_probe (pass + double-backward over forward, ResNet-20 "
              f"CPU) = {c['k_probe_measured_resnet20_cpu']:.1f}; 8B LLM per-layer traces on 8 "
              f"GPUs (100 probes, 512 x 2048 tokens, 250 TFLOP/s each): "
              f"{c['llm_8b_8gpu_hours_at_measured_k']:.1f} h at the measured k, "
              f"{c['llm_8b_8gpu_hours_at_assumed_k']:.1f} h at k = 7.5; torchao: 96 h on "
              "4 x A100")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("HAWQ_DATA")
                   or str(ROOT.parent / "shared" / "data"))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--chunk", type=int, default=32, help="samples per chunk (batch_size)")
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--iters", type=int, default=4, help="power iterations per layer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--metrics", default=",".join(METRICS))
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 16 images, 2 probes, 1 iteration, 1 repeat, temp JSON")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--metric", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        row = worker(args)
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
        return
    if args.quick:
        args.samples, args.chunk, args.probes, args.iters, args.repeats = 16, 4, 2, 1, 1
    path = Path(args.json or (Path(tempfile.gettempdir()) / "distributed_scaling_quick.json"
                              if args.quick else
                              ROOT / "benchmarks" / "results" / "distributed_scaling.json"))
    settings = {k: getattr(args, k) for k in ("samples", "chunk", "probes", "iters", "seed")}
    out = _load(path)
    if out.get("args", settings) != settings:
        raise SystemExit(f"{path} holds rows for other settings {out['args']}: give another "
                         "--json or delete it")
    out |= {"args": settings, "model": "resnet20", "cpu_cores": os.cpu_count()}
    out.setdefault("rows", {})
    metrics = [m for m in args.metrics.split(",") if m]
    todo = [("costs", "1x1", 0)] + [(m, c, r) for r in range(args.repeats) for m in metrics
                                     for c in CONFIGS]
    for metric, config, r in todo:
        key = f"{metric}/{config}/{r}"
        if key in out["rows"]:
            continue
        row = run(args, config, metric) | {"metric": metric, "config": config, "repeat": r}
        print(f"  {metric:12s} {config}  repeat {r}: {row['seconds']:7.2f} s "
              f"(wall {row['wall']:.1f} s)", flush=True)
        out["rows"][key] = row
        _save(path, summarise(out))
    print_table(summarise(out))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
