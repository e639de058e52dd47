"""``python -m trainer.evaluate --config CONFIG --checkpoint PATH [--eval.split=test ...]``: leave-one-out
metrics of a checkpoint (``trainer/evaluator.py``), one process or one per rank (usually through
``./launch.sh eval CONFIG --checkpoint PATH``, torchx). Exit codes: 0 done, 2 bad config, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from runtime.logs import setup_logging
from trainer.build import build_train_module
from trainer.checkpoint import MARKER, CheckpointManager, complete_checkpoints
from trainer.config import ConfigError, JobConfig, load_config, require_ranking
from trainer.dist import destroy_distributed, init_distributed
from trainer.evaluator import EvalResult, Evaluator
from trainer.sharding import shard_model

logger = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description=(
            "Evaluate a checkpoint (leave-one-out, test split unless --eval.split=valid). Unknown "
            "--section.key=value arguments override the config, e.g. --eval.protocol=sampled."
        ),
    )
    parser.add_argument("--config", required=True, help="TOML config the checkpoint was trained with")
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint folder (output_dir/step_N), or a run's output_dir: its best checkpoint"
    )
    parser.add_argument(
        "--out", help="write the metrics as JSON here (default: CHECKPOINT/eval_<split>_<protocol>.json)"
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        # The test split unless the command line says otherwise (later overrides win).
        cfg = load_config(args.config, ["--eval.split=test", *overrides])
        require_ranking(cfg, "evaluation")
    except ConfigError as e:
        if is_rank0:
            logger.error("bad config: %s", e)
        return 2
    try:
        checkpoint = resolve_checkpoint(Path(args.checkpoint))
        result = _evaluate_checkpoint(cfg, checkpoint)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 1
    if is_rank0:
        out = Path(args.out) if args.out else checkpoint / f"eval_{cfg.eval.split}_{cfg.eval.protocol}.json"
        out.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(json.dumps(result.metrics))
        logger.info("wrote %s", out)
    return 0


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder as given, or for a run's output folder its best checkpoint (``best.json``, written
    by validation during training), else its latest complete one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint: folder {path} does not exist")
    if (path / MARKER).is_file():
        return path
    best = path / "best.json"
    if best.is_file():
        record = json.loads(best.read_text())
        if record.get("checkpoint"):
            chosen = Path(record["checkpoint"])
            logger.info("%s: the best checkpoint by %s (%.4f at step %s): %s", path, record.get("metric"),
                        record.get("value", float("nan")), record.get("step"), chosen)  # fmt: skip
            return chosen
    done = complete_checkpoints(path)
    if not done:
        raise FileNotFoundError(f"--checkpoint: {path} is neither a checkpoint nor a run folder holding one")
    logger.info("%s: no best checkpoint marked; evaluating the latest, %s", path, done[-1])
    return done[-1]


def _evaluate_checkpoint(cfg: JobConfig, checkpoint: Path) -> EvalResult:
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint: folder {checkpoint} does not exist")
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
