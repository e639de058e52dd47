"""Process helpers shared by the tests that start real ranks or real launchers.

Two ways a test gets several ranks:

- ``run_ranks`` / ``start_ranks``: a Python callable on N gloo ranks in spawned processes, results (or the
  failing rank's traceback) returned to the test. For tests of one component on a real process group.
- ``torchrun`` + ``run_job`` / ``launched``: the real launcher on ``trainer.main``, as a user runs it. For
  tests of the job as a whole (checkpoints, restarts, exit codes, logs).

Both always leave no process behind and turn a hang into a failed test. This module imports only the
standard library at the top: a spawned rank imports it before its own environment is set.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import multiprocessing
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Generic, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
# The virtualenv's scripts (torchx, ...). Jobs get it first on PATH: the torchx component runs `python`
# from PATH on the worker, as launch.sh arranges with the venv first.
VENV_BIN = Path(sys.executable).parent

T = TypeVar("T")


def tiny_leave_one_out(data: Path, output_dir: Path) -> list[str]:
    """Overrides of ``configs/default.toml`` for an in-process run that trains and evaluates in seconds: a
    one-layer, 32-wide model on ``data`` with leave-one-out targets, writing to ``output_dir``."""
    return [
        f"--data.data_paths={data}", f"--train.output_dir={output_dir}", "--data.holdout_positions=2",
        "--model.target_features=[\"item_id\"]", "--model.num_layers=1", "--model.hidden_size=32",
        "--model.nhead=1", "--model.dim_feedforward=32", "--train.progress_bar=false", "--eval.candidates=data",
    ]  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Only for launchers that must be told a port (torchrun's ``--rdzv_endpoint``): another process may take
    it before they bind it. ``start_ranks`` needs none: it hosts the store on a port it already holds.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------- ranks in processes


@dataclass(frozen=True)
class RankOutcome(Generic[T]):
    """How one rank ended: its return value, or ``error`` (its traceback, or why it has none)."""

    rank: int
    value: T | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class RanksFailed(AssertionError):
    """Some rank raised, died or hung; the message holds each failed rank's traceback, first failure first."""


def _rank_main(payload: bytes, rank: int, env: dict[str, str], conn: Connection, stacks: str) -> None:
    """Entry point of a spawned rank: set the rank's environment, then unpickle and call the test's function.

    The function travels pickled inside ``payload`` so that its module (and torch with it) is imported only
    after ``OMP_NUM_THREADS`` and the rest are set. Whatever happens is reported through ``conn``.
    """
    os.environ.update(env)
    if hasattr(signal, "SIGUSR1"):  # the parent asks a hung rank for its stacks with SIGUSR1
        dump = open(stacks, "w")  # noqa: SIM115 - must stay open for faulthandler until the process ends
        faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    code = 0
    try:
        fn, args, kwargs = pickle.loads(payload)
        if "torch" in sys.modules:  # imported before OMP_NUM_THREADS was set (by the parent's main module)
            sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
        message = pickle.dumps(("ok", fn(rank, *args, **kwargs)))
    except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures of the rank too
        message, code = pickle.dumps(("error", traceback.format_exc())), 1
    try:
        conn.send_bytes(message)
    finally:
        conn.close()
        # Exit now, running the atexit handlers (multiprocessing joins the rank's own children, logging
        # flushes, finalizers) but not the interpreter's teardown: with torch and torchrec loaded that takes
        # ~2 s per rank on two cores, for nothing once the result is sent.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class RankGroup(Generic[T]):
    """N spawned ranks running one function. Use as a context manager: leaving it stops every rank.

    Made by ``start_ranks``; ``outcomes()`` waits for all ranks, ``results()`` also asserts they all
    succeeded. Starting two groups before waiting on either runs them side by side.
    """

    def __init__(
        self,
        fn: Callable[..., T],
        world_size: int,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        timeout_s: float,
        grace_s: float,
        threads_per_rank: int,
        env: Mapping[str, str],
    ) -> None:
        import torch.distributed as dist  # here, not at the top: ranks import this module before torch

        self.world_size = world_size
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        # The rendezvous store lives here, as torchrun's agent hosts it for its workers: bound to port 0, so
        # no port is chosen and released and then lost to another job on the machine before rank 0 binds it.
        # TORCHELASTIC_USE_AGENT_STORE makes every rank's env:// rendezvous a client of it.
        self._store: Any = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        self._tmp = tempfile.TemporaryDirectory(prefix="ranks-")
        self._outcomes: dict[int, RankOutcome[T]] = {}
        self._failed_order: list[int] = []
        self._failure_time = 0.0
        self._given_up: set[int] = set()  # ranks declared hung: close() stops them without waiting
        ctx = multiprocessing.get_context("spawn")  # fork would copy the test process's threads and locks
        payload = pickle.dumps((fn, tuple(args), dict(kwargs)))
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        try:
            for rank in range(world_size):
                rank_env = {
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self._store.port),
                    "TORCHELASTIC_USE_AGENT_STORE": "True",
                    "RANK": str(rank), "WORLD_SIZE": str(world_size),
                    "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
                    # Ranks share the test machine's cores: one thread each, as torchrun sets for nproc > 1.
                    "OMP_NUM_THREADS": str(threads_per_rank),
                    **env,
                }  # fmt: skip
                parent_end, child_end = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_rank_main,
                    args=(payload, rank, rank_env, child_end, self._stacks_path(rank)),
                    name=f"rank{rank}-of-{world_size}",
                )
                proc.start()
                child_end.close()  # the rank holds the only write end: its death reads as EOF here
                self._procs.append(proc)
                self._conns.append(parent_end)
        except BaseException:
            self.close()
            raise
        self._deadline = time.monotonic() + timeout_s

    def __enter__(self) -> RankGroup[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stacks_path(self, rank: int) -> str:
        return os.path.join(self._tmp.name, f"stacks{rank}.txt")

    def _fail(self, rank: int, error: str) -> None:
        self._outcomes[rank] = RankOutcome(rank, error=error)
        self._failed_order.append(rank)

    def _receive(self, rank: int) -> None:
        conn, proc = self._conns[rank], self._procs[rank]
        try:
            kind, body = pickle.loads(conn.recv_bytes())
        except EOFError:
            proc.join(5)
            self._fail(rank, f"rank {rank} exited (code {proc.exitcode}) without a result")
            return
        except Exception:  # noqa: BLE001 - e.g. the result's class cannot be imported here
            self._fail(rank, f"rank {rank}'s result could not be read:\n{traceback.format_exc()}")
            return
        if kind == "ok":
            self._outcomes[rank] = RankOutcome(rank, value=body)
        else:
            self._fail(rank, body)

    def _stacks_of(self, ranks: list[int]) -> dict[int, str]:
        """Ask ranks still running for their Python stacks (where a hang sits), briefly."""
        alive = [r for r in ranks if self._procs[r].is_alive()]
        if not alive or not hasattr(signal, "SIGUSR1"):
            return {}
        for r in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._procs[r].pid, signal.SIGUSR1)
        stacks: dict[int, str] = {}
        give_up = time.monotonic() + 2.0  # a rank still starting up has no handler yet: it writes nothing
        while len(stacks) < len(alive) and time.monotonic() < give_up:
            time.sleep(0.05)
            for r in alive:
                with contextlib.suppress(OSError):
                    if text := Path(self._stacks_path(r)).read_text(errors="replace"):
                        stacks[r] = text[-4000:]
        return stacks

    def outcomes(self) -> list[RankOutcome[T]]:
        """Wait for every rank, at most until the group's timeout; one outcome per rank, in rank order.

        Once a rank has failed the others get ``grace_s`` more: they are usually blocked in a collective
        with the dead rank and would otherwise sit there until the timeout.
        """
        while len(self._outcomes) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in self._outcomes]
            now = time.monotonic()
            limit = self._deadline
            if self._failed_order:
                limit = min(limit, self._failure_time + self.grace_s)
            if now >= limit:
                stacks = self._stacks_of(pending)
                for r in pending:
                    if self._failed_order:
                        first = self._failed_order[0]
                        why = f"rank {r} was stopped: still running {self.grace_s:.0f}s after rank {first} failed"
                    else:
                        why = f"rank {r} gave no result within the {self.timeout_s:.0f}s timeout"
                    self._fail(r, why + (f"; its stacks:\n{stacks[r]}" if r in stacks else ""))
                    self._given_up.add(r)
                break
            waitables: list[Any] = [self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending]
            ready = wait(waitables, timeout=limit - now)
            for r in pending:
                # A rank that wrote its result and exited shows both; the pipe still holds the result.
                if self._conns[r] in ready or self._procs[r].sentinel in ready:
                    had_failed = bool(self._failed_order)
                    self._receive(r)
                    if not had_failed and self._failed_order:
                        self._failure_time = time.monotonic()
        self.close()
        return [self._outcomes[r] for r in range(self.world_size)]

    def results(self) -> list[T]:
        """Every rank's return value, in rank order; raises ``RanksFailed`` if any rank did not return."""
        outcomes = self.outcomes()
        if self._failed_order:
            parts = [f"rank {r} of {self.world_size} failed:\n{outcomes[r].error}" for r in self._failed_order]
            raise RanksFailed("\n\n".join(parts))
        return [o.value for o in outcomes]  # type: ignore[misc]

    def close(self) -> None:
        """Stop the ranks still running and release pipes, store and files.

        A rank that has sent its result gets a few seconds to exit by itself (tearing down its process
        group, its own workers); then SIGTERM, then SIGKILL.
        """
        exit_by = time.monotonic() + 5.0
        for rank, proc in enumerate(self._procs):
            if rank not in self._given_up:
                proc.join(max(0.0, exit_by - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()
        self._store = None
        self._tmp.cleanup()


def start_ranks(
    fn: Callable[..., T],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 240.0,
    grace_s: float = 10.0,
    threads_per_rank: int = 1,
    env: Mapping[str, str] | None = None,
) -> RankGroup[T]:
    """Start ``fn(rank, *args, **kwargs)`` on ``world_size`` spawned ranks; returns at once.

    Each rank has MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE set as
    torchrun sets them (one node), so ``dist.init_process_group("gloo")`` or ``trainer.dist.init_distributed``
    join the group with no further arguments; ``env`` adds or overrides variables. ``fn``, the arguments
    and the return value must be picklable (``fn`` at module level). ``timeout_s`` runs from the start.
    """
    return RankGroup(fn, world_size, args, kwargs or {}, timeout_s, grace_s, threads_per_rank, env or {})


def run_ranks(
    fn: Callable[..., T],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> list[T]:
    """``fn(rank, *args, **kwargs)`` on ``world_size`` ranks; every rank's return value, in rank order.

    Raises ``RanksFailed`` (an AssertionError, so pytest shows it as a failed check) with the failing
    rank's traceback when a rank raises, dies or runs past the timeout. ``options``: see ``start_ranks``.
    """
    with start_ranks(fn, world_size, args, kwargs, **options) as group:
        return group.results()


# ------------------------------------------------------------------------------------- launcher commands


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter (the venv's)."""
    return [sys.executable, "-m", module, *args]


def torchrun(
    *trainer_args: str,
    nproc: int = 1,
    nnodes: int = 1,
    rdzv_endpoint: str = "localhost:0",
    max_restarts: int = 0,
    launcher_args: Sequence[str] = (),
    module: str = "trainer.main",
) -> list[str]:
    """The torchrun command line of a job on this machine: ``nproc`` ranks per node over a c10d rendezvous.

    ``localhost:0`` lets a one-node torchrun pick its own free port; a multi-node test passes a port its
    agents share, and ``launcher_args`` for the rest (``--rdzv_id``, ``--rdzv_conf``).
    """
    return python_module(
        "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--max_restarts={max_restarts}",
        *launcher_args, "-m", module, *trainer_args,
    )  # fmt: skip


# A one-rank process group made in the test process (``init_distributed`` outside torchrun) leaves these in
# os.environ; a job that inherited them would take them for its own rank and rendezvous.
_RANK_VARS = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"})


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched job: this process's, less any rank variables left by an in-process
    group, with the venv's scripts first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    return {**env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}


def _stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a job started by ``launched``: SIGTERM to its process group, SIGKILL if it lingers.

    SIGTERM first: torchrun starts its workers in sessions of their own, and only torchrun, on SIGTERM,
    stops them; killing it outright would leave them running.
    """
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
            return


@contextlib.contextmanager
def launched(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
) -> Iterator[subprocess.Popen[str]]:
    """Start ``cmd`` in the repository, in a session of its own; leaving the block stops what is left of it.

    For tests that act while the job runs (kill a rank, start a second node agent). ``env`` is added to
    ``job_env()``.
    """
    proc = subprocess.Popen(
        list(cmd), cwd=REPO_ROOT, env=job_env(env), stdout=stdout, stderr=stderr, text=True, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _stop(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run_job(
    cmd: Sequence[str],
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to its end and return its exit code and output (stderr into stdout if ``merge_stderr``).

    A job still running after ``timeout_s`` is stopped and fails the test with the tail of its output.
    """
    with launched(cmd, env=env, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a process outside its group (a torchrun worker) holds the pipe
                out, err = "", "(output not readable: a process of the job still holds its pipe)"
            tail = f"{(out or '')[-3000:]}\n{(err or '')[-3000:]}"
            message = f"{shlex.join(cmd)} still running after {timeout_s:.0f}s; output tail:\n{tail}"
            raise AssertionError(message) from None
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err or "")
