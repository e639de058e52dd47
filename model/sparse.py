"""Sparse arch: one TorchRec ``EmbeddingCollection`` over all sequence features, mean-pooled per position.

The collection is built on whatever device it is given; the trainer builds it on ``meta`` and lets
``DistributedModelParallel`` materialise the shards, so nothing here knows about process groups.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from data.config import FeatureConfig

# RecIS's TruncNormalInitializer(std=0.001), truncated at two standard deviations like TF's.
EMBEDDING_INIT_STD = 0.001


def trunc_normal_init_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Seed init of an embedding table (or of one shard of it)."""
    with torch.no_grad():
        return nn.init.trunc_normal_(
            weight, std=EMBEDDING_INIT_STD, a=-2 * EMBEDDING_INIT_STD, b=2 * EMBEDDING_INIT_STD, generator=generator
        )


def embedding_configs(features: list[FeatureConfig]) -> list[EmbeddingConfig]:
    """One table per ``shard_name``; features that share a shard_name share the table's rows."""
    tables: dict[str, EmbeddingConfig] = {}
    for f in features:
        table = tables.get(f.shard_name)
        if table is None:
            tables[f.shard_name] = EmbeddingConfig(
                name=f.shard_name,
                embedding_dim=f.emb_dim,
                num_embeddings=f.table_rows,
                feature_names=[f.name],
                # Used when the table is materialised unsharded; sharded (fbgemm) tables are re-initialised
                # by the trainer, since fbgemm only knows uniform init.
                init_fn=trunc_normal_init_,
                weight_init_min=-2 * EMBEDDING_INIT_STD,
                weight_init_max=2 * EMBEDDING_INIT_STD,
            )
        else:
            table.feature_names.append(f.name)
    return list(tables.values())


class PositionMeanPooling(nn.Module):
    """Averages the values of each position (bag) and concatenates features: ``{name: JT}`` -> ``[B*T, E]``.

    Kept as its own module so TorchRec's pipeline tracer treats it as a leaf and never traces its
    data-dependent shapes.
    """

    def __init__(self, feature_names: list[str]) -> None:
        super().__init__()
        self.feature_names = feature_names

    def forward(self, embeddings: dict[str, JaggedTensor]) -> torch.Tensor:
        return torch.cat([self._mean(embeddings[name]) for name in self.feature_names], dim=-1)

    @staticmethod
    def _mean(jt: JaggedTensor) -> torch.Tensor:
        values, lengths = jt.values(), jt.lengths()
        num_bags = lengths.numel()
        # Bag index of every looked-up row; output_size avoids a device->host sync on CUDA.
        bag = torch.repeat_interleave(
            torch.arange(num_bags, device=values.device), lengths.long(), output_size=values.shape[0]
        )
        summed = values.new_zeros(num_bags, values.shape[-1]).index_add_(0, bag, values)
        # Empty bags (padding, empty positions) stay zero instead of dividing by zero.
        return summed / lengths.clamp(min=1).unsqueeze(-1).to(values.dtype)


class SparseArch(nn.Module):
    """KJT (one bag per position, stride ``B*T``) -> ``[B*T, emb_size]`` concatenated mean embeddings."""

    def __init__(self, features: list[FeatureConfig], device: torch.device | None = None) -> None:
        super().__init__()
        self.embedding_collection = EmbeddingCollection(tables=embedding_configs(features), device=device)
        self.pooling = PositionMeanPooling([f.name for f in features])

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.pooling(self.embedding_collection(features))
