"""``python -m trainer.evaluate --checkpoint PATH [--config CONFIG] [--eval.split=test ...]``: leave-one-out
metrics of a checkpoint (``trainer/evaluator.py``), one process or one per rank (usually through
``./launch.sh eval [CONFIG] --checkpoint PATH``, torchx). Without ``--config`` the checkpoint is evaluated with
the config it was trained with (its ``config.toml``). Exit codes: 0 done, 2 bad config or input, 1 anything
else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.logs import setup_logging
from trainer.config import ConfigError, JobConfig, load_config, require_ranking
from trainer.run_folder import checkpoint_config, resolve_checkpoint

if TYPE_CHECKING:
    from trainer.evaluator import EvalResult

# Named, not __name__: run as `python -m trainer.evaluate` it would be "__main__", outside our INFO loggers.
logger = logging.getLogger("trainer.evaluate")

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description=(
            "Evaluate a checkpoint (leave-one-out, test split unless --eval.split=valid). Unknown "
            "--section.key=value arguments override the config, e.g. --eval.protocol=sampled."
        ),
    )
    parser.add_argument(
        "--config", help="TOML config (default: the one the checkpoint was trained with, CHECKPOINT/config.toml)"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint folder (output_dir/step_N), or a run's output_dir: its best checkpoint"
    )
    parser.add_argument(
        "--out", help="write the metrics as JSON here (default: CHECKPOINT/eval_<split>_<protocol>.json)"
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the config, the checkpoint and the data, without evaluating: exit 0 ready, 2 not",
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        checkpoint, config = _checkpoint_and_config(args, quiet=args.check_config or not is_rank0)
        # The test split unless the command line says otherwise (later overrides win).
        cfg = load_config(config, ["--eval.split=test", *overrides])
    except (ConfigError, FileNotFoundError) as e:
        # Logged by every rank: the first to exit makes torchrun stop the others, rank 0 perhaps before it
        # has said why.
        logger.error("bad config: %s", e)
        return 2
    if args.check_config:
        return _check(cfg, config, checkpoint, args.out)
    try:
        require_ranking(cfg, "evaluation")
    except ConfigError as e:
        logger.error("bad config: %s: %s", config, e)
        return 2
    if is_rank0:
        _warn_if_trained_on_targets(cfg)
    try:
        result = _evaluate_checkpoint(cfg, checkpoint)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 1
    if is_rank0:
        _report(result, Path(args.out) if args.out else checkpoint / f"eval_{cfg.eval.split}_{cfg.eval.protocol}.json")
    return 0


def _checkpoint_and_config(args: argparse.Namespace, quiet: bool) -> tuple[Path, Path]:
    """The step folder to evaluate (a run folder's best or latest) and the config: ``--config``, else the one
    saved in the checkpoint."""
    checkpoint = resolve_checkpoint(args.checkpoint, quiet=quiet)
    if args.config:
        return checkpoint, Path(args.config)
    config = checkpoint_config(checkpoint)
    if not quiet:
        logger.info("config: %s (the checkpoint's own; --config to use another)", config)
    return checkpoint, config


def _check(cfg: JobConfig, config: Path, checkpoint: Path, out: str | None) -> int:
    from trainer.preflight import check_evaluation

    faults = check_evaluation(cfg, checkpoint, Path(out) if out else None)
    if faults:
        logger.error("cannot evaluate: %s", ConfigError(faults, config))
        return 2
    return 0


def _warn_if_trained_on_targets(cfg: JobConfig) -> None:
    # Leave-one-out targets are the last two items of each user: a run that kept them (holdout_positions < 2)
    # has trained on what it is now scored on, so the numbers measure memorisation, not recommendation.
    if cfg.data.holdout_positions < 2 and not cfg.eval.data_paths:
        logger.warning(
            "data.holdout_positions = %d: this model was trained on the %s targets it is scored on, so the metrics "
            "overstate its quality; train with data.holdout_positions = 2 (leave-one-out) for honest numbers",
            cfg.data.holdout_positions, cfg.eval.split,
        )  # fmt: skip


def _report(result: EvalResult, out: Path) -> None:
    out.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    # One JSON line on stdout for scripts; like every printout it names the split and the protocol.
    print(json.dumps({"split": result.split, "protocol": result.protocol, **result.metrics}))
    logger.info("wrote %s", out)


def _evaluate_checkpoint(cfg: JobConfig, checkpoint: Path) -> EvalResult:
    # Imported here: torch and torchrec take seconds to import, and the checks above should not wait for them.
    from trainer.build import build_train_module
    from trainer.checkpoint import CheckpointManager
    from trainer.dist import destroy_distributed, init_distributed
    from trainer.evaluator import Evaluator
    from trainer.sharding import shard_model

    ctx = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    try:
        dmp = shard_model(build_train_module(cfg), cfg, ctx)
        # Only the model: the optimizer state in the checkpoint is not needed to evaluate.
        state = {"model": dmp.state_dict()}
        CheckpointManager(checkpoint.parent, ctx, max_to_keep=0).load(checkpoint, state, cfg)
        dmp.load_state_dict(state["model"])
        return Evaluator(cfg, ctx, dmp).run()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
