"""Checkpoints: ``torch.distributed.checkpoint`` for sharded state, written atomically, found again on restart.

Layout of ``output_dir/step_<N>/``:

- DCP files: the model (sharded embedding tables, dense weights) and the optimizer (fused sparse states,
  AdamW states), resharded on load when the world size or sharding plan differs;
- ``rank_<r>.pt``: what is private to each rank: RNG states, the data reader's position and the state of its
  managed-collision shards that their state dict lacks (ids awaiting the next admission round, the round
  schedule, the admission/eviction counters: ``model.sparse.managed_collision_state``);
- ``meta.json``: step, world size, the LR schedule's state, and the shapes that must match on load;
- ``config.toml``: the resolved config of the run that wrote it;
- ``COMPLETE``: written last. A folder is only ever renamed to ``step_<N>`` after it exists, so a
  half-written checkpoint (a crash, a full disk) is never picked up.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer.config import JobConfig, dump_config
from trainer.dist import DistContext, OutputDirError, agree, naming_output_dir, on_every_rank, os_reason
from trainer.run_folder import BEST_FILE, MARKER, complete_checkpoints

logger = logging.getLogger(__name__)

# Key of the managed-collision state in rank_<r>.pt (absent in checkpoints written before it was saved).
MC_STATE = "managed_collisions"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written, or does not fit this run; the message says which and why.
    (A write that fails on an OSError, e.g. a full disk, is an OutputDirError, naming train.output_dir.)"""


def first_failure(error: BaseException, rank: int = 0) -> tuple[int, BaseException]:
    """The rank that failed and its error: for DCP's CheckpointException (every rank's failures, with their
    tracebacks, in its text) the first failed rank and its exception, else ``rank`` and ``error``."""
    if isinstance(error, CheckpointException) and error.failures:
        failed = min(error.failures)
        failure = error.failures[failed]
        return failed, failure[0] if isinstance(failure, tuple) else failure
    return rank, error


def describe(error: BaseException, path: Path | None = None) -> str:
    """One line on ``error``: an OSError's reason and file (unless it is ``path``), else its type and message."""
    _, error = first_failure(error)
    if isinstance(error, OSError):
        return os_reason(error, path)
    return f"{type(error).__name__}: {error}"


@dataclass
class Restored:
    step: int
    path: Path
    meta: dict[str, Any]
    # None when the checkpoint was written by another number of ranks: per-rank state does not map.
    rank_state: dict[str, Any] | None
    # The config key that chose the checkpoint, as error messages start ("train.resume_from = PATH: "), or "".
    source: str = ""


def signature(cfg: JobConfig) -> dict[str, Any]:
    """Everything whose change makes saved tensors unusable: table shapes and the dense model's sizes."""
    tables: dict[str, dict[str, Any]] = {}
    for f in cfg.data.features:
        table = tables.setdefault(f.table, {"rows": f.table_rows, "emb_dim": f.emb_dim, "features": []})
        table["features"].append(f.name)
    m = cfg.model
    dense = {k: getattr(m, k) for k in ("hidden_size", "num_layers", "nhead", "dim_feedforward", "emb_size")}
    return {"tables": tables, "model": dense}


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    saved_tables, tables = saved["tables"], current["tables"]
    for name in sorted(set(saved_tables) | set(tables)):
        if name not in tables:
            diffs.append(f"table {name!r} is in the checkpoint but not in the config")
        elif name not in saved_tables:
            diffs.append(f"table {name!r} is in the config but not in the checkpoint")
        else:
            for key in ("rows", "emb_dim", "features"):
                if saved_tables[name][key] != tables[name][key]:
                    diffs.append(
                        f"table {name!r} {key}: {saved_tables[name][key]} in the checkpoint, {tables[name][key]} now"
                    )
    for key, value in current["model"].items():
        if saved["model"].get(key) != value:
            diffs.append(f"model.{key}: {saved['model'].get(key)} in the checkpoint, {value} now")
    return diffs


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, output_dir: Path, ctx: DistContext, max_to_keep: int) -> None:
        self.output_dir = output_dir
        self.ctx = ctx
        self.max_to_keep = max_to_keep
        # A checkpoint pruning must leave alone (the best one by the validation metric).
        self.keep: Path | None = None

    # ------------------------------------------------------------------------------------------ finding

    def complete_checkpoints(self) -> list[Path]:
        """Complete ``step_<N>`` folders, oldest first."""
        return complete_checkpoints(self.output_dir)

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    # ------------------------------------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        app_state: dict[str, Any],
        rank_state: dict[str, Any],
        meta: dict[str, Any],
        cfg: JobConfig,
    ) -> Path:
        """Write ``step_<step>`` collectively; every rank must call this at the same step."""
        final = self.output_dir / f"step_{step}"
        tmp = self.output_dir / f".tmp_step_{step}"
        start = time.perf_counter()

        def prepare() -> None:
            if self.ctx.is_main:
                if tmp.is_dir():
                    shutil.rmtree(tmp)  # left by a run that died while writing
                tmp.mkdir(parents=True)

        def write() -> None:
            dcp.save(app_state, checkpoint_id=str(tmp))
            torch.save(rank_state, tmp / f"rank_{self.ctx.rank}.pt")

        def publish() -> None:
            if not self.ctx.is_main:
                return
            full_meta = {**meta, "step": step, "world_size": self.ctx.world_size, "signature": signature(cfg)}
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1))
            (tmp / "config.toml").write_text(dump_config(cfg))
            (tmp / MARKER).write_text(f"step {step}\n")
            if final.exists():
                shutil.rmtree(final)  # an older copy of the same step (a rerun of the same steps)
            tmp.rename(final)

        for what, phase in (("prepare", prepare), ("write", write), ("publish", publish)):
            self._collectively(what, final, phase)
        if self.ctx.is_main:
            logger.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - start)
            self._prune()
        return final

    def _collectively(self, what: str, path: Path, phase: Callable[[], None]) -> None:
        """Run one phase on every rank; if it fails anywhere, every rank raises the failed rank's error (none
        is left waiting): an OutputDirError for an OSError (a full disk, a file in the way), else a
        CheckpointError. One all-reduce of one integer per phase when all is well."""
        error: Exception | None = None
        try:
            phase()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure: report it, keep older ones
            # A failure inside dcp.save reaches every rank already, through DCP's own collectives.
            failed_rank, cause = first_failure(e, self.ctx.rank)
            on_rank = f" on rank {failed_rank}" if self.ctx.world_size > 1 and what == "write" else ""
            message = (
                f"train.output_dir = {self.output_dir}: writing checkpoint {path} failed ({what}{on_rank}): "
                f"{describe(cause)}; earlier checkpoints are untouched"
            )
            error = OutputDirError(message) if isinstance(cause, OSError) else CheckpointError(message)
            error.__cause__ = cause
        agree(self.ctx, error)

    def _prune(self) -> None:
        """Remove the oldest checkpoints past max_to_keep (rank 0). A failure only warns: the new checkpoint
        is complete, and the other ranks have already gone on."""
        if self.max_to_keep <= 0:
            return
        try:
            done = self.complete_checkpoints()
        except OSError as e:
            logger.warning("train.output_dir = %s: cannot list old checkpoints to prune (%s)", self.output_dir,
                           os_reason(e))  # fmt: skip
            return
        for old in done[: -self.max_to_keep]:
            if self.keep is not None and old.resolve() == self.keep.resolve():
                continue  # the best checkpoint stays, on top of the max_to_keep newest
            try:
                # The marker goes first: a prune cut short leaves an incomplete folder, never a broken "complete"
                # one.
                (old / MARKER).unlink(missing_ok=True)
            except OSError as e:
                logger.warning("train.output_dir = %s: cannot remove old checkpoint %s (%s); it stays",
                               self.output_dir, old, os_reason(e))  # fmt: skip
                continue
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed old checkpoint %s (max_to_keep %d)", old, self.max_to_keep)

    # ------------------------------------------------------------------------------------------ loading

    @staticmethod
    def read_meta(path: Path, cfg: JobConfig, source: str = "") -> dict[str, Any]:
        """The checkpoint's metadata, after checking it is complete and fits ``cfg``. ``source``: what error
        messages start with (``source_of``)."""
        if not (path / MARKER).is_file():
            raise CheckpointError(f"{source}{path} is not a complete checkpoint (no {MARKER} marker)")
        file = path / "meta.json"
        try:
            meta = json.loads(file.read_text())
            saved_signature = meta["signature"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{source}cannot read checkpoint metadata {file} ({describe(e, file)})") from e
        diffs = signature_differences(saved_signature, signature(cfg))
        if diffs:
            # Resuming the latest checkpoint of train.output_dir is automatic: say how not to.
            hint = "; to start a new run instead, pick another train.output_dir or pass --no-resume"
            raise CheckpointError(
                f"{source}checkpoint {path} does not fit this config: " + "; ".join(diffs)
                + (hint if source.startswith("train.output_dir") else "")
            )
        return meta

    def source_of(self, key: str | None, path: Path) -> str:
        """How errors about checkpoint ``path`` start: the config key that chose it and its value, e.g.
        ``train.resume_from = PATH: ``, or nothing for ``None`` (a caller with no such key: the CLIs)."""
        if key is None:
            return ""
        value = self.output_dir if key == "train.output_dir" else path
        return f"{key} = {value}: "

    def load(self, path: Path, app_state: dict[str, Any], cfg: JobConfig, key: str | None = None) -> Restored:
        """Load ``path`` into ``app_state`` in place (DCP reshards to this run's plan and world size). ``key``:
        the config key that chose ``path`` (``train.resume_from``, or ``train.output_dir`` for its latest
        checkpoint), named by error messages. A file that a rank cannot read stops every rank."""
        source = self.source_of(key, path)
        meta = on_every_rank(self.ctx, lambda: self.read_meta(path, cfg, source))
        check_managed_collision_world(path, meta["world_size"], self.ctx.world_size, cfg)
        start = time.perf_counter()
        try:
            dcp.load(app_state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises on every rank alike
            raise CheckpointError(f"{source}cannot read checkpoint {path} ({describe(e)})") from first_failure(e)[1]
        rank_state = None
        if meta["world_size"] == self.ctx.world_size:
            rank_state = on_every_rank(self.ctx, lambda: read_rank_state(path, self.ctx.rank, source))
        if self.ctx.is_main:
            logger.info("loaded checkpoint %s (step %d) in %.2fs", path, meta["step"], time.perf_counter() - start)
        return Restored(step=int(meta["step"]), path=path, meta=meta, rank_state=rank_state, source=source)


def read_rank_state(path: Path, rank: int, source: str = "") -> dict[str, Any]:
    """``rank_<rank>.pt`` of checkpoint ``path``; CheckpointError naming the file if it cannot be read."""
    file = path / f"rank_{rank}.pt"
    try:
        state: dict[str, Any] = torch.load(file, weights_only=False)
    except Exception as e:  # noqa: BLE001 - missing, unreadable, truncated: all say which file
        raise CheckpointError(f"{source}cannot read checkpoint {file} ({describe(e, file)})") from e
    return state


def check_managed_collision_world(path: Path, saved_world: int, world: int, cfg: JobConfig) -> None:
    """A managed-collision table's shard owns both a range of rows and the ids routed to it (a range of the id
    space), so a new shard must be whole old shards: TorchRec merges them, it cannot split one. Hence fewer
    ranks, by a whole factor (4 -> 2, 2 -> 1), and never more."""
    managed = sorted({f.table for f in cfg.data.features if f.managed_collision})
    if managed and saved_world % world:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_world} ranks; its managed-collision tables {managed} load only "
            f"on a number of ranks that divides {saved_world} (each new shard merges whole old ones), not on {world}"
        )


def managed_collision_rank_state(restored: Restored, rank: int) -> dict[str, Any] | None:
    """This rank's managed-collision state to restore (``model.sparse.load_managed_collision_state``).

    Same world size: the rank's own, so the resume is exact. Another world size: the id -> slot mapping comes
    resharded from DCP, ids still waiting for an admission round are dropped, the round schedule restarts,
    and rank 0 takes the counters of all old ranks so that the logged totals go on. ``None`` when there is
    nothing (a checkpoint written before this state was saved: counters restart at zero, with a warning).
    """
    if restored.rank_state is not None:
        state = restored.rank_state.get(MC_STATE)
        if state is None and rank == 0:  # every rank's file lacks it alike: one warning
            logger.warning(
                "checkpoint %s holds no managed-collision counters or pending ids (written by an older version): the "
                "id -> slot mapping is restored, counters restart at zero, admission rounds restart at this step",
                restored.path,
            )
        return state
    if rank != 0:
        return None
    logger.warning(
        "managed-collision tables resharded from %d ranks: ids waiting for an admission round are dropped and "
        "the round schedule restarts; rank 0 carries on the old ranks' admission/eviction counters",
        restored.meta["world_size"],
    )
    merged: dict[str, dict[str, Any]] = {}
    for old_rank in range(int(restored.meta["world_size"])):
        saved = read_rank_state(restored.path, old_rank, restored.source).get(MC_STATE) or {}
        for name, shard in saved.items():
            total = merged.setdefault(name, {"admitted_total": 0, "evicted_total": 0, "rounds_with_evictions": 0})
            total["admitted_total"] += shard["admitted_total"]
            total["evicted_total"] += shard["evicted_total"]
            total["rounds_with_evictions"] = max(total["rounds_with_evictions"], shard["rounds_with_evictions"])
    for total in merged.values():
        total["last_eviction_iter"] = -1  # counters only: no pending ids, TorchRec restarts the round schedule
    return merged or None


class BestCheckpoint:
    """Tracks the best validation value (higher is better: every metric here is) and marks it in
    ``output_dir/best.json``, which survives restarts."""

    def __init__(self, output_dir: Path, metric: str) -> None:
        self.output_dir = output_dir
        self.file = output_dir / BEST_FILE
        self.metric = metric
        self.value = -math.inf
        self.path: Path | None = None
        self.step: int | None = None
        if self.file.is_file():
            try:
                saved = json.loads(self.file.read_text())
                if saved.get("metric") == metric:
                    self.value = float(saved["value"])
                    self.path = Path(saved["checkpoint"]) if saved.get("checkpoint") else None
                    self.step = int(saved["step"]) if "step" in saved else None
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                reason = describe(e, self.file)
                raise CheckpointError(
                    f"train.output_dir = {output_dir}: cannot read {self.file} ({reason}); fix or remove it"
                ) from e

    def improves(self, value: float) -> bool:
        return value > self.value

    def mark(self, step: int, value: float, checkpoint: Path | None) -> None:
        self.value, self.path, self.step = value, checkpoint, step
        record = {"metric": self.metric, "value": value, "step": step, "checkpoint": str(checkpoint or "")}
        tmp = self.file.with_suffix(".tmp")
        with naming_output_dir(self.output_dir, "write", self.file):
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(self.file)  # atomic: a reader never sees half a file
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (train.save_steps = 0)"
        logger.info("new best %s %.4f at step %d: %s", self.metric, value, step, where)
