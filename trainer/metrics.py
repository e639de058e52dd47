"""Training metrics: accumulated on device between log steps, reduced across ranks only when logged."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.next_item import NextItemOutput
from trainer.dist import DistContext

logger = logging.getLogger(__name__)


@dataclass
class LogRecord:
    step: int
    loss: float
    hit_rate: float
    tokens_per_s: float
    samples_per_s: float
    peak_mem_gib: float
    elapsed_s: float

    def line(self, total_steps: int) -> str:
        of = f"/{total_steps}" if total_steps else ""
        return (
            f"step {self.step}{of} | loss {self.loss:.4f} | hit_rate {self.hit_rate:.4f} | "
            f"tokens/s {self.tokens_per_s:,.0f} | samples/s {self.samples_per_s:,.1f} | "
            f"peak_mem {self.peak_mem_gib:.2f} GiB"
        )


class NonFiniteLossError(RuntimeError):
    pass


class MetricLogger:
    """Keeps running sums on the training device so that steps between log lines never sync the host."""

    def __init__(
        self, ctx: DistContext, output_dir: Path, total_steps: int, progress_bar: bool, start_step: int = 0
    ) -> None:
        self.ctx = ctx
        self.total_steps = total_steps
        # First step whose loss was not finite (-1: none yet); kept on device so no step waits for the host.
        self._first_nonfinite = torch.tensor(-1, device=ctx.device)
        # loss, steps, hits, targets, tokens, samples
        self._sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)
        self._window_start = time.perf_counter()
        self._run_start = self._window_start
        self._jsonl: IO[str] | None = (output_dir / "metrics.jsonl").open("a") if ctx.is_main else None
        self._bar = _progress_bar(total_steps, start_step) if ctx.is_main and progress_bar else None
        self.history: list[LogRecord] = []

    def update(self, out: NextItemOutput, step: int) -> None:
        bad = ~torch.isfinite(out.loss.detach())
        self._first_nonfinite = torch.where(bad & (self._first_nonfinite < 0), step, self._first_nonfinite)
        one = torch.ones_like(out.loss, dtype=torch.float32)
        values = [out.loss.detach(), one, out.hits, out.num_targets, out.num_tokens, out.num_samples]
        self._sums += torch.stack([v.to(self._sums.dtype) for v in values])
        if self._bar is not None:
            self._bar.update(1)

    def raise_if_nonfinite(self) -> None:
        """Stop every rank together, naming the step, if any rank has seen a NaN/inf loss."""
        first = self._first_nonfinite.cpu().view(1).clone()
        first[first < 0] = torch.iinfo(torch.int64).max
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=self.ctx.control_group)
        if first.item() != torch.iinfo(torch.int64).max:
            raise NonFiniteLossError(
                f"the loss was not finite at step {first.item()}; stopping without writing a checkpoint "
                "(the last complete checkpoint is left as it was)"
            )

    def log(self, step: int) -> LogRecord:
        """Reduce the window's sums over ranks and write one line (rank 0)."""
        self.raise_if_nonfinite()
        totals = self._sums.cpu()
        dist.all_reduce(totals, group=self.ctx.control_group)
        loss_sum, steps, hits, targets, tokens, samples = totals.tolist()
        now = time.perf_counter()
        seconds = max(now - self._window_start, 1e-9)
        record = LogRecord(
            step=step,
            loss=loss_sum / max(steps, 1.0),
            hit_rate=hits / max(targets, 1.0),
            tokens_per_s=tokens / seconds,
            samples_per_s=samples / seconds,
            peak_mem_gib=self._peak_memory_gib(),
            elapsed_s=now - self._run_start,
        )
        self.history.append(record)
        if self.ctx.is_main:
            logger.info(record.line(self.total_steps))
            assert self._jsonl is not None
            self._jsonl.write(json.dumps(asdict(record)) + "\n")
            self._jsonl.flush()
        self._sums.zero_()
        self._window_start = time.perf_counter()
        return record

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` spent outside training (evaluation) out of the current window's rates."""
        self._window_start += seconds

    def _peak_memory_gib(self) -> float:
        """Peak over ranks: CUDA allocator peak on GPU, peak resident set size of the process on CPU."""
        if self.ctx.device.type == "cuda":
            peak = float(torch.cuda.max_memory_allocated(self.ctx.device))
        else:
            peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
        value = torch.tensor([peak], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.ctx.control_group)
        return value.item() / 2**30

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _progress_bar(total_steps: int, start_step: int) -> tqdm:
    # Under torchx/torchrun stderr is a pipe into a log file: redraw at most every few seconds there,
    # on a line of its own, instead of flooding the log with carriage-return frames.
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total_steps or None,
        initial=start_step,
        desc="train",
        unit="step",
        file=sys.stderr if interactive else _LinePerRefresh(sys.stderr),
        mininterval=0.5 if interactive else 10.0,
        dynamic_ncols=interactive,
        ascii=not interactive,
    )


class _LinePerRefresh:
    """File wrapper that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        text = text.replace("\r", "").strip()
        if text:
            self._stream.write(text + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
