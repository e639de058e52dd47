"""Decode read units in worker processes (``DataConfig.read_workers``) instead of threads.

With decode threads, pyarrow's file decode and the compiled kernels run in parallel, but the remaining
per-unit and per-batch Python shares one GIL. Here every worker process runs ``data.decode.decode_unit``
under its own interpreter; the parent keeps the assembly and batch building, so batches are bit-identical
to thread mode. On a machine with more cores than decode workers this scales the decode further; on two
cores threads are faster (see the README's data benchmark).

Protocol, one duplex pipe per worker. Units are dealt round-robin and each worker answers in order, so
the parent reads the replies in submission order:

* parent -> worker: ``(slot, unit)``; ``None`` to stop (as does the parent's end closing).
* worker -> parent: ``_Decoded`` (where the block's arrays lie in the slot) or ``_Failed`` (the exception,
  the worker's traceback); after a ``_Decoded`` with ``new_slot``, the slot's file descriptor.

A *slot* is an anonymous shared-memory file that the worker writes the block's arrays into; the parent's
``RowBlock`` is a view of it (no copy), and the slot goes back to the worker's free list once the last array
viewing it is gone (a ``weakref.finalize`` on the mapping's base array), so it is reused with its pages
already mapped in both processes. Pickling the arrays through the pipe instead costs about as much as
decoding them (measured: 5 ms against 7 ms for a 2.7 MB unit; pickle copies, 64 KiB pipe buffer).

Workers are started by a ``forkserver`` with this module preloaded: never ``fork``ed from the training
process (its torch/gloo threads may hold locks that a forked child would inherit, locked), and without
paying ``spawn``'s torch import (seconds) per worker and pass. The server only imports modules (it never
runs a torch op, so no torch thread pool, gloo or CUDA state exists where workers are forked). POSIX only.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing as mp
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import recv_handle, send_handle

import numpy as np

from data.config import DataConfig
from data.decode import decode_unit, warm_decode_kernels
from data.rows import FeatureRows, RowBlock
from data.units import ReadUnit
from runtime.host import READER_MMAP_THRESHOLD_BYTES, keep_freed_buffers_mapped

logger = logging.getLogger(__name__)

_MIN_SLOT_BYTES = 1 << 20
_ALIGN = 8  # every array starts 8-byte aligned in a slot
_STOP_GRACE_S = 2.0  # workers finish the units queued to them, then exit; after this they are killed
_POLL_S = 0.1  # how often a wait for a worker's reply checks whether the reader was stopped


class Stopped(Exception):
    """The reader was stopped while waiting for a worker: nobody wants the unit any more."""


class WorkerTraceback(Exception):
    """Where a decode worker raised: attached as the ``__cause__`` of the error re-raised in the parent."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


# ------------------------------------------------------------------------------------------- messages


@dataclass
class _Decoded:
    """A block laid out in slot memory: per feature its positions, bag_lengths, values and offsets arrays."""

    arrays: list[tuple[str, int]]  # (dtype, element count) per array, in slot order
    skipped: int
    new_slot: int = 0  # bytes of a slot created for this reply (its descriptor follows); 0: reused
    records: list[logging.LogRecord] = field(default_factory=list)


@dataclass
class _Failed:
    error: BaseException
    traceback: str
    records: list[logging.LogRecord] = field(default_factory=list)


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError with its type and message.

    The consumer must get the decode error itself, never an error about pickling it.
    """
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send the text instead
        return RuntimeError(f"{type(error).__qualname__}: {error}")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


_FEATURE_ARRAYS = 5


def _block_arrays(block: RowBlock) -> list[np.ndarray]:
    # The offsets too: copying them here is cheaper than the parent computing them again, and the parent is
    # the one process that all batches go through.
    return [
        a for f in block.features for a in (f.positions, f.bag_lengths, f.values, f.pos_offsets, f.bag_offsets)
    ]


def _block_from(arrays: list[np.ndarray], skipped: int) -> RowBlock:
    step = _FEATURE_ARRAYS
    return RowBlock([FeatureRows(*arrays[i : i + step]) for i in range(0, len(arrays), step)], skipped)


# --------------------------------------------------------------------------------------------- worker


class _LogBuffer(logging.Handler):
    """Keeps a worker's log records (e.g. users skipped) for the parent to emit through its own logging."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Formatted here, as QueueHandler does: arguments and exc_info need not pickle.
        record.msg = record.message = self.format(record)
        record.args, record.exc_info, record.exc_text, record.stack_info = None, None, None, None
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        records, self.records = self.records, []
        return records


def _new_slot(nbytes: int) -> tuple[int, mmap.mmap]:
    size = max(_MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length())  # powers of two: few re-allocations
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sequence-reader-slot", os.MFD_CLOEXEC)
    else:  # other POSIX systems: an unlinked temporary file
        fd, path = tempfile.mkstemp(prefix="sequence-reader-slot-")
        os.unlink(path)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def _write(block: RowBlock, slot: int, slots: dict[int, tuple[int, mmap.mmap]]) -> tuple[_Decoded, int | None]:
    """Lay ``block`` out in ``slot`` (replaced by a larger one if it does not fit)."""
    arrays = _block_arrays(block)
    nbytes = sum(_aligned(a.nbytes) for a in arrays)
    new_fd = None
    if slot not in slots or len(slots[slot][1]) < nbytes:
        if slot in slots:
            old_fd, old = slots.pop(slot)
            old.close()
            os.close(old_fd)
        new_fd, buffer = _new_slot(nbytes)
        slots[slot] = (new_fd, buffer)
    buffer = slots[slot][1]
    offset = 0
    for a in arrays:
        np.frombuffer(buffer, a.dtype, a.size, offset)[:] = a
        offset += _aligned(a.nbytes)
    layout = [(a.dtype.str, a.size) for a in arrays]
    return _Decoded(layout, block.skipped, len(buffer) if new_fd is not None else 0), new_fd


def _serve(conn: Connection, cfg: DataConfig, logs: _LogBuffer) -> None:
    slots: dict[int, tuple[int, mmap.mmap]] = {}
    try:
        while True:
            try:
                task = conn.recv()
            except EOFError:  # the parent is gone
                return
            if task is None:
                return
            slot, unit = task
            new_fd = None
            try:
                reply, new_fd = _write(decode_unit(unit, cfg), slot, slots)
            except Exception as exc:  # noqa: BLE001 - every decode error goes to the consumer
                reply = _Failed(_portable(exc), traceback.format_exc())
            reply.records = logs.take()
            try:
                conn.send(reply)
                if new_fd is not None:
                    send_handle(conn, new_fd, 0)
            except (BrokenPipeError, ConnectionResetError):  # the parent stopped reading: nothing to do
                return
    finally:
        for fd, buffer in slots.values():
            buffer.close()
            os.close(fd)


def _worker_main(conn: Connection, cfg: DataConfig, log_level: int) -> None:
    # Ctrl-C reaches the whole process group; the parent stops its workers, they must not die mid-reply.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Decoding allocates and frees the same few MB of numpy arrays per unit; by default glibc trims the heap
    # and maps large arrays afresh, so every unit paid its page faults again (measured: a third of the CPU
    # time outside pyarrow's read). Arrays up to 32 MiB now come from a heap that stays at one unit's need.
    keep_freed_buffers_mapped(mmap_threshold_bytes=READER_MMAP_THRESHOLD_BYTES)
    logs = _LogBuffer()
    root = logging.getLogger()
    root.handlers = [logs]
    root.setLevel(log_level)
    _serve(conn, cfg, logs)


# --------------------------------------------------------------------------------------------- parent


def _emit(records: list[logging.LogRecord]) -> None:
    for record in records:
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


class _Pending:
    """One submitted unit; ``result()`` is its ``RowBlock`` (or raises its decode error)."""

    def __init__(self, worker: _Worker, unit: ReadUnit, slot: int) -> None:
        self.worker, self.unit, self.slot = worker, unit, slot

    def result(self) -> RowBlock:
        return self.worker.receive(self)


class _Worker:
    """The parent's side of one worker process: its pipe, slots, and units in flight."""

    def __init__(self, process: BaseProcess, conn: Connection, stop: threading.Event) -> None:
        self.process = process
        self.conn = conn
        self.stop = stop
        self.slots: dict[int, mmap.mmap] = {}  # the parent's mappings of the worker's slot files
        # Appended to by finalizers, on whichever thread drops a block's last array: a deque is thread-safe.
        self.free_slots: deque[int] = deque()
        self.slot_count = 0
        self.pending: deque[_Pending] = deque()

    @classmethod
    def start(cls, ctx: mp.context.BaseContext, cfg: DataConfig, name: str, stop: threading.Event) -> _Worker:
        parent_end, child_end = ctx.Pipe(duplex=True)  # a socket pair: it can carry file descriptors
        level = logging.getLogger("data").getEffectiveLevel()
        process = ctx.Process(target=_worker_main, args=(child_end, cfg, level), name=name, daemon=True)
        try:
            process.start()
        finally:
            # Only the child holds its end now: its death reads as EOF here, and ours as EOF there.
            child_end.close()
        return cls(process, parent_end, stop)

    def submit(self, unit: ReadUnit) -> _Pending:
        if self.free_slots:
            slot = self.free_slots.popleft()
        else:
            slot, self.slot_count = self.slot_count, self.slot_count + 1
        try:
            self.conn.send((slot, unit))
        except OSError as exc:
            raise self._died(unit) from exc
        pending = _Pending(self, unit, slot)
        self.pending.append(pending)
        return pending

    def receive(self, pending: _Pending) -> RowBlock:
        if not self.pending or self.pending[0] is not pending:
            raise RuntimeError("decode results must be taken in submission order")
        self.pending.popleft()
        try:
            # Polled, not a plain recv: a consumer that stops must not wait for a long unit (or a hung read).
            while not self.conn.poll(_POLL_S):
                if self.stop.is_set():
                    raise Stopped(f"stopped while {pending.unit.label} was being decoded")
            reply = self.conn.recv()
            if isinstance(reply, _Decoded) and reply.new_slot:
                self._map_slot(pending.slot, recv_handle(self.conn), reply.new_slot)
        except (EOFError, OSError) as exc:
            raise self._died(pending.unit) from exc
        _emit(reply.records)
        if isinstance(reply, _Failed):
            self.free_slots.append(pending.slot)
            raise reply.error from WorkerTraceback(reply.traceback)
        return _block_from(self._lease(pending.slot, reply.arrays), reply.skipped)

    def _map_slot(self, slot: int, fd: int, size: int) -> None:
        try:
            # The old mapping (if any) is unmapped when dropped: the slot was free, so no array views it.
            self.slots[slot] = mmap.mmap(fd, size)
        finally:
            os.close(fd)  # the mapping keeps the memory

    def _lease(self, slot: int, layout: list[tuple[str, int]]) -> list[np.ndarray]:
        """The block's arrays as views of the slot, which is free again once none of them is referenced."""
        dtypes = [np.dtype(code) for code, _ in layout]
        sizes = [_aligned(dtype.itemsize * count) for dtype, (_, count) in zip(dtypes, layout)]
        # Every view below (and every view of those) keeps `base` alive through its .base.
        base = np.frombuffer(self.slots[slot], np.uint8, sum(sizes))
        weakref.finalize(base, self.free_slots.append, slot).atexit = False
        arrays, offset = [], 0
        for dtype, (_, count), size in zip(dtypes, layout, sizes):
            arrays.append(base[offset : offset + dtype.itemsize * count].view(dtype))
            offset += size
        return arrays

    def _died(self, unit: ReadUnit) -> RuntimeError:
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is None:
            how = "still running"
        else:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        hint = "; SIGKILL often means the machine ran out of memory" if code == -signal.SIGKILL else ""
        return RuntimeError(
            f"decode worker {self.process.name} (pid {self.process.pid}) stopped answering while decoding "
            f"{unit.label} ({how}{hint})"
        )

    def request_stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass  # already gone

    def join(self, deadline: float) -> None:
        """Wait for the worker to exit until ``deadline`` (``time.monotonic``), then make it."""
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            # Busy with a unit nobody will read, or hung in a read: a worker holds nothing that needs a clean
            # exit (the kernel frees its slots), and SIGKILL also ends a stopped process.
            self.process.kill()
            self.process.join()
        self.conn.close()
        # Not closed: blocks still alive (e.g. in an abandoned iterator) may view them; dropping our references
        # unmaps each once its last view is gone.
        self.slots.clear()


def _preload() -> list[str]:
    """Modules the forkserver imports once, when this process first starts it: the main module, the reader
    (torch & co) and this one. Every worker forked from the server starts with them loaded.

    The main module matters because multiprocessing re-runs it in each new worker (to unpickle anything
    defined there): preloaded, its imports are already done, otherwise each worker of each pass would import
    everything a training script imports. Like any multiprocessing program, the main module must guard
    its entry point with ``if __name__ == "__main__"``. Python 3.11's forkserver imports a main module run as
    ``python -m name`` (by that name), but not a script run as ``python path.py``, "__main__" entry or not:
    ``data.reader`` stands in for its imports. Every program that starts decode workers imports
    it, and with it torch and torchrec, the slow ones: without it, each worker of each pass of such a script
    imported torch again (measured: 2.5 s instead of 0.1 s per later pass). This module needs neither.
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)  # set when run as ``python -m name``
    by_name = [name] if name and name != "__main__" and not name.endswith(".__main__") else []
    return ["__main__", *by_name, "data.reader", __name__]


class DecodeProcesses:
    """``workers`` processes running ``decode_unit`` for one reader pass.

    ``submit(unit)`` deals units to the workers round-robin and returns a handle whose ``result()`` is the
    decoded ``RowBlock``; results must be taken in submission order (the reader's decode window does). A
    decode error is re-raised by ``result()`` as the same exception, with the worker's traceback as its
    cause; a worker that dies (killed, out of memory) makes ``result()`` raise RuntimeError naming it and
    the unit; once ``stop`` is set, a ``result()`` still waiting raises ``Stopped``. ``shutdown()`` stops and
    joins every worker (killing those still busy after a grace period).
    """

    def __init__(self, cfg: DataConfig, workers: int, name: str, stop: threading.Event | None = None) -> None:
        if workers < 1:
            raise ValueError(f"DecodeProcesses needs at least one worker, not {workers}")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_preload())
        self.parallelism = workers
        self._workers: list[_Worker] = []
        self._submitted = 0
        stop = stop or threading.Event()
        try:
            for i in range(workers):
                self._workers.append(_Worker.start(ctx, cfg, f"{name}-{i}", stop))
        except BaseException:
            self.shutdown()
            raise
        logger.debug("started %d decode worker processes, pids %s", workers, [w.process.pid for w in self._workers])

    def submit(self, unit: ReadUnit) -> _Pending:
        worker = self._workers[self._submitted % len(self._workers)]
        self._submitted += 1
        return worker.submit(unit)

    def shutdown(self) -> None:
        for worker in self._workers:
            worker.request_stop()
        deadline = time.monotonic() + _STOP_GRACE_S  # one grace period for all of them, not one each
        for worker in self._workers:
            worker.join(deadline)
        self._workers.clear()


# Imported once by the decode workers' forkserver (see _preload): workers forked from it inherit the loaded
# kernels. Also runs in the process that starts the workers; that costs it the same one-time load.
warm_decode_kernels()
