"""SequenceReader with worker processes (``read_workers``): same batches as threads, errors, shutdown."""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.batch import SequenceBatch
from data.config import DataConfig, FeatureConfig
from data.reader import SequenceReader
from data.workers import DecodeProcesses, Stopped, WorkerTraceback, _portable
from tests.test_data_reader import (
    LL_INT,
    LL_STR,
    _numbered_file,
    _random_sequences,
    item_config,
    item_file,
    run_with_timeout,
    wait_for_no_reader_threads,
    write_orc,
)


def worker_processes() -> list[mp.process.BaseProcess]:
    return [p for p in mp.active_children() if p.name.startswith("SequenceReader")]


def wait_for_no_workers(timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while worker_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not worker_processes(), worker_processes()
    wait_for_no_reader_threads()


def assert_identical(a: list[SequenceBatch], b: list[SequenceBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.sparse_features.keys() == y.sparse_features.keys()
        assert x.sparse_features.stride() == y.sparse_features.stride()
        for name in ("values", "lengths"):
            u, v = getattr(x.sparse_features, name)(), getattr(y.sparse_features, name)()
            assert u.dtype == v.dtype and torch.equal(u, v), name
        for u, v in ((x.item_ids, y.item_ids), (x.seq_lengths, y.seq_lengths)):
            assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 files of uneven stripes: integer items plus a hashed string feature, some users without positions."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    for i in range(3):
        items = _random_sequences(rng, 40 + 7 * i)
        tags = [[[f"t{v % 13}" for v in bag] for bag in row] for row in items]
        columns = {"item_id": pa.array(items, LL_INT), "label": pa.array(tags, LL_STR)}
        write_orc(folder / f"part-{i}.orc", columns, rows_per_stripe=6 + i)
    return folder


def mixed_config(folder: Path, **kwargs) -> DataConfig:
    settings = dict(batch_size=5, seq_len=9, prefetch=2, drop_remainder=False, shuffle=True, shuffle_seed=4)
    settings.update(kwargs)
    features = [
        FeatureConfig("item_id", num_embeddings=1000),
        FeatureConfig("label", hash_type="murmur", hash_bucket_size=97),
    ]
    return DataConfig(data_paths=str(folder), features=features, **settings)


@pytest.mark.parametrize("shuffle_buffer", [0, 25])
def test_processes_give_the_same_batches_as_threads(mixed_dir: Path, shuffle_buffer: int) -> None:
    threads = SequenceReader(mixed_config(mixed_dir, read_threads=1, shuffle_buffer=shuffle_buffer), epochs=2)
    reference = list(threads)
    processes = SequenceReader(mixed_config(mixed_dir, read_workers=2, shuffle_buffer=shuffle_buffer), epochs=2)
    assert_identical(list(processes), reference)
    assert processes.rows_skipped == threads.rows_skipped > 0
    wait_for_no_workers()


def test_resume_in_process_mode_is_exact(mixed_dir: Path) -> None:
    cfg = mixed_config(mixed_dir, read_workers=2, shuffle_buffer=25, drop_remainder=True)
    reference = list(SequenceReader(cfg, epochs=2))
    reader = SequenceReader(cfg, epochs=2)
    iterator = iter(reader)
    for _ in range(9):
        next(iterator)
    reader.held_batches = 2
    state = reader.state_dict()
    iterator.close()
    # Resume on threads from a state saved with processes: the position does not depend on the mode.
    resumed = SequenceReader(mixed_config(mixed_dir, read_threads=2, shuffle_buffer=25, drop_remainder=True), epochs=2)
    resumed.load_state_dict(state)
    assert state["batches_consumed"] == 7
    assert_identical(list(resumed), reference[7:])
    wait_for_no_workers()


def test_decode_error_reaches_the_consumer_as_itself(tmp_path: Path) -> None:
    rows = [[[i]] for i in range(48)]
    rows[33] = [[7_000_000]]  # out of range, in stripe 8 of 12
    path = item_file(tmp_path / "bad.orc", rows, rows_per_stripe=4)
    reader = SequenceReader(item_config(path, batch_size=4, read_workers=2, prefetch=2))
    got: list[SequenceBatch] = []

    def consume() -> None:
        for batch in reader:
            got.append(batch)

    with pytest.raises(ValueError, match=r"column 'item_id' in .*bad\.orc \(stripe 8\).*id 7000000") as caught:
        run_with_timeout(consume)
    assert len(got) == 8  # everything before the bad stripe, in order
    assert isinstance(caught.value.__cause__, WorkerTraceback)
    assert "decode_unit" in str(caught.value.__cause__)
    wait_for_no_workers()


class _NeedsKeyword(Exception):
    def __init__(self, *, detail: str) -> None:
        super().__init__(f"bad thing: {detail}")


def test_an_error_that_cannot_be_pickled_arrives_as_text() -> None:
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(_NeedsKeyword(detail="x")))
    sent = _portable(_NeedsKeyword(detail="x"))
    assert isinstance(sent, RuntimeError) and str(sent) == "_NeedsKeyword: bad thing: x"
    plain = ValueError("column 'a' in f.orc: null")
    assert _portable(plain) is plain


def test_worker_logs_reach_the_parent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = item_file(tmp_path / "e.orc", [[[1]], [], [[2]], [], []])
    reader = SequenceReader(item_config(path, batch_size=1, read_workers=1))
    with caplog.at_level(logging.WARNING, logger="data.decode"):
        assert len(list(reader)) == 2
    assert reader.rows_skipped == 3
    assert any("e.orc (stripe 0): skipped 3 users" in r.getMessage() for r in caplog.records)
    wait_for_no_workers()


def test_breaking_out_early_stops_the_workers(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=40, rows_per_stripe=4)
    reader = SequenceReader(item_config(path, batch_size=2, read_workers=2, prefetch=1), epochs=0)
    for count, _ in enumerate(reader):
        if count == 0:
            assert len(worker_processes()) == 2
        if count == 3:
            break
    wait_for_no_workers()


def test_consumer_exception_stops_the_workers(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=40, rows_per_stripe=4)
    reader = SequenceReader(item_config(path, batch_size=2, read_workers=2, prefetch=1), epochs=0)

    def train() -> None:
        for _ in reader:
            raise KeyError("step failed")

    with pytest.raises(KeyError):
        train()
    gc.collect()  # the traceback held the iterator until the exception was handled
    wait_for_no_workers()


def test_killed_worker_is_an_error_not_a_hang(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=40, rows_per_stripe=4)
    reader = SequenceReader(item_config(path, batch_size=2, read_workers=2, prefetch=1), epochs=0)
    iterator = iter(reader)
    next(iterator)
    victim = worker_processes()[0]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=rf"decode worker {victim.name} .*killed by signal {int(signal.SIGKILL)}"):
        run_with_timeout(lambda: [next(iterator) for _ in range(1000)])
    iterator.close()
    wait_for_no_workers()


def test_stop_ends_the_wait_for_a_hung_worker_and_shutdown_kills_it(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=8, rows_per_stripe=4)
    cfg = item_config(path, read_workers=1)
    stop = threading.Event()
    pool = DecodeProcesses(cfg, 1, "SequenceReader-test", stop)
    (worker,) = worker_processes()
    os.kill(worker.pid, signal.SIGSTOP)  # as if stuck in a read that never returns
    try:
        pending = pool.submit(SequenceReader(cfg).units[0])
        threading.Timer(0.2, stop.set).start()  # the consumer goes away
        with pytest.raises(Stopped):
            run_with_timeout(pending.result)
        pool.shutdown()
        wait_for_no_workers()
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGCONT)


def test_negative_read_workers_is_refused(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=4, rows_per_stripe=4)
    with pytest.raises(ValueError, match="read_workers must be >= 0"):
        SequenceReader(item_config(path, read_workers=-1))
