"""The seq2seq recommender: sparse arch -> projection -> causal transformer -> next-item contrastive loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data.batch import SequenceBatch, negatives_key
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


@dataclass(frozen=True)
class ColumnLayout:
    """Where each feature's pooled embedding lies in the sparse arch's ``[B*T, width]`` output.

    Features sit side by side, ``emb_dim`` columns each, in config order; with sampled negatives one more
    block of the item table's width follows, holding the negatives' embeddings in its first rows.
    """

    feature_names: tuple[str, ...]
    emb_dim: int
    item_feature: str
    # Resolved: never empty (empty in the config means every feature).
    target_features: tuple[str, ...]
    negatives: bool = False

    @property
    def input_width(self) -> int:
        return len(self.feature_names) * self.emb_dim

    def columns(self, name: str) -> slice:
        i = self.feature_names.index(name)
        return slice(i * self.emb_dim, (i + 1) * self.emb_dim)

    @property
    def targets_are_inputs(self) -> bool:
        return self.target_features == self.feature_names

    @property
    def item_only_targets(self) -> bool:
        """Whether an item has a representation of its own (needed to rank the whole item table)."""
        return self.target_features == (self.item_feature,)


def column_layout(features: list[FeatureConfig], cfg: ModelConfig, item_feature: str | None = None) -> ColumnLayout:
    names = tuple(f.name for f in features)
    return ColumnLayout(
        feature_names=names,
        emb_dim=features[0].emb_dim,
        item_feature=item_feature or names[0],
        # Config order, whatever order target_features lists them in, so column slices stay ascending.
        target_features=tuple(n for n in names if n in cfg.target_features) if cfg.target_features else names,
        negatives=cfg.num_negatives > 0,
    )


class PositionEmbedding(nn.Embedding):
    """Distance-to-newest-item embeddings, initialised small (std 0.02, as GPT-2's) so they do not drown
    the projected item embeddings at the start; DMP calls ``reset_parameters`` when it materialises."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, seq_lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        t = torch.arange(max_len, device=seq_lengths.device)
        # Padding gets distance 0 too: it never reaches a real position under the causal mask.
        distance = (seq_lengths.unsqueeze(1) - 1 - t).clamp(min=0, max=self.num_embeddings - 1)
        return super().forward(distance)


class Seq2SeqDecoder(nn.Module):
    """Dense part: ``[B*T, width]`` embeddings -> loss. Holds no sharded module, so the pipeline tracer
    treats it as a leaf."""

    def __init__(self, cfg: ModelConfig, layout: ColumnLayout) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = layout
        self.proj = nn.Linear(layout.input_width, cfg.hidden_size)
        self.position = PositionEmbedding(cfg.max_positions, cfg.hidden_size) if cfg.max_positions else None
        self.transformer = CausalTransformer(cfg)
        self._bugs = tuple(cfg.seed_loss_bugs)

    def _project(self, x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """The input projection restricted to the columns of ``names``: what ``proj`` gives when every other
        feature's embedding is zero. Same weights, so inputs and targets share one embedding space."""
        cols = [self.layout.columns(n) for n in names]
        weight = torch.cat([self.proj.weight[:, c] for c in cols], dim=1)
        return F.linear(x, weight, self.proj.bias)

    def _autocast(self, x: torch.Tensor) -> torch.autocast:
        # bf16 autocast as in the seed, on CUDA only (CPU bf16 matmuls are slower than fp32 on most hosts).
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16 and x.is_cuda)

    def encode(
        self, embeddings: torch.Tensor, batch_shape: torch.Size, seq_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden states, target representations), both ``[B, T, hidden_size]``. ``seq_lengths``
        is needed with position embeddings, and lets the transformer skip the padding."""
        x = embeddings[:, : self.layout.input_width].reshape(*batch_shape, -1)
        with self._autocast(x):
            projected = self.proj(x)
            inputs = projected
            if self.position is not None:
                if seq_lengths is None:
                    raise ValueError("model.max_positions > 0: encode() needs the sequence lengths")
                inputs = projected + self.position(seq_lengths, x.shape[1])
            # With the lengths the transformer computes real positions only (CPU); the seed's padded loss
            # (ablation) reads the padding's outputs, so it gets the padded grid.
            hidden = self.transformer(inputs, None if "padding" in self._bugs else seq_lengths)
            if self.layout.targets_are_inputs:
                # Targets are items, not items at a position: no position embedding.
                targets = projected
            else:
                parts = [x[..., self.layout.columns(n)] for n in self.layout.target_features]
                targets = self._project(torch.cat(parts, dim=-1), self.layout.target_features)
        return hidden, targets

    def item_representation(self, item_embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, emb_dim]`` item-table rows -> ``[N, hidden_size]`` target representations (item-only targets)."""
        if not self.layout.item_only_targets:
            raise ValueError(
                f"items have no representation of their own: model.target_features is "
                f"{list(self.layout.target_features)}, set it to [{self.layout.item_feature!r}]"
            )
        with self._autocast(item_embeddings):
            return self._project(item_embeddings, (self.layout.item_feature,))

    def forward(
        self,
        embeddings: torch.Tensor,
        seq_lengths: torch.Tensor,
        item_ids: torch.Tensor,
        negative_ids: torch.Tensor | None = None,
    ) -> Seq2SeqOutput:
        hidden, targets = self.encode(embeddings, item_ids.shape, seq_lengths)
        negatives = None
        if negative_ids is not None:
            # The sampled ids fill the first rows of the negatives block (one id per bag).
            negatives = self.item_representation(embeddings[: negative_ids.numel(), self.layout.input_width :])
        out = next_item_contrastive_loss(
            hidden, targets, seq_lengths, item_ids, self.cfg.temperature, self.cfg.mask_same_item,
            negatives, negative_ids, self._bugs,
        )  # fmt: skip
        num_samples = torch.tensor(seq_lengths.numel(), device=seq_lengths.device)
        return Seq2SeqOutput(out.loss, out.hits, out.num_targets, seq_lengths.sum(), num_samples)


def negatives_feature(item: FeatureConfig) -> FeatureConfig:
    """A second feature on the item table that carries the sampled negatives' ids."""
    return dataclasses.replace(item, name=negatives_key(item.name), shard_name=item.shard_name)


class Seq2SeqModel(nn.Module):
    def __init__(
        self,
        features: list[FeatureConfig],
        cfg: ModelConfig,
        device: torch.device | None = None,
        item_feature: str | None = None,
    ) -> None:
        super().__init__()
        self.layout = column_layout(features, cfg, item_feature)
        sparse_features = list(features)
        if self.layout.negatives:
            item = next(f for f in features if f.name == self.layout.item_feature)
            sparse_features.append(negatives_feature(item))
        self.sparse = SparseArch(sparse_features, device=device)
        # Built directly on the device: on "meta" the dense weights are never allocated or initialised
        # here (DMP materialises them), which saves seconds for the seed's 1024-wide transformer.
        with torch.device(device or "cpu"):
            self.dense = Seq2SeqDecoder(cfg, self.layout)

    def forward(self, batch: SequenceBatch) -> Seq2SeqOutput:
        # Keep this body a straight line of module calls: TorchRec's pipeline fx-traces it to find the
        # embedding collection's input (batch.sparse_features) and pipeline its input distribution.
        embeddings = self.sparse(batch.sparse_features)
        return self.dense(embeddings, batch.seq_lengths, batch.item_ids, batch.negative_ids)
