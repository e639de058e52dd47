"""Typed configuration of the input pipeline: where the data is and what each feature means."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

HashType = Literal["none", "murmur", "farm"]
TruncateSide = Literal["left", "right"]
# A ``DataConfig.seq_len`` that keeps every position: more than any user has (the evaluation reader uses it to
# read whole histories). A plain large number, so the cutting kernels need no special case; the reader's log
# shows it as "whole sequences" rather than as the number.
WHOLE_SEQUENCES = 1 << 30


class DataConfigError(ValueError):
    """A ``[data]`` setting the reader cannot work with; the message names the key (``data.batch_size``,
    ``data.features.0 (item_id).hash_type``, ...). ``faults`` holds each fault when there are several."""

    def __init__(self, message: str, faults: list[str] | None = None) -> None:
        super().__init__(message)
        self.faults = faults or [message]


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
    # The embedding table this feature reads (the seed's name for it): features with the same one share its
    # rows. Empty = a table of its own, named after the feature.
    shard_name: str = ""
    # --- Managed collisions (hash_bucket_size = 0 with a hash: unbounded 63-bit ids, RecIS's dynamic table).
    # Table rows: ids are admitted into these slots (MCH, no collisions) until they are full; then the
    # eviction policy frees slots of rarely/long-unseen ids every mc_eviction_interval steps.
    mc_capacity: int = 0
    mc_eviction_policy: Literal["distance_lfu", "lfu", "lru"] = "distance_lfu"
    # Training steps between admissions/evictions (new ids map to the table's last row until admitted).
    mc_eviction_interval: int = 1

    def __post_init__(self) -> None:
        if not self.shard_name:
            self.shard_name = self.name

    def validate(self, key: str) -> None:
        """The rules that need nothing but this feature; ``key`` names it in messages."""
        if self.hash_type not in ("none", "murmur", "farm"):
            raise DataConfigError(f"{key}: unknown hash_type {self.hash_type!r} (none, murmur or farm)")
        if self.hash_bucket_size < 0:
            raise DataConfigError(f"{key}.hash_bucket_size must be >= 0")
        if self.hash_type == "none" and self.hash_bucket_size == 0 and self.num_embeddings <= 0:
            raise DataConfigError(
                f"{key} has integer ids without hash_bucket_size: set num_embeddings "
                "(ids must lie in [0, num_embeddings)) or a hash_bucket_size"
            )

    @property
    def table(self) -> str:
        """Name of the embedding table this feature looks up (``shard_name``)."""
        return self.shard_name

    @property
    def table_rows(self) -> int:
        """Row count of the embedding table this feature looks up."""
        if self.managed_collision:
            return self.mc_capacity
        return self.hash_bucket_size if self.hash_bucket_size > 0 else self.num_embeddings

    @property
    def managed_collision(self) -> bool:
        """Hashed ids without a bucket: unbounded 63-bit ids, mapped to rows by a managed-collision module."""
        return self.hash_bucket_size == 0 and self.hash_type != "none"


@dataclass
class DataConfig:
    """The seed's ``IOArgs`` plus ``SequenceTruncate`` settings."""

    # Comma-separated list (or a TOML list) of ORC/Parquet files or folders.
    data_paths: str | list[str] = ""
    file_format: Literal["auto", "orc", "parquet"] = "auto"
    batch_size: int = 16
    # Threads that decode files and build batches off the training thread.
    read_threads: int = 2
    # Worker processes that decode instead of the read_threads (read, validate, truncate, hash one stripe /
    # row group at a time); 0 = decode on threads of the training process. Processes can scale with cores
    # where threads stop (what Python is left per unit and batch shares one GIL), but cost more CPU per unit;
    # on 2 cores threads are faster. Batches, order, sharding and resume are the same
    # either way. Workers come from a forkserver (POSIX) and open the files themselves, so the data must be
    # reachable from another process (not an in-memory fsspec filesystem).
    read_workers: int = 0
    # Batches buffered ahead of the training step: the reader works ahead while fewer than this many wait.
    # It hands them over per build pass (up to 64 batches at once), so up to prefetch - 1 + 64 may wait.
    prefetch: int = 4
    drop_remainder: bool = True
    # SEQ_LEN / ModelConfig.seq_len of the seed: positions kept per user.
    seq_len: int = 1024
    truncate_side: TruncateSide = "right"
    # Error instead of cutting sequences longer than seq_len.
    check_length: bool = False
    # Positions held out at the end of every user's sequence, dropped before truncation. Leave-one-out
    # training sets 2 (the last item is the test target, the one before it the validation target); the
    # evaluation reader derives its own value (1 for validation, 0 for test). Users left without positions
    # are skipped (counted in the log), they are not an error.
    holdout_positions: int = 0
    # Feature whose ids are the prediction targets (used to mask same-item false negatives).
    item_feature: str = "item_id"
    # Column of per-position event times, Unix seconds as integers or decimal strings (the seed's
    # "timestamp"), read in addition to the features (it may be one of them too): batches then carry
    # ``SequenceBatch.timestamps`` (the HSTU encoder's relative time bias). "" = none.
    time_feature: str = ""
    # Seeded, reproducible shuffle: unit (stripe / row group) order per epoch, plus rows permuted within
    # windows of at least shuffle_buffer rows (0 = unit order only). Same seed, same batches.
    shuffle: bool = False
    shuffle_buffer: int = 0
    shuffle_seed: int = 0
    # A user with no positions at all: "skip" (counted, logged as a warning) or "error".
    empty_sequences: Literal["skip", "error"] = "skip"
    features: list[FeatureConfig] = field(default_factory=list)

    def paths(self) -> list[str]:
        raw = self.data_paths if isinstance(self.data_paths, list) else self.data_paths.split(",")
        return [p.strip() for p in raw if p.strip()]

    def validate(self) -> None:
        """Every rule on ``[data]`` alone, checked once: by the job's config loader before anything starts,
        and by ``SequenceReader`` for a config built in code. One error lists every fault (a line each)."""
        faults: list[str] = []
        if not self.features:
            faults.append("data.features: at least one feature is required")
        for key, value in (("batch_size", self.batch_size), ("seq_len", self.seq_len),
                           ("read_threads", self.read_threads), ("prefetch", self.prefetch)):  # fmt: skip
            if value <= 0:
                faults.append(f"data.{key} must be > 0, got {value}")
        for key, value in (("read_workers", self.read_workers), ("holdout_positions", self.holdout_positions),
                           ("shuffle_buffer", self.shuffle_buffer), ("shuffle_seed", self.shuffle_seed)):  # fmt: skip
            if value < 0:
                meaning = " (0 = decode on the read_threads)" if key == "read_workers" else ""
                faults.append(f"data.{key} must be >= 0{meaning}, got {value}")
        # Literal-typed fields are checked by the TOML loader; a config built in code is checked here.
        if self.truncate_side not in ("left", "right"):
            faults.append(f"data.truncate_side must be 'left' or 'right', not {self.truncate_side!r}")
        if self.empty_sequences not in ("skip", "error"):
            faults.append(f"data.empty_sequences must be 'skip' or 'error', not {self.empty_sequences!r}")
        faults += self._feature_faults()
        if faults:
            raise DataConfigError("\n".join(faults), faults)

    def _feature_faults(self) -> list[str]:
        faults, names = [], []
        for i, feature in enumerate(self.features):
            key = f"data.features.{i} ({feature.name})"
            if feature.name in names:
                faults.append(f"{key}: feature name {feature.name!r} appears twice")
            names.append(feature.name)
            try:
                feature.validate(key)
            except DataConfigError as e:
                faults.append(str(e))
        if self.features and self.item_feature not in names:
            faults.append(f"data.item_feature {self.item_feature!r} is not one of the features {names}")
        return faults
