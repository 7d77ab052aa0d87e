"""HAWQ's ResNet-20 / CIFAR-10 row: mixed-precision weights (~13.1x) and activations (~4 bits)
after quantization-aware fine-tuning, vs uniform W2A4 / W3A4 at the same training budget, and
the HAWQ-V1 staged schedule vs all layers at once.

Starts from the shared FP32 ResNet-20 (91.73%). Weight bits {2,3,4,8} by the default ``hybrid``
sensitivity and the integer program at the compression target; activation bits {2,4,8} from
activation-Hessian traces at an average of 4 bits (8x); then ``hawq.post.finetune`` (SGD, cosine,
KD from FP32, crop+flip, BN folded halfway). Every row is evaluated on the 10,000 test images;
JSON is rewritten after every row so a cut-off run keeps what it measured.

    python benchmarks/hawq_cifar10.py --epochs 2 --json benchmarks/results/hawq_cifar10.json

A long run can span sessions: ``--checkpoint-dir DIR --resume`` checkpoints every epoch of every
row and, run again with the same arguments, continues where it stopped (rows already in the
JSON are kept; the reported fine-tune time is the sum of the epochs' times).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import numpy as np
import torch

import hawq
from hawq.analysis.activations import activation_plan
from hawq.maths.allocation import allocate
from hawq.maths.budgets import Budget
from hawq.feed.data import load_cifar10
from hawq.post.finetune import FinetuneConfig, finetune
from hawq.base.io import write_json
from hawq.modules.models import build_model
from hawq.analysis.sensitivities import sensitivity_costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps-per-epoch", type=int, default=None)
    ap.add_argument("--train-samples", type=int, default=50000)
    ap.add_argument("--test-samples", type=int, default=10000)
    ap.add_argument("--compression", type=float, default=13.1)
    ap.add_argument("--a-avg-bits", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--distill", type=float, default=0.5)
    ap.add_argument("--learn-steps", action="store_true",
                    help="LSQ: train the weight and activation step sizes (now the default)")
    ap.add_argument("--fixed-steps", action="store_true",
                    help="min/max/EMA step sizes, no LSQ (the earlier rows' setting)")
    ap.add_argument("--rows", default="mp-all,mp-staged,w2a4,w3a4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is lent")
    ap.add_argument("--plans-from", default=None,
                    help="reuse the weight and activation plans of an earlier run's JSON "
                         "(skips the Hessian work; every row then trains the same plan)")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="checkpoint every epoch under DIR/<row>/ (a long run may span sessions)")
    ap.add_argument("--resume", action="store_true",
                    help="continue each row from DIR/<row>/last.pt; merges rows into --json")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 short epoch")
    ap.add_argument("--json", default="benchmarks/results/hawq_cifar10.json")
    args = ap.parse_args()
    args.learn_steps = not args.fixed_steps
    if args.quick:
        args.epochs, args.steps_per_epoch = 1, 5
        args.train_samples, args.test_samples = 2048, 1000
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_all = time.perf_counter()

    def on_device(ds):
        return torch.utils.data.TensorDataset(*(t.to(device) for t in ds.tensors))

    train = on_device(load_cifar10(args.data_dir, "train", args.train_samples))
    test = on_device(load_cifar10(args.data_dir, "test", args.test_samples))
    calib = on_device(load_cifar10(args.data_dir, "train", 512))
    base = build_model("resnet20", data_dir=args.data_dir).to(device)
    fp32 = hawq.evaluate(base, test).accuracy
    infos = hawq.layers(base, test.tensors[0][:1])
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)
    quant = hawq.QuantConfig()

    if args.plans_from:
        with open(args.plans_from) as f:
            prev = json.load(f)
        wp, ap_ = prev["weight_plan"], prev["activation_plan"]
        if wp["names"] != names:
            sys.exit(f"--plans-from {args.plans_from}: its layers are not resnet20's")
        w_bits, a_bits = [int(b) for b in wp["bits"]], [int(b) for b in ap_["bits"]]
        weight_plan = {**wp, "seconds": 0.0, "from": args.plans_from}
        act_plan = {**ap_, "seconds": 0.0, "from": args.plans_from}
    else:
        t = time.perf_counter()
        wbits = (2, 3, 4, 8)
        omega, _ = sensitivity_costs(base, calib, names, wbits, "hybrid", quant, seed=0)
        alloc = allocate(omega, params, wbits, Budget("compression", args.compression),
                         method="ilp")
        t_w = time.perf_counter() - t
        t = time.perf_counter()
        act = activation_plan(base, calib, names, bits=(2, 4, 8),
                              total=Budget("avg_bits", args.a_avg_bits), samples=256)
        t_a = time.perf_counter() - t
        w_bits, a_bits = [int(b) for b in alloc.bits], [int(b) for b in act.bits]
        weight_plan = {"bits": w_bits, "names": names, "compression": alloc.compression,
                       "avg_bits": alloc.avg_bits, "seconds": t_w}
        act_plan = {"bits": a_bits, "avg_bits": act.avg_bits,
                    "compression": act.compression, "seconds": t_a}
    mp = hawq.BitPlan({n: hawq.LayerSpec(w, a) for n, w, a in zip(names, w_bits, a_bits)})
    plans = {"mp": mp, "w2a4": hawq.BitPlan.uniform(2, 4), "w3a4": hawq.BitPlan.uniform(3, 4)}

    out = {"command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
           "model": "resnet20", "fp32_accuracy": fp32, "epochs": args.epochs,
           "steps_per_epoch": args.steps_per_epoch, "train_samples": len(train),
           "test_samples": len(test), "threads": args.threads, "learn_steps": args.learn_steps,
           "machine": platform.processor() or platform.machine(),
           "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else "cpu"),
           "weight_plan": weight_plan, "activation_plan": act_plan, "rows": []}
    if args.resume:  # keep the rows an earlier (cut-off) run measured
        try:
            with open(args.json) as f:
                old = json.load(f)
            if old.get("epochs") == args.epochs:
                out["rows"] = [r for r in old.get("rows", []) if r["row"] not in
                               args.rows.split(",")]
        except FileNotFoundError:
            pass
    print(f"FP32 {fp32:.2%}; weights {weight_plan['compression']:.2f}x "
          f"({weight_plan['avg_bits']:.2f} bits) {w_bits}; activations "
          f"{act_plan['avg_bits']:.2f} bits {a_bits}", flush=True)

    def ptq(plan):
        m = copy.deepcopy(base)
        hawq.quantize_(m, plan, quant)
        hawq.calibrate_(m, calib)
        return hawq.evaluate(m, test).accuracy

    for row in args.rows.split(","):
        key = "mp" if row.startswith("mp") else row
        plan = plans[key]
        before = ptq(plan)
        m = copy.deepcopy(base)
        cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, distill=args.distill,
                             steps_per_epoch=args.steps_per_epoch, staged=row == "mp-staged",
                             learn_steps=args.learn_steps, seed=0)
        t = time.perf_counter()
        ckpt = None if args.checkpoint_dir is None else f"{args.checkpoint_dir}/{row}"
        res = finetune(m, plan, train, cfg, quant=quant, progress=sys.stderr.isatty(),
                       checkpoint_dir=ckpt, resume=args.resume and ckpt is not None)
        secs = time.perf_counter() - t
        if res.resumed_from_epoch:  # the training time of every epoch, across sessions
            secs = sum(h["seconds"] for h in res.history)
        acc = hawq.evaluate(m, test).accuracy
        budget = hawq.budget_report(infos, plan, hawq.count_params(base))
        rec = {"row": row, "resumed_from_epoch": res.resumed_from_epoch,
               "ptq_accuracy": before, "qat_accuracy": acc,
               "drop_vs_fp32": fp32 - acc, "finetune_seconds": secs,
               "weight_compression": budget.weight_compression,
               "stages": res.stages if cfg.staged else None,
               "history": res.history}
        out["rows"].append(rec)
        out["seconds_total"] = time.perf_counter() - t_all
        write_json(args.json, out)
        print(f"{row:10s} PTQ {before:7.2%}  QAT {acc:7.2%}  (FP32 {fp32:.2%}, "
              f"{budget.weight_compression:.2f}x weights) {secs:7.1f} s", flush=True)

    print()
    print("| row | weight compression | PTQ top-1 | QAT top-1 | vs FP32 | fine-tune time |")
    print("|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['row']} | {r['weight_compression']:.2f}x | {r['ptq_accuracy']:.2%} | "
              f"{r['qat_accuracy']:.2%} | {-r['drop_vs_fp32'] * 100:+.2f} | "
              f"{r['finetune_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
