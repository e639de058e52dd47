"""Lay a ``RowBlock`` out as ``SequenceBatch`` es: consecutive users per batch, padded, one bag per position.

A block is cut into batches of ``batch_size`` users; each batch is padded on the right to its own longest
user and becomes a KJT with one bag per (user, position) of every feature, plus the grid of target ids
(see ``SequenceBatch``). All batches of a block are laid out in one pass over flat arrays
(``data.ops.batch_layout``), then cut into views, so that the Python work per batch, which holds the GIL
that decoding needs, stays at a few calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import SequenceBatch
from data.ops import batch_layout
from data.ops.ragged import exclusive_cumsum
from data.rows import FeatureRows, RowBlock


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
    # The features of ``keys``, then the event times if the block has them (``decode_unit``).
    features, times = block.features[: len(keys)], block.features[len(keys) :]
    if block.num_rows == 0:
        raise ValueError("cannot build a batch without users")
    layout = _layout(features, batch_size)
    lengths = batch_layout.bag_lengths(features, layout.row_base, layout.row_len, layout.bases[-1])
    item_ids = batch_layout.target_ids(features[item_index], layout.item_row, layout.row_len, layout.item_bases[-1])
    # The first time value of each position, like the item grid (same positions per user: checked at decode).
    time_grid = batch_layout.target_ids(times[0], layout.item_row, layout.row_len, layout.item_bases[-1]) if times else None
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
        stamps = None
        if time_grid is not None:
            stamps = torch.from_numpy(time_grid[item_bases[j] : item_bases[j + 1]].reshape(sizes[j], max_lens[j]))
        batches.append(
            SequenceBatch(
                sparse_features=kjt,
                seq_lengths=torch.from_numpy(layout.seq_lengths[rows[j] : rows[j + 1]]),
                item_ids=torch.from_numpy(grid),
                timestamps=stamps,
            )
        )
    return batches
