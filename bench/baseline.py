"""The training benchmark's yardstick: the same model written as plain PyTorch, no TorchRec.

One ``nn.Embedding(rows, dim, sparse=True)`` per table, the mean over the values of each position,
concatenation, the same projection, pre-LN causal transformer and next-item contrastive loss, all on the
padded ``[B, T]`` grid (the textbook way), ``torch.optim.SparseAdam`` for the tables and ``AdamW`` for the
dense weights. Written out here on purpose, so that it stays fixed while the project's modules change; its
parameter names match the project's, so the two paths can start from the same weights.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from bench.train_shape import FEATURES, Shape, model_config
from data.batch import SequenceBatch
from model.config import ModelConfig
from trainer.config import OptimConfig


class PlainAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.nhead = cfg.nhead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = (y.view(b, t, self.nhead, -1).transpose(1, 2) for y in self.qkv(x).split(h, dim=2))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dropout(self.proj(self.dropout(out.transpose(1, 2).reshape(b, t, h))))


class PlainBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size)
        self.attn = PlainAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size)
        self.ffn = nn.Module()
        self.ffn.net = nn.Sequential(  # same parameter names as model.transformer.FeedForward
            nn.Linear(cfg.hidden_size, cfg.dim_feedforward),
            nn.GELU(),
            nn.Linear(cfg.dim_feedforward, cfg.hidden_size),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn.net(self.norm2(x))


class PlainDecoder(nn.Module):
    """Projection + pre-LN causal transformer + final LN on the padded ``[B, T]`` grid; parameter names
    match ``model.next_item.DenseArch``'s, so its state dict loads here."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.emb_size, cfg.hidden_size)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.num_layers))
        self.transformer.final_norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16 and x.is_cuda):
            targets = self.proj(x)
            hidden = targets
            for layer in self.transformer.layers:
                hidden = layer(hidden)
            hidden = self.transformer.final_norm(hidden)
        return hidden, targets


def plain_contrastive_loss(
    hidden: torch.Tensor, targets: torch.Tensor, seq_lengths: torch.Tensor, item_ids: torch.Tensor, cfg: ModelConfig
) -> torch.Tensor:
    """Next-item cross-entropy over cosine logits, padding masked (the project's loss, written plainly: every
    logit materialised in fp32, no chunks, autograd keeps them all)."""
    t = item_ids.shape[1]
    valid = (torch.arange(t - 1, device=item_ids.device) < (seq_lengths.unsqueeze(1) - 1)) & (item_ids[:, 1:] >= 0)
    queries = F.normalize(hidden[:, :-1][valid].float(), dim=-1, eps=1e-6) / cfg.temperature
    keys = F.normalize(targets[:, 1:][valid].float(), dim=-1, eps=1e-6)
    ids = item_ids[:, 1:][valid]
    if cfg.in_batch_negatives == "sampled":
        return _plain_sampled_loss(queries, keys, ids, cfg)
    logits = queries @ keys.t()
    if cfg.mask_same_item:
        same = ids.unsqueeze(0) == ids.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(queries.shape[0], device=logits.device))


def _plain_sampled_loss(q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """K in-batch targets drawn per group of queries: the groups' logits by one batched product, [P, 1 + K]."""
    num, group, draws = q.shape[0], cfg.in_batch_group_size, cfg.num_in_batch_negatives
    groups = -(-num // group)
    drawn = torch.randint(0, num, (groups, draws), device=q.device)
    padded = F.pad(q, (0, 0, 0, groups * group - num)).view(groups, group, -1)
    logits = torch.bmm(padded, k[drawn].transpose(1, 2)).reshape(groups * group, draws)[:num]
    per_query = drawn.repeat_interleave(group, dim=0)[:num]
    masked = per_query == torch.arange(num, device=q.device).unsqueeze(1)  # a query's own target
    if cfg.mask_same_item:
        masked |= ids[per_query] == ids.unsqueeze(1)
    logits = torch.cat([(q * k).sum(-1, keepdim=True), logits.masked_fill(masked, float("-inf"))], dim=1)
    return F.cross_entropy(logits, torch.zeros(num, dtype=torch.long, device=q.device))


class PlainSeq2Seq(nn.Module):
    """The whole model in plain PyTorch: per-table ``nn.Embedding(sparse=True)``, per-position mean."""

    def __init__(self, shape: Shape, device: torch.device) -> None:
        super().__init__()
        from model.sparse import trunc_normal_init_

        cfg = model_config(shape)
        self.embeddings = nn.ModuleDict(
            {name: nn.Embedding(rows, shape.emb_dim, sparse=True, device=device) for name, rows in shape.rows().items()}
        )
        for table in self.embeddings.values():
            trunc_normal_init_(table.weight)  # the seed's TruncNormal(std=0.001), as the trainer's tables
        self.dense = PlainDecoder(model_config(shape)).to(device)
        self.cfg = cfg

    def embed(self, batch: SequenceBatch, values_per_feature: list[int]) -> torch.Tensor:
        """``values_per_feature``: the batch's value count of each feature, known on the host (no device sync)."""
        kjt = batch.sparse_features
        num_bags = batch.item_ids.numel()
        lengths = kjt.lengths().view(len(FEATURES), num_bags).long()
        per_feature = kjt.values().split(values_per_feature)
        bag = torch.arange(num_bags, device=lengths.device)
        pooled = []
        for name, values, n in zip(FEATURES, per_feature, lengths, strict=True):
            rows = self.embeddings[name](values)
            bag_of_row = bag.repeat_interleave(n, output_size=values.numel())
            summed = rows.new_zeros(num_bags, rows.shape[-1]).index_add_(0, bag_of_row, rows)
            pooled.append(summed / n.clamp(min=1).unsqueeze(-1).to(rows.dtype))
        return torch.cat(pooled, dim=-1)

    def forward(self, batch: SequenceBatch, values_per_feature: list[int]) -> torch.Tensor:
        x = self.embed(batch, values_per_feature).view(*batch.item_ids.shape, -1)
        hidden, targets = self.dense(x)
        return plain_contrastive_loss(hidden, targets, batch.seq_lengths, batch.item_ids, self.cfg)


class BaselinePath:
    """Plain PyTorch: forward, backward, SparseAdam on the tables, AdamW on the dense weights."""

    name = "baseline"

    def __init__(self, shape: Shape, batches: list[SequenceBatch], malloc_tuned: bool = False) -> None:
        if malloc_tuned:  # the trainer's process setting (runtime/host.py), to tell its share of the gap
            from runtime.host import keep_freed_buffers_mapped

            keep_freed_buffers_mapped()
        torch.manual_seed(shape.seed)
        self.device = torch.device(shape.device)
        self.model = PlainSeq2Seq(shape, self.device)
        self.model.train()
        optim = OptimConfig(dense_lr=shape.dense_lr, sparse_lr=shape.sparse_lr)
        self.sparse = torch.optim.SparseAdam(
            list(self.model.embeddings.parameters()), lr=optim.sparse_lr,
            betas=(optim.sparse_beta1, optim.sparse_beta2), eps=optim.sparse_eps,
        )  # fmt: skip
        self.dense = torch.optim.AdamW(
            self.model.dense.parameters(), lr=optim.dense_lr, betas=tuple(optim.dense_betas),  # type: ignore[arg-type]
            eps=optim.dense_eps, weight_decay=optim.dense_weight_decay,
        )  # fmt: skip
        # Pinned host batches copied per step, as the trainer's pipeline does (a no-op on CPU).
        pinned = self.device.type == "cuda"
        self._batches = itertools.cycle(
            [(b.pin_memory() if pinned else b, _values_per_feature(b)) for b in batches]
        )

    def step(self) -> torch.Tensor:
        host_batch, values_per_feature = next(self._batches)
        batch = host_batch.to(self.device, non_blocking=True)
        self.sparse.zero_grad(set_to_none=True)
        self.dense.zero_grad(set_to_none=True)
        loss = self.model(batch, values_per_feature)
        loss.backward()
        self.sparse.step()
        self.dense.step()
        return loss.detach()

    def close(self) -> None:
        pass


def _values_per_feature(batch: SequenceBatch) -> list[int]:
    lengths = batch.sparse_features.lengths().view(len(FEATURES), -1)
    return lengths.sum(dim=1).tolist()

