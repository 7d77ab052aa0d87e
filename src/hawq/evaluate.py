"""Evaluation: top-1 accuracy and mean loss of a model on a dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from hawq.errors import NumericalError


@dataclass
class EvalResult:
    """Top-1 accuracy (fraction), mean cross-entropy, number of samples."""

    accuracy: float
    loss: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pairs(data: Any, batch_size: int):
    if hasattr(data, "tensors"):
        x, y = data.tensors[:2]
        yield from zip(x.split(batch_size), y.split(batch_size))
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        yield from zip(data[0].split(batch_size), data[1].split(batch_size))
    else:
        yield from data


@torch.inference_mode()
def evaluate(model: nn.Module, data: Any, batch_size: int = 500,
             progress: bool = False) -> EvalResult:
    """Top-1 accuracy and mean loss of ``model`` (eval mode) on ``data``.

    ``data``: a TensorDataset, an (inputs, targets) pair, or an iterable of (x, y) batches.
    Cost: one forward pass over the data. Raises NumericalError on a NaN/inf output.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, total, loss_sum = 0, 0, 0.0
    try:
        for i, (x, y) in enumerate(tqdm(_pairs(data, batch_size), disable=not progress,
                                        desc="evaluate", leave=False)):
            x, y = x.to(device), y.to(device)
            out = model(x)
            if not torch.isfinite(out).all():
                raise NumericalError(f"model output has NaN/inf at batch {i}; check the plan's "
                                     "bit widths and the calibration")
            correct += int((out.argmax(1) == y).sum())
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            total += len(y)
    finally:
        model.train(was_training)
    return EvalResult(correct / max(total, 1), loss_sum / max(total, 1), total)
