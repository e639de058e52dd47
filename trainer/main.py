"""Entry point, one process per rank: ``torchrun ... -m trainer.main --config configs/default.toml [--a.b=c ...]``.

Usually started through ``./launch.sh`` (torchx). Exit codes: 0 done, 2 bad config, 3 missing or broken
dependencies, 1 anything else. A failing rank exits non-zero at once, so torchrun stops its peers.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from runtime.logs import setup_logging
from trainer.config import ConfigError, JobConfig, dump_config, load_config

logger = logging.getLogger("trainer")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.main",
        description="Train a sequential recommender. Unknown --section.key=value arguments override the config.",
    )
    parser.add_argument("--config", default="configs/default.toml", help="TOML config file")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config and what the job needs on disk (data files, output folder), print the resolved "
        "config, and exit: 0 ready, 2 not",
    )
    parser.add_argument(
        "--sample-data",
        metavar="DIR",
        help="make the built-in sample data in DIR first if the config reads it (./launch.sh passes its cache)",
    )
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume-from", metavar="PATH", help="continue from this checkpoint folder")
    resume.add_argument(
        "--no-resume", action="store_true", help="start fresh even if output_dir holds checkpoints"
    )
    args, overrides = parser.parse_known_args(argv)
    # The flags are spellings of config keys, so the resolved config records them.
    if args.resume_from:
        overrides.append(f"--train.resume_from={args.resume_from}")
    if args.no_resume:
        overrides.append("--train.resume=false")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        # Logged by every rank, not rank 0 alone: the first rank to exit makes torchrun stop the others,
        # which can kill rank 0 before its message is out.
        logger.error("bad config: %s", e)
        return 2
    if args.sample_data:
        try:
            _make_sample_data_if_read(cfg, Path(args.sample_data))
        except OSError as e:
            logger.error("cannot make the sample data in %s: %s", args.sample_data, e)
            return 1
    if args.check_config:
        return _check(cfg, args.config)

    from trainer.deps import DependencyError, check_dependencies

    try:
        check_dependencies()
    except DependencyError as e:
        logger.error("%s", e)  # every rank, as above
        return 3
    return _run(cfg)


def _check(cfg: JobConfig, source: str) -> int:
    from trainer.preflight import check_training

    faults = check_training(cfg)
    if faults:
        logger.error("cannot start: %s", ConfigError(faults, source))
        return 2
    print(dump_config(cfg), end="")
    return 0


def _make_sample_data_if_read(cfg: JobConfig, folder: Path) -> None:
    """Only a run that reads the sample data makes it: training on other data neither waits for it nor
    announces it."""
    wanted = folder.resolve()
    paths = cfg.data.paths() + cfg.eval_data().paths()
    if any(Path(p).resolve() == wanted for p in paths if "://" not in p):
        from data.sample import ensure_sample_data

        ensure_sample_data(folder)


def _run(cfg: JobConfig) -> int:
    # Imported late: torchrec takes seconds to import, and config errors should not wait for it.
    from trainer.checkpoint import CheckpointError
    from trainer.dist import OutputDirError, destroy_distributed, init_distributed
    from trainer.metrics import NonFiniteLossError
    from trainer.trainer import Trainer

    try:
        ctx = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
        Trainer(cfg, ctx).train()
    except (FileNotFoundError, ValueError, NonFiniteLossError, CheckpointError, OutputDirError) as e:
        # Bad input (data files, values, settings): the message names what to fix; no traceback needed.
        logger.error("%s: %s", type(e).__name__, e)
        return 1
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
