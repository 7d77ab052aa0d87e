"""Models: CIFAR-10 ResNet-20/32/44/56 (He et al. 2016, option A) and a built-in digits CNN.

Models are named by the registry :data:`MODELS` (``resnet20`` ... ``resnet56``, ``digits-cnn``;
the language models ``smollm2-135m`` and ``minilm-l6`` of :mod:`hawq.modules.hf`, whose spec's
``setup`` also gives their task and text; add one with :func:`register_model`) or by ``package.module:factory`` /
``path/to/file.py:factory`` for a user's own model (the factory is called with no arguments).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hawq.base.errors import ConfigError, DataError
from hawq.base.registry import Registry

__all__ = ["MODELS", "REGISTRY", "BasicBlock", "CifarResNet", "DigitsCNN", "ModelSpec",
           "import_user_file",
           "build_model", "get_spec", "register_model", "train_digits_cnn"]


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
    from hawq.feed.data import load_digits
    from hawq.feed.tasks import as_task

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsCNN()
    x, y = load_digits("train", seed=0).tensors
    task = as_task("classification")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for idx in perm.split(64):
            opt.zero_grad(set_to_none=True)
            task.loss_on(model, (x[idx], y[idx])).backward()
            opt.step()
    return model.eval()


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to build it, which dataset it is evaluated on, its input shape."""

    name: str
    dataset: str | None  # "cifar10" or "digits"; None: no built-in dataset (your model)
    input_shape: tuple[int, ...]  # per sample, e.g. (3, 32, 32)
    build: Callable[..., nn.Module]
    #: None for models on a built-in dataset; else a factory returning {"model", "task",
    #: "data"} (language models bring their own task and tokenized text): the CLI reads it as
    #: it reads a user's model factory.
    setup: Callable[[], dict] | None = None


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(pretrained: bool = True, data_dir: str | os.PathLike | None = None) -> nn.Module:
        model = CifarResNet(depth)
        if pretrained:
            from hawq.feed.data import resolve_data_dir

            path = resolve_data_dir(data_dir) / f"resnet{depth}_cifar10.pt"
            if not path.is_file():
                raise DataError(f"pretrained weights {path} are missing: pass --data-dir (or set "
                                f"HAWQ_DATA) to the folder holding resnet{depth}_cifar10.pt")
            _load_weights(model, path, f"ResNet-{depth}")
        return model.eval()

    return build


def _load_weights(model: nn.Module, path: os.PathLike, what: str) -> None:
    """Load the state dict in ``path`` (tensors only: ``weights_only=True``) into ``model``.
    Raises :class:`DataError` naming the file when it cannot be read (truncated, corrupt, not
    a PyTorch file, holds objects other than tensors) or does not hold ``what``'s weights
    (missing/unexpected keys, other shapes)."""
    fix = f"replace it with the original {Path(path).name} or pass another --data-dir"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file from outside: any failure means unusable
        text = " ".join(str(e).split())
        raise DataError(f"pretrained weights {path} cannot be read ({type(e).__name__}: "
                        f"{text[:160]}); the file may be truncated or corrupt: {fix}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                              for k, v in state.items()):
        raise DataError(f"pretrained weights {path} hold a {type(state).__name__}, not a state "
                        f"dict of tensors: {fix}")
    own = model.state_dict()
    missing = [k for k in own if k not in state  # BatchNorm fills in an old file's counter
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    resized = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
               for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or resized:
        parts = [f"missing {missing[:4]}" if missing else "",
                 f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"other shapes {resized[:3]}" if resized else ""]
        raise DataError(f"pretrained weights {path} are not {what}'s weights ("
                        f"{'; '.join(x for x in parts if x)}): {fix}")
    model.load_state_dict(state)


@functools.lru_cache(maxsize=2)
def _digits_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The trained digits CNN's weights, trained once per process (training is deterministic,
    so every later build is the same model without the 2-4 s of training)."""
    return {k: v.detach().clone() for k, v in train_digits_cnn(seed).state_dict().items()}


def _digits(pretrained: bool = True, data_dir: str | os.PathLike | None = None) -> nn.Module:
    if not pretrained:
        return DigitsCNN().eval()
    with torch.random.fork_rng():
        model = DigitsCNN()
    model.load_state_dict(_digits_weights(0))
    return model.eval()


#: Built-in models: name -> :class:`ModelSpec`; add one with :func:`register_model`.
MODELS: Registry[ModelSpec] = Registry("model")


def register_model(spec: ModelSpec) -> ModelSpec:
    """Register ``spec`` under ``spec.name`` (then ``--model NAME`` and :func:`build_model`
    accept it); returns it. Registering a different spec under a taken name raises ConfigError."""
    return MODELS.register(spec.name, spec)


for _d in (20, 32, 44, 56):
    register_model(ModelSpec(f"resnet{_d}", "cifar10", (3, 32, 32), _resnet(_d)))
register_model(ModelSpec("digits-cnn", "digits", (1, 8, 8), _digits))


def _lm(name: str) -> ModelSpec:
    """The spec of the built-in language model ``name`` (:data:`hawq.modules.hf.BUILTIN_LMS`):
    ``build`` loads the model only, ``setup`` the model, its task and the standard library's
    English text tokenized for it. ``transformers`` is imported only when one is called."""

    def build(pretrained: bool = True, data_dir: str | os.PathLike | None = None) -> nn.Module:
        from hawq.modules.hf import builtin_lm

        return builtin_lm(name, pretrained=pretrained)[0]

    def setup() -> dict:
        from hawq.modules.hf import lm_setup

        return lm_setup(name)

    return ModelSpec(name, None, (), build, setup)


for _name in ("smollm2-135m", "minilm-l6"):
    register_model(_lm(_name))

#: The old name of :data:`MODELS` (iterate it or test ``name in REGISTRY``).
REGISTRY = MODELS


def import_user_file(path: str | os.PathLike):
    """The module of the Python file ``path`` that the user named (``path/to/file.py:factory``
    on the command line or in code), imported once per file under a private module name with the
    file's folder on ``sys.path`` while it runs (so it can import its neighbours); later calls
    return the same module. Raises FileNotFoundError when there is no such file, ImportError when
    it is not a Python file, and whatever running the file raises (nothing is left registered
    then). Cost: running the file once."""
    import importlib.util

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no file {str(path)!r}")
    key = f"hawq_user_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # its imports of neighbours, also inside factories called later
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(key, None)
        raise
    return module


def _user_spec(name: str) -> ModelSpec:
    """Spec of ``package.module:factory`` (imported with the current folder on ``sys.path``).
    The CLI reads richer factories (``(model, task, data)``, dicts) with :mod:`hawq.ui.loading`."""
    mod_name, _, attr = name.rpartition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does
    try:
        if mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name:
            module = import_user_file(mod_name)
        else:
            module = importlib.import_module(mod_name)
        factory = module
        for part in attr.split("."):
            factory = getattr(factory, part)
    except Exception as exc:  # noqa: BLE001 - the user's module: its failure is theirs to fix
        raise ConfigError(f"model {name!r}: cannot import {attr!r} from {mod_name!r} "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); give "
                          "'package.module:factory' importable from the current folder or "
                          "'path/to/file.py:factory', and fix the module so it imports") from None
    shape = tuple(getattr(factory, "input_shape", ()))
    dataset = getattr(factory, "dataset", None)

    def build(pretrained: bool = True, data_dir: str | os.PathLike | None = None) -> nn.Module:
        try:
            model = factory() if callable(factory) and not isinstance(factory, nn.Module) \
                else factory
        except Exception as e:
            raise ConfigError(f"model {name!r} raised {type(e).__name__}: {e}") from e
        if isinstance(model, dict):  # {"model": ..., "task": ..., "data": ...}
            model = model.get("model")
        elif isinstance(model, tuple) and model:  # (model, task[, data])
            model = model[0]
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model {name!r} returned a {type(model).__name__}: return an "
                              "nn.Module")
        return model

    return ModelSpec(name, dataset, shape, build)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a built-in name (:data:`MODELS`) or of your
    ``package.module:factory`` / ``path/to/file.py:factory`` (imported with the current folder on
    ``sys.path``, not yet called; its ``input_shape``/``dataset`` attributes, when set, fill the
    spec; ``dataset`` is None otherwise). Raises :class:`ConfigError` listing the built-in names
    for an unknown name, or saying what to do when the factory cannot be imported."""
    if name in MODELS:
        return MODELS.get(name)
    if isinstance(name, str) and ":" in name:
        return _user_spec(name)
    raise ConfigError(f"unknown model {name!r}: use one of {MODELS.names()} or "
                      "'package.module:factory' for your own model")


def build_model(name: str, pretrained: bool = True,
                data_dir: str | os.PathLike | None = None) -> nn.Module:
    """Build a model by name, with pretrained weights when available, in eval mode.

    ``resnetNN`` loads ``<data_dir>/resnetNN_cifar10.pt``; ``digits-cnn`` trains in a few
    seconds; ``module:factory`` calls your factory (an ``nn.Module`` or a dict/tuple holding
    one, see :func:`hawq.ui.loading.unpack_setup`).
    """
    return get_spec(name).build(pretrained=pretrained, data_dir=data_dir).eval()
