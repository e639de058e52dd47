"""TensorBoard scalars of a run, written by rank 0 under ``output_dir/tensorboard`` (``train.tensorboard``).

What is written (tags): ``train/*`` (loss, hit rate, tokens/s, samples/s, peak memory, dense gradient norm)
and ``optim/lr_dense``, ``optim/lr_sparse`` every ``train.log_steps``; ``eval/SPLIT_PROTOCOL/METRIC`` at
every evaluation; ``managed_collisions/TABLE/admitted|evicted`` (totals over ranks) where there are
managed-collision tables. Every value is one the trainer has already brought to the host for its log line,
except the gradient norm, computed on log steps only (one reduction, read with the log's own sync).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from torchrec.optim.keyed import CombinedOptimizer

from trainer.dist import DistContext, naming_output_dir, on_main, os_reason
from trainer.evaluator import EvalResult
from trainer.metrics import LogRecord

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_PIN = "tensorboard==2.21.0"  # as in setup.cfg
# Seconds between the writer's flushes to disk: a live TensorBoard (or a crash) is at most this far behind.
FLUSH_SECS = 10


class TensorBoardLog:
    """Rank 0's scalar writer; before ``open``, on other ranks, with ``train.tensorboard = false`` or without
    the tensorboard package, every method does nothing (all ranks call them alike).

    A folder that cannot be made stops the run at ``open`` (every rank, with an OutputDirError naming
    train.output_dir). A write that fails later (the event file's writer thread reports it on the next
    scalar) warns once and ends the scalars: training goes on, as without the package; metrics.jsonl, the
    run's own record, fails the run if it cannot be written.
    """

    def __init__(self, output_dir: Path, ctx: DistContext, enabled: bool) -> None:
        self.output_dir = output_dir
        self.log_dir = output_dir / TENSORBOARD_DIR
        self._ctx = ctx
        self._configured = enabled  # the same on every rank: decides whether ``open`` agrees
        self._enabled = enabled and ctx.is_main
        self._writer: SummaryWriter | None = None

    def open(self, start_step: int) -> None:
        """Start writing (``Trainer.train``; callers that only drive ``train_step``, the benchmarks, never
        open a writer). ``start_step``: the step the run starts from (a checkpoint's when resumed). Every
        rank calls it: all learn whether rank 0 could make its folder."""
        if self._configured:
            on_main(self._ctx, lambda: self._open(start_step))

    def _open(self, start_step: int) -> None:
        if self._enabled and self._writer is None:
            with naming_output_dir(self.output_dir, "create", self.log_dir):
                self._writer = open_writer(self.log_dir, start_step)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def train(self, record: LogRecord, learning_rates: dict[str, float], grad_norm: float | None) -> None:
        if self._writer is None:
            return
        values = {
            "train/loss": record.loss,
            "train/hit_rate": record.hit_rate,
            "train/tokens_per_s": record.tokens_per_s,
            "train/samples_per_s": record.samples_per_s,
            "train/peak_mem_gib": record.peak_mem_gib,
            **{f"optim/lr_{name}": lr for name, lr in learning_rates.items()},
        }
        if grad_norm is not None:
            values["train/grad_norm_dense"] = grad_norm
        self._scalars(record.step, values)

    def evaluation(self, step: int, result: EvalResult) -> None:
        if self._writer is None:
            return
        prefix = f"eval/{result.split}_{result.protocol}"
        self._scalars(step, {f"{prefix}/{name}": value for name, value in result.metrics.items()})

    def managed_collisions(self, step: int, totals: dict[str, tuple[int, int]]) -> None:
        """``{table: (admitted, evicted)}``, counted since the start of training and summed over ranks."""
        if self._writer is None:
            return
        values: dict[str, float] = {}
        for table, (admitted, evicted) in totals.items():
            values[f"managed_collisions/{table}/admitted"] = admitted
            values[f"managed_collisions/{table}/evicted"] = evicted
        self._scalars(step, values)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        assert self._writer is not None
        try:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, global_step=step)
        except OSError as e:
            logger.warning(
                "train.output_dir = %s: cannot write TensorBoard scalars to %s (%s); no more scalars for this "
                "run, training goes on", self.output_dir, self.log_dir, os_reason(e),
            )  # fmt: skip
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError:
                pass  # the same failure again

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as e:
                logger.warning("train.output_dir = %s: cannot write TensorBoard scalars to %s (%s)",
                               self.output_dir, self.log_dir, os_reason(e))  # fmt: skip


def open_writer(log_dir: Path, start_step: int) -> SummaryWriter | None:
    """A ``SummaryWriter`` on ``log_dir``, or None (with one warning) where tensorboard is not installed.

    A resumed run (``start_step`` > 0) appends a new event file to the same folder. Its ``purge_step`` tells
    TensorBoard to hide what the interrupted run wrote after the checkpoint it resumes from: those steps are
    trained again, and the curves would otherwise hold both versions of them.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch.utils.tensorboard imports the tensorboard package
        logger.warning(
            "no TensorBoard scalars for this run: the tensorboard package is not installed (%s). Install it "
            "(pip install %s) or set train.tensorboard = false; training goes on", e, TENSORBOARD_PIN,
        )  # fmt: skip
        return None
    purge_step = start_step + 1 if start_step else None
    writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=FLUSH_SECS)
    logger.info("TensorBoard scalars in %s (tensorboard --logdir %s)", log_dir, log_dir)
    return writer


def learning_rates(optimizer: CombinedOptimizer, scheduler: LambdaLR, step: int) -> dict[str, float]:
    """The rates step ``step`` trained with, per part of ``optimizer`` (``sparse``: fbgemm's fused optimizer,
    ``dense``: AdamW). The param groups already hold the next step's rates (the schedule advances after each
    step), so the rate is taken from the schedule at ``step`` instead."""
    factor = scheduler.lr_lambdas[0](step - 1)  # one schedule for every group (trainer/optim.py)
    rates: dict[str, float] = {}
    for name, part in optimizer.optimizers:
        groups: list[dict[str, Any]] = list(part.param_groups)
        if groups:
            group = groups[0]
            rates[name] = float(group["initial_lr"]) * factor if "initial_lr" in group else float(group["lr"])
    return rates


def dense_grad_norm(optimizer: CombinedOptimizer) -> float | None:
    """L2 norm of the gradients AdamW applied (DDP has averaged them, so every rank holds the same).

    Called after a step and before the next one clears the gradients. The embedding tables have no
    gradients to measure: fbgemm applies theirs inside the backward pass and does not keep them."""
    dense = dict(optimizer.optimizers).get("dense")
    if dense is None:
        return None
    grads = [p.grad for p in dense.params.values() if isinstance(p, torch.Tensor) and p.grad is not None]
    if not grads:
        return None
    # Sparse gradients (embedding tables sharded data-parallel with a sparse grad) count their values only.
    tensors = [g.coalesce().values() if g.is_sparse else g for g in grads]
    return float(torch.nn.utils.get_total_norm(tensors, norm_type=2.0))
