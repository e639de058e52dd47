"""``RowBlock``: decoded users, the unit of data passed between the reader's stages.

Decoding (``data.decode``, in threads or worker processes) produces one block per read unit; the reader
(``data.reader``) slices, permutes and concatenates blocks into windows and batches' rows; the layout
(``data.layout``) turns a block into batches. Every feature is stored flat (rows -> positions -> values)
with its prefix sums, so that slicing rows is O(slice), never a scan of the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data.ops.ragged import exclusive_cumsum, ranges


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
