"""Cost of learned step sizes (LSQ) in a QAT training step, ResNet-20, batch 128.

Three ResNet-20s under the same 2/3-bit weight, 4-bit activation plan (random weights: only the
time matters): fixed steps (``learn_steps=False``), LSQ with hawq's fused autograd node (the
default), and LSQ written as a chain of differentiable ops (the straightforward version, kept
here only as the reference). Forward + backward steps are interleaved between the three so
machine noise hits them alike; the table gives median step times and ratios to fixed steps.

    python benchmarks/lsq_overhead.py                 # 1 thread, 20 steps each
    python benchmarks/lsq_overhead.py --threads 2 --steps 30
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import hawq.maths.quantizers as hq
from hawq.base.io import write_json
from hawq.modules.models import build_model
from hawq.maths.plan import BitPlan, LayerSpec, QuantConfig
from hawq.modules.surgery import calibrate_, quantizable_layers, quantize_


def composite_lsq(x, step, qp, grad_scale=1.0):
    """LSQ as separate autograd ops: value s with a scaled gradient, STE rounding of x/s."""
    s = step.clamp_min(torch.finfo(torch.float32).tiny * 2 ** 24)
    s = (s - s * grad_scale).detach() + s * grad_scale
    if qp.axis is not None:
        shape = [1] * x.dim()
        shape[qp.axis] = -1
        s = s.view(shape)
        zero = qp.zero_point.view(shape).to(x.dtype)
    else:
        zero = qp.zero_point.to(x.dtype)
    qmin, qmax = qp.bounds(x)
    v = torch.clamp(x / s, qmin - zero, qmax - zero)
    v = v + (torch.round(v) - v).detach()
    return v * s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", default="benchmarks/results/lsq_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    models = {}
    for mode in ("fixed", "lsq_fused", "lsq_composite"):
        torch.manual_seed(0)
        m = build_model("resnet20", pretrained=False)
        names = list(quantizable_layers(m))
        plan = BitPlan({n: LayerSpec(3 if i % 2 else 2, 4) for i, n in enumerate(names)})
        quantize_(m, plan, QuantConfig(learn_steps=mode != "fixed"))
        calibrate_(m, x)
        models[mode] = m.train()
    fused = hq.lsq_fake_quantize
    times: dict[str, list[float]] = {k: [] for k in models}
    import hawq.modules.qmodules as qm
    for i in range(args.steps + 2):
        for mode, m in models.items():
            qm.lsq_fake_quantize = composite_lsq if mode == "lsq_composite" else fused
            t = time.perf_counter()
            F.cross_entropy(m(x), y).backward()
            if i >= 2:  # the first two steps warm up allocators
                times[mode].append(time.perf_counter() - t)
            m.zero_grad(set_to_none=True)
    qm.lsq_fake_quantize = fused
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"mode": k, "median_step_s": med[k], "ratio_to_fixed": med[k] / med["fixed"]}
            for k in models]
    print("| mode | median step (s) | vs fixed |\n|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['median_step_s']:.3f} | {r['ratio_to_fixed']:.2f}x |")
    write_json(args.json, {"command": "python " + shlex.join(sys.argv), "threads": args.threads,
                           "steps": args.steps, "batch": args.batch, "rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
