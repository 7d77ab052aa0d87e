"""Quantization-aware fine-tuning (QAT) and HAWQ's Hessian-ordered staged schedule.

:func:`finetune` trains a model under a :class:`~hawq.plan.BitPlan` with fake-quantized weights
and activations (straight-through gradients):

* **Activations**: each quantizer is calibrated (min/max) on ``calib_samples`` training images
  when its layer is first quantized, then tracks an exponential moving average of the batch
  min/max while training (``act_range="ema"``) or keeps the calibrated range (``"fixed"``).
* **BatchNorm**: trains normally until ``bn_fold_at`` (a fraction of the run), then every
  Conv->BatchNorm pair is folded (W' = W * g/sqrt(v+eps), b' = beta + (b - mu) * g/sqrt(v+eps))
  and training goes on with the *folded* weights fake-quantized, so the final model is exactly
  the integer model that export writes (no BatchNorm left to fold afterwards).
* **Schedule**: SGD with momentum; the learning rate follows a cosine (or step) curve over all
  steps, a pure function of the global step, so it needs no state to resume. Once BatchNorm is
  folded it is scaled by ``fold_lr_scale`` (0.1), and (``fold_precondition``, default on) each
  folded weight's gradient is multiplied per output channel by s^2, s = g/sqrt(v+eps) at the
  fold. That makes SGD on the folded weight W' = s*W exactly SGD on W with the BatchNorm frozen
  (momentum and weight decay included): without it, channels with a small s are 1/s^2 times
  sharper and a folded ResNet-20 collapses within 5 steps at lr 5e-4 (measured; it trains
  with the preconditioner).
* **Knowledge distillation** (``distill`` > 0) from a frozen copy of the FP32 model.
* **CIFAR augmentation**: random crop (4-pixel zero padding) and horizontal flip, vectorised.
* **Staged (HAWQ-V1)**: ``staged=True`` quantizes blocks stage by stage in decreasing
  Omega_i = lambda_i * ||Q(W_i) - W_i||^2 (:func:`staged_order`); layers of later stages stay
  float until their stage starts; stages share the step budget evenly.
* **Checkpoints**: after every epoch (atomically) to ``checkpoint_dir/last.pt`` with the model,
  optimizer, data-order generator, stage and fold state; ``resume=True`` continues from it and
  reproduces the uninterrupted run exactly (same threads, same device).

Cost: ``epochs`` passes over ``train`` (forward + backward, plus the teacher's forward with
distillation), one calibration pass over ``calib_samples`` per stage, and for ``staged=True``
the eigenvalue analysis of :func:`staged_order` (power iteration, ~20 HVPs per layer).
"""

from __future__ import annotations

import copy
import io
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from hawq.errors import ConfigError, NumericalError
from hawq.io import atomic_write_bytes
from hawq.passes import as_pair
from hawq.plan import BitPlan, LayerSpec, QuantConfig
from hawq.qmodules import ActQuantizer, QuantMixin
from hawq.quantizers import is_float
from hawq.surgery import quantizable_layers, quantize_

CHECKPOINT = "last.pt"


@dataclass
class FinetuneConfig:
    """Options of :func:`finetune` (see the module docstring for what each does)."""

    epochs: int = 1
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"          # "cosine" | "step" (x0.1 at 50% and 75%) | "constant"
    batch_size: int = 128
    steps_per_epoch: int | None = None  # cap (a subset of each epoch), for quick runs
    distill: float = 0.0              # weight of the KD loss, 0 = plain cross-entropy
    temperature: float = 4.0
    augment: str = "auto"             # "cifar" crop+flip | "none" | "auto": cifar for 3x32x32
    act_range: str = "ema"            # "ema" | "fixed"
    ema: float = 0.99
    bn_fold_at: float | None = 0.5    # fraction of steps after which BN is folded; None = never
    fold_lr_scale: float = 0.1        # lr factor once BN is folded (no BN: much less stable)
    fold_precondition: bool = True    # scale folded weights' grads by s^2 (= frozen-BN training)
    learn_steps: bool = True          # LSQ: train weight/activation step sizes (QuantConfig)
    staged: bool = False              # HAWQ-V1 stages in decreasing Omega order
    stages: int | None = None         # merge blocks into this many stages (None: one per block)
    calib_samples: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.epochs) < 1:
            raise ConfigError(f"epochs={self.epochs}: fine-tune for at least 1 epoch")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr={self.lr}: the learning rate must be a positive number")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"schedule={self.schedule!r}: use 'cosine', 'step' or 'constant'")
        if self.augment not in ("auto", "cifar", "none"):
            raise ConfigError(f"augment={self.augment!r}: use 'auto', 'cifar' or 'none'")
        if self.act_range not in ("ema", "fixed"):
            raise ConfigError(f"act_range={self.act_range!r}: use 'ema' or 'fixed'")
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"distill={self.distill}: the KD weight must be in [0, 1]")
        if self.bn_fold_at is not None and not 0.0 <= self.bn_fold_at <= 1.0:
            raise ConfigError(f"bn_fold_at={self.bn_fold_at}: a fraction in [0, 1] or None")
        if self.stages is not None and self.stages < 1:
            raise ConfigError(f"stages={self.stages}: at least 1 stage")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: per-epoch history, the stage order, timing."""

    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    stages: list[list[str]] = field(default_factory=list)
    folded: list[list[str]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    resumed_from_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- helpers

def lr_at(cfg: FinetuneConfig, step: int, total: int) -> float:
    """Learning rate at global ``step`` of ``total`` (a pure function: resuming needs no state)."""
    t = step / max(1, total)
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** ((t >= 0.5) + (t >= 0.75)))
    return cfg.lr


def augment_cifar(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` and random horizontal flip, per sample.

    Vectorised: one gather for the whole batch. ``x`` is (N, C, H, W).
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)  # drawn on the CPU generator,
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)  # so any device draws the same
    flip = torch.rand(n, generator=gen) < 0.5
    rows = oy[:, None] + torch.arange(h)[None]                         # (N, H)
    cols = ox[:, None] + torch.arange(w)[None]                         # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    rows = rows.to(x.device)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(layer, batchnorm) names where the BatchNorm's input *is* the layer's output tensor.

    Found by hooks on one forward of ``example`` (so it follows the real data flow, not module
    order). Assumes the layer's output feeds only that BatchNorm, as in Conv->BN->ReLU stacks.
    """
    outs: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []
    layers = quantizable_layers(model)
    for name, m in layers.items():
        hooks.append(m.register_forward_hook(
            lambda _m, _i, out, name=name: outs.__setitem__(id(out), name)))
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def pre(_m, inputs, name=name):
                src = outs.get(id(inputs[0]))
                if src is not None:
                    pairs.append((src, name))
            hooks.append(m.register_forward_pre_hook(pre))
    was = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return pairs


@torch.no_grad()
def bn_scales(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Per-output-channel factor s = g/sqrt(v+eps) that :func:`fold_bn_` will multiply each
    layer's weight by (computed before folding; pairs whose BatchNorm is gone are skipped)."""
    out = {}
    for layer_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        inv = 1.0 / torch.sqrt(bn.running_var + bn.eps)
        out[layer_name] = (bn.weight * inv if bn.affine else inv).detach().clone()
    return out


@torch.no_grad()
def fold_bn_(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Fold each BatchNorm of ``pairs`` into its layer's weight and bias, in place.

    The BatchNorm becomes ``nn.Identity``; a layer without bias gets one. Uses the running
    statistics (eval-mode BatchNorm), so the model's eval output is unchanged up to rounding.
    Returns the pairs folded.
    """
    done = []
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        bn = model.get_submodule(bn_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(scale)
        w = layer.weight
        if isinstance(layer, nn.Linear) or w.shape[0] == scale.numel():
            w.mul_(scale.reshape(-1, *([1] * (w.dim() - 1))))
            step = getattr(layer, "w_step", None)
            if step is not None:  # learned steps follow their channel's weights
                step.mul_(scale.abs() if step.dim() else scale.abs().max())
        else:
            raise ConfigError(f"cannot fold {bn_name} into {layer_name}: {scale.numel()} "
                              f"BatchNorm channels vs {w.shape[0]} output channels")
        b = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        new_b = shift + (b - bn.running_mean) * scale
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.detach().clone())
        else:
            layer.bias.copy_(new_b)
        _set_child(model, bn_name, nn.Identity())
        done.append((layer_name, bn_name))
    return done


def default_blocks(names: Sequence[str]) -> list[list[str]]:
    """Group layer names into blocks by their parent module (``layer1.0.conv1`` -> ``layer1.0``),
    keeping the order of first appearance; a top-level layer is its own block."""
    blocks: dict[str, list[str]] = {}
    for n in names:
        key = n.rpartition(".")[0] or n
        blocks.setdefault(key, []).append(n)
    return list(blocks.values())


def staged_order(model: nn.Module, plan: BitPlan, data: Any, names: Sequence[str],
                 blocks: Sequence[Sequence[str]] | None = None, samples: int = 256,
                 seed: int = 0, config: QuantConfig | None = None,
                 progress: bool = False) -> tuple[list[list[str]], list[float]]:
    """HAWQ-V1 block order: blocks sorted by decreasing Omega_B = sum_i lambda_i ||Q(W_i)-W_i||^2.

    lambda_i is the top Hessian eigenvalue of layer i on ``samples`` training points and Q the
    plan's bits for that layer. Returns (blocks in order, their Omegas). Cost: power iteration
    per layer (see :func:`hawq.hessian.analyze` with ``metric="eigen"``).
    """
    from hawq.hessian import analyze
    from hawq.sensitivity import weight_errors

    x, y = as_pair(data, "train data")
    res = analyze(model, (x[:samples], y[:samples]), metric="eigen", layers=list(names),
                  seed=seed, progress=progress)
    lam = {lh.name: float(lh.eigenvalue) for lh in res.layers}
    omega = {}
    for n in names:
        spec = plan.spec_for(n)
        bits = 32 if spec is None else spec.w_bits
        err = weight_errors(model, [n], [bits], config or QuantConfig())[0, 0]
        omega[n] = lam[n] * float(err)
    blocks = [list(b) for b in (blocks or default_blocks(names))]
    scores = [sum(omega[n] for n in b) for b in blocks]
    order = sorted(range(len(blocks)), key=lambda i: (-scores[i], i))
    return [blocks[i] for i in order], [scores[i] for i in order]


def _merge(blocks: list[list[str]], stages: int | None) -> list[list[str]]:
    if stages is None or stages >= len(blocks):
        return blocks
    chunks = np.array_split(np.arange(len(blocks)), stages)
    return [[n for i in c for n in blocks[i]] for c in chunks if len(c)]


# ----------------------------------------------------------------------------- training

class _EMARange:
    """Forward pre-hook on an ActQuantizer: in training mode, move its range toward the batch
    min/max by an exponential moving average before it quantizes."""

    def __init__(self, momentum: float):
        self.m = momentum

    @torch.no_grad()
    def __call__(self, q: ActQuantizer, inputs: tuple) -> None:
        if not q.training or q.state != "frozen" or is_float(q.bits) or q.learn:
            return
        x = inputs[0].detach()
        q.lo.mul_(self.m).add_((1 - self.m) * x.min())
        q.hi.mul_(self.m).add_((1 - self.m) * x.max())


def _stage_plan(plan: BitPlan, names: Sequence[str], active: set[str]) -> BitPlan:
    layers = {}
    for n in names:
        spec = plan.spec_for(n)
        layers[n] = spec if (spec is not None and n in active) else LayerSpec(32, 32)
    return BitPlan(layers)


@torch.no_grad()
def _calibrate(model: nn.Module, names: Sequence[str], x: torch.Tensor, batch: int) -> None:
    mods = quantizable_layers(model)
    qs = [mods[n].act for n in names if isinstance(mods[n], QuantMixin)
          and not is_float(mods[n].act.bits)]
    if not qs:
        return
    for q in qs:
        q.state = "calibrating"
    was = model.training
    model.eval()
    try:
        for xb in x.split(batch):
            model(xb)
    finally:
        model.train(was)
    for q in qs:
        q.freeze()


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                    reduction="batchmean", log_target=True) * t * t


def finetune(model: nn.Module, plan: BitPlan, train: Any, config: FinetuneConfig | None = None,
             *, quant: QuantConfig | None = None, eval_data: Any = None,
             checkpoint_dir: str | Path | None = None, resume: bool = False,
             blocks: Sequence[Sequence[str]] | None = None, progress: bool = True,
             stop_after_epoch: int | None = None) -> FinetuneResult:
    """Quantization-aware fine-tuning of ``model`` (in place) under ``plan``.

    ``train``: a TensorDataset or (inputs, labels) pair. ``eval_data`` (optional) is scored
    after every epoch. ``blocks`` (staged only) groups layer names; default: by parent module.
    ``stop_after_epoch`` ends the run early after that epoch (used to test resuming).
    Returns a :class:`FinetuneResult`; the model is left in eval mode, quantized (BatchNorm
    folded when ``bn_fold_at`` is not None) and ready for :func:`hawq.evaluate` or export.
    Cost: see the module docstring.
    """
    cfg = config or FinetuneConfig()
    quant = quant or QuantConfig()
    if cfg.learn_steps:
        quant = replace(quant, learn_steps=True)
    x, y = as_pair(train, "train data")
    if checkpoint_dir is None and resume:
        raise ConfigError("resume=True needs checkpoint_dir= (where last.pt was written)")
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    names = list(quantizable_layers(model))
    calib_x = x[:cfg.calib_samples].to(device)
    teacher = None
    if cfg.distill > 0:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    # the stage order is computed on the float model, before any quantization
    if cfg.staged:
        ordered, _ = staged_order(model, plan, (x, y), names, blocks, seed=cfg.seed,
                                  config=quant, progress=False)
        stages = _merge(ordered, cfg.stages)
    else:
        stages = [names]
    pairs = conv_bn_pairs(model, calib_x[:2]) if cfg.bn_fold_at is not None else []

    n = len(x)
    full_steps = max(1, n // cfg.batch_size)  # drop the last partial batch
    steps_per_epoch = min(full_steps, cfg.steps_per_epoch or full_steps)
    total = steps_per_epoch * int(cfg.epochs)
    stage_len = total / len(stages)
    fold_step = None if cfg.bn_fold_at is None else int(round(cfg.bn_fold_at * total))

    def stage_of(step: int) -> int:
        return min(len(stages) - 1, int(step // stage_len)) if stage_len > 0 else 0

    augment = cfg.augment == "cifar" or (cfg.augment == "auto" and x.dim() == 4
                                         and tuple(x.shape[1:]) == (3, 32, 32))
    ema_hook = _EMARange(cfg.ema)
    hooks: list[Any] = []
    fold_scales: dict[str, torch.Tensor] = {}    # s per folded layer, kept for the preconditioner
    precond: list[tuple[nn.Parameter, torch.Tensor]] = []

    def build(stage: int, folded: bool) -> None:
        """Put the model in the structure of ``stage`` (twins for every layer, bits for the
        layers of stages <= ``stage``), folded or not."""
        active = {n_ for s in stages[:stage + 1] for n_ in s}
        want = _stage_plan(plan, names, active).layers
        mods = quantizable_layers(model)
        changed = {n_: spec for n_, spec in want.items()  # keep calibrated twins as they are
                   if not (isinstance(mods[n_], QuantMixin) and mods[n_].w_bits == spec.w_bits
                           and mods[n_].a_bits == spec.a_bits)}
        if changed:
            quantize_(model, BitPlan(changed), quant)
        if folded:
            fold_bn_(model, pairs)
        for h in hooks:
            h.remove()
        hooks.clear()
        if cfg.act_range == "ema":
            for m in model.modules():
                if isinstance(m, ActQuantizer):
                    hooks.append(m.register_forward_pre_hook(ema_hook))
        precond.clear()
        if folded and cfg.fold_precondition:
            mods = dict(model.named_modules())
            for n_, s_ in fold_scales.items():
                w = mods[n_].weight
                precond.append((w, (s_ ** 2).to(w).reshape(-1, *([1] * (w.dim() - 1)))))
                step = getattr(mods[n_], "w_step", None)
                if step is not None and step.dim() == 1:  # d(s*step)/d step: same s^2
                    precond.append((step, (s_ ** 2).to(step)))

    def make_opt() -> torch.optim.Optimizer:
        steps = [p for k, p in model.named_parameters()
                 if k.endswith("w_step") or k.endswith("act.step")]
        ids = {id(p) for p in steps}
        groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
        if steps:  # step sizes are not decayed
            groups.append({"params": steps, "weight_decay": 0.0})
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    gen = torch.Generator().manual_seed(cfg.seed)
    result = FinetuneResult(config=asdict(cfg), stages=stages)
    start_epoch, step, stage, folded = 0, 0, 0, False
    if resume and ckpt_path is not None and ckpt_path.exists():
        # on the CPU: the generator states must stay there; load_state_dict copies the
        # weights and optimizer state onto the model's device (so a GPU run resumes anywhere)
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        stage, folded = state["stage"], state["folded"]
        fold_scales.update(state.get("fold_scales", {}))
        build(stage, folded)
        model.load_state_dict(state["model"])
        for m in model.modules():
            if isinstance(m, ActQuantizer) and not is_float(m.bits):
                m.state = "frozen"
        opt = make_opt()
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step = state["epoch"], state["step"]
        result.history = state["history"]
        result.folded = [list(p) for p in pairs] if folded else []
        result.resumed_from_epoch = start_epoch
    else:
        build(0, False)
        _calibrate(model, stages[0], calib_x, cfg.batch_size)
        opt = make_opt()

    try:
        for epoch in range(start_epoch, int(cfg.epochs)):
            model.train()
            perm = torch.randperm(n, generator=gen)[:steps_per_epoch * cfg.batch_size]
            bar = tqdm(perm.split(cfg.batch_size), total=steps_per_epoch,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
            loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
            for idx in bar:
                idx = idx.to(x.device)
                want = stage_of(step)
                if want != stage:  # next HAWQ-V1 stage: quantize its blocks, calibrate them
                    stage = want
                    build(stage, folded)
                    _calibrate(model, stages[stage], calib_x, cfg.batch_size)
                    opt = make_opt()
                if fold_step is not None and not folded and step >= fold_step:
                    model.eval()
                    fold_scales.update(bn_scales(model, pairs))
                    build(stage, True)
                    folded = True
                    result.folded = [list(p) for p in pairs]
                    opt = make_opt()
                    model.train()
                xb, yb = x[idx].to(device), y[idx].to(device)
                if augment:
                    xb = augment_cifar(xb, gen)
                lr = lr_at(cfg, step, total) * (cfg.fold_lr_scale if folded else 1.0)
                for g in opt.param_groups:
                    g["lr"] = lr
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(xb)
                    loss = (1 - cfg.distill) * loss + cfg.distill * _kd_loss(out, t_out,
                                                                             cfg.temperature)
                if not torch.isfinite(loss):
                    raise NumericalError(f"loss is {float(loss.detach())} at epoch {epoch + 1}, step "
                                         f"{step}: lower lr (now {lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p_, s2 in precond:
                    if p_.grad is not None:
                        p_.grad.mul_(s2)
                opt.step()
                step += 1
                loss_sum += float(loss.detach()) * len(yb)
                correct += int((out.argmax(1) == yb).sum())
                seen += len(yb)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            row = {"epoch": epoch + 1, "step": step, "loss": loss_sum / max(1, seen),
                   "train_accuracy": correct / max(1, seen), "lr": lr_at(cfg, step, total),
                   "stage": stage, "folded": folded, "seconds": time.perf_counter() - t0}
            if eval_data is not None:
                from hawq.evaluate import evaluate

                row["eval_accuracy"] = evaluate(model, eval_data).accuracy
            result.history.append(row)
            if ckpt_path is not None:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                            "epoch": epoch + 1, "step": step, "stage": stage, "folded": folded,
                            "fold_scales": fold_scales, "history": result.history}, buf)
                atomic_write_bytes(ckpt_path, buf.getvalue())
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        else:
            # every stage must be quantized and BN folded in the final model
            if stage != len(stages) - 1:
                stage = len(stages) - 1
                build(stage, folded)
                _calibrate(model, stages[stage], calib_x, cfg.batch_size)
            if fold_step is not None and not folded:
                model.eval()
                fold_scales.update(bn_scales(model, pairs))
                build(stage, True)
                folded = True
                result.folded = [list(p) for p in pairs]
    finally:
        for h in hooks:
            h.remove()
    model.eval()
    result.steps = step
    result.seconds = time.perf_counter() - t_start
    return result
