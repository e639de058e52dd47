"""The batch type that flows from the reader through ``TrainPipelineSparseDist`` into the model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class PackedLayout:
    """Where the real positions of a right-padded ``[B, T]`` batch lie once packed as ``[N, H]`` rows (user
    after user), and which of them form the loss's (query, next item) pairs.

    Computed on the host from the batch's CPU tensors (``from_batch``) before the batch goes to the device,
    so that every size the model needs (tokens, pairs, longest user) is a Python int there: the packed
    model never asks the GPU for a shape, which would stall the host until the GPU caught up.
    """

    # [N] flat ``b * T + t`` index of every real position, user-major: packed row r lies at grid slot index[r].
    index: torch.Tensor
    # [U + 1] int32 row offsets of the U users that have positions (variable-length attention).
    cu_seqlens: torch.Tensor
    # [N] distance of each row to its user's newest position (position embeddings).
    distance: torch.Tensor
    # [P] packed row of each query: a real position whose next position is real and holds an item. Its
    # target is the next row, ``query_rows + 1`` (rows are user-major, so the next position is the next row).
    query_rows: torch.Tensor
    # [P] that next position's item id.
    target_ids: torch.Tensor
    # [3] int64 (tokens N, pairs P, users B): the metrics' counts, already on the device with the batch.
    counts: torch.Tensor
    # Host-side copies.
    lengths: tuple[int, ...]
    batch: int
    max_len: int
    num_tokens: int
    num_pairs: int
    # [N] int64 event time (Unix seconds) of each row, when the batch carries times (``data.time_feature``).
    times: torch.Tensor | None = None

    @property
    def longest(self) -> int:
        """The longest user's positions (the attention kernels' ``max_seqlen``)."""
        return max(self.lengths, default=0)

    @staticmethod
    def from_batch(
        seq_lengths: torch.Tensor,
        item_ids: torch.Tensor | None,
        max_len: int | None = None,
        timestamps: torch.Tensor | None = None,
    ) -> PackedLayout:
        """``seq_lengths`` ``[B]`` and ``item_ids`` ``[B, T]`` (-1 at padding and empty positions) on the host.
        Without ``item_ids`` (encoding only, no loss) there are no pairs; ``max_len`` is then T.
        ``timestamps``: ``[B, T]`` event times, packed like the rows.

        numpy on purpose: a few vectorised passes over the N positions (about 0.1 ms for 16 users of 1,024),
        where torch's CPU kernels cost several times that in dispatch and thread start-up for sizes this small.
        """
        lengths = seq_lengths.detach().cpu().numpy().astype(np.int64, copy=False)
        width = int(item_ids.shape[1]) if item_ids is not None else int(max_len or 0)
        num_tokens = int(lengths.sum())
        starts = np.cumsum(lengths) - lengths  # first packed row of each user
        row = np.arange(num_tokens, dtype=np.int64)
        # Position t of each row within its user, and the distance to that user's newest position.
        t = row - np.repeat(starts, lengths)
        index = np.repeat(np.arange(len(lengths), dtype=np.int64) * width, lengths) + t
        distance = np.repeat(lengths - 1, lengths) - t
        if item_ids is not None and num_tokens:
            ids = item_ids.detach().cpu().numpy().reshape(-1)
            # A query is any real position but its user's last, whose next position holds an item.
            query_rows = np.flatnonzero(distance > 0)
            query_rows = query_rows[ids[index[query_rows] + 1] >= 0]
            target_ids = ids[index[query_rows] + 1].astype(np.int64, copy=False)
        else:
            query_rows = target_ids = np.zeros(0, dtype=np.int64)
        nonempty = lengths[lengths > 0]
        cu_seqlens = np.zeros(len(nonempty) + 1, dtype=np.int32)
        np.cumsum(nonempty, out=cu_seqlens[1:])
        times = None
        if timestamps is not None:
            times = timestamps.detach().cpu().reshape(-1).index_select(0, torch.from_numpy(index))
        return PackedLayout(
            times=times,
            index=torch.from_numpy(index),
            cu_seqlens=torch.from_numpy(cu_seqlens),
            distance=torch.from_numpy(distance),
            query_rows=torch.from_numpy(query_rows),
            target_ids=torch.from_numpy(np.ascontiguousarray(target_ids)),
            counts=torch.tensor([num_tokens, len(query_rows), len(lengths)], dtype=torch.int64),
            lengths=tuple(lengths.tolist()),
            batch=len(lengths),
            max_len=width,
            num_tokens=num_tokens,
            num_pairs=len(query_rows),
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "index": self.index,
            "cu_seqlens": self.cu_seqlens,
            "distance": self.distance,
            "query_rows": self.query_rows,
            "target_ids": self.target_ids,
            "counts": self.counts,
        }
        if self.times is not None:
            tensors["times"] = self.times
        return tensors

    def _with(self, tensors: dict[str, torch.Tensor]) -> PackedLayout:
        return PackedLayout(
            **tensors,
            lengths=self.lengths,
            batch=self.batch,
            max_len=self.max_len,
            num_tokens=self.num_tokens,
            num_pairs=self.num_pairs,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> PackedLayout:
        return self._with({k: v.to(device=device, non_blocking=non_blocking) for k, v in self._tensors().items()})

    def pin_memory(self) -> PackedLayout:
        return self._with({k: v.pin_memory() for k, v in self._tensors().items()})

    def record_stream(self, stream: torch.Stream) -> None:
        for tensor in self._tensors().values():
            tensor.record_stream(stream)


@dataclass
class SequenceBatch(Pipelineable):
    """B users, each padded on the right to T positions.

    ``sparse_features`` holds one key per feature with **one bag per position**: its stride is ``B * T`` and
    ``lengths[b * T + t]`` is the number of values at position t of user b (0 for padding or an empty
    position). The embedding layer averages each bag, so ``list<list<T>>`` (several values per position)
    and ``list<T>`` (one value) take the same path, and padding embeds to zeros.
    """

    sparse_features: KeyedJaggedTensor
    # [B] number of real positions per user (after truncation).
    seq_lengths: torch.Tensor
    # [B, T] id of the target feature's first value at each position; -1 for padding and empty positions.
    item_ids: torch.Tensor
    # [M] item ids sampled as extra negatives (model.num_negatives); the same ids are the first M bags of
    # the KJT key ``negatives_key(item_feature)``. None without sampled negatives.
    negative_ids: torch.Tensor | None = None
    # Where the real positions lie (see PackedLayout). Filled in on the host when the batch moves to its
    # device (``to``); a batch built directly on a device gets it from the model, at the cost of a sync.
    layout: PackedLayout | None = None
    # [B, T] int64 event time (Unix seconds) per position, 0 at padding, when ``data.time_feature`` is set
    # (HSTU's relative time bias). It reaches the model inside the layout.
    timestamps: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.seq_lengths.numel())

    @property
    def max_len(self) -> int:
        return int(self.item_ids.shape[1])

    def packed_layout(self) -> PackedLayout | None:
        """The layout, computed now if the batch is still on the host (None if it is not)."""
        if self.layout is None and self.seq_lengths.device.type == "cpu" and self.item_ids.device.type == "cpu":
            self.layout = PackedLayout.from_batch(self.seq_lengths, self.item_ids, timestamps=self.timestamps)
        return self.layout

    def to(self, device: torch.device, non_blocking: bool = False) -> SequenceBatch:
        negatives, layout, times = self.negative_ids, self.packed_layout(), self.timestamps
        return SequenceBatch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            seq_lengths=self.seq_lengths.to(device=device, non_blocking=non_blocking),
            item_ids=self.item_ids.to(device=device, non_blocking=non_blocking),
            negative_ids=None if negatives is None else negatives.to(device=device, non_blocking=non_blocking),
            layout=None if layout is None else layout.to(device, non_blocking=non_blocking),
            timestamps=None if times is None else times.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.seq_lengths.record_stream(stream)
        self.item_ids.record_stream(stream)
        if self.negative_ids is not None:
            self.negative_ids.record_stream(stream)
        if self.layout is not None:
            self.layout.record_stream(stream)
        if self.timestamps is not None:
            self.timestamps.record_stream(stream)

    def pin_memory(self) -> SequenceBatch:
        layout = self.packed_layout()
        return SequenceBatch(
            sparse_features=self.sparse_features.pin_memory(),
            seq_lengths=self.seq_lengths.pin_memory(),
            item_ids=self.item_ids.pin_memory(),
            negative_ids=None if self.negative_ids is None else self.negative_ids.pin_memory(),
            layout=None if layout is None else layout.pin_memory(),
            timestamps=None if self.timestamps is None else self.timestamps.pin_memory(),
        )


def negatives_key(item_feature: str) -> str:
    """KJT key of the sampled negatives: a second feature on the item feature's table."""
    return f"{item_feature}.negatives"


def with_negatives(batch: SequenceBatch, key: str, ids: torch.Tensor) -> SequenceBatch:
    """``batch`` plus the key ``key`` holding ``ids``, one per bag in the first ``len(ids)`` bags (the KJT
    has one stride for all keys, B*T); an empty ``ids`` adds the key with no values, which a model with
    sampled negatives needs in every batch, including evaluation ones (TorchRec's sharded input dist
    expects the same keys in every batch)."""
    kjt = batch.sparse_features
    stride = kjt.stride()
    if ids.numel() > stride:
        ids = ids[:stride]  # few or short sequences, fewer bags: what fits (feed.NegativeSampler says so)
    lengths = torch.zeros(stride, dtype=kjt.lengths().dtype)
    lengths[: ids.numel()] = 1
    features = KeyedJaggedTensor(
        keys=[*kjt.keys(), key],
        values=torch.cat([kjt.values(), ids.to(kjt.values().dtype)]),
        lengths=torch.cat([kjt.lengths(), lengths]),
        stride=stride,
    )
    return dataclasses.replace(batch, sparse_features=features, negative_ids=ids if ids.numel() else None)
