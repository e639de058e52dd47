"""The progress bar's rate (and so its ETA) off a terminal: training steps only, not the run's start-up
inside its first step nor the evaluations between steps."""

from __future__ import annotations

import io
import re
import time

import pytest

from trainer.metrics import ProgressBar

STEPS, STEP_S, STARTUP_S, EVAL_S = 40, 0.01, 0.6, 0.4


@pytest.mark.parametrize("interactive", [False, True])
def test_rate_counts_training_steps_only(interactive: bool) -> None:
    out = io.StringIO()
    # A short refresh interval in place of 10 s, so the test sees several lines.
    bar = ProgressBar(STEPS + 1, 0, stream=out, interactive=interactive, mininterval=0.05)
    time.sleep(STARTUP_S)  # the first step: pipeline fill, compilation
    bar.update()
    began = time.perf_counter()
    for i in range(STEPS):
        time.sleep(STEP_S)
        bar.update()
        if i == STEPS // 2:
            time.sleep(EVAL_S)  # an evaluation, reported as the trainer does
            bar.pause(EVAL_S)
    true_rate = STEPS / (time.perf_counter() - began - EVAL_S)
    bar.close()

    lines = [line for line in re.split(r"[\r\n]", out.getvalue()) if line.strip()]
    assert interactive or "\r" not in out.getvalue()  # whole lines in a log, no redraw frames
    final = lines[-1]
    assert f"{STEPS + 1}/{STEPS + 1}" in final, final
    shown = float(re.search(r"([\d.]+)step/s", final).group(1))  # type: ignore[union-attr]
    # Start-up and evaluation in the clock would show about 40 / 1.4 s ~ 29 steps/s against ~100 (or less
    # on a loaded machine: true_rate is measured here, around the same sleeps).
    assert shown == pytest.approx(true_rate, rel=0.15), (shown, true_rate, lines)
