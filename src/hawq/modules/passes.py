"""Shared plumbing for passes over data: reading batches of any form once, running a model
over them through a :class:`~hawq.feed.tasks.Task` with forward hooks attached, and the task's mean
loss over them.

Sensitivity measurement, bias correction, activation errors, refinement and calibration all
read data with :func:`hawq.feed.tasks.iter_batches` (tensors, ``(x, y)`` pairs, TensorDatasets,
dicts of tensors, Datasets, DataLoaders) and call the model as the task feeds it; they share
these helpers so the accepted inputs, the error messages and the hook clean-up agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from hawq.base.errors import DataError, NumericalError
from hawq.feed.tasks import (Batches, Task, as_task, batch_len, batch_to, iter_batches, materialize,
                        split_batch)

__all__ = ["Batches", "StopForward", "as_inputs", "as_pair", "hooked", "mean_task_loss",
           "model_device", "naming", "read_batches", "run_batches"]


def as_pair(data: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a TensorDataset or an (inputs, labels) pair of tensors.

    Kept for code that needs the two whole tensors (fine-tuning's shuffled minibatches); passes
    over data read any form with :func:`read_batches` instead. Raises :class:`DataError` naming
    ``who`` (the argument) when ``data`` is neither, when the two lengths differ or when there
    are no samples."""
    if hasattr(data, "tensors") and len(data.tensors) >= 2:
        x, y = data.tensors[:2]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]) \
            and torch.is_tensor(data[1]):
        x, y = data
    else:
        raise DataError(f"{who} must be a TensorDataset or an (inputs, labels) tensor pair")
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"{who} has {len(x)} inputs and {len(y)} labels; need equal, > 0")
    return x, y


def as_inputs(data: Any, who: str) -> torch.Tensor:
    """Inputs from a TensorDataset, an (inputs, labels) pair or an inputs tensor (kept for code
    that needs the whole inputs tensor; passes read any form with :func:`read_batches`). Raises
    :class:`DataError` naming ``who`` when ``data`` is none of these or holds no samples."""
    if hasattr(data, "tensors"):
        x = data.tensors[0]
    elif isinstance(data, (tuple, list)) and len(data) and torch.is_tensor(data[0]):
        x = data[0]
    elif torch.is_tensor(data):
        x = data
    else:
        raise DataError(f"{who} must be a TensorDataset, (inputs, labels) or an inputs tensor")
    if len(x) == 0:
        raise DataError(f"{who} holds no inputs")
    return x


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def read_batches(data: Any, batch_size: int = 256, who: str = "data",
                 limit: int | None = None) -> Batches:
    """``data`` in any form :func:`hawq.feed.tasks.iter_batches` reads, held as :class:`Batches` of
    at most ``batch_size`` samples (larger batches of a DataLoader or of given :class:`Batches`
    are cut), the first ``limit`` samples when given. Raises :class:`DataError` naming ``who``
    for unreadable data or data without samples. Cost: reads ``data`` once; slices of whole
    tensors are views."""
    if isinstance(data, Batches) and limit is None \
            and all(batch_len(bt) <= batch_size for bt in data):
        return data
    return Batches(piece for bt in materialize(data, batch_size, who, limit)
                   for piece in (split_batch(bt, batch_size) if batch_len(bt) > batch_size
                                 else [bt]))


@contextmanager
def naming(who: str) -> Iterator[None]:
    """Re-raise a :class:`DataError` from the body with ``who`` (the argument whose data was
    being read) in front of its message, so the user sees which argument to fix."""
    try:
        yield
    except DataError as e:
        if str(e).startswith(f"{who}"):
            raise
        raise DataError(f"{who}: {e}") from e


class StopForward(Exception):
    """Raise from a hook to end the current batch's forward pass (see :func:`run_batches`)."""


@contextmanager
def hooked(hooks: Iterable[tuple[nn.Module, Callable]], pre: bool = False) -> Iterator[None]:
    """Attach ``(module, fn)`` forward hooks (forward *pre*-hooks with ``pre``) for the body of
    the ``with`` block; they are removed however the block ends."""
    handles = [m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn)
               for m, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_batches(model: nn.Module, data: Any, batch_size: int = 256,
                device: torch.device | str | None = None, task: Task | str | None = None,
                who: str = "data", limit: int | None = None) -> int:
    """One forward pass of ``model`` (in eval mode, restored afterwards) over ``data`` (any form
    :func:`read_batches` takes) in batches on ``device`` (default: the model's), fed by
    ``task`` (default classification's feeding: a tensor itself, a pair's first item, a dict as
    keyword arguments without ``labels``), outputs discarded: the hooks collect what is needed.
    A hook may raise :class:`StopForward` to cut a batch's pass short. Returns the number of
    samples run. Cost: one forward pass over at most ``limit`` samples (streamed: a DataLoader
    is not held in memory); no gradients."""
    task = as_task(task)
    if device is None:
        device = model_device(model)
    was = model.training
    model.eval()
    seen = 0
    try:
        with naming(who):
            for batch in iter_batches(data, batch_size, who, limit):
                try:
                    task.forward(model, batch_to(batch, device))
                except StopForward:
                    pass
                seen += batch_len(batch)
    finally:
        model.train(was)
    return seen


def mean_task_loss(model: nn.Module, data: Any, task: Task | str | None = None,
                   batch_size: int = 256, device: torch.device | str | None = None,
                   who: str = "data") -> float:
    """The task's mean loss of ``model`` over ``data``: sum over batches of
    ``task.loss · batch_len`` divided by the number of samples (for classification, the mean
    cross-entropy). The model is called as it is (set eval mode first). Raises
    :class:`NumericalError` on a NaN/inf loss and a :class:`DataError` naming ``who`` when the
    task cannot feed or judge the data (e.g. classification without labels). Cost: one forward
    pass over ``data``; no gradients."""
    task = as_task(task)
    if device is None:
        device = model_device(model)
    total, n = 0.0, 0
    with torch.no_grad(), naming(who):
        for k, batch in enumerate(iter_batches(data, batch_size, who)):
            batch = batch_to(batch, device)
            m = batch_len(batch)
            loss = float(task.loss(task.forward(model, batch), batch))
            if not math.isfinite(loss):
                raise NumericalError(f"task {task.name!r}: the loss is {loss} at batch {k} of "
                                     f"{who}; check the data and the plan's bit widths")
            total += loss * m
            n += m
    return total / n
