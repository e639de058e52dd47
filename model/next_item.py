"""The next-item model (decoder-only, like SASRec; the seed calls it "Seq2Seq"): sparse arch (embedding
lookups) -> dense arch (projection -> causal transformer -> next-item contrastive loss)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data.batch import PackedLayout, SequenceBatch, negatives_key
from data.config import FeatureConfig
from model.attention import PackedAttention
from model.config import ModelConfig
from model.hstu import HSTUAttention, HSTUEncoder
from model.loss import NegativeSpec, chunked_loss, log_q, next_item_contrastive_loss, sample_in_batch
from model.sparse import SparseArch
from model.transformer import CausalTransformer


@dataclass
class NextItemOutput:
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
    # Rows of the item feature's table (the uniform negatives' population, for the log-Q correction).
    item_rows: int = 0

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
    item = item_feature or names[0]
    return ColumnLayout(
        feature_names=names,
        emb_dim=features[0].emb_dim,
        item_feature=item,
        # Config order, whatever order target_features lists them in, so column slices stay ascending.
        target_features=tuple(n for n in names if n in cfg.target_features) if cfg.target_features else names,
        negatives=cfg.num_negatives > 0,
        item_rows=next(f.table_rows for f in features if f.name == item),
    )


class PositionEmbedding(nn.Embedding):
    """Distance-to-newest-item embeddings, initialised small (std 0.02, as GPT-2's) so they do not drown
    the projected item embeddings at the start; DMP calls ``reset_parameters`` when it materialises."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        """``distance`` of each position to its user's newest one; beyond the table, the last row."""
        return super().forward(distance.clamp(max=self.num_embeddings - 1))

    def grid(self, seq_lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """``[B, T, H]`` for the padded grid. Padding gets distance 0 too: it never reaches a real position
        under the causal mask."""
        t = torch.arange(max_len, device=seq_lengths.device)
        return self((seq_lengths.unsqueeze(1) - 1 - t).clamp(min=0))


class DenseArch(nn.Module):
    """Dense part: ``[B*T, width]`` embeddings -> loss. Holds no sharded module, so the pipeline tracer
    treats it as a leaf.

    It works on the batch's real positions only (``PackedLayout``): the embeddings of the padded grid are
    packed into ``[N, width]`` rows first, and the projection, transformer and loss never touch padding.
    """

    def __init__(self, cfg: ModelConfig, layout: ColumnLayout, max_len: int = 0, with_time: bool = False) -> None:
        """``max_len``: the longest sequence (``data.seq_len``), which HSTU normalises its attention by;
        ``with_time``: batches carry event times (HSTU's relative time bias)."""
        super().__init__()
        self.cfg = cfg
        self.layout = layout
        self.proj = nn.Linear(layout.input_width, cfg.hidden_size)
        self.position = PositionEmbedding(cfg.max_positions, cfg.hidden_size) if cfg.max_positions else None
        # One of the two encoders (``model.encoder``); the transformer keeps its attribute name, so checkpoints
        # of earlier versions load unchanged.
        self.transformer = CausalTransformer(cfg) if cfg.encoder == "transformer" else None
        self.hstu = HSTUEncoder(cfg, max_len, with_time) if cfg.encoder == "hstu" else None
        self._bugs = tuple(cfg.seed_loss_bugs)
        self.negatives = NegativeSpec(
            in_batch=cfg.in_batch_negatives,
            num_sampled=cfg.num_in_batch_negatives,
            group_size=cfg.in_batch_group_size,
            mask_same_item=cfg.mask_same_item,
        )

    def _project(self, x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """The input projection restricted to the columns of ``names``: what ``proj`` gives when every other
        feature's embedding is zero. Same weights, so inputs and targets share one embedding space."""
        cols = [self.layout.columns(n) for n in names]
        weight = torch.cat([self.proj.weight[:, c] for c in cols], dim=1)
        return F.linear(x, weight, self.proj.bias)

    def _autocast(self, x: torch.Tensor) -> torch.autocast:
        # bf16 autocast as in the seed, on CUDA only (CPU bf16 matmuls are slower than fp32 on most hosts).
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self._bf16(x))

    def _bf16(self, x: torch.Tensor) -> bool:
        return self.cfg.bf16 and x.is_cuda

    def _targets(self, x: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        if self.layout.targets_are_inputs:
            # Targets are items, not items at a position: no position embedding.
            return projected
        parts = [x[..., self.layout.columns(n)] for n in self.layout.target_features]
        return self._project(torch.cat(parts, dim=-1), self.layout.target_features)

    def encode_packed(self, embeddings: torch.Tensor, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B*T, width]`` embeddings -> (hidden states, target representations), both ``[N, hidden_size]``
        over the real positions, user after user."""
        x = embeddings[:, : self.layout.input_width].index_select(0, layout.index)
        with self._autocast(x):
            projected = self.proj(x)
            inputs = projected if self.position is None else projected + self.position(layout.distance)
            if self.hstu is not None:
                hidden = self.hstu(inputs, HSTUAttention(layout, self.cfg.attention, x.device, layout.times))
            else:
                assert self.transformer is not None
                hidden = self.transformer(inputs, PackedAttention(layout, self.cfg.attention, x.device))
            return hidden, self._targets(x, projected)

    def encode(
        self,
        embeddings: torch.Tensor,
        batch_shape: torch.Size,
        seq_lengths: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden states, target representations), both ``[B, T, hidden_size]``, zero at padding.
        Without ``seq_lengths`` every position of the grid is taken as real; ``timestamps`` ``[B, T]``: event
        times (HSTU's time bias)."""
        batch, width = batch_shape
        if seq_lengths is None:
            if self.position is not None:
                raise ValueError("model.max_positions > 0: encode() needs the sequence lengths")
            seq_lengths = torch.full((batch,), width, dtype=torch.long)
        # The lengths go to the host (a sync on CUDA): evaluation and tests, not the training step.
        layout = PackedLayout.from_batch(seq_lengths, None, max_len=width, timestamps=timestamps).to(embeddings.device)
        hidden, targets = self.encode_packed(embeddings, layout)
        return _unpack(hidden, layout), _unpack(targets, layout)

    def _encode_grid(
        self, embeddings: torch.Tensor, batch_shape: torch.Size, seq_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded ``[B, T]`` grid, padding computed as if real: only for the seed's padded loss."""
        x = embeddings[:, : self.layout.input_width].reshape(*batch_shape, -1)
        with self._autocast(x):
            projected = self.proj(x)
            inputs = projected if self.position is None else projected + self.position.grid(seq_lengths, x.shape[1])
            return self.transformer(inputs), self._targets(x, projected)

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
        layout: PackedLayout | None = None,
    ) -> NextItemOutput:
        negatives = None
        if negative_ids is not None:
            # The sampled ids fill the first rows of the negatives block (one id per bag).
            negatives = self.item_representation(embeddings[: negative_ids.numel(), self.layout.input_width :])
        if self._bugs:
            return self._seed_loss(embeddings, seq_lengths, item_ids, negatives, negative_ids)
        if layout is None:
            # A batch built on its device: the layout costs a device-to-host copy of the lengths here.
            layout = PackedLayout.from_batch(seq_lengths.cpu(), item_ids.cpu()).to(embeddings.device)
            if self.hstu is not None and self.hstu.with_time:
                raise ValueError("model.encoder = 'hstu' with event times needs the batch's layout (batch.to)")
        hidden, targets = self.encode_packed(embeddings, layout)
        queries = hidden.index_select(0, layout.query_rows)
        keys = targets.index_select(0, layout.query_rows + 1)  # the next row is the next position
        correction = None
        if self.cfg.logq_correction:
            draws = 0 if negative_ids is None else negative_ids.numel()
            correction = log_q(layout.target_ids, self.negatives, draws, self.layout.item_rows)
        out = chunked_loss(
            queries, keys, layout.target_ids, self.negatives, self.cfg.temperature, negatives, negative_ids,
            sample_in_batch(layout.num_pairs, self.negatives, queries.device),
            self.cfg.loss_chunk_size, torch.bfloat16 if self._bf16(queries) else torch.float32, correction,
        )  # fmt: skip
        # The counts come with the layout: no host round trip for a shape.
        return NextItemOutput(out.loss, out.hits, layout.counts[1], layout.counts[0], layout.counts[2])

    def _seed_loss(
        self,
        embeddings: torch.Tensor,
        seq_lengths: torch.Tensor,
        item_ids: torch.Tensor,
        negatives: torch.Tensor | None,
        negative_ids: torch.Tensor | None,
    ) -> NextItemOutput:
        """The seed's loss with some of its bugs put back (``model.seed_loss_bugs``, ablations only)."""
        hidden, targets = self._encode_grid(embeddings, item_ids.shape, seq_lengths)
        out = next_item_contrastive_loss(
            hidden, targets, seq_lengths, item_ids, self.cfg.temperature, self.cfg.mask_same_item,
            negatives, negative_ids, self._bugs,
        )  # fmt: skip
        num_samples = torch.tensor(seq_lengths.numel(), device=seq_lengths.device)
        return NextItemOutput(out.loss, out.hits, out.num_targets, seq_lengths.sum(), num_samples)


def _unpack(rows: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """``[N, H]`` -> ``[B, T, H]`` with zeros at the padding."""
    grid = rows.new_zeros(layout.batch * layout.max_len, rows.shape[-1]).index_copy(0, layout.index, rows)
    return grid.view(layout.batch, layout.max_len, -1)


def negatives_feature(item: FeatureConfig) -> FeatureConfig:
    """A second feature on the item table that carries the sampled negatives' ids."""
    return dataclasses.replace(item, name=negatives_key(item.name), shard_name=item.shard_name)


class NextItemModel(nn.Module):
    def __init__(
        self,
        features: list[FeatureConfig],
        cfg: ModelConfig,
        device: torch.device | None = None,
        item_feature: str | None = None,
        max_len: int = 0,
        with_time: bool = False,
    ) -> None:
        """``max_len`` and ``with_time``: see ``DenseArch`` (HSTU only)."""
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
            self.dense = DenseArch(cfg, self.layout, max_len, with_time)

    def forward(self, batch: SequenceBatch) -> NextItemOutput:
        # Keep this body a straight line of module calls: TorchRec's pipeline fx-traces it to find the
        # embedding collection's input (batch.sparse_features) and pipeline its input distribution.
        embeddings = self.sparse(batch.sparse_features)
        return self.dense(embeddings, batch.seq_lengths, batch.item_ids, batch.negative_ids, batch.layout)
