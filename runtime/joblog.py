"""The launcher's view of a job's output: rank lines as they come, the failing rank's message last.

``python -m runtime.joblog --log-dir DIR`` reads what ``torchx run`` writes to stderr (every rank's lines,
prefixed ``trainer/0 [default0]:``, torchrun's own lines, torchx's log) on stdin and writes it to stderr, line
by line. When a rank fails, torchrun then prints its ``ChildFailedError`` traceback and ``Failures:`` /
``Root Cause`` table (~40 lines ending in a link about enabling tracebacks) and torchx an ``AppStatus`` block:
both are folded away, and the output ends with the per-rank log of the failing rank and its message::

    full logs: outputs/torchx_logs/torchx/seqrec-xxx/torchelastic/trainer/<run>/attempt_0/0/stderr.log
    rank 0 failed: CheckpointError: checkpoint outputs/run/step_2 does not fit this config: ...

Anything it does not recognise passes through unchanged, and a job that did not fail gets nothing added.
It runs in the launcher, before anything heavy: standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# torchx colours its prefixes and log levels when its stdout is a terminal (launch.sh keeps stdout one).
_ANSI = re.compile(r"\x1b\[[0-9;:]*[A-Za-z]")
# torchx's prefix of a replica's lines: ``role/replica ``.
_REPLICA = re.compile(r"^(?P<role>[\w.-]+)/(?P<replica>\d+) (?P<rest>.*)$")
# torchrun's (--tee) prefix of a rank's lines: ``[default<local_rank>]:``.
_RANK = re.compile(r"^\[[A-Za-z_]+(?P<local>\d+)\]:(?P<rest>.*)$")
# runtime/logs.py's format, as a rank writes it: ``HH:MM:SS [rankN] LEVEL logger: message``.
_LOG_LINE = re.compile(r"^(?:\d\d:\d\d:\d\d )?\[rank(?P<rank>\d+)\] (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<msg>.*)$")
# torchx's own log lines: ``torchx <date> <time> LEVEL message``.
_TORCHX_LINE = re.compile(r"^torchx \S+ \S+ (?P<level>[A-Z]+)\s+(?P<msg>.*)$")
_JOB_FINISHED = re.compile(r"^Job finished: (?P<state>\w+)")
_TRACEBACK = "Traceback (most recent call last):"
_CHILD_FAILED = re.compile(r"^(?:[\w.]+\.)?ChildFailedError:")
# A line of the Failures / Root Cause table that is not indented (indented ones are fields or tracebacks).
_TABLE_LINE = re.compile(r"^(?:=+|-+|\S.* FAILED|Failures:|Root Cause.*|\[\d+\]:)$")
_FIELD = re.compile(r"^\s+(?P<key>\w+)\s*: ?(?P<value>.*)$")
_ROOT_RANK = re.compile(r"^(?P<rank>\d+) \(local_rank: (?P<local>\d+)\)")
# A rank's ERROR message may go on over a few lines (every config fault at once); more is not a message.
_MAX_CONTINUATION = 20


def clean(raw: bytes) -> str:
    """The text of one output line for matching: decoded, without colours, newline or progress-bar redraws."""
    text = _ANSI.sub("", raw.decode("utf-8", errors="replace")).rstrip("\n").rstrip("\r")
    # A progress bar redrawn with \r: what is on screen is the last segment.
    return text.rsplit("\r", 1)[-1]


@dataclass
class RankError:
    """A rank's first ERROR message, with the lines that continue it."""

    rank: int
    local_rank: int | None
    where: tuple[str, str] | None  # (role, replica) of the torchx prefix
    lines: list[str]
    open: bool = True  # still taking continuation lines


@dataclass
class _AgentState:
    """Where one replica's torchrun agent is in its failure block."""

    mode: str = "idle"  # idle | traceback (maybe the ChildFailedError one) | table (folding)
    held: list[bytes] = field(default_factory=list)  # traceback lines held until we know whose it is
    rules: int = 0  # "=====" lines seen in the table: the second ends it
    in_root_cause: bool = False


@dataclass
class RootCause:
    """The Root Cause entry of torchrun's failure table."""

    rank: int | None = None
    local_rank: int | None = None
    exitcode: str = ""
    where: tuple[str, str] | None = None


class JobLogFilter:
    """Line in, lines out: ``feed`` each line of torchx's stderr, then ``finish`` at its end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._agents: dict[tuple[str, str], _AgentState] = {}
        self._errors: list[RankError] = []  # first ERROR of each rank, in order seen
        self._rank_exceptions: dict[int, str] = {}  # local rank -> last line of its uncaught traceback
        self._rank_in_traceback: set[int] = set()
        self._agent_exception = ""  # last line of a torchrun traceback that was not ChildFailedError
        self._root = RootCause()
        self._agent_failed = False
        self._in_app_status = False
        self._app_dir: Path | None = None
        self._state = ""  # torchx's "Job finished: STATE"

    # ------------------------------------------------------------------------------------------- lines

    def feed(self, raw: bytes) -> list[bytes]:
        """The lines to show for one input line (the line itself, nothing, or held lines released)."""
        text = clean(raw)
        if self._in_app_status:
            # The AppStatus block is YAML under its header: indented or blank lines, up to torchx's exit.
            if not text.strip() or text[:1].isspace():
                self._note_app_status_field(text)
                return []
            self._in_app_status = False
        replica = _REPLICA.match(text)
        if replica is None:
            return self._other_line(raw, text)
        where = (replica["role"], replica["replica"])
        rest = replica["rest"]
        rank = _RANK.match(rest)
        if rank is not None:
            self._rank_line(int(rank["local"]), where, rank["rest"])
            return [raw]
        return self._agent_line(raw, where, rest)

    def _other_line(self, raw: bytes, text: str) -> list[bytes]:
        """torchx's own lines (and anything else without a replica prefix)."""
        line = _TORCHX_LINE.match(text)
        if line is not None:
            finished = _JOB_FINISHED.match(line["msg"])
            if finished is not None:
                self._state = finished["state"]
            if line["level"] == "ERROR" and line["msg"].strip() == "AppStatus:":
                self._in_app_status = True
                return []
        return [raw]

    def _note_app_status_field(self, text: str) -> None:
        key, _, value = text.strip().partition(":")
        value = value.strip()
        if key == "ui_url" and value.startswith("file://"):
            self._app_dir = Path(value[len("file://") :])

    def _rank_line(self, local_rank: int, where: tuple[str, str], text: str) -> None:
        """Remember a rank's first ERROR (and its continuation lines) or the end of an uncaught traceback."""
        log = _LOG_LINE.match(text)
        for error in self._errors:
            if error.open and error.local_rank == local_rank and error.where == where:
                # A multi-line message goes on indented ("  - fault"); anything else of that rank (its next log
                # line, a C++ warning while it exits) is not part of it.
                if text[:1].isspace() and text.strip() and len(error.lines) <= _MAX_CONTINUATION:
                    error.lines.append(text.rstrip())
                else:
                    error.open = False
        if log is not None:
            if log["level"] in ("ERROR", "CRITICAL") and all(e.rank != int(log["rank"]) for e in self._errors):
                self._errors.append(RankError(int(log["rank"]), local_rank, where, [log["msg"]]))
            return
        # An exception the rank did not catch: its traceback's last line names it. The last traceback wins: of
        # a chain ("During handling of the above exception ...") the last one is what ended the rank.
        if text == _TRACEBACK:
            self._rank_in_traceback.add(local_rank)
        elif local_rank in self._rank_in_traceback and text and not text[0].isspace():
            self._rank_in_traceback.discard(local_rank)
            self._rank_exceptions[local_rank] = text

    def _agent_line(self, raw: bytes, where: tuple[str, str], text: str) -> list[bytes]:
        """torchrun's own lines: fold its ChildFailedError traceback and failure table, pass the rest."""
        agent = self._agents.setdefault(where, _AgentState())
        if agent.mode == "table":
            if _TABLE_LINE.match(text) or (text[:1].isspace() and text.strip()):
                self._table_line(agent, where, text)
                return []
            agent.mode = "idle"  # not the table's: it ended without its closing rule
        if agent.mode == "traceback":
            if text[:1].isspace():  # a frame of the traceback
                agent.held.append(raw)
                return []
            held, agent.held, agent.mode = agent.held, [], "idle"
            if _CHILD_FAILED.match(text):
                # The agent's report that a rank failed: the traceback is the launcher's, not the rank's.
                self._agent_failed = True
                agent.mode, agent.rules, agent.in_root_cause = "table", 0, False
                return []
            # Some other failure of torchrun itself: show it as it is, and remember what it was.
            self._agent_exception = text
            return [*held, *self._agent_line(raw, where, text)]
        if text == _TRACEBACK:
            agent.mode, agent.held = "traceback", [raw]
            return []
        return [raw]

    def _table_line(self, agent: _AgentState, where: tuple[str, str], text: str) -> None:
        if set(text) == {"="}:
            agent.rules += 1
            if agent.rules >= 2:
                agent.mode = "idle"
            return
        if text.startswith("Root Cause"):
            agent.in_root_cause = True
            return
        if set(text) == {"-"}:  # a section rule: the Root Cause section is the last one, ended by "===="
            agent.in_root_cause = False
            return
        found = _FIELD.match(text)
        if found is None or not agent.in_root_cause:
            return
        if found["key"] == "rank" and (root := _ROOT_RANK.match(found["value"])) is not None:
            self._root.rank, self._root.local_rank = int(root["rank"]), int(root["local"])
            self._root.where = where
        elif found["key"] == "exitcode" and not self._root.exitcode:
            self._root.exitcode = re.sub(r"\s*\(pid: \d+\)", "", found["value"]).strip()

    # ------------------------------------------------------------------------------------------- the end

    def finish(self) -> list[bytes]:
        """Lines held back at the end of the input, then, if the job failed, the log path and its message."""
        out = [line for agent in self._agents.values() if agent.mode == "traceback" for line in agent.held]
        if not self.failed():
            return out
        message = self._message()
        if message is None:
            return out
        summary = [f"full logs: {self._log_path()}", *message]
        return out + [f"{line}\n".encode() for line in summary]

    def failed(self) -> bool:
        """Did the job fail? torchx's final state says so when it got that far; else a rank's ERROR does."""
        if self._state:
            return self._state != "SUCCEEDED"
        return self._agent_failed or bool(self._errors)

    def _error(self) -> RankError | None:
        """The ERROR to show: the root cause rank's own (the first to fail), else the first one seen."""
        by_root = [e for e in self._errors if e.rank == self._root.rank]
        return next(iter(by_root or self._errors), None)

    def _message(self) -> list[str] | None:
        """The failing rank's message: its ERROR, else the end of its traceback, else what is known."""
        error = self._error()
        if error is not None:
            return [f"rank {error.rank} failed: {error.lines[0]}", *error.lines[1:]]
        root = self._root
        if root.local_rank is not None and root.local_rank in self._rank_exceptions:
            return [f"rank {root.rank} failed: {self._rank_exceptions[root.local_rank]}"]
        if self._rank_exceptions:
            local, exception = next(iter(self._rank_exceptions.items()))
            return [f"local rank {local} failed: {exception}"]
        if root.rank is not None:
            return [f"rank {root.rank} failed: exit code {root.exitcode or '?'} (no message; see its log)"]
        if self._agent_exception:
            return [f"torchrun failed: {self._agent_exception}"]
        if self._state:
            return [f"job {self._state}"]
        return None

    def _log_path(self) -> Path:
        """The failing rank's own log if it can be told apart, else the replica's, else the job's folder."""
        app_dir = self._app_dir
        if app_dir is None or not app_dir.is_dir():
            return self.log_dir / "torchx" if (self.log_dir / "torchx").is_dir() else self.log_dir
        failing = self._error()
        local = failing.local_rank if failing is not None else self._root.local_rank
        where = failing.where if failing is not None else self._root.where
        if where is None:
            return app_dir
        role, replica = where
        if local is not None:
            rank_log = _rank_log(app_dir, role, local)
            if rank_log is not None:
                return rank_log
        replica_log = app_dir / role / replica / "stderr.log"
        return replica_log if replica_log.is_file() else app_dir


def _rank_log(app_dir: Path, role: str, local_rank: int) -> Path | None:
    """``torchelastic/<role>/<run>/attempt_<n>/<local_rank>/stderr.log`` of the last attempt, if only one run
    (several replicas of a role each have a run folder, and the local rank alone does not pick one)."""
    runs = [p for p in (app_dir / "torchelastic" / role).glob("*") if p.is_dir()]
    if len(runs) != 1:
        return None
    attempts = sorted(runs[0].glob("attempt_*"), key=lambda p: int(p.name.rpartition("_")[2] or 0))
    for attempt in reversed(attempts):
        log = attempt / str(local_rank) / "stderr.log"
        if log.is_file():
            return log
    return None


# ----------------------------------------------------------------------------------------------- the CLI


class Output:
    """Writes to a file descriptor, flushing every line; after the reader has gone (a closed pipe), discards."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.at_line_start = True
        self.broken = False

    def write(self, data: bytes) -> None:
        if self.broken or not data:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:  # BrokenPipeError (`./launch.sh 2>&1 | head`), EIO of a closed terminal, ...
            # Keep reading anyway: torchx must never block or fail on a full pipe while it stops the ranks.
            self.broken = True
            return
        self.at_line_start = data.endswith(b"\n")


def run(stdin: BinaryIO, write: Callable[[bytes], None], log_dir: Path) -> None:
    """Filter ``stdin`` to ``write`` until EOF (torchx has exited), then write the failure summary."""
    job = JobLogFilter(log_dir)
    for raw in iter(stdin.readline, b""):
        for line in job.feed(raw):
            write(line)
    for line in job.finish():
        write(line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.joblog", description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, required=True, help="torchx's log_dir (per-rank logs)")
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole foreground process group. torchx then stops the ranks and says so; this
    # filter must stay to show that, and ends when torchx closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = Output(sys.stderr.fileno())

    def write(line: bytes) -> None:
        if line.startswith(b"full logs: ") and not out.at_line_start:
            out.write(b"\n")  # the job's last line had no newline: the summary starts on a line of its own
        out.write(line)

    # A buffered reader's readline returns as soon as a newline has arrived (it does not wait to fill its
    # buffer), so each line is passed on when it is complete.
    run(sys.stdin.buffer, write, args.log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
