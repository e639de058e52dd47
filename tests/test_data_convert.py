"""Converters (python -m data.convert): Taobao, SASRec and generic event logs -> the seed's ORC schema."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from data.config import DataConfig, FeatureConfig
from data.convert import main
from data.reader import SequenceReader

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TAOBAO = SHARED / "taobao_userbehavior_sample.csv"
SASREC = SHARED / "amazon_games_sasrec.txt"
ML_RATINGS = SHARED / "movielens_100k_ratings.tsv"
ML_ITEMS = SHARED / "movielens_100k_items.psv"
LL_INT = pa.list_(pa.list_(pa.int64()))
LL_STR = pa.list_(pa.list_(pa.string()))


def read_parts(folder: Path) -> pa.Table:
    files = sorted(folder.glob("part-*.orc"))
    assert files and not leftovers(folder), "temporary files left behind"
    return pa.concat_tables(orc.ORCFile(str(f)).read() for f in files)


def leftovers(out: Path) -> list[Path]:
    """Anything but part files in ``out``, and the converter's hidden work folders next to it."""
    inside = [p for p in out.iterdir() if not p.name.startswith("part-")] if out.is_dir() else []
    return inside + sorted(out.parent.glob(f".{out.name}.*"))


def run(argv: list) -> int:
    return main([str(a) for a in argv])


def flat(column: pa.ChunkedArray) -> list:
    """Per row, the first value of every position."""
    return [[position[0] for position in row] for row in column.to_pylist()]


# ------------------------------------------------------------------------------------------- Taobao


@pytest.mark.skipif(not TAOBAO.exists(), reason=f"shared Taobao sample not found at {TAOBAO}")
def test_taobao_sample_round_trip_through_reader(tmp_path: Path) -> None:
    out = tmp_path / "taobao"
    # ~200 kB chunks: the 3 MB file streams through 16 chunks.
    assert run(["taobao", TAOBAO, "--out", out, "--parts", 3, "--rows-per-stripe", 50, "--chunk-bytes", 200_000]) == 0
    table = read_parts(out)
    assert table.schema == pa.schema(
        [("user_id", pa.int64()), ("item_id", LL_INT), ("cate_id", LL_INT), ("behavior_id", LL_STR),
         ("timestamp", LL_STR)]
    )
    assert [orc.ORCFile(str(f)).nstripes for f in sorted(out.glob("*.orc"))] == [6, 6, 6]  # ceil(~271 / 50)

    raw = pacsv.read_csv(TAOBAO, read_options=pacsv.ReadOptions(
        column_names=["user", "item", "cate", "behavior", "ts"]))
    assert table.num_rows == 814 == len(set(raw.column("user").to_pylist()))
    positions = [len(r) for r in table.column("item_id").to_pylist()]
    assert sum(positions) == raw.num_rows == 84_287
    behaviors = collections.Counter(b for row in flat(table.column("behavior_id")) for b in row)
    assert behaviors == {"pv": 75_693, "cart": 4_494, "fav": 2_351, "buy": 1_749}
    # Time order within each user; same events as the CSV (the sample is already time-ordered per user).
    expected: dict[int, list] = collections.defaultdict(list)
    for u, i, c, b, t in zip(*(raw.column(n).to_pylist() for n in raw.column_names)):
        expected[u].append((i, c, b, str(t)))
    for row in table.to_pylist():
        times = [int(t[0]) for t in row["timestamp"]]
        assert times == sorted(times)
        got = [(i[0], c[0], b[0], t[0]) for i, c, b, t in
               zip(row["item_id"], row["cate_id"], row["behavior_id"], row["timestamp"])]
        assert sorted(got, key=lambda e: int(e[3])) == sorted(expected[row["user_id"]], key=lambda e: int(e[3]))

    # The reader reads it back as the trainer would (seed features, hashing on the strings).
    cfg = DataConfig(
        data_paths=str(out), batch_size=64, seq_len=100_000, read_threads=2, drop_remainder=False,
        features=[
            FeatureConfig("item_id", hash_bucket_size=1 << 40), FeatureConfig("cate_id", hash_bucket_size=1 << 40),
            FeatureConfig("behavior_id", hash_type="murmur", hash_bucket_size=16),
            FeatureConfig("timestamp", hash_type="farm", hash_bucket_size=4096),
        ],
    )
    batches = list(SequenceReader(cfg))
    assert sum(b.batch_size for b in batches) == 814
    assert sum(int(b.seq_lengths.sum()) for b in batches) == 84_287
    first = batches[0]
    assert first.item_ids[0, : int(first.seq_lengths[0])].tolist() == flat(table.column("item_id"))[0]


def test_taobao_sorts_by_time_and_chunking_does_not_matter(tmp_path: Path) -> None:
    src = tmp_path / "tb.csv"
    src.write_text("2,20,5,pv,300\n1,10,5,pv,200\n2,21,5,buy,100\n1,11,6,cart,200\n1,12,6,fav,150\n3,30,7,pv,1\n")
    assert run(["taobao", src, "--out", tmp_path / "a", "--parts", 2]) == 0
    assert run(["taobao", src, "--out", tmp_path / "b", "--parts", 2, "--chunk-bytes", 16]) == 0
    a, b = read_parts(tmp_path / "a"), read_parts(tmp_path / "b")
    assert a.equals(b)
    rows = {r["user_id"]: r for r in a.to_pylist()}
    # Time-ordered; equal times keep the input order (10 before 11).
    assert flat_row(rows[1]["item_id"]) == [12, 10, 11]
    assert flat_row(rows[1]["behavior_id"]) == ["fav", "pv", "cart"]
    assert flat_row(rows[2]["item_id"]) == [21, 20] and flat_row(rows[2]["timestamp"]) == ["100", "300"]
    # user_id % parts decides the file.
    assert sorted(orc.ORCFile(str(tmp_path / "a" / "part-00000.orc")).read().column("user_id").to_pylist()) == [2]


def flat_row(row: list) -> list:
    return [p[0] for p in row]


# ------------------------------------------------------------------------------------------- SASRec


@pytest.mark.skipif(not SASREC.exists(), reason=f"shared SASRec Games data not found at {SASREC}")
def test_sasrec_games(tmp_path: Path) -> None:
    assert run(["sasrec", SASREC, "--out", tmp_path / "games", "--parts", 2, "--chunk-bytes", 500_000]) == 0
    table = read_parts(tmp_path / "games")
    assert table.column_names == ["user_id", "item_id"]
    assert table.num_rows == 31_013
    assert sum(len(r) for r in table.column("item_id").to_pylist()) == 287_107


def test_sasrec_keeps_line_order(tmp_path: Path) -> None:
    src = tmp_path / "s.txt"
    src.write_text("1 5\n1 3\n2 9\n1 4\n")
    assert run(["sasrec", src, "--out", tmp_path / "o", "--parts", 1]) == 0
    rows = read_parts(tmp_path / "o").to_pylist()
    assert [(r["user_id"], flat_row(r["item_id"])) for r in rows] == [(1, [5, 3, 4]), (2, [9])]


# ---------------------------------------------------------------------------------------- MovieLens


@pytest.mark.skipif(not ML_RATINGS.exists(), reason=f"shared MovieLens 100K not found at {ML_RATINGS}")
def test_movielens_100k_with_genres_through_the_reader(tmp_path: Path) -> None:
    from data.config import DataConfig, FeatureConfig
    from data.reader import SequenceReader

    out = tmp_path / "ml"
    assert run(["movielens", ML_RATINGS, "--items", ML_ITEMS, "--out", out, "--parts", 2]) == 0
    table = read_parts(out)
    assert table.column_names == ["user_id", "item_id", "cate_id", "behavior_id", "timestamp"]
    assert table.num_rows == 943 and sum(len(r) for r in table.column("item_id").to_pylist()) == 100_000
    for row in table.slice(0, 20).to_pylist():
        times = [int(t[0]) for t in row["timestamp"]]
        assert times == sorted(times) and {r[0] for r in row["behavior_id"]} <= {"1", "2", "3", "4", "5"}
    # Toy Story (movie 1) is Animation, Children's, Comedy: genre flags 3, 4, 5.
    rows = table.to_pylist()
    toy = next(c for r in rows for i, c in zip(r["item_id"], r["cate_id"]) if i == [1])
    assert toy == [3, 4, 5]
    cfg = DataConfig(data_paths=str(out), batch_size=64, seq_len=200, truncate_side="left", time_feature="timestamp", drop_remainder=False,
                     features=[FeatureConfig("item_id", num_embeddings=1683), FeatureConfig("cate_id", num_embeddings=19)])  # fmt: skip
    batches = list(SequenceReader(cfg))
    assert sum(b.batch_size for b in batches) == 943 and all(b.timestamps is not None for b in batches)


def test_movielens_sorts_by_time_and_keeps_several_genres(tmp_path: Path) -> None:
    ratings = tmp_path / "u.data"
    ratings.write_text("2\t7\t5\t300\n1\t7\t3\t200\n1\t8\t4\t100\n")
    items = tmp_path / "u.item"
    flags = lambda *on: "|".join("1" if i in on else "0" for i in range(19))  # noqa: E731
    items.write_text(f"7|Seven (1995)|01-Jan-1995||http://x|{flags(1, 16)}\n8|Eight|||http://y|{flags()}\n",
                     encoding="iso-8859-1")  # fmt: skip
    assert run(["movielens", ratings, "--items", items, "--out", tmp_path / "o", "--parts", 1]) == 0
    rows = read_parts(tmp_path / "o").to_pylist()
    assert [r["user_id"] for r in rows] == [1, 2]
    assert flat_row(rows[0]["item_id"]) == [8, 7] and rows[0]["cate_id"] == [[0], [1, 16]]  # no flag: "unknown"
    assert rows[0]["behavior_id"] == [["4"], ["3"]] and rows[0]["timestamp"] == [["100"], ["200"]]


def test_movielens_bad_items_name_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ratings = tmp_path / "u.data"
    ratings.write_text("1\t7\t3\t200\n1\t9\t4\t300\n")
    items = tmp_path / "u.item"
    items.write_text("7|Seven|||x|" + "|".join(["0"] * 19) + "\n")
    assert run(["movielens", ratings, "--items", items, "--out", tmp_path / "o"]) == 1
    assert "column 'item', line 2: item 9 is not in" in capsys.readouterr().err
    items.write_text("7|Seven|||x|0|1\n")
    assert run(["movielens", ratings, "--items", items, "--out", tmp_path / "o2"]) == 1
    assert f"{items}, line 1: expected" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- events


def test_events_csv_with_mapping(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_text("uid,ts,sku,kind,extra\n7,2024-01-02,100,click,x\n7,2024-01-01,101,view,y\n8,2024-01-01,100,buy,z\n")
    argv = ["events", src, "--out", tmp_path / "o", "--parts", 1, "--user", "uid", "--item", "sku",
            "--behavior", "kind", "--time", "ts", "--time-kind", "string"]
    assert run(argv) == 0
    table = read_parts(tmp_path / "o")
    assert table.column_names == ["user_id", "item_id", "behavior_id", "timestamp"]
    rows = table.to_pylist()
    assert flat_row(rows[0]["item_id"]) == [101, 100] and flat_row(rows[0]["behavior_id"]) == ["view", "click"]
    assert flat_row(rows[0]["timestamp"]) == ["2024-01-01", "2024-01-02"]


def test_events_parquet_in_small_chunks(tmp_path: Path) -> None:
    n = 1000
    rng = np.random.default_rng(0)
    users, times = rng.integers(0, 50, n), rng.permutation(n)
    pq.write_table(pa.table({"u": pa.array(users, pa.int32()), "i": pa.array(np.arange(n), pa.int64()),
                             "c": pa.array(np.arange(n) % 7, pa.uint8()), "t": pa.array(times, pa.int64())}),
                   tmp_path / "ev.parquet", row_group_size=100)
    argv = ["events", tmp_path / "ev.parquet", "--out", tmp_path / "o", "--parts", 4, "--chunk-rows", 37,
            "--user", "u", "--item", "i", "--cate", "c", "--time", "t", "--rows-per-stripe", 5]
    assert run(argv) == 0
    table = read_parts(tmp_path / "o")
    assert table.num_rows == len(set(users.tolist()))
    for row in table.to_pylist():
        items = flat_row(row["item_id"])
        assert [int(t[0]) for t in row["timestamp"]] == sorted(times[items].tolist())
        assert all(users[i] == row["user_id"] for i in items)
        assert flat_row(row["cate_id"]) == [i % 7 for i in items]


# ---------------------------------------------------------------------------------------- bad input


def _events_csv(tmp_path: Path, body: str) -> Path:
    src = tmp_path / "bad.csv"
    src.write_text("user,item,time\n" + body)
    return src


def _convert_events(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture, **extra: str) -> str:
    argv = ["events", src, "--out", tmp_path / "o", "--user", "user", "--item", "item", "--time", "time"]
    for key, value in extra.items():
        argv += [f"--{key}", value]
    assert run(argv) == 1
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("1,2,3\n1,abc,4\n", r"bad\.csv, column 'item', line 3: not an integer id: 'abc'"),
        ("1,2,3\n1,,4\n", r"bad\.csv, column 'item', line 3: empty value"),
        ("1,2,3\n-4,2,4\n", r"bad\.csv, column 'user', line 3: negative id: '-4'"),
        ("1,2,3\n1,9999999999999999999,4\n", r"bad\.csv, column 'item', line 3: id 9{19} is beyond int64"),
        ("1,2,3\n1,2,1.5\n", r"bad\.csv, column 'time', line 3: not an integer id: '1.5'"),
    ],
)
def test_bad_csv_values_name_file_column_and_line(tmp_path: Path, capsys: pytest.CaptureFixture, body: str,
                                                  expected: str) -> None:
    import re

    err = _convert_events(tmp_path, _events_csv(tmp_path, body), capsys)
    assert re.search(expected, err), err
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path / "o")  # nothing half-written, no empty folder


def test_missing_csv_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _convert_events(tmp_path, _events_csv(tmp_path, "1,2,3\n"), capsys, cate="category")
    assert "bad.csv, column 'category'" in err and "missing" in err


def test_taobao_wrong_column_count_names_file_line_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "tb.csv"
    src.write_text("1,2,3,pv,100\n1,2,3,pv\n")
    assert run(["taobao", src, "--out", tmp_path / "o"]) == 1
    err = capsys.readouterr().err
    expected = (f"error: {src}, line 2: expected 5 columns (user_id, item_id, category_id, behavior_type, timestamp), "
                "found 4: '1,2,3,pv'")
    assert expected in err, err
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path / "o")


@pytest.mark.parametrize(
    ("body", "line", "found", "text"),
    [
        ("1,2,3\n1,2\n1,2,3\n", 3, 2, "1,2"),  # a short row
        ("1,2,3\n1,2,3,4\n", 3, 4, "1,2,3,4"),  # a long one
        ("1,2,3\n\n\n1,2,3\n7\n", 6, 1, "7"),  # empty lines are skipped but count as lines
        ("1,2,3\r\n\r\n1,2\r\n", 4, 2, "1,2"),  # Windows line ends
    ],
)
def test_csv_row_with_wrong_column_count_names_its_editor_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, body: str, line: int, found: int, text: str
) -> None:
    src = _events_csv(tmp_path, body)
    err = _convert_events(tmp_path, src, capsys)
    assert f"error: {src}, line {line}: expected 3 columns (as in the header), found {found}: {text!r}" in err, err


def test_value_error_after_empty_lines_names_the_editor_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _convert_events(tmp_path, _events_csv(tmp_path, "1,2,3\n\n1,abc,4\n"), capsys)
    assert "bad.csv, column 'item', line 4: not an integer id: 'abc'" in err, err


# ----------------------------------------------------------------------------------- the --out folder


def _events_argv(src: Path, out: Path, *extra: object) -> list:
    return ["events", src, "--out", out, "--user", "user", "--item", "item", "--time", "time", *extra]


def test_failed_conversion_creates_no_folder_at_all(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _events_csv(tmp_path, "1,2,3\n1,abc,4\n")
    out = tmp_path / "new" / "deeper" / "o"
    assert run(_events_argv(src, out)) == 1
    assert "line 3" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the parent folders it would have made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_earlier_output_is_replaced_whole_and_kept_on_failure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = "".join(f"{user},{user + 10},{user}\n" for user in range(8))
    src = _events_csv(tmp_path, rows)
    out = tmp_path / "o"
    assert run(_events_argv(src, out, "--parts", 4)) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i:05d}.orc" for i in range(4)]
    # Fewer parts: no stale part-00002/3 of the first run is left next to the new ones.
    assert run(_events_argv(src, out, "--parts", 2)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.orc", "part-00001.orc"]
    assert read_parts(out).num_rows == 8
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _events_csv(tmp_path, "1,2,3\n1,abc,4\n")
    assert run(_events_argv(bad, out, "--parts", 3)) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # a failed run leaves the earlier output
    assert not leftovers(out)


def test_out_folder_with_other_files_is_refused_untouched(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _events_csv(tmp_path, "1,2,3\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "part-00000.orc").write_text("old")
    assert run(_events_argv(src, out)) == 1
    err = capsys.readouterr().err
    assert f"--out {out} holds files other than an earlier conversion's part-NNNNN.orc (notes.txt)" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "part-00000.orc"]
    assert (out / "part-00000.orc").read_text() == "old" and not list(tmp_path.glob(".o.*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(_events_argv(src, empty)) == 0  # an empty folder is fine
    assert read_parts(empty).num_rows == 1


def test_taobao_null_behavior(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "tb.csv"
    src.write_text("1,2,3,pv,100\n1,2,3,,101\n")
    assert run(["taobao", src, "--out", tmp_path / "o"]) == 1
    assert "tb.csv, column 'behavior_type', line 2: empty value" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        ("i", pa.array([1.5, 2.5]), "column 'i': has Arrow type double; expected integer ids"),
        ("i", pa.array([1, None], pa.int64()), "column 'i', line 2: empty (null) value"),
        ("i", pa.array([1, -2], pa.int64()), "column 'i', line 2: negative id: -2"),
        ("i", pa.array([1, 2**63], pa.uint64()), "column 'i': id beyond int64"),
    ],
)
def test_bad_parquet_values(tmp_path: Path, capsys: pytest.CaptureFixture, column: str, values: pa.Array,
                            expected: str) -> None:
    pq.write_table(pa.table({"u": pa.array([1, 2], pa.int64()), column: values}), tmp_path / "ev.parquet")
    assert run(["events", tmp_path / "ev.parquet", "--out", tmp_path / "o", "--user", "u", "--item", "i"]) == 1
    err = capsys.readouterr().err
    assert "ev.parquet" in err and expected in err, err


def test_missing_parquet_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pq.write_table(pa.table({"u": pa.array([1], pa.int64())}), tmp_path / "ev.parquet")
    assert run(["events", tmp_path / "ev.parquet", "--out", tmp_path / "o", "--user", "u", "--item", "sku"]) == 1
    err = capsys.readouterr().err
    assert "ev.parquet, column 'sku': column is missing" in err


def test_truncated_parquet_and_missing_file_and_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pq.write_table(pa.table({"u": pa.array(range(1000)), "i": pa.array(range(1000))}), tmp_path / "ev.parquet")
    data = (tmp_path / "ev.parquet").read_bytes()
    (tmp_path / "ev.parquet").write_bytes(data[: len(data) // 2])
    base = ["--out", tmp_path / "o", "--user", "u", "--item", "i"]
    assert run(["events", tmp_path / "ev.parquet", *base]) == 1
    assert "ev.parquet: cannot read as Parquet" in capsys.readouterr().err
    assert run(["events", tmp_path / "nope.csv", *base]) == 1
    assert "input file does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run(["events", tmp_path / "empty", *base]) == 1
    assert "input folder" in capsys.readouterr().err


def test_help_of_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    for kind in ("taobao", "sasrec", "movielens", "events"):
        with pytest.raises(SystemExit) as info:
            main([kind, "--help"])
        assert info.value.code == 0
        assert "--out" in capsys.readouterr().out
