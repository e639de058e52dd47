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
from trainer.dist import DistContext, naming_output_dir, on_main

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
        self,
        ctx: DistContext,
        output_dir: Path,
        total_steps: int,
        progress_bar: bool,
        start_step: int = 0,
        expected_steps: int | None = None,
    ) -> None:
        """``expected_steps``: where the progress bar expects the run to end (default ``total_steps``; an epoch
        run's estimate, for an ETA where ``total_steps`` is 0)."""
        self.ctx = ctx
        self.total_steps = total_steps
        # First step whose loss was not finite (-1: none yet); kept on device so no step waits for the host.
        self._first_nonfinite = torch.tensor(-1, device=ctx.device)
        # loss, steps, hits, targets, tokens, samples
        self._sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)
        self._window_start = time.perf_counter()
        self._run_start = self._window_start
        # Rank 0 appends one line per log step; every rank learns whether it could open the file.
        self._output_dir = output_dir
        self._jsonl_path = output_dir / "metrics.jsonl"
        self._jsonl: IO[str] | None = on_main(ctx, self._open_jsonl)
        bar_total = total_steps if expected_steps is None else expected_steps
        self._bar = ProgressBar(bar_total, start_step) if ctx.is_main and progress_bar else None
        self.history: list[LogRecord] = []

    def update(self, out: NextItemOutput, step: int) -> None:
        bad = ~torch.isfinite(out.loss.detach())
        self._first_nonfinite = torch.where(bad & (self._first_nonfinite < 0), step, self._first_nonfinite)
        one = torch.ones_like(out.loss, dtype=torch.float32)
        values = [out.loss.detach(), one, out.hits, out.num_targets, out.num_tokens, out.num_samples]
        self._sums += torch.stack([v.to(self._sums.dtype) for v in values])
        if self._bar is not None:
            self._bar.update()

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
        # Written by rank 0 alone: all ranks agree it worked (one all-reduce of one integer per log line)
        # before going on to the next step's collectives.
        on_main(self.ctx, lambda: self._write_jsonl(record))
        self._sums.zero_()
        self._window_start = time.perf_counter()
        return record

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` spent outside training (evaluation) out of the current window's rates."""
        self._window_start += seconds
        if self._bar is not None:
            self._bar.pause(seconds)

    def _peak_memory_gib(self) -> float:
        """Peak over ranks: CUDA allocator peak on GPU, peak resident set size of the process on CPU."""
        if self.ctx.device.type == "cuda":
            peak = float(torch.cuda.max_memory_allocated(self.ctx.device))
        else:
            peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
        value = torch.tensor([peak], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.ctx.control_group)
        return value.item() / 2**30

    def _open_jsonl(self) -> IO[str]:
        with naming_output_dir(self._output_dir, "write", self._jsonl_path):
            return self._jsonl_path.open("a")

    def _write_jsonl(self, record: LogRecord) -> None:
        assert self._jsonl is not None
        with naming_output_dir(self._output_dir, "write", self._jsonl_path):
            self._jsonl.write(json.dumps(asdict(record)) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            jsonl, self._jsonl = self._jsonl, None
            with naming_output_dir(self._output_dir, "write", self._jsonl_path):
                jsonl.close()


class ProgressBar:
    """tqdm over the run's steps, on rank 0, whose rate and ETA count training steps only.

    tqdm's clock would start when the bar is made and run through evaluations. The run's first step holds
    its whole start-up (the pipeline's fill, the reader's first batches, kernel and ``model.compile``
    compilation: seconds on CPU, a minute or more on a GPU), and an evaluation can last longer than many
    steps. In a terminal tqdm redraws twice a second and its moving average forgets such a stall within
    seconds; under torchx/torchrun, where stderr is a pipe into a log file, the bar prints one line every
    10 s, its average spans minutes of lines, and the start-up alone put the ETA off many times over (steps
    of 10 ms after a 40 s first step: "66:40:22" left, then 25.8 steps/s for about 100; on 2 CPU cores, the
    first line of configs/default.toml said 4.2 steps/s for about 14). So the bar starts at the end of the
    run's first step, evaluations are taken off its clock (``pause``), and off a terminal the rate is the
    mean over the run so far (no moving average) rather than one over the last few lines.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        stream: IO[str] | None = None,
        interactive: bool | None = None,
        mininterval: float | None = None,
    ) -> None:
        self._total = total_steps or None
        self._start = start_step
        self._stream: IO[str] = sys.stderr if stream is None else stream
        self._interactive = self._stream.isatty() if interactive is None else interactive
        self._mininterval = mininterval
        self._bar: tqdm | None = None

    def _open(self) -> tqdm:
        interactive = self._interactive
        mininterval = self._mininterval if self._mininterval is not None else 0.5 if interactive else 10.0
        return tqdm(
            total=self._total,
            initial=self._start + 1,  # the step that has just ended, first of the bar's clock
            desc="train",
            unit="step",
            # Off a terminal: one whole line per refresh instead of carriage-return frames flooding the log.
            file=self._stream if interactive else _LinePerRefresh(self._stream),
            mininterval=mininterval,
            # Dynamic miniters would also skip refreshes by step count; the time interval alone decides.
            miniters=1,
            smoothing=0.3 if interactive else 0.0,
            dynamic_ncols=interactive,
            ascii=not interactive,
        )

    def update(self) -> None:
        """One step has ended."""
        if self._bar is None:
            self._bar = self._open()
        else:
            self._bar.update(1)

    def pause(self, seconds: float) -> None:
        """``seconds`` just spent outside training (an evaluation) leave the rate and the elapsed time."""
        if self._bar is not None:
            # What tqdm.unpause does for the time since the last redraw, for exactly these seconds.
            self._bar.start_t += seconds
            self._bar.last_print_t += seconds

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


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
