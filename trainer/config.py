"""Job configuration: typed dataclasses per component, loaded from TOML with ``--section.key=value`` overrides.

Every key is checked against the dataclass it lands in: an unknown key or a value of the wrong type is a
``ConfigError`` that names the full key (``model.num_layers``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data.config import DataConfig, DataConfigError, FeatureConfig
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


# ---------------------------------------------------------------------------------------------------------
# Loading and type checking


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a TOML file, apply ``--section.key=value`` overrides, type-check and validate the result.

    Raises one ``ConfigError`` holding every fault: all unknown keys and wrong types first (with a "did you
    mean"), else every rule the values break."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path) from e
    loader = _Loader()
    for item in overrides or []:
        try:
            key, value = parse_override(item)
            _set_path(raw, key.split("."), value, key)
            loader.from_override[key] = item
        except ConfigError as e:
            loader.faults.extend(e.faults)
    cfg = loader.build(JobConfig, raw, prefix="")
    if loader.faults:
        # Rules on values are checked only once every key is known and typed: a rule run on a default that
        # stands in for a mistyped value would report a second, misleading fault.
        raise ConfigError(loader.faults, path)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(e.faults, path) from None
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``--model.num_layers=4`` -> ("model.num_layers", 4). Values are TOML literals; bare words are strings."""
    text = item[2:] if item.startswith("--") else item
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # unquoted strings such as paths
    return key, parsed


def _set_path(raw: dict[str, Any], parts: list[str], value: Any, full_key: str) -> None:
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, full_key)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {full_key}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, full_key)] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, full_key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {full_key}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _sections() -> dict[str, set[str]]:
    """Keys of every section, for "did you mean" across sections (``train.batch_size`` -> ``data.batch_size``)."""
    hints = typing.get_type_hints(JobConfig)
    sections = {name: {f.name for f in dataclasses.fields(hints[name])} for name in hints}
    sections["data.features"] = {f.name for f in dataclasses.fields(JobFeatureConfig)}
    return sections


class _Loader:
    """Builds the typed config from the TOML tree, collecting every unknown key and wrongly typed value."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        # Keys set on the command line, so their faults say so ("from --model.nhed=4").
        self.from_override: dict[str, str] = {}

    def fault(self, key: str, message: str) -> None:
        origin = next((o for k, o in self.from_override.items() if _within(key, k) or _within(k, key)), None)
        self.faults.append(f"{message} (from the override {origin})" if origin else message)

    def build(self, cls: type, raw: Any, prefix: str) -> Any:
        """An instance of ``cls`` from a TOML table; None when a fault leaves it unbuildable."""
        if not isinstance(raw, dict):
            self.fault(prefix, f"{prefix or 'config'}: expected a table, got {type(raw).__name__}")
            return None
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            full = _join(prefix, key)
            if key not in names:
                where = f"in [{_section_of(prefix)}]" if prefix else "at the top level"
                self.fault(full, f"unknown key {full!r} {where}{_suggest(key, prefix, names)}")
                continue
            try:
                kwargs[key] = self.coerce(value, hints[key], full)
            except ConfigError as e:
                self.fault(full, str(e))
        try:
            return cls(**kwargs)
        except TypeError as e:  # a required field (e.g. a feature's name) is missing
            if not self.faults:
                self.fault(prefix, f"{prefix or 'config'}: {e}")
            return None

    def coerce(self, value: Any, hint: Any, key: str) -> Any:
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, key)
        if origin in (types.UnionType, typing.Union):
            for option in typing.get_args(hint):
                try:
                    return _coerce_value(value, option, key)
                except ConfigError:
                    continue
            raise ConfigError(f"{key}: {value!r} matches none of the allowed types ({hint})")
        if origin is list:
            if not isinstance(value, list):
                raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            (item_hint,) = typing.get_args(hint)
            items = []
            for i, v in enumerate(value):
                try:
                    items.append(self.coerce(v, item_hint, f"{key}.{i}"))
                except ConfigError as e:
                    self.fault(f"{key}.{i}", str(e))
            return items
        return _coerce_value(value, hint, key)


def _within(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


def _section_of(prefix: str) -> str:
    # data.features.0 -> data.features: the "did you mean" candidates are the same for every feature.
    parts = [p for p in prefix.split(".") if not p.isdigit()]
    return ".".join(parts)


def _suggest(key: str, prefix: str, known: set[str]) -> str:
    """A near miss in the same section, else the section that has this key (``train.batch_size``)."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {_join(prefix, close[0])!r}?"
    section = _section_of(prefix)
    elsewhere = [s for s, keys in _sections().items() if key in keys and s != section]
    if elsewhere:
        return f"; did you mean {elsewhere[0] + '.' + key!r}?"
    if not prefix:
        close = difflib.get_close_matches(key, sorted(_sections()), n=1, cutoff=0.6)
        if close:
            return f"; did you mean [{close[0]}]?"
    return f"; known keys: {sorted(known)}"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce_value(value: Any, hint: Any, key: str) -> Any:
    """A scalar or Literal value, type-checked (containers and tables are ``_Loader.coerce``'s)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
            hint_text = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_coerce_value(v, item_hint, f"{key}.{i}") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint in (int, str, bool):
        # bool is a subclass of int in Python: `num_layers = true` must still be rejected.
        if type(value) is not hint:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint}")  # pragma: no cover - a bug in this file


# ---------------------------------------------------------------------------------------------------------
# Cross-field validation


def validate(cfg: JobConfig) -> None:
    """Checks that need more than one field; each message names the key to change. Every rule runs, and one
    ``ConfigError`` lists all the faults found; rules that need valid features run only when they are."""
    cfg.data = JobDataConfig.of(cfg.data)  # features added in code after construction may be plain ones
    faults: list[str] = []
    features_ok = _run_rules((_data_rules, _feature_rules), cfg, faults)
    _run_rules((_model_rules, _train_rules, _profile_rules, _optim_rules, _validate_encoder), cfg, faults)
    if features_ok:
        _run_rules((_validate_targets,), cfg, faults)
    _run_rules((_validate_eval_settings,), cfg, faults)
    if features_ok:
        _run_rules((_validate_eval_needs,), cfg, faults)
    if faults:
        raise ConfigError(faults)


def _run_rules(rules: tuple[Callable[[JobConfig], None], ...], cfg: JobConfig, faults: list[str]) -> bool:
    """Runs each rule, collecting its faults; True when none had any."""
    before = len(faults)
    for rule in rules:
        try:
            rule(cfg)
        except (ConfigError, DataConfigError) as e:
            faults.extend(e.faults)
    return len(faults) == before


def _data_rules(cfg: JobConfig) -> None:
    d = cfg.data
    d.validate()  # the rules on [data] alone, owned by the data package
    if d.seq_len < 2:
        raise ConfigError("data.seq_len: next-item training needs at least 2 positions")
    if not d.paths():
        raise ConfigError("data.data_paths: no input files or folders given")


def _feature_rules(cfg: JobConfig) -> None:
    d, m = cfg.data, cfg.model
    _validate_features(d.features)
    dims = sorted({f.emb_dim for f in d.features})
    if len(dims) > 1:
        # One TorchRec EmbeddingCollection (one pipelined input dist) requires a single embedding width.
        raise ConfigError(f"data.features: all features need the same emb_dim (EmbeddingCollection); got {dims}")
    emb_total = sum(f.emb_dim for f in d.features)
    if m.emb_size != emb_total:
        raise ConfigError(f"model.emb_size = {m.emb_size} but the features' emb_dim add up to {emb_total}")


def _model_rules(cfg: JobConfig) -> None:
    m = cfg.model
    _positive({"model.hidden_size": m.hidden_size, "model.num_layers": m.num_layers, "model.nhead": m.nhead,
               "model.dim_feedforward": m.dim_feedforward, "model.temperature": m.temperature})  # fmt: skip
    faults = []
    if m.nhead > 0 and m.hidden_size % m.nhead:
        faults.append(f"model.hidden_size ({m.hidden_size}) must be divisible by model.nhead ({m.nhead})")
    if not 0.0 <= m.dropout < 1.0:
        faults.append(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.max_positions < 0:
        faults.append(f"model.max_positions must be >= 0, got {m.max_positions}")
    if m.attention == "varlen" and cfg.train.device == "cpu":
        faults.append("model.attention = 'varlen' is FlashAttention's CUDA kernel; train.device is 'cpu' (use 'auto')")
    if faults:
        raise ConfigError(faults)


def _train_rules(cfg: JobConfig) -> None:
    t = cfg.train
    _positive({"train.log_steps": t.log_steps, "train.collective_timeout_s": t.collective_timeout_s})
    if t.train_steps < 0 or t.train_epochs < 0:
        raise ConfigError("train.train_steps and train.train_epochs must be >= 0")
    if t.train_steps == 0 and t.train_epochs == 0:
        raise ConfigError("set train.train_steps or train.train_epochs (both are 0: the run would never end)")
    if t.save_steps < 0 or t.max_to_keep < 0:
        raise ConfigError("train.save_steps and train.max_to_keep must be >= 0")
    if not t.output_dir:
        raise ConfigError("train.output_dir must name a folder")


def _optim_rules(cfg: JobConfig) -> None:
    o = cfg.optim
    _positive({"optim.dense_lr": o.dense_lr, "optim.sparse_lr": o.sparse_lr})
    if o.warmup_steps < 0 or not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
    if len(o.dense_betas) != 2:
        raise ConfigError("optim.dense_betas must hold two numbers")


def _profile_rules(cfg: JobConfig) -> None:
    profile_window(cfg.train.profile_steps)


def profile_window(spec: str) -> tuple[int, int] | None:
    """``train.profile_steps``: "START:STOP" -> (START, STOP), the steps START <= step < STOP; "" -> None."""
    if not spec.strip():
        return None
    start, sep, stop = spec.partition(":")
    try:
        window = (int(start), int(stop)) if sep else None
    except ValueError:
        window = None
    if window is None or not 1 <= window[0] < window[1]:
        raise ConfigError(
            f"train.profile_steps = {spec!r}: expected \"START:STOP\" with 1 <= START < STOP (the steps "
            'START <= step < STOP, e.g. "20:25"), or "" for no profile'
        )
    return window


def _item_only_targets(cfg: JobConfig) -> bool:
    names = [f.name for f in cfg.data.features]
    return (cfg.model.target_features or names) == [cfg.data.item_feature]


def require_ranking(cfg: JobConfig, what: str) -> None:
    """Ranking items needs each item's own representation, from a table with fixed rows."""
    if not _item_only_targets(cfg):
        raise ConfigError(
            f"{what} needs a representation of each item on its own: set model.target_features = "
            f"[{cfg.data.item_feature!r}] (the other features then describe the input only)"
        )
    item = next(f for f in cfg.data.features if f.name == cfg.data.item_feature)
    if item.managed_collision:
        raise ConfigError(
            f"{what} needs an item table with fixed rows; data.item_feature {item.name!r} is a managed-collision "
            "feature (hash_bucket_size = 0): give it a hash_bucket_size"
        )


def _validate_targets(cfg: JobConfig) -> None:
    m, names = cfg.model, [f.name for f in cfg.data.features]
    for i, name in enumerate(m.target_features):
        if name not in names:
            raise ConfigError(f"model.target_features.{i}: {name!r} is not one of the features {names}")
    if m.num_negatives < 0:
        raise ConfigError(f"model.num_negatives must be >= 0, got {m.num_negatives}")
    if m.num_negatives:
        require_ranking(cfg, "model.num_negatives (sampled negatives)")
    _validate_negatives(m)


def _validate_encoder(cfg: JobConfig) -> None:
    m, d = cfg.model, cfg.data
    if m.encoder == "hstu":
        if m.attention == "varlen":
            raise ConfigError(
                "model.attention = 'varlen' is softmax attention (FlashAttention); model.encoder = 'hstu' "
                "attends pointwise: use 'auto', 'grouped' or 'padded'"
            )
        if m.hstu_attention_dim < 0 or m.hstu_linear_dim < 0:
            raise ConfigError("model.hstu_attention_dim and model.hstu_linear_dim must be >= 0 (0 = hidden_size / nhead)")
    if d.time_feature and m.encoder != "hstu":
        raise ConfigError(
            f"data.time_feature = {d.time_feature!r}: event times feed HSTU's relative time bias; set "
            "model.encoder = 'hstu' or leave data.time_feature empty"
        )


def _validate_negatives(m: ModelConfig) -> None:
    if m.in_batch_negatives == "sampled":
        _positive({"model.num_in_batch_negatives": m.num_in_batch_negatives, "model.in_batch_group_size": m.in_batch_group_size})
    if m.in_batch_negatives == "none" and not m.num_negatives:
        raise ConfigError(
            "model.in_batch_negatives = 'none' and model.num_negatives = 0: the loss would have no negatives; "
            "set model.num_negatives (uniform items from the table) or another model.in_batch_negatives"
        )
    if m.loss_chunk_size < 0:
        raise ConfigError(f"model.loss_chunk_size must be >= 0 (0 = automatic), got {m.loss_chunk_size}")
    if m.seed_loss_bugs and (m.in_batch_negatives != "all" or m.logq_correction or m.encoder != "transformer"):
        raise ConfigError(
            f"model.seed_loss_bugs {m.seed_loss_bugs} reproduce the seed's loss and model: they need "
            "model.in_batch_negatives = 'all', model.logq_correction = false and model.encoder = 'transformer'"
        )
    if m.seed_loss_bugs and m.in_batch_negatives != "all":
        raise ConfigError(
            f"model.seed_loss_bugs {m.seed_loss_bugs} reproduce the seed's loss, whose negatives are all in-batch "
            f"targets: set model.in_batch_negatives = 'all' (got {m.in_batch_negatives!r})"
        )


def _validate_eval_settings(cfg: JobConfig) -> None:
    e, t = cfg.eval, cfg.train
    faults = []
    if t.eval_steps < 0 or t.eval_epochs < 0 or t.early_stop_patience < 0:
        faults.append("train.eval_steps, train.eval_epochs and train.early_stop_patience must be >= 0")
    if t.eval_steps and t.eval_epochs:
        faults.append("set train.eval_steps or train.eval_epochs, not both")
    if t.save_best and not t.evaluates:
        faults.append("train.save_best checkpoints the best validation value: set train.eval_epochs or train.eval_steps")
    if t.early_stop_patience and not t.evaluates:
        faults.append("train.early_stop_patience stops on the validation metric: set train.eval_epochs or train.eval_steps")
    try:
        _positive({"eval.num_negatives": e.num_negatives, "eval.item_chunk": e.item_chunk})
    except ConfigError as error:
        faults.extend(error.faults)
    if e.batch_size < 0:
        faults.append(f"eval.batch_size must be >= 0 (0 = data.batch_size), got {e.batch_size}")
    if not e.ks or any(k <= 0 for k in e.ks):
        faults.append(f"eval.ks must be a non-empty list of positive cut-offs, got {e.ks}")
    elif e.best_metric not in e.metric_names():
        faults.append(f"eval.best_metric: {e.best_metric!r} is not one of {e.metric_names()}")
    if faults:
        raise ConfigError(faults)


def _validate_eval_needs(cfg: JobConfig) -> None:
    """What evaluation during training needs of the features and the data."""
    if not cfg.train.evaluates:
        return
    require_ranking(cfg, "evaluation (train.eval_steps / train.eval_epochs)")
    require_held_out_targets(cfg, "train.eval_steps / train.eval_epochs")


def require_held_out_targets(cfg: JobConfig, what: str) -> None:
    """Leave-one-out targets must not have been trained on (or the metrics measure memorisation)."""
    if cfg.data.holdout_positions < 2 and not cfg.eval.data_paths:
        raise ConfigError(
            f"{what}: the evaluation targets (each user's last two items) would be trained on; set "
            "data.holdout_positions = 2 (leave-one-out) or point eval.data_paths at other files"
        )


def _positive(values: dict[str, float]) -> None:
    faults = [f"{key} must be > 0, got {value}" for key, value in values.items() if not value > 0]
    if faults:
        raise ConfigError(faults)


def _validate_features(features: list[JobFeatureConfig]) -> None:
    """Rules on the features' tables (embedding width, rows, sharing, sharding, managed collisions): what
    the model and the sharding need, beyond what the reader checks (``DataConfig.validate``). Each feature's
    first fault is reported."""
    tables: dict[str, JobFeatureConfig] = {}
    faults = []
    for i, f in enumerate(features):
        try:
            _validate_feature(f, f"data.features.{i} ({f.name})", tables)
        except ConfigError as e:
            faults.extend(e.faults)
    if faults:
        raise ConfigError(faults)


def _validate_feature(f: JobFeatureConfig, key: str, tables: dict[str, JobFeatureConfig]) -> None:
    if f.emb_dim <= 0:
        raise ConfigError(f"{key}.emb_dim must be > 0")
    if f.managed_collision and f.mc_capacity <= 0:
        # RecIS's bucket 0 means an unbounded 63-bit id in a dynamic table; TorchRec tables have fixed
        # rows, so the ids go through a managed-collision module whose capacity must be given (never a
        # silent modulo).
        raise ConfigError(
            f"{key}: hash_bucket_size = 0 with hash_type = {f.hash_type!r} means unbounded ids; set "
            "mc_capacity (rows of the managed-collision table) or a hash_bucket_size"
        )
    if f.mc_capacity and not f.managed_collision:
        raise ConfigError(f"{key}.mc_capacity applies only to hashed features with hash_bucket_size = 0")
    _validate_sharding_fields(f, key)
    if f.table_rows <= 0:
        raise ConfigError(f"{key}: set hash_bucket_size or num_embeddings (the table needs a row count)")
    other = tables.setdefault(f.table, f)
    if (other.emb_dim, other.table_rows) != (f.emb_dim, f.table_rows):
        raise ConfigError(
            f"{key}: shares table {f.table!r} with {other.name!r} but has another emb_dim or row count"
        )
    if _table_settings(other) != _table_settings(f):
        raise ConfigError(
            f"{key}: shares table {f.table!r} with {other.name!r} but has other sharding or "
            "managed-collision settings"
        )


def _table_settings(f: JobFeatureConfig) -> tuple[object, ...]:
    """Per-table settings that features sharing a table must agree on."""
    return (
        f.managed_collision, sorted(f.sharding_types), sorted(f.compute_kernels), f.cache_load_factor,
        f.mc_eviction_policy, f.mc_eviction_interval,
    )  # fmt: skip


def _validate_sharding_fields(f: JobFeatureConfig, key: str) -> None:
    # The values themselves are Literal-typed: checked by the loader, with the key.
    if not 0.0 <= f.cache_load_factor <= 1.0:
        raise ConfigError(f"{key}.cache_load_factor must be in [0, 1], got {f.cache_load_factor}")
    if f.pooling_factor <= 0:
        raise ConfigError(f"{key}.pooling_factor must be > 0, got {f.pooling_factor}")
    if f.mc_eviction_interval < 1:
        raise ConfigError(f"{key}.mc_eviction_interval must be >= 1, got {f.mc_eviction_interval}")
    if f.managed_collision and any(t != "row_wise" for t in f.sharding_types):
        # TorchRec shards managed-collision tables row-wise only (the remapping is per row range).
        raise ConfigError(f"{key}.sharding_types: a managed-collision table (bucket 0) can only be row_wise")


# ---------------------------------------------------------------------------------------------------------
# Writing the resolved config next to the run's outputs


def dump_config(cfg: JobConfig) -> str:
    """TOML text of the resolved config (readable by ``load_config``)."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        lines += _dump_table(section.name, value)
    return "\n".join(lines) + "\n"


def _dump_table(name: str, obj: Any) -> list[str]:
    scalars, tables = [], []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for item in value:
                tables += ["", f"[[{name}.{f.name}]]"] + [
                    f"{k.name} = {_toml_value(getattr(item, k.name))}" for k in dataclasses.fields(item)
                ]
        else:
            scalars.append(f"{f.name} = {_toml_value(value)}")
    return ["", f"[{name}]", *scalars, *tables]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf") if value == value else "nan"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
