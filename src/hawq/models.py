"""Models: CIFAR-10 ResNet-20/32/44/56 (He et al. 2016, option A) and a built-in digits CNN.

Models are named by the registry (``resnet20`` ... ``resnet56``, ``digits-cnn``) or by
``package.module:factory`` for a user's own model (the factory is called with no arguments).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hawq.errors import ConfigError, DataError


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a parameter-free option-A shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.pad:
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth 6n+2 with 16/32/64 channels and a 64→10 linear head."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"depth={depth}: a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, ...)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(planes_in, planes, stride if j == 0 else 1))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class DigitsCNN(nn.Module):
    """A small CNN for 8×8 digits: two conv-BN-ReLU layers, then two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def train_digits_cnn(seed: int = 0, epochs: int = 8) -> DigitsCNN:
    """Train :class:`DigitsCNN` on the digits train split (deterministic under ``seed``).

    Cost: about 2-4 s on 2 CPU cores (``epochs`` passes over 1,347 images). Returns it in eval mode.
    """
    from hawq.data import load_digits

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsCNN()
    x, y = load_digits("train", seed=0).tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for idx in perm.split(64):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to build it, which dataset it is evaluated on, its input shape."""

    name: str
    dataset: str  # "cifar10" or "digits"
    input_shape: tuple[int, ...]  # per sample, e.g. (3, 32, 32)
    build: Callable[..., nn.Module]


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(pretrained: bool = True, data_dir: str | os.PathLike | None = None) -> nn.Module:
        model = CifarResNet(depth)
        if pretrained:
            from hawq.data import resolve_data_dir

            path = resolve_data_dir(data_dir) / f"resnet{depth}_cifar10.pt"
            if not path.is_file():
                raise DataError(f"pretrained weights {path} are missing: pass --data-dir (or set "
                                f"HAWQ_DATA) to the folder holding resnet{depth}_cifar10.pt")
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    return build


def _digits(pretrained: bool = True, data_dir: str | os.PathLike | None = None) -> nn.Module:
    return train_digits_cnn() if pretrained else DigitsCNN().eval()


REGISTRY: dict[str, ModelSpec] = {
    **{f"resnet{d}": ModelSpec(f"resnet{d}", "cifar10", (3, 32, 32), _resnet(d))
       for d in (20, 32, 44, 56)},
    "digits-cnn": ModelSpec("digits-cnn", "digits", (1, 8, 8), _digits),
}


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` for a registry name or ``module:factory`` path."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"model {name!r}: cannot import {attr!r} from {mod_name!r} ({exc}); "
                              "give 'package.module:factory' importable from here") from exc
        shape = tuple(getattr(factory, "input_shape", ()))
        dataset = getattr(factory, "dataset", "cifar10")
        return ModelSpec(name, dataset, shape, lambda pretrained=True, data_dir=None: factory())
    raise ConfigError(f"unknown model {name!r}: use one of {sorted(REGISTRY)} or "
                      "'package.module:factory' for your own model")


def build_model(name: str, pretrained: bool = True,
                data_dir: str | os.PathLike | None = None) -> nn.Module:
    """Build a model by name, with pretrained weights when available, in eval mode.

    ``resnetNN`` loads ``<data_dir>/resnetNN_cifar10.pt``; ``digits-cnn`` trains in a few
    seconds; ``module:factory`` calls your factory.
    """
    return get_spec(name).build(pretrained=pretrained, data_dir=data_dir).eval()
