"""Job configuration: typed dataclasses per section (``schema``), loaded from TOML with
``--section.key=value`` overrides (``toml``), checked by cross-field rules (``rules``)."""

from trainer.config.rules import profile_window, require_held_out_targets, require_ranking, validate
from trainer.config.schema import (
    ComputeKernel,
    ConfigError,
    EvalConfig,
    JobConfig,
    JobDataConfig,
    JobFeatureConfig,
    OptimConfig,
    ShardingType,
    TrainConfig,
)
from trainer.config.toml import dump_config, load_config, parse_override

__all__ = [
    "ComputeKernel", "ConfigError", "EvalConfig", "JobConfig", "JobDataConfig", "JobFeatureConfig", "OptimConfig",
    "ShardingType", "TrainConfig", "dump_config", "load_config", "parse_override", "profile_window",
    "require_held_out_targets", "require_ranking", "validate",
]  # fmt: skip
