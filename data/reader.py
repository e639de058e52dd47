"""Read ORC/Parquet sequence files into ``SequenceBatch`` es (RecIS ``OrcDataset`` + ``SequenceTruncate``).

The pipeline has four stages, each a plain function so that later features (resumable state, shuffle
buffer, remote filesystems, worker sharding) can replace one stage without touching the others:

1. **plan**: ``list_input_files`` + ``enumerate_units`` turn ``cfg.data_paths`` into an ordered list of
   ``ReadUnit`` (one ORC stripe or Parquet row group each), validating every file's schema up front;
   ``assign_units`` gives unit i to rank ``i % world_size``.
2. **decode** (``decode_unit``, runs in worker threads): read the feature columns of one unit, check nulls,
   truncate to ``seq_len``, map values to ids, drop users without positions -> ``RowBlock``.
3. **assemble** (``SequenceReader._batches``): cut the ordered stream of row blocks into batches of
   ``batch_size`` users, across unit boundaries, per epoch.
4. **build** (``build_batch``): pad a batch to its longest user and lay it out as a KJT with one bag per
   position (see ``SequenceBatch``).

All per-value work is vectorised with pyarrow/numpy; Python loops run per feature, block or batch.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.orc as orc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import SequenceBatch
from data.config import DataConfig, FeatureConfig
from data.hashing import check_feature, check_leaf_type, is_supported_leaf, map_ids

logger = logging.getLogger(__name__)

FileFormat = Literal["orc", "parquet"]
_EXTENSIONS: dict[str, FileFormat] = {".orc": "orc", ".parquet": "parquet", ".parq": "parquet", ".pq": "parquet"}


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ReadUnit:
    """The smallest piece of input a rank reads on its own: one ORC stripe or one Parquet row group."""

    path: str
    fmt: FileFormat
    index: int

    @property
    def label(self) -> str:
        kind = "stripe" if self.fmt == "orc" else "row group"
        return f"{self.path} ({kind} {self.index})"


def _is_marker(path: Path) -> bool:
    # Hidden files (.crc, .DS_Store) and job markers (_SUCCESS, _committed_*, our sample marker) are not data.
    return path.name.startswith((".", "_"))


def _format_of(path: Path, file_format: str) -> FileFormat | None:
    by_extension = _EXTENSIONS.get(path.suffix.lower())
    if file_format == "auto":
        return by_extension
    # An explicit format also accepts extension-less Hive-style names such as part-00000.
    if by_extension == file_format or (not path.suffix and file_format in ("orc", "parquet")):
        return file_format  # type: ignore[return-value]
    return None


def list_input_files(cfg: DataConfig) -> list[tuple[str, FileFormat]]:
    """Files named by ``cfg.data_paths`` (folders expand to their data files, sorted by name)."""
    paths = cfg.paths()
    if not paths:
        raise ValueError("data_paths is empty: name at least one ORC/Parquet file or folder")
    files: list[tuple[str, FileFormat]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"data path does not exist: {raw}")
        if path.is_dir():
            found = [
                (str(p), fmt)
                for p in sorted(path.iterdir())
                if p.is_file() and not _is_marker(p) and (fmt := _format_of(p, cfg.file_format))
            ]
            if not found:
                raise ValueError(f"data folder {raw} contains no .orc or .parquet files")
            files.extend(found)
        else:
            # A file named explicitly is read in the configured format whatever its extension.
            fmt = _format_of(path, "auto") if cfg.file_format == "auto" else cfg.file_format
            if fmt is None:
                raise ValueError(
                    f"cannot tell the format of {raw} from its extension; name it .orc/.parquet or set file_format"
                )
            files.append((str(path), fmt))
    return files


def _list_like(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def leaf_type(column_type: pa.DataType, feature: FeatureConfig, column: str, source: str) -> pa.DataType:
    """Leaf type of a ``list<T>`` or ``list<list<T>>`` column; error for any other layout or leaf."""
    inner = column_type.value_type if _list_like(column_type) else None
    leaf = inner.value_type if inner is not None and _list_like(inner) else inner
    if leaf is None or not is_supported_leaf(leaf):
        raise ValueError(
            f"column {column!r} in {source} has Arrow type {column_type}; expected list<T> or list<list<T>> "
            "with an integer or string T"
        )
    check_leaf_type(feature, leaf, column, source)
    return leaf


def _file_schema_and_units(path: str, fmt: FileFormat) -> tuple[pa.Schema, int]:
    if fmt == "orc":
        reader = orc.ORCFile(path)
        return reader.schema, reader.nstripes
    parquet = pq.ParquetFile(path)
    return parquet.schema_arrow, parquet.metadata.num_row_groups


def enumerate_units(files: list[tuple[str, FileFormat]], features: list[FeatureConfig]) -> list[ReadUnit]:
    """All units of all files in a fixed order (file order, then stripe order); validates each schema."""
    units: list[ReadUnit] = []
    for path, fmt in files:
        try:
            schema, count = _file_schema_and_units(path, fmt)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"cannot read {fmt} file {path}: {exc}") from exc
        for feature in features:
            index = schema.get_field_index(feature.name)
            if index < 0:
                raise ValueError(f"column {feature.name!r} is missing in {path} (columns: {schema.names})")
            leaf_type(schema.field(index).type, feature, feature.name, path)
        units.extend(ReadUnit(path, fmt, i) for i in range(count))
    return units


def assign_units(units: list[ReadUnit], rank: int, world_size: int) -> list[ReadUnit]:
    """Round-robin: unit i goes to rank ``i % world_size`` (every unit read by exactly one rank)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if len(units) < world_size:
        raise ValueError(
            f"only {len(units)} read units (stripes/row groups) for {world_size} ranks: every rank needs at "
            "least one; write more, smaller stripes or use fewer ranks"
        )
    return units[rank::world_size]


# --------------------------------------------------------------------------------------------- decode


@dataclass
class FeatureRows:
    """One feature of a block of users, flattened: rows -> positions -> values."""

    positions: np.ndarray  # [N] positions per user
    bag_lengths: np.ndarray  # [P] values per position
    values: np.ndarray  # [V] int64 ids

    def __post_init__(self) -> None:
        # Offsets make row slicing O(slice) instead of a scan of the whole block per batch.
        self.pos_offsets = _exclusive_cumsum(self.positions)
        self.bag_offsets = _exclusive_cumsum(self.bag_lengths)

    def slice(self, start: int, stop: int) -> FeatureRows:
        p0, p1 = int(self.pos_offsets[start]), int(self.pos_offsets[stop])
        v0, v1 = int(self.bag_offsets[p0]), int(self.bag_offsets[p1])
        return FeatureRows(self.positions[start:stop], self.bag_lengths[p0:p1], self.values[v0:v1])

    @staticmethod
    def concat(parts: list[FeatureRows]) -> FeatureRows:
        return FeatureRows(
            np.concatenate([p.positions for p in parts]),
            np.concatenate([p.bag_lengths for p in parts]),
            np.concatenate([p.values for p in parts]),
        )


@dataclass
class RowBlock:
    """Decoded users of one unit (or a slice/concatenation of units), one ``FeatureRows`` per feature."""

    features: list[FeatureRows]

    @property
    def num_rows(self) -> int:
        return len(self.features[0].positions)

    def slice(self, start: int, stop: int) -> RowBlock:
        return RowBlock([f.slice(start, stop) for f in self.features])

    @staticmethod
    def concat(blocks: list[RowBlock]) -> RowBlock:
        return RowBlock([FeatureRows.concat(list(parts)) for parts in zip(*(b.features for b in blocks))])


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def read_unit(unit: ReadUnit, columns: list[str]) -> dict[str, pa.Array]:
    """The given columns of one unit, each as one contiguous Arrow array."""
    if unit.fmt == "orc":
        batch = orc.ORCFile(unit.path).read_stripe(unit.index, columns=columns)
        return {name: batch.column(name) for name in columns}
    table = pq.ParquetFile(unit.path).read_row_group(unit.index, columns=columns)
    return {name: table.column(name).combine_chunks() for name in columns}


def _first_null(arr: pa.Array) -> int:
    return int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))


def split_layout(arr: pa.Array, where: str) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(positions per row, values per position, flat leaf values) of a list<T> or list<list<T>> column."""
    if arr.null_count:
        raise ValueError(f"{where}: row {_first_null(arr)} is null; null rows are not allowed")
    positions = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    inner = pc.list_flatten(arr)
    if _list_like(inner.type):
        if inner.null_count:
            raise ValueError(f"{where}: position {_first_null(inner)} (flattened) is null; use an empty list")
        bag_lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False).astype(np.int64)
        leaves = pc.list_flatten(inner)
    else:
        bag_lengths = np.ones(len(inner), dtype=np.int64)  # list<T>: one value per position
        leaves = inner
    if leaves.null_count:
        raise ValueError(f"{where}: value {_first_null(leaves)} (flattened) is null; nulls are not allowed")
    return positions, bag_lengths, leaves


def truncate(
    positions: np.ndarray, bag_lengths: np.ndarray, leaves: pa.Array, seq_len: int, side: str
) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Keep at most ``seq_len`` positions per row: "right" drops from the end, "left" from the start."""
    if not (positions > seq_len).any():
        return positions, bag_lengths, leaves
    starts = np.repeat(_exclusive_cumsum(positions)[:-1], positions)
    t = np.arange(len(bag_lengths)) - starts  # position index inside its row
    if side == "right":
        keep = t < seq_len
    else:
        keep = t >= np.repeat(positions - seq_len, positions)
    leaves = leaves.filter(pa.array(np.repeat(keep, bag_lengths)))
    return np.minimum(positions, seq_len), bag_lengths[keep], leaves


def decode_unit(unit: ReadUnit, cfg: DataConfig) -> RowBlock:
    """Read, validate, truncate and hash one unit; users without any position are dropped."""
    columns = read_unit(unit, [f.name for f in cfg.features])
    rows: list[FeatureRows] = []
    for feature in cfg.features:
        where = f"column {feature.name!r} in {unit.label}"
        positions, bag_lengths, leaves = split_layout(columns[feature.name], where)
        if cfg.check_length and (too_long := positions > cfg.seq_len).any():
            row = int(np.argmax(too_long))
            raise ValueError(
                f"{where}: row {row} has {int(positions[row])} positions, more than seq_len {cfg.seq_len} "
                "(check_length is on)"
            )
        positions, bag_lengths, leaves = truncate(positions, bag_lengths, leaves, cfg.seq_len, cfg.truncate_side)
        ids = map_ids(leaves, feature, column=feature.name, source=unit.label)
        rows.append(FeatureRows(positions, bag_lengths, ids))
    block = RowBlock(rows)
    seq_lengths = np.maximum.reduce([f.positions for f in rows])
    empty = seq_lengths == 0
    if empty.any():
        logger.warning("%s: skipped %d users with no positions", unit.label, int(empty.sum()))
        # Empty users own no positions and no values, so only the per-row counts need filtering.
        block = RowBlock([FeatureRows(f.positions[~empty], f.bag_lengths, f.values) for f in rows])
    return block


# ---------------------------------------------------------------------------------------------- build


def build_batch(block: RowBlock, keys: list[str], item_index: int) -> SequenceBatch:
    """Pad ``block``'s users on the right to the longest one and lay them out as one bag per position."""
    num_rows = block.num_rows
    seq_lengths = np.maximum.reduce([f.positions for f in block.features])
    max_len = int(seq_lengths.max()) if num_rows else 0
    lengths: list[np.ndarray] = []
    item_ids = np.full(num_rows * max_len, -1, dtype=np.int64)
    for index, feature in enumerate(block.features):
        # Slot b*T + t of position t of user b, for every real position of this feature.
        rows = np.repeat(np.arange(num_rows), feature.positions)
        t = np.arange(len(feature.bag_lengths)) - np.repeat(feature.pos_offsets[:-1], feature.positions)
        slots = rows * max_len + t
        bag = np.zeros(num_rows * max_len, dtype=np.int32)
        bag[slots] = feature.bag_lengths
        lengths.append(bag)
        if index == item_index:
            filled = feature.bag_lengths > 0
            item_ids[slots[filled]] = feature.values[feature.bag_offsets[:-1][filled]]
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate([f.values for f in block.features]).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
        stride=num_rows * max_len,
    )
    return SequenceBatch(
        sparse_features=kjt,
        seq_lengths=torch.from_numpy(seq_lengths.astype(np.int64)),
        item_ids=torch.from_numpy(item_ids.reshape(num_rows, max_len)),
    )


# ------------------------------------------------------------------------------------------- pipeline


@dataclass
class _Failure:
    """An exception raised off the consumer thread, carried to it through the queue."""

    error: BaseException


_END = object()


def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Blocking put that gives up once the consumer has gone away (returns False then)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


class SequenceReader:
    """Iterable of ``SequenceBatch`` for one rank; each ``iter()`` starts a fresh pass from the beginning.

    Decoding runs on ``cfg.read_threads`` worker threads and batch building on one more thread; batches
    come out in the same order whatever the thread timing, and at most ``cfg.prefetch`` of them wait in
    the queue. A worker's exception is re-raised in the consumer; closing (or dropping) the iterator stops
    the threads.
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
        self.all_units = enumerate_units(self.files, cfg.features)
        self.units = assign_units(self.all_units, rank, world_size)
        logger.info("%s", self.describe())

    def _check_config(self) -> None:
        cfg = self.cfg
        if not cfg.features:
            raise ValueError("no features configured")
        names = [f.name for f in cfg.features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names: {names}")
        if cfg.item_feature not in names:
            raise ValueError(f"item_feature {cfg.item_feature!r} is not one of the features {names}")
        if cfg.batch_size <= 0 or cfg.seq_len <= 0:
            raise ValueError(f"batch_size ({cfg.batch_size}) and seq_len ({cfg.seq_len}) must be positive")
        if cfg.truncate_side not in ("left", "right"):
            raise ValueError(f"truncate_side must be 'left' or 'right', not {cfg.truncate_side!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0 = forever), not {self.epochs}")
        for feature in cfg.features:
            check_feature(feature)

    def describe(self) -> str:
        """One log line: what this rank reads and how."""
        cfg = self.cfg
        formats = sorted({fmt for _, fmt in self.files})
        epochs = "forever" if self.epochs == 0 else str(self.epochs)
        return (
            f"reader rank {self.rank}/{self.world_size}: {len(self.files)} {'+'.join(formats)} files, "
            f"{len(self.all_units)} units, {len(self.units)} for this rank; batch {cfg.batch_size}, "
            f"seq_len {cfg.seq_len} (truncate {cfg.truncate_side}), {max(1, cfg.read_threads)} threads, "
            f"prefetch {max(1, cfg.prefetch)}, epochs {epochs}"
        )

    def __iter__(self) -> Iterator[SequenceBatch]:
        stop = threading.Event()
        out: queue.Queue = queue.Queue(maxsize=max(1, self.cfg.prefetch))
        producer = threading.Thread(
            target=self._produce, args=(out, stop), name=f"SequenceReader-r{self.rank}", daemon=True
        )
        producer.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            # Runs on exhaustion, error, close() and garbage collection of the generator alike.
            stop.set()
            while not out.empty():  # free the producer if it is blocked on a full queue
                out.get_nowait()
            producer.join(timeout=10)

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        pool = ThreadPoolExecutor(max(1, self.cfg.read_threads), thread_name_prefix=f"SequenceReader-r{self.rank}-dec")
        try:
            for batch in self._batches(pool, stop):
                if not _put(out, batch, stop):
                    return
            _put(out, _END, stop)
        except BaseException as exc:  # noqa: BLE001 - everything must reach the consumer
            _put(out, _Failure(exc), stop)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _schedule(self) -> Iterator[tuple[int, ReadUnit]]:
        epochs = itertools.count() if self.epochs == 0 else range(self.epochs)
        for epoch in epochs:
            for unit in self.units:
                yield epoch, unit

    def _decoded(self, pool: ThreadPoolExecutor, stop: threading.Event) -> Iterator[tuple[int, RowBlock]]:
        """Decoded units in schedule order, with a bounded window of decodes running ahead."""
        schedule = self._schedule()
        window = 2 * max(1, self.cfg.read_threads)
        inflight: deque[tuple[int, Future[RowBlock]]] = deque()
        for epoch, unit in itertools.islice(schedule, window):
            inflight.append((epoch, pool.submit(decode_unit, unit, self.cfg)))
        while inflight and not stop.is_set():
            epoch, future = inflight.popleft()
            block = future.result()  # re-raises the worker's exception here
            for next_epoch, unit in itertools.islice(schedule, 1):
                inflight.append((next_epoch, pool.submit(decode_unit, unit, self.cfg)))
            yield epoch, block

    def _batches(self, pool: ThreadPoolExecutor, stop: threading.Event) -> Iterator[SequenceBatch]:
        size = self.cfg.batch_size
        carry: RowBlock | None = None
        epoch, emitted, rows = 0, 0, 0
        for block_epoch, block in self._decoded(pool, stop):
            if block_epoch != epoch:
                yield from self._end_epoch(epoch, carry, emitted, rows)
                carry, epoch, emitted, rows = None, block_epoch, 0, 0
            rows += block.num_rows
            if carry is not None:
                block = RowBlock.concat([carry, block])
            full = block.num_rows // size
            for i in range(full):
                yield build_batch(block.slice(i * size, (i + 1) * size), self.keys, self.item_index)
            emitted += full
            carry = block.slice(full * size, block.num_rows) if block.num_rows % size else None
        if not stop.is_set():
            yield from self._end_epoch(epoch, carry, emitted, rows)

    def _end_epoch(self, epoch: int, carry: RowBlock | None, emitted: int, rows: int) -> Iterator[SequenceBatch]:
        """The last partial batch of an epoch: emitted, or dropped under drop_remainder."""
        if carry is not None and carry.num_rows:
            if self.cfg.drop_remainder:
                logger.info(
                    "rank %d epoch %d: dropped the last %d rows (drop_remainder)", self.rank, epoch, carry.num_rows
                )
            else:
                emitted += 1
                yield build_batch(carry, self.keys, self.item_index)
        if emitted == 0:
            message = (
                f"rank {self.rank} epoch {epoch}: {rows} usable rows give no batch of {self.cfg.batch_size}"
                + (" with drop_remainder" if self.cfg.drop_remainder else "")
            )
            if self.epochs == 0:
                # Repeating forever would spin without ever yielding.
                raise ValueError(message)
            logger.warning("%s", message)
