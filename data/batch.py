"""The batch type that flows from the reader through ``TrainPipelineSparseDist`` into the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


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

    @property
    def batch_size(self) -> int:
        return int(self.seq_lengths.numel())

    @property
    def max_len(self) -> int:
        return int(self.item_ids.shape[1])

    def to(self, device: torch.device, non_blocking: bool = False) -> SequenceBatch:
        negatives = self.negative_ids
        return SequenceBatch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            seq_lengths=self.seq_lengths.to(device=device, non_blocking=non_blocking),
            item_ids=self.item_ids.to(device=device, non_blocking=non_blocking),
            negative_ids=None if negatives is None else negatives.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.seq_lengths.record_stream(stream)
        self.item_ids.record_stream(stream)
        if self.negative_ids is not None:
            self.negative_ids.record_stream(stream)

    def pin_memory(self) -> SequenceBatch:
        return SequenceBatch(
            sparse_features=self.sparse_features.pin_memory(),
            seq_lengths=self.seq_lengths.pin_memory(),
            item_ids=self.item_ids.pin_memory(),
            negative_ids=None if self.negative_ids is None else self.negative_ids.pin_memory(),
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
        ids = ids[:stride]  # a tiny last batch has fewer bags than negatives; use what fits
    lengths = torch.zeros(stride, dtype=kjt.lengths().dtype)
    lengths[: ids.numel()] = 1
    features = KeyedJaggedTensor(
        keys=[*kjt.keys(), key],
        values=torch.cat([kjt.values(), ids.to(kjt.values().dtype)]),
        lengths=torch.cat([kjt.lengths(), lengths]),
        stride=stride,
    )
    return SequenceBatch(features, batch.seq_lengths, batch.item_ids, ids if ids.numel() else None)
