"""Shared plumbing for passes over calibration data: reading the inputs (and labels) out of
what a user passes, and running a model over them with forward hooks attached.

Sensitivity measurement, bias correction, activation errors and fine-tuning all take "a
TensorDataset or an (inputs, labels) pair" and several run hooked forward passes; they share
these helpers so the accepted inputs, the error messages and the hook clean-up agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from hawq.errors import DataError


def as_pair(data: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a TensorDataset or an (inputs, labels) pair of tensors.

    Raises :class:`DataError` naming ``who`` (the argument) when ``data`` is neither, when the
    two lengths differ or when there are no samples."""
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
    """Inputs from a TensorDataset, an (inputs, labels) pair or an inputs tensor; raises
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
def run_batches(model: nn.Module, x: torch.Tensor, batch_size: int,
                device: torch.device | str | None = None) -> None:
    """One forward pass of ``model`` (in eval mode, restored afterwards) over ``x`` in batches
    on ``device`` (default: the model's), outputs discarded: the hooks collect what is needed.
    A hook may raise :class:`StopForward` to cut a batch's pass short."""
    if device is None:
        device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        for xb in x.split(batch_size):
            try:
                model(xb.to(device))
            except StopForward:
                pass
    finally:
        model.train(was)
