"""Datasets: the shared CIFAR-10 file and scikit-learn's bundled digits (no files needed).

The data directory is resolved by :func:`resolve_data_dir`: an explicit argument, else the
``HAWQ_DATA`` environment variable, else ``../shared/data`` beside the project (or beside the
current directory) when it exists.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hawq.base.errors import ConfigError, DataError

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "load_cifar10", "load_dataset", "load_digits",
           "normalize_cifar", "resolve_data_dir"]

#: Normalisation the shared pretrained CIFAR ResNets were trained with (ImageNet constants).
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)

_PROJECT_ROOT = Path(__file__).resolve().parents[3]


def _candidate_dirs() -> list[Path]:
    return [_PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
            Path.cwd() / "shared" / "data"]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory holding ``cifar10.npz`` and the ResNet weights.

    Order: ``data_dir`` if given, else ``$HAWQ_DATA``, else ``../shared/data`` when it exists.
    Raises :class:`DataError` saying what to pass when none is found. Costs one ``stat`` per path.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data directory {str(path)!r} (from --data-dir) does not exist; pass "
                            "the folder holding cifar10.npz and resnet*_cifar10.pt")
        return path
    env = os.environ.get("HAWQ_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"HAWQ_DATA={env!r} is not a directory; set it to the folder holding "
                            "cifar10.npz and resnet*_cifar10.pt")
        return path
    for path in _candidate_dirs():
        if path.is_dir():
            return path
    raise DataError("no data directory found: pass --data-dir DIR (or set HAWQ_DATA=DIR) to the "
                    "folder holding cifar10.npz and resnet*_cifar10.pt; ../shared/data was not found. "
                    "The built-in model 'digits-cnn' needs no files.")


def normalize_cifar(images_uint8: np.ndarray) -> torch.Tensor:
    """Turn uint8 NHWC RGB images into normalised float32 NCHW tensors (x/255, then mean/std)."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _check_limit(limit: int | None, offset: int = 0) -> None:
    """Raise ConfigError unless ``limit`` is None or an integer >= 1 and ``offset`` >= 0 (a
    negative slice would silently take almost everything)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral)
                              or limit < 1):
        raise ConfigError(f"limit={limit!r}: give the number of samples as an integer >= 1 "
                          "(or None for all)")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ConfigError(f"offset={offset!r}: give an integer >= 0")


def _cifar_arrays(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×32×32×3, labels N integers in 0..9) of one split of ``path``, checked.
    Raises :class:`DataError` naming the file and what is wrong: not a readable .npz (truncated,
    not a zip, pickled objects), missing keys (the keys it has are listed), wrong shapes or
    dtypes, different image/label counts, labels outside 0..9, no samples."""
    fix = (f"replace {path} with the shared cifar10.npz (x_train/x_test uint8 N×32×32×3, "
           "y_train/y_test labels 0..9) or pass another --data-dir")
    keys = (f"x_{split}", f"y_{split}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            have = list(npz.files) if hasattr(npz, "files") else []
            missing = [k for k in keys if k not in have]
            if missing:
                raise DataError(f"{path} has no {missing} (it has {have[:8]}): {fix}")
            x, y = npz[keys[0]], npz[keys[1]]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a file from outside: any failure means unusable
        raise DataError(f"{path} is not a readable .npz archive ({type(e).__name__}: "
                        f"{_short(e)}); it may be truncated or corrupt: {fix}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (32, 32, 3):
        raise DataError(f"{path}: {keys[0]} is {x.dtype} of shape {tuple(x.shape)}, expected "
                        f"uint8 images N×32×32×3: {fix}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {keys[1]} is {y.dtype} of shape {tuple(y.shape)}, expected N "
                        f"integer labels: {fix}")
    if len(x) != len(y):
        raise DataError(f"{path}: {keys[0]} has {len(x)} images but {keys[1]} has {len(y)} "
                        f"labels: {fix}")
    if len(y) == 0:
        raise DataError(f"{path}: the {split} split holds no samples: {fix}")
    if y.min() < 0 or y.max() > 9:
        raise DataError(f"{path}: {keys[1]} has labels in {int(y.min())}..{int(y.max())}, "
                        f"expected 0..9 (CIFAR-10 classes): {fix}")
    return x, y


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."


def load_cifar10(data_dir: str | os.PathLike | None = None, split: str = "test",
                 limit: int | None = None, offset: int = 0) -> TensorDataset:
    """Load CIFAR-10 from ``<data_dir>/cifar10.npz`` as a normalised ``TensorDataset``.

    Returns (images float32 N×3×32×32, labels int64 N), normalised exactly as the shared
    README says. ``limit``/``offset`` take a contiguous slice (``limit`` >= 1 or None for all,
    ``offset`` >= 0; else :class:`ConfigError`). The file is checked (readable, keys, uint8
    N×32×32×3 images, integer labels 0..9, matching counts, not empty): a bad one raises
    :class:`DataError` naming it and what is wrong. Cost: one read of the npz (about 1 s for
    the test split).
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split={split!r}: use 'train' or 'test'")
    _check_limit(limit, offset)
    path = resolve_data_dir(data_dir) / "cifar10.npz"
    if not path.is_file():
        raise DataError(f"{path} is missing: pass --data-dir (or HAWQ_DATA) pointing at the folder "
                        "holding cifar10.npz")
    x, y = _cifar_arrays(path, split)
    if offset >= len(y):
        raise DataError(f"{path}: offset={offset} is past the {len(y)} {split} samples: give a "
                        "smaller offset")
    stop = None if limit is None else offset + limit
    x, y = x[offset:stop], y[offset:stop]
    return TensorDataset(normalize_cifar(x), torch.from_numpy(y.astype(np.int64)))


def load_digits(split: str = "test", seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled 8×8 digits (1,797 images) as a ``TensorDataset`` (N×1×8×8, labels).

    The split is a fixed seeded 75/25 shuffle. Pixels are scaled to [-1, 1]. No files needed.
    """
    from sklearn.datasets import load_digits as _sk_digits

    if split not in ("train", "test"):
        raise ConfigError(f"split={split!r}: use 'train' or 'test'")
    bunch = _sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    idx = perm[:cut] if split == "train" else perm[cut:]
    return TensorDataset(x[idx], y[idx])


def load_dataset(name: str, split: str = "test", data_dir: str | os.PathLike | None = None,
                 limit: int | None = None) -> TensorDataset:
    """Load a dataset by name: ``"cifar10"`` (shared file) or ``"digits"`` (bundled), the first
    ``limit`` samples of ``split`` (``limit`` >= 1, or None for all; else :class:`ConfigError`).
    Cost: see :func:`load_cifar10` / :func:`load_digits`."""
    _check_limit(limit)
    if name == "cifar10":
        return load_cifar10(data_dir, split, limit)
    if name == "digits":
        ds = load_digits(split)
        if limit is not None:
            ds = TensorDataset(*(t[:limit] for t in ds.tensors))
        return ds
    raise ConfigError(f"unknown dataset {name!r}: use 'cifar10' or 'digits'")
