"""Cut one ``list<T>`` / ``list<list<T>>`` column of a unit: validate, hold out, check length, truncate.

Per row, in this order: no null may appear (rows, positions or values); the last ``holdout_positions``
positions are dropped (the held-out targets of leave-one-out evaluation); with ``check_length`` more than
``seq_len`` positions left is an error; then at most ``seq_len`` are kept, the newest (last) ones with
``truncate_side = "left"``, else the first ones. The leaf values stay Arrow (not yet mapped to ids).

``cut_feature`` runs the kernel, one compiled pass over the column's Arrow offsets, where numba is
available, else the numpy path (``split_layout``, ``drop_tail``, ``truncate``: several array passes); both
give the same arrays and the same errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.ops import jit
from data.ops.ragged import exclusive_cumsum, is_list_type, ranges

if TYPE_CHECKING:
    from data.config import DataConfig


@dataclass
class Cut:
    """One column of a unit after validation, hold-out and truncation (see ``cut_feature``)."""

    positions: np.ndarray  # [R] kept positions per row
    bag_lengths: np.ndarray  # [P] values per kept position
    leaves: pa.Array  # [V] the kept leaf values, not yet mapped to ids
    empty_in_file: np.ndarray  # [R] rows without any position in the file (before the hold-out)
    # Exclusive prefix sums of positions / bag_lengths, where the cut computed them on the way.
    pos_offsets: np.ndarray | None = None
    bag_offsets: np.ndarray | None = None


def cut_feature(arr: pa.Array, cfg: DataConfig, where: str) -> Cut:
    """Validate, hold out and truncate one ``list<T>`` / ``list<list<T>>`` column of a unit.

    ``where`` names the column and unit in error messages.
    """
    if jit.enabled():
        return _cut_with_kernel(arr, cfg, where)
    return _cut_with_numpy(arr, cfg, where)


def _too_long(where: str, row: int, positions: int, seq_len: int) -> ValueError:
    return ValueError(
        f"{where}: row {row} has {positions} positions, more than seq_len {seq_len} (check_length is on)"
    )


# ----------------------------------------------------------------------------------------------- numpy


def _first_null(arr: pa.Array) -> int:
    return int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))


def split_layout(arr: pa.Array, where: str) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(positions per row, values per position, flat leaf values) of a list<T> or list<list<T>> column."""
    if arr.null_count:
        raise ValueError(f"{where}: row {_first_null(arr)} is null; null rows are not allowed")
    positions = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    inner = pc.list_flatten(arr)
    if is_list_type(inner.type):
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


def _position_in_row(positions: np.ndarray, total: int) -> np.ndarray:
    """``[total]`` index of every position inside its row (0 for each row's first position)."""
    return np.arange(total) - np.repeat(exclusive_cumsum(positions)[:-1], positions)


def _keep_positions(keep: np.ndarray, bag_lengths: np.ndarray, leaves: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """The bag lengths and leaf values of the positions where ``keep`` is set."""
    return bag_lengths[keep], leaves.filter(pa.array(np.repeat(keep, bag_lengths)))


def truncate(
    positions: np.ndarray, bag_lengths: np.ndarray, leaves: pa.Array, seq_len: int, side: str
) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Keep at most ``seq_len`` positions per row: "right" drops from the end, "left" from the start."""
    if not (positions > seq_len).any():
        return positions, bag_lengths, leaves
    t = _position_in_row(positions, len(bag_lengths))
    keep = t < seq_len if side == "right" else t >= np.repeat(positions - seq_len, positions)
    return np.minimum(positions, seq_len), *_keep_positions(keep, bag_lengths, leaves)


def drop_tail(
    positions: np.ndarray, bag_lengths: np.ndarray, leaves: pa.Array, count: int
) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Drop the last ``count`` positions of every row (the held-out targets of leave-one-out)."""
    if count == 0:
        return positions, bag_lengths, leaves
    keep = _position_in_row(positions, len(bag_lengths)) < np.repeat(positions - count, positions)
    return np.maximum(positions - count, 0), *_keep_positions(keep, bag_lengths, leaves)


def _cut_with_numpy(arr: pa.Array, cfg: DataConfig, where: str) -> Cut:
    positions, bag_lengths, leaves = split_layout(arr, where)
    empty_in_file = positions == 0
    positions, bag_lengths, leaves = drop_tail(positions, bag_lengths, leaves, cfg.holdout_positions)
    if cfg.check_length and (too_long := positions > cfg.seq_len).any():
        row = int(np.argmax(too_long))
        raise _too_long(where, row, int(positions[row]), cfg.seq_len)
    positions, bag_lengths, leaves = truncate(positions, bag_lengths, leaves, cfg.seq_len, cfg.truncate_side)
    return Cut(positions, bag_lengths, leaves, empty_in_file)


# ---------------------------------------------------------------------------------------------- kernel


def _cut_with_kernel(arr: pa.Array, cfg: DataConfig, where: str) -> Cut:
    if arr.null_count or arr.values.null_count or (is_list_type(arr.values.type) and arr.values.values.null_count):
        split_layout(arr, where)  # raises the precise error where a null is part of the column's rows
    outer = arr.offsets.to_numpy()
    child = arr.values  # offsets index it from its start, whatever the slice of ``arr``
    nested = is_list_type(child.type)
    inner, leaves = (child.offsets.to_numpy(), child.values) if nested else (None, child)
    positions, bag_lengths, pos_offsets, bag_offsets, starts, stops, contiguous, too_long = cut_positions(
        outer, inner, cfg.holdout_positions, cfg.seq_len, cfg.truncate_side == "left", cfg.check_length
    )
    if too_long >= 0:
        raise _too_long(where, too_long, int(outer[too_long + 1] - outer[too_long]) - cfg.holdout_positions,
                        cfg.seq_len)  # fmt: skip
    if not len(starts):
        leaves = leaves.slice(0, 0)
    elif contiguous:  # nothing cut between rows (no truncation): a zero-copy slice
        leaves = leaves.slice(int(starts[0]), int(stops[-1] - starts[0]))
    else:
        leaves = leaves.take(pa.array(ranges(starts, stops - starts)))
    return Cut(positions, bag_lengths, leaves, outer[1:] == outer[:-1], pos_offsets, bag_offsets)


def cut_positions(
    outer: np.ndarray,
    inner: np.ndarray | None,
    holdout: int,
    seq_len: int,
    keep_newest: bool,
    check_length: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool, int]:
    """Hold out, check and truncate the positions of a ``list<T>`` (``inner`` None) or ``list<list<T>>``
    column in one pass, from its Arrow offsets.

    Per row: the last ``holdout`` positions are dropped; then, with ``check_length``, more than ``seq_len``
    left is an error; then at most ``seq_len`` are kept, the newest (last) ones with ``keep_newest``
    (``truncate_side = "left"``), else the first ones. Returns (positions kept per row, values per kept
    position, their exclusive prefix sums ``[rows + 1]`` and ``[positions + 1]``, first and one-past-last
    leaf index kept per row, whether those leaf ranges follow each other without gaps, index of the first
    row too long for ``check_length`` or -1; the arrays are meaningless when that index is not -1).
    """
    nested = inner is not None
    return _cut_positions(outer, inner if nested else outer, nested, holdout, seq_len, keep_newest, check_length)


@jit.kernel
def _cut_positions(outer, inner, nested, holdout, seq_len, keep_newest, check_length):
    # See cut_positions. Positions of row r are outer[r]..outer[r+1]; position p's values are
    # inner[p]..inner[p+1] when nested (list<list<T>>), else the single value p.
    rows = len(outer) - 1
    pos_offsets = np.empty(rows + 1, dtype=np.int64)
    pos_offsets[0] = 0
    for r in range(rows):
        n = max(outer[r + 1] - outer[r] - holdout, 0)
        if check_length and n > seq_len:
            return pos_offsets, pos_offsets, pos_offsets, pos_offsets, pos_offsets, pos_offsets, False, r
        pos_offsets[r + 1] = pos_offsets[r] + min(n, seq_len)
    positions = pos_offsets[1:] - pos_offsets[:-1]
    bag_lengths = np.empty(pos_offsets[rows], dtype=np.int64)
    bag_offsets = np.empty(pos_offsets[rows] + 1, dtype=np.int64)
    bag_offsets[0] = 0
    leaf_start = np.empty(rows, dtype=np.int64)
    leaf_stop = np.empty(rows, dtype=np.int64)
    contiguous = True
    o = 0
    for r in range(rows):
        k = positions[r]
        first = outer[r] + (max(outer[r + 1] - outer[r] - holdout, 0) - k if keep_newest else 0)
        for t in range(k):
            bag = inner[first + t + 1] - inner[first + t] if nested else 1
            bag_lengths[o + t] = bag
            bag_offsets[o + t + 1] = bag_offsets[o + t] + bag
        leaf_start[r] = inner[first] if nested else first
        leaf_stop[r] = inner[first + k] if nested else first + k
        o += k
        if r > 0 and leaf_start[r] != leaf_stop[r - 1]:
            contiguous = False
    return positions, bag_lengths, pos_offsets, bag_offsets, leaf_start, leaf_stop, contiguous, -1
