"""Quantization-aware fine-tuning (QAT) and HAWQ's Hessian-ordered staged schedule.

:func:`finetune` trains a model under a :class:`~hawq.maths.plan.BitPlan` with fake-quantized weights
and activations (straight-through gradients). The model is fed and its loss taken through a
:class:`hawq.feed.tasks.Task` (``task=``, default ``"classification"``: cross-entropy on (inputs,
labels)), so token models, Hugging Face models and sentence encoders train the same way; the
data may be anything :func:`hawq.feed.tasks.iter_batches` reads.

* **Data order**: in-memory data (tensors, (inputs, labels) pairs, TensorDatasets, dicts of
  tensors) and map-style Datasets are shuffled every epoch by a generator seeded with ``seed``
  (a permutation, the last partial batch dropped), so runs and resumes are exact; a DataLoader
  (or any re-iterable of batches) is iterated as given, its own shuffling included.
* **Activations**: each quantizer is calibrated (min/max) on ``calib_samples`` training samples
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
* **Knowledge distillation** (``distill`` > 0) from a frozen copy of the FP32 model: the
  temperature-scaled KL between the softmaxes of the logits, for tasks whose outputs are logits
  (``classification``; ``causal-lm`` per token, padding masked). Tasks whose outputs are not
  logits (``embedding``, ``loss-dict``, custom losses) have no soft targets: their plain task
  loss is used alone (a warning says so; the ``embedding`` loss already pulls the output to the
  float model's).
* **CIFAR augmentation**: random crop (4-pixel zero padding) and horizontal flip, vectorised;
  only for the classification task on in-memory 4-D image tensors (a DataLoader augments in its
  own dataset).
* **Staged (HAWQ-V1)**: ``staged=True`` quantizes blocks stage by stage in decreasing
  Omega_i = lambda_i * ||Q(W_i) - W_i||^2 (:func:`staged_order`); layers of later stages stay
  float until their stage starts; stages share the step budget evenly.
* **Checkpoints**: after every epoch (atomically) to ``checkpoint_dir/last.pt`` with the model,
  optimizer, data-order generator, stage and fold state; ``resume=True`` continues from it and
  reproduces the uninterrupted run exactly (same threads, same device). The file holds only
  tensors and plain values and is read with ``torch.load(weights_only=True)`` (nothing in it
  is unpickled into arbitrary objects, so a crafted checkpoint cannot run code); it records
  what it was made under (the plan's bits per layer, the config, the data size, the task)
  and resuming under anything else is a :class:`ConfigError` naming each field that differs.

Cost: ``epochs`` passes over ``train`` (forward + backward, plus the teacher's forward with
distillation, plus the task's metric on each batch: for ``embedding`` one more forward of the
float reference), one calibration pass over ``calib_samples`` per stage, and for ``staged=True``
the eigenvalue analysis of :func:`staged_order` (power iteration, ~20 HVPs per layer).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from hawq.base.errors import ConfigError, DataError, NumericalError
from hawq.base.io import atomic_write_bytes
from hawq.maths.plan import BitPlan, LayerSpec, QuantConfig
from hawq.modules.qmodules import ActQuantizer, QuantMixin
from hawq.maths.quantizers import is_float
from hawq.modules.surgery import quantizable_layers, quantize_
from hawq.feed.tasks import (Batches, ClassificationTask, Task, as_task, batch_len, batch_to, iter_batches,
                        leaf_tensors, logits_of, materialize, split_batch)

__all__ = ["CHECKPOINT", "FinetuneConfig", "FinetuneResult", "augment_cifar", "bn_scales",
           "conv_bn_pairs", "default_blocks", "finetune", "fold_bn_", "has_soft_targets", "lr_at",
           "staged_order"]

log = logging.getLogger(__name__)

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
    distill: float = 0.0              # weight of the KD loss, 0 = the plain task loss
    temperature: float = 4.0
    augment: str = "auto"             # "cifar" crop+flip | "none" | "auto": cifar for 3x32x32
    #                                   (classification on in-memory 4-D images only)
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
def conv_bn_pairs(model: nn.Module, example: Any,
                  task: Task | str | None = None) -> list[tuple[str, str]]:
    """(layer, batchnorm) names where the BatchNorm's input *is* the layer's output tensor.

    Found by hooks on one forward of ``example`` (so it follows the real data flow, not module
    order): ``model(example)`` when ``task`` is None, else ``task.forward(model, example)`` with
    ``example`` a batch of the task's form. Assumes the layer's output feeds only that
    BatchNorm, as in Conv->BN->ReLU stacks. Cost: one forward of ``example``.
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
        if task is None:
            model(example)
        else:
            as_task(task).forward(model, example)
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
                 progress: bool = False, task: Task | str | None = None
                 ) -> tuple[list[list[str]], list[float]]:
    """HAWQ-V1 block order: blocks sorted by decreasing Omega_B = sum_i lambda_i ||Q(W_i)-W_i||^2.

    lambda_i is the top Hessian eigenvalue of the ``task``'s loss (default classification) for
    layer i on the first ``samples`` training samples of ``data`` (any form
    :func:`hawq.feed.tasks.iter_batches` reads) and Q the plan's bits for that layer. Returns
    (blocks in order, their Omegas). Cost: power iteration per layer (see
    :func:`hawq.analysis.hessian.analyze` with ``metric="eigen"``).
    """
    from hawq.analysis.hessian import analyze
    from hawq.analysis.sensitivity import weight_errors

    pair = _plain_pair(as_task(task), data)
    if pair is not None:  # the classifier on (x, y) tensors: as it always was
        x, y = pair
        res = analyze(model, (x[:samples], y[:samples]), metric="eigen", layers=list(names),
                      seed=seed, progress=progress)
    else:
        chunks = Batches(materialize(data, samples, "train data", limit=samples))
        res = analyze(model, chunks, metric="eigen", layers=list(names), seed=seed,
                      progress=progress, task=as_task(task))
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


def _is_plain_classification(task: Task) -> bool:
    return type(task) is ClassificationTask and task.loss_fn is None \
        and task.forward_fn is None and task.metric_fn is None


def _plain_pair(task: Task, data: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs, labels) when ``task`` is the built-in classifier and ``data`` a TensorDataset or
    an (inputs, labels) tensor pair (the paths kept number for number), else None."""
    if not _is_plain_classification(task):
        return None
    tensors = getattr(data, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2 \
            and all(torch.is_tensor(t) for t in tensors[:2]):
        x, y = tensors[:2]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]) \
            and torch.is_tensor(data[1]):
        x, y = data
    else:
        return None
    return (x, y) if len(x) == len(y) and len(x) > 0 else None


def _whole(data: Any, who: str) -> Any:
    """``data`` as one in-memory structure (a tensor, a tuple of tensors or dicts of tensors such
    as ``(inputs, labels)`` or ``(images, {"boxes": ..., "labels": ...})``, a dict of tensors;
    every tensor with the same number of samples) or None when it is a Dataset or an iterable
    of batches (as :func:`hawq.feed.tasks.iter_batches` tells them apart). Raises
    :class:`DataError` naming ``who`` for tensors of different lengths or no samples."""
    tensors = getattr(data, "tensors", None)
    if torch.is_tensor(data):
        whole = data
    elif isinstance(tensors, (tuple, list)) and tensors \
            and all(torch.is_tensor(t) for t in tensors):  # a TensorDataset
        whole = tuple(tensors)
    elif (isinstance(data, Mapping) and data) or (isinstance(data, tuple)
                                                  and 1 <= len(data) <= 3):
        if leaf_tensors(data) is None:
            return None
        whole = dict(data) if isinstance(data, Mapping) else data
    elif isinstance(data, list) and len(data) == 2:
        leaves = leaf_tensors(data)  # [inputs, labels]; two batches of other sizes are batches
        if leaves is None or any(t.dim() == 0 for t in leaves) \
                or len({int(t.shape[0]) for t in leaves}) != 1:
            return None
        whole = tuple(data)
    else:
        return None
    lens = [int(t.shape[0]) if t.dim() else None for t in leaf_tensors(whole)]
    if None in lens or len(set(lens)) != 1:
        raise DataError(f"{who} has tensors of {lens} samples; every tensor needs the same "
                        "number of samples (first dimension)")
    if lens[0] == 0:
        raise DataError(f"{who} holds no samples")
    return whole


def _take(data: Any, idx: torch.Tensor, n: int) -> Any:
    """The samples ``idx`` of in-memory ``data`` (tensors with ``n`` leading rows are indexed,
    others kept; tuples, lists and dicts followed)."""
    if torch.is_tensor(data):
        return data[idx.to(data.device)] if data.dim() and data.shape[0] == n else data
    if isinstance(data, Mapping):
        return {k: _take(v, idx, n) for k, v in data.items()}
    if isinstance(data, tuple):
        return tuple(_take(v, idx, n) for v in data)
    if isinstance(data, list):
        return [_take(v, idx, n) for v in data]
    return data


def has_soft_targets(task: Task) -> bool:
    """Whether ``task``'s outputs are logits whose softmax is a distribution over classes or
    tokens (accuracy/perplexity tasks: ``classification``, ``causal-lm``), so knowledge
    distillation can match them; False for ``embedding``, ``loss-dict`` and custom losses."""
    return task.metric in ("accuracy", "perplexity")


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
def _calibrate(model: nn.Module, names: Sequence[str], batches: Sequence[Any],
               task: Task) -> None:
    """Calibrate the activation quantizers of ``names`` on ``batches`` (fed by ``task``)."""
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
        for b in batches:
            task.forward(model, b)
    finally:
        model.train(was)
    for q in qs:
        q.freeze()


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                    reduction="batchmean", log_target=True) * t * t


def _kd_term(out: Any, t_out: Any, batch: Any, t: float) -> torch.Tensor:
    """Knowledge-distillation loss of the student's logits ``out`` against the teacher's
    ``t_out``: temperature-scaled KL of the softmaxes over the last dimension, averaged over
    samples ((N, K) logits) or over positions ((N, S, V) token logits; positions with
    ``attention_mask == 0`` left out)."""
    s, te = _logits_for_distill(out), _logits_for_distill(t_out)
    if s.dim() > 2:
        k = s.shape[-1]
        s, te = s.reshape(-1, k), te.reshape(-1, k)
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if torch.is_tensor(mask) and mask.numel() == s.shape[0]:
            keep = mask.reshape(-1).to(s.device) != 0
            s, te = s[keep], te[keep]
    return _kd_loss(s, te, t)


def finetune(model: nn.Module, plan: BitPlan, train: Any, config: FinetuneConfig | None = None,
             *, quant: QuantConfig | None = None, eval_data: Any = None,
             checkpoint_dir: str | Path | None = None, resume: bool = False,
             blocks: Sequence[Sequence[str]] | None = None, progress: bool = True,
             stop_after_epoch: int | None = None,
             task: Task | str | None = None) -> FinetuneResult:
    """Quantization-aware fine-tuning of ``model`` (in place) under ``plan``.

    ``train``: anything :func:`hawq.feed.tasks.iter_batches` reads. In-memory data (a TensorDataset,
    an (inputs, labels) pair, a tensor, a dict of tensors) and map-style Datasets are shuffled
    per epoch by a generator seeded with ``config.seed`` (last partial batch dropped); a
    DataLoader or another re-iterable of batches is iterated as given (``steps_per_epoch`` is
    required when it has no ``len()``). ``task`` (a :class:`hawq.feed.tasks.Task`, a registered name
    or a loss callable; default ``"classification"``) feeds the model and gives the training
    loss; an ``embedding`` task not yet bound is bound to ``model`` (the float model) here.
    ``eval_data`` (optional) is scored with the task's metric after every epoch. ``blocks``
    (staged only) groups layer names; default: by parent module. ``stop_after_epoch`` ends the
    run early after that epoch (used to test resuming).
    Returns a :class:`FinetuneResult` whose history rows hold ``loss``,
    ``train_<metric>`` (``train_accuracy`` for classification) and ``eval_<metric>``; the
    model is left in eval mode, quantized (BatchNorm folded when ``bn_fold_at`` is not None)
    and ready for :func:`hawq.modules.evaluate` or export. Raises :class:`ConfigError` for options that
    do not fit the data or task, :class:`DataError` for data the task cannot use,
    :class:`NumericalError` on a NaN/inf loss. Cost: see the module docstring.
    """
    cfg = config or FinetuneConfig()
    quant = quant or QuantConfig()
    if cfg.learn_steps:
        quant = replace(quant, learn_steps=True)
    task = as_task(task)
    if task.reference is None:
        task = task.bind(model)  # embedding: a frozen copy of the float model (others: as is)
    if checkpoint_dir is None and resume:
        raise ConfigError("resume=True needs checkpoint_dir= (where last.pt was written)")
    whole = _whole(train, "train data")
    if whole is not None:
        kind = "whole"
    elif isinstance(train, torch.utils.data.Dataset) and hasattr(train, "__len__") \
            and not isinstance(train, torch.utils.data.IterableDataset):
        kind = "dataset"
        if len(train) == 0:
            raise DataError("train data is an empty Dataset")
    else:
        kind = "loader"
        if isinstance(train, (str, bytes)) or not hasattr(train, "__iter__"):
            raise DataError(f"train data of type {type(train).__name__} is not data hawq can "
                            "read: give tensors, an (inputs, labels) pair, a dict of tensors, a "
                            "Dataset or a DataLoader")
        if isinstance(train, Iterator):
            raise ConfigError("train data is a one-shot iterator (a generator?): fine-tuning "
                              "reads it once per epoch and for calibration; give a DataLoader "
                              "or a list of batches")
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    names = list(quantizable_layers(model))
    source = whole if kind == "whole" else train
    calib = [batch_to(b, device) for b in
             iter_batches(source, cfg.batch_size, "train data", limit=cfg.calib_samples)]
    soft = has_soft_targets(task)
    teacher = None
    if cfg.distill > 0 and soft:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    elif cfg.distill > 0:
        log.warning("distill=%s ignored: task %r has no logits to distil (soft targets); "
                    "training on its plain loss", cfg.distill, task.name)

    # the stage order is computed on the float model, before any quantization
    if cfg.staged:
        ordered, _ = staged_order(model, plan, source, names, blocks, seed=cfg.seed,
                                  config=quant, progress=False, task=task)
        stages = _merge(ordered, cfg.stages)
    else:
        stages = [names]
    pairs = conv_bn_pairs(model, split_batch(calib[0], 2)[0], task) \
        if cfg.bn_fold_at is not None else []

    if kind == "loader":
        try:
            full_steps = len(train)
        except TypeError:
            full_steps = None
        if full_steps is None and cfg.steps_per_epoch is None:
            raise ConfigError("train data has no len() (an iterable DataLoader?): give "
                              "FinetuneConfig(steps_per_epoch=...) so the schedule knows the "
                              "epoch length")
        full_steps = max(1, full_steps if full_steps is not None else cfg.steps_per_epoch)
        n = None
    else:
        n = batch_len(whole) if kind == "whole" else len(train)
        full_steps = max(1, n // cfg.batch_size)  # drop the last partial batch
    steps_per_epoch = min(full_steps, cfg.steps_per_epoch or full_steps)
    total = steps_per_epoch * int(cfg.epochs)
    stage_len = total / len(stages)
    fold_step = None if cfg.bn_fold_at is None else int(round(cfg.bn_fold_at * total))

    def stage_of(step: int) -> int:
        return min(len(stages) - 1, int(step // stage_len)) if stage_len > 0 else 0

    images = kind == "whole" and isinstance(task, ClassificationTask) \
        and isinstance(whole, tuple) and torch.is_tensor(whole[0]) and whole[0].dim() == 4
    if cfg.augment == "cifar" and not images:
        raise ConfigError("augment='cifar' crops and flips images: it needs the classification "
                          "task on in-memory (N, C, H, W) inputs with labels; use "
                          "augment='none' (augment a DataLoader in its dataset)")
    augment = images and (cfg.augment == "cifar" or (
        cfg.augment == "auto" and tuple(whole[0].shape[1:]) == (3, 32, 32)))
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

    def epoch_batches():
        """This epoch's training batches (on their source device)."""
        if kind == "loader":
            for k, b in enumerate(iter_batches(train, cfg.batch_size, "train data")):
                if k >= steps_per_epoch:
                    return
                yield b
            return
        perm = torch.randperm(n, generator=gen)[:steps_per_epoch * cfg.batch_size]
        for idx in perm.split(cfg.batch_size):
            if kind == "whole":
                yield _take(whole, idx, n)
            else:
                yield torch.utils.data.default_collate([train[int(i)] for i in idx])

    result = FinetuneResult(config=asdict(cfg), stages=stages)
    made_under = _made_under(cfg, plan, names, quant, task,
                             n if n is not None else "loader", steps_per_epoch)
    start_epoch, step, stage, folded = 0, 0, 0, False
    if resume and ckpt_path is not None and ckpt_path.exists():
        # on the CPU: the generator states must stay there; load_state_dict copies the
        # weights and optimizer state onto the model's device (so a GPU run resumes anywhere)
        state = _read_checkpoint(ckpt_path, made_under, len(stages), int(cfg.epochs))
        stage, folded = state["stage"], state["folded"]
        fold_scales.update(state["fold_scales"])
        try:
            build(stage, folded)
            model.load_state_dict(state["model"])
            for m in model.modules():
                if isinstance(m, ActQuantizer) and not is_float(m.bits):
                    m.state = "frozen"
            opt = make_opt()
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise DataError(f"checkpoint {str(ckpt_path)!r} does not fit this model "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:300]}): delete it "
                            "or drop --resume (resume=False)") from e
        start_epoch, step = state["epoch"], state["step"]
        result.history = [dict(h) for h in state["history"]]
        result.folded = [list(p) for p in pairs] if folded else []
        result.resumed_from_epoch = start_epoch
    else:
        build(0, False)
        _calibrate(model, stages[0], calib, task)
        opt = make_opt()

    metric_key = f"train_{task.metric}"
    try:
        for epoch in range(start_epoch, int(cfg.epochs)):
            model.train()
            bar = tqdm(epoch_batches(), total=steps_per_epoch,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
            loss_sum, m_sum, m_count, seen, t0 = 0.0, 0.0, 0, 0, time.perf_counter()
            for batch in bar:
                want = stage_of(step)
                if want != stage:  # next HAWQ-V1 stage: quantize its blocks, calibrate them
                    stage = want
                    build(stage, folded)
                    _calibrate(model, stages[stage], calib, task)
                    opt = make_opt()
                if fold_step is not None and not folded and step >= fold_step:
                    model.eval()
                    fold_scales.update(bn_scales(model, pairs))
                    build(stage, True)
                    folded = True
                    result.folded = [list(p) for p in pairs]
                    opt = make_opt()
                    model.train()
                batch = batch_to(batch, device)
                if augment:
                    batch = (augment_cifar(batch[0], gen), *batch[1:])
                lr = lr_at(cfg, step, total) * (cfg.fold_lr_scale if folded else 1.0)
                for g in opt.param_groups:
                    g["lr"] = lr
                out = task.forward(model, batch)
                loss = task.loss(out, batch)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = task.forward(teacher, batch)
                    loss = (1 - cfg.distill) * loss + cfg.distill * _kd_term(out, t_out, batch,
                                                                             cfg.temperature)
                if not torch.is_tensor(loss) or loss.dim() != 0:
                    raise ConfigError(f"task {task.name!r}: the loss must be a scalar tensor, "
                                      f"got {getattr(loss, 'shape', type(loss).__name__)}")
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
                nb = batch_len(batch)
                loss_sum += float(loss.detach()) * nb
                with torch.no_grad():
                    ms, mc = task.metric_sums(out, batch)
                m_sum, m_count, seen = m_sum + float(ms), m_count + int(mc), seen + nb
                bar.set_postfix({"loss": f"{loss_sum / seen:.3f}",
                                 task.metric: f"{task.finish_metric(m_sum, m_count):.3f}"})
            row = {"epoch": epoch + 1, "step": step, "loss": loss_sum / max(1, seen),
                   metric_key: task.finish_metric(m_sum, m_count),
                   "lr": lr_at(cfg, step, total),
                   "stage": stage, "folded": folded, "seconds": time.perf_counter() - t0}
            if eval_data is not None:
                from hawq.modules.evaluate import evaluate

                row[f"eval_{task.metric}"] = evaluate(model, eval_data, task=task).value
            result.history.append(row)
            if ckpt_path is not None:
                buf = io.BytesIO()
                torch.save({"format": _CKPT_FORMAT, "made_under": json.dumps(made_under),
                            "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                            "epoch": epoch + 1, "step": step, "stage": stage,
                            "folded": bool(folded), "fold_scales": dict(fold_scales),
                            "history": _plain(result.history)}, buf)
                atomic_write_bytes(ckpt_path, buf.getvalue())
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        else:
            # every stage must be quantized and BN folded in the final model
            if stage != len(stages) - 1:
                stage = len(stages) - 1
                build(stage, folded)
                _calibrate(model, stages[stage], calib, task)
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


# ----------------------------------------------------------------------------- checkpoints

_CKPT_FORMAT = "hawq-finetune-checkpoint-1"


def _plain(v: Any) -> Any:
    """``v`` as plain Python values (dict/list/str/int/float/bool/None; tensors kept): what
    ``torch.load(weights_only=True)`` reads back (numpy scalars and tuples are converted)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if v is None or isinstance(v, str) or torch.is_tensor(v):
        return v
    return str(v)


def _made_under(cfg: FinetuneConfig, plan: BitPlan, names: Sequence[str], quant: QuantConfig,
                task: Task, train_samples: int | str, steps_per_epoch: int) -> dict[str, Any]:
    """What a checkpoint was made under (JSON-ready): every field that changes the run."""
    bits = {}
    for n_ in names:
        spec = plan.spec_for(n_)
        bits[n_] = None if spec is None else [_plain(spec.w_bits), int(spec.a_bits)]
    out = {f"config.{k}": _plain(v) for k, v in asdict(cfg).items()}
    out.update({f"quant.{k}": _plain(v) for k, v in asdict(quant).items()})
    out.update({"task": str(task.name), "train_samples": train_samples,
                "steps_per_epoch (effective)": int(steps_per_epoch)})
    out.update({f"plan.{n_}": b for n_, b in bits.items()})
    return json.loads(json.dumps(out))  # as it reads back (tuples -> lists)


def _show(v: Any) -> str:
    text = json.dumps(v) if v is not None else "absent"
    return text if len(text) <= 60 else text[:57] + "..."


def _read_checkpoint(path: Path, made_under: dict[str, Any], n_stages: int,
                     epochs: int) -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``torch.load(weights_only=True)`` (tensors and
    plain values only: nothing is unpickled into arbitrary objects) and checked: its layout
    (DataError naming the file and saying to delete it or drop --resume) and what it was made
    under against ``made_under`` (ConfigError naming each field that differs, checkpoint value
    vs now). Cost: reading the file."""
    fix = "delete it or drop --resume (resume=False)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a forbidden global), a truncated zip, ...
        raise DataError(f"checkpoint {str(path)!r} cannot be loaded safely ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}): it is damaged, was written by "
                        f"another program or holds more than tensors and plain values; {fix}"
                        ) from None
    if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
        raise DataError(f"checkpoint {str(path)!r} is not a hawq fine-tuning checkpoint of this "
                        f"version (format {state.get('format') if isinstance(state, dict) else None!r}, "
                        f"expected {_CKPT_FORMAT!r}); {fix}")
    kinds = {"made_under": str, "model": dict, "optimizer": dict, "generator": torch.Tensor,
             "torch_rng": torch.Tensor, "epoch": int, "step": int, "stage": int, "folded": bool,
             "fold_scales": dict, "history": list}
    for key, kind in kinds.items():
        v = state.get(key)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise DataError(f"checkpoint {str(path)!r}: {key!r} is "
                            f"{type(v).__name__ if key in state else 'missing'}, expected "
                            f"{kind.__name__}; {fix}")
    if not all(isinstance(k, str) and torch.is_tensor(t) for k, t in state["fold_scales"].items()) \
            or not all(isinstance(h, dict) for h in state["history"]):
        raise DataError(f"checkpoint {str(path)!r}: 'fold_scales' or 'history' is malformed; "
                        f"{fix}")
    if not (0 <= state["stage"] < n_stages and 0 <= state["epoch"] <= epochs
            and state["step"] >= 0):
        raise DataError(f"checkpoint {str(path)!r}: stage {state['stage']}, epoch "
                        f"{state['epoch']}, step {state['step']} are out of range for this run "
                        f"({n_stages} stages, {epochs} epochs); {fix}")
    try:
        then = json.loads(state["made_under"])
    except ValueError:
        then = None
    if not isinstance(then, dict):
        raise DataError(f"checkpoint {str(path)!r}: its record of the settings it was made "
                        f"under is unreadable; {fix}")
    diff = [f"{k}: checkpoint {_show(then.get(k))} vs now {_show(made_under.get(k))}"
            for k in sorted(set(then) | set(made_under)) if then.get(k) != made_under.get(k)
            or (k in then) != (k in made_under)]
    if diff:
        more = f" (and {len(diff) - 12} more)" if len(diff) > 12 else ""
        raise ConfigError(f"checkpoint {str(path)!r} was made under other settings than this "
                          f"run: {'; '.join(diff[:12])}{more}. Resuming would mix two runs: use "
                          "another --out (checkpoint_dir) or drop --resume (resume=False) to "
                          "start over")
    return state


def _logits_for_distill(out: Any) -> torch.Tensor:
    return logits_of(out, "distillation")
