"""Process group and device from the torchrun environment."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from runtime.host import READER_MMAP_THRESHOLD_BYTES, keep_freed_buffers_mapped

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    # A gloo group for small host-side agreements (e.g. "does every rank still have data?"), which must
    # work on CPU tensors whatever the main backend is.
    control_group: dist.ProcessGroup

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join the job's process group: NCCL on CUDA, gloo on CPU; the device comes from LOCAL_RANK.

    Outside torchrun (a plain ``python -m trainer.main``) this becomes a one-rank job on a free local port.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # The seed took the GPU index from RANK, which is wrong on every node but the first.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is visible")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
        backend = "nccl"
        # The reader's per-unit arrays (tens of MiB at most) are the host's allocation churn here: reuse
        # their pages instead of faulting fresh ones in for every unit (runtime/host.py).
        keep_freed_buffers_mapped(mmap_threshold_bytes=READER_MMAP_THRESHOLD_BYTES)
    else:
        torch_device, backend = torch.device("cpu"), "gloo"
        # Training on the host: keep large activation buffers mapped between steps (see runtime/host.py).
        keep_freed_buffers_mapped()

    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            store=_attempt_store(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=torch_device if use_cuda else None,
        )
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    logger.info(
        "rank %d/%d (local %d/%d) on %s with %s", rank, world_size, local_rank, local_world_size, torch_device, backend
    )
    return DistContext(rank, world_size, local_rank, local_world_size, torch_device, backend, control)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The job's rendezvous store, with keys private to this torchrun restart attempt.

    After a restart (``--max_restarts``) the new workers can meet in the same store as the dead ones; a
    gloo group then sometimes reads a dead peer's address and fails to connect. A per-attempt prefix
    keeps each attempt's keys apart.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    return dist.PrefixStore(f"seqrec/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ outputs and agreement


class OutputDirError(RuntimeError):
    """A folder or file of the run's outputs (``train.output_dir`` and what is under it) that cannot be created
    or written; the message names the config key and the path, and says why."""


def os_reason(error: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """Why ``error`` happened, in a few words: ``Permission denied``, or ``File exists: /a/.tmp`` where the
    file it failed on is not ``path`` (the one the message names already)."""
    reason = error.strerror or str(error) or type(error).__name__
    failed_on = error.filename
    if error.filename2 is not None:  # a rename: both ends
        reason += f": {os.fsdecode(failed_on)} -> {os.fsdecode(error.filename2)}"
    elif failed_on is not None and (path is None or Path(os.fsdecode(failed_on)) != Path(path)):
        reason += f": {os.fsdecode(failed_on)}"
    return reason


def output_dir_error(
    output_dir: str | os.PathLike[str], action: str, path: str | os.PathLike[str], error: OSError
) -> OutputDirError:
    """``train.output_dir: cannot create /sys/out (Operation not permitted)``, or for a path below it
    ``train.output_dir = out: cannot write out/metrics.jsonl (No space left on device)``."""
    head = "train.output_dir" if Path(path) == Path(output_dir) else f"train.output_dir = {output_dir}"
    return OutputDirError(f"{head}: cannot {action} {path} ({os_reason(error, path)})")


@contextlib.contextmanager
def naming_output_dir(output_dir: str | os.PathLike[str], action: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError of the block into ``output_dir_error(output_dir, action, path, ...)``."""
    try:
        yield
    except OSError as e:
        raise output_dir_error(output_dir, action, path, e) from e


def make_output_dir(output_dir: str | os.PathLike[str]) -> None:
    """Create ``output_dir`` (and its parents) if need be; OutputDirError naming ``train.output_dir`` if not."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"train.output_dir: {path} is a file, not a folder")
    with naming_output_dir(path, "create", path):
        path.mkdir(parents=True, exist_ok=True)


def agree(ctx: DistContext, error: BaseException | None) -> None:
    """Share each rank's outcome of a step that may fail on some ranks only (a write, a read): every rank calls
    this at the same point with its own error, or None. Returns on every rank when none failed; otherwise
    raises on every rank, so that no rank is left waiting for a failed one in a later collective: its own
    error on a rank that failed, a copy of the first failed rank's (same type and message) on the others.

    One all-reduce of one integer on the gloo control group when all is well, about what a barrier costs
    (tests/test_output_errors.py measures both); the failed rank's message travels only on failure.
    """
    first = torch.tensor([ctx.rank if error is not None else ctx.world_size], dtype=torch.int64)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=ctx.control_group)
    src = int(first.item())
    if src == ctx.world_size:
        return
    shared = [_portable(error, ctx.rank) if ctx.rank == src else None]
    dist.broadcast_object_list(shared, src=src, group=ctx.control_group)
    if error is not None:
        raise error
    copy = shared[0]
    assert isinstance(copy, BaseException)
    raise copy


def _portable(error: BaseException | None, rank: int) -> BaseException:
    """``error`` if it survives pickling (to raise it on the other ranks), else a RuntimeError with its text."""
    assert error is not None
    try:
        copy = pickle.loads(pickle.dumps(error))
        if isinstance(copy, BaseException) and str(copy) == str(error):
            return copy
    except Exception:  # noqa: BLE001 - whatever fails to travel goes as text
        pass
    return RuntimeError(f"rank {rank} failed: {type(error).__name__}: {error}")


def on_main(ctx: DistContext, fn: Callable[[], T]) -> T | None:
    """``fn()`` on the main rank only (a write into the output folder), its outcome agreed on every rank
    (``agree``): its result on the main rank and None elsewhere, or its error raised on every rank."""
    result: T | None = None
    error: Exception | None = None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - shared with the other ranks, then raised
            error = e
    agree(ctx, error)
    return result


def on_every_rank(ctx: DistContext, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank (a read or write of the rank's own file); its error on any rank raised on all."""
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then raised
        agree(ctx, e)
        raise  # not reached: agree raises
    agree(ctx, None)
    return result
