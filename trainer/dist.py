"""Process group and device from the torchrun environment."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from runtime.host import READER_MMAP_THRESHOLD_BYTES, keep_freed_buffers_mapped

logger = logging.getLogger(__name__)


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
