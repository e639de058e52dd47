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

    @property
    def batch_size(self) -> int:
        return int(self.seq_lengths.numel())

    @property
    def max_len(self) -> int:
        return int(self.item_ids.shape[1])

    def to(self, device: torch.device, non_blocking: bool = False) -> SequenceBatch:
        return SequenceBatch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            seq_lengths=self.seq_lengths.to(device=device, non_blocking=non_blocking),
            item_ids=self.item_ids.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.seq_lengths.record_stream(stream)
        self.item_ids.record_stream(stream)

    def pin_memory(self) -> SequenceBatch:
        return SequenceBatch(
            sparse_features=self.sparse_features.pin_memory(),
            seq_lengths=self.seq_lengths.pin_memory(),
            item_ids=self.item_ids.pin_memory(),
        )
