"""The training loop: build on meta -> plan -> DMP -> ``TrainPipelineSparseDist`` over the reader."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from data.batch import SequenceBatch, negatives_key, with_negatives
from data.reader import SequenceReader
from model.seq2seq import Seq2SeqModel, Seq2SeqOutput
from model.sparse import managed_collision_stats
from trainer.checkpoint import CheckpointManager, rng_state, set_rng_state
from trainer.compile import compile_transformer
from trainer.config import JobConfig, dump_config
from trainer.dist import DistContext
from trainer.evaluate import Evaluator, write_result
from trainer.metrics import LogRecord, MetricLogger
from trainer.optim import build_optimizer, build_scheduler, restore_schedule
from trainer.sharding import shard_model

logger = logging.getLogger(__name__)


class TrainStep(nn.Module):
    """Adapts the model's named output to the ``(loss, output)`` pair the TorchRec pipeline expects."""

    def __init__(self, model: Seq2SeqModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: SequenceBatch) -> tuple[torch.Tensor, Seq2SeqOutput]:
        out = self.model(batch)
        return out.loss, out


@dataclass
class TrainResult:
    steps: int
    history: list[LogRecord]


def seed_everything(seed: int, rank: int) -> None:
    # Per rank, so dropout masks differ between ranks; dense weights are made equal by DDP's broadcast.
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(seed + rank)


class Trainer:
    def __init__(self, cfg: JobConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        seed_everything(cfg.train.seed, ctx.rank)
        self.output_dir = Path(cfg.train.output_dir)
        self._write_resolved_config()

        # The reader first: it checks every input file's schema, so bad input fails before the slow part.
        self.reader = SequenceReader(cfg.data, rank=ctx.rank, world_size=ctx.world_size, epochs=cfg.train.train_epochs)
        # Built on meta: no rank ever allocates a full table; DMP materialises only its own shards.
        model = TrainStep(
            Seq2SeqModel(cfg.data.features, cfg.model, device=torch.device("meta"), item_feature=cfg.data.item_feature)
        )
        self.model = shard_model(model, cfg, ctx)
        compile_transformer(self.model, cfg.model, ctx.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.train_steps)
        self.checkpoints = CheckpointManager(self.output_dir, ctx, cfg.train.max_to_keep)
        self.step = 0
        self._restore()
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, ctx.device)
        self.best = BestCheckpoint(self.output_dir, cfg.eval.best_metric)
        self.checkpoints.keep = self.best.path

    def _write_resolved_config(self) -> None:
        if self.ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(dump_config(self.cfg))
        # Other ranks may read from output_dir later; make sure it exists before anyone goes on.
        dist.barrier(group=self.ctx.control_group)

    # ------------------------------------------------------------------------------------ checkpoints

    def _app_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def _resume_path(self) -> Path | None:
        cfg = self.cfg.train
        if cfg.resume_from:
            path = Path(cfg.resume_from)
            if not path.is_dir():
                raise FileNotFoundError(f"train.resume_from: checkpoint folder {path} does not exist")
            return path
        return self.checkpoints.latest() if cfg.resume else None

    def _restore(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        # Optimizer states are created lazily; they must exist to be loaded into in place.
        self.optimizer.init_state()
        state = self._app_state()
        restored = self.checkpoints.load(path, state, self.cfg)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = restored.step
        # fbgemm's fused row-wise Adam counts its bias-correction steps itself and does not save the
        # counter (DESIGN.md §3): set it back, or the first steps after a resume would overshoot.
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
        else:
            self.reader.load_state_dict(restored.rank_state["reader"])
            set_rng_state(restored.rank_state["rng"])
        if self.ctx.is_main:
            logger.info("resumed from %s at step %d", path, self.step)

    def _save(self, batches: StepAlignedBatches, trained: int, metrics: MetricLogger) -> None:
        # Never write a checkpoint after a non-finite loss: the last complete one stays the one to go back to.
        metrics.raise_if_nonfinite()
        rank_state = {"rng": rng_state(), "reader": batches.reader_state(trained)}
        self.checkpoints.save(self.step, self._app_state(), rank_state, {}, self.cfg)

    def _evaluate(self, batches: StepAlignedBatches, trained: int, metrics: MetricLogger, saved_at: int) -> int:
        """Validation metrics now; a new best is checkpointed (if checkpoints are on) and marked.
        Returns the step of the latest checkpoint."""
        # The pipeline is empty here (StepAlignedBatches paused at this step, so it trained what it held);
        # evaluation calls the sparse modules directly, so their own forward goes back in place. The
        # next progress() attaches the model again and refills the pipeline.
        self.pipeline.detach()
        result = Evaluator(self.cfg, self.ctx, self.model).run()
        metrics.pause(result.seconds)
        if self.ctx.is_main:
            write_result(self.output_dir, self.step, result)
        value = result.metrics[self.cfg.eval.best_metric]
        if not self.best.improves(value):
            return saved_at
        if self.cfg.train.save_steps and saved_at != self.step:
            self._save(batches, trained, metrics)
            saved_at = self.step
        checkpoint = self.checkpoints.output_dir / f"step_{self.step}" if saved_at == self.step else None
        if self.ctx.is_main:
            self.best.mark(self.step, value, checkpoint)
        else:
            self.best.value = value
        self.checkpoints.keep = self.best.path
        return saved_at

    def _log_managed_collisions(self) -> None:
        """Ids admitted to and evicted from bucket-0 (managed-collision) tables, summed over ranks."""
        stats = managed_collision_stats(self.model)  # same tables in the same order on every rank
        if not stats:
            return
        totals = torch.tensor([n for pair in stats.values() for n in pair], dtype=torch.long)
        dist.all_reduce(totals, group=self.ctx.control_group)
        if self.ctx.is_main:
            parts = [f"{t} {totals[2 * i]:,} admitted, {totals[2 * i + 1]:,} evicted" for i, t in enumerate(stats)]
            logger.info("managed collisions (all ranks): %s", "; ".join(parts))

    # ---------------------------------------------------------------------------------------- the loop

    def train(self) -> TrainResult:
        cfg = self.cfg.train
        self.model.train()
        metrics = MetricLogger(self.ctx, self.output_dir, cfg.train_steps, cfg.progress_bar, start_step=self.step)
        batches = StepAlignedBatches(self.reader, self.ctx, self._negative_sampler())
        start, trained, saved_at = self.step, 0, self.step
        evaluated_at = self.step
        feed = batches.until(self._pause_step(self.step, start))
        try:
            while cfg.train_steps == 0 or self.step < cfg.train_steps:
                try:
                    out: Seq2SeqOutput = self.pipeline.progress(feed)
                except StopIteration:
                    break
                self.step += 1
                trained += 1
                self.scheduler.step()
                metrics.update(out, self.step)
                if self.step % cfg.log_steps == 0:
                    metrics.log(self.step)
                    self._log_managed_collisions()
                if cfg.save_steps and self.step % cfg.save_steps == 0:
                    self._save(batches, trained, metrics)
                    saved_at = self.step
                if cfg.eval_steps and self.step % cfg.eval_steps == 0:
                    saved_at = self._evaluate(batches, trained, metrics, saved_at)
                    evaluated_at = self.step
                    feed = batches.until(self._pause_step(self.step, start))
            if trained and self.step % cfg.log_steps:
                metrics.log(self.step)  # the tail of the run since the last log line
            if cfg.save_steps and saved_at != self.step:
                self._save(batches, trained, metrics)
                saved_at = self.step
            if cfg.eval_steps and evaluated_at != self.step:
                self._evaluate(batches, trained, metrics, saved_at)
        finally:
            metrics.close()
        logger.info("finished after %d steps", self.step)
        return TrainResult(steps=self.step, history=metrics.history)

    def _pause_step(self, step: int, start: int) -> int | None:
        """Batches to pull in this run (which began at ``start``) before the pipeline must run empty: at the
        next evaluation and at the last step, so that evaluation never meets batches in flight. None when
        nothing evaluates."""
        cfg = self.cfg.train
        if not cfg.eval_steps:
            return None
        stop = (step // cfg.eval_steps + 1) * cfg.eval_steps
        if cfg.train_steps:
            stop = min(stop, cfg.train_steps)
        return stop - start

    def _negative_sampler(self) -> NegativeSampler | None:
        m, d = self.cfg.model, self.cfg.data
        if not m.num_negatives:
            return None
        item = next(f for f in d.features if f.name == d.item_feature)
        return NegativeSampler(
            negatives_key(item.name), m.num_negatives, item.table_rows, self.cfg.train.seed, self.ctx.rank, self.step
        )


class NegativeSampler:
    """Uniform item ids for the batch pulled ``index``-th: a function of (seed, rank, index) alone, so
    a resumed run draws the same negatives as an uninterrupted one."""

    def __init__(self, key: str, count: int, rows: int, seed: int, rank: int, start_index: int) -> None:
        self.key, self.count, self.rows = key, count, rows
        self.seed, self.rank = seed, rank
        self.index = start_index

    def __call__(self, batch: SequenceBatch) -> SequenceBatch:
        rng = np.random.default_rng([self.seed, self.rank, self.index])
        self.index += 1
        ids = torch.from_numpy(rng.integers(0, self.rows, size=self.count, dtype=np.int64))
        return with_negatives(batch, self.key, ids)


class BestCheckpoint:
    """Tracks the best validation value (higher is better: every metric here is) and marks it in
    ``output_dir/best.json``, which survives restarts."""

    def __init__(self, output_dir: Path, metric: str) -> None:
        self.file = output_dir / "best.json"
        self.metric = metric
        self.value = -math.inf
        self.path: Path | None = None
        if self.file.is_file():
            saved = json.loads(self.file.read_text())
            if saved.get("metric") == metric:
                self.value = float(saved["value"])
                self.path = Path(saved["checkpoint"]) if saved.get("checkpoint") else None

    def improves(self, value: float) -> bool:
        return value > self.value

    def mark(self, step: int, value: float, checkpoint: Path | None) -> None:
        self.value, self.path = value, checkpoint
        record = {"metric": self.metric, "value": value, "step": step, "checkpoint": str(checkpoint or "")}
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(self.file)  # atomic: a reader never sees half a file
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (train.save_steps = 0)"
        logger.info("new best %s %.4f at step %d: %s", self.metric, value, step, where)


class _Feed(Iterator[SequenceBatch]):
    def __init__(self, source: StepAlignedBatches) -> None:
        self._source = source

    def __next__(self) -> SequenceBatch:
        return next(self._source)


class StepAlignedBatches(Iterator[SequenceBatch]):
    """The reader's batches, pulled in step on every rank, counting what was pulled.

    Every rank pulls while *every* rank has a batch, so no rank waits forever in a collective for a peer
    that ran out of data. The pipeline pulls a batch or two ahead of the step it trains, so the reader
    position to checkpoint after k trained batches lies that many batches back (``held_batches``).
    """

    def __init__(self, reader: SequenceReader, ctx: DistContext, negatives: NegativeSampler | None = None) -> None:
        self._reader = reader
        self._negatives = negatives
        self._batches = iter(reader)
        self._ctx = ctx
        self._pulled = 0
        self._exhausted = False
        self._pause_after: int | None = None

    def until(self, pulls: int | None) -> Iterator[SequenceBatch]:
        """These batches, stopping after ``pulls`` in total (None: at the end of the data). The pipeline then
        trains what it holds and runs empty, so evaluation sees the model at exactly that step. Returns a
        new iterator object each time: TorchRec's pipeline remembers an iterator that once ran dry."""
        self._pause_after = pulls
        return _Feed(self)

    def __next__(self) -> SequenceBatch:
        if self._exhausted or (self._pause_after is not None and self._pulled >= self._pause_after):
            raise StopIteration
        batch = next(self._batches, None)
        # Counted even when all ranks stop below: the reader handed it out, so its position moved on.
        self._pulled += batch is not None
        if not self._all_ranks_have(batch is not None):
            self._exhausted = True
            if batch is not None:
                logger.warning(
                    "rank %d: another rank ran out of data first; this rank's remaining batches are not trained "
                    "on (balance the input files across ranks to avoid it)",
                    self._ctx.rank,
                )
            raise StopIteration
        assert batch is not None
        return self._negatives(batch) if self._negatives else batch

    def _all_ranks_have(self, has_batch: bool) -> bool:
        if self._ctx.world_size == 1:
            return has_batch  # nobody to agree with: no collective on the step's critical path
        flag = torch.tensor([1 if has_batch else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._ctx.control_group)
        return bool(flag.item())

    def reader_state(self, trained: int) -> dict[str, Any]:
        """Reader position after ``trained`` batches of this run have been trained on."""
        self._reader.held_batches = self._pulled - trained
        try:
            return self._reader.state_dict()
        finally:
            self._reader.held_batches = 0
