"""Pre-flight checks: what a job needs from the filesystem, checked in a second before any rank starts.

The config check (``load_config``) knows only the values; a missing data folder, a truncated file or an
output folder that cannot be created would otherwise surface after torchx and torchrun have started every
rank, 15-20 s later and buried under their tracebacks. ``./launch.sh`` runs these checks through
``python -m trainer.main --check-config`` and ``python -m trainer.evaluate --check-config``.

Only local paths are checked: a URI (``s3://...``) may need credentials that only the ranks have, and listing
a bucket from the launching host can be slow; the ranks check those at start-up as before. Every fault is
collected, so one run of the check lists everything to fix. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from data.config import DataConfig
from data.fs import scheme_of
from data.units import enumerate_units, list_input_files
from trainer.config import ConfigError, JobConfig, require_ranking

logger = logging.getLogger(__name__)

# Bad files listed one by one before the rest are counted: a folder of 1,000 broken files needs one line.
_MAX_FILE_FAULTS = 5


def check_training(cfg: JobConfig) -> list[str]:
    """Faults of a training job: its data (and evaluation data, if it validates) and its output folder."""
    faults = data_faults(cfg.data, "data.data_paths")
    if cfg.train.evaluates and cfg.eval.data_paths:
        faults += data_faults(cfg.eval_data(), "eval.data_paths")
    faults += output_dir_faults(Path(cfg.train.output_dir), f"train.output_dir = {cfg.train.output_dir!r}")
    if cfg.train.resume_from and not Path(cfg.train.resume_from).is_dir():
        faults.append(f"train.resume_from = {cfg.train.resume_from!r}: no such checkpoint folder")
    return faults


def check_evaluation(cfg: JobConfig, checkpoint: Path, out: Path | None) -> list[str]:
    """Faults of evaluating ``checkpoint`` (already resolved to a step folder) with ``cfg``."""
    faults = []
    try:
        require_ranking(cfg, "evaluation")
    except ConfigError as e:
        # Usually a checkpoint of a config made for training only (configs/default.toml's targets are every
        # feature): the fix is in how it was trained, not in an eval override.
        faults += [
            f"{fault}; a model trained without that cannot be evaluated: train with it, as configs/amazon_games.toml does"
            for fault in e.faults
        ]
    faults += data_faults(cfg.eval_data(), "eval.data_paths" if cfg.eval.data_paths else "data.data_paths")
    # The metrics JSON goes to --out, else into the checkpoint folder.
    if out is not None:
        faults += output_dir_faults(out.parent, f"--out {out}")
    else:
        faults += output_dir_faults(checkpoint, f"--checkpoint {checkpoint}")
    return faults


def data_faults(cfg: DataConfig, key: str) -> list[str]:
    """Each local data path exists, holds ORC/Parquet files, and every file's footer and columns are usable."""
    faults: list[str] = []
    files = []
    for raw in cfg.paths():
        if scheme_of(raw) not in ("", "file"):
            logger.debug("pre-flight: %s is not local; the ranks check it", raw)
            continue
        try:
            files += list_input_files(dataclasses.replace(cfg, data_paths=[raw]))
        except (OSError, ValueError) as e:
            faults.append(f"{key}: {e}")
    bad = []
    for file in files:
        try:
            enumerate_units([file], cfg.features, cfg.time_feature)
        except (OSError, ValueError) as e:
            bad.append(f"{key}: {e}")
    faults += bad[:_MAX_FILE_FAULTS]
    if len(bad) > _MAX_FILE_FAULTS:
        faults.append(f"{key}: and {len(bad) - _MAX_FILE_FAULTS} more files like these")
    return faults


def output_dir_faults(path: Path, label: str) -> list[str]:
    """``path`` is a folder that exists and takes files, or one that can be created; ``label`` names the setting."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        # A regular file in the way: the folder (or one above it) cannot be made.
        what = "is a file, not a folder" if existing == path else f"cannot be created: {existing} is a file"
        return [f"{label}: {path} {what}"]
    try:
        # A probe file, not os.access: access() says yes to root on a read-only mount.
        with tempfile.TemporaryFile(dir=existing, prefix=".seqrec-write-check-"):
            pass
    except OSError as e:
        verb = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        return [f"{label}: {path} {verb} ({e.strerror or e})"]
    return []
