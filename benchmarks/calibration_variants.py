"""Which images the hybrid's single-layer losses are measured on (ResNet-56, 8x and 10.67x).

The default hybrid sensitivity measures each layer's loss increase on 512 training images. The
network fits those almost perfectly, so the measured increases are small and noisy. This script
tries two other calibration sets, keeps everything else as ``allocation_quality.py`` does (HAWQ-V2
Omega from 20 Hutchinson probes on 256 images, seed 0; ILP over bits {2,3,4,8}; weights only,
the symmetric per-channel min/max quantizer, no fine-tuning; 10,000 test images):

* ``2048 images``: four times as many training images;
* ``512 augmented``: the same 512 images after a random crop and flip (seed 0), which the model
  has not seen in that form, so their loss moves more like unseen data's.

    python benchmarks/calibration_variants.py --json benchmarks/results/calibration_variants.json
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
from hawq.post.finetune import augment_cifar
from hawq.base.io import write_json
from hawq.modules.models import build_model
from hawq.analysis.sensitivities import SensitivityContext

from _common import library_sensitivity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--compressions", default="8,10.666666666666666")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--test-samples", type=int, default=None, help="default: all 10,000")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="benchmarks/results/calibration_variants.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    test = load_cifar10(args.data_dir, "test", args.test_samples)
    train = load_cifar10(args.data_dir, "train", 2048)
    x, y = train.tensors
    model = build_model(args.model, data_dir=args.data_dir).eval()
    infos = hawq.layers(model, test.tensors[0][:1])
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)
    bits = np.array([2, 3, 4, 8])
    quant = hawq.QuantConfig()
    # HAWQ-V2 traces once, on the first 256 clean training images (20 joint probes, seed 0), as
    # the library's hybrid takes them; each variant changes only where the losses are measured
    tr = SensitivityContext(model, (x, y), names, tuple(bits.tolist()), quant,
                            hessian_samples=256, max_probes=20, tol=0.0, seed=0,
                            probe_mode="joint").analyze("trace")
    variants = {"2048 images": (x, y),
                "512 augmented": (augment_cifar(x[:512], torch.Generator().manual_seed(0)),
                                  y[:512])}
    out = {"command": " ".join(["python"] + sys.argv), "model": args.model,
           "fp32": hawq.evaluate(model, test).accuracy, "rows": []}
    for label, data in variants.items():
        t = time.perf_counter()
        # the library's hybrid: max(HAWQ-V2 Omega, losses measured on this variant's images)
        omega, _ = library_sensitivity("hybrid", model, data, names, bits, quant, tr)
        secs = time.perf_counter() - t
        for comp in [float(c) for c in args.compressions.split(",")]:
            plan = allocate(omega, params, bits, Budget("compression", comp), "ilp")
            m = build_model(args.model, data_dir=args.data_dir).eval()
            hawq.quantize_(m, hawq.BitPlan({n: hawq.LayerSpec(int(b), 32)
                                            for n, b in zip(names, plan.bits)}))
            acc = hawq.evaluate(m, test).accuracy
            out["rows"].append({"variant": label, "compression": comp, "accuracy": acc,
                                "bits": [int(b) for b in plan.bits], "measure_seconds": secs})
            out["seconds"] = time.perf_counter() - t_all
            write_json(args.json, out)
            print(f"{args.model} {comp:6.2f}x hybrid on {label:14s} {acc:.2%}", flush=True)


if __name__ == "__main__":
    main()
