"""Training benchmark: the project's trainer path against a plain-PyTorch baseline of the same model.

``python -m bench.bench_train [--device cpu|cuda] [--batch N] [--seq-len N] [--emb-dim N] [--hidden N] ...``

In one invocation, on identical synthetic batches (``SequenceBatch``, sequence lengths uniform in
``[seq_len/4, seq_len]``, each batch padded on the right to its longest user, as the reader does):

* **trainer**: the project's machinery. ``Seq2SeqModel`` built on ``meta``, ``trainer.sharding.shard_model``
  (planner -> ``DistributedModelParallel``, fbgemm's fused sparse optimizer: EXACT_ROWWISE_ADAGRAD on CPU,
  PARTIAL_ROWWISE_ADAM on CUDA), ``trainer.optim.build_optimizer`` (``CombinedOptimizer`` with AdamW for the
  dense part), ``TrainPipelineSparseDist`` stepping over ``StepAlignedBatches``, the LR scheduler and the
  ``MetricLogger``: the body of ``Trainer.train``, in one process with a world-size-1 process group
  (``trainer.dist.init_distributed``: gloo on CPU, NCCL on CUDA).
* **baseline**: the same model written as plain PyTorch, no TorchRec: one ``nn.Embedding(rows, dim,
  sparse=True)`` per table, mean over the values of each position, concatenation, the same projection,
  pre-LN causal transformer and next-item contrastive loss, all on the padded ``[B, T]`` grid (the textbook
  way), ``torch.optim.SparseAdam`` for the tables and ``AdamW`` for the dense weights. It is written out in
  this file on purpose, so that it stays the fixed yardstick while the project's modules change.

Each path runs in its own subprocess (so that its peak memory is its own); the parent interleaves rounds of
``--steps`` steps on the paths and keeps each path's fastest round (the machine may be shared).
``--paths trainer,baseline,baseline-malloc`` adds the baseline with the trainer's host allocator setting
(``runtime/host.py``), to tell how much of the gap that setting alone makes.

**FLOPs.** Only useful work counts (real tokens, causal half of attention), so the achieved FLOP/s of the two
paths compare like their tokens/s and padding is never credited. Per step, with ``P = E*H + L*(4*H^2 +
2*H*F)`` the weights in matmuls (projection; QKV, attention output, FFN of each layer), ``N`` real tokens,
``len_b`` the real length of user b and ``N_t`` the (query, next item) pairs of the loss::

    FLOPs = 6 * P * N                      # forward (2 per multiply-add) + backward (2x forward)
          + 6 * L * H * sum_b len_b^2      # causal attention: Q.K^T and A.V, len^2*H each forward
          + 6 * H * N_t * C                # the loss's logits: [N_t, H] x [H, C]

with ``C`` the logits per query: ``N_t`` with every in-batch target as a negative (the seed's loss), ``K + 1``
with K sampled ones (``--in-batch-negatives sampled``, the default).

Embedding lookups, LayerNorm, softmax and the optimizers are not counted. The peak to compare with is
measured in the same run: the best of a few large ``torch.mm`` in fp32 and in bf16 on the device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import logging
import math
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.profile_summary import summarize
from data.batch import PackedLayout, SequenceBatch
from data.config import DataConfig, FeatureConfig
from model.config import ModelConfig
from trainer.config import JobConfig, OptimConfig, TrainConfig

logger = logging.getLogger(__name__)

FEATURES = ("item_id", "cate_id", "behavior_id", "timestamp")


# ------------------------------------------------------------------------------------------------ shape


@dataclass
class Shape:
    """Everything that defines the measured job; both paths are built from one of these."""

    device: str = "cpu"
    batch: int = 32
    seq_len: int = 200
    emb_dim: int = 128
    item_rows: int = 2_048_000
    cate_rows: int = 2_048
    behavior_rows: int = 16
    timestamp_rows: int = 2_048_000
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.1
    # Values per position, uniform in [1, max_values] (1: every position holds one id, as in the seed's data).
    max_values: int = 1
    temperature: float = 0.1
    mask_same_item: bool = False
    # The loss's negatives (model.in_batch_negatives, ...): both paths train the same loss.
    in_batch_negatives: str = "sampled"
    num_in_batch_negatives: int = 128
    in_batch_group_size: int = 64
    bf16: bool = True
    # Trainer path only: model.attention and model.compile ("auto", "true" or "false").
    attention: str = "auto"
    compile: str = "auto"
    dense_lr: float = 1e-3
    sparse_lr: float = 1e-3
    log_steps: int = 10
    # Distinct batches, cycled; both paths see them in the same order.
    num_batches: int = 8
    seed: int = 2025
    threads: int = 0  # torch intra-op threads per path (0: all cores)

    @property
    def emb_size(self) -> int:
        return self.emb_dim * len(FEATURES)

    def rows(self) -> dict[str, int]:
        return dict(zip(FEATURES, (self.item_rows, self.cate_rows, self.behavior_rows, self.timestamp_rows)))


# The seed's ModelConfig and batch (configs/seq2seq.toml) for CUDA; a smaller transformer for a CPU box.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(seq_len=200, emb_dim=128, hidden=256, layers=2, heads=4, ffn=1024),
    "cuda": dict(seq_len=1024, emb_dim=128, hidden=1024, layers=8, heads=8, ffn=1024),
}
# Users per step, one run each: the seed's 16 on CUDA, and 64 to show what a larger batch does per token.
BATCHES = {"cpu": "32", "cuda": "16,64"}


def features(shape: Shape) -> list[FeatureConfig]:
    # Plain tables with a bucket (behavior_id too: the seed's bucket-0 managed-collision table has no
    # plain-PyTorch counterpart, and 16 rows is what a behaviour vocabulary needs).
    return [FeatureConfig(name=n, emb_dim=shape.emb_dim, hash_bucket_size=r) for n, r in shape.rows().items()]


def model_config(shape: Shape) -> ModelConfig:
    return ModelConfig(
        hidden_size=shape.hidden, num_layers=shape.layers, nhead=shape.heads, dim_feedforward=shape.ffn,
        dropout=shape.dropout, emb_size=shape.emb_size, temperature=shape.temperature,
        mask_same_item=shape.mask_same_item, bf16=shape.bf16,
        in_batch_negatives=shape.in_batch_negatives,  # type: ignore[arg-type]
        num_in_batch_negatives=shape.num_in_batch_negatives, in_batch_group_size=shape.in_batch_group_size,
        attention=shape.attention,  # type: ignore[arg-type]
        compile={"true": True, "false": False}.get(shape.compile, "auto"),  # type: ignore[arg-type]
    )  # fmt: skip


def job_config(shape: Shape, output_dir: str) -> JobConfig:
    data = DataConfig(
        data_paths="synthetic", batch_size=shape.batch, seq_len=shape.seq_len, features=features(shape)
    )
    optim = OptimConfig(dense_lr=shape.dense_lr, sparse_lr=shape.sparse_lr)
    train = TrainConfig(
        output_dir=output_dir, train_steps=0, train_epochs=1, log_steps=shape.log_steps, seed=shape.seed,
        device=shape.device, progress_bar=False,  # type: ignore[arg-type]
    )  # fmt: skip
    return JobConfig(data=data, model=model_config(shape), optim=optim, train=train)


# ---------------------------------------------------------------------------------------------- batches


def synthetic_batches(shape: Shape) -> list[SequenceBatch]:
    """``shape.num_batches`` deterministic batches in the reader's layout (one bag per position)."""
    rng = np.random.default_rng(shape.seed)
    return [_batch(shape, rng) for _ in range(shape.num_batches)]


def _batch(shape: Shape, rng: np.random.Generator) -> SequenceBatch:
    lengths = rng.integers(max(2, shape.seq_len // 4), shape.seq_len + 1, size=shape.batch)
    width = int(lengths.max())  # padded to the longest user, like data.reader.build_batches
    real = (np.arange(width)[None, :] < lengths[:, None]).ravel()  # [B*T] real positions
    bag_lengths, values = [], []
    for name, rows in shape.rows().items():
        per_bag = np.where(real, rng.integers(1, shape.max_values + 1, size=real.size), 0)
        bag_lengths.append(per_bag)
        values.append(_ids(name, rows, int(per_bag.sum()), rng))
    item_first = np.cumsum(bag_lengths[0]) - bag_lengths[0]  # offset of each bag's first item id
    item_ids = np.where(real, values[0][np.minimum(item_first, len(values[0]) - 1)], -1)
    # cate_id of a position follows its item (as a category does), one value per item value.
    if shape.max_values == 1:
        values[1] = values[0] % shape.cate_rows
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = KeyedJaggedTensor(
        keys=list(FEATURES),
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(bag_lengths).astype(np.int32)),
        stride=shape.batch * width,
    )
    return SequenceBatch(
        sparse_features=kjt,
        seq_lengths=torch.from_numpy(lengths.astype(np.int64)),
        item_ids=torch.from_numpy(item_ids.reshape(shape.batch, width).astype(np.int64)),
    )


def _ids(name: str, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if name == "item_id":
        # Popularity ~ 1/rank (log-uniform ranks), scattered over the table by a bijective multiplicative
        # hash so that popular rows are not neighbours.
        ranks = np.floor(np.power(float(rows), rng.random(n))).astype(np.int64) - 1
        return (ranks * 2_654_435_761) % rows
    if name == "behavior_id":  # mostly page views, a few carts, favourites, buys
        return rng.choice(4, size=n, p=[0.85, 0.08, 0.04, 0.03]) % rows
    return rng.integers(0, rows, size=n)  # hashed strings: uniform over the buckets


def batch_tokens(batch: SequenceBatch) -> int:
    return int(batch.seq_lengths.sum())


def loss_columns(shape: Shape, pairs: int) -> int:
    """Logits per query: the positive and its in-batch negatives."""
    if shape.in_batch_negatives == "all":
        return pairs
    return 1 + (shape.num_in_batch_negatives if shape.in_batch_negatives == "sampled" else 0)


def useful_flops(shape: Shape, batch: SequenceBatch) -> float:
    """Matmul FLOPs of forward + backward on the real tokens (module docstring)."""
    h, lengths = shape.hidden, batch.seq_lengths.double()
    params = shape.emb_size * h + shape.layers * (4 * h * h + 2 * h * shape.ffn)
    tokens = float(lengths.sum())
    pairs = PackedLayout.from_batch(batch.seq_lengths, batch.item_ids).num_pairs
    attention = 6 * shape.layers * h * float((lengths**2).sum())
    return 6 * params * tokens + attention + 6 * h * pairs * loss_columns(shape, pairs)


# ----------------------------------------------------------------------------------------- trainer path


class _Cycle:
    """Stands in for the ``SequenceReader`` that ``StepAlignedBatches`` iterates: the batches, forever."""

    def __init__(self, batches: list[SequenceBatch]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[SequenceBatch]:
        return itertools.cycle(self._batches)


class TrainerPath:
    """The project's training step: ``Trainer.train``'s loop body on a sharded model, one rank."""

    name = "trainer"

    def __init__(self, shape: Shape, batches: list[SequenceBatch], output_dir: str) -> None:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        from model.seq2seq import Seq2SeqModel
        from trainer.compile import compile_transformer
        from trainer.dist import init_distributed
        from trainer.metrics import MetricLogger
        from trainer.optim import build_optimizer, build_scheduler
        from trainer.sharding import shard_model
        from trainer.trainer import StepAlignedBatches, TrainStep, seed_everything

        self.shape = shape
        cfg = job_config(shape, output_dir)
        self.ctx = init_distributed(shape.device)
        seed_everything(cfg.train.seed, self.ctx.rank)
        model = TrainStep(Seq2SeqModel(cfg.data.features, cfg.model, device=torch.device("meta")))
        self.model = shard_model(model, cfg, self.ctx)
        compile_transformer(self.model, cfg.model, self.ctx.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.train_steps)
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.ctx.device)
        self.metrics = MetricLogger(self.ctx, Path(output_dir), 0, progress_bar=False)
        self.batches = StepAlignedBatches(_Cycle(batches), self.ctx)  # type: ignore[arg-type]
        self.step_count = 0
        self.model.train()

    def step(self) -> torch.Tensor:
        out = self.pipeline.progress(self.batches)
        self.step_count += 1
        self.scheduler.step()
        self.metrics.update(out, self.step_count)
        if self.step_count % self.shape.log_steps == 0:
            self.metrics.log(self.step_count)
        return out.loss.detach()

    def close(self) -> None:
        from trainer.dist import destroy_distributed

        self.metrics.close()
        destroy_distributed()


# ---------------------------------------------------------------------------------------- baseline path


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
    match ``model.seq2seq.Seq2SeqDecoder``'s, so its state dict loads here."""

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


def copy_trainer_weights(trainer: TrainerPath, baseline: BaselinePath) -> None:
    """Give the baseline the trainer's initial weights (one rank: every table is one local shard)."""
    state = trainer.model.state_dict()
    with torch.no_grad():
        for name, table in baseline.model.embeddings.items():
            sharded = state[f"model.sparse.embedding_collection.embeddings.{name}.weight"]
            shards = sharded.local_shards() if hasattr(sharded, "local_shards") else None
            full = shards[0].tensor if shards else sharded
            table.weight.copy_(full)
        prefix = "model.dense."
        dense = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        baseline.model.dense.load_state_dict(dense)


# -------------------------------------------------------------------------------------- worker process


def _peak_memory_gib(device: torch.device) -> dict[str, float]:
    peak = {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}  # Linux: KiB
    if device.type == "cuda":
        peak["cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(path_name: str, shape: Shape, warmup: int, conn: Connection) -> None:
    """``_serve`` one path; running out of device memory is a result (the batch does not fit), sent back."""
    try:
        _serve(path_name, shape, warmup, conn)
    except torch.OutOfMemoryError as error:
        conn.send({"error": f"out of memory ({str(error).splitlines()[0][:120]})"})


def _serve(path_name: str, shape: Shape, warmup: int, conn: Connection) -> None:
    """Build one path, warm it up, then run timed rounds on the parent's command."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The planner warns about every kernel it filters out; that is expected here (CPU: "fused" only).
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    if shape.threads:
        torch.set_num_threads(shape.threads)
    device = torch.device(shape.device)
    batches = synthetic_batches(shape)
    tokens = [batch_tokens(b) for b in batches]
    flops = [useful_flops(shape, b) for b in batches]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if path_name == "trainer":
            path: TrainerPath | BaselinePath = TrainerPath(shape, batches, tmp)
        else:
            path = BaselinePath(shape, batches, malloc_tuned=path_name == "baseline-malloc")
        build_s = time.perf_counter() - started
        done, losses = 0, []
        for _ in range(warmup):
            losses.append(path.step())
            done += 1
        _sync(device)
        conn.send({"build_s": build_s, "warmup_losses": [float(x) for x in losses]})
        while True:
            command, arg = conn.recv()
            if command == "run":
                first = done
                _sync(device)
                started, cpu_started = time.perf_counter(), time.process_time()
                losses = [path.step() for _ in range(arg)]
                _sync(device)
                seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
                done += arg
                picked = [i % len(batches) for i in range(first, done)]
                conn.send({
                    "seconds": seconds, "cpu_s": cpu_s, "tokens": sum(tokens[i] for i in picked),
                    "flops": sum(flops[i] for i in picked), "losses": [float(x) for x in losses],
                })  # fmt: skip
            elif command == "profile":
                conn.send(_profile(path, arg[0], device, arg[1]))
            elif command == "memory":
                conn.send(_peak_memory_gib(device))
            else:
                path.close()
                conn.send(None)
                return


def _profile(path: TrainerPath | BaselinePath, steps: int, device: torch.device, full: bool) -> str:
    """The summary by kind of work (``bench/profile_summary.py``), plus torch's table with ``--profile-table``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            path.step()
        _sync(device)
        wall_s = time.perf_counter() - started
    text = summarize(prof, steps, device, wall_s)
    if full:
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        text += "\n\n" + prof.key_averages().table(sort_by=sort, row_limit=40)
    return text


class PathFailed(RuntimeError):
    """A path could not run at this shape (out of device memory); its worker has exited."""


class Worker:
    """The parent's handle on one path's subprocess."""

    def __init__(self, path_name: str, shape: Shape, warmup: int) -> None:
        ctx = mp.get_context("spawn")
        self.name = path_name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(path_name, shape, warmup, child), name=f"bench-{path_name}")
        self._proc.start()
        child.close()
        self.ready = self._recv()

    def _recv(self) -> Any:
        try:
            message = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"{self.name} worker died (exit code {self._proc.exitcode})") from None
        if isinstance(message, dict) and "error" in message:
            self._proc.join(timeout=60)
            raise PathFailed(f"{self.name}: {message['error']}")
        return message

    def call(self, command: str, arg: Any = None) -> Any:
        self._conn.send((command, arg))
        return self._recv()

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(EOFError, BrokenPipeError, RuntimeError):
                self.call("stop")
        self._proc.join(timeout=60)


# ------------------------------------------------------------------------------------------ peak matmul


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` product on ``device``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: library dispatch, thread pool, clocks
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Result:
    name: str
    seconds: float
    tokens: int
    flops: float
    steps: int
    build_s: float = 0.0
    memory: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


def _table(runs: dict[int, dict[str, Result]], peaks: dict[str, float], device: str, spec_bf16: float) -> str:
    """One row per (batch, path); ratios against the baseline of the same batch, and against the first batch's
    tokens/s of the same path (does a larger batch pay per token?)."""
    mem_key = "cuda_gib" if device == "cuda" else "rss_gib"
    mem_label = "peak CUDA mem GiB" if device == "cuda" else "peak RSS GiB"
    spec = f" MFU ({spec_bf16:g} TFLOP/s bf16 spec) |" if spec_bf16 else ""
    lines = [
        f"| batch | path | ms/step | tokens/s | vs baseline | vs batch {min(runs)} | dense TFLOP/s | % fp32 mm peak | "
        f"% bf16 mm peak |{spec} {mem_label} |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (2 if spec else 1),
    ]
    first = runs[min(runs)]
    for batch, results in runs.items():
        base = results.get("baseline")
        for r in results.values():
            ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else ""
            scale = f"{r.tokens_per_s / first[r.name].tokens_per_s:.2f}x" if r.name in first else ""
            mfu = f" {r.flops_per_s / (spec_bf16 * 1e12):.1%} |" if spec_bf16 else ""
            lines.append(
                f"| {batch} | {r.name} | {1000 * r.seconds / r.steps:,.1f} | {r.tokens_per_s:,.0f} | {ratio} | {scale} | "
                f"{r.flops_per_s / 1e12:.3f} | {r.flops_per_s / peaks['fp32']:.1%} | {r.flops_per_s / peaks['bf16']:.1%} |"
                f"{mfu} {r.memory.get(mem_key, float('nan')):.2f} |"
            )
    return "\n".join(lines)


def _describe(shape: Shape, batches: list[SequenceBatch], peaks: dict[str, float], args: argparse.Namespace) -> str:
    real = sum(batch_tokens(b) for b in batches)
    padded = sum(b.item_ids.numel() for b in batches)
    table_gib = sum(shape.rows().values()) * shape.emb_dim * 4 / 2**30
    return "\n".join([
        f"device {shape.device}: {_device_name(shape.device)}; torch {torch.__version__}, "
        f"{shape.threads or torch.get_num_threads()} threads; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"tables {', '.join(f'{n} {r:,}' for n, r in shape.rows().items())} rows x {shape.emb_dim} "
        f"({table_gib:.2f} GiB of fp32 weights); values per position 1..{shape.max_values}",
        f"transformer hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads, ffn {shape.ffn}, "
        f"dropout {shape.dropout}, emb_size {shape.emb_size}; bf16 autocast {'on' if shape.bf16 and shape.device == 'cuda' else 'off'}",
        f"batch {shape.batch}, seq_len {shape.seq_len} (lengths uniform in [{max(2, shape.seq_len // 4)}, {shape.seq_len}]): "
        f"{real / padded:.0%} of padded positions are real; {len(batches)} batches cycled",
        f"loss: in-batch negatives {_negatives(shape)}, temperature {shape.temperature}, same-item masking "
        f"{'on' if shape.mask_same_item else 'off'}; trainer: attention {shape.attention}, compile {shape.compile}",
        f"rounds {args.rounds} x {args.steps} steps per path, interleaved, fastest round kept; {args.warmup} warm-up steps",
    ])  # fmt: skip


def _negatives(shape: Shape) -> str:
    if shape.in_batch_negatives == "sampled":
        return f"sampled ({shape.num_in_batch_negatives} per query, one draw per {shape.in_batch_group_size} queries)"
    return shape.in_batch_negatives


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Shape]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--paths",
        default="trainer,baseline",
        help="comma-separated: trainer, baseline, baseline-malloc (the baseline with the trainer's malloc setting)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per path (fastest kept)")
    parser.add_argument(
        "--steps", type=int, default=8, help="timed steps per round (a multiple of --num-batches: same work each round)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after building")
    parser.add_argument("--mm-size", type=int, default=0, help="matmul size of the peak measurement (0: 4096 CPU, 8192 CUDA)")
    parser.add_argument(
        "--profile", type=int, default=None, help="also profile N steps of each path: time by kind of work (default 4 on CUDA, 0 on CPU)"
    )
    parser.add_argument("--profile-table", action="store_true", help="with --profile: torch.profiler's full table too")
    parser.add_argument(
        "--spec-bf16-tflops", type=float, default=0.0, help="the device's dense bf16 spec peak: adds an MFU column"
    )
    defaults = Shape()
    for field in dataclasses.fields(Shape):
        if field.name in ("device", "batch"):
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[str(field.type)]
            parser.add_argument(flag, type=kind, default=None, help=f"default {getattr(defaults, field.name)} (CPU)")
    parser.add_argument(
        "--batch", default=None, help="users per step; comma-separated for several runs (default 32 CPU, 16,64 CUDA)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible on this machine")
    values = {**PRESETS[args.device], "device": args.device}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Shape) if getattr(args, f.name, None) is not None})
    values["batch"] = 0
    try:
        args.batches = [int(b) for b in (args.batch or BATCHES[args.device]).split(",")]
    except ValueError:
        parser.error(f"--batch: comma-separated user counts expected, got {args.batch!r}")
    args.mm_size = args.mm_size or (8192 if args.device == "cuda" else 4096)
    if args.profile is None:
        args.profile = 4 if args.device == "cuda" else 0
    return args, Shape(**values)


def measure(
    shape: Shape, names: list[str], args: argparse.Namespace
) -> tuple[dict[str, Result], dict[str, str], dict[str, str]]:
    """Every path at one shape: interleaved rounds, fastest kept; profiles if asked. Returns the results, the
    profiles and the paths that did not fit in device memory (with the reason)."""
    workers, failed = [], {}
    for name in names:  # built one after the other
        try:
            workers.append(Worker(name, shape, args.warmup))
        except PathFailed as error:
            failed[name] = str(error)
    results: dict[str, Result] = {}
    try:
        for round_index in range(args.rounds):
            # Interleaved rounds: a load change on the shared machine hits both paths alike.
            for w in workers:
                r = w.call("run", args.steps)
                print(f"batch {shape.batch} round {round_index + 1}/{args.rounds} {w.name}: "
                      f"{1000 * r['seconds'] / args.steps:,.1f} ms/step, loss {r['losses'][-1]:.4f}",
                      file=sys.stderr, flush=True)  # fmt: skip
                result = Result(w.name, r["seconds"], r["tokens"], r["flops"], args.steps, w.ready["build_s"])
                if w.name not in results or result.tokens_per_s > results[w.name].tokens_per_s:
                    results[w.name] = result
                if not all(math.isfinite(x) for x in r["losses"]):
                    raise RuntimeError(f"{w.name}: non-finite loss {r['losses']}")
        profiles = {w.name: w.call("profile", (args.profile, args.profile_table)) for w in workers} if args.profile else {}
        for w in workers:
            results[w.name].memory = w.call("memory")
    finally:
        for w in workers:
            w.close()
    return results, profiles, failed


def main(argv: list[str] | None = None) -> None:
    args, shape = parse_args(argv)
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    device = torch.device(shape.device)
    peaks = {"fp32": matmul_peak(device, torch.float32, args.mm_size), "bf16": matmul_peak(device, torch.bfloat16, args.mm_size)}
    runs: dict[int, dict[str, Result]] = {}
    failures: list[str] = []
    for batch in args.batches:
        at = dataclasses.replace(shape, batch=batch)
        runs[batch], profiles, failed = measure(at, names, args)
        failures += [f"batch {batch}: {message}" for message in failed.values()]
        for name, text in profiles.items():
            print(f"\n=== profile: {name}, batch {batch}, {args.profile} steps ===\n{text}\n")
        print(_describe(at, synthetic_batches(at), peaks, args))
        print("build s: " + ", ".join(f"{r.name} {r.build_s:.1f}" for r in runs[batch].values()) + "\n")
    peaks["fp32"] = max(peaks["fp32"], matmul_peak(device, torch.float32, args.mm_size))
    peaks["bf16"] = max(peaks["bf16"], matmul_peak(device, torch.bfloat16, args.mm_size))
    print(f"measured matmul peak ({args.mm_size}^3): fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")  # fmt: skip
    if any(runs.values()):
        print(_table({b: r for b, r in runs.items() if r}, peaks, shape.device, args.spec_bf16_tflops))
    for failure in failures:
        print(f"did not fit: {failure}")
    for batch, results in runs.items():
        if "trainer" in results and "baseline" in results:
            ratio = results["trainer"].tokens_per_s / results["baseline"].tokens_per_s
            print(f"batch {batch}: trainer / baseline tokens/s {ratio:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
