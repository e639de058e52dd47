"""Data benchmark: files -> KJT batches, next to pyarrow's raw ORC decode and the training step's appetite.

``python -m bench.bench_data [--users N] [--threads N] [--steps N] [--repeats N] [--data DIR] [--config FILE]``

In one run, on the same files (the built-in sample generator's schema, written to a temporary folder unless
``--data`` names ORC files in the seed's schema):

* **raw decode**: ``pyarrow.orc.ORCFile.read_stripe`` of the feature columns of every stripe, nothing else
  (the physical limit of this path), on 1 thread and on ``--threads`` threads;
* **reader**: ``SequenceReader`` (validation, truncation, hashing, batching, KJT layout) at the config's
  ``[data]`` settings, decoding on ``read_threads`` 1 and ``--threads`` threads, and on ``read_workers`` 1
  and ``--threads`` worker processes (each pass includes starting its workers; the forkserver they come
  from is started once, by a warm-up pass);
* **trainer**: forward + backward + AdamW step of the config's model (``NextItemModel``, unsharded, CPU)
  on the reader's batches: the rate at which training consumes data.

Tokens are real (non-padding) positions after truncation to ``seq_len``. Prints a table with the ratios; the
reader rows compare with the raw decode at the same parallelism (threads or processes). ``CPU s`` is the CPU
time the fastest pass used on all threads, plus its decode worker processes (Linux): where all cores are
busy, rows/s cannot exceed rows per CPU second times the cores, whatever the threads or processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.orc as orc
import torch

from data.config import DataConfig
from data.ops import jit
from data.reader import SequenceReader
from data.sample import SampleParams, generate_table, write_files
from runtime.host import keep_freed_buffers_mapped
from trainer.build import build_model
from trainer.config import load_config


@dataclasses.dataclass
class Rate:
    name: str
    rows: int
    tokens: int
    seconds: float
    cpu: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _forkserver_children_cpu() -> float:
    """CPU seconds of the exited children of this process's forkserver: the reader's decode workers.

    Linux only (``/proc``), 0 elsewhere. A worker counts once it has exited and been reaped, which the end of
    a reader pass waits for.
    """
    if not os.path.isdir("/proc"):
        return 0.0
    total, parent = 0.0, str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if fields[1] != parent:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"multiprocessing.forkserver" not in cmdline.read():
                    continue
        except OSError:  # exited meanwhile
            continue
        total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime + cstime
    return total


def _cpu() -> float:
    return time.process_time() + _forkserver_children_cpu()


def _timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result) of ``fn()``."""
    cpu, started = _cpu(), time.perf_counter()
    result = fn()
    return time.perf_counter() - started, _cpu() - cpu, result


def raw_decode(files: list[str], columns: list[str], threads: int, tokens: int) -> Rate:
    stripes = [(path, i) for path in files for i in range(orc.ORCFile(path).nstripes)]

    def read(job: tuple[str, int]) -> int:
        return orc.ORCFile(job[0]).read_stripe(job[1], columns=columns).num_rows

    def run() -> int:
        if threads == 1:
            return sum(map(read, stripes))
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(read, stripes))

    seconds, cpu, rows = _timed(run)
    return Rate(f"pyarrow raw ORC decode, {threads} thread{'s' * (threads > 1)}", int(rows), tokens, seconds, cpu)


def reader_rate(cfg: DataConfig, threads: int, workers: int = 0) -> Rate:
    cfg = dataclasses.replace(cfg, read_threads=threads, read_workers=workers, drop_remainder=False)

    def run() -> tuple[int, int]:
        rows = tokens = 0
        for batch in SequenceReader(cfg, epochs=1):
            rows += batch.batch_size
            tokens += int(batch.seq_lengths.sum())
        return rows, tokens

    seconds, cpu, (rows, tokens) = _timed(run)
    how = f"read_workers {workers}" if workers else f"read_threads {threads}"
    return Rate(f"SequenceReader -> KJT batches, {how}", rows, tokens, seconds, cpu)


def trainer_rate(config_path: str, data_cfg: DataConfig, steps: int) -> Rate:
    job = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(job)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.optim.dense_lr)
    batches = list(itertools.islice(SequenceReader(data_cfg, epochs=0), steps + 2))

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        optimizer.step()

    for batch in batches[:2]:  # warm-up: allocator, lazy init
        step(batch)
    seconds, cpu, _ = _timed(lambda: [step(batch) for batch in batches[2:]])
    rows = sum(b.batch_size for b in batches[2:])
    tokens = sum(int(b.seq_lengths.sum()) for b in batches[2:])
    return Rate(f"trainer step (fwd+bwd+AdamW, {config_path}, CPU)", rows, tokens, seconds, cpu)


def _data(args: argparse.Namespace, tmp: Path) -> Path:
    if args.data:
        return Path(args.data)
    params = SampleParams(users=args.users, files=8, rows_per_stripe=1024)
    write_files(generate_table(params), tmp, params)
    return tmp


def _table(rates: list[Rate], raw: dict[int, Rate], trainer: Rate) -> str:
    lines = [
        "| path | rows/s | tokens/s | vs raw decode (same parallelism) | vs trainer | CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for rate in rates:
        parallel = int(rate.name.rsplit(" ", 1)[-1]) if "SequenceReader" in rate.name else None
        vs_raw = f"{rate.tokens_per_s / raw[parallel].tokens_per_s:.0%}" if parallel in raw else ""
        vs_trainer = f"{rate.tokens_per_s / trainer.tokens_per_s:.1f}x" if rate is not trainer else "1x"
        lines.append(
            f"| {rate.name} | {rate.rows_per_s:,.0f} | {rate.tokens_per_s:,.0f} | {vs_raw} | {vs_trainer} "
            f"| {rate.cpu:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.toml", help="job config: [data] settings and model")
    parser.add_argument("--users", type=int, default=100_000, help="users of generated sample data")
    parser.add_argument("--data", help="read these ORC files instead of generating sample data")
    parser.add_argument("--threads", type=int, default=2, help="threads / worker processes of the parallel runs")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of data measurements (fastest counts)")
    args = parser.parse_args(argv)

    # The reader runs inside a training rank, which keeps freed buffers mapped (trainer.dist): measure it so.
    # Otherwise every unit's fresh numpy arrays fault their pages in again (a tenth of the reader's CPU).
    kept_mapped = keep_freed_buffers_mapped()
    job = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _data(args, Path(tmp))
        cfg = dataclasses.replace(job.data, data_paths=str(folder))
        files = [path for path, _ in SequenceReader(cfg).files]
        columns = [f.name for f in cfg.features]
        tokens = reader_rate(cfg, 1).tokens  # also warms the page cache
        reader_rate(cfg, 1, workers=1)  # starts the forkserver (once per process, seconds: it imports torch)
        parallelism = sorted({1, args.threads})
        best: dict[str, Rate] = {}
        # Rounds interleave all measurements and the fastest run of each counts: on a shared machine the
        # load changes during the run, and the minimum time is the least disturbed one.
        for _ in range(args.repeats):
            for n in parallelism:
                for measure in (
                    lambda: raw_decode(files, columns, n, tokens),
                    lambda: reader_rate(cfg, n),
                    lambda: reader_rate(cfg, 1, workers=n),
                ):
                    rate = measure()
                    if rate.name not in best or rate.seconds < best[rate.name].seconds:
                        best[rate.name] = rate
        rates = list(best.values())
        raw = {n: rates[3 * i] for i, n in enumerate(parallelism)}
        # Threads first, then processes, each by parallelism.
        readers = sorted(
            (r for r in rates if "SequenceReader" in r.name),
            key=lambda r: ("workers" in r.name, int(r.name.rsplit(" ", 1)[-1])),
        )
        trainer = trainer_rate(args.config, cfg, args.steps)
    rows = readers[0].rows
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print(f"data: {rows:,} users, {tokens:,} tokens (seq_len {cfg.seq_len}), {len(files)} ORC files; "
          f"batch {cfg.batch_size}, prefetch {cfg.prefetch}; torch threads {torch.get_num_threads()}; "
          f"reader kernels: {'numba' if jit.enabled() else 'numpy'}; "
          f"freed buffers kept mapped: {'yes' if kept_mapped else 'no'}")
    print(_table([*raw.values(), *readers, trainer], raw, trainer))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
