"""Channel-wise HAWQ (CW-HAWQ): per-output-channel bit widths ordered by Hessian trace.

Within each layer the output channels are ranked by their Hessian trace (``hawq.analysis.hessian.analyze
(metric="channel")``); a plan chooses, per layer, how many channels get each bit width, and the
most sensitive channels get the most bits. A layer's plan is therefore a vector of *counts* over
the bit widths (ascending), and its per-channel ``w_bits`` list follows from the trace order.

* :class:`ChannelAllocator`: ratios (L, B) -> integer counts by largest remainder, then the
  budget is enforced by construction, as HAQ's final action wall does: in rounds from the last
  layer backwards, each layer's channels drop one width until the size fits; unused budget is
  given back greedily (promote the channel with the best estimated loss drop per bit, keeping
  the trace order) until no single promotion fits.
* :func:`hessian_group_plan`: the Hessian-only baseline: each layer's trace-sorted channels are
  split into ``groups`` groups, Omega_g(b) = sum_c Tr(H_c)/n_c x ||Q_b(W_c) - W_c||^2 over the
  group, and :func:`hawq.maths.allocation.allocate` picks one width per group under the same budget.
* :func:`compress_channelwise`: the ``hawq compress --method cw-hawq / cw-hessian`` job, with a
  DDPG agent (:mod:`hawq.maths.ddpg`) choosing the ratios against a held-out calibration reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from hawq.base import dist
from hawq.maths.budgets import Budget, fits, size_limit_bits
from hawq.base.errors import BudgetError, ConfigError
from hawq.maths.plan import BitPlan, LayerSpec, QuantConfig
from hawq.maths.quantizers import check_bits, dequantize, quantize, weight_qparams

__all__ = ["ChannelAllocator", "ChannelLayer", "ChannelRewardModel", "channel_errors",
           "counts_to_bits", "hessian_group_plan", "ratios_to_counts",
           "shrink_traces", "trace_order"]


# ----------------------------------------------------------------------------- small pieces

@dataclass
class ChannelLayer:
    """One layer for channel-wise allocation: weight count, MACs and per-channel traces."""

    name: str
    params: int
    macs: int
    channel_traces: np.ndarray

    @property
    def channels(self) -> int:
        return int(len(self.channel_traces))

    @property
    def per_channel(self) -> int:
        """Weights per output channel (params / channels, exact for Conv/Linear)."""
        return self.params // self.channels


def shrink_traces(traces: Sequence[float], alpha: float = 0.5) -> np.ndarray:
    """Noisy Hutchinson channel traces made usable: negative estimates clipped to 0, then
    shrunk toward the layer mean, (1 - alpha) x max(t_c, 0) + alpha x mean(max(t, 0)).

    A channel whose estimate is ~0 (or negative) would otherwise look free to quantize to the
    lowest width; ``alpha=0`` keeps the clipped estimates. Cost: O(C)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha!r}: give a shrinkage weight in [0, 1]")
    t = np.clip(np.asarray(traces, dtype=float), 0.0, None)
    return (1.0 - alpha) * t + alpha * (t.mean() if t.size else 0.0)


def trace_order(traces: Sequence[float]) -> np.ndarray:
    """Channel indices by decreasing trace (stable: ties keep channel order)."""
    return np.argsort(-np.asarray(traces, dtype=float), kind="stable")


def ratios_to_counts(ratios: Sequence[float], channels: int) -> np.ndarray:
    """Integer counts (B,) summing to ``channels`` nearest to ``ratios * channels``.

    Largest-remainder rounding; ties go to the higher bit width (higher index). Ratios are
    clipped at 0 and renormalised (all-zero means all channels at the lowest width).
    """
    r = np.clip(np.asarray(ratios, dtype=float), 0.0, None)
    if r.sum() <= 0:
        r = np.eye(len(r))[0]
    exact = r / r.sum() * channels
    counts = np.floor(exact).astype(np.int64)
    rest = channels - int(counts.sum())
    if rest > 0:
        frac = exact - counts
        # sort by remainder descending, then by index descending (ties -> higher bits)
        order = np.lexsort((-np.arange(len(r)), -frac))
        counts[order[:rest]] += 1
    return counts


def counts_to_bits(counts: Sequence[int], bits: Sequence[int], traces: Sequence[float]
                   ) -> list[int]:
    """Per-channel bit list: the ``counts[-1]`` highest-trace channels get ``bits[-1]``, the
    next ``counts[-2]`` get ``bits[-2]``, and so on (``bits`` ascending)."""
    order = trace_order(traces)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != len(order) or np.any(counts < 0):
        raise ConfigError(f"counts {counts.tolist()} must be >= 0 and sum to {len(order)} "
                          "channels")
    ranked = np.repeat(np.asarray(bits, dtype=np.int64)[::-1], counts[::-1])
    out = np.empty(len(order), dtype=np.int64)
    out[order] = ranked
    return [int(b) for b in out]


def channel_errors(weight: torch.Tensor, bits: Sequence[int], config: QuantConfig | None = None
                   ) -> np.ndarray:
    """||Q_b(W_c) - W_c||^2 per output channel c and width b: a (C, B) array.

    Exact for the per-channel quantizer (each channel's scale depends only on its own weights).
    Cost: one vectorised quantize pass per width.
    """
    config = config or QuantConfig()
    w = weight.detach()
    out = np.zeros((w.shape[0], len(bits)))
    for j, b in enumerate(bits):
        qp = weight_qparams(w, b, config.w_symmetric, True, config.w_clip)
        if qp is not None:
            out[:, j] = (dequantize(quantize(w, qp), qp) - w).pow(2).reshape(w.shape[0], -1) \
                .sum(1).numpy()
    return out


# ----------------------------------------------------------------------------- allocator

class ChannelAllocator:
    """Turns per-layer ratios into per-channel bit plans that meet a size budget.

    ``layers``: :class:`ChannelLayer` per quantized layer; ``bits``: candidate widths;
    ``budget``: a :class:`hawq.maths.budgets.Budget` over the quantized weights (``"bytes"`` counts
    weights only). ``errors`` (optional, list of (C, B) arrays from :func:`channel_errors`)
    sharpen the give-back priority; without them the error is modelled as 4^-b per weight.
    A plan is an (L, B) int array of counts (channels per width, ``bits`` ascending).
    """

    def __init__(self, layers: Sequence[ChannelLayer], bits: Sequence[int], budget: Budget,
                 errors: Sequence[np.ndarray] | None = None):
        self.layers = list(layers)
        if not self.layers:
            raise ConfigError("no layers to allocate")
        self.bits = np.array(sorted({check_bits(b, "bits", symmetric=True) for b in bits}),
                             dtype=np.int64)
        if len(self.bits) < 1 or self.bits.max() > 8:
            raise ConfigError(f"bits={list(bits)}: channel-wise widths must be integers in 2..8")
        for layer in self.layers:
            if layer.channels < 1 or layer.params % layer.channels:
                raise ConfigError(f"layer {layer.name!r}: {layer.params} weights do not split "
                                  f"into {layer.channels} channels")
        self.params = np.array([l.params for l in self.layers], dtype=float)
        self.unit = np.array([l.per_channel for l in self.layers], dtype=np.int64)
        self.limit = size_limit_bits(budget, self.params, self.bits)
        self.budget = budget
        self.orders = [trace_order(l.channel_traces) for l in self.layers]
        # per-layer, per-rank (trace order), per-width error model for the give-back priority
        self._sens = []
        for i, layer in enumerate(self.layers):
            tr = np.clip(np.asarray(layer.channel_traces, dtype=float), 0.0, None)
            if errors is not None:
                err = np.asarray(errors[i], dtype=float)
            else:
                err = np.ones((layer.channels, 1)) * 4.0 ** (-self.bits[None, :].astype(float))
            cost = (tr / layer.per_channel)[:, None] * err
            self._sens.append(cost[self.orders[i]])
        self.min_size = int(sum(l.params for l in self.layers) * self.bits[0])
        if not fits(self.min_size, self.limit):
            raise BudgetError(f"budget {budget} is infeasible for channel-wise bits "
                              f"{self.bits.tolist()}: even all-{self.bits[0]}-bit weights need "
                              f"{self.min_size / 8:.0f} bytes ({self.min_size / self.params.sum():.3g}"
                              " average bits); relax the budget or add a lower width")

    # -- sizes
    def layer_sizes(self, counts: np.ndarray) -> np.ndarray:
        """Weight bits of each layer: (params/C) x sum_b count_b x b, exact integers (L,)."""
        return self.unit * (np.asarray(counts, dtype=np.int64) @ self.bits)

    def layer_sizes_prefix(self, counts: np.ndarray) -> int:
        """Weight bits of the first len(counts) layers."""
        k = len(counts)
        return int((self.unit[:k] * (np.asarray(counts, dtype=np.int64) @ self.bits)).sum())

    def size_bits(self, counts: np.ndarray) -> int:
        """Total weight bits of a plan."""
        return int(self.layer_sizes(counts).sum())

    def fits(self, counts: np.ndarray) -> bool:
        """True when the plan's size is within the budget."""
        return fits(self.size_bits(counts), self.limit)

    # -- from ratios to a budget-meeting plan
    def counts_from_ratios(self, ratios: np.ndarray) -> np.ndarray:
        """Largest-remainder counts per layer (no budget yet): (L, B)."""
        ratios = np.asarray(ratios, dtype=float)
        if ratios.shape != (len(self.layers), len(self.bits)):
            raise ConfigError(f"ratios have shape {ratios.shape}: give ({len(self.layers)}, "
                              f"{len(self.bits)}) = (layers, bit widths)")
        return np.stack([ratios_to_counts(r, l.channels) for r, l in zip(ratios, self.layers)])

    def squeeze(self, counts: np.ndarray) -> np.ndarray:
        """Lower channels until the plan fits, by HAQ's final action wall at channel
        granularity: in rounds, walk the layers from the last back to the first and lower
        *every* channel of the layer above the lowest width by one width, stopping as soon as
        the plan fits. A layer therefore loses at most one width per round, and the last layers
        are lowered first within a round (the give-back step then spends any overshoot).
        Cost: at most (B-1) rounds over L layers, O(L B^2)."""
        counts = np.array(counts, dtype=np.int64)
        excess = self.size_bits(counts) - self.limit
        while excess > 0:
            lowered = False
            for l in range(len(self.layers) - 1, -1, -1):
                if excess <= 0:
                    break
                row = counts[l]
                if not row[1:].any():
                    continue
                saved = int(self.unit[l] * (row[1:] * np.diff(self.bits)).sum())
                counts[l] = np.concatenate([[row[0] + row[1]], row[2:], [0]])
                excess -= saved
                lowered = True
            if not lowered:  # everything at the lowest width (infeasible caught in __init__)
                break
        return counts

    def give_back(self, counts: np.ndarray) -> np.ndarray:
        """Spend the unused budget greedily: repeatedly promote, by one width, the channel (the
        highest-trace channel of some width below the top, so the trace order is kept) with the
        largest estimated loss drop per added bit that still fits; stop when none fits.
        Cost: at most sum_l C_l (B-1) promotions, each O(L B)."""
        counts = np.array(counts, dtype=np.int64)
        size = self.size_bits(counts)
        B = len(self.bits)
        if B < 2:
            return counts
        while True:
            best, best_gain = None, -np.inf
            for l in range(len(self.layers)):
                above = np.cumsum(counts[l, ::-1])[::-1]  # channels at width >= j
                for j in range(B - 1):
                    if counts[l, j] == 0:
                        continue
                    step = int(self.unit[l] * (self.bits[j + 1] - self.bits[j]))
                    if not fits(size + step, self.limit):
                        continue
                    rank = int(above[j + 1]) if j + 1 < B else 0  # top channel of width j
                    sens = self._sens[l][rank]
                    gain = (sens[j] - sens[j + 1]) / step
                    if gain > best_gain:
                        best, best_gain = (l, j, step), gain
            if best is None:
                return counts
            l, j, step = best
            counts[l, j] -= 1
            counts[l, j + 1] += 1
            size += step

    def plan(self, ratios: np.ndarray, give_back: bool = True) -> np.ndarray:
        """Ratios (L, B) -> counts (L, B) meeting the budget: round, squeeze, give back."""
        counts = self.squeeze(self.counts_from_ratios(ratios))
        return self.give_back(counts) if give_back else counts

    def used_fraction(self, l: int, ratios_so_far: np.ndarray) -> list[float]:
        """State features for layer l given the ratios (l, B) of layers < l: the budget fraction
        the earlier layers use, and the fraction the remaining layers need at minimum."""
        used = 0.0
        if l:
            counts = np.stack([ratios_to_counts(r, c.channels)
                               for r, c in zip(ratios_so_far, self.layers[:l])])
            used = float(self.layer_sizes_prefix(counts))
        rest_min = float(self.params[l:].sum() * self.bits[0])
        return [used / self.limit, rest_min / self.limit]

    def to_bits(self, counts: np.ndarray) -> list[list[int]]:
        """Per-channel bit lists of every layer."""
        return [counts_to_bits(c, self.bits, l.channel_traces)
                for c, l in zip(counts, self.layers)]

    def to_plan(self, counts: np.ndarray, a_bits: int = 32) -> BitPlan:
        """A :class:`BitPlan` with a per-channel ``w_bits`` list per layer."""
        return BitPlan({l.name: LayerSpec(b, a_bits)
                        for l, b in zip(self.layers, self.to_bits(counts))})


# ----------------------------------------------------------------------------- Hessian baseline

def hessian_group_plan(layers: Sequence[ChannelLayer], errors: Sequence[np.ndarray],
                       bits: Sequence[int], budget: Budget, groups: int = 4,
                       method: str = "ilp") -> tuple[np.ndarray, list[list[int]]]:
    """Hessian-only channel-wise plan: HAWQ-V2 Omega over trace-sorted channel groups.

    Each layer's channels, sorted by decreasing trace, are split into ``min(groups, C)``
    contiguous groups of near-equal size; Omega_g(b) = sum_{c in g} max(Tr_c, 0)/n_c x
    errors[c, b]; :func:`hawq.maths.allocation.allocate` (``method``) picks one width per group under
    ``budget``. Returns the group widths as counts (L, B) when the result keeps the trace
    order, and the per-channel bit lists. Cost: one ILP/frontier over sum_l min(G, C_l) groups.
    """
    from hawq.maths.allocation import allocate

    bits_arr = np.array(sorted(set(int(b) for b in bits)))
    omega, params, members = [], [], []
    for layer, err in zip(layers, errors):
        order = trace_order(layer.channel_traces)
        tr = np.clip(np.asarray(layer.channel_traces, dtype=float), 0.0, None) / layer.per_channel
        for g in np.array_split(order, min(groups, layer.channels)):
            omega.append((tr[g, None] * np.asarray(err)[g]).sum(0))
            params.append(layer.per_channel * len(g))
            members.append(g)
    alloc = allocate(np.array(omega), np.array(params, dtype=float), bits_arr, budget, method)
    out, k = [], 0
    counts = np.zeros((len(layers), len(bits_arr)), dtype=np.int64)
    for i, layer in enumerate(layers):
        chan = np.zeros(layer.channels, dtype=np.int64)
        for _ in range(min(groups, layer.channels)):
            chan[members[k]] = int(alloc.bits[k])
            counts[i, int(np.searchsorted(bits_arr, alloc.bits[k]))] += len(members[k])
            k += 1
        out.append([int(b) for b in chan])
    return counts, out


# ----------------------------------------------------------------------------- fast reward

class ChannelRewardModel:
    """Scores per-channel plans on held-out data by swapping pre-quantized weights in place.

    For each layer, the weight quantized at every width is precomputed once ((B, C, ...)); a
    plan's weight is gathered channel by channel (identical to the per-channel quantizer with
    a bit list), copied into the float model, and the model is run on ``data`` through
    ``task`` (a :class:`hawq.feed.tasks.Task`, a registered name or a loss callable; default
    ``"classification"``; an unbound ``embedding`` task is bound to ``model`` here, which must
    be the float model). ``data``: anything :func:`hawq.feed.tasks.iter_batches` reads, read once
    into memory on the model's device. Weights only (activations stay float). ``metric``
    (higher reward is better):

    * ``"kl"``: minus the mean divergence of the quantized outputs from the FP32 ones per
      sample: KL(FP32 || quantized) of the softmaxes for a classifier's logits, the task's
      :meth:`~hawq.feed.tasks.Task.divergence` otherwise (per-token KL for ``causal-lm``, squared
      error for ``embedding``);
    * ``"loss"``: minus the task's mean loss (cross-entropy for classification);
    * ``"metric"``: the task's headline metric, negated when lower is better (accuracy,
      -perplexity, cosine to float); ``"accuracy"`` is its older name.

    The classification task on in-memory (inputs, labels) gives the same numbers as before
    tasks existed. :meth:`restore` puts the FP32 weights back. Cost per call: one forward over
    ``data``; memory: the quantized weight stacks, ``data`` and (``"kl"``) the FP32 outputs.

    Distributed (:mod:`hawq.base.dist`, every rank building it with the same model and data):
    rank r keeps and runs batches r, r+N, ... of ``data`` (every rank reads all of it once), and
    each call ends with one all-reduce that gives every rank the single-process reward
    exactly: the per-batch sums (2 numbers a batch) for a task, the output rows (samples x
    classes numbers) for the classifier on tensors, whose whole-tensor formulas need them all.
    Per rank and call: ceil(batches / N) batch forwards (so give at least N batches: a rank
    without one waits). Calls (and the constructor) run inside :func:`hawq.base.dist.guard`:
    a rank that fails stops the others naming it.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], bits: Sequence[int],
                 data: Any, config: QuantConfig | None = None,
                 metric: str = "kl", batch_size: int = 500, task: Any = None):
        from hawq.modules.surgery import quantizable_layers
        from hawq.feed.tasks import as_task, batch_len, batch_to, iter_batches

        if metric not in ("kl", "loss", "accuracy", "metric"):
            raise ConfigError(f"reward metric={metric!r}: use 'kl', 'loss' or 'metric' (the "
                              "task's headline metric; 'accuracy' for a classifier)")
        config = config or QuantConfig()
        task = as_task(task)
        if task.reference is None:
            task = task.bind(model)  # embedding: compares with a frozen float copy
        self.model, self.metric, self.batch_size, self.task = model, metric, batch_size, task
        mods = quantizable_layers(model)
        self.weights = [mods[n].weight for n in names]
        self.original = [w.detach().clone() for w in self.weights]
        self.bits = np.array(sorted(set(int(b) for b in bits)))
        self.stacks = []
        for w in self.original:
            qs = []
            for b in self.bits:
                qp = weight_qparams(w, int(b), config.w_symmetric, True, config.w_clip)
                qs.append(dequantize(quantize(w, qp), qp))
            self.stacks.append(torch.stack(qs))
        device = self.original[0].device if self.original else torch.device("cpu")
        # the classifier on (inputs, labels) tensors keeps its whole-tensor formulas
        self.pair = _plain_pair(task, data)
        source = self.pair if self.pair is not None else data
        every = list(iter_batches(source, batch_size, "reward data"))
        sizes = [batch_len(b) for b in every]
        self.samples = sum(sizes)
        self.n_batches = len(every)
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # rows of batch k
        self.slots = dist.shard(range(len(every)))   # this rank's batches (all in one process)
        self.batches = [batch_to(every[k], device) for k in self.slots]
        if self.pair is not None:
            self.y = self.pair[1].to(device)
        self.ref: torch.Tensor | None = None
        self.ref_outs: list[Any] | None = None
        if metric == "kl":
            with dist.guard():
                if self.pair is not None:
                    self.ref = self._logits().log_softmax(-1)
                else:
                    self.ref_outs = self._outputs()

    @torch.no_grad()
    def _outputs(self) -> list[Any]:
        """The model's output on every batch of this rank (eval mode, restored)."""
        was = self.model.training
        self.model.eval()
        try:
            return [self.task.forward(self.model, b) for b in self.batches]
        finally:
            self.model.train(was)

    @torch.no_grad()
    def _logits(self) -> torch.Tensor:
        return self._rows(self._outputs())

    def _rows(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """All samples' output rows in data order: this rank's batches' rows, the others' by one
        all-reduce of a zero-filled (samples, ...) tensor (exact: each row has one source)."""
        if not dist.is_distributed():
            return torch.cat(outs)
        if outs:
            like = outs[0]
        else:  # a rank without batches: one sample's output gives the row shape and dtype
            was = self.model.training
            self.model.eval()
            try:
                like = self.task.forward(self.model, (self.pair[0][:1].to(self.y.device),
                                                      self.y[:1]))
            finally:
                self.model.train(was)
        full = like.new_zeros((self.samples, *like.shape[1:]))
        for k, o in zip(self.slots, outs):
            full[int(self.offsets[k]):int(self.offsets[k + 1])] = o
        return dist.all_reduce_sum(full)

    def _batch_sums(self, outs: list[Any]) -> list[list[float]]:
        """Per batch of the whole data, in order: (divergence, 0), (loss x samples, 0) or the
        task's metric sums (sum, count); this rank's batches computed here, the others' by one
        all-reduce of a zero-filled (batches, 2) float64 tensor (exact: one source a row)."""
        from hawq.feed.tasks import batch_len

        sums = torch.zeros(self.n_batches, 2, dtype=torch.float64)
        refs = self.ref_outs if self.ref_outs is not None else [None] * len(outs)
        for k, o, r, b in zip(self.slots, outs, refs, self.batches):
            if self.metric == "kl":
                sums[k, 0] = float(self.task.divergence(o, r, b))
            elif self.metric == "loss":
                sums[k, 0] = float(self.task.loss(o, b)) * batch_len(b)
            else:
                s_, c_ = self.task.metric_sums(o, b)
                sums[k, 0], sums[k, 1] = float(s_), int(c_)
        return dist.all_reduce_sum(sums).tolist()

    @torch.no_grad()
    def set_bits(self, channel_bits: Sequence[Sequence[int]]) -> None:
        """Load the per-channel quantized weights of a plan into the model."""
        for w, stack, cb in zip(self.weights, self.stacks, channel_bits):
            idx = torch.as_tensor(np.searchsorted(self.bits, np.asarray(cb)))
            w.copy_(stack[idx, torch.arange(len(idx))])

    @torch.no_grad()
    def restore(self) -> None:
        for w, orig in zip(self.weights, self.original):
            w.copy_(orig)

    @torch.no_grad()
    def __call__(self, channel_bits: Sequence[Sequence[int]]) -> float:
        """Reward of a plan given as per-channel bit lists (higher is better; NaN when the
        quantized model's outputs are). The same on every rank (see the class)."""
        with dist.guard():
            return self._reward(channel_bits)

    def _reward(self, channel_bits: Sequence[Sequence[int]]) -> float:
        self.set_bits(channel_bits)
        try:
            outs = self._outputs()
        finally:
            self.restore()
        task = self.task
        if self.pair is not None:  # classification on tensors: the formulas of old, exactly
            logits = self._rows(outs)
            if self.metric == "accuracy" or self.metric == "metric":
                value = float((logits.argmax(-1) == self.y).float().mean())
            elif self.metric == "loss":
                value = -float(task.loss(logits, (self.pair[0], self.y)))
            else:
                lq = logits.log_softmax(-1)
                value = -float((self.ref.exp() * (self.ref - lq)).sum(-1).mean())
        else:  # summed batch by batch in data order, as in one process
            sums = self._batch_sums(outs)
            if self.metric in ("kl", "loss"):
                value = -sum(s_ for s_, _ in sums) / self.samples
            else:
                total, count = 0.0, 0
                for s_, c_ in sums:
                    total, count = total + s_, count + int(c_)
                value = float(task.finish_metric(total, count))
                value = value if task.higher_is_better else -value
        return value


def _plain_pair(task: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs, labels) when ``task`` is the built-in classifier and ``data`` a TensorDataset or
    an (inputs, labels) tensor pair, else None."""
    from hawq.feed.tasks import ClassificationTask

    if type(task) is not ClassificationTask or task.loss_fn is not None \
            or task.forward_fn is not None or task.metric_fn is not None:
        return None
    tensors = getattr(data, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2 \
            and all(torch.is_tensor(t) for t in tensors[:2]):
        x, y = tensors[:2]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t)
                                                                      for t in data):
        x, y = data
    else:
        return None
    return (x, y) if x.dim() > 0 and y.dim() > 0 and len(x) == len(y) and len(x) > 0 else None


def layer_features(infos: Sequence[Any], layers: Sequence[ChannelLayer]) -> np.ndarray:
    """Static DDPG state per layer: index, is-linear, in/out channels, log params, log MACs,
    log average trace, trace spread (std/mean of channel traces). Shape (L, 8)."""
    rows = []
    for i, (info, layer) in enumerate(zip(infos, layers)):
        tr = np.asarray(layer.channel_traces, dtype=float)
        avg = max(float(tr.sum()) / max(layer.params, 1), 1e-12)
        spread = float(tr.std() / max(abs(tr.mean()), 1e-12))
        in_ch = info.in_shape[1] if len(info.in_shape) > 1 else 0
        rows.append([i, float("Linear" in info.type), in_ch, layer.channels,
                     np.log(layer.params), np.log(max(info.macs, 1)), np.log(avg), spread])
    return np.array(rows, dtype=float)


# ----------------------------------------------------------------------------- pipeline job

