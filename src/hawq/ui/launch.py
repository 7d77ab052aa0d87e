"""``hawq ... --nproc N``: run the same command again as N ranks under ``torchrun``
(``python -m torch.distributed.run --standalone --nproc-per-node N``) on this machine, and the
per-rank setup a command does first. The analysis itself is data parallel on its own once a
process group exists (:mod:`hawq.base.dist`); this module only starts the ranks.

How the CLI uses it (two calls at the top of a command)::

    rc = maybe_relaunch(args.nproc, argv)      # parent: start N ranks, wait, return their status
    if rc is not None:
        return rc
    device = setup(args.device)               # each rank (or a plain run): join, pick device
    model.to(device)
    ...
    if is_main(): write files                  # hawq.base.dist.is_main

``torchrun --nproc-per-node N -m hawq analyze ...`` started by hand works the same way
(``maybe_relaunch`` sees WORLD_SIZE and does nothing; ``setup`` joins the group).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

import torch

from hawq.base import dist
from hawq.base.errors import ConfigError

__all__ = ["maybe_relaunch", "relaunch_command", "setup", "strip_nproc"]


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (so the ranks do not launch again)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def relaunch_command(nproc: int, argv: Sequence[str], module: str = "hawq") -> list[str]:
    """The command line that runs ``python -m <module> <argv>`` as ``nproc`` ranks on this
    machine under ``torch.distributed.run`` (standalone rendezvous on a free local port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", module, *strip_nproc(argv)]


def maybe_relaunch(nproc: int | None, argv: Sequence[str] | None = None, *,
                   threads: int | None = None, module: str = "hawq") -> int | None:
    """Start ``nproc`` ranks of the current command and wait for them; returns their exit
    status (0 when all succeeded; torchrun's non-zero status when one failed: each rank has
    printed its own one-line error, rank 0's naming the failed rank). Returns ``None`` (do the
    work in this process) when ``nproc`` is None or 1, or when this process already is a rank
    (WORLD_SIZE set by torchrun). ``argv``: the command's arguments (default ``sys.argv[1:]``),
    ``--nproc`` removed before passing them on. ``threads``: torch threads per rank (env
    OMP_NUM_THREADS; default: an existing OMP_NUM_THREADS, else CPU cores // nproc, at least 1).
    ``module``: what ``python -m`` runs in each rank. Raises :class:`ConfigError` for nproc < 1.
    Cost: N interpreter starts and one rendezvous (seconds), then the ranks' work."""
    if nproc is None or dist.launched():
        return None
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc {nproc!r}: give the number of processes, an integer >= 1")
    if nproc == 1:
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        return subprocess.call(relaunch_command(nproc, argv, module), env=env)
    except KeyboardInterrupt:
        return 130


def setup(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Per-process setup of a command: under torchrun join the process group (NCCL on CUDA,
    gloo on CPU) and, when OMP_NUM_THREADS is set, use that many torch threads; returns this
    rank's device (``None``: ``cuda:LOCAL_RANK`` under torchrun when CUDA is available, else
    CPU; ``"cuda"`` under torchrun: ``cuda:LOCAL_RANK``; see
    :func:`hawq.base.dist.device_for`). A plain single-process run only gets its device.
    Raises :class:`ConfigError` for a bad or missing device. ``timeout_s``: how long a rank
    waits for one that died without raising."""
    dev = dist.init(device, timeout_s)
    threads = os.environ.get("OMP_NUM_THREADS")
    if dist.launched() and threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    return dev
