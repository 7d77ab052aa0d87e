"""ZeroQ: data-free mixed-precision post-training quantization (Cai et al., CVPR 2020).

Pipeline (:func:`zeroq`, ``hawq zeroq``): distil a batch of inputs from the model's BatchNorm
statistics (:mod:`hawq.analysis.distill`), measure each layer's sensitivity on them, pick weight bits on
the Pareto frontier (or by integer programming) under a size budget, quantize, calibrate the
activation ranges on the distilled data, and evaluate on real test data (for the report only:
no real data is used to build the quantized model).

Sensitivities:

* ``"kl"`` (ZeroQ): Omega_i(b) = mean_x KL(softmax M(W; x) || softmax M(W with only layer i's
  weight quantized to b bits; x)) over the distilled inputs x. One forward pass per (layer, bit
  width); the B bit widths of a layer run as one vmapped call (``torch.func``) when the model
  allows it, else one call each.
* ``"hessian"`` (data-free HAWQ-V2): Omega_i(b) = Tr(H_i)/n_i x ||Q_b(W_i) - W_i||^2 with the
  Hessian traces of :func:`hawq.analysis.hessian.analyze` on the distilled inputs, labelled by the FP32
  model's own predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from hawq.base import dist
from hawq.base.errors import ConfigError, NumericalError
from hawq.maths.plan import QuantConfig
from hawq.maths.quantizers import check_bits, fake_quantize, weight_qparams
from hawq.modules.surgery import quantizable_layers
from hawq.feed.tasks import (Batches, ClassificationTask, Task, as_task, batch_len, batch_to,
                        iter_batches, logits_of)

log = logging.getLogger(__name__)

__all__ = ["gaussian_data", "hessian_sensitivity", "kl_sensitivity"]


# ----------------------------------------------------------------------------- sensitivity

def _quantized_weights(w: torch.Tensor, bits: Sequence[int], config: QuantConfig) -> torch.Tensor:
    """(B, *w.shape): w fake-quantized at each bit width (float bits leave it unchanged)."""
    w = w.detach()
    return torch.stack([fake_quantize(w, weight_qparams(w, b, config.w_symmetric,
                                                        config.w_per_channel, config.w_clip))
                        for b in bits])


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Sum over samples of KL(p || q) per leading row: logp (N, K), logq (B, N, K) -> (B,)."""
    return (logp.exp() * (logp - logq)).sum(dim=(-1, -2))


class _TaskCall(nn.Module):
    """``model`` fed by ``task``: ``forward(batch) = task.forward(model, batch)``, so
    ``functional_call`` can swap the model's weights (named ``model.<name>``) under the task."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any) -> Any:
        return self.task.forward(self.model, batch)


def _log_probs(out: Any, tokens: bool) -> torch.Tensor:
    """Log-softmax of a model's logits in float64: (N, K) over the flattened output per sample
    (a classifier), or (N, P, K) over the last dimension per position (``tokens``)."""
    z = _kl_logits(out).double()
    if tokens and z.dim() > 2:
        return F.log_softmax(z, dim=-1).reshape(z.shape[0], -1, z.shape[-1])
    return F.log_softmax(z.flatten(1), dim=1)


def _kl_sum(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Summed KL(p || q) over samples per leading row of ``logq``; per-position distributions
    (logp (N, P, K)) are averaged over the P positions."""
    if logp.dim() == 2:
        return _kl_rows(logp, logq)
    return (logp.exp() * (logp - logq)).sum(dim=(-1, -2, -3)) / logp.shape[1]


def kl_sensitivity(model: nn.Module, x: Any, names: Sequence[str] | None = None,
                   bits: Sequence[int] = (2, 4, 8), config: QuantConfig | None = None,
                   batch_size: int = 256, vectorize: bool = True,
                   progress: bool = False, task: Task | str | None = None) -> np.ndarray:
    """ZeroQ's sensitivity: (L, B) array of the mean divergence between the FP32 model's output
    and the output with only layer i's weight quantized to ``bits[j]``, per sample of ``x``.

    ``x``: the model's inputs (a tensor, e.g. distilled data) or any data
    :func:`hawq.feed.tasks.iter_batches` reads, fed by ``task`` (a :class:`hawq.feed.tasks.Task`, a
    registered name or a loss callable; default ``"classification"``, which needs no labels
    here). For tasks whose outputs are logits the divergence is KL(softmax FP32 || softmax
    quantized) in float64: over the flattened output per sample for classification (ZeroQ's
    own), over the vocabulary per position and averaged over positions for ``causal-lm``. For
    other tasks (``embedding``, ``loss-dict``, custom) it is the task's
    :meth:`~hawq.feed.tasks.Task.divergence` (squared error of the outputs by default).
    ``names``: quantizable layers (default all, registration order). Weights are quantized as
    :func:`hawq.quantize_` does with ``config`` (activations stay float). Float bits (>= 16)
    leave the weight unchanged, so their KL is 0 up to rounding (exactly 0 with
    ``vectorize=False``). ``vectorize`` runs a layer's B variants as one ``torch.func.vmap``
    call, falling back to a loop when an op has no batching rule. Values below 0 (rounding) are
    clamped to 0. Model in eval mode, weights untouched. Cost: 1 + L*B forward passes over ``x``.
    Distributed (:mod:`hawq.base.dist`): the layers are independent jobs, rank r takes layers
    r, r+N, ... on all of ``x`` and the (L, B) rows are summed over ranks once (every rank
    returns the single-process array; a rank that fails stops the others naming it): 1 +
    ceil(L/N)*B passes per rank.
    Raises :class:`ConfigError` for unknown layers or empty ``x``, :class:`NumericalError` for a
    NaN/inf result.
    """
    with dist.guard():
        return _kl_sensitivity(model, x, names, bits, config, batch_size, vectorize, progress,
                               task)


def _kl_sensitivity(model: nn.Module, x: Any, names: Sequence[str] | None, bits: Sequence[int],
                    config: QuantConfig | None, batch_size: int, vectorize: bool, progress: bool,
                    task: Task | str | None) -> np.ndarray:
    config = config or QuantConfig()
    task = as_task(task)
    bits = [check_bits(b, "bits", symmetric=config.w_symmetric) for b in bits]
    mods = quantizable_layers(model)
    names = list(mods) if names is None else list(names)
    missing = [n for n in names if n not in mods]
    if missing:
        raise ConfigError(f"layers {missing} are not quantizable layers of the model; valid: "
                          f"{sorted(mods)}")
    if torch.is_tensor(x) and (x.dim() == 0 or x.shape[0] == 0):
        raise ConfigError("x is empty: give at least one input (e.g. distilled data)")
    from torch.func import functional_call, vmap

    device = next(model.parameters()).device
    chunks = [batch_to(c, device) for c in iter_batches(x, batch_size, "x")]
    samples = sum(batch_len(c) for c in chunks)
    logits = task.metric in ("accuracy", "perplexity")
    tokens = task.metric == "perplexity"
    fed = _TaskCall(model, task)
    was_training = model.training
    model.eval()
    out = np.zeros((len(names), len(bits)))
    use_vmap = vectorize
    try:
        with torch.no_grad():
            ref_out = [fed(c) for c in chunks]
            ref = [_log_probs(o, tokens) for o in ref_out] if logits else ref_out
            mine = dist.shard(range(len(names)))  # every layer in a single process
            bar = tqdm(mine, desc="KL sensitivity", disable=not progress or not dist.is_main(),
                       leave=False)
            for i in bar:
                name = names[i]
                key = f"model.{name}.weight"
                wq = _quantized_weights(mods[name].weight, bits, config)
                total = torch.zeros(len(bits), dtype=torch.float64)
                for c, r in zip(chunks, ref):
                    if logits:
                        def run(w: torch.Tensor, c: Any = c) -> torch.Tensor:
                            return _log_probs(functional_call(fed, {key: w}, (c,)), tokens)
                    else:
                        def run(w: torch.Tensor, c: Any = c, r: Any = r) -> torch.Tensor:
                            return task.divergence(functional_call(fed, {key: w}, (c,)), r, c)

                    res = None
                    if use_vmap:
                        try:
                            res = vmap(run)(wq)
                        except Exception as exc:  # an op without a batching rule
                            log.info("vmap failed (%s); one forward per bit width", exc)
                            use_vmap = False
                    if res is None:
                        res = torch.stack([run(w) for w in wq])
                    total += (_kl_sum(r, res) if logits else res).double().cpu()
                out[i] = (total / samples).numpy()
    finally:
        model.train(was_training)
    if dist.is_distributed():  # each row was measured by one rank, zeros elsewhere
        out = dist.all_reduce_sum(torch.from_numpy(out)).numpy()
    if not np.all(np.isfinite(out)):
        raise NumericalError("a KL sensitivity is NaN/inf: check the inputs (distilled data) and "
                             "the model's outputs")
    return np.maximum(out, 0.0)


def hessian_sensitivity(model: nn.Module, x: Any, names: Sequence[str] | None = None,
                        bits: Sequence[int] = (2, 4, 8), config: QuantConfig | None = None,
                        seed: int = 0, max_probes: int = 50, tol: float = 1e-2,
                        progress: bool = False, task: Task | str | None = None
                        ) -> tuple[np.ndarray, dict[str, Any]]:
    """Data-free HAWQ-V2: Omega (L, B) = Tr(H_i)/n_i x ||Q_b(W_i) - W_i||^2 with the Hessian of
    the ``task``'s loss on inputs ``x`` (a tensor or any data :func:`hawq.feed.tasks.iter_batches`
    reads).

    ``task`` (default ``"classification"``): a classifier's cross-entropy is taken against the
    model's own predictions (argmax) as labels (any labels in ``x`` are replaced), so no real
    labels are needed; other tasks use their own loss on ``x`` as it is (``causal-lm``: the
    next tokens of the inputs; ``embedding``: the distortion to the float model, bound here,
    whose Hessian is the output's Gauss-Newton matrix; ``loss-dict``: ``x`` must carry targets).
    Returns (omega, {"names", "labels" (the predicted labels, None for non-classification
    tasks), "hessian": HessianResult dict, "weight_errors"}).
    Cost: one forward for the labels plus a Hutchinson run (<= ``max_probes`` HVPs on ``x``).
    """
    from hawq.analysis.hessian import analyze
    from hawq.analysis.sensitivity import omega_matrix, weight_errors

    config = config or QuantConfig()
    names = list(quantizable_layers(model)) if names is None else list(names)
    task = as_task(task)
    plain = type(task) is ClassificationTask and task.loss_fn is None \
        and task.forward_fn is None and task.metric_fn is None
    if plain and torch.is_tensor(x):  # ZeroQ's data-free classifier: as it always was
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                labels = model(x).argmax(dim=1)
        finally:
            model.train(was_training)
        res = analyze(model, (x, labels), metric="trace", layers=names, seed=seed, tol=tol,
                      max_probes=max_probes, progress=progress)
        label_list = labels.tolist()
    elif isinstance(task, ClassificationTask):
        device = next(model.parameters()).device
        batches, found = [], []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for b in iter_batches(x, task.batch_size, "x"):
                    b = batch_to(b, device)
                    pred = _kl_logits(task.forward(model, b)).argmax(dim=-1)
                    found.append(pred)
                    batches.append({**b, "labels": pred} if isinstance(b, Mapping) else
                                   (b[0] if isinstance(b, (tuple, list)) else b, pred))
        finally:
            model.train(was_training)
        res = analyze(model, Batches(batches), metric="trace", layers=names, seed=seed,
                      tol=tol, max_probes=max_probes, progress=progress, task=task)
        label_list = [v for p in found for v in p.tolist()]
    else:
        if task.reference is None:
            task = task.bind(model)
        res = analyze(model, x, metric="trace", layers=names, seed=seed, tol=tol,
                      max_probes=max_probes, progress=progress, task=task)
        label_list = None
    errors = weight_errors(model, names, bits, config)
    omega = omega_matrix([lh.avg_trace for lh in res.layers], errors)
    return omega, {"names": names, "labels": label_list, "hessian": res.to_dict(),
                   "weight_errors": errors.tolist()}


def gaussian_data(shape: Sequence[int], n: int, seed: int = 0) -> torch.Tensor:
    """(n, *shape) standard-normal inputs from a private seeded generator (the noise baseline)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen)


def _kl_logits(out: Any) -> torch.Tensor:
    return logits_of(out, "the KL sensitivity")
