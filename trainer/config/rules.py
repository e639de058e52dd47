"""Cross-field rules of a job config (``validate``): each fault names the key to change, and every rule
runs so that one error lists them all."""

from __future__ import annotations

from collections.abc import Callable

from data.config import DataConfigError
from model.config import ModelConfig
from trainer.config.schema import ConfigError, JobConfig, JobDataConfig, JobFeatureConfig


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
    _validate_negative_count(cfg)
    _validate_negatives(m)


def _validate_negative_count(cfg: JobConfig) -> None:
    """The uniform negatives ride one per bag of the batch's item KJT (``data.batch.with_negatives``), whose
    stride is users x padded length: more than ``batch_size * seq_len`` could never be drawn, and used to be
    cut to what fits without a word."""
    m, d = cfg.model, cfg.data
    bags = d.batch_size * d.seq_len
    if d.seq_len > 0 and m.num_negatives > bags:
        raise ConfigError(
            f"model.num_negatives = {m.num_negatives} is more than a batch has bags to carry them "
            f"(data.batch_size x data.seq_len = {d.batch_size} x {d.seq_len} = {bags}, one negative per bag): "
            f"set it to at most {bags}, or raise data.batch_size"
        )


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
