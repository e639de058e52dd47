"""The per-value work of a batch layout: padded bag lengths, the target grid, and per-batch values.

``data.layout`` decides where every batch of a block lies in flat output arrays (``_Layout``: a slot for
every user's first bag of every feature, padded to its batch's longest user); these fill the arrays. Each
entry point runs its kernel where numba is available, else the numpy path below it; same arrays either way.

The kernels write every slot of a user's padded row exactly once (values, then padding), so the output
needs no separate zeroing pass: at a block's size these loops are bound by memory traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from data.ops import jit
from data.ops.ragged import exclusive_cumsum

if TYPE_CHECKING:
    from data.rows import FeatureRows


def bag_lengths(features: Sequence[FeatureRows], row_base: np.ndarray, row_len: np.ndarray, total: int) -> np.ndarray:
    """[total] int32 values per bag: feature f's row r fills ``[row_base[f, r], row_base[f, r] + row_len[r])``
    with its bag lengths, then zeros (padding)."""
    if jit.enabled():
        lengths = np.empty(total, dtype=np.int32)  # every slot is written, padding included
        for f, base in zip(features, row_base):
            _fill_lengths(f.positions, f.pos_offsets, f.bag_lengths, base, row_len, lengths)
        return lengths
    lengths = np.zeros(total, dtype=np.int32)
    flat_positions = np.concatenate([f.positions for f in features])
    # Cast while concatenating: a scatter that also converts int64 to int32 costs 4x one that does not.
    bags = np.concatenate([f.bag_lengths for f in features], dtype=np.int32)
    slots = np.repeat(row_base.ravel() - exclusive_cumsum(flat_positions)[:-1], flat_positions)
    slots += np.arange(len(bags), dtype=np.int64)
    lengths[slots] = bags
    return lengths


def target_ids(item: FeatureRows, item_row: np.ndarray, row_len: np.ndarray, total: int) -> np.ndarray:
    """[total] int64 id of the first value at every position (-1 for padding and empty positions): row r
    fills ``[item_row[r], item_row[r] + row_len[r])``."""
    if jit.enabled():
        item_ids = np.empty(total, dtype=np.int64)  # every slot is written, padding included
        _fill_items(item.positions, item.pos_offsets, item.bag_lengths, item.bag_offsets, item.values,
                    item_row, row_len, item_ids)  # fmt: skip
        return item_ids
    item_ids = np.full(total, -1, dtype=np.int64)
    item_slots = np.repeat(item_row - item.pos_offsets[:-1], item.positions)
    item_slots += np.arange(len(item.bag_lengths), dtype=np.int64)
    if len(item.values) == len(item.bag_lengths) and item.bag_lengths.min(initial=1) == 1:
        item_ids[item_slots] = item.values  # one value per position (list<T>, single ids): no gather needed
    else:
        filled = item.bag_lengths > 0
        item_ids[item_slots[filled]] = item.values[item.bag_offsets[:-1][filled]]
    return item_ids


def batch_values(features: Sequence[FeatureRows], row_bounds: list[int]) -> list[np.ndarray]:
    """Per batch j (rows ``row_bounds[j]:row_bounds[j + 1]``): the values of feature 0's rows of the batch,
    then feature 1's, ... (int64)."""
    value_bounds = np.stack([f.bag_offsets[f.pos_offsets[row_bounds]] for f in features])  # [F, J + 1]
    if jit.enabled():
        # One gather for all batches, then views: fewer numpy calls per batch on the GIL-holding thread.
        counts = np.diff(value_bounds, axis=1)  # [F, J]
        # Batch-major: batch j's values start at cuts[j], feature f's of them after features < f.
        dest = exclusive_cumsum(counts.T.ravel())[:-1].reshape(counts.shape[1], len(features)).T
        values = np.empty(int(counts.sum()), dtype=np.int64)
        for f, bounds, to in zip(features, value_bounds, dest):
            _copy_ranges(f.values, bounds[:-1], bounds[1:], to, values)
        cuts = np.append(dest[0], len(values)).tolist()
        return [values[cuts[j] : cuts[j + 1]] for j in range(len(cuts) - 1)]
    bounds = value_bounds.tolist()
    return [
        np.concatenate([f.values[b[j] : b[j + 1]] for f, b in zip(features, bounds)]).astype(np.int64, copy=False)
        for j in range(len(row_bounds) - 1)
    ]


# --------------------------------------------------------------------------------------------- kernels


@jit.kernel
def _fill_lengths(positions, pos_offsets, bag_lengths, row_base, row_len, out):
    # Row r's padded bags out[row_base[r]:row_base[r] + row_len[r]]: its bag lengths
    # (bag_lengths[pos_offsets[r]:], positions[r] of them), then zeros. Slice assignments: numba lowers
    # them to tight copy loops (a third faster here than indexing).
    for r in range(len(positions)):
        src = pos_offsets[r]
        dst = row_base[r]
        n = positions[r]
        out[dst : dst + n] = bag_lengths[src : src + n]
        out[dst + n : dst + row_len[r]] = 0


@jit.kernel
def _fill_items(positions, pos_offsets, bag_lengths, bag_offsets, values, row_base, row_len, out):
    # Row r's padded targets out[row_base[r]:row_base[r] + row_len[r]]: the first value of each of its
    # positions (-1 for an empty one), then -1.
    for r in range(len(positions)):
        src = pos_offsets[r]
        dst = row_base[r]
        n = positions[r]
        for t in range(n):
            p = src + t
            out[dst + t] = values[bag_offsets[p]] if bag_lengths[p] > 0 else -1
        for t in range(n, row_len[r]):
            out[dst + t] = -1


@jit.kernel
def _copy_ranges(source, starts, stops, dest, out):
    # out[dest[j]:dest[j] + n_j] = source[starts[j]:stops[j]] for every j (n_j = stops[j] - starts[j]).
    for j in range(len(starts)):
        out[dest[j] : dest[j] + stops[j] - starts[j]] = source[starts[j] : stops[j]]
