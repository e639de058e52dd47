"""Output folder and checkpoint I/O errors: one clear line naming the config key and the path, on every rank,
non-zero exit, no rank left waiting in a collective. Components on two gloo ranks in processes, and whole
two-rank jobs through torchrun.

The tests run as root, where permission bits do not stop a write: an uncreatable folder is one under /sys
(mkdir fails with EPERM or EROFS) or one below a regular file (ENOTDIR), and a failed write mid-run is a file
where the trainer wants a folder, or a value whose pickling fails as a full disk does.
"""

from __future__ import annotations

import errno
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.util import REPO_ROOT, run_job, run_ranks, torchrun

UNDER_SYS = "/sys/seqrec_out/run"
# A job that fails must end long before a rank blocked in a collective would time out.
COLLECTIVE_TIMEOUT_S = 200
FAIL_WITHIN_S = 90
JOB_TIMEOUT_S = 240


class _DiskFull:
    """Pickling it fails like writing to a full disk: a per-rank checkpoint write that fails on one rank."""

    def __reduce__(self) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")


def _tiny_cfg(out: Path) -> Any:
    from trainer.config import load_config

    return load_config(REPO_ROOT / "configs" / "default.toml", [f"--train.output_dir={out}", "--model.num_layers=1"])


def _scenarios(rank: int, tmp: str) -> dict[str, tuple[str, str, float]]:
    """Each scenario on both ranks: (exception type or "ok", message, seconds it took)."""
    import torch
    import torch.distributed as dist

    from trainer.checkpoint import CheckpointManager
    from trainer.dist import (
        OutputDirError,
        destroy_distributed,
        init_distributed,
        make_output_dir,
        on_every_rank,
        on_main,
    )

    ctx = init_distributed("cpu", timeout_s=60)
    found: dict[str, tuple[str, str, float]] = {}

    def attempt(name: str, fn: Any) -> None:
        start = time.monotonic()
        try:
            fn()
            found[name] = ("ok", "", time.monotonic() - start)
        except Exception as e:  # noqa: BLE001 - the test looks at what each rank raised
            found[name] = (type(e).__name__, str(e), time.monotonic() - start)

    def rank1_fails() -> None:
        if rank == 1:
            raise OutputDirError("rank 1's own failure")

    try:
        # Rank 0 alone makes the folder: both ranks raise its error.
        attempt("under_sys", lambda: on_main(ctx, lambda: make_output_dir(UNDER_SYS)))
        attempt("below_file", lambda: on_main(ctx, lambda: make_output_dir(Path(tmp) / "file.txt" / "out")))
        attempt("rank1_fails", lambda: on_every_rank(ctx, rank1_fails))

        run = Path(tmp) / "run"
        cfg = _tiny_cfg(run)
        manager = CheckpointManager(run, ctx, max_to_keep=5)
        on_main(ctx, lambda: make_output_dir(run))
        state = {"model": {"w": torch.arange(4.0)}}
        attempt("save_1", lambda: manager.save(1, state, {"x": 1}, {}, cfg))
        # Rank 1's own file cannot be written: rank 0 must not go on to the next collective alone.
        attempt("save_2_rank1_full", lambda: manager.save(2, state, {"x": _DiskFull() if rank == 1 else 1}, {}, cfg))
        attempt("save_3", lambda: manager.save(3, state, {"x": 1}, {}, cfg))  # the group is still in step
        on_main(ctx, lambda: (run / "step_3" / "rank_1.pt").unlink())
        attempt("load_missing_rank_file", lambda: manager.load(run / "step_3", state, cfg, key="train.output_dir"))
        found["complete"] = ("ok", " ".join(p.name for p in manager.complete_checkpoints()), 0.0)

        # What the agreement costs when all is well, next to the barrier it replaces.
        n = 300
        for _ in range(20):
            on_main(ctx, lambda: None)
        start = time.perf_counter()
        for _ in range(n):
            on_main(ctx, lambda: None)
        found["agree_s"] = ("ok", "", (time.perf_counter() - start) / n)
        start = time.perf_counter()
        for _ in range(n):
            dist.barrier(group=ctx.control_group)
        found["barrier_s"] = ("ok", "", (time.perf_counter() - start) / n)
    finally:
        destroy_distributed()
    return found


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, tuple[str, str, float]]]:
    tmp = tmp_path_factory.mktemp("output_errors")
    (tmp / "file.txt").write_text("a file where a folder should go\n")
    return run_ranks(_scenarios, 2, (str(tmp),), timeout_s=180)


def _both(scenarios: list[dict[str, tuple[str, str, float]]], name: str) -> tuple[tuple[str, str, float], ...]:
    return tuple(s[name] for s in scenarios)


@pytest.mark.parametrize("name", ["under_sys", "below_file"])
def test_rank0_cannot_create_the_output_dir_both_ranks_raise_its_error(scenarios: list, name: str) -> None:
    (kind0, msg0, s0), (kind1, msg1, s1) = _both(scenarios, name)
    assert kind0 == kind1 == "OutputDirError"
    assert msg0 == msg1, (msg0, msg1)
    assert msg0.startswith("train.output_dir: cannot create ")
    if name == "under_sys":
        assert UNDER_SYS in msg0 and re.search(r"Operation not permitted|Read-only file system|Permission denied", msg0)
    else:
        assert "file.txt/out (Not a directory)" in msg0
    assert max(s0, s1) < 5


def test_a_failure_on_one_rank_is_raised_on_every_rank(scenarios: list) -> None:
    (kind0, msg0, _), (kind1, msg1, _) = _both(scenarios, "rank1_fails")
    assert kind0 == kind1 == "OutputDirError" and msg0 == msg1 == "rank 1's own failure"


def test_per_rank_checkpoint_write_failure_stops_both_ranks_and_keeps_the_group_usable(
    scenarios: list, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert _both(scenarios, "save_1")[0][0] == "ok" and _both(scenarios, "save_1")[1][0] == "ok"
    (kind0, msg0, s0), (kind1, msg1, s1) = _both(scenarios, "save_2_rank1_full")
    assert kind0 == kind1 == "OutputDirError"
    assert msg0 == msg1, (msg0, msg1)
    assert re.fullmatch(
        r"train\.output_dir = \S+/run: writing checkpoint \S+/run/step_2 failed \(write on rank 1\): "
        r"No space left on device; earlier checkpoints are untouched",
        msg0,
    ), msg0
    assert max(s0, s1) < 10
    assert [s["save_3"][0] for s in scenarios] == ["ok", "ok"]
    assert scenarios[0]["complete"][1] == "step_1 step_3"


def test_missing_rank_file_on_load_names_the_key_and_the_file(scenarios: list) -> None:
    (kind0, msg0, _), (kind1, msg1, _) = _both(scenarios, "load_missing_rank_file")
    assert kind0 == kind1 == "CheckpointError"
    assert msg0 == msg1, (msg0, msg1)
    assert re.fullmatch(
        r"train\.output_dir = \S+/run: cannot read checkpoint \S+/run/step_3/rank_1\.pt \(No such file or directory\)",
        msg0,
    ), msg0


def test_agreement_costs_no_more_than_a_barrier(scenarios: list) -> None:
    agree_s, barrier_s = scenarios[0]["agree_s"][2], scenarios[0]["barrier_s"][2]
    print(f"agreement {agree_s * 1e6:.0f} us, barrier {barrier_s * 1e6:.0f} us (2 gloo ranks)")
    # One all-reduce of one integer, about what the barrier it replaces costs (generous: shared, busy cores).
    assert agree_s < max(5 * barrier_s, 5e-3), (agree_s, barrier_s)


# ------------------------------------------------------------------------------------------------ jobs


def _job(sample: Path, out: Path | str, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    args = [
        "--config", "configs/default.toml", f"--data.data_paths={sample}", f"--train.output_dir={out}",
        "--train.progress_bar=false", "--model.num_layers=1", "--model.hidden_size=32", "--model.nhead=1",
        "--model.dim_feedforward=32", "--train.train_epochs=0", "--train.log_steps=1",
        f"--train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", *extra,
    ]  # fmt: skip
    start = time.monotonic()
    proc = run_job(torchrun(*args, nproc=2), timeout_s=JOB_TIMEOUT_S, merge_stderr=True)
    return proc, time.monotonic() - start


def _assert_one_clear_error(proc: subprocess.CompletedProcess[str], elapsed: float, *expected: str) -> str:
    """Non-zero, fast, the same ERROR line on both ranks naming what is expected, no rank's traceback and no
    gloo 'Connection closed by peer'. The launcher's own ChildFailedError report is torchrun's, not ours."""
    log = proc.stdout
    assert proc.returncode != 0, log[-3000:]
    assert elapsed < FAIL_WITHIN_S, (elapsed, log[-3000:])
    errors = re.findall(r"\[rank(\d)\] ERROR trainer: (.*)", log)
    assert sorted(rank for rank, _ in errors) == ["0", "1"], log[-3000:]
    messages = {message for _, message in errors}
    assert len(messages) == 1, messages
    message = messages.pop()
    for part in expected:
        assert part in message, (part, message)
    assert not re.search(r"^\[rank\d\]: Traceback", log, re.MULTILINE), log[-3000:]
    assert "Connection closed by peer" not in log, log[-3000:]
    return message


@pytest.mark.slow
def test_uncreatable_output_dir_fails_the_job_with_one_line(sample_dir: Path) -> None:
    # The folder below a file fails the same way (the component test above covers its message).
    proc, elapsed = _job(sample_dir, UNDER_SYS, "--train.train_steps=2")
    message = _assert_one_clear_error(proc, elapsed, "OutputDirError: train.output_dir: cannot create", UNDER_SYS)
    print(f"{elapsed:.1f}s: {message}")


@pytest.mark.slow
def test_checkpoint_write_failure_mid_run_fails_the_job_with_one_line(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "step_2").write_text("a file where rank 0 publishes the checkpoint\n")
    proc, elapsed = _job(sample_dir, out, "--train.train_steps=2", "--train.save_steps=2")
    _assert_one_clear_error(
        proc, elapsed, f"OutputDirError: train.output_dir = {out}: writing checkpoint {out / 'step_2'} failed (publish)"
    )
    assert "step 2/2" in proc.stdout  # it trained up to the checkpoint
    assert (out / "step_2").is_file() and not list(out.glob("step_*/COMPLETE"))
