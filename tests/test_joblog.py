"""runtime.joblog, the filter launch.sh puts on torchx's stderr: rank lines pass live, torchrun's and torchx's
failure blocks fold away, and a failed job ends with the failing rank's log path and message.

The unit tests feed it output captured from a real failing ``./launch.sh`` (a checkpoint of another model
size, two CPU ranks), trimmed; the slow test makes that failure happen for real.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.joblog import JobLogFilter, clean
from tests.util import REPO_ROOT, python_module, run_job, tiny_leave_one_out

APP = "seqrec-rq5r07c76xkmkc"
MESSAGE = (
    "CheckpointError: checkpoint /tmp/jl/run/step_2 does not fit this config: "
    "model.hidden_size: 128 in the checkpoint, 64 now"
)


def _lines(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


# Captured from `./launch.sh ... --model.hidden_size=64` on a run folder trained with 128 (sharding tables
# trimmed). {app_dir} is where torchx wrote the job's logs.
HEAD = """\
torchx 2026-12-07 22:52:55 INFO     Tracker configurations: {{}}
torchx 2026-12-07 22:52:55 INFO     Log directory is: {log_dir}
torchx 2026-12-07 22:52:55 INFO     Waiting for the app to finish...
trainer/0 [default1]:22:53:00 [rank1] INFO trainer.dist: rank 1/2 (local 1/2) on cpu with gloo
trainer/0 [default0]:22:53:00 [rank0] INFO trainer.dist: rank 0/2 (local 0/2) on cpu with gloo
trainer/0 [default0]:22:53:00 [rank0] INFO trainer.sharding: sharding plan:
trainer/0 [default0]:module: model.sparse.embedding_collection
trainer/0 [default0]:
trainer/0 [default0]:   param    | sharding type | compute kernel | ranks
trainer/0 [default0]:----------- | ------------- | -------------- | ------
trainer/0 [default0]:item_id     | row_wise      | fused          | [0, 1]
"""
RANK_ERRORS = _lines(
    f"trainer/0 [default0]:22:53:00 [rank0] ERROR trainer: {MESSAGE}",
    f"trainer/0 [default1]:22:53:00 [rank1] ERROR trainer: {MESSAGE}",
)
AGENT_LINES = _lines(
    "trainer/0 W1207 22:53:01.727000 304 torch/distributed/elastic/multiprocessing/api.py:1028] "
    "Sending process 335 closing signal SIGTERM",
    "trainer/0 E1207 22:53:01.913000 304 torch/distributed/elastic/multiprocessing/api.py:1002] "
    "failed (exitcode: 1) local_rank: 0 (pid: 334) of binary: /work/main/.venv/bin/python",
)
# Two lines end in a space, as torchrun writes them.
CHILD_FAILED = _lines(
    "trainer/0 Traceback (most recent call last):",
    'trainer/0   File "<frozen runpy>", line 198, in _run_module_as_main',
    'trainer/0   File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1032, in <module>',
    "trainer/0     main()",
    'trainer/0   File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, '
    "in launch_agent",
    "trainer/0     raise ChildFailedError(",
    "trainer/0 torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    "trainer/0 ============================================================",
    "trainer/0 trainer.main FAILED",
    "trainer/0 ------------------------------------------------------------",
    "trainer/0 Failures:",
    "trainer/0 [1]:",
    "trainer/0   time      : 2026-12-07_22:53:01",
    "trainer/0   host      : localhost",
    "trainer/0   rank      : 1 (local_rank: 1)",
    "trainer/0   exitcode  : -15 (pid: 335)  (SIGTERM)",
    "trainer/0   error_file: <N/A>",
    "trainer/0   traceback : Signal 15 (SIGTERM) received by PID 335",
    "trainer/0 ------------------------------------------------------------",
    "trainer/0 Root Cause (first observed failure):",
    "trainer/0 [0]:",
    "trainer/0   time      : 2026-12-07_22:53:01",
    "trainer/0   host      : localhost",
    "trainer/0   rank      : {root_rank} (local_rank: {root_rank})",
    "trainer/0   exitcode  : {root_exitcode} (pid: 334) ",
    "trainer/0   error_file: <N/A>",
    "trainer/0   traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
    "trainer/0 ============================================================",
)
FINISHED = "torchx 2026-12-07 22:53:02 INFO     Job finished: {state}\n"
APP_STATUS = """\
torchx 2026-12-07 22:53:02 ERROR    AppStatus:
  msg: <NONE>
  num_restarts: 0
  roles: []
  state: FAILED (5)
  structured_error_msg: <NONE>
  ui_url: file://{app_dir}

"""
SUCCEEDED_TAIL = """\
trainer/0 [default0]:train:  50%|#####     | 1/2 [00:00<?, ?step/s]
trainer/0 [default0]:22:52:39 [rank0] INFO trainer.checkpoint: saved checkpoint /tmp/jl/run/step_2 in 0.09s
trainer/0 [default1]:22:52:39 [rank1] INFO trainer.trainer: finished after 2 steps
trainer/0 [default0]:train: 100%|##########| 2/2 [00:00<00:00,  3.70step/s]
trainer/0 [default0]:22:52:39 [rank0] INFO trainer.trainer: finished after 2 steps
torchx 2026-12-07 22:52:41 INFO     Job finished: SUCCEEDED
"""
FOLDED = ("ChildFailedError", "Root Cause", "Failures:", "AppStatus", "ui_url", "To enable traceback", "  File ")


def _layout(log_dir: Path) -> Path:
    """torchx's log folder of one job as local_cwd writes it: the replica's logs and each rank's."""
    app_dir = log_dir / "torchx" / APP
    (app_dir / "trainer" / "0").mkdir(parents=True)
    (app_dir / "trainer" / "0" / "stderr.log").write_text("replica\n")
    for rank in (0, 1):
        rank_dir = app_dir / "torchelastic" / "trainer" / f"{APP}_r5n9g20c" / "attempt_0" / str(rank)
        rank_dir.mkdir(parents=True)
        (rank_dir / "stderr.log").write_text(f"rank {rank}\n")
    return app_dir


def _rank_log(app_dir: Path, rank: int) -> Path:
    return app_dir / "torchelastic" / "trainer" / f"{APP}_r5n9g20c" / "attempt_0" / str(rank) / "stderr.log"


def _failed_job(log_dir: Path, app_dir: Path, root_rank: int = 0, root_exitcode: str = "1") -> str:
    table = CHILD_FAILED.format(root_rank=root_rank, root_exitcode=root_exitcode)
    return (
        HEAD.format(log_dir=log_dir) + RANK_ERRORS + AGENT_LINES + table + FINISHED.format(state="FAILED")
        + APP_STATUS.format(app_dir=app_dir)
    )  # fmt: skip


def _filter(text: str | bytes, log_dir: Path) -> str:
    """What the filter writes for ``text``, fed line by line as torchx writes it."""
    data = text.encode() if isinstance(text, str) else text
    job = JobLogFilter(log_dir)
    out = [line for raw in data.splitlines(keepends=True) for line in job.feed(raw)]
    return b"".join(out + job.finish()).decode("utf-8", errors="replace")


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "torchx_logs"


def test_a_failed_job_ends_with_the_rank_log_and_the_message(log_dir: Path) -> None:
    app_dir = _layout(log_dir)
    text = _failed_job(log_dir, app_dir)
    out = _filter(text, log_dir)
    lines = out.splitlines()
    assert lines[-2:] == [f"full logs: {_rank_log(app_dir, 0)}", f"rank 0 failed: {MESSAGE}"]
    # Every line of the ranks, the agent's own one-line notes and torchx's state pass unchanged, in order.
    kept = HEAD.format(log_dir=log_dir) + RANK_ERRORS + AGENT_LINES + FINISHED.format(state="FAILED")
    assert out == kept + "\n".join(lines[-2:]) + "\n"
    for folded in FOLDED:
        assert folded not in out


def test_the_root_cause_rank_is_the_one_named(log_dir: Path) -> None:
    # Rank 1 failed first by torchrun's table: its message and its own log, though rank 0's ERROR came first.
    app_dir = _layout(log_dir)
    lines = _filter(_failed_job(log_dir, app_dir, root_rank=1), log_dir).splitlines()
    assert lines[-2:] == [f"full logs: {_rank_log(app_dir, 1)}", f"rank 1 failed: {MESSAGE}"]


def test_a_successful_job_passes_unchanged(log_dir: Path) -> None:
    text = HEAD.format(log_dir=log_dir) + SUCCEEDED_TAIL
    assert _filter(text, log_dir) == text
    # Progress-bar redraws (\r), bad UTF-8 and a last line without newline: byte for byte as well.
    raw = b"trainer/0 [default0]:train: 1/2\rtrainer/0 [default0]:train: 2/2\r\n\xff\xfe not utf-8\nno newline"
    job = JobLogFilter(log_dir)
    assert b"".join(line for r in raw.splitlines(keepends=True) for line in job.feed(r)) + b"".join(job.finish()) == raw


def test_unknown_lines_and_other_tracebacks_are_never_hidden(log_dir: Path) -> None:
    # torchrun failing by itself (no rank to blame): its traceback is shown as it is, and named at the end.
    own = (
        "trainer/0 Traceback (most recent call last):\n"
        'trainer/0   File "torch/distributed/run.py", line 1032, in <module>\n'
        "trainer/0 torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError: timed out\n"
    )
    stray = "something nobody expected\ntrainer/0 an agent line\n"
    text = HEAD.format(log_dir=log_dir) + own + stray + FINISHED.format(state="FAILED")
    out = _filter(text, log_dir)
    assert out.startswith(text)
    assert (
        out.splitlines()[-1]
        == "torchrun failed: torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError: timed out"
    )
    # A traceback cut off by the end of the input is released, not swallowed.
    cut = 'trainer/0 Traceback (most recent call last):\ntrainer/0   File "x.py", line 1, in <module>\n'
    assert _filter(cut, log_dir) == cut
    # A line after the table that is not part of it ends the folding.
    table = CHILD_FAILED.format(root_rank=0, root_exitcode="1").splitlines(keepends=True)
    broken = "".join(table[:12]) + "trainer/0 I1207 torchrun went on\n"
    assert _filter(broken, log_dir).startswith("trainer/0 I1207 torchrun went on\n")


def test_coloured_prefixes_on_a_terminal_are_recognised(log_dir: Path) -> None:
    # torchx colours its prefixes when stdout is a terminal, which launch.sh keeps it.
    app_dir = _layout(log_dir)
    plain = _failed_job(log_dir, app_dir).splitlines(keepends=True)
    stamp = "2026-12-07 22:53:02 ERROR   "
    coloured = "".join(
        line.replace("trainer/0 ", "\x1b[32mtrainer/0\x1b[0m ", 1).replace(
            f"torchx {stamp}", f"\x1b[34mtorchx\x1b[0m \x1b[2m{stamp}\x1b[0m"
        )
        for line in plain
    )
    out = _filter(coloured, log_dir)
    assert out.splitlines()[-1] == f"rank 0 failed: {MESSAGE}"
    assert "ChildFailedError" not in out and "AppStatus" not in out
    assert clean(b"\x1b[32mtrainer/0\x1b[0m x\r\n") == "trainer/0 x"


def test_without_an_error_line_the_rank_traceback_or_exit_code_is_named(log_dir: Path) -> None:
    app_dir = _layout(log_dir)
    uncaught = (
        "trainer/0 [default0]:Traceback (most recent call last):\n"
        'trainer/0 [default0]:  File "trainer/trainer.py", line 10, in train\n'
        "trainer/0 [default0]:RuntimeError: boom\n"
    )
    table = CHILD_FAILED.format(root_rank=0, root_exitcode="1")
    out = _filter(uncaught + table + APP_STATUS.format(app_dir=app_dir), log_dir)
    assert out.startswith(uncaught)
    assert out.splitlines()[-2:] == [f"full logs: {_rank_log(app_dir, 0)}", "rank 0 failed: RuntimeError: boom"]
    # Killed by a signal (the OOM killer): no message, but the rank and how it ended.
    killed = CHILD_FAILED.format(root_rank=1, root_exitcode="-9") + APP_STATUS.format(app_dir=app_dir)
    assert _filter(killed, log_dir).splitlines()[-1] == "rank 1 failed: exit code -9 (no message; see its log)"


def test_a_multi_line_error_is_shown_whole(log_dir: Path) -> None:
    text = (
        "trainer/0 [default0]:22:53:00 [rank0] ERROR trainer: bad config: 2 problems:\n"
        "trainer/0 [default1]:22:53:00 [rank1] INFO trainer.dist: rank 1/2\n"
        "trainer/0 [default0]:  - model.num_layer: unknown key (did you mean model.num_layers?)\n"
        "trainer/0 [default0]:  - data.batch_size: must be > 0\n"
        "trainer/0 [default0]:[W1207 gloo] exiting\n"
        + FINISHED.format(state="FAILED")
    )  # fmt: skip
    lines = _filter(text, log_dir).splitlines()
    assert lines[-4:] == [
        f"full logs: {log_dir}",  # no torchx folder to point into
        "rank 0 failed: bad config: 2 problems:",
        "  - model.num_layer: unknown key (did you mean model.num_layers?)",
        "  - data.batch_size: must be > 0",
    ]


def test_the_cli_ignores_ctrl_c_and_a_closed_reader(log_dir: Path) -> None:
    app_dir = _layout(log_dir)
    text = _failed_job(log_dir, app_dir).encode()
    cmd = python_module("runtime.joblog", "--log-dir", str(log_dir))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(text[:200])
    proc.stdin.flush()
    assert proc.stderr.readline()  # live: the first line is out before the input ends
    time.sleep(0.2)  # the first line came after the handler was set, but be sure of it
    proc.send_signal(signal.SIGINT)  # as Ctrl-C in the terminal: it must keep going until torchx is done
    proc.stdin.write(text[200:])
    proc.stdin.close()
    rest = proc.stderr.read().decode()
    assert proc.wait(10) == 0
    assert rest.splitlines()[-1] == f"rank 0 failed: {MESSAGE}"
    # `./launch.sh 2>&1 | head -1`: the reader goes away; the filter reads on to the end (torchx never blocks).
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stderr.close()
    proc.stdin.write(text * 50)
    proc.stdin.close()
    assert proc.wait(10) == 0


@pytest.mark.slow
def test_launch_sh_ends_a_rank_failure_with_its_message(sample_dir: Path, tmp_path: Path) -> None:
    # Resuming from a checkpoint of another model size: only the ranks can tell (the config itself is valid).
    out = tmp_path / "run"
    env = {"SEQREC_ENV": "current", "SEQREC_PYTHON": sys.executable, "SEQREC_NPROC": "2"}
    launch = [str(REPO_ROOT / "launch.sh"), *tiny_leave_one_out(sample_dir, out), "--train.log_steps=1"]
    first = run_job([*launch, "--train.train_steps=2", "--train.save_steps=2"], timeout_s=120, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "step_2" / "COMPLETE").is_file()

    start = time.monotonic()
    proc = run_job([*launch, "--train.train_steps=4", "--model.hidden_size=64"], timeout_s=120, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchx's exit code
    *_, path_line, last = proc.stderr.splitlines()
    # Both ranks find the mismatch; whichever torchrun names first is the one shown.
    assert re.fullmatch(
        rf"rank [01] failed: CheckpointError: train.output_dir = {re.escape(str(out))}: checkpoint "
        rf"{re.escape(str(out / 'step_2'))} does not fit this config: model.hidden_size: 32 in the checkpoint, "
        r"64 now; to start a new run instead, pick another train.output_dir or pass --no-resume",
        last,
    ), last
    assert path_line.startswith("full logs: ")
    rank_log = Path(path_line.removeprefix("full logs: "))
    assert rank_log.is_file() and rank_log.name == "stderr.log"
    assert "CheckpointError" in rank_log.read_text()
    for folded in ("ChildFailedError", "AppStatus", "Root Cause"):
        assert folded not in proc.stderr
    # stdout stays torchx's (and launch.sh's) own: the app handle, no log lines.
    assert "local_cwd://torchx/seqrec-" in proc.stdout and "[rank0]" not in proc.stdout
    assert elapsed < 90  # about 10 s on two idle cores; a hang is run_job's timeout
