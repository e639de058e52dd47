"""Process-level settings of a training process on the host (CPU) side."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers up to this size come from the heap and are reused; larger ones (embedding tables and their
# initialisation temporaries at start-up) are still mapped and given back when freed.
_MMAP_THRESHOLD_BYTES = 256 << 20
# Free memory at the top of the heap is given back only beyond this (more than one step's activations).
_TRIM_THRESHOLD_BYTES = 1 << 30
# For processes whose churn is the reader's per-unit arrays only (decode workers, CUDA ranks): those stay on
# the heap, anything larger is mapped and unmapped as glibc does by default.
READER_MMAP_THRESHOLD_BYTES = 32 << 20


def keep_freed_buffers_mapped(mmap_threshold_bytes: int = _MMAP_THRESHOLD_BYTES) -> bool:
    """Let glibc reuse large freed tensor buffers instead of unmapping them after every step.

    glibc serves allocations above its mmap threshold (at most 32 MiB by default) with a fresh ``mmap`` and
    unmaps them when freed. A CPU training step allocates and frees the same large activations every step
    (the loss's ``[N, N]`` logits and their gradients alone are tens of MiB each), so each step faulted all
    their pages in again: about 60,000 page faults and a tenth of the CPU time per step of
    ``bench.bench_train``'s CPU shape. Served from the heap, and with the heap trimmed only beyond 1 GiB of
    free space, the next step reuses the same pages; the resident set stays at a step's need instead of
    dropping between steps. CUDA ranks and the reader's decode worker processes call it too, with
    ``READER_MMAP_THRESHOLD_BYTES`` (``trainer.dist``, ``data.workers``): the reader allocates and frees the
    same arrays for every unit. Buffers above ``mmap_threshold_bytes`` stay mapped.
    Linux/glibc only; elsewhere (or if glibc refuses) nothing changes and False is returned.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc; musl has no mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
    if not applied:
        logger.debug("glibc refused the malloc thresholds; large buffers stay mmap-backed")
    return applied
