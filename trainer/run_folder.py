"""What a run's output folder holds, and how to find a checkpoint in it, without importing torch.

``train.output_dir`` holds ``step_<N>/`` checkpoints (complete once their ``COMPLETE`` marker exists; each
with the ``config.toml`` of the run that wrote it), ``best.json`` (the checkpoint validation liked best)
and the logs. The writing side is ``trainer/checkpoint.py``; this module is the reading side that the
pre-flight check and the evaluation CLI share, kept light so that a typo in a path is reported in a second.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")
# The resolved config of the run that wrote a checkpoint, in the checkpoint folder.
CONFIG_FILE = "config.toml"
BEST_FILE = "best.json"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``step_<N>`` folders of a run's output folder, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / MARKER).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike[str], quiet: bool = False) -> Path:
    """A checkpoint folder as given, or for a run's output folder its best checkpoint (``best.json``, written
    by validation during training), else its latest complete one. ``quiet``: do not log which one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint: folder {path} does not exist")
    if (path / MARKER).is_file():
        return path
    log = logger.debug if quiet else logger.info
    best = _best_checkpoint(path)
    if best is not None:
        chosen, record = best
        log("%s: the best checkpoint by %s (%.4f at step %s): %s", path, record.get("metric"),
            record.get("value", float("nan")), record.get("step"), chosen)  # fmt: skip
        return chosen
    done = complete_checkpoints(path)
    if not done:
        if STEP_DIR.match(path.name):
            raise FileNotFoundError(f"--checkpoint: {path} is not a complete checkpoint (no {MARKER} marker)")
        raise FileNotFoundError(f"--checkpoint: {path} is neither a checkpoint nor a run folder holding one")
    log("%s: no best checkpoint marked; evaluating the latest, %s", path, done[-1])
    return done[-1]


def _best_checkpoint(run: Path) -> tuple[Path, dict] | None:
    try:
        record = json.loads((run / BEST_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"--checkpoint: cannot read {run / BEST_FILE}: {exc}") from exc
    if not record.get("checkpoint"):
        return None
    chosen = Path(record["checkpoint"])
    if not (chosen / MARKER).is_file():
        raise FileNotFoundError(
            f"--checkpoint: {run / BEST_FILE} names {chosen}, which is not a complete checkpoint (moved or deleted?); "
            "name a step_N folder instead"
        )
    return chosen, record


def checkpoint_config(checkpoint: Path) -> Path:
    """The config a checkpoint was trained with (its own ``config.toml``), for evaluating it without one."""
    config = checkpoint / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint} has no {CONFIG_FILE} (written by older versions?); name the config it was "
            "trained with: ./launch.sh eval CONFIG.toml --checkpoint ..."
        )
    return config
