"""hawq on models it was not written for, end to end through ``hawq.compress``.

1. A MobileNet-like CNN (stem conv + BN, four depthwise-separable blocks, GELU, global pooling,
   linear head) trained briefly on real CIFAR-10 (``--train-images`` from the training split,
   ``--epochs``, SGD + cosine, crop + flip), then compressed to 8x weights with bits {2, 4, 8}
   on calibration / held-out images taken from the rest of the training split, judged on
   ``--test-images`` test images. The result is also exported (packed integers, loaded back and
   compared bit for bit on test images; ONNX QDQ in onnxruntime when installed) and reported.
   A second row compresses the same float model with ``refine=True`` (the default ``"auto"``
   leaves a plan averaging 4 bits as allocated).
2. An ``nn.TransformerEncoder`` classifier on token ids: a synthetic but learnable task (the
   class is the token group, of four, that occurs most often in a length-16 sequence).
3. A model returning a dict of losses (classification + box regression, called as
   ``model(x, targets)``, task ``loss-dict``) on a synthetic teacher.

Each row: FP32 metric, the mixed 8x plan's, the uniform 4-bit plan of the same size
(``res.uniform``), compression, seconds. The JSON is rewritten after every row.

    python benchmarks/user_models.py                 # ~5 minutes on one core
    python benchmarks/user_models.py --quick         # smoke test, well under a minute
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import hawq
from hawq.post.config import CompressConfig
from hawq.feed.data import load_cifar10
from hawq.base.errors import ConfigError
from hawq.post.export import load_quantized, save_quantized
from hawq.base.io import write_json
from hawq.ui.report import write_report

OUT = Path(__file__).parent / "results" / "user_models.json"


# ----------------------------------------------------------------------------- models

def _sep(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 (stride) + BN + GELU, pointwise 1x1 + BN + GELU."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.GELU(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class MobileNetLike(nn.Module):
    """A small MobileNet-style CIFAR network (about 70k parameters)."""

    def __init__(self, classes: int = 10, width: int = 24):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.GELU())
        self.blocks = nn.Sequential(_sep(w, 2 * w, 2), _sep(2 * w, 4 * w, 2),
                                    _sep(4 * w, 4 * w, 1), _sep(4 * w, 8 * w, 2))
        self.head = nn.Linear(8 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TokenClassifier(nn.Module):
    """Embedding + learned positions, a 2-layer ``nn.TransformerEncoder``, mean pool, head."""

    def __init__(self, vocab: int = 32, d: int = 32, classes: int = 4, length: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, length, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids) + self.pos[:, :ids.shape[1]]).mean(1))


class LossDictNet(nn.Module):
    """Detection-style: a dict of losses (classification + smooth-L1 boxes) when called with
    (inputs, targets)."""

    def __init__(self, features: int = 32, hidden: int = 64, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.cls = nn.Linear(hidden, classes)
        self.box = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, Any]:
        h = self.body(x)
        return {"loss_cls": F.cross_entropy(self.cls(h), targets["labels"]),
                "loss_box": F.smooth_l1_loss(self.box(h), targets["boxes"])}


# ----------------------------------------------------------------------------- data

def token_data(n: int, seed: int, vocab: int = 32, length: int = 16) -> tuple[torch.Tensor, ...]:
    """Token ids (n, length) and labels: the group (token id mod 4) occurring most often (ties
    to the lowest group). Learnable from mean-pooled embeddings."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    counts = F.one_hot(ids % 4, 4).sum(1)
    return ids, counts.argmax(1)


def box_data(n: int, seed: int, features: int = 32, classes: int = 5):
    """(x, {"labels", "boxes"}) from a fixed random teacher (seed 0) with label noise."""
    teacher = torch.Generator().manual_seed(0)
    wc = torch.randn(features, classes, generator=teacher)
    wb = torch.randn(features, 4, generator=teacher) / math.sqrt(features)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    logits = x @ wc + 0.5 * torch.randn(n, classes, generator=g)
    boxes = torch.tanh(x @ wb) + 0.05 * torch.randn(n, 4, generator=g)
    return x, {"labels": logits.argmax(1), "boxes": boxes}


def _part(pair: tuple[torch.Tensor, dict[str, torch.Tensor]], a: int, b: int):
    x, t = pair
    return x[a:b], {k: v[a:b] for k, v in t.items()}


# ----------------------------------------------------------------------------- training

def train_cnn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
              batch: int = 128, lr: float = 0.1, seed: int = 0) -> float:
    """SGD + momentum, cosine schedule, random crop (pad 4) + flip. Returns seconds."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.25)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb = F.pad(x[idx], (4, 4, 4, 4), mode="reflect")
            dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
            xb = xb[:, :, dy:dy + 32, dx:dx + 32]
            if bool(torch.rand((), generator=g) < 0.5):
                xb = xb.flip(3)
            opt.zero_grad()
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - t0


def train_steps(model: nn.Module, batches: list[Any], loss_fn, steps: int,
                lr: float = 3e-3) -> float:
    """Adam for ``steps`` steps cycling over ``batches``. Returns seconds."""
    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        opt.zero_grad()
        loss_fn(model, batches[i % len(batches)]).backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- rows

def _row(name: str, task: str, res: Any, seconds: float, train_seconds: float,
         model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    u = res.uniform or {}
    return {"model": name, "task": task, "metric": res.metric,
            "higher_is_better": res.task.get("higher_is_better"),
            "fp32": res.fp32_value, "mixed": res.value,
            "mixed_weight_compression": res.budget["weight_compression"],
            "mixed_avg_bits": res.budget["avg_bits"],
            "mixed_bits": {r["name"]: r["w_bits"] for r in res.layers},
            "uniform_bits": u.get("w_bits"), "uniform": u.get("value"),
            "uniform_weight_compression": u.get("weight_compression"),
            "layers": len(res.layers),
            "params": sum(p.numel() for p in model.parameters()),
            "refined": res.refinement is not None, "warnings": res.warnings,
            "compress_seconds": seconds, "train_seconds": train_seconds,
            "seconds_by_step": res.seconds, **(extra or {})}


def _export_check(model: nn.Module, float_copy: nn.Module, x: torch.Tensor,
                  folder: Path) -> dict[str, Any]:
    """Packed export, loaded back into a float copy, compared bit for bit on ``x``; ONNX in
    onnxruntime when installed."""
    res = save_quantized(model, folder / "model.safetensors")
    loaded = load_quantized(folder / "model.safetensors", model=float_copy)
    with torch.no_grad():
        equal = bool(torch.equal(model(x), loaded(x)))
    out: dict[str, Any] = {"packed_bytes": res.file_bytes, "accounted_bytes": res.accounted_bytes,
                           "roundtrip_equal": equal}
    try:
        from hawq.post.onnx_export import export_onnx

        onx = export_onnx(model, folder / "model.onnx", x)
        out["onnx_agreement"] = onx.agreement
        out["onnx_max_abs_diff_unoptimized"] = onx.max_abs_diff_unoptimized
    except ConfigError as e:  # onnx/onnxruntime not installed
        out["onnx"] = str(e)
    return out


def _cnn(args: argparse.Namespace, cfg: CompressConfig, tmp: Path) -> list[dict[str, Any]]:
    """Two rows: the default config (refine='auto', which leaves a 4-bit-average plan as
    allocated) and refine=True (exchanges measured on the held-out images), same float model."""
    n_train, n_cal, n_held = args.train_images, args.calib_images, args.heldout_images
    train = load_cifar10(args.data_dir, "train", n_train + n_cal + n_held)
    x, y = train.tensors
    test = load_cifar10(args.data_dir, "test", args.test_images)
    torch.manual_seed(0)
    model = MobileNetLike()
    t_train = train_cnn(model, x[:n_train], y[:n_train], args.epochs)
    float_copy, float_refine = copy.deepcopy(model), copy.deepcopy(model)
    data = {"calib": (x[n_train:n_train + n_cal], y[n_train:n_train + n_cal]),
            "heldout": (x[n_train + n_cal:], y[n_train + n_cal:]),
            "test": test}
    t0 = time.perf_counter()
    res = hawq.compress(model, data, task="classification", config=cfg, out_dir=tmp / "cnn")
    seconds = time.perf_counter() - t0
    extra = _export_check(model, float_copy, test.tensors[0][:256], tmp / "cnn")
    write_report(tmp / "cnn")
    extra["report"] = True
    extra.update(train_images=n_train, epochs=args.epochs, test_images=len(test),
                 calib_images=n_cal, heldout_images=n_held)
    rows = [_row("MobileNet-like CNN (CIFAR-10)", "classification", res, seconds, t_train, model,
                 extra)]
    t0 = time.perf_counter()
    ref = hawq.compress(float_refine, data, config=replace(cfg, refine=True,
                                                           compare_uniform=False))
    row = _row("MobileNet-like CNN (CIFAR-10), refine=True", "classification", ref,
               time.perf_counter() - t0, t_train, float_refine,
               {"refinement": ref.refinement, "uniform_from": "the row above (same float model)"})
    row.update({k: rows[0][k] for k in ("uniform_bits", "uniform", "uniform_weight_compression")})
    return rows + [row]


def _transformer(args: argparse.Namespace, cfg: CompressConfig,
                 tmp: Path) -> list[dict[str, Any]]:
    ids, y = token_data(args.token_train + 1024 + args.token_test, seed=1)
    n = args.token_train
    torch.manual_seed(0)
    model = TokenClassifier()
    t_train = train_steps(model, [(ids[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)],
                          lambda m, b: F.cross_entropy(m(b[0]), b[1]), args.token_steps)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids[n:n + 512], y[n:n + 512]), batch_size=64)
    data = {"calib": loader, "heldout": (ids[n + 512:n + 1024], y[n + 512:n + 1024]),
            "test": (ids[n + 1024:], y[n + 1024:])}
    t0 = time.perf_counter()
    res = hawq.compress(model, data, config=cfg, out_dir=tmp / "tok")
    seconds = time.perf_counter() - t0
    return [_row("nn.TransformerEncoder token classifier (synthetic)", "classification", res,
                 seconds, t_train, model, {"train_sequences": n, "train_steps": args.token_steps,
                                           "test_sequences": len(ids) - n - 1024})]


def _loss_dict(args: argparse.Namespace, cfg: CompressConfig, tmp: Path) -> list[dict[str, Any]]:
    n = args.token_train
    data_all = box_data(n + 1024 + args.token_test, seed=2)
    torch.manual_seed(0)
    model = LossDictNet()
    batches = [_part(data_all, i, i + 64) for i in range(0, n, 64)]
    t_train = train_steps(model, batches, lambda m, b: sum(m(*b).values()), args.token_steps)
    data = {"calib": _part(data_all, n, n + 512), "heldout": _part(data_all, n + 512, n + 1024),
            "test": _part(data_all, n + 1024, n + 1024 + args.token_test)}
    t0 = time.perf_counter()
    res = hawq.compress(model, data, task="loss-dict", config=cfg, out_dir=tmp / "det")
    seconds = time.perf_counter() - t0
    return [_row("dict-of-losses model (synthetic detection)", "loss-dict", res, seconds,
                 t_train, model)]


def _fmt(metric: str, v: Any) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if metric == "accuracy" else f"{v:.4g}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["model", "metric", "FP32", "mixed 8x", "uniform 4-bit", "mixed x", "train s",
            "compress s"]
    cells = [head] + [[r["model"], r["metric"], _fmt(r["metric"], r["fp32"]),
                       _fmt(r["metric"], r["mixed"]), _fmt(r["metric"], r["uniform"]),
                       f"{r['mixed_weight_compression']:.2f}", f"{r['train_seconds']:.0f}",
                       f"{r['compress_seconds']:.0f}"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for k, c in enumerate(cells):
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in
                        enumerate(zip(c, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder with cifar10.npz")
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--heldout-images", type=int, default=1024)
    ap.add_argument("--test-images", type=int, default=5000)
    ap.add_argument("--token-train", type=int, default=8192)
    ap.add_argument("--token-steps", type=int, default=600)
    ap.add_argument("--token-test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2 threads ran "
                         "tens of times slower from contention)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--json", default=str(OUT))
    args = ap.parse_args(argv)
    if args.quick:
        args.train_images, args.epochs, args.test_images = 1000, 1, 500
        args.heldout_images, args.token_train, args.token_steps = 256, 1024, 100
        args.token_test = 500
    torch.set_num_threads(args.threads)
    cfg = CompressConfig(target_compression=8, bits=(2, 4, 8),
                         refine_samples=args.heldout_images)
    t_all = time.perf_counter()
    out: dict[str, Any] = {"command": shlex.join(["python", *sys.argv]), "quick": args.quick,
                           "torch": torch.__version__, "threads": args.threads,
                           "config": hawq.post.config.config_dict(cfg), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for step in (_cnn, _transformer, _loss_dict):
            for row in step(args, cfg, Path(tmp)):
                out["rows"].append(row)
                out["wall_seconds"] = time.perf_counter() - t_all
                write_json(args.json, out)
                print(f"{row['model']}: {row['metric']} FP32 {_fmt(row['metric'], row['fp32'])}, "
                      f"mixed {_fmt(row['metric'], row['mixed'])}, uniform "
                      f"{_fmt(row['metric'], row['uniform'])} ({row['compress_seconds']:.0f} s)",
                      flush=True)
    print()
    print_table(out["rows"])
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
