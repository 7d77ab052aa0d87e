"""Data-parallel helpers over ``torch.distributed`` (launched by ``torchrun``): who am I, which
share of the work is mine, sums of per-layer numbers across ranks, and one error protocol.

When no process group is initialised (the normal, single-process case) every helper is a no-op:
``world() == 1``, ``rank() == 0``, ``shard(xs)`` is ``list(xs)``, ``all_reduce_sum(t)`` returns
``t`` itself, ``guard()`` does nothing; the cost is one ``is_initialized()`` call.

Under ``torchrun --nproc-per-node N`` (``init()`` reads its environment: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) every rank runs the same program on the same model, data and seed;
the analysis functions split the *work* (rank r takes chunks r, r+N, r+2N, ... of the data, or
layers r, r+N, ... for independent per-layer jobs) and sum the per-layer results with
:func:`all_reduce_sum`, so all ranks end with the same numbers. Backend: NCCL when the rank's
device is CUDA (rank r uses ``cuda:LOCAL_RANK``), gloo on CPU.

Errors. Every collective here first all-reduces a status vector of ``world()`` flags, so a rank
that raised (and called :func:`check_failure` with its exception, which :func:`guard` does)
stops the others at their next collective with :class:`RankFailedError` naming it and quoting
its message; the failing rank re-raises its own exception. Each hawq entry point that talks to
other ranks runs inside :func:`guard`, whose normal exit is one more status check, so no rank
leaves a guarded call (and e.g. writes a file) while another one of the same call failed. A rank
that dies without raising (killed, segfault) makes the others' collective fail with a
connection error (gloo) or time out (``timeout_s`` of :func:`init`); that too becomes a
:class:`RankFailedError`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as tdist

from hawq.base.errors import ConfigError, HawqError

__all__ = ["RankFailedError", "all_reduce_sum", "check_failure", "check_same", "device_for",
           "guard", "init", "is_distributed", "is_main", "launched", "local_rank", "rank",
           "shard", "world"]

T = TypeVar("T")


class RankFailedError(HawqError):
    """Another rank of a distributed run failed (or died); ``ranks`` lists the failed ranks and
    the message quotes their errors."""

    def __init__(self, message: str, ranks: Sequence[int] = ()):
        super().__init__(message)
        self.ranks = list(ranks)


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is initialised."""
    return (tdist.is_available() and tdist.is_initialized()
            and tdist.get_world_size() > 1)


def world() -> int:
    """Number of ranks (1 without an initialised process group)."""
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the only rank that writes files and prints."""
    return rank() == 0


def launched() -> bool:
    """True when this process was started by torchrun with more than one rank (WORLD_SIZE > 1
    in the environment), whether or not :func:`init` has run yet."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 when not launched)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def device_for(requested: str | torch.device | None = None) -> torch.device:
    """The device this rank should use. ``None``: ``cuda:LOCAL_RANK`` under torchrun when CUDA is
    available, else CPU. ``"cpu"``; ``"cuda"``: ``cuda:LOCAL_RANK`` under torchrun, else the
    current CUDA device; ``"cuda:N"``: that device (single process only: under torchrun with
    several ranks give ``"cuda"`` so that rank r takes ``cuda:r``). Raises :class:`ConfigError`
    when CUDA is asked for and missing, or N is out of range. Cost: none."""
    if requested is None:
        if launched() and torch.cuda.is_available():
            return device_for("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={requested!r}: give 'cpu', 'cuda' or 'cuda:N' ({exc})") \
            from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"device={requested!r}: give 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={requested!r}: CUDA is not available on this machine (torch "
                          f"{torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is None:
        if not launched():
            return torch.device("cuda", torch.cuda.current_device())
        if local_rank() >= count:
            raise ConfigError(f"rank with LOCAL_RANK={local_rank()} has no GPU of its own: this "
                              f"machine has {count}; start at most {count} ranks per machine "
                              "(--nproc / --nproc-per-node) or use device='cpu'")
        return torch.device("cuda", local_rank())
    if launched() and _world_size_env() > 1:
        raise ConfigError(f"device={requested!r} under torchrun with {_world_size_env()} ranks: "
                          "give 'cuda' (rank r uses cuda:LOCAL_RANK) or set "
                          "CUDA_VISIBLE_DEVICES to choose the GPUs")
    if dev.index >= count:
        raise ConfigError(f"device={requested!r}: this machine has {count} CUDA device(s), "
                          f"cuda:0..cuda:{count - 1}")
    return dev


def _world_size_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Join the torchrun process group (when launched by torchrun with WORLD_SIZE > 1 and not
    yet initialised) with NCCL for a CUDA device, gloo otherwise; returns this rank's device
    (:func:`device_for`). Outside torchrun it only returns the device. ``timeout_s`` bounds how
    long a collective waits for a rank that died without raising. Cost: one rendezvous."""
    dev = device_for(device)
    if launched() and tdist.is_available() and not tdist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        try:
            tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                     timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise RankFailedError(f"rank {os.environ.get('RANK', '?')} could not join the "
                                  f"process group ({exc}): check MASTER_ADDR/MASTER_PORT") from exc
    return dev


def _comm_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(fn: Any, what: str) -> Any:
    try:
        return fn()
    except RuntimeError as exc:  # DistBackendError, connection reset, timeout
        raise RankFailedError(f"{what} failed on rank {rank()} ({str(exc)[:300]}): another rank "
                              "has probably died or timed out; see its log") from exc


def check_failure(exc: BaseException | None = None) -> None:
    """Collective (every rank calls it at the same point): tell the others whether this rank
    failed (``exc``) and learn whether they did. If any rank failed, ranks that did not raise
    :class:`RankFailedError` naming the failed ranks and quoting their errors, and a failing
    rank re-raises ``exc``. No-op outside a distributed run (``exc`` is then re-raised).
    Cost: one all-reduce of ``world()`` integers, plus one all-gather of the messages on
    failure."""
    if not is_distributed():
        if exc is not None:
            raise exc
        return
    flags = torch.zeros(world(), dtype=torch.int32, device=_comm_device())
    if exc is not None:
        flags[rank()] = 1
    _collective(lambda: tdist.all_reduce(flags), "the failure check")
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if not failed:
        return
    msgs: list[Any] = [None] * world()
    mine = None if exc is None else f"{type(exc).__name__}: {exc}"
    _collective(lambda: tdist.all_gather_object(msgs, mine), "gathering the failed ranks' errors")
    if exc is not None:
        with contextlib.suppress(AttributeError, TypeError):
            exc._hawq_rank_checked = True  # type: ignore[attr-defined]  # for outer guards
        raise exc
    text = "; ".join(f"rank {r}: {str(msgs[r])[:400]}" for r in failed)
    who = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {failed}"
    raise RankFailedError(f"{who} failed, so rank {rank()} stopped: {text}", failed)


_depth = 0


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Run the body as one collective step: if this rank raises, the others stop with
    :class:`RankFailedError` at their next collective (see :func:`check_failure`); on normal
    exit one more status check makes sure every rank finished. Nested guards defer to the
    outermost. No-op outside a distributed run."""
    global _depth
    if _depth or not is_distributed():
        yield
        return
    _depth += 1
    try:
        yield
    except RankFailedError:
        raise
    except Exception as exc:
        if getattr(exc, "_hawq_rank_checked", False):
            raise
        check_failure(exc)  # re-raises exc here, RankFailedError on the other ranks
        raise
    else:
        check_failure()
    finally:
        _depth -= 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of ``tensor`` over all ranks (a new tensor on ``tensor``'s device and
    dtype; ``tensor`` itself outside a distributed run). Every rank must call it with the same
    shape and dtype at the same point. Preceded by the failure check of :func:`check_failure`.
    Cost: two all-reduces, one of ``world()`` flags and one of ``tensor.numel()`` numbers."""
    if not is_distributed():
        return tensor
    check_failure()
    buf = tensor.detach().to(_comm_device(), copy=True)
    _collective(lambda: tdist.all_reduce(buf), "all_reduce_sum")
    return buf.to(tensor.device)


def check_same(values: torch.Tensor | Sequence[float], what: str) -> None:
    """Raise :class:`ConfigError` on every rank when ``values`` (e.g. per-layer weight sums, the
    number of samples) are not identical on all ranks, their number included: each rank must
    load the same model and data. Cost: three small all-reduces (failure flags, the count, the
    values' max and min); no-op outside a distributed run."""
    if not is_distributed():
        return
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    check_failure()
    dev = _comm_device()
    count = torch.tensor([t.numel(), -t.numel()], dtype=torch.float64, device=dev)
    _collective(lambda: tdist.all_reduce(count, op=tdist.ReduceOp.MAX), "check_same")
    if count[0] != -count[1]:
        raise ConfigError(f"{what} differ between ranks ({int(-count[1])} to {int(count[0])} "
                          "values): every rank must load the same model, data and seed")
    both = torch.cat([t, -t]).to(dev)
    _collective(lambda: tdist.all_reduce(both, op=tdist.ReduceOp.MAX), "check_same")
    hi, lo = both[:t.numel()], -both[t.numel():]
    if not torch.equal(hi, lo):
        bad = int((hi != lo).nonzero()[0, 0])
        raise ConfigError(f"{what} differ between ranks (entry {bad}: {float(lo[bad])} .. "
                          f"{float(hi[bad])}): every rank must load the same model, data and "
                          "seed")


def shard(items: Iterable[T]) -> list[T]:
    """This rank's share of ``items``: items r, r+N, r+2N, ... (round robin over N = ``world()``
    ranks, so shares differ by at most one item and together are all of them, each once).
    ``list(items)`` outside a distributed run. Cost: one pass over ``items``."""
    n, r = world(), rank()
    if n == 1:
        return list(items)
    return [x for k, x in enumerate(items) if k % n == r]
