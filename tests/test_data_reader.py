"""SequenceReader on real (small) ORC and Parquet files written into tmp_path."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
import torch

from data.batch import SequenceBatch
from data.config import WHOLE_SEQUENCES, DataConfig, FeatureConfig
from data.ops.buckets import INT64_MAX
from data.ops.murmur import murmurhash64a
from data.reader import SequenceReader

LL_INT = pa.list_(pa.list_(pa.int64()))
L_INT = pa.list_(pa.int64())
LL_STR = pa.list_(pa.list_(pa.string()))


def write_orc(path: Path, columns: dict[str, pa.Array], rows_per_stripe: int | None = None) -> Path:
    table = pa.table(columns)
    if rows_per_stripe:
        # A tiny stripe_size closes a stripe after every written batch of rows_per_stripe rows. The ORC writer
        # only sees a non-zero size estimate for tiny integer-only data once a string column is present, so
        # add one (never read by the reader).
        table = table.append_column("tag", pa.array([str(i) for i in range(table.num_rows)]))
        orc.write_table(table, str(path), stripe_size=1, batch_size=rows_per_stripe)
    else:
        orc.write_table(table, str(path))
    return path


def item_file(path: Path, items: list, rows_per_stripe: int | None = None) -> Path:
    return write_orc(path, {"item_id": pa.array(items, LL_INT)}, rows_per_stripe)


def item_config(path: Path | str, **kwargs) -> DataConfig:
    defaults = dict(batch_size=4, seq_len=10, read_threads=1, prefetch=2, drop_remainder=False)
    defaults.update(kwargs)
    return DataConfig(
        data_paths=str(path), features=[FeatureConfig("item_id", num_embeddings=1_000_000)], **defaults
    )


def read_all(reader: SequenceReader) -> list[SequenceBatch]:
    return list(reader)


def item_rows(batches: list[SequenceBatch]) -> list[list[int]]:
    """Per user, the item ids of its real positions (enough to identify rows in these tests)."""
    rows = []
    for batch in batches:
        for b in range(batch.batch_size):
            rows.append(batch.item_ids[b, : int(batch.seq_lengths[b])].tolist())
    return rows


def run_with_timeout(fn: Callable[[], object], timeout: float = 30.0) -> object:
    """Run fn on a thread; fail the test (instead of hanging) if it does not finish."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "reader hung"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


def reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("SequenceReader")]


def wait_for_no_reader_threads(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while reader_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not reader_threads(), reader_threads()


# ------------------------------------------------------------------------------------------- layout


def test_kjt_layout_exact(tmp_path: Path) -> None:
    path = write_orc(
        tmp_path / "hand.orc",
        {
            "user_id": pa.array([0, 1, 2], pa.int64()),
            "item_id": pa.array([[[1], [2, 3], []], [[4]], [[5], [6], [7], [8]]], LL_INT),
            "cate_id": pa.array([[10, 11, 12], [13, 14], [15]], L_INT),
            "behavior_id": pa.array([[["pv"], ["cart"], ["pv"]], [["buy"]], [[], [], ["fav", "pv"], ["pv"]]], LL_STR),
        },
    )
    cfg = DataConfig(
        data_paths=str(path),
        batch_size=3,
        seq_len=10,
        read_threads=1,
        features=[
            FeatureConfig("item_id", num_embeddings=100),
            FeatureConfig("cate_id", hash_bucket_size=7),
            FeatureConfig("behavior_id", hash_type="murmur"),
        ],
    )
    (batch,) = read_all(SequenceReader(cfg))
    h = {s: murmurhash64a(s.encode()) & INT64_MAX for s in ("pv", "cart", "buy", "fav")}

    assert batch.seq_lengths.tolist() == [3, 2, 4]
    assert batch.item_ids.tolist() == [[1, 2, -1, -1], [4, -1, -1, -1], [5, 6, 7, 8]]
    kjt = batch.sparse_features
    assert kjt.keys() == ["item_id", "cate_id", "behavior_id"]
    assert kjt.stride() == 12
    assert kjt.values().dtype == torch.int64
    assert kjt["item_id"].lengths().tolist() == [1, 2, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1]
    assert kjt["item_id"].values().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert kjt["cate_id"].lengths().tolist() == [1, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    assert kjt["cate_id"].values().tolist() == [3, 4, 5, 6, 0, 1]
    assert kjt["behavior_id"].lengths().tolist() == [1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 2, 1]
    assert kjt["behavior_id"].values().tolist() == [h["pv"], h["cart"], h["pv"], h["buy"], h["fav"], h["pv"], h["pv"]]


def test_batches_feed_an_embedding_collection(tmp_path: Path) -> None:
    from torchrec import EmbeddingCollection, EmbeddingConfig

    path = item_file(tmp_path / "a.orc", [[[1], [2, 3]], [[4]]])
    (batch,) = read_all(SequenceReader(item_config(path, batch_size=2)))
    table = EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["item_id"])
    ec = EmbeddingCollection(tables=[table])
    out = ec(batch.sparse_features)["item_id"]
    assert out.lengths().tolist() == [1, 2, 1, 0]


def test_flat_list_layout_and_large_types(tmp_path: Path) -> None:
    path = write_orc(
        tmp_path / "flat.orc",
        {
            "item_id": pa.array([[1, 2, 3], [4]], pa.large_list(pa.int32())),
            "behavior_id": pa.array([["pv", "buy", "pv"], ["cart"]], pa.list_(pa.large_string())),
        },
    )
    cfg = DataConfig(
        data_paths=str(path),
        batch_size=2,
        seq_len=10,
        features=[
            FeatureConfig("item_id", num_embeddings=10),
            FeatureConfig("behavior_id", hash_type="murmur", hash_bucket_size=100),
        ],
    )
    (batch,) = read_all(SequenceReader(cfg))
    assert batch.item_ids.tolist() == [[1, 2, 3], [4, -1, -1]]
    assert batch.sparse_features["behavior_id"].lengths().tolist() == [1, 1, 1, 1, 0, 0]
    expected = [murmurhash64a(s.encode()) % 100 for s in ("pv", "buy", "pv", "cart")]
    assert batch.sparse_features["behavior_id"].values().tolist() == expected


def test_empty_positions_and_users_without_positions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = item_file(tmp_path / "e.orc", [[], [[]], [[1], [], [2]], []])
    with caplog.at_level(logging.WARNING, logger="data.decode"):
        (batch,) = read_all(SequenceReader(item_config(path)))
    assert batch.seq_lengths.tolist() == [1, 3]  # the user with one empty position is kept
    assert batch.item_ids.tolist() == [[-1, -1, -1], [1, -1, 2]]
    assert batch.sparse_features["item_id"].lengths().tolist() == [0, 0, 0, 1, 0, 1]
    assert any("skipped 2 users with no positions" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------- truncation


def _two_feature_file(tmp_path: Path) -> Path:
    return write_orc(
        tmp_path / "long.orc",
        {
            "item_id": pa.array([[[1, 1], [2], [3, 3, 3], [4], [5, 5]], [[6]]], LL_INT),
            "cate_id": pa.array([[11, 12, 13, 14, 15], [16]], L_INT),
        },
    )


def _two_feature_config(path: Path, **kwargs) -> DataConfig:
    return DataConfig(
        data_paths=str(path),
        batch_size=2,
        features=[FeatureConfig("item_id", num_embeddings=100), FeatureConfig("cate_id", num_embeddings=100)],
        **kwargs,
    )


def test_log_names_the_truncation_or_whole_sequences(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _two_feature_file(tmp_path)
    with caplog.at_level(logging.INFO, logger="data.reader"):
        SequenceReader(_two_feature_config(path, seq_len=3, truncate_side="left"))
        assert "batch 2, seq_len 3 (truncate left), 2 threads" in caplog.text
        caplog.clear()
        reader = SequenceReader(_two_feature_config(path, seq_len=WHOLE_SEQUENCES))
        assert "batch 2, whole sequences (no truncation), 2 threads" in caplog.text
        assert str(WHOLE_SEQUENCES) not in caplog.text
    assert max(len(row) for row in item_rows(read_all(reader))) == 5  # nothing cut


def test_truncate_right_keeps_oldest(tmp_path: Path) -> None:
    (batch,) = read_all(SequenceReader(_two_feature_config(_two_feature_file(tmp_path), seq_len=3)))
    assert batch.seq_lengths.tolist() == [3, 1]
    assert batch.item_ids.tolist() == [[1, 2, 3], [6, -1, -1]]
    assert batch.sparse_features["item_id"].values().tolist() == [1, 1, 2, 3, 3, 3, 6]
    assert batch.sparse_features["item_id"].lengths().tolist() == [2, 1, 3, 1, 0, 0]
    assert batch.sparse_features["cate_id"].values().tolist() == [11, 12, 13, 16]


def test_truncate_left_keeps_newest(tmp_path: Path) -> None:
    cfg = _two_feature_config(_two_feature_file(tmp_path), seq_len=3, truncate_side="left")
    (batch,) = read_all(SequenceReader(cfg))
    assert batch.item_ids.tolist() == [[3, 4, 5], [6, -1, -1]]
    assert batch.sparse_features["item_id"].values().tolist() == [3, 3, 3, 4, 5, 5, 6]
    assert batch.sparse_features["item_id"].lengths().tolist() == [3, 1, 2, 1, 0, 0]
    assert batch.sparse_features["cate_id"].values().tolist() == [13, 14, 15, 16]


def test_holdout_drops_the_last_positions_before_truncation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Leave-one-out training: user 0 loses items 4 and 5 (its test and validation targets), then the
    # newest 2 of the rest are kept; user 1 (one position) has nothing left and is skipped without a warning.
    cfg = _two_feature_config(_two_feature_file(tmp_path), seq_len=2, truncate_side="left", holdout_positions=2)
    with caplog.at_level(logging.WARNING):
        (batch,) = read_all(SequenceReader(dataclasses.replace(cfg, drop_remainder=False)))
    assert batch.item_ids.tolist() == [[2, 3]]
    assert batch.sparse_features["item_id"].values().tolist() == [2, 3, 3, 3]
    assert batch.sparse_features["cate_id"].values().tolist() == [12, 13]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_check_length_errors_instead_of_cutting(tmp_path: Path) -> None:
    path = _two_feature_file(tmp_path)
    cfg = _two_feature_config(path, seq_len=3, check_length=True)
    with pytest.raises(ValueError) as info:
        run_with_timeout(lambda: read_all(SequenceReader(cfg)))
    message = str(info.value)
    assert str(path) in message and "'item_id'" in message and "row 0" in message and "seq_len 3" in message
    # Short enough sequences pass.
    assert len(read_all(SequenceReader(_two_feature_config(path, seq_len=5, check_length=True)))) == 1


# ------------------------------------------------------------------------------------------ batching


def _numbered_file(path: Path, rows: int, rows_per_stripe: int, first: int = 0) -> Path:
    """Row i holds positions [[first+i], [first+i]] so every row is identifiable."""
    return item_file(path, [[[first + i], [first + i]] for i in range(rows)], rows_per_stripe)


def test_batches_cross_stripes_and_drop_remainder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=10, rows_per_stripe=3)
    assert orc.ORCFile(str(path)).nstripes == 4
    kept = read_all(SequenceReader(item_config(path, batch_size=4, drop_remainder=False)))
    assert [b.batch_size for b in kept] == [4, 4, 2]
    assert [row[0] for row in item_rows(kept)] == list(range(10))
    with caplog.at_level(logging.INFO, logger="data.reader"):
        dropped = read_all(SequenceReader(item_config(path, batch_size=4, drop_remainder=True)))
    assert [b.batch_size for b in dropped] == [4, 4]
    assert any("dropped the last 2 rows" in r.getMessage() for r in caplog.records)


def test_epochs(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=10, rows_per_stripe=3)
    two = read_all(SequenceReader(item_config(path, batch_size=4, drop_remainder=True), epochs=2))
    # The remainder is dropped per epoch: each epoch starts at row 0 again.
    assert [row[0] for row in item_rows(two)] == list(range(8)) * 2
    forever = SequenceReader(item_config(path, batch_size=4), epochs=0)
    batches = list(itertools.islice(forever, 30))
    assert len(batches) == 30


def test_forever_without_any_full_batch_is_error_not_hang(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=3, rows_per_stripe=3)
    reader = SequenceReader(item_config(path, batch_size=4, drop_remainder=True), epochs=0)
    with pytest.raises(ValueError, match="no batch of 4 with drop_remainder"):
        run_with_timeout(lambda: next(iter(reader)))


# ---------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_sharding_reads_every_row_once(tmp_path: Path, world_size: int) -> None:
    _numbered_file(tmp_path / "part-0.orc", rows=20, rows_per_stripe=3)
    _numbered_file(tmp_path / "part-1.orc", rows=17, rows_per_stripe=4, first=100)
    seen: list[int] = []
    unit_sets = []
    for rank in range(world_size):
        reader = SequenceReader(item_config(tmp_path, batch_size=5), rank=rank, world_size=world_size)
        unit_sets.append(set(reader.units))
        rows = item_rows(read_all(reader))
        assert rows, f"rank {rank} got no data"
        seen.extend(row[0] for row in rows)
    assert sorted(seen) == list(range(20)) + list(range(100, 117))
    assert sum(len(s) for s in unit_sets) == 7 + 5 and not set.intersection(*unit_sets)


def test_round_robin_unit_assignment(tmp_path: Path) -> None:
    _numbered_file(tmp_path / "a.orc", rows=9, rows_per_stripe=3)
    reader = SequenceReader(item_config(tmp_path), rank=1, world_size=2)
    assert [u.index for u in reader.all_units] == [0, 1, 2]
    assert [u.index for u in reader.units] == [1]
    assert "1 for this rank" in reader.describe() and "3 units" in reader.describe()


def test_fewer_units_than_ranks_is_error(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "one.orc", rows=5, rows_per_stripe=100)
    with pytest.raises(ValueError, match=r"only 1 read units .* 2 ranks"):
        SequenceReader(item_config(path), rank=0, world_size=2)


def test_parquet_row_groups(tmp_path: Path) -> None:
    table = pa.table({"item_id": pa.array([[[i], [i]] for i in range(10)], LL_INT)})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=3)
    seen = []
    for rank in range(2):
        reader = SequenceReader(item_config(tmp_path / "d.parquet", batch_size=2), rank=rank, world_size=2)
        assert len(reader.all_units) == 4
        seen.extend(row[0] for row in item_rows(read_all(reader)))
    assert sorted(seen) == list(range(10))


def test_folder_listing_skips_markers_and_sorts(tmp_path: Path) -> None:
    _numbered_file(tmp_path / "part-1.orc", rows=2, rows_per_stripe=2, first=10)
    _numbered_file(tmp_path / "part-0.orc", rows=2, rows_per_stripe=2)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".part-2.orc.crc").write_text("junk")
    (tmp_path / "README.txt").write_text("not data")
    reader = SequenceReader(item_config(tmp_path, batch_size=4))
    assert [Path(p).name for p, _ in reader.files] == ["part-0.orc", "part-1.orc"]
    assert [row[0] for row in item_rows(read_all(reader))] == [0, 1, 10, 11]


def test_comma_separated_paths(tmp_path: Path) -> None:
    a = _numbered_file(tmp_path / "a.orc", rows=2, rows_per_stripe=2)
    b = _numbered_file(tmp_path / "b.orc", rows=2, rows_per_stripe=2, first=5)
    reader = SequenceReader(item_config(f"{b}, {a}", batch_size=4))
    assert [row[0] for row in item_rows(read_all(reader))] == [5, 6, 0, 1]


# -------------------------------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.orc"
    with pytest.raises(FileNotFoundError, match="nope.orc"):
        SequenceReader(item_config(missing))


def test_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "_SUCCESS").write_text("")
    with pytest.raises(ValueError, match=r"empty.*no \.orc or \.parquet files"):
        SequenceReader(item_config(folder))


def _good_file(path: Path) -> Path:
    """A readable file of 40 users in several stripes / row groups, in the format of ``path``'s suffix."""
    if path.suffix == ".orc":
        return _numbered_file(path, rows=40, rows_per_stripe=4)
    pq.write_table(pa.table({"item_id": pa.array([[[i], [i]] for i in range(40)], LL_INT)}), path, row_group_size=4)
    return path


_TRUNCATED = r"the file looks truncated \([0-9,]+ bytes\): it starts like (an ORC|a Parquet) file but does not end"
_DAMAGE = {
    "empty": (lambda data: b"", r"the file is empty \(0 bytes\)"),
    "text": (
        lambda data: b"user,item\n1,2\n",
        r"it is not (an ORC|a Parquet) file: its 14 bytes do not start with the (ORC|Parquet) magic bytes",
    ),
    "half": (lambda data: data[: len(data) // 2], _TRUNCATED),
    "last byte cut": (lambda data: data[:-1], _TRUNCATED),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
@pytest.mark.parametrize("suffix", [".orc", ".parquet"])
def test_unreadable_file_says_why_when_planning(tmp_path: Path, suffix: str, damage: str) -> None:
    cut, why = _DAMAGE[damage]
    path = _good_file(tmp_path / f"bad{suffix}")
    path.write_bytes(cut(path.read_bytes()))
    fmt = suffix[1:]
    with pytest.raises(ValueError, match=rf"^cannot read {fmt} file .*bad{suffix}: {why}.*\(pyarrow: "):
        SequenceReader(item_config(path))


@pytest.mark.parametrize("suffix", [".orc", ".parquet"])
def test_file_truncated_after_planning_says_so_naming_the_unit(tmp_path: Path, suffix: str) -> None:
    path = _good_file(tmp_path / f"t{suffix}")
    reader = SequenceReader(item_config(path))  # footers read and checked: the file was fine then
    path.write_bytes(path.read_bytes()[:200])
    unit = "stripe 0" if suffix == ".orc" else "row group 0"
    with pytest.raises(ValueError, match=rf"t{suffix} \({unit}\): {_TRUNCATED}"):
        run_with_timeout(lambda: read_all(reader))


def test_intact_ends_keep_pyarrow_message_alone(tmp_path: Path) -> None:
    # Magic bytes at both ends but a damaged footer: no guess about truncation, pyarrow's message as it is.
    path = _good_file(tmp_path / "c.parquet")
    data = bytearray(path.read_bytes())
    data[-8:-4] = (len(data) * 2).to_bytes(4, "little")  # the footer length now points before the file start
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        SequenceReader(item_config(path))
    assert str(info.value).startswith(f"cannot read parquet file {path}: ")
    assert "truncated" not in str(info.value) and "pyarrow:" not in str(info.value)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write_orc(tmp_path / "m.orc", {"other": pa.array([[[1]]], LL_INT)})
    with pytest.raises(ValueError, match=r"column 'item_id' is missing in .*m\.orc"):
        SequenceReader(item_config(path))


@pytest.mark.parametrize(
    ("arrow_type", "rows", "shown"),
    [
        (pa.list_(pa.float64()), [[1.0]], "list<item: double>"),
        (pa.int64(), [1], "int64"),
        (pa.list_(pa.list_(pa.list_(pa.int64()))), [[[[1]]]], "list<item: list<item: list<item: int64>>>"),
    ],
)
def test_wrong_type_names_file_column_and_type(tmp_path: Path, arrow_type: pa.DataType, rows: list, shown: str) -> None:
    path = write_orc(tmp_path / "w.orc", {"item_id": pa.array(rows, arrow_type)})
    with pytest.raises(ValueError) as info:
        SequenceReader(item_config(path))
    message = str(info.value)
    assert "w.orc" in message and "'item_id'" in message and shown in message


def test_string_column_without_hash_type(tmp_path: Path) -> None:
    path = write_orc(tmp_path / "s.orc", {"item_id": pa.array([[["a"]]], LL_STR)})
    with pytest.raises(ValueError, match=r"string column 'item_id' in .*s\.orc needs hash_type"):
        SequenceReader(item_config(path))


@pytest.mark.parametrize(
    ("rows", "what"),
    [
        ([[[1]], None], "row 1 is null"),
        ([[[1], None]], "position 1 .* is null"),
        ([[[1, None]]], "value 1 .* is null"),
    ],
)
def test_nulls_name_file_and_column(tmp_path: Path, rows: list, what: str) -> None:
    path = item_file(tmp_path / "n.orc", rows)
    with pytest.raises(ValueError, match=rf"column 'item_id' in .*n\.orc.*{what}"):
        run_with_timeout(lambda: read_all(SequenceReader(item_config(path))))


def test_out_of_range_id_names_file_column_and_value(tmp_path: Path) -> None:
    path = item_file(tmp_path / "r.orc", [[[1], [12345]]])
    cfg = DataConfig(data_paths=str(path), batch_size=1, features=[FeatureConfig("item_id", num_embeddings=100)])
    with pytest.raises(ValueError, match=r"column 'item_id' in .*r\.orc.*id 12345 is outside \[0, 100\)"):
        run_with_timeout(lambda: read_all(SequenceReader(cfg)))


def test_farm_hash_feature(tmp_path: Path) -> None:
    from data.ops.farmhash import farm_fingerprint64

    path = write_orc(tmp_path / "f.orc", {"item_id": pa.array([[["a"], ["pv"]]], LL_STR)})
    cfg = DataConfig(data_paths=str(path), batch_size=1, features=[FeatureConfig("item_id", hash_type="farm")])
    (batch,) = read_all(SequenceReader(cfg))
    assert batch.item_ids.tolist() == [[farm_fingerprint64(b"a") & INT64_MAX, farm_fingerprint64(b"pv") & INT64_MAX]]


def test_item_feature_must_be_configured(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "a.orc", rows=2, rows_per_stripe=2)
    with pytest.raises(ValueError, match="item_feature 'item'"):
        SequenceReader(item_config(path, item_feature="item"))


# ------------------------------------------------------------------------------------------ threads


def test_worker_exception_surfaces_without_hang(tmp_path: Path) -> None:
    rows = [[[i]] for i in range(48)]
    rows[33] = [[7_000_000]]  # out of range, in stripe 8 of 12
    path = item_file(tmp_path / "bad.orc", rows, rows_per_stripe=4)
    reader = SequenceReader(item_config(path, batch_size=4, read_threads=3, prefetch=2))
    got: list[SequenceBatch] = []

    def consume() -> None:
        for batch in reader:
            got.append(batch)

    with pytest.raises(ValueError, match=r"stripe 8.*id 7000000"):
        run_with_timeout(consume)
    assert len(got) == 8  # everything before the bad stripe, in order
    wait_for_no_reader_threads()


def test_close_early_stops_threads(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=40, rows_per_stripe=4)
    reader = SequenceReader(item_config(path, batch_size=2, read_threads=2, prefetch=1), epochs=0)
    iterator = iter(reader)
    for _ in range(3):
        next(iterator)
    assert reader_threads()
    iterator.close()
    wait_for_no_reader_threads()


def test_garbage_collected_iterator_stops_threads(tmp_path: Path) -> None:
    path = _numbered_file(tmp_path / "n.orc", rows=40, rows_per_stripe=4)
    reader = SequenceReader(item_config(path, batch_size=2, read_threads=2, prefetch=1), epochs=0)
    iterator = iter(reader)
    next(iterator)
    del iterator
    gc.collect()
    wait_for_no_reader_threads()


def _random_sequences(rng: np.random.Generator, users: int) -> list:
    out = []
    for _ in range(users):
        positions = int(rng.integers(0, 15))
        out.append([rng.integers(0, 1000, size=int(rng.integers(0, 3))).tolist() for _ in range(positions)])
    return out


def test_output_order_independent_of_threads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        item_file(tmp_path / f"part-{i}.orc", _random_sequences(rng, 61), rows_per_stripe=7)

    def batches(threads: int, prefetch: int) -> list[SequenceBatch]:
        cfg = item_config(tmp_path, batch_size=8, seq_len=9, read_threads=threads, prefetch=prefetch)
        return read_all(SequenceReader(cfg, epochs=2))

    reference = batches(1, 1)
    for threads, prefetch in ((3, 1), (3, 8)):
        other = batches(threads, prefetch)
        assert len(other) == len(reference)
        for a, b in zip(reference, other):
            assert torch.equal(a.item_ids, b.item_ids)
            assert torch.equal(a.seq_lengths, b.seq_lengths)
            assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
            assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def test_file_format_auto_and_explicit(tmp_path: Path) -> None:
    odd = _numbered_file(tmp_path / "data.bin", rows=2, rows_per_stripe=2)
    with pytest.raises(ValueError, match=r"cannot tell the format of .*data\.bin"):
        SequenceReader(item_config(odd))
    assert len(read_all(SequenceReader(item_config(odd, file_format="orc")))) == 1
    # Hive-style extension-less part files in a folder are read when the format is given.
    folder = tmp_path / "hive"
    folder.mkdir()
    _numbered_file(folder / "part-00000", rows=2, rows_per_stripe=2)
    assert len(SequenceReader(item_config(folder, file_format="orc")).files) == 1
