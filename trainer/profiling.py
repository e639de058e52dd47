"""torch.profiler traces of a window of a real run's steps (``train.profile_steps = "START:STOP"``).

Each rank records the steps START <= step < STOP of ``Trainer.train`` (the real data, pipeline, logging,
checkpoints and evaluations of those steps) with shapes and memory, on CPU and, when training on CUDA, the
GPU's kernels, and writes one Chrome trace: ``output_dir/profile/steps_START-LAST/rank{R}.pt.trace.json``, a
run folder for TensorBoard's PyTorch profiler plugin and a file for ui.perfetto.dev. The trace's
``ProfilerStep#K`` is the K-th step of this call of ``train`` (counted from 0), the first one untraced when it
is the warmup.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, schedule

from trainer.config import profile_window
from trainer.dist import DistContext, OutputDirError, agree, output_dir_error

logger = logging.getLogger(__name__)

PROFILE_DIR = "profile"


class StepProfiler:
    """Call ``step()`` after each training step and ``stop()`` at the end; does nothing when no window is set
    or the run starts after it (a resumed run)."""

    def __init__(self, spec: str, output_dir: Path, ctx: DistContext, next_step: int) -> None:
        """``next_step``: the number of the first step this run trains (1, or the checkpoint's step + 1)."""
        self._prof: profile | None = None
        self._spec, self._written = spec, False
        self._ctx, self._output_dir = ctx, output_dir
        # Set by the trace's write: whether it has happened (at the window's last step, the same one on every
        # rank), and how it failed.
        self._done, self._error = False, None
        window = profile_window(spec)
        if window is None:
            return
        start, stop = window
        if next_step >= stop:
            if ctx.is_main:
                logger.info("train.profile_steps = %r: this run starts at step %d, after the window; no trace",
                            spec, next_step)  # fmt: skip
            return
        first = max(start, next_step)
        # One step of warmup where the run has one before the window: the profiler's own start-up cost
        # (CUPTI, the first allocations it tracks) then lands outside the traced steps.
        warmup = 1 if first - 1 >= next_step else 0
        self.path = output_dir / PROFILE_DIR / f"steps_{first}-{stop - 1}" / f"rank{ctx.rank}.pt.trace.json"
        self._is_main = ctx.is_main
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
        with warnings.catch_warnings():  # "won't be using warmup": only where the window starts the run
            warnings.simplefilter("ignore", UserWarning)
            # The schedule counts from 0 at this run's first step.
            skip = first - warmup - next_step
            steps = schedule(skip_first=skip, wait=0, warmup=warmup, active=stop - first, repeat=1)
        self._prof = profile(
            activities=activities,
            schedule=steps,
            on_trace_ready=self._write,
            record_shapes=True,
            profile_memory=True,
        )
        self._prof.start()
        if ctx.is_main:
            logger.info("profiling steps %d-%d on every rank into %s", first, stop - 1, self.path.parent)

    def _write(self, prof: profile) -> None:
        """The profiler's ``on_trace_ready``: each rank writes its own trace. A failure is kept, not raised
        inside the profiler, and raised by ``step`` (on every rank) or ``stop``."""
        self._done = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(self.path))
        except OSError as e:
            self._error = output_dir_error(self._output_dir, "write the profiler trace", self.path, e)
            return
        self._written = True
        if self._is_main:
            logger.info("profiler trace written: %s (one rank{R}.pt.trace.json per rank)", self.path)

    def step(self) -> None:
        if self._prof is None:
            return
        self._prof.step()
        if self._done and self._ctx is not None:
            # The window's last step, on every rank: all agree their traces were written (once per run).
            ctx, self._ctx = self._ctx, None
            agree(ctx, self._take_error())

    def _take_error(self) -> OutputDirError | None:
        error, self._error = self._error, None
        return error

    def stop(self) -> None:
        """End profiling; a window the run did not reach the end of is written as far as it got. At the end of
        the run and on each rank alone (no collective follows): a trace that could not be written raises
        here, on that rank."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()
            if self._is_main and not self._written and not self._done:
                logger.warning("train.profile_steps = %r: the run ended before the window; no trace", self._spec)
        error = self._take_error()
        if error is not None:
            raise error
