"""Read ORC/Parquet sequence files into ``SequenceBatch`` es (RecIS ``OrcDataset`` + ``SequenceTruncate``).

``SequenceReader`` runs the stages, each in its own module so that one can change without the others:

1. **plan** (``data.units``): ``cfg.data_paths`` -> an ordered list of ``ReadUnit`` (one ORC stripe or
   Parquet row group each), every file's schema validated up front; unit i goes to rank ``i % world_size``
   (after a seeded per-epoch permutation when ``cfg.shuffle``).
2. **decode** (``data.decode``, one unit per task, on worker threads here, or in worker processes with
   ``cfg.read_workers``, see ``data.workers``): read the feature columns of one unit, check nulls, hold
   out, truncate to ``seq_len``, map values to ids, drop users without positions -> ``RowBlock``.
3. **assemble** (``SequenceReader._batches``, here): group units into windows (permuted when a shuffle
   buffer is set), cut the ordered stream of rows into batches of ``batch_size`` users across unit
   boundaries, per epoch, and tag every batch with the ``Position`` after it (the resumable state).
4. **build** (``data.layout.build_batches``): pad each batch to its longest user and lay it out as a KJT
   with one bag per position (see ``SequenceBatch``).

This module is the threaded pipeline around them: decode threads, the producer thread that assembles and
builds, the bounded handoff to the consumer, and the resume positions.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from data.batch import SequenceBatch
from data.config import WHOLE_SEQUENCES, DataConfig
from data.decode import decode_unit
from data.layout import build_batches
from data.rows import RowBlock
from data.units import ReadUnit, assign_units, enumerate_units, list_input_files

if TYPE_CHECKING:
    from data.workers import DecodeProcesses

logger = logging.getLogger(__name__)


@dataclass
class _Failure:
    """An exception raised off the consumer thread, carried to it through the handoff."""

    error: BaseException


_END = object()


class _Handoff:
    """Producer -> consumer channel, bounded by the number of batches waiting (``cfg.prefetch``).

    The producer works ahead while fewer than ``prefetch`` batches wait, and hands over each group it built
    (up to ``_GROUP_BATCHES``, one ``build_batches`` pass) in one piece: a handoff wakes the other thread and
    moves the GIL, and per chunk of ``prefetch`` batches (8 handoffs per 1,024-row unit at batch 32 and the
    default prefetch 4) those wake-ups cost the reader about a tenth of its two-thread throughput.
    """

    def __init__(self, prefetch: int) -> None:
        self._limit = max(1, prefetch)
        self._items: deque[tuple[object, int]] = deque()
        self._waiting = 0  # batches in _items
        self._cond = threading.Condition()

    def put(self, item: object, batches: int, stop: threading.Event) -> bool:
        """Blocks while ``prefetch`` batches wait (control items, ``batches == 0``, never block); False once
        the consumer has gone away."""
        with self._cond:
            while batches and self._waiting >= self._limit and not stop.is_set():
                self._cond.wait(0.05)
            if stop.is_set():
                return False
            self._items.append((item, batches))
            self._waiting += batches
            self._cond.notify_all()
        return True

    def get(self) -> object:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item, batches = self._items.popleft()
            self._waiting -= batches
            self._cond.notify_all()
        return item

    def clear(self) -> None:
        """Drop everything waiting (the consumer stopped): frees a producer blocked in ``put``."""
        with self._cond:
            self._items.clear()
            self._waiting = 0
            self._cond.notify_all()


class _ThreadDecoder:
    """Decodes units on ``cfg.read_threads`` threads of this process (``read_workers = 0``).

    Same interface as ``data.workers.DecodeProcesses``: ``submit(unit)`` returns a handle whose ``result()``
    is the unit's ``RowBlock``; ``parallelism`` units decode at once.
    """

    def __init__(self, cfg: DataConfig, name: str, stop: threading.Event) -> None:
        self.cfg = cfg
        self._stop = stop
        self.parallelism = max(1, cfg.read_threads)
        self._pool = ThreadPoolExecutor(self.parallelism, thread_name_prefix=name)

    def submit(self, unit: ReadUnit) -> Future[RowBlock]:
        return self._pool.submit(decode_unit, unit, self.cfg)

    def build(self, block: RowBlock, batch_size: int, keys: list[str], item_index: int) -> Future[list[SequenceBatch]]:
        """``build_batches`` on a decode thread when there are several: layouts of consecutive groups then
        overlap each other and the decodes (their kernels release the GIL) instead of queueing on the one
        assembly thread, which was the bottleneck from two threads on (measured: 47% -> 53% of raw decode on
        2 cores). With one decode thread the assembly thread itself is the parallel worker: build there."""
        if self.parallelism == 1:
            return _done(build_batches(block, batch_size, keys, item_index))
        return self._pool.submit(build_batches, block, batch_size, keys, item_index)

    def shutdown(self) -> None:
        # Builds handed to the consumer must finish even after the last decode; only a consumer that has gone
        # away (stop set) cancels what has not started.
        self._pool.shutdown(wait=True, cancel_futures=self._stop.is_set())


@dataclass(frozen=True)
class Position:
    """Where the next batch starts: ``row`` rows into the window that begins at unit ``unit`` of ``epoch``.

    ``unit`` indexes this rank's unit order of that epoch (shuffled per epoch when ``cfg.shuffle``). A
    *window* is a run of consecutive units whose rows are delivered together: one unit without a shuffle
    buffer, else units gathered until they hold at least ``shuffle_buffer`` rows, then permuted. Rows are
    counted after users without positions are dropped. Batches may span windows; the position always
    names the window holding the next undelivered row, so a resume re-decodes at most one window.
    """

    epoch: int = 0
    unit: int = 0
    row: int = 0


@dataclass
class _Window:
    epoch: int
    start: int  # first unit (index into the epoch's unit order)
    end: int  # one past the last unit
    block: RowBlock
    offset: int = 0  # rows already delivered (or skipped at resume)

    @property
    def remaining(self) -> int:
        return self.block.num_rows - self.offset


@dataclass
class _Group:
    """Consecutive batches built together (``build_batches``), possibly still being built, with the
    ``Position`` after each."""

    batches: Future  # -> list[SequenceBatch]
    after: list[Position]


def _done(batches: list[SequenceBatch]) -> Future:
    future: Future = Future()
    future.set_result(batches)
    return future


_STATE_VERSION = 1
_GROUP_BATCHES = 64  # most batches built in one pass
_MAX_HELD = 64


class SequenceReader:
    """Iterable of ``SequenceBatch`` for one rank, resumable through ``state_dict``/``load_state_dict``.

    Each ``iter()`` starts a fresh pass from the beginning, unless ``load_state_dict`` was called since the
    last ``iter()``: then it starts at the restored position. Decoding runs on ``cfg.read_threads`` worker
    threads (one unit per task, so every unit is decoded by exactly one thread) and batch building on one
    more thread (with several decode threads, the batch layouts run on them too); batches come out in the
    same order whatever the thread timing, and the reader works ahead while fewer than ``cfg.prefetch``
    batches wait (see ``_Handoff``). With ``cfg.read_workers`` > 0, worker processes decode instead of the
    threads (``data.workers``), with the same units, order and batches. A worker's exception is re-raised
    in the consumer; closing (or dropping) the iterator stops the threads and processes.

    Sharding: the units (ORC stripes / Parquet row groups) of all files, in file then stripe order, are
    dealt round-robin to ranks (unit i to rank ``i % world_size``); with ``cfg.shuffle`` the global unit
    list is first permuted per epoch with a generator seeded by ``(shuffle_seed, epoch)``, identical on all
    ranks, so ranks still read disjoint units that together cover every unit once per epoch.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, epochs: int = 1) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.epochs = epochs  # 0 = repeat forever
        self._check_config()
        self.keys = [f.name for f in cfg.features]
        self.item_index = self.keys.index(cfg.item_feature)
        self.files = list_input_files(cfg)
        self.all_units, self.total_rows = enumerate_units(self.files, cfg.features, cfg.time_feature)
        self.units = assign_units(self.all_units, rank, world_size)
        # Users without positions dropped so far (empty_sequences = "skip"). Counted where units are decoded,
        # so it includes units decoded ahead of the batches consumed.
        self.rows_skipped = 0
        self.batches_consumed = 0  # by the consumer, in this pass (or since the restored position)
        self._position = Position()
        self._resume: Position | None = None
        # Batches the caller has taken from the iterator but not trained on yet (TrainPipelineSparseDist keeps
        # one or two in flight): state_dict() reports the position before them. Set by the training loop.
        self.held_batches = 0
        self._before: deque[Position] = deque(maxlen=_MAX_HELD)  # position before each recent batch
        logger.info("%s", self.describe())

    def _check_config(self) -> None:
        self.cfg.validate()
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0 = forever), not {self.epochs}")

    def estimated_batches_per_epoch(self) -> int:
        """Batches each rank trains per epoch, from the files' row counts (their footers): what epoch-based
        schedules convert to steps. An estimate: users skipped while decoding (no positions left after the
        hold-out) and an uneven deal of stripes to ranks make the true count a little lower."""
        per_rank = self.total_rows // self.world_size
        full, rest = divmod(per_rank, self.cfg.batch_size)
        return max(1, full + (0 if self.cfg.drop_remainder or not rest else 1))

    def describe(self) -> str:
        """One log line: what this rank reads and how."""
        cfg = self.cfg
        formats = sorted({fmt for _, fmt in self.files})
        epochs = "forever" if self.epochs == 0 else str(self.epochs)
        shuffle = f"shuffle seed {cfg.shuffle_seed} buffer {cfg.shuffle_buffer}" if cfg.shuffle else "no shuffle"
        threads = f"{max(1, cfg.read_threads)} threads"
        decode = f"{cfg.read_workers} decode processes" if cfg.read_workers else threads
        if cfg.seq_len >= WHOLE_SEQUENCES:
            positions = "whole sequences (no truncation)"
        else:
            positions = f"seq_len {cfg.seq_len} (truncate {cfg.truncate_side})"
        return (
            f"reader rank {self.rank}/{self.world_size}: {len(self.files)} {'+'.join(formats)} files, "
            f"{len(self.all_units)} units, {len(self.units)} for this rank; batch {cfg.batch_size}, "
            f"{positions}, {decode}, "
            f"prefetch {max(1, cfg.prefetch)}, epochs {epochs}, {shuffle}"
        )

    # ------------------------------------------------------------------------------------ resumable state

    def _fingerprint(self) -> dict[str, Any]:
        """What must not change across a resume for the position to mean the same rows."""
        cfg = self.cfg
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "num_units": len(self.all_units),
            "files": [path for path, _ in self.files],
            "batch_size": cfg.batch_size,
            "shuffle": int(cfg.shuffle),
            "shuffle_seed": cfg.shuffle_seed,
            "shuffle_buffer": cfg.shuffle_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position of the **next batch the consumer will receive**, plus what a resume must match.

        Batches produced ahead (prefetched) but not yet handed out by the iterator do not count: the
        position advances in the consumer's ``next()``. If the caller holds taken batches it has not trained
        on yet, it sets ``held_batches`` to their number and the position is the one before them. Plain ints,
        strings and lists only (a ``torch.distributed.checkpoint`` ``Stateful``). Per rank: store it under a
        rank-specific key.
        Keys: ``version``, ``epoch``, ``unit``, ``row`` (see ``Position``), ``batches_consumed``, and the
        fingerprint ``world_size``, ``rank``, ``num_units``, ``files``, ``batch_size``, ``shuffle``,
        ``shuffle_seed``, ``shuffle_buffer``.
        """
        position = self._resume or self._position
        held = self.held_batches
        if held:
            if self._resume is not None or held > len(self._before):
                raise ValueError(f"held_batches {held} exceeds the {len(self._before)} batches taken in this pass")
            position = self._before[-held]
        return {
            "version": _STATE_VERSION,
            "epoch": position.epoch,
            "unit": position.unit,
            "row": position.row,
            "batches_consumed": self.batches_consumed - held,
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``; the next ``iter()`` yields exactly the batches that
        would have come next in the saved run (same data, same configuration, any thread/prefetch settings).

        Raises ValueError if the state belongs to another world size (resharding a position across a
        different number of ranks is not supported), another rank, other input files or units, another
        batch size or other shuffle settings. ``epochs`` may differ (e.g. to train longer).
        """
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')!r} is not {_STATE_VERSION}")
        if int(state["world_size"]) != self.world_size:
            raise ValueError(
                f"reader state was saved with world_size {int(state['world_size'])} but this run has world_size "
                f"{self.world_size}; resuming the data position on a different number of ranks is not supported "
                "(restart the data from the beginning, or resume with the original number of ranks)"
            )
        mine = self._fingerprint()
        for key, expected in mine.items():
            saved = list(state[key]) if isinstance(expected, list) else state[key]
            if saved != expected:
                shown = f"{len(saved)} files" if key == "files" else repr(saved)
                now = f"{len(expected)} files" if key == "files" else repr(expected)
                raise ValueError(f"reader state does not match this reader: {key} was {shown}, is now {now}")
        position = Position(int(state["epoch"]), int(state["unit"]), int(state["row"]))
        if position.epoch < 0 or not 0 <= position.unit <= len(self.units) or position.row < 0:
            raise ValueError(f"reader state has an invalid position {position}")
        self._resume = position
        self.batches_consumed = int(state.get("batches_consumed", 0))

    # ------------------------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[SequenceBatch]:
        if self._resume is not None:
            start, self._resume = self._resume, None
        else:
            start, self.batches_consumed = Position(), 0
        self._position = start
        self._before.clear()
        stop = threading.Event()
        out = _Handoff(self.cfg.prefetch)
        producer = threading.Thread(
            target=self._produce, args=(out, stop, start), name=f"SequenceReader-r{self.rank}", daemon=True
        )
        producer.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                for batch, after in zip(item.batches.result(), item.after):  # re-raises a failed build
                    self._before.append(self._position)
                    self._position = after  # consumed now: the state moves past this batch
                    self.batches_consumed += 1
                    yield batch
        finally:
            # Runs on exhaustion, error, close() and garbage collection of the generator alike.
            stop.set()
            out.clear()  # free the producer if it is blocked on a full channel
            producer.join(timeout=10)

    def _produce(self, out: _Handoff, stop: threading.Event, start: Position) -> None:
        pool: _ThreadDecoder | DecodeProcesses | None = None
        try:
            pool = self._decoder(stop)
            for group in self._batches(pool, stop, start):
                if not out.put(group, len(group.after), stop):
                    return
            out.put(_END, 0, stop)
        except BaseException as exc:  # noqa: BLE001 - everything must reach the consumer
            out.put(_Failure(exc), 0, stop)
        finally:
            if pool is not None:
                pool.shutdown()

    def _decoder(self, stop: threading.Event) -> _ThreadDecoder | DecodeProcesses:
        name = f"SequenceReader-r{self.rank}-dec"
        if self.cfg.read_workers > 0:
            # Imported here, not at the top: importing data.workers loads every decode kernel (for the workers'
            # forkserver, see there), a cost that a reader decoding on threads need not pay.
            from data.workers import DecodeProcesses

            return DecodeProcesses(self.cfg, self.cfg.read_workers, name, stop)
        return _ThreadDecoder(self.cfg, name, stop)

    def epoch_units(self, epoch: int) -> list[ReadUnit]:
        """This rank's units in the order it reads them in ``epoch``."""
        if not self.cfg.shuffle:
            return self.units
        order = np.random.default_rng([self.cfg.shuffle_seed, epoch]).permutation(len(self.all_units))
        return [self.all_units[i] for i in order[self.rank :: self.world_size]]

    def _schedule(self, start: Position) -> Iterator[tuple[int, int, ReadUnit]]:
        epochs = itertools.count(start.epoch) if self.epochs == 0 else range(start.epoch, self.epochs)
        for epoch in epochs:
            units = self.epoch_units(epoch)
            first = start.unit if epoch == start.epoch else 0
            for index in range(first, len(units)):
                yield epoch, index, units[index]

    def _decoded(
        self, pool: _ThreadDecoder | DecodeProcesses, stop: threading.Event, start: Position
    ) -> Iterator[tuple[int, int, RowBlock]]:
        """Decoded units in schedule order, with a bounded window of decodes running ahead."""
        schedule = self._schedule(start)
        window = 2 * pool.parallelism
        inflight: deque[tuple[int, int, Any]] = deque()  # (epoch, index, handle with .result() -> RowBlock)
        for epoch, index, unit in itertools.islice(schedule, window):
            inflight.append((epoch, index, pool.submit(unit)))
        while inflight and not stop.is_set():
            epoch, index, future = inflight.popleft()
            block = future.result()  # re-raises the worker's exception here
            for next_epoch, next_index, unit in itertools.islice(schedule, 1):
                inflight.append((next_epoch, next_index, pool.submit(unit)))
            yield epoch, index, block

    def _windows(
        self, pool: _ThreadDecoder | DecodeProcesses, stop: threading.Event, start: Position
    ) -> Iterator[_Window]:
        """Units grouped into delivery windows (see ``Position``), shuffled within when configured."""
        cfg = self.cfg
        gather = cfg.shuffle and cfg.shuffle_buffer > 0
        last_unit = len(self.units) - 1
        parts: list[RowBlock] = []
        first = 0
        for epoch, index, block in self._decoded(pool, stop, start):
            self.rows_skipped += block.skipped
            if not parts:
                first = index
            parts.append(block)
            rows = sum(p.num_rows for p in parts)
            if gather and rows < cfg.shuffle_buffer and index < last_unit:
                continue
            merged = parts[0] if len(parts) == 1 else RowBlock.concat(parts)
            parts = []
            if gather:
                # Seeded by the window's identity, so a resumed run permutes it the same way.
                perm = np.random.default_rng([cfg.shuffle_seed, epoch, first, 1]).permutation(merged.num_rows)
                merged = merged.take(perm)
            yield _Window(epoch, first, index + 1, merged)

    def _position_at(self, pending: deque[_Window], last: _Window, rows: int) -> Position:
        """Position of the undelivered row ``rows`` rows ahead (``last`` is the newest window)."""
        for window in pending:
            if rows < window.remaining:
                return Position(window.epoch, window.start, window.offset + rows)
            rows -= window.remaining
        # Just past everything pending: the unit after the newest window.
        if last.end >= len(self.units):
            return Position(last.epoch + 1, 0, 0)
        return Position(last.epoch, last.end, 0)

    def _take(self, pending: deque[_Window], count: int) -> RowBlock:
        """The next ``count`` undelivered rows, across windows."""
        parts = []
        while count:
            window = pending[0]
            n = min(count, window.remaining)
            parts.append(window.block.slice(window.offset, window.offset + n))
            window.offset += n
            count -= n
            if not window.remaining:
                pending.popleft()
        return parts[0] if len(parts) == 1 else RowBlock.concat(parts)

    def _batches(
        self, pool: _ThreadDecoder | DecodeProcesses, stop: threading.Event, start: Position
    ) -> Iterator[_Group]:
        """Groups of batches (being built) with the position after each, in order; the position becomes the
        state once the batch is consumed."""
        size = self.cfg.batch_size
        pending: deque[_Window] = deque()
        epoch = start.epoch
        # A pass resumed mid-epoch had batches before the restored position.
        emitted, rows = int(start.unit > 0 or start.row > 0), 0
        skip = start.row
        for window in self._windows(pool, stop, start):
            if window.epoch != epoch:
                yield self._end_epoch(pool, epoch, pending, emitted, rows)
                epoch, emitted, rows = window.epoch, 0, 0
            if skip:
                if skip > window.block.num_rows:
                    label = self.epoch_units(epoch)[window.start].label
                    raise ValueError(
                        f"cannot resume at row {skip} of the window starting at {label}: it has only "
                        f"{window.block.num_rows} rows; the input changed since the checkpoint"
                    )
                window.offset, skip = skip, 0
            rows += window.remaining
            if window.remaining:
                pending.append(window)
            available = sum(w.remaining for w in pending)
            while available >= size:
                # Build the full batches of the oldest window in one pass (see build_batches): its rows are a
                # view. A batch that straddles windows is built alone, so that only its own rows are copied
                # together, not the next window's. Each batch carries the position after it, worked out before
                # the rows are taken.
                head = pending[0].remaining
                count = min(head // size, _GROUP_BATCHES) if head >= size else 1
                after = [self._position_at(pending, window, (i + 1) * size) for i in range(count)]
                block = self._take(pending, count * size)
                emitted += count
                available -= count * size
                yield _Group(self._build(pool, block, size), after)
        if not stop.is_set():
            yield self._end_epoch(pool, epoch, pending, emitted, rows)

    def _build(self, pool: _ThreadDecoder | DecodeProcesses, block: RowBlock, size: int | None = None) -> Future:
        """``build_batches`` of ``block`` (one batch of all its rows without ``size``), on a decode thread
        where decoding runs on threads, else here; a Future of the batches either way."""
        size = size or block.num_rows
        if isinstance(pool, _ThreadDecoder):
            return pool.build(block, size, self.keys, self.item_index)
        return _done(build_batches(block, size, self.keys, self.item_index))

    def _end_epoch(
        self, pool: _ThreadDecoder | DecodeProcesses, epoch: int, pending: deque[_Window], emitted: int, rows: int
    ) -> _Group:
        """The last partial batch of an epoch: emitted, or dropped under drop_remainder."""
        last = _Group(_done([]), [])
        left = sum(w.remaining for w in pending)
        if left:
            if self.cfg.drop_remainder:
                logger.info("rank %d epoch %d: dropped the last %d rows (drop_remainder)", self.rank, epoch, left)
                pending.clear()
            else:
                emitted += 1
                last = _Group(self._build(pool, self._take(pending, left)), [Position(epoch + 1, 0, 0)])
        if emitted == 0:
            message = (
                f"rank {self.rank} epoch {epoch}: {rows} usable rows give no batch of {self.cfg.batch_size}"
                + (" with drop_remainder" if self.cfg.drop_remainder else "")
            )
            if self.epochs == 0:
                # Repeating forever would spin without ever yielding.
                raise ValueError(message)
            logger.warning("%s", message)
        return last
