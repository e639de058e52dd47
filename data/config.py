"""Typed configuration of the input pipeline: where the data is and what each feature means."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

HashType = Literal["none", "murmur", "farm"]
TruncateSide = Literal["left", "right"]


@dataclass
class FeatureConfig:
    """One sequence column of the input files (RecIS ``varlen_feature`` + ``EmbeddingOption``).

    ``hash_bucket_size`` decides the table's row count. Integer ids with a bucket are taken
    modulo the bucket; integer ids without one (bucket 0, ``hash_type = "none"``) must already lie in
    ``[0, num_embeddings)``, anything else is an error. String leaves must be hashed.
    """

    name: str
    emb_dim: int = 128
    hash_type: HashType = "none"
    hash_bucket_size: int = 0
    # Rows of the table when hash_bucket_size is 0 and ids are already dense integers.
    num_embeddings: int = 0
    # Features with the same shard_name share one embedding table (seed semantics).
    shard_name: str = ""

    def __post_init__(self) -> None:
        if not self.shard_name:
            self.shard_name = self.name

    @property
    def table_rows(self) -> int:
        """Row count of the embedding table this feature looks up."""
        return self.hash_bucket_size if self.hash_bucket_size > 0 else self.num_embeddings


@dataclass
class DataConfig:
    """The seed's ``IOArgs`` plus ``SequenceTruncate`` settings."""

    # Comma-separated list (or a TOML list) of ORC/Parquet files or folders.
    data_paths: str | list[str] = ""
    file_format: Literal["auto", "orc", "parquet"] = "auto"
    batch_size: int = 16
    # Threads that decode files and build batches off the training thread.
    read_threads: int = 2
    # Batches buffered ahead of the training step.
    prefetch: int = 4
    drop_remainder: bool = True
    # SEQ_LEN / ModelConfig.seq_len of the seed: positions kept per user.
    seq_len: int = 1024
    truncate_side: TruncateSide = "right"
    # Error instead of cutting sequences longer than seq_len.
    check_length: bool = False
    # Feature whose ids are the prediction targets (used to mask same-item false negatives).
    item_feature: str = "item_id"
    features: list[FeatureConfig] = field(default_factory=list)

    def paths(self) -> list[str]:
        raw = self.data_paths if isinstance(self.data_paths, list) else self.data_paths.split(",")
        return [p.strip() for p in raw if p.strip()]
