"""Read ORC/Parquet sequence files into ``SequenceBatch`` es (RecIS ``OrcDataset`` + ``SequenceTruncate``).

The pipeline has four stages, each a plain function or method so that one can change without the others:

1. **plan**: ``list_input_files`` + ``enumerate_units`` turn ``cfg.data_paths`` (local paths or URIs, see
   ``data.fs``) into an ordered list of ``ReadUnit`` (one ORC stripe or Parquet row group each), validating
   every file's schema up front; ``assign_units`` gives unit i to rank ``i % world_size`` (after a seeded
   per-epoch permutation when ``cfg.shuffle``).
2. **decode** (``decode_unit``, runs in worker threads, or worker processes with ``cfg.read_workers`` (see
   ``data.workers``), one unit per task): read the feature columns of one unit, check nulls, truncate to
   ``seq_len``, map values to ids, drop users without positions -> ``RowBlock``.
3. **assemble** (``SequenceReader._batches``): group units into windows (permuted when a shuffle buffer is
   set), cut the ordered stream of rows into batches of ``batch_size`` users across unit boundaries, per
   epoch, and tag every batch with the ``Position`` after it (the resumable state).
4. **build** (``build_batches``): pad each batch to its longest user and lay it out as a KJT with one bag
   per position (see ``SequenceBatch``).

All per-value work is vectorised with pyarrow/numpy; Python loops run per feature, block or batch.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.orc as orc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import SequenceBatch
from data.config import DataConfig, FeatureConfig
from data.fs import Location, resolve
from data.ids import check_leaf_type, is_supported_leaf, map_ids
from data.ops import batch_layout, jit
from data.ops.cut import cut_feature
from data.ops.ragged import exclusive_cumsum, is_list_type, ranges

if TYPE_CHECKING:
    from data.workers import DecodeProcesses

logger = logging.getLogger(__name__)

FileFormat = Literal["orc", "parquet"]
_EXTENSIONS: dict[str, FileFormat] = {".orc": "orc", ".parquet": "parquet", ".parq": "parquet", ".pq": "parquet"}


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ReadUnit:
    """The smallest piece of input a rank reads on its own: one ORC stripe or one Parquet row group."""

    path: str  # as shown in messages: a local path or a URI
    fmt: FileFormat
    index: int
    # Where to open it (None: ``path`` on the local filesystem). Not part of the unit's identity.
    fs: pafs.FileSystem | None = field(default=None, compare=False, repr=False)
    fs_path: str = field(default="", compare=False, repr=False)

    @property
    def label(self) -> str:
        kind = "stripe" if self.fmt == "orc" else "row group"
        return f"{self.path} ({kind} {self.index})"

    def open(self) -> str | pa.NativeFile:
        return self.path if self.fs is None else self.fs.open_input_file(self.fs_path)


def _is_marker(name: str) -> bool:
    # Hidden files (.crc, .DS_Store) and job markers (_SUCCESS, _committed_*, our sample marker) are not data.
    return name.startswith((".", "_"))


def _format_of(path: PurePath, file_format: str) -> FileFormat | None:
    by_extension = _EXTENSIONS.get(path.suffix.lower())
    if file_format == "auto":
        return by_extension
    # An explicit format also accepts extension-less Hive-style names such as part-00000.
    if by_extension == file_format or (not path.suffix and file_format in ("orc", "parquet")):
        return file_format  # type: ignore[return-value]
    return None


def _list_folder(folder: Location, file_format: str) -> list[tuple[str, FileFormat]]:
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=False))
    found = []
    for info in sorted(infos, key=lambda i: i.path):
        fmt = _format_of(PurePath(info.base_name), file_format)
        if info.type == pafs.FileType.File and not _is_marker(info.base_name) and fmt:
            found.append((folder.child(info.path).shown, fmt))
    return found


def list_input_files(cfg: DataConfig) -> list[tuple[str, FileFormat]]:
    """Files named by ``cfg.data_paths`` (folders expand to their data files, sorted by name).

    Paths may be local or URIs of any filesystem ``data.fs.resolve`` serves (``s3://``, ``gs://``, ...).
    """
    paths = cfg.paths()
    if not paths:
        raise ValueError("data_paths is empty: name at least one ORC/Parquet file or folder")
    files: list[tuple[str, FileFormat]] = []
    for raw in paths:
        location = resolve(raw)
        try:
            info = location.fs.get_file_info(location.path)
        except OSError as exc:
            raise OSError(f"cannot access data path {raw}: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"data path does not exist: {raw}")
        if info.type == pafs.FileType.Directory:
            found = _list_folder(location, cfg.file_format)
            if not found:
                raise ValueError(f"data folder {raw} contains no .orc or .parquet files")
            files.extend(found)
        else:
            # A file named explicitly is read in the configured format whatever its extension.
            name = PurePath(location.path)
            fmt = _format_of(name, "auto") if cfg.file_format == "auto" else cfg.file_format
            if fmt is None:
                raise ValueError(
                    f"cannot tell the format of {raw} from its extension; name it .orc/.parquet or set file_format"
                )
            files.append((location.shown, fmt))
    return files


def leaf_type(column_type: pa.DataType, feature: FeatureConfig, column: str, source: str) -> pa.DataType:
    """Leaf type of a ``list<T>`` or ``list<list<T>>`` column; error for any other layout or leaf."""
    inner = column_type.value_type if is_list_type(column_type) else None
    leaf = inner.value_type if inner is not None and is_list_type(inner) else inner
    if leaf is None or not is_supported_leaf(leaf):
        raise ValueError(
            f"column {column!r} in {source} has Arrow type {column_type}; expected list<T> or list<list<T>> "
            "with an integer or string T"
        )
    check_leaf_type(feature, leaf, column, source)
    return leaf


def _open_file(source: str | pa.NativeFile, fmt: FileFormat) -> orc.ORCFile | pq.ParquetFile:
    return orc.ORCFile(source) if fmt == "orc" else pq.ParquetFile(source)


def _file_schema_and_units(source: str | pa.NativeFile, fmt: FileFormat) -> tuple[pa.Schema, int]:
    handle = _open_file(source, fmt)
    if fmt == "orc":
        return handle.schema, handle.nstripes
    return handle.schema_arrow, handle.metadata.num_row_groups


def enumerate_units(files: list[tuple[str, FileFormat]], features: list[FeatureConfig]) -> list[ReadUnit]:
    """All units of all files in a fixed order (file order, then stripe order); validates each schema."""
    units: list[ReadUnit] = []
    for path, fmt in files:
        location = resolve(path)
        fs = None if location.local else location.fs
        try:
            source = path if fs is None else fs.open_input_file(location.path)
            schema, count = _file_schema_and_units(source, fmt)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"cannot read {fmt} file {path}: {exc}") from exc
        for feature in features:
            index = schema.get_field_index(feature.name)
            if index < 0:
                raise ValueError(f"column {feature.name!r} is missing in {path} (columns: {schema.names})")
            leaf_type(schema.field(index).type, feature, feature.name, path)
        units.extend(ReadUnit(path, fmt, i, fs, location.path) for i in range(count))
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
    # Exclusive prefix sums of positions / bag_lengths ([N+1] / [P+1]); computed when not given.
    pos_offsets: np.ndarray | None = field(default=None, repr=False)
    bag_offsets: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Offsets make row slicing O(slice) instead of a scan of the whole block per batch.
        if self.pos_offsets is None:
            self.pos_offsets = exclusive_cumsum(self.positions)
        if self.bag_offsets is None:
            self.bag_offsets = exclusive_cumsum(self.bag_lengths)

    def slice(self, start: int, stop: int) -> FeatureRows:
        pos_offsets = self.pos_offsets[start : stop + 1]
        p0, p1 = int(pos_offsets[0]), int(pos_offsets[-1])
        bag_offsets = self.bag_offsets[p0 : p1 + 1]
        v0, v1 = int(bag_offsets[0]), int(bag_offsets[-1])
        # Rebasing the parent's offsets is cheaper than new prefix sums (slicing runs once per batch).
        return FeatureRows(
            self.positions[start:stop], self.bag_lengths[p0:p1], self.values[v0:v1], pos_offsets - p0, bag_offsets - v0
        )

    @staticmethod
    def concat(parts: list[FeatureRows]) -> FeatureRows:
        return FeatureRows(
            np.concatenate([p.positions for p in parts]),
            np.concatenate([p.bag_lengths for p in parts]),
            np.concatenate([p.values for p in parts]),
        )

    def take(self, rows: np.ndarray) -> FeatureRows:
        """The given rows, in the given order (a row permutation for the shuffle window)."""
        positions = self.positions[rows]
        pos_index = ranges(self.pos_offsets[rows], positions)
        bag_lengths = self.bag_lengths[pos_index]
        values = self.values[ranges(self.bag_offsets[pos_index], bag_lengths)]
        return FeatureRows(positions, bag_lengths, values)


@dataclass
class RowBlock:
    """Decoded users of one unit (or a slice/concatenation of units), one ``FeatureRows`` per feature."""

    features: list[FeatureRows]
    # Users dropped while decoding (no positions, empty_sequences = "skip").
    skipped: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.features[0].positions)

    def slice(self, start: int, stop: int) -> RowBlock:
        return RowBlock([f.slice(start, stop) for f in self.features])

    def take(self, rows: np.ndarray) -> RowBlock:
        return RowBlock([f.take(rows) for f in self.features], self.skipped)

    @staticmethod
    def concat(blocks: list[RowBlock]) -> RowBlock:
        features = [FeatureRows.concat(list(parts)) for parts in zip(*(b.features for b in blocks))]
        return RowBlock(features, sum(b.skipped for b in blocks))


_HANDLES = threading.local()
_HANDLES_PER_THREAD = 16


def _cached_handle(unit: ReadUnit) -> orc.ORCFile | pq.ParquetFile:
    """An open reader of ``unit``'s file, cached per thread so its footer is parsed once, not per unit.

    Per thread because pyarrow's file readers are not meant to be shared across threads; the cache dies
    with the decode threads at the end of each pass.
    """
    cache: OrderedDict | None = getattr(_HANDLES, "files", None)
    if cache is None:
        cache = _HANDLES.files = OrderedDict()
    key = (unit.path, unit.fmt)
    handle = cache.get(key)
    if handle is None:
        handle = cache[key] = _open_file(unit.open(), unit.fmt)
        if len(cache) > _HANDLES_PER_THREAD:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return handle


def read_unit(unit: ReadUnit, columns: list[str]) -> dict[str, pa.Array]:
    """The given columns of one unit, each as one contiguous Arrow array."""
    try:
        handle = _cached_handle(unit)
        if unit.fmt == "orc":
            batch = handle.read_stripe(unit.index, columns=columns)
            return {name: batch.column(name) for name in columns}
        table = handle.read_row_group(unit.index, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        # A file truncated or corrupted after planning, or a remote read failing.
        raise ValueError(f"cannot read columns {columns} of {unit.label}: {exc}") from exc
    return {name: table.column(name).combine_chunks() for name in columns}


def warm_decode_kernels() -> None:
    """Load (or compile) the decode kernels for the usual column types now, instead of in the first unit.

    numba loads each kernel from its on-disk cache at the first call of a process, about 0.15 s for the
    decode path. The decode workers' forkserver runs this once, so that every worker forked from it starts
    with them loaded instead of paying that per worker and pass. Numpy only: no torch op runs here.
    """
    if not jit.enabled():
        return
    cfg = DataConfig(seq_len=1)
    columns = {
        "ints": pa.array([[[1], [2, 3]], []], pa.list_(pa.list_(pa.int64()))),
        "strings": pa.array([[["pv"], ["1700000000"]]], pa.list_(pa.list_(pa.string()))),
    }
    features = [
        FeatureConfig("ints", hash_bucket_size=8),
        FeatureConfig("strings", hash_type="murmur", hash_bucket_size=8),
        FeatureConfig("strings", hash_type="farm", hash_bucket_size=8),
    ]
    for feature in features:
        map_ids(cut_feature(columns[feature.name], cfg, "warm-up").leaves, feature)


def decode_unit(unit: ReadUnit, cfg: DataConfig) -> RowBlock:
    """Read, validate, hold out, truncate and hash one unit; users without any position are dropped."""
    columns = read_unit(unit, [f.name for f in cfg.features])
    rows: list[FeatureRows] = []
    empty_before_holdout = None
    for feature in cfg.features:
        where = f"column {feature.name!r} in {unit.label}"
        cut = cut_feature(columns[feature.name], cfg, where)
        empty = cut.empty_in_file
        empty_before_holdout = empty if empty_before_holdout is None else empty_before_holdout & empty
        ids = map_ids(cut.leaves, feature, column=feature.name, source=unit.label)
        rows.append(FeatureRows(cut.positions, cut.bag_lengths, ids, cut.pos_offsets, cut.bag_offsets))
    block = RowBlock(rows)
    seq_lengths = np.maximum.reduce([f.positions for f in rows])
    empty = seq_lengths == 0
    if empty.any():
        # Users emptied by the holdout are expected (too short to train on); only users that had no
        # positions in the file are bad input.
        empty_in_file = empty & empty_before_holdout
        if empty_in_file.any():
            if cfg.empty_sequences == "error":
                names = ", ".join(repr(f.name) for f in cfg.features)
                raise ValueError(
                    f"columns {names} in {unit.label}: row {int(np.argmax(empty_in_file))} has no positions "
                    f"({int(empty_in_file.sum())} such rows; empty_sequences = \"skip\" drops them with a warning)"
                )
            logger.warning("%s: skipped %d users with no positions", unit.label, int(empty_in_file.sum()))
        if (held := int(empty.sum() - empty_in_file.sum())) > 0:
            logger.debug(
                "%s: %d users have no positions left after holding out the last %d",
                unit.label, held, cfg.holdout_positions,
            )  # fmt: skip
        # Empty users own no positions and no values, so only the per-row counts need filtering.
        block = RowBlock([FeatureRows(f.positions[~empty], f.bag_lengths, f.values) for f in rows], int(empty.sum()))
    return block


# ---------------------------------------------------------------------------------------------- build


@dataclass
class _Layout:
    """Where every batch of a block lives in the block's flat output arrays (see ``build_batches``)."""

    seq_lengths: np.ndarray  # [R] positions per user (longest feature)
    row_bounds: list[int]  # [J + 1] first row of every batch, then R
    sizes: list[int]  # [J] users per batch
    max_lens: list[int]  # [J] padded length per batch
    strides: list[int]  # [J] bags per feature per batch (users * padded length)
    bases: list[int]  # [J + 1] batch j's bag lengths: [bases[j], bases[j+1]), feature-major, user, position
    item_bases: list[int]  # [J + 1] batch j's [users, padded length] target grid
    row_base: np.ndarray  # [F, R] slot of every user's first bag of every feature in the lengths array
    item_row: np.ndarray  # [R] slot of every user's first position in the target grid
    row_len: np.ndarray  # [R] padded length of every user's batch


def _layout(features: list[FeatureRows], batch_size: int) -> _Layout:
    num_rows = len(features[0].positions)
    positions = np.stack([f.positions for f in features])  # [F, R]
    seq_lengths = positions.max(axis=0)
    starts = np.arange(0, num_rows, batch_size)
    sizes = np.minimum(batch_size, num_rows - starts)
    max_lens = np.maximum.reduceat(seq_lengths, starts)
    strides = sizes * max_lens
    bases = exclusive_cumsum(len(features) * strides)
    batch_of_row = np.repeat(np.arange(len(starts)), sizes)
    row_in_batch = np.arange(num_rows) - starts[batch_of_row]
    row_len = max_lens[batch_of_row]
    row_offset = row_in_batch * row_len
    row_base = (
        bases[:-1][batch_of_row][None, :] + np.arange(len(features))[:, None] * strides[batch_of_row][None, :]
    ) + row_offset[None, :]
    item_bases = exclusive_cumsum(strides)
    # Python ints: the per-batch loop of build_batches is faster on them than on numpy scalars.
    return _Layout(
        seq_lengths, np.append(starts, num_rows).tolist(), sizes.tolist(), max_lens.tolist(), strides.tolist(),
        bases.tolist(), item_bases.tolist(), row_base, item_bases[:-1][batch_of_row] + row_offset, row_len,
    )  # fmt: skip


def build_batches(block: RowBlock, batch_size: int, keys: list[str], item_index: int) -> list[SequenceBatch]:
    """Cut ``block`` into consecutive batches of ``batch_size`` users (the last may be smaller), each padded
    on the right to its own longest user and laid out as one bag per position.

    All batches of the block are laid out in one pass (compiled kernels, or vectorised numpy without numba),
    then cut into views: a fixed number of calls per block instead of per batch. What is left per batch (the
    ``KeyedJaggedTensor`` and a few views) holds the GIL that decoding needs, so it is kept to the minimum.
    """
    features = block.features
    if block.num_rows == 0:
        raise ValueError("cannot build a batch without users")
    layout = _layout(features, batch_size)
    lengths = batch_layout.bag_lengths(features, layout.row_base, layout.row_len, layout.bases[-1])
    item_ids = batch_layout.target_ids(features[item_index], layout.item_row, layout.row_len, layout.item_bases[-1])
    values = batch_layout.batch_values(features, layout.row_bounds)
    rows, sizes, max_lens, strides = layout.row_bounds, layout.sizes, layout.max_lens, layout.strides
    bases, item_bases = layout.bases, layout.item_bases
    batches = []
    for j in range(len(sizes)):
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(values[j]),
            lengths=torch.from_numpy(lengths[bases[j] : bases[j + 1]]),
            stride=strides[j],
        )
        grid = item_ids[item_bases[j] : item_bases[j + 1]].reshape(sizes[j], max_lens[j])
        batches.append(
            SequenceBatch(
                sparse_features=kjt,
                seq_lengths=torch.from_numpy(layout.seq_lengths[rows[j] : rows[j + 1]]),
                item_ids=torch.from_numpy(grid),
            )
        )
    return batches


# ------------------------------------------------------------------------------------------- pipeline


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
    batches wait (see ``_Handoff``). With ``cfg.read_workers`` > 0, worker processes decode instead of the threads (``data.workers``), with the same units, order and batches. A worker's exception
    is re-raised in the consumer; closing (or dropping) the iterator stops the threads and processes.

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
        self.all_units = enumerate_units(self.files, cfg.features)
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

    def describe(self) -> str:
        """One log line: what this rank reads and how."""
        cfg = self.cfg
        formats = sorted({fmt for _, fmt in self.files})
        epochs = "forever" if self.epochs == 0 else str(self.epochs)
        shuffle = f"shuffle seed {cfg.shuffle_seed} buffer {cfg.shuffle_buffer}" if cfg.shuffle else "no shuffle"
        threads = f"{max(1, cfg.read_threads)} threads"
        decode = f"{cfg.read_workers} decode processes" if cfg.read_workers else threads
        return (
            f"reader rank {self.rank}/{self.world_size}: {len(self.files)} {'+'.join(formats)} files, "
            f"{len(self.all_units)} units, {len(self.units)} for this rank; batch {cfg.batch_size}, "
            f"seq_len {cfg.seq_len} (truncate {cfg.truncate_side}), {decode}, "
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
        on yet, it sets ``held_batches`` to their number and the position is the one before them. Plain ints, strings and lists only (a
        ``torch.distributed.checkpoint`` ``Stateful``). Per rank: store it under a rank-specific key.
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
            # Imported here, not at the top: data.workers imports this module (and only processes need it).
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
