"""The seq2seq recommender: sparse arch -> projection -> causal transformer -> next-item contrastive loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from data.batch import SequenceBatch
from data.config import FeatureConfig
from model.config import ModelConfig
from model.loss import next_item_contrastive_loss
from model.sparse import SparseArch
from model.transformer import CausalTransformer


@dataclass
class Seq2SeqOutput:
    loss: torch.Tensor
    hits: torch.Tensor
    num_targets: torch.Tensor
    # Real (non-padding) positions in the batch: the tokens of tokens/s.
    num_tokens: torch.Tensor
    num_samples: torch.Tensor


class Seq2SeqDecoder(nn.Module):
    """Dense part: ``[B*T, emb_size]`` embeddings -> loss. Holds no sharded module, so the pipeline
    tracer treats it as a leaf."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.emb_size, cfg.hidden_size)
        self.transformer = CausalTransformer(cfg)

    def encode(
        self, embeddings: torch.Tensor, batch_shape: torch.Size, seq_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden states, target representations), both ``[B, T, hidden_size]``; with ``seq_lengths``
        the transformer skips the padding (see ``CausalTransformer.forward``)."""
        x = embeddings.view(*batch_shape, -1)
        # bf16 autocast as in the seed, on CUDA only (CPU bf16 matmuls are slower than fp32 on most hosts).
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16 and x.is_cuda):
            targets = self.proj(x)
            hidden = self.transformer(targets, seq_lengths)
        return hidden, targets

    def forward(self, embeddings: torch.Tensor, seq_lengths: torch.Tensor, item_ids: torch.Tensor) -> Seq2SeqOutput:
        hidden, targets = self.encode(embeddings, item_ids.shape, seq_lengths)
        out = next_item_contrastive_loss(
            hidden, targets, seq_lengths, item_ids, self.cfg.temperature, self.cfg.mask_same_item
        )
        num_samples = torch.tensor(seq_lengths.numel(), device=seq_lengths.device)
        return Seq2SeqOutput(out.loss, out.hits, out.num_targets, seq_lengths.sum(), num_samples)


class Seq2SeqModel(nn.Module):
    def __init__(self, features: list[FeatureConfig], cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.sparse = SparseArch(features, device=device)
        # Built directly on the device: on "meta" the dense weights are never allocated or initialised
        # here (DMP materialises them), which saves seconds for the seed's 1024-wide transformer.
        with torch.device(device or "cpu"):
            self.dense = Seq2SeqDecoder(cfg)

    def forward(self, batch: SequenceBatch) -> Seq2SeqOutput:
        # Keep this body a straight line of module calls: TorchRec's pipeline fx-traces it to find the
        # embedding collection's input (batch.sparse_features) and pipeline its input distribution.
        embeddings = self.sparse(batch.sparse_features)
        return self.dense(embeddings, batch.seq_lengths, batch.item_ids)
