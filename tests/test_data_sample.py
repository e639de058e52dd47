"""Built-in sample data: schema, determinism, idempotence, id ranges and learnable structure."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.orc as orc
import pytest

from data.sample import BEHAVIORS, MARKER, SampleParams, ensure_sample_data, generate_table, main

SMALL = SampleParams(users=600, items=300, categories=12, files=3, max_len=30, rows_per_stripe=64, seed=11)

LL_INT = pa.list_(pa.list_(pa.int64()))
LL_STR = pa.list_(pa.list_(pa.string()))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_sample_data(tmp_path_factory.mktemp("sample") / "data", SMALL)


@pytest.fixture(scope="module")
def small_table(small_dir: Path) -> pa.Table:
    return pa.concat_tables(orc.ORCFile(str(p)).read() for p in sorted(small_dir.glob("*.orc")))


def _flat(table: pa.Table, column: str) -> np.ndarray:
    return pc.list_flatten(pc.list_flatten(table.column(column))).to_numpy()


def test_schema(small_dir: Path, small_table: pa.Table) -> None:
    assert sorted(p.name for p in small_dir.iterdir()) == [MARKER] + [f"part-{i:05d}.orc" for i in range(3)]
    assert small_table.schema == pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", LL_INT),
            ("cate_id", LL_INT),
            ("behavior_id", LL_STR),
            ("timestamp", LL_STR),
        ]
    )
    assert small_table.num_rows == SMALL.users
    assert small_table.column("user_id").to_pylist() == list(range(SMALL.users))


def test_several_stripes_per_file(small_dir: Path) -> None:
    for path in sorted(small_dir.glob("*.orc")):
        reader = orc.ORCFile(str(path))
        rows = [reader.read_stripe(i).num_rows for i in range(reader.nstripes)]
        assert reader.nstripes >= 3
        assert all(r == SMALL.rows_per_stripe for r in rows[:-1]) and 0 < rows[-1] <= SMALL.rows_per_stripe


def test_ids_lengths_and_values(small_table: pa.Table) -> None:
    items = _flat(small_table, "item_id")
    cates = _flat(small_table, "cate_id")
    assert items.min() >= 0 and items.max() < SMALL.items
    assert cates.min() >= 0 and cates.max() < SMALL.categories

    lengths = pc.list_value_length(small_table.column("item_id")).to_numpy()
    assert lengths.min() >= SMALL.min_len and lengths.max() <= SMALL.max_len
    assert len(set(lengths.tolist())) > 10  # varied lengths
    for column in ("cate_id", "behavior_id", "timestamp"):
        assert (pc.list_value_length(small_table.column(column)).to_numpy() == lengths).all()

    # One item per position; mostly one category, sometimes two.
    item_bags = pc.list_value_length(pc.list_flatten(small_table.column("item_id"))).to_numpy()
    cate_bags = pc.list_value_length(pc.list_flatten(small_table.column("cate_id"))).to_numpy()
    assert (item_bags == 1).all()
    assert set(cate_bags.tolist()) == {1, 2} and 0.02 < (cate_bags == 2).mean() < 0.4

    behaviors = Counter(_flat(small_table, "behavior_id").tolist())
    assert set(behaviors) == set(BEHAVIORS)
    assert behaviors.most_common(1)[0][0] == "pv" and behaviors["buy"] < behaviors["cart"]


def test_timestamps_increase_within_user(small_table: pa.Table) -> None:
    stamps = _flat(small_table, "timestamp").astype(np.int64)
    lengths = pc.list_value_length(small_table.column("timestamp")).to_numpy()
    user = np.repeat(np.arange(len(lengths)), lengths)
    same_user = user[1:] == user[:-1]
    assert (np.diff(stamps)[same_user] > 0).all()
    assert stamps.min() > 1_600_000_000


def test_transition_structure_is_learnable(small_table: pa.Table) -> None:
    """The most frequent successor of an item shows up far more often than any popularity baseline."""
    items = _flat(small_table, "item_id")
    lengths = pc.list_value_length(small_table.column("item_id")).to_numpy()
    user = np.repeat(np.arange(len(lengths)), lengths)
    same_user = user[1:] == user[:-1]
    prev, nxt = items[:-1][same_user], items[1:][same_user]
    popularity = np.bincount(items, minlength=SMALL.items) / len(items)

    shares = []
    for item in np.unique(prev):
        followers = nxt[prev == item]
        if len(followers) >= 30:
            shares.append(np.bincount(followers).max() / len(followers))
    assert len(shares) >= 20
    # Without transitions the best guess is the most popular item overall.
    assert np.mean(shares) > 0.25
    assert np.mean(shares) > 3 * popularity.max()


def test_deterministic(tmp_path: Path, small_table: pa.Table) -> None:
    again = ensure_sample_data(tmp_path / "again", SMALL)
    table = pa.concat_tables(orc.ORCFile(str(p)).read() for p in sorted(again.glob("*.orc")))
    assert table.equals(small_table)
    assert generate_table(SMALL).equals(generate_table(SMALL))
    other_seed = SampleParams(**{**SMALL.__dict__, "seed": 12})
    assert not generate_table(other_seed).equals(generate_table(SMALL))


def test_idempotent_and_regenerates_on_new_params(tmp_path: Path) -> None:
    params = SampleParams(users=200, items=100, categories=5, files=2, max_len=20)
    out = ensure_sample_data(tmp_path / "d", params)
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    started = time.perf_counter()
    assert ensure_sample_data(tmp_path / "d", params) == out
    assert time.perf_counter() - started < 0.05
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first

    changed = SampleParams(users=200, items=100, categories=5, files=3, max_len=20)
    ensure_sample_data(tmp_path / "d", changed)
    assert len(list(out.glob("*.orc"))) == 3
    # No temporary folders left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a sample data folder"):
        ensure_sample_data(tmp_path / "mine", SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_invalid_params() -> None:
    with pytest.raises(ValueError, match="min_len"):
        generate_table(SampleParams(min_len=10, max_len=5))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path / "cli"), "--users", "50", "--items", "40", "--files", "2", "--follow-prob", "0.5"])
    assert "2 ORC files" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").glob("*.orc"))) == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--rows-per-stripe" in capsys.readouterr().out
