"""Tasks: how a model is fed and judged.

A :class:`Task` says how a batch of the user's data becomes model inputs, how the model's output
and the batch give a scalar loss (the loss whose Hessian hawq measures), and which metric the
user reads (name, higher-is-better). Every place in hawq that calls a model or a loss goes
through a task, so hawq works on any model a user brings: image classifiers, token models,
Hugging Face models returning ``ModelOutput``, causal language models, sentence encoders and
detection-style models that return a dict of losses.

Built in (:data:`TASKS`, a registry; add one with :func:`register_task`):

* ``classification``: cross-entropy on the logits (a tensor, a tuple's first element or an
  output's ``.logits``); metric top-1 accuracy. Batches: ``(inputs, labels)`` or a dict with
  ``labels`` (HF style, the other keys are passed as keyword arguments).
* ``causal-lm``: next-token cross-entropy (positions with ``attention_mask == 0`` or label
  -100 ignored); metric perplexity (lower is better). Batches: token-id tensors, dicts with
  ``input_ids`` (and ``attention_mask``/``labels``) or ``(input_ids, labels)``.
* ``embedding``: no labels; the loss is the squared distortion of the output against the float
  model's (a reference copy kept by :meth:`Task.bind`), whose Hessian at the float weights is
  the Gauss-Newton matrix of the output; metric mean cosine similarity to the float output.
* ``loss-dict``: the model returns a dict of losses when called with (inputs, targets); the loss
  is their sum and the metric is that loss (lower is better).

User callables: ``Task(loss_fn=..., forward_fn=..., metric_fn=...)`` or
:func:`custom_task`.

The data reader :func:`iter_batches` accepts tensors, ``(x, y)`` pairs, dicts of tensors, Datasets
and DataLoaders (any iterable of batches) and is the one rule every pass uses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hawq.base.errors import ConfigError, DataError, NumericalError
from hawq.base.registry import Registry

__all__ = [
    "Batches", "TASKS", "Task", "TaskOutputs", "as_task", "criterion_reduction", "criterion_task", "batch_len", "batch_to", "custom_task",
    "iter_batches", "leaf_tensors", "logits_of", "materialize", "register_task", "resolve_task", "split_batch", "task_names",
]

Batch = Any


# ----------------------------------------------------------------------------- batches

def _leading(t: Any) -> int | None:
    return int(t.shape[0]) if torch.is_tensor(t) and t.dim() > 0 else None


class Batches:
    """Batches already read into memory (e.g. :func:`hawq.modules.passes.read_batches`), in order. Iterating gives them
    as they are; :func:`hawq.feed.tasks.iter_batches` reads a ``Batches`` as an iterable of batches
    (never as one ``(inputs, targets)`` pair, which a plain list of two tensors would be), so
    it can be handed to any pass again without re-reading or re-splitting the data."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = list(batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def samples(self) -> int:
        """Number of samples over all batches."""
        return sum(batch_len(b) for b in self.batches)


def batch_len(batch: Batch) -> int:
    """Number of samples in ``batch`` (the leading size of its first tensor).

    Raises :class:`DataError` when the batch holds no tensor."""
    if torch.is_tensor(batch):
        n = _leading(batch)
        if n is not None:
            return n
    elif isinstance(batch, Mapping):
        for v in batch.values():
            n = _leading(v)
            if n is not None:
                return n
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            if torch.is_tensor(v) or isinstance(v, (Mapping, tuple, list)):
                try:
                    return batch_len(v)
                except DataError:
                    continue
    raise DataError(f"a batch of type {type(batch).__name__} holds no tensor with a batch "
                    "dimension: give tensors, (inputs, targets) pairs or dicts of tensors")


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """``batch`` with every tensor moved to ``device`` (tuples, lists and dicts kept)."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: batch_to(v, device) for k, v in batch.items()}) \
            if type(batch) is dict else {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(batch_to(v, device) for v in batch)
    if isinstance(batch, list):
        return [batch_to(v, device) for v in batch]
    return batch


def _slice(batch: Batch, start: int, stop: int, n: int) -> Batch:
    if torch.is_tensor(batch):
        return batch[start:stop] if _leading(batch) == n else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop, n) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_slice(v, start, stop, n) for v in batch)
    if isinstance(batch, list):
        return [_slice(v, start, stop, n) for v in batch]
    return batch


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """``batch`` cut along its leading dimension into pieces of at most ``size`` samples
    (tensors whose leading size differs from the batch's, e.g. a shared mask, are kept whole)."""
    n = batch_len(batch)
    return [_slice(batch, s, min(s + size, n), n) for s in range(0, n, size)]


def _check_same_length(parts: Sequence[Any], who: str) -> int:
    lens = [_leading(t) for t in parts if torch.is_tensor(t)]
    if not lens or any(n is None for n in lens):
        raise DataError(f"{who}: every tensor needs a leading batch dimension")
    if len(set(lens)) != 1:
        raise DataError(f"{who} has tensors of {lens} samples; they must have the same number "
                        "of samples (first dimension)")
    if lens[0] == 0:
        raise DataError(f"{who} holds no samples")
    return lens[0]


def leaf_tensors(obj: Any) -> list[Any] | None:
    """The tensors of a nested tuple/list/dict structure, or None when something else is in it."""
    if torch.is_tensor(obj):
        return [obj]
    items = obj.values() if isinstance(obj, Mapping) else (
        obj if isinstance(obj, (tuple, list)) else None)
    if items is None or not len(obj):
        return None
    out: list[Any] = []
    for v in items:
        sub = leaf_tensors(v)
        if sub is None:
            return None
        out.extend(sub)
    return out


def _is_whole(data: Any) -> bool:
    """Whether ``data`` is one in-memory dataset (a tensor, a tuple of tensors / dicts of tensors
    such as ``(inputs, targets)`` or ``(images, {"labels": ..., "boxes": ...})``, a dict of
    tensors) rather than an iterable of batches: every tensor in it has the same leading size."""
    if torch.is_tensor(data) or isinstance(data, torch.utils.data.TensorDataset):
        return True
    if isinstance(data, list) and not (len(data) == 2 and all(torch.is_tensor(t) for t in data)):
        return False  # a list of batches, unless it is an (inputs, targets) pair of tensors
    if isinstance(data, (tuple, list)) and not all(
            torch.is_tensor(t) or isinstance(t, Mapping) for t in data):
        return False  # a tuple of batches
    if isinstance(data, Mapping) or (isinstance(data, tuple) and 1 <= len(data) <= 3) or (
            isinstance(data, list) and len(data) == 2):
        leaves = leaf_tensors(data)
        if not leaves:
            return False
        return len({_leading(t) for t in leaves}) == 1 and _leading(leaves[0]) is not None
    return False


def iter_batches(data: Any, batch_size: int = 256, who: str = "data",
                 limit: int | None = None) -> Iterator[Batch]:
    """Yield batches from ``data`` in the forms users have:

    * a tensor (inputs only), an ``(inputs, targets)`` tuple/list of tensors or a
      ``TensorDataset``: split into ``batch_size`` pieces (tuples);
    * a dict of tensors with one batch dimension (a Hugging Face batch): split into dicts;
    * a map-style ``Dataset`` (``__getitem__`` + ``__len__``): read through a ``DataLoader``
      with the default collation, in order;
    * a ``DataLoader`` or any other iterable of batches: its batches as they come.

    ``limit`` stops after that many samples (the last batch is cut). Raises :class:`DataError`
    naming ``who`` for anything else or for data without samples. Cost: no copies of whole
    tensors (slices are views)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: give a positive integer")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit={limit!r} for {who}: give a positive number of samples")
    if data is None:
        raise DataError(f"{who} is None: give tensors, (inputs, targets), a dict of tensors, a "
                        "Dataset or a DataLoader")
    if _is_whole(data):
        if isinstance(data, torch.utils.data.TensorDataset):
            data = tuple(data.tensors)
        if isinstance(data, list):
            data = tuple(data)
        parts = leaf_tensors(data) or []
        n = _check_same_length(parts, who)
        n = n if limit is None else min(n, limit)
        for s in range(0, n, batch_size):
            yield _slice(data, s, min(s + batch_size, n), _leading(parts[0]))
        return
    if isinstance(data, (str, bytes)):
        raise DataError(f"{who} is a string ({str(data)[:40]!r}): give tensors or a DataLoader; "
                        "on the command line use --data pkg.module:factory")
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") \
            and not isinstance(data, torch.utils.data.IterableDataset):
        if len(data) == 0:
            raise DataError(f"{who} is an empty Dataset")
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    try:
        it = iter(data)
    except TypeError:
        raise DataError(f"{who} of type {type(data).__name__} is not data hawq can read: give a "
                        "tensor, an (inputs, targets) pair, a dict of tensors, a Dataset or a "
                        "DataLoader") from None
    seen = 0
    for k, batch in enumerate(it):
        try:
            n = batch_len(batch)
        except DataError as e:
            raise DataError(f"{who}, batch {k}: {e}") from None
        if n == 0:
            continue
        if limit is not None and seen + n > limit:
            batch, n = _slice(batch, 0, limit - seen, n), limit - seen
        yield batch
        seen += n
        if limit is not None and seen >= limit:
            return
    if seen == 0:
        raise DataError(f"{who} yielded no samples: check the Dataset/DataLoader is not empty")


def materialize(data: Any, batch_size: int = 256, who: str = "data",
                limit: int | None = None) -> list[Batch]:
    """:func:`iter_batches` as a list (for passes that revisit the data, e.g. Hessian products).
    Raises :class:`DataError` when there are no samples."""
    out = list(iter_batches(data, batch_size, who, limit))
    if not out:
        raise DataError(f"{who} holds no samples")
    return out


# ----------------------------------------------------------------------------- tasks

def logits_of(out: Any, who: str = "the task") -> torch.Tensor:
    """The logits in a model's output: itself when a tensor, ``.logits`` (or a dict's
    ``"logits"``), else a tuple's first tensor; :class:`DataError` naming ``who`` otherwise."""
    if torch.is_tensor(out):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise DataError(f"the model returned a {type(out).__name__}; {who} needs logits: a "
                    "tensor, a tuple whose first item is the logits, or an output with .logits")


def _primary(out: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``.logits``, ``last_hidden_state``,
    ``pooler_output``... or the first tensor of a tuple."""
    if torch.is_tensor(out):
        return out
    for key in ("logits", "sentence_embedding", "pooler_output", "last_hidden_state"):
        v = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if torch.is_tensor(v):
            return v
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise DataError(f"the model returned a {type(out).__name__} with no tensor hawq can compare")


@dataclass
class TaskOutputs:
    """A forward pass's output and the batch it came from."""

    output: Any
    batch: Batch


@dataclass
class Task:
    """How a model is fed and judged. Subclasses (or the callables) override:

    * :meth:`inputs` → ``(args, kwargs)`` for ``model(*args, **kwargs)``;
    * :meth:`loss` → scalar tensor, the mean loss over the batch's samples;
    * :meth:`metric_sums` → ``(metric sum, count)`` for the headline metric;
    * :meth:`finish_metric` → the metric from its summed value and count;
    * :meth:`divergence` → per-batch summed distance of a quantized output to the float one.

    ``metric`` names the headline metric, ``higher_is_better`` its direction, ``batch_size``
    how whole tensors are split. ``loss_fn(output, batch) -> tensor``, ``forward_fn(model,
    batch) -> output`` and ``metric_fn(output, batch) -> (sum, count)`` replace the defaults
    when given (a user's own task without subclassing).
    """

    name: str = "custom"
    metric: str = "loss"
    higher_is_better: bool = False
    batch_size: int = 256
    loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None
    forward_fn: Callable[[nn.Module, Batch], Any] | None = None
    metric_fn: Callable[[Any, Batch], tuple[float, int]] | None = None
    expects: str = "batches the model's forward takes"
    reference: nn.Module | None = field(default=None, repr=False, compare=False)

    # -- feeding
    def inputs(self, batch: Batch) -> tuple[tuple, dict]:
        """Positional and keyword arguments of the model call for ``batch``: a dict becomes
        keyword arguments (without ``labels``), a tuple/list's first item the input, a tensor
        itself."""
        if isinstance(batch, Mapping):
            return (), {k: v for k, v in batch.items() if k != "labels"}
        if isinstance(batch, (tuple, list)):
            return (batch[0],), {}
        return (batch,), {}

    def targets(self, batch: Batch) -> Any:
        """The targets in ``batch``: ``labels`` of a dict, the second item of a tuple, else None."""
        if isinstance(batch, Mapping):
            return batch.get("labels")
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[1]
        return None

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """``model``'s output on ``batch`` (already on the model's device)."""
        if self.forward_fn is not None:
            return self.forward_fn(model, batch)
        args, kwargs = self.inputs(batch)
        try:
            return model(*args, **kwargs)
        except (TypeError, RuntimeError, IndexError, ValueError, AttributeError, KeyError) as e:
            raise DataError(f"task {self.name!r} could not run the model on a batch of "
                            f"{_describe(batch)}: {type(e).__name__}: {e}. The task expects "
                            f"{self.expects}; pass task=... to say how this model is fed") from e

    # -- judging
    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        """Mean loss over the batch's samples (a scalar tensor with a graph)."""
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        raise ConfigError(f"task {self.name!r} has no loss: give loss_fn=")

    def metric_sums(self, output: Any, batch: Batch) -> tuple[float, int]:
        """(sum, count) of the headline metric on one batch; default: the summed loss."""
        if self.metric_fn is not None:
            return self.metric_fn(output, batch)
        n = batch_len(batch)
        return float(self.loss(output, batch)) * n, n

    def finish_metric(self, total: float, count: int) -> float:
        """The headline metric from :meth:`metric_sums` added over batches."""
        return total / max(count, 1)

    def divergence(self, output: Any, ref: Any, batch: Batch) -> torch.Tensor:
        """Summed distance of ``output`` to the float model's ``ref`` over the batch (KL of the
        softmaxes for logits, squared error otherwise); used to rank plans on held-out data."""
        a, b = _primary(output).float(), _primary(ref).float()
        if a.dim() >= 2 and self.metric in ("accuracy", "perplexity"):
            return F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True,
                            reduction="sum") * (batch_len(batch) / max(a[..., 0].numel(), 1))
        return ((a - b) ** 2).sum()

    # -- state
    def bind(self, model: nn.Module) -> "Task":
        """This task for ``model`` (call it on the float model before quantizing). Tasks that
        need the float model's outputs (``embedding``) keep a frozen copy; others return self."""
        return self

    def loss_on(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Forward ``model`` on ``batch`` and return the task's mean loss; raises
        :class:`NumericalError` on a NaN/inf loss."""
        loss = self.loss(self.forward(model, batch), batch)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise ConfigError(f"task {self.name!r}: the loss must be a scalar tensor, got "
                              f"{getattr(loss, 'shape', type(loss).__name__)}")
        return loss

    def check(self, model: nn.Module, data: Any) -> None:
        """Run the model and loss on the first two samples of ``data``; raises a
        :class:`DataError` naming the task and the batch form it expects when they do not fit.
        Cost: one forward pass on two samples."""
        device = _device(model)
        batch = next(iter(iter_batches(data, 2, "data", limit=2)))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = self.forward(model, batch_to(batch, device))
                try:
                    loss = self.loss(out, batch_to(batch, device))
                except DataError:
                    raise
                except (TypeError, RuntimeError, IndexError, ValueError, AttributeError,
                        KeyError) as e:
                    raise DataError(
                        f"task {self.name!r} could not compute its loss on a batch of "
                        f"{_describe(batch)} (model output: {_describe(out)}): "
                        f"{type(e).__name__}: {e}. It expects {self.expects}") from e
                if not torch.is_tensor(loss) or loss.dim() != 0:
                    raise DataError(f"task {self.name!r}: the loss must be a scalar tensor, got "
                                    f"{_describe(loss)}; it expects {self.expects}")
        finally:
            model.train(was)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric,
                "higher_is_better": self.higher_is_better}


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _describe(obj: Any) -> str:
    if torch.is_tensor(obj):
        return f"tensor{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, Mapping):
        return "dict{" + ", ".join(f"{k}: {_describe(v)}" for k, v in list(obj.items())[:6]) + "}"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in obj[:4]) + ")"
    return type(obj).__name__


class ClassificationTask(Task):
    """Cross-entropy on logits (``.logits`` accepted), top-1 accuracy."""

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        y = self.targets(batch)
        if y is None:
            raise DataError(f"task 'classification' needs labels: give (inputs, labels) pairs or "
                            f"dicts with 'labels'; got {_describe(batch)}")
        logits = logits_of(output)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def metric_sums(self, output: Any, batch: Batch) -> tuple[float, int]:
        if self.metric_fn is not None:
            return self.metric_fn(output, batch)
        y = self.targets(batch)
        pred = logits_of(output).argmax(-1)
        return float((pred == y).sum()), int(y.numel())


class CausalLMTask(Task):
    """Next-token cross-entropy; perplexity. ``labels`` (when given) are the tokens to predict,
    -100 ignored; else the inputs shifted by one with ``attention_mask == 0`` ignored."""

    def inputs(self, batch: Batch) -> tuple[tuple, dict]:
        if isinstance(batch, Mapping):
            return (), {k: v for k, v in batch.items() if k != "labels"}
        if isinstance(batch, (tuple, list)):
            return (batch[0],), {}
        return (batch,), {}

    def _labels(self, batch: Batch) -> torch.Tensor:
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise DataError("task 'causal-lm' needs token ids: a dict with 'input_ids' "
                                f"(and optionally 'attention_mask', 'labels'); got {_describe(batch)}")
            labels = batch.get("labels")
            if labels is None:
                labels = batch["input_ids"].clone()
                mask = batch.get("attention_mask")
                if mask is not None:
                    labels = labels.masked_fill(mask == 0, -100)
            return labels
        if isinstance(batch, (tuple, list)):
            return batch[1] if len(batch) >= 2 else batch[0]
        return batch

    def _token_ce(self, output: Any, batch: Batch, reduction: str) -> torch.Tensor:
        logits = logits_of(output)
        labels = self._labels(batch)
        if logits.dim() != 3 or labels.dim() != 2:
            raise DataError(f"task 'causal-lm' needs logits (batch, seq, vocab) and token ids "
                            f"(batch, seq); got logits {_describe(logits)} and ids "
                            f"{_describe(labels)}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise DataError(f"task 'causal-lm' needs integer token ids, got {labels.dtype}")
        lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        tgt = labels[:, 1:].reshape(-1).long()
        return F.cross_entropy(lg, tgt, ignore_index=-100, reduction=reduction)

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        return self._token_ce(output, batch, "mean")

    def metric_sums(self, output: Any, batch: Batch) -> tuple[float, int]:
        if self.metric_fn is not None:
            return self.metric_fn(output, batch)
        n = int((self._labels(batch)[:, 1:] != -100).sum())
        return float(self._token_ce(output, batch, "sum")), n

    def finish_metric(self, total: float, count: int) -> float:
        return math.exp(min(total / max(count, 1), 700.0))


class EmbeddingTask(Task):
    """No labels: loss = mean squared distortion of the (pooled) output against the float
    model's output (a frozen copy taken by :meth:`bind`); metric: mean cosine similarity."""

    def _ref(self, batch: Batch) -> torch.Tensor:
        if self.reference is None:
            raise ConfigError("task 'embedding' compares outputs with the float model: call "
                              "task.bind(float_model) before quantizing (hawq.compress does)")
        with torch.no_grad():
            return _primary(Task.forward(self, self.reference, batch)).float()

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        out = _primary(output).float()
        ref = self._ref(batch)
        return ((out - ref) ** 2).flatten(1).sum(1).mean()

    def metric_sums(self, output: Any, batch: Batch) -> tuple[float, int]:
        if self.metric_fn is not None:
            return self.metric_fn(output, batch)
        out = _primary(output).float().flatten(1)
        ref = self._ref(batch).flatten(1)
        cos = F.cosine_similarity(out, ref, dim=1)
        return float(cos.sum()), int(cos.numel())

    def bind(self, model: nn.Module) -> "Task":
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return EmbeddingTask(**{k: getattr(self, k) for k in
                                ("name", "metric", "higher_is_better", "batch_size", "loss_fn",
                                 "forward_fn", "metric_fn", "expects")}, reference=ref)


class LossDictTask(Task):
    """The model returns a dict of losses when called with (inputs, targets) — detection models
    (torchvision's in train mode). Loss: the sum of the dict's values; metric: that loss."""

    def inputs(self, batch: Batch) -> tuple[tuple, dict]:
        if isinstance(batch, Mapping):
            return (), dict(batch)
        if isinstance(batch, (tuple, list)):
            return tuple(batch), {}
        return (batch,), {}

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        if not isinstance(output, Mapping) or not output:
            raise DataError(f"task 'loss-dict' needs the model to return a dict of losses when "
                            f"called with (inputs, targets); it returned {_describe(output)}")
        total = None
        for k, v in output.items():
            if not torch.is_tensor(v) or v.numel() != 1:
                raise DataError(f"task 'loss-dict': loss {k!r} is {_describe(v)}, not a scalar")
            total = v.reshape(()) if total is None else total + v.reshape(())
        return total


#: Task registry: name -> factory returning a fresh Task.
TASKS: Registry[Callable[..., Task]] = Registry("task")


def register_task(name: str) -> Callable:
    """Decorator: ``@register_task("my-task")`` on a function returning a :class:`Task`."""
    return TASKS.register(name)


@register_task("classification")
def _classification(batch_size: int = 256) -> Task:
    return ClassificationTask(name="classification", metric="accuracy", higher_is_better=True,
                              batch_size=batch_size,
                              expects="(inputs, labels) pairs or dicts with 'labels'; the model "
                                      "returns logits (or an output with .logits)")


@register_task("causal-lm")
def _causal_lm(batch_size: int = 8) -> Task:
    return CausalLMTask(name="causal-lm", metric="perplexity", higher_is_better=False,
                        batch_size=batch_size,
                        expects="token ids (batch, seq) or dicts with 'input_ids'; the model "
                                "returns logits (batch, seq, vocab) or an output with .logits")


@register_task("embedding")
def _embedding(batch_size: int = 64) -> Task:
    return EmbeddingTask(name="embedding", metric="cosine", higher_is_better=True,
                         batch_size=batch_size,
                         expects="model inputs without labels (tensors or dicts of tensors); "
                                 "the model returns an embedding tensor or a model output")


@register_task("loss-dict")
def _loss_dict(batch_size: int = 8) -> Task:
    return LossDictTask(name="loss-dict", metric="loss", higher_is_better=False,
                        batch_size=batch_size,
                        expects="(inputs, targets) the model takes as model(inputs, targets), "
                                "returning a dict of scalar losses")


def task_names() -> list[str]:
    """Names of the registered tasks (the CLI's ``--task`` choices)."""
    return TASKS.names()


def custom_task(loss_fn: Callable[[Any, Batch], torch.Tensor],
                forward_fn: Callable[[nn.Module, Batch], Any] | None = None,
                metric_fn: Callable[[Any, Batch], tuple[float, int]] | None = None,
                metric: str = "loss", higher_is_better: bool = False,
                batch_size: int = 256) -> Task:
    """A task from the user's callables: ``loss_fn(output, batch)`` (mean loss, scalar tensor),
    optionally ``forward_fn(model, batch)`` and ``metric_fn(output, batch) -> (sum, count)``."""
    if not callable(loss_fn):
        raise ConfigError("custom_task(loss_fn=...): give a callable (output, batch) -> loss")
    return Task(name="custom", metric=metric, higher_is_better=higher_is_better,
                batch_size=batch_size, loss_fn=loss_fn, forward_fn=forward_fn,
                metric_fn=metric_fn)


def as_task(task: Task | str | Callable | None) -> Task:
    """A :class:`Task` from a task, a registered name (default ``classification``) or a loss
    callable ``(output, batch) -> loss``. Raises :class:`ConfigError` listing the names."""
    if task is None:
        return TASKS.get("classification")()
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        return TASKS.get(task)()
    if callable(task):
        return custom_task(task)
    raise ConfigError(f"task={task!r}: give a Task, a name from {TASKS.names()} or a callable "
                      "(output, batch) -> loss")


def criterion_reduction(criterion: Callable) -> str:
    """``criterion.reduction`` ("mean" by default); ConfigError unless "mean" or "sum"."""
    red = getattr(criterion, "reduction", "mean")
    if red not in ("mean", "sum"):
        raise ConfigError(f"criterion reduction={red!r}: use reduction='mean' (or 'sum') so each "
                          "batch gives a scalar loss")
    return red


def criterion_task(criterion: Callable) -> Task:
    """A task whose loss is ``criterion(output, targets)`` (targets: a tuple's second item or a
    dict's ``labels``), fed like a classifier. Raises :class:`ConfigError` unless the
    criterion's ``reduction`` is 'mean' or 'sum' (with 'sum' the loss is a sum over the batch;
    :func:`resolve_task` reports that so callers rescale)."""
    if not callable(criterion):
        raise ConfigError(f"criterion={criterion!r}: give a callable (output, target) -> loss, "
                          "e.g. nn.CrossEntropyLoss(), or use task=...")
    criterion_reduction(criterion)

    def loss_fn(output: Any, batch: Batch) -> torch.Tensor:
        y = task.targets(batch)
        if y is None:
            raise DataError("criterion=... needs targets: give (inputs, targets) pairs or dicts "
                            "with 'labels', or pass task=... for data without labels")
        return criterion(output, y)

    task = custom_task(loss_fn)
    task.name = f"criterion {type(criterion).__name__}"
    task.expects = "(inputs, targets) pairs or dicts with 'labels'; criterion(output, targets)"
    return task


def resolve_task(task: Task | str | Callable | None, criterion: Callable | None,
                 model: nn.Module | None = None) -> tuple[Task, bool]:
    """The task that builds the loss, and whether that loss is a *sum* over the batch's samples
    (a criterion with reduction='sum') rather than a mean. ``task`` goes through
    :func:`hawq.feed.tasks.as_task` (default ``classification``); ``criterion`` maps to
    :func:`criterion_task`; giving both raises :class:`ConfigError`. A task without a float
    reference is bound to ``model`` (``embedding`` keeps a frozen copy: one model's memory)."""
    if task is not None and criterion is not None:
        raise ConfigError("give task=... or criterion=..., not both: a criterion (output, target) "
                          "-> loss is a custom task; pass hawq.feed.tasks.custom_task(loss_fn) as task=")
    if criterion is not None:
        return criterion_task(criterion), criterion_reduction(criterion) == "sum"
    t = as_task(task)
    if model is not None and t.reference is None:
        t = t.bind(model)
    return t, False


def finite(value: float, what: str) -> float:
    """``value`` when finite, else a :class:`NumericalError` naming ``what``."""
    if not math.isfinite(value):
        raise NumericalError(f"{what} is {value}: check the data for NaN/inf and the plan's bits")
    return value
