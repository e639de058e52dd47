"""The job's configuration types: one typed dataclass per section (``[data]``, ``[model]``, ``[optim]``,
``[train]``, ``[eval]``), and ``ConfigError``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.config import DataConfig, FeatureConfig
from model.config import ModelConfig


class ConfigError(ValueError):
    """A config file or override that cannot be used. It holds every fault found (``faults``), each naming
    the key to change (``model.num_layers``); ``source`` is the file they were found in."""

    def __init__(self, faults: str | list[str], source: str | Path = "") -> None:
        self.faults = [faults] if isinstance(faults, str) else list(faults)
        self.source = str(source)
        super().__init__(self._text())

    def _text(self) -> str:
        head = f"{self.source}: " if self.source else ""
        if len(self.faults) == 1:
            return head + self.faults[0]
        # One fault per line, so each can be read (and fixed) on its own.
        return f"{head}{len(self.faults)} problems:\n" + "\n".join(f"  - {f}" for f in self.faults)


ShardingType = Literal["table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise"]
ComputeKernel = Literal["fused", "fused_uvm", "fused_uvm_caching", "dense"]


@dataclass
class JobFeatureConfig(FeatureConfig):
    """A ``[[data.features]]`` table of a job: what the reader needs (``FeatureConfig``) plus the sharding
    constraints of the feature's table, read by TorchRec's planner (``trainer/sharding.py``). Features sharing
    a table must agree on them. Empty / 0 leaves the choice to the planner."""

    sharding_types: list[ShardingType] = field(default_factory=list)
    # CPU runs use "fused", and "dense" only for data_parallel (trainer/sharding.py).
    compute_kernels: list[ComputeKernel] = field(default_factory=list)
    # Share of the table's rows kept in the HBM cache with fused_uvm_caching (0 = planner default, 0.2).
    cache_load_factor: float = 0.0
    # Ids per bag (per position) the planner assumes when it estimates communication and lookups.
    pooling_factor: float = 1.0

    @classmethod
    def of(cls, feature: FeatureConfig) -> JobFeatureConfig:
        """``feature`` as a job feature (the planner's defaults where it has no sharding settings)."""
        if isinstance(feature, cls):
            return feature
        return cls(**{f.name: getattr(feature, f.name) for f in dataclasses.fields(FeatureConfig)})


@dataclass
class JobDataConfig(DataConfig):
    """The ``[data]`` section of a job: the reader's settings, its features with their tables' sharding."""

    features: list[JobFeatureConfig] = field(default_factory=list)  # type: ignore[assignment]

    @classmethod
    def of(cls, data: DataConfig) -> JobDataConfig:
        if isinstance(data, cls) and all(isinstance(f, JobFeatureConfig) for f in data.features):
            return data
        values = {f.name: getattr(data, f.name) for f in dataclasses.fields(DataConfig)}
        values["features"] = [JobFeatureConfig.of(f) for f in data.features]
        return cls(**values)


@dataclass
class OptimConfig:
    # Dense (transformer) parameters: AdamW, as in the seed.
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.01
    dense_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    dense_eps: float = 1e-8
    # Sparse (embedding) parameters: fbgemm's fused optimizer, applied inside the backward pass.
    # "auto" = PARTIAL_ROWWISE_ADAM on CUDA, EXACT_ROWWISE_ADAGRAD on CPU (fbgemm has no CPU Adam kernel).
    sparse_optimizer: Literal["auto", "partial_rowwise_adam", "exact_rowwise_adagrad", "exact_adagrad", "exact_sgd"] = (
        "auto"
    )
    sparse_lr: float = 1e-3
    sparse_weight_decay: float = 0.0
    sparse_beta1: float = 0.9
    sparse_beta2: float = 0.999
    sparse_eps: float = 1e-8
    # Learning-rate schedule, applied to dense and sparse rates alike: linear warmup over warmup_steps,
    # then constant or decaying (linear / cosine) to min_lr_ratio x the rate at train.train_steps.
    warmup_steps: int = 0
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    # Stop after this many optimizer steps (0 = no step limit) ...
    train_steps: int = 0
    # ... or after this many passes over the data (0 = no epoch limit). At least one must be set.
    train_epochs: int = 1
    log_steps: int = 10
    # Write a checkpoint every save_steps steps and at the end (0 = no checkpoints).
    save_steps: int = 0
    # Write a checkpoint at every new best validation value (eval.best_metric), also without save_steps.
    save_best: bool = False
    # Complete checkpoints kept in output_dir; older ones are removed once a newer one is complete (0 = all).
    max_to_keep: int = 3
    # Continue from the latest complete checkpoint in output_dir when there is one (RecIS behaviour).
    resume: bool = True
    # Continue from this checkpoint folder instead (takes precedence over the automatic choice).
    resume_from: str = ""
    seed: int = 2025
    # "auto": CUDA with NCCL when a GPU is visible, else CPU with gloo.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress_bar: bool = True
    # Seconds a rank waits in a collective before giving up, so a crashed peer cannot hang the job.
    collective_timeout_s: float = 300.0
    # Evaluate (the [eval] section) every eval_steps steps and at the end of training (0 = never) ...
    eval_steps: int = 0
    # ... or every eval_epochs passes over the data (e.g. 1.0; converted to steps with the reader's estimate
    # of an epoch, from the files' row counts).
    eval_epochs: float = 0.0
    # Stop once eval.best_metric has not improved for this many evaluations in a row (0 = never): with a
    # generous train_epochs a recipe trains "until validation stops improving", and the best checkpoint
    # (best.json) is what `./launch.sh eval --checkpoint OUTPUT_DIR` evaluates.
    early_stop_patience: int = 0
    # TensorBoard scalars of rank 0 in output_dir/tensorboard (a resumed run appends there). Training goes on,
    # with one warning, where the tensorboard package is missing.
    tensorboard: bool = True
    # torch.profiler traces of the steps START <= step < STOP ("20:25"), one file per rank under
    # output_dir/profile; "" = off.
    profile_steps: str = ""

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_steps or self.eval_epochs)


@dataclass
class EvalConfig:
    """Leave-one-out evaluation: per user, the last item is the test target and the one before it the
    validation target (train with data.holdout_positions = 2 so training never sees either)."""

    # "valid" during training (eval_steps); `./launch.sh eval` defaults to "test".
    split: Literal["valid", "test"] = "valid"
    # Files to evaluate on; empty = data.data_paths (the training users, with their held-out targets).
    data_paths: str | list[str] = ""
    # "full": the target ranked against every candidate item. "sampled": against num_negatives random items
    # the user has not interacted with (the SASRec paper's protocol; its numbers are not comparable to
    # full ranking).
    protocol: Literal["full", "sampled"] = "full"
    num_negatives: int = 100
    ks: list[int] = field(default_factory=lambda: [1, 10, 50, 200])
    # The items ranked: "table" = every row of the item table; "data" = the ids that occur in the evaluated
    # files (for hashed or sparse id spaces, where most rows are never used).
    candidates: Literal["table", "data"] = "table"
    # Leave the user's earlier items (those in the model's input window, the newest data.seq_len) out of
    # the ranking (full protocol); off = nothing excluded. The sampled protocol never draws them.
    exclude_history: bool = False
    # Users per batch on each rank (0 = data.batch_size).
    batch_size: int = 0
    # Candidate items scored per matrix product: bounds memory for tables of millions of items.
    item_chunk: int = 65536
    # The metric that picks the best checkpoint during training: "mrr", "hr@K" or "ndcg@K" (K in ks).
    best_metric: str = "ndcg@10"
    # Seeds the sampled protocol's negatives (drawn per user, so the same on any number of ranks).
    seed: int = 0

    def metric_names(self) -> list[str]:
        return [f"{m}@{k}" for k in self.ks for m in ("hr", "ndcg")] + ["mrr"]


@dataclass
class JobConfig:
    data: JobDataConfig = field(default_factory=JobDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # A config built in code may hold the reader's plain DataConfig / FeatureConfig: the job's own types
        # (with the planner's defaults) keep every consumer on one type.
        self.data = JobDataConfig.of(self.data)

    def eval_data(self) -> JobDataConfig:
        """``[data]`` with the files evaluation reads: ``eval.data_paths``, else the training files."""
        return dataclasses.replace(self.data, data_paths=self.eval.data_paths or self.data.data_paths)
