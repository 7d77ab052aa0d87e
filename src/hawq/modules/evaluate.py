"""Evaluation: a task's headline metric (top-1 accuracy, perplexity, cosine to float...) and mean
loss of a model on a dataset."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hawq.base.errors import NumericalError
from hawq.modules.passes import model_device, naming
from hawq.feed.tasks import Task, as_task, batch_len, batch_to, iter_batches

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """A model's score on a dataset under a task.

    ``metric`` names the task's headline metric (``"accuracy"``, ``"perplexity"``, ``"cosine"``,
    ``"loss"``...), ``value`` is it and ``higher_is_better`` its direction; ``loss`` is the
    task's mean loss per sample; ``samples`` counts the samples. ``accuracy`` (a fraction) is the
    value when the metric is accuracy, else None (kept for code written for classifiers)."""

    accuracy: float | None
    loss: float
    samples: int
    metric: str = "accuracy"
    value: float | None = None
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if self.value is None and self.accuracy is not None:
            self.value = self.accuracy

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return asdict(self)


def _tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors a model's output holds at its top level (the output itself,
    ``.logits``, a dict's / a model output's values, a tuple's items)."""
    if torch.is_tensor(out):
        found = [out]
    elif isinstance(out, Mapping):
        found = [v for v in out.values() if torch.is_tensor(v)]
    elif isinstance(out, (tuple, list)):
        found = [v for v in out if torch.is_tensor(v)]
    else:
        logits = getattr(out, "logits", None)
        found = [logits] if torch.is_tensor(logits) else []
    return [t for t in found if t.is_floating_point()]


@torch.inference_mode()
def evaluate(model: nn.Module, data: Any, batch_size: int = 500, progress: bool = False,
             task: Task | str | None = None) -> EvalResult:
    """``task``'s headline metric and mean loss of ``model`` (eval mode, restored) on ``data``.

    ``data``: anything :func:`hawq.feed.tasks.iter_batches` reads (a TensorDataset, an (inputs,
    targets) pair, a tensor, a dict of tensors, a Dataset or a DataLoader). ``task`` (default
    ``"classification"``: top-1 accuracy and cross-entropy) says how the model is fed and judged;
    the ``"embedding"`` task must be bound to the float model first (``task.bind(float_model)``).
    Cost: one forward pass over the data. Raises :class:`NumericalError` on a NaN/inf output or
    loss, :class:`hawq.base.errors.DataError` naming the task when the data does not fit it.
    """
    task = as_task(task)
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, loss_sum, metric_sum, metric_count = 0, 0.0, 0.0, 0
    try:
        with naming("evaluate data"):
            batches = iter_batches(data, batch_size, "evaluate data")
            for i, batch in enumerate(tqdm(batches, disable=not progress, desc="evaluate",
                                           leave=False)):
                batch = batch_to(batch, device)
                out = task.forward(model, batch)
                if not all(bool(torch.isfinite(t).all()) for t in _tensors(out)):
                    raise NumericalError(f"model output has NaN/inf at batch {i}; check the "
                                         "plan's bit widths and the calibration")
                n = batch_len(batch)
                loss = float(task.loss(out, batch))
                if not math.isfinite(loss):
                    raise NumericalError(f"task {task.name!r}: the loss is {loss} at batch {i}; "
                                         "check the plan's bit widths and the calibration")
                s, c = task.metric_sums(out, batch)
                loss_sum += loss * n
                metric_sum += float(s)
                metric_count += int(c)
                total += n
    finally:
        model.train(was_training)
    value = float(task.finish_metric(metric_sum, metric_count))
    return EvalResult(accuracy=value if task.metric == "accuracy" else None,
                      loss=loss_sum / max(total, 1), samples=total, metric=task.metric,
                      value=value, higher_is_better=bool(task.higher_is_better))
