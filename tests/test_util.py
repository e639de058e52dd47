"""The shared process helpers (tests/util.py): what every multi-rank test relies on when it fails.

A failing rank must fail the test with that rank's traceback, a hung rank must fail it within the timeout,
and no rank or job may outlive the call. The functions the ranks run are here, at module level, so the
spawned ranks can import them; most import nothing heavy, so a spawn costs about a second.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from typing import Any

import pytest

from tests.util import RanksFailed, free_port, python_module, run_job, run_ranks, start_ranks, torchrun


def _environment_and_all_reduce(rank: int, tag: str) -> dict[str, Any]:
    """What a rank sees, and a gloo all-reduce over a group made from nothing but that environment."""
    import torch
    import torch.distributed as dist

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    seen: dict[str, Any] = {n: os.environ.get(n, "") for n in names}
    dist.init_process_group("gloo")
    try:
        total = torch.tensor([float(rank + 1)])
        dist.all_reduce(total)
    finally:
        dist.destroy_process_group()
    threads = torch.get_num_threads()
    return {**seen, "rank": rank, "tag": tag, "pid": os.getpid(), "sum": total.item(), "threads": threads}


def _mixed_failures(rank: int) -> str:
    if rank == 1:
        raise ValueError("bad input on rank 1")
    if rank == 2:
        os._exit(3)  # dies without a word, as a crashed rank does
    time.sleep(120)  # rank 0 would wait for the others in a collective
    return "never"


def _sleep_forever(rank: int) -> None:
    time.sleep(3600)


def _rank_processes() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if re.fullmatch(r"rank\d+-of-\d+", p.name)]


def _gone(pid: int) -> bool:
    """No such process, or a zombie: an orphan's exit status waits for a PID 1 that may never reap it."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.slow
def test_ranks_see_their_environment_form_a_gloo_group_and_return_in_rank_order() -> None:
    results = run_ranks(_environment_and_all_reduce, 2, ("x",), timeout_s=120)
    assert [r["rank"] for r in results] == [0, 1] and {r["tag"] for r in results} == {"x"}
    for rank, r in enumerate(results):
        assert (r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"]) == (str(rank), str(rank), "2", "2")
        assert r["MASTER_ADDR"] == "127.0.0.1" and int(r["MASTER_PORT"]) > 0
        assert r["OMP_NUM_THREADS"] == "1" and r["threads"] == 1
        assert r["sum"] == 1 + 2
    assert len({r["MASTER_PORT"] for r in results}) == 1 and len({r["pid"] for r in results}) == 2
    assert _rank_processes() == [] and all(_gone(r["pid"]) for r in results)


@pytest.mark.slow
def test_a_failing_rank_fails_with_its_traceback_and_stops_the_others() -> None:
    start = time.monotonic()
    with start_ranks(_mixed_failures, 3, timeout_s=120, grace_s=2) as group:
        outcomes = group.outcomes()
        with pytest.raises(RanksFailed) as failed:
            group.results()
    assert time.monotonic() - start < 60
    assert _rank_processes() == []
    # Per rank: the raising rank's own traceback, down to the line that raised; the rank that died, with its
    # exit code; the waiting rank stopped after the grace period, with its stack (where it waited).
    assert [o.rank for o in outcomes] == [0, 1, 2] and not any(o.ok for o in outcomes)
    errors = [o.error or "" for o in outcomes]
    assert "ValueError: bad input on rank 1" in errors[1] and 'raise ValueError("bad input on rank 1")' in errors[1]
    assert errors[2] == "rank 2 exited (code 3) without a result"
    assert errors[0].startswith("rank 0 was stopped: still running 2s after rank")
    assert "its stacks" in errors[0] and "_mixed_failures" in errors[0]
    # The assertion message: the first failure first, then the others.
    message = str(failed.value)
    assert re.match(r"rank [12] of 3 failed:\n", message), message[:200]
    assert all(f"rank {r} of 3 failed:" in message for r in range(3))
    assert all(error in message for error in errors)


@pytest.mark.slow
def test_a_hung_rank_fails_at_the_timeout_showing_where_it_hangs() -> None:
    start = time.monotonic()
    with pytest.raises(RanksFailed, match="gave no result within the 5s timeout") as failed:
        run_ranks(_sleep_forever, 2, timeout_s=5)
    assert "_sleep_forever" in str(failed.value)  # the hung rank's stack
    assert time.monotonic() - start < 30
    assert _rank_processes() == []


def test_torchrun_command() -> None:
    assert torchrun("--config", "c.toml", nproc=2) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
        "--rdzv_endpoint=localhost:0", "--max_restarts=0", "-m", "trainer.main", "--config", "c.toml",
    ]  # fmt: skip
    port = free_port()
    cmd = torchrun(nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=1, launcher_args=["--rdzv_id", "x"])
    assert cmd[3:10] == [
        "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
        "--max_restarts=1", "--rdzv_id", "x",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_job_past_its_timeout_fails_and_takes_its_children_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stale one-rank group's variables in the test process must not reach the job.
    monkeypatch.setenv("RANK", "5")
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print('child', child.pid, 'rank', os.environ.get('RANK'), flush=True)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(AssertionError, match="still running after 2s") as failed:
        run_job([sys.executable, "-c", script], timeout_s=2)
    found = re.search(r"child (\d+) rank None", str(failed.value))
    assert found, str(failed.value)
    deadline = time.monotonic() + 10
    while not _gone(int(found.group(1))):  # killed with the job's process group, reaped by init
        assert time.monotonic() < deadline, "the job's child outlived it"
        time.sleep(0.1)


def test_run_job_returns_exit_code_and_output() -> None:
    done = run_job(python_module("json.tool", "--help"), timeout_s=60)
    assert done.returncode == 0 and "usage" in done.stdout and done.stderr == ""
