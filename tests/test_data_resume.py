"""Resumable reader state, shuffle, empty-sequence policy and remote (fsspec) sources."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.batch import SequenceBatch
from data.config import DataConfig
from data.reader import SequenceReader
from tests.test_data_reader import (
    _numbered_file,
    _random_sequences,
    item_config,
    item_file,
    item_rows,
    run_with_timeout,
    wait_for_no_reader_threads,
)


def _same(a: list[SequenceBatch], b: list[SequenceBatch]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if not (
            torch.equal(x.item_ids, y.item_ids)
            and torch.equal(x.seq_lengths, y.seq_lengths)
            and torch.equal(x.sparse_features.values(), y.sparse_features.values())
            and torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())
        ):
            return False
    return True


@pytest.fixture
def ragged_dir(tmp_path: Path) -> Path:
    """3 files of uneven stripes, some users without positions (skipped), numbered first items."""
    rng = np.random.default_rng(0)
    for i in range(3):
        rows = _random_sequences(rng, 23 + 5 * i)
        item_file(tmp_path / f"part-{i}.orc", rows, rows_per_stripe=4 + i)
    return tmp_path


def _resume_at(cfg: DataConfig, epochs: int, k: int, other: DataConfig) -> tuple[list[SequenceBatch], dict]:
    """Consume k batches (letting the producer run ahead), save, and resume in a fresh reader."""
    first = SequenceReader(cfg, epochs=epochs)
    iterator = iter(first)
    for _ in range(k):
        next(iterator)
    time.sleep(0.02)  # prefetched batches are produced but not consumed: they must not count
    state = first.state_dict()
    iterator.close()
    second = SequenceReader(other, epochs=epochs)
    second.load_state_dict(state)
    return list(second), state


@pytest.mark.parametrize(
    ("settings", "epochs"),
    [
        (dict(drop_remainder=False), 2),
        (dict(drop_remainder=True), 2),
        (dict(shuffle=True, shuffle_seed=3, shuffle_buffer=0), 2),
        (dict(shuffle=True, shuffle_seed=3, shuffle_buffer=20, drop_remainder=True), 2),
        (dict(shuffle=True, shuffle_seed=3, shuffle_buffer=1000), 1),
    ],
)
def test_resume_is_exact_at_every_batch(ragged_dir: Path, settings: dict, epochs: int) -> None:
    cfg = item_config(ragged_dir, batch_size=5, seq_len=9, read_threads=2, prefetch=4, **settings)
    reference = list(SequenceReader(cfg, epochs=epochs))
    assert len(reference) > 10
    # Resume with other thread/prefetch settings: the position does not depend on them.
    other = item_config(ragged_dir, batch_size=5, seq_len=9, read_threads=1, prefetch=1, **settings)
    # Every batch for the most involved setting (windows spanning stripes, epoch ends), every third else.
    stride = 1 if settings.get("shuffle_buffer") == 20 else 3
    for k in sorted({*range(0, len(reference) + 1, stride), len(reference)}):
        rest, state = _resume_at(cfg, epochs, k, other)
        assert state["batches_consumed"] == k
        assert _same(rest, reference[k:]), f"resume after {k} batches"
    wait_for_no_reader_threads()


def test_state_before_iteration_and_after_exhaustion(ragged_dir: Path) -> None:
    reader = SequenceReader(item_config(ragged_dir, batch_size=5))
    assert (reader.state_dict()["epoch"], reader.state_dict()["unit"], reader.state_dict()["row"]) == (0, 0, 0)
    total = len(list(reader))
    state = reader.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == total
    again = SequenceReader(item_config(ragged_dir, batch_size=5))
    again.load_state_dict(state)
    assert list(again) == []
    # Without a load, a new iter() starts from the beginning again.
    assert len(list(again)) == total


def test_resume_forever_mode(ragged_dir: Path) -> None:
    cfg = item_config(ragged_dir, batch_size=7, shuffle=True, shuffle_buffer=10)
    reference = list(itertools.islice(SequenceReader(cfg, epochs=0), 40))
    first = SequenceReader(cfg, epochs=0)
    iterator = iter(first)
    for _ in range(25):
        next(iterator)
    state = first.state_dict()
    iterator.close()
    second = SequenceReader(cfg, epochs=0)
    second.load_state_dict(state)
    assert _same(list(itertools.islice(second, 15)), reference[25:])


def test_state_survives_torch_distributed_checkpoint(ragged_dir: Path, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    cfg = item_config(ragged_dir, batch_size=5)
    reference = list(SequenceReader(cfg))
    first = SequenceReader(cfg)
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    dcp.save({"reader_rank0": first}, checkpoint_id=str(tmp_path / "ckpt"))
    iterator.close()
    second = SequenceReader(cfg)
    dcp.load({"reader_rank0": second}, checkpoint_id=str(tmp_path / "ckpt"))
    assert _same(list(second), reference[3:])


def test_resume_with_other_world_size_is_refused(tmp_path: Path) -> None:
    _numbered_file(tmp_path / "a.orc", rows=40, rows_per_stripe=4)
    state = SequenceReader(item_config(tmp_path), rank=1, world_size=2).state_dict()
    with pytest.raises(ValueError, match=r"world_size 2 but this run has world_size 4"):
        SequenceReader(item_config(tmp_path), rank=1, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"rank was 1, is now 0"):
        SequenceReader(item_config(tmp_path), rank=0, world_size=2).load_state_dict(state)


@pytest.mark.parametrize(
    ("change", "key"),
    [(dict(batch_size=3), "batch_size"), (dict(shuffle=True), "shuffle"), (dict(shuffle_seed=5), "shuffle_seed")],
)
def test_resume_with_other_settings_is_refused(tmp_path: Path, change: dict, key: str) -> None:
    _numbered_file(tmp_path / "a.orc", rows=40, rows_per_stripe=4)
    state = SequenceReader(item_config(tmp_path)).state_dict()
    with pytest.raises(ValueError, match=rf"does not match this reader: {key}"):
        SequenceReader(item_config(tmp_path, **change)).load_state_dict(state)


def test_resume_with_other_files_is_refused(tmp_path: Path) -> None:
    _numbered_file(tmp_path / "a.orc", rows=40, rows_per_stripe=4)
    state = SequenceReader(item_config(tmp_path)).state_dict()
    _numbered_file(tmp_path / "b.orc", rows=8, rows_per_stripe=4)
    with pytest.raises(ValueError, match=r"does not match this reader: num_units was 10, is now 12"):
        SequenceReader(item_config(tmp_path)).load_state_dict(state)


# ------------------------------------------------------------------------------------------ shuffle


def test_shuffle_is_seeded_complete_and_differs_per_epoch(tmp_path: Path) -> None:
    for i in range(2):
        _numbered_file(tmp_path / f"p{i}.orc", rows=30, rows_per_stripe=4, first=100 * i)
    everything = sorted(list(range(30)) + list(range(100, 130)))

    def order(seed: int, buffer: int, threads: int) -> list[int]:
        cfg = item_config(tmp_path, batch_size=6, shuffle=True, shuffle_seed=seed, shuffle_buffer=buffer,
                          read_threads=threads)
        return [row[0] for row in item_rows(list(SequenceReader(cfg, epochs=2)))]

    a = order(1, 12, 1)
    assert a == order(1, 12, 3)  # reproducible, whatever the threads
    assert sorted(a[:60]) == everything and sorted(a[60:]) == everything  # every row once per epoch
    assert a[:60] != a[60:]  # a new order each epoch
    assert a != order(2, 12, 1)
    unshuffled = [row[0] for row in item_rows(list(SequenceReader(item_config(tmp_path, batch_size=6))))]
    assert a[:60] != unshuffled
    # Buffer 0: whole stripes move, rows inside a stripe keep their order.
    units_only = order(1, 0, 1)[:60]
    assert sorted(units_only) == everything and units_only != unshuffled
    assert units_only[:4] == sorted(units_only[:4]) and units_only[0] % 4 == 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_shuffled_ranks_read_disjoint_units_covering_everything(tmp_path: Path, world_size: int) -> None:
    _numbered_file(tmp_path / "a.orc", rows=50, rows_per_stripe=4)
    seen = []
    for rank in range(world_size):
        cfg = item_config(tmp_path, batch_size=2, shuffle=True, shuffle_seed=9, shuffle_buffer=8)
        seen.extend(row[0] for row in item_rows(list(SequenceReader(cfg, rank=rank, world_size=world_size))))
    assert sorted(seen) == list(range(50))


# --------------------------------------------------------------------------------- empty sequences


def test_empty_sequences_counted_or_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = item_file(tmp_path / "e.orc", [[[1]], [], [[2]], [], []])
    reader = SequenceReader(item_config(path, batch_size=1))
    with caplog.at_level(logging.WARNING, logger="data.decode"):
        assert len(list(reader)) == 2
    assert reader.rows_skipped == 3
    assert any("e.orc (stripe 0): skipped 3 users" in r.getMessage() for r in caplog.records)
    strict = SequenceReader(item_config(path, batch_size=1, empty_sequences="error"))
    with pytest.raises(ValueError, match=r"columns 'item_id' in .*e\.orc \(stripe 0\): row 1 has no positions"):
        run_with_timeout(lambda: list(strict))


# ---------------------------------------------------------------------------------- other sources


def test_remote_fsspec_filesystem(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    local_orc = _numbered_file(tmp_path / "a.orc", rows=6, rows_per_stripe=3)
    table = pa.table({"item_id": pa.array([[[100 + i]] for i in range(4)], pa.list_(pa.list_(pa.int64())))})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=2)
    fs.mkdir("/seqrec-test")
    fs.put(str(local_orc), "/seqrec-test/data/part-0.orc")
    fs.put(str(tmp_path / "b.parquet"), "/seqrec-test/data/part-1.parquet")
    fs.pipe("/seqrec-test/data/_SUCCESS", b"")
    try:
        reader = SequenceReader(item_config("memory://seqrec-test/data", batch_size=5))
        assert [p for p, _ in reader.files] == [
            "memory://seqrec-test/data/part-0.orc", "memory://seqrec-test/data/part-1.parquet"
        ]
        assert len(reader.all_units) == 4
        assert [row[0] for row in item_rows(list(reader))] == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103]
    finally:
        fs.rm("/seqrec-test", recursive=True)


def test_missing_filesystem_package_is_named() -> None:
    with pytest.raises(ImportError, match=r"oss://bucket/data.*install the package ossfs"):
        SequenceReader(item_config("oss://bucket/data"))


def test_truncated_file_names_file(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "t.orc", rows=40, rows_per_stripe=4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read orc file .*t\.orc"):
        SequenceReader(item_config(path))
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match=r"cannot read parquet file .*g\.parquet"):
        SequenceReader(item_config(garbage))


def test_file_truncated_after_planning_names_unit(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "t.orc", rows=40, rows_per_stripe=4)
    reader = SequenceReader(item_config(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"t\.orc \(stripe 0\)"):
        run_with_timeout(lambda: list(reader))


def test_held_batches_rewind_the_state(ragged_dir: Path) -> None:
    # A training pipeline that takes batches ahead of the step it trains reports them as held.
    cfg = item_config(ragged_dir, batch_size=5, shuffle=True, shuffle_buffer=12)
    reference = list(SequenceReader(cfg))
    reader = SequenceReader(cfg)
    iterator = iter(reader)
    for _ in range(6):
        next(iterator)
    reader.held_batches = 2  # trained on 4 of the 6 taken
    state = reader.state_dict()
    assert state["batches_consumed"] == 4
    iterator.close()
    resumed = SequenceReader(cfg)
    resumed.load_state_dict(state)
    assert _same(list(resumed), reference[4:])
    reader.held_batches = 7
    with pytest.raises(ValueError, match="held_batches 7 exceeds"):
        reader.state_dict()


@pytest.mark.parametrize(
    ("shown", "path", "child", "expected"),
    [
        ("hdfs://nn:8020/dir", "/dir", "/dir/a.orc", "hdfs://nn:8020/dir/a.orc"),
        ("s3://bucket/dir/", "bucket/dir", "bucket/dir/a.orc", "s3://bucket/dir/a.orc"),
        ("memory://d/x", "/d/x", "/d/x/a.orc", "memory://d/x/a.orc"),
    ],
)
def test_folder_children_keep_scheme_and_host(shown: str, path: str, child: str, expected: str) -> None:
    import pyarrow.fs as pafs

    from data.fs import Location

    assert Location(pafs.LocalFileSystem(), path, shown, False).child(child).shown == expected
