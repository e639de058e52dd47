"""The training loop: build on meta -> plan -> DMP -> ``TrainPipelineSparseDist`` over the reader.

``Trainer.train_step`` is one optimisation step and nothing else; ``Trainer.train`` is the loop around it
(logging, checkpoints, evaluation, the end of the data). The training benchmark drives the same
``train_step`` on in-memory batches.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from data.batch import SequenceBatch, negatives_key
from data.reader import SequenceReader
from model.next_item import NextItemOutput
from model.sparse import load_managed_collision_state, managed_collision_state, managed_collision_stats
from trainer.build import build_train_module
from trainer.checkpoint import (
    MC_STATE,
    BestCheckpoint,
    CheckpointManager,
    managed_collision_rank_state,
    rng_state,
    set_rng_state,
)
from trainer.compile import compile_transformer
from trainer.config import JobConfig, dump_config
from trainer.dist import DistContext, make_output_dir, naming_output_dir, on_every_rank, on_main
from trainer.evaluator import EvalResult, Evaluator, write_result
from trainer.feed import NegativeSampler, StepAlignedBatches
from trainer.metrics import MetricLogger
from trainer.optim import build_optimizer, build_scheduler, restore_schedule
from trainer.profiling import StepProfiler
from trainer.sharding import shard_model
from trainer.tensorboard import TensorBoardLog, dense_grad_norm, learning_rates

logger = logging.getLogger(__name__)


def seed_everything(seed: int, rank: int) -> None:
    # Per rank, so dropout masks differ between ranks; dense weights are made equal by DDP's broadcast.
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(seed + rank)


@dataclass
class _Run:
    """Where one call of ``Trainer.train`` stands: steps trained in it, and the steps of the latest checkpoint
    and evaluation (so the end of the run does not repeat them)."""

    start: int
    trained: int = 0
    saved_at: int = 0
    evaluated_at: int = 0
    # Early stopping: the validation metric stopped improving (train.early_stop_patience).
    stop: bool = False


class Trainer:
    def __init__(self, cfg: JobConfig, ctx: DistContext, batches: Iterable[SequenceBatch] | None = None) -> None:
        """``batches``: train on these instead of ``cfg.data``'s files (benchmarks; no checkpoints then)."""
        self.cfg, self.ctx = cfg, ctx
        seed_everything(cfg.train.seed, ctx.rank)
        self.output_dir = Path(cfg.train.output_dir)
        self._write_resolved_config()

        # The reader first: it checks every input file's schema, so bad input fails before the slow part.
        self.reader: SequenceReader | Iterable[SequenceBatch] = (
            SequenceReader(cfg.data, rank=ctx.rank, world_size=ctx.world_size, epochs=cfg.train.train_epochs)
            if batches is None
            else batches
        )
        # Built on meta: no rank ever allocates a full table; DMP materialises only its own shards.
        self.eval_interval, schedule_steps = self._step_counts()
        self.model = shard_model(build_train_module(cfg), cfg, ctx)
        compile_transformer(self.model, cfg.model, ctx.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, schedule_steps)
        self.checkpoints = CheckpointManager(self.output_dir, ctx, cfg.train.max_to_keep)
        self.step = 0
        self._restore()
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, ctx.device)
        # Read by every rank (each needs the best value so far): a file one rank cannot read stops them all.
        self.best = on_every_rank(ctx, lambda: BestCheckpoint(self.output_dir, cfg.eval.best_metric))
        self.checkpoints.keep = self.best.path
        self.batches = StepAlignedBatches(self.reader, ctx, self._negative_sampler())
        t = cfg.train
        self.metrics = MetricLogger(
            ctx, self.output_dir, t.train_steps, t.progress_bar, self.step, expected_steps=self._expected_steps()
        )
        self.tensorboard = TensorBoardLog(self.output_dir, ctx, t.tensorboard)

    def _step_counts(self) -> tuple[int, int]:
        """(steps between evaluations, steps the LR schedule spans), converting epoch-based settings with
        the reader's estimate of an epoch (logged, so a recipe's epochs can be read as steps)."""
        t = self.cfg.train
        needs_epoch = bool(t.eval_epochs) or (self.cfg.optim.lr_decay != "constant" and not t.train_steps)
        if not needs_epoch:
            return t.eval_steps, t.train_steps
        if not isinstance(self.reader, SequenceReader):
            raise ValueError("train.eval_epochs and epoch-long LR schedules need a SequenceReader's epoch estimate")
        epoch = self.reader.estimated_batches_per_epoch()
        interval = t.eval_steps or max(1, round(t.eval_epochs * epoch))
        schedule = t.train_steps or t.train_epochs * epoch
        if self.ctx.is_main:
            logger.info(
                "an epoch is about %d steps (the files' %d rows over %d ranks, batch %d): evaluating every %s, "
                "LR schedule over %d steps", epoch, self.reader.total_rows, self.ctx.world_size,
                self.cfg.data.batch_size, f"{interval} steps" if interval else "- (never)", schedule,
            )  # fmt: skip
        return interval, schedule

    def _expected_steps(self) -> int:
        """The step the run should end at, for the progress bar's ETA: train.train_steps, or sooner the end of
        train.train_epochs by the reader's estimate of an epoch (0 = unknown)."""
        t = self.cfg.train
        if not t.train_epochs or not isinstance(self.reader, SequenceReader):
            return t.train_steps
        epochs = t.train_epochs * self.reader.estimated_batches_per_epoch()
        return min(t.train_steps, epochs) if t.train_steps else epochs

    def _write_resolved_config(self) -> None:
        """Rank 0 makes output_dir and writes config.toml into it. Other ranks may read from output_dir later,
        so all wait for it; a folder that cannot be made stops every rank with the same message."""

        def write() -> None:
            make_output_dir(self.output_dir)
            file = self.output_dir / "config.toml"
            with naming_output_dir(self.output_dir, "write", file):
                file.write_text(dump_config(self.cfg))

        on_main(self.ctx, write)

    # ------------------------------------------------------------------------------------ checkpoints

    def _app_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def _resume_path(self) -> tuple[Path, str] | None:
        """The checkpoint to resume from and the config key that chose it."""
        cfg = self.cfg.train
        if cfg.resume_from:
            path = Path(cfg.resume_from)
            if not path.is_dir():
                raise FileNotFoundError(f"train.resume_from: checkpoint folder {path} does not exist")
            return path, "train.resume_from"
        latest = self.checkpoints.latest() if cfg.resume else None
        return (latest, "train.output_dir") if latest is not None else None

    def _restore(self) -> None:
        found = self._resume_path()
        if found is None:
            return
        path, key = found
        # Optimizer states are created lazily; they must exist to be loaded into in place.
        self.optimizer.init_state()
        state = self._app_state()
        restored = self.checkpoints.load(path, state, self.cfg, key=key)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if any(f.managed_collision for f in self.cfg.data.features):
            # Rank 0 alone reads every old rank's file when the world size changed: all ranks agree it could.
            mc_state = on_every_rank(self.ctx, lambda: managed_collision_rank_state(restored, self.ctx.rank))
            # After the state dict: the mapping it loads decides the free slots the counters start from.
            load_managed_collision_state(self.model, mc_state)
        self.step = restored.step
        # fbgemm's fused row-wise Adam counts its bias-correction steps itself and does not keep the counter
        # in its optimizer state: set it back, or the first steps after a resume would overshoot.
        self.optimizer.set_optimizer_step(self.step)
        restore_schedule(self.scheduler, self.step)
        if restored.rank_state is None:
            logger.warning(
                "checkpoint %s was written by %d ranks, this run has %d: model and optimizer are resharded, "
                "but the data reader starts from the beginning and RNG streams start fresh",
                path,
                restored.meta["world_size"],
                self.ctx.world_size,
            )
        elif isinstance(self.reader, SequenceReader):
            self.reader.load_state_dict(restored.rank_state["reader"])
            set_rng_state(restored.rank_state["rng"])
        if self.ctx.is_main:
            logger.info("resumed from %s at step %d", path, self.step)

    def _save(self, run: _Run) -> None:
        # Never write a checkpoint after a non-finite loss: the last complete one stays the one to go back to.
        self.metrics.raise_if_nonfinite()
        rank_state = {
            "rng": rng_state(),
            "reader": self.batches.reader_state(run.trained),
            MC_STATE: managed_collision_state(self.model),
        }
        self.checkpoints.save(self.step, self._app_state(), rank_state, {}, self.cfg)
        run.saved_at = self.step

    def _evaluate(self, run: _Run) -> None:
        """Validation metrics now; a new best is checkpointed (if checkpoints are on) and marked; no new best
        for ``train.early_stop_patience`` evaluations stops the run."""
        # The pipeline is empty here (StepAlignedBatches paused at this step, so it trained what it held);
        # evaluation calls the sparse modules directly, so their own forward goes back in place. The
        # next progress() attaches the model again and refills the pipeline.
        self.pipeline.detach()
        result = Evaluator(self.cfg, self.ctx, self.model).run()
        run.evaluated_at = self.step
        self.metrics.pause(result.seconds)
        on_main(self.ctx, lambda: self._write_eval(result))
        self.tensorboard.evaluation(self.step, result)
        value = result.metrics[self.cfg.eval.best_metric]
        if not self.best.improves(value):
            self._check_patience(run)
            return
        if (self.cfg.train.save_steps or self.cfg.train.save_best) and run.saved_at != self.step:
            self._save(run)
        checkpoint = self.checkpoints.output_dir / f"step_{self.step}" if run.saved_at == self.step else None
        on_main(self.ctx, lambda: self.best.mark(self.step, value, checkpoint))
        if not self.ctx.is_main:
            self.best.value, self.best.step = value, self.step
        self.checkpoints.keep = self.best.path

    def _write_eval(self, result: EvalResult) -> None:
        """One line of eval.jsonl (rank 0)."""
        with naming_output_dir(self.output_dir, "write", self.output_dir / "eval.jsonl"):
            write_result(self.output_dir, self.step, result)

    def _check_patience(self, run: _Run) -> None:
        """Counted from the best's step (kept in best.json), so a resumed run stops where an uninterrupted
        one would. Every rank sees the same metrics, so all stop at the same step."""
        patience = self.cfg.train.early_stop_patience
        if not patience or self.best.step is None:
            return
        if self.step - self.best.step >= patience * self.eval_interval:
            run.stop = True
            if self.ctx.is_main:
                logger.info(
                    "early stop at step %d: %s has not improved for %d evaluations (best %.4f at step %d)",
                    self.step, self.cfg.eval.best_metric, patience, self.best.value, self.best.step,
                )  # fmt: skip

    def _log_managed_collisions(self) -> None:
        """Ids admitted to and evicted from bucket-0 (managed-collision) tables, summed over ranks."""
        stats = managed_collision_stats(self.model)  # same tables in the same order on every rank
        if not stats:
            return
        totals = torch.tensor([n for pair in stats.values() for n in pair], dtype=torch.long)
        dist.all_reduce(totals, group=self.ctx.control_group)
        if self.ctx.is_main:
            pairs = {t: (int(totals[2 * i]), int(totals[2 * i + 1])) for i, t in enumerate(stats)}
            parts = [f"{t} {admitted:,} admitted, {evicted:,} evicted" for t, (admitted, evicted) in pairs.items()]
            logger.info("managed collisions (all ranks): %s", "; ".join(parts))
            self.tensorboard.managed_collisions(self.step, pairs)

    # ---------------------------------------------------------------------------------------- the loop

    def train_step(self, feed: Iterator[SequenceBatch]) -> NextItemOutput:
        """One optimisation step: the pipeline trains the next batch of ``feed`` (forward, backward, the fused
        sparse update inside the backward, AdamW; the next batch's input distribution overlapped with it),
        the LR schedule advances and the metrics accumulate on the device (no host sync). Raises
        StopIteration when ``feed`` has nothing left to train."""
        out: NextItemOutput = self.pipeline.progress(feed)
        self.step += 1
        self.scheduler.step()
        self.metrics.update(out, self.step)
        return out

    def train(self) -> int:
        """Train until ``train.train_steps`` or the end of the data; returns the last step."""
        cfg = self.cfg.train
        self.model.train()
        run = _Run(start=self.step, saved_at=self.step, evaluated_at=self.step)
        feed = self.batches.until(self._pause_step(run))
        self.tensorboard.open(self.step)
        profiler = StepProfiler(cfg.profile_steps, self.output_dir, self.ctx, next_step=self.step + 1)
        finished = False
        try:
            while cfg.train_steps == 0 or self.step < cfg.train_steps:
                try:
                    self.train_step(feed)
                except StopIteration:
                    break
                run.trained += 1
                if self._after_step(run):
                    feed = self.batches.until(self._pause_step(run))
                profiler.step()  # after the step's logging, checkpoint and evaluation: part of its cost
                if run.stop:
                    break
            self._finish(run)
            finished = True
        finally:
            self._close_outputs(profiler, finished)
        logger.info("finished after %d steps", self.step)
        return self.step

    def _close_outputs(self, profiler: StepProfiler, finished: bool) -> None:
        """Write out the profiler's trace (a window cut short), metrics.jsonl and TensorBoard's events.

        Each rank alone, with no collective after: a failure here ends this rank only, once training is
        over. It is raised after a finished run; while another error ends the run, that error is the one
        reported, and these are logged as warnings.
        """
        errors: list[Exception] = []
        for close in (profiler.stop, self.metrics.close, self.tensorboard.close):
            try:
                close()
            except Exception as e:  # noqa: BLE001 - try the others, then report
                errors.append(e)
        for e in errors[1:] if finished else errors:
            logger.warning("%s: %s", type(e).__name__, e)
        if errors and finished:
            raise errors[0]

    def _after_step(self, run: _Run) -> bool:
        """The periodic work after a step: log, checkpoint, evaluate. True when it evaluated (the feed, paused
        for it, must be renewed)."""
        cfg = self.cfg.train
        if self.step % cfg.log_steps == 0:
            self._log()
        if cfg.save_steps and self.step % cfg.save_steps == 0:
            self._save(run)
        if self.eval_interval and self.step % self.eval_interval == 0:
            self._evaluate(run)
            return True
        return False

    def _log(self) -> None:
        """The log line (all ranks reduce), TensorBoard's scalars (rank 0), managed-collision counts."""
        record = self.metrics.log(self.step)
        if self.tensorboard.active:
            # Between this step and the next one's zero_grad: the gradients of the step just logged.
            grad_norm = dense_grad_norm(self.optimizer)
            self.tensorboard.train(record, learning_rates(self.optimizer, self.scheduler, self.step), grad_norm)
        self._log_managed_collisions()

    def _finish(self, run: _Run) -> None:
        """The end of the run: what the last steps have not yet logged, saved or evaluated."""
        cfg = self.cfg.train
        if run.trained and self.step % cfg.log_steps:
            self._log()  # the tail of the run since the last log line
        if cfg.save_steps and run.saved_at != self.step:
            self._save(run)
        if self.eval_interval and run.evaluated_at != self.step:
            self._evaluate(run)

    def _pause_step(self, run: _Run) -> int | None:
        """Batches to pull in this run before the pipeline must run empty: at the next evaluation and at the
        last step, so that evaluation never meets batches in flight. None when nothing evaluates."""
        cfg = self.cfg.train
        if not self.eval_interval:
            return None
        stop = (self.step // self.eval_interval + 1) * self.eval_interval
        if cfg.train_steps:
            stop = min(stop, cfg.train_steps)
        return stop - run.start

    def _negative_sampler(self) -> NegativeSampler | None:
        m, d = self.cfg.model, self.cfg.data
        if not m.num_negatives:
            return None
        item = next(f for f in d.features if f.name == d.item_feature)
        return NegativeSampler(
            negatives_key(item.name), m.num_negatives, item.table_rows, self.cfg.train.seed, self.ctx.rank, self.step
        )

    def close(self) -> None:
        """Release what ``train`` would have released (for callers that drive ``train_step`` themselves)."""
        self.metrics.close()
