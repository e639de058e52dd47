"""What the training benchmark trains on: the shape (tables, transformer, batch, loss settings), the job
config both paths derive from it, deterministic synthetic batches in the reader's layout, and the useful
FLOPs of a batch (the formula is in ``bench/bench_train.py``'s docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.batch import PackedLayout, SequenceBatch
from data.config import DataConfig, FeatureConfig
from model.config import ModelConfig
from trainer.config import JobConfig, OptimConfig, TrainConfig

FEATURES = ("item_id", "cate_id", "behavior_id", "timestamp")



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
    width = int(lengths.max())  # padded to the longest user, like data.layout.build_batches
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

