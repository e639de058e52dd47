"""The training loop: build on meta -> plan -> DMP -> ``TrainPipelineSparseDist`` over the reader."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from data.batch import SequenceBatch
from data.reader import SequenceReader
from model.seq2seq import Seq2SeqModel, Seq2SeqOutput
from trainer.config import JobConfig, dump_config
from trainer.dist import DistContext
from trainer.metrics import LogRecord, MetricLogger
from trainer.optim import build_optimizer
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
        if cfg.train.save_steps:
            logger.warning("train.save_steps = %d: checkpointing is not implemented yet", cfg.train.save_steps)

        # The reader first: it checks every input file's schema, so bad input fails before the slow part.
        self.reader = SequenceReader(cfg.data, rank=ctx.rank, world_size=ctx.world_size, epochs=cfg.train.train_epochs)
        # Built on meta: no rank ever allocates a full table; DMP materialises only its own shards.
        model = TrainStep(Seq2SeqModel(cfg.data.features, cfg.model, device=torch.device("meta")))
        self.model = shard_model(model, cfg, ctx)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, ctx.device)

    def _write_resolved_config(self) -> None:
        if self.ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(dump_config(self.cfg))
        # Other ranks may read from output_dir later; make sure it exists before anyone goes on.
        dist.barrier(group=self.ctx.control_group)

    def train(self) -> TrainResult:
        cfg = self.cfg.train
        self.model.train()
        metrics = MetricLogger(self.ctx, self.output_dir, cfg.train_steps, cfg.progress_bar)
        batches = _in_step(iter(self.reader), self.ctx)
        step = 0
        try:
            while cfg.train_steps == 0 or step < cfg.train_steps:
                try:
                    out: Seq2SeqOutput = self.pipeline.progress(batches)
                except StopIteration:
                    break
                step += 1
                metrics.update(out)
                if step % cfg.log_steps == 0:
                    metrics.log(step)
            if step % cfg.log_steps:
                metrics.log(step)  # the tail of the run since the last log line
        finally:
            metrics.close()
        logger.info("finished after %d steps", step)
        return TrainResult(steps=step, history=metrics.history)


def _in_step(batches: Iterator[SequenceBatch], ctx: DistContext) -> Iterator[SequenceBatch]:
    """Yield batches while *every* rank has one, so no rank waits forever in a collective for a peer
    that ran out of data. A rank that still has data at that point says so: those rows are not trained on."""
    while True:
        batch = next(batches, None)
        has_batch = torch.tensor([0 if batch is None else 1])
        dist.all_reduce(has_batch, op=dist.ReduceOp.MIN, group=ctx.control_group)
        if has_batch.item() == 0:
            if batch is not None:
                logger.warning(
                    "rank %d: another rank ran out of data first; this rank's remaining batches are not trained on "
                    "(balance the input files across ranks to avoid it)",
                    ctx.rank,
                )
            return
        assert batch is not None
        yield batch
