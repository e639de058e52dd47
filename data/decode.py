"""Decode one read unit into a ``RowBlock``: read, validate, hold out, truncate, hash.

``decode_unit`` is the whole decode of one unit, a plain function of (unit, config) so that it runs alike
on the reader's decode threads and in its worker processes (``data.workers``); it reads nothing but the
unit's feature columns, and keeps no state across units but the per-thread cache of open files.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.orc as orc
import pyarrow.parquet as pq

from data.config import DataConfig, FeatureConfig
from data.ids import map_ids
from data.ops import jit
from data.ops.cut import cut_feature
from data.rows import FeatureRows, RowBlock
from data.units import ReadUnit, open_file, unreadable_file_message

logger = logging.getLogger(__name__)

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
        handle = cache[key] = open_file(unit.open(), unit.fmt)
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
        what = f"cannot read columns {columns} of {unit.label}"
        raise ValueError(unreadable_file_message(what, unit.fmt, unit.fs, unit.fs_path or unit.path, exc)) from exc
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


def parse_times(leaves: pa.Array, where: str) -> np.ndarray:
    """Event times as int64 seconds from integer or decimal-string leaves; anything else is an error."""
    try:
        return pc.cast(leaves, pa.int64(), safe=True).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{where}: event times must be integers or decimal strings (Unix seconds): {exc}") from exc


def _time_rows(column: pa.Array, cfg: DataConfig, unit: ReadUnit, item: FeatureRows) -> FeatureRows:
    """The event-time column as one more ``FeatureRows`` (values: seconds), cut like the features."""
    where = f"time column {cfg.time_feature!r} in {unit.label}"
    cut = cut_feature(column, cfg, where)
    mismatch = np.flatnonzero(cut.positions != item.positions)
    if mismatch.size:
        row = int(mismatch[0])
        raise ValueError(
            f"{where}: row {row} has {int(cut.positions[row])} positions but item column {cfg.item_feature!r} "
            f"has {int(item.positions[row])}; every position needs its event time"
        )
    return FeatureRows(cut.positions, cut.bag_lengths, parse_times(cut.leaves, where), cut.pos_offsets, cut.bag_offsets)


def decode_unit(unit: ReadUnit, cfg: DataConfig) -> RowBlock:
    """Read, validate, hold out, truncate and hash one unit; users without any position are dropped. With
    ``cfg.time_feature`` the block holds one more ``FeatureRows`` after the features: the event times."""
    names = [f.name for f in cfg.features]
    columns = read_unit(unit, names + ([cfg.time_feature] if cfg.time_feature not in ("", *names) else []))
    rows: list[FeatureRows] = []
    empty_before_holdout = None
    for feature in cfg.features:
        where = f"column {feature.name!r} in {unit.label}"
        cut = cut_feature(columns[feature.name], cfg, where)
        empty = cut.empty_in_file
        empty_before_holdout = empty if empty_before_holdout is None else empty_before_holdout & empty
        ids = map_ids(cut.leaves, feature, column=feature.name, source=unit.label)
        rows.append(FeatureRows(cut.positions, cut.bag_lengths, ids, cut.pos_offsets, cut.bag_offsets))
    if cfg.time_feature:
        rows.append(_time_rows(columns[cfg.time_feature], cfg, unit, rows[names.index(cfg.item_feature)]))
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
