"""Packed export and ONNX check on ResNet-20 / CIFAR-10.

For each plan (W8A8, a hand mixed 2/3/4/8-bit plan with 8-bit activations, and a per-output-
channel plan; optionally the plan of ``hawq.workflows.workflow.compress`` at 8x with ``--compress``):
quantize + calibrate (512 training images), save the packed checkpoint, load it back and
compare outputs with the fake-quantized model on the whole test set (torch.equal per batch),
compare the packed size with :func:`hawq.modules.accounting.budget_report`, export ONNX (QDQ) and run
it in onnxruntime: argmax agreement with the PyTorch model, and top-1 of both.

    python benchmarks/export_check.py              # full 10,000 test images
    python benchmarks/export_check.py --quick      # 1,000 images, smoke test
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hawq
from hawq.feed.data import load_cifar10
from hawq.post.export import load_quantized, save_quantized, size_check
from hawq.base.io import write_json
from hawq.modules.models import build_model
from hawq.post.onnx_export import export_onnx, run_onnx


def hand_mixed(names: list[str]) -> hawq.BitPlan:
    """First/last layer and stage 1 at 8 bits, stage 2 at 4, stage 3 at 3/2 (a8)."""
    layers = {}
    for n in names:
        if n in ("conv1", "linear") or n.startswith("layer1"):
            b = 8
        elif n.startswith("layer2"):
            b = 4
        elif n.startswith("layer3.0"):
            b = 4 if n.endswith("conv1") else 3
        else:
            b = 3 if n.endswith("conv1") else 2
        layers[n] = hawq.LayerSpec(b, 8)
    return hawq.BitPlan(layers)


def per_channel(model, names: list[str]) -> hawq.BitPlan:
    """Stage 3 with per-output-channel bits (alternating 2/4/3 by channel), others 4/8 (a8)."""
    mods = dict(model.named_modules())
    layers = {}
    for n in names:
        c = mods[n].weight.shape[0]
        if n.startswith("layer3"):
            layers[n] = hawq.LayerSpec([(2, 4, 3)[i % 3] for i in range(c)], 8)
        else:
            layers[n] = hawq.LayerSpec(8 if n in ("conv1", "linear") else 4, 8)
    return hawq.BitPlan(layers)


def logits(model, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])


def check(name: str, plan: hawq.BitPlan, args, test, calib, tmp: Path) -> dict:
    t0 = time.perf_counter()
    model = build_model("resnet20", data_dir=args.data_dir)
    hawq.quantize_(model, plan)
    hawq.calibrate_(model, calib, max_samples=512)
    x, y = test.tensors
    times = {}
    t = time.perf_counter()
    ref = logits(model, x)
    times["torch_eval"] = time.perf_counter() - t
    t = time.perf_counter()
    res = save_quantized(model, tmp / f"{name}.safetensors", model_name="resnet20")
    loaded = load_quantized(tmp / f"{name}.safetensors")
    times["save_load"] = time.perf_counter() - t
    back = logits(loaded, x)
    identical = bool(torch.equal(ref, back))
    t = time.perf_counter()
    onx = export_onnx(model, tmp / f"{name}.onnx", x[:64])
    times["onnx_export"] = time.perf_counter() - t
    t = time.perf_counter()
    ort_out = run_onnx(tmp / f"{name}.onnx", x)
    times["onnx_eval"] = time.perf_counter() - t
    lit = run_onnx(tmp / f"{name}.onnx", x, optimize=False)
    p_ref, p_ort, p_lit = ref.argmax(1).numpy(), ort_out.argmax(1), lit.argmax(1)
    yy = y.numpy()
    sc = size_check(res)
    fp32 = hawq.budget_report(hawq.layers(build_model("resnet20", pretrained=False),
                                          x[:1]), plan, hawq.count_params(model))
    row = {
        "plan": name, "avg_bits": fp32.avg_bits, "weight_compression": fp32.weight_compression,
        "images": len(y), "top1_torch": float((p_ref == yy).mean()),
        "top1_onnx": float((p_ort == yy).mean()),
        "agreement": float((p_ort == p_ref).mean()),
        "agreement_unoptimized_ort": float((p_lit == p_ref).mean()),
        "max_abs_diff_onnx": float(np.abs(ort_out - ref.numpy()).max()),
        "max_abs_diff_unoptimized_ort": float(np.abs(lit - ref.numpy()).max()),
        "roundtrip_identical": identical,
        "size": res.to_dict(), "size_check": sc,
        "onnx": {k: v for k, v in onx.to_dict().items() if k != "path"},
        "seconds": times | {"total": time.perf_counter() - t0},
    }
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="1,000 test images")
    ap.add_argument("--compress", action="store_true",
                    help="also the plan of hawq.workflows.workflow.compress at 8x (hawq-v2 sensitivity)")
    ap.add_argument("--json", default="benchmarks/results/export_check.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t_all = time.perf_counter()
    test = load_cifar10(args.data_dir, split="test", limit=1000 if args.quick else None)
    calib = load_cifar10(args.data_dir, split="train", limit=512)
    probe = build_model("resnet20", pretrained=False)
    names = [i.name for i in hawq.layers(probe, test.tensors[0][:1])]
    plans = {"w8a8": hawq.BitPlan.uniform(8, 8), "mixed-2/3/4/8": hand_mixed(names),
             "per-channel-2/3/4": per_channel(probe, names)}
    if args.compress:
        from hawq.post.config import CompressConfig
        from hawq.workflows.workflow import compress

        r = compress(CompressConfig(model="resnet20", data_dir=args.data_dir,
                                    sensitivity="hawq-v2", allocator="ilp",
                                    target_compression=8, bits=(2, 4, 8)))
        plans["compress-8x"] = hawq.BitPlan.from_dict(r.plan)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in plans.items():
            row = check(name, plan, args, test, calib, Path(tmp))
            rows.append(row)
            print(f"  {name}: done in {row['seconds']['total']:.0f} s", file=sys.stderr)
    hdr = (f"{'plan':<18}{'avg bits':>9}{'top1 torch':>11}{'top1 onnx':>10}{'agree':>8}"
           f"{'agree(lit)':>11}{'identical':>10}{'accounted':>11}{'payload':>9}{'file+man':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        s = r["size"]
        print(f"{r['plan']:<18}{r['avg_bits']:>9.2f}{100 * r['top1_torch']:>10.2f}%"
              f"{100 * r['top1_onnx']:>9.2f}%{100 * r['agreement']:>7.2f}%"
              f"{100 * r['agreement_unoptimized_ort']:>10.2f}%{str(r['roundtrip_identical']):>10}"
              f"{s['accounted_bytes']:>11,.0f}{s['payload_bytes']:>9,}{s['total_bytes']:>10,}")
    out = {"command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
           "quick": args.quick, "torch": torch.__version__, "threads": 2,
           "exporter": rows[0]["onnx"]["exporter"] if rows else None,
           "rows": rows, "wall_seconds": time.perf_counter() - t_all}
    write_json(args.json, out)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
