"""The compiled reader kernels (data.ops) against the scalar references and the numpy paths they replace.

Every kernel has a numpy twin used without numba; both must give the same bits, the same batches and the same
errors. Patching ``jit.enabled`` to return False switches the reader to the twins inside one process.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import data.reader as reader_module
from data.config import DataConfig, FeatureConfig
from data.ids import map_ids
from data.layout import build_batches
from data.ops import buckets, jit
from data.ops.buckets import INT64_MAX
from data.ops.cut import cut_feature, drop_tail, split_layout, truncate
from data.ops.farmhash import farm_fingerprint64
from data.ops.murmur import murmurhash64a
from data.ops.strings import string_offsets
from data.reader import SequenceReader
from data.rows import FeatureRows, RowBlock
from tests.test_data_reader import LL_INT, LL_STR, write_orc

pytestmark = pytest.mark.skipif(not jit.enabled(), reason="numba is not installed")

_ALPHABET = "az09 _-" + "éßñü" + "中文字✓€" + "😀🚀"


def _strings(count: int, max_bytes: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        target = i % (max_bytes + 1) if i <= max_bytes else rng.randint(0, max_bytes)
        text = ""
        while len(text.encode()) < target - 4:
            text += rng.choice(_ALPHABET)
        out.append(text + "q" * (target - len(text.encode())))
    return out


@pytest.mark.parametrize("arrow_type", [pa.string(), pa.large_string()])
def test_hashes_match_scalar_references_on_every_length(arrow_type: pa.DataType) -> None:
    texts = _strings(700, 300, seed=1)  # every byte length 0..300: all of farmhash's code paths
    # A slice, so that offsets do not start at 0 and the last string ends inside the data buffer.
    array = pa.array(["head", *texts, "tail"], arrow_type).slice(1, len(texts))
    offsets, data = string_offsets(array)
    murmur = buckets.hash_strings(data, offsets, "murmur")
    assert murmur.dtype == np.uint64
    assert [int(h) for h in murmur] == [murmurhash64a(t.encode()) for t in texts]
    seeded = buckets.hash_strings(data, offsets, "murmur", seed=7)
    assert [int(h) for h in seeded[:50]] == [murmurhash64a(t.encode(), 7) for t in texts[:50]]
    farm = buckets.hash_strings(data, offsets, "farm")
    assert [int(h) for h in farm] == [farm_fingerprint64(t.encode()) for t in texts]


def test_tail_at_the_very_end_of_the_buffer() -> None:
    # The last string's tail bytes end the data buffer: the masked 8-byte load must not be used there.
    for text in ("a", "abcdefghi", "1700000000"):
        offsets, data = string_offsets(pa.array([text]))
        assert len(data) == len(text.encode())
        assert int(buckets.hash_strings(data, offsets, "murmur")[0]) == murmurhash64a(text.encode())


@pytest.mark.parametrize("hash_type", ["murmur", "farm"])
@pytest.mark.parametrize("bucket", [0, 1, 16, 4096, 1000, 2_048_000, 97])
def test_hash_ids_bucket_mapping(hash_type: str, bucket: int) -> None:
    texts = _strings(200, 40, seed=2)
    reference = murmurhash64a if hash_type == "murmur" else farm_fingerprint64
    expected = [reference(t.encode()) % bucket if bucket else reference(t.encode()) & INT64_MAX for t in texts]
    offsets, data = string_offsets(pa.array(texts))
    ids = buckets.hash_ids(data, offsets, hash_type, bucket)
    assert ids.dtype == np.int64 and ids.tolist() == expected


@pytest.mark.parametrize(
    "feature",
    [
        FeatureConfig("b", hash_type="murmur", hash_bucket_size=1000),
        FeatureConfig("b", hash_type="farm", hash_bucket_size=1024),
        FeatureConfig("b", hash_type="murmur"),
        FeatureConfig("i", hash_bucket_size=64),
        FeatureConfig("i", hash_bucket_size=1000),
        FeatureConfig("i", num_embeddings=500),
    ],
)
def test_map_ids_same_with_and_without_kernels(feature: FeatureConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    if feature.hash_type == "none":
        values = pa.array(rng.integers(0, 500, 3000), pa.int64())
    else:
        # Mostly repeated values take the numpy path's dictionary branch, the timestamps its direct one.
        values = pa.array([str(v) for v in rng.choice([1, 2, 3, 17, 1_700_000_000], 3000)])
    compiled = map_ids(values, feature)
    monkeypatch.setattr(jit, "enabled", lambda: False)
    assert compiled.tolist() == map_ids(values, feature).tolist()


@pytest.mark.parametrize("bad", [-3, 500])
def test_invalid_int_ids_same_error_with_and_without_kernels(bad: int, monkeypatch: pytest.MonkeyPatch) -> None:
    feature = FeatureConfig("item_id", **({"hash_bucket_size": 10} if bad < 0 else {"num_embeddings": 500}))
    values = pa.array([1, 2, bad, 4], pa.int64())
    with pytest.raises(ValueError) as compiled:
        map_ids(values, feature, column="item_id", source="f.orc")
    monkeypatch.setattr(jit, "enabled", lambda: False)
    with pytest.raises(ValueError) as reference:
        map_ids(values, feature, column="item_id", source="f.orc")
    assert str(compiled.value) == str(reference.value) and str(bad) in str(compiled.value)


def _ragged(rows: int, nested: bool, seed: int) -> pa.Array:
    """Rows of 0..12 positions, each of 0..3 values (nested) or one; some rows and positions empty."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        if nested:
            bags = [rng.choice([0, 1, 1, 1, 2, 3]) for _ in range(rng.randrange(13))]
            out.append([[rng.randrange(100) for _ in range(bag)] for bag in bags])
        else:
            out.append([rng.randrange(100) for _ in range(rng.randrange(13))])
    return pa.array(out, LL_INT if nested else pa.list_(pa.int64()))


def _numpy_cut(arr: pa.Array, cfg: DataConfig) -> tuple:
    positions, bag_lengths, leaves = split_layout(arr, "x")
    positions, bag_lengths, leaves = drop_tail(positions, bag_lengths, leaves, cfg.holdout_positions)
    positions, bag_lengths, leaves = truncate(positions, bag_lengths, leaves, cfg.seq_len, cfg.truncate_side)
    return positions.tolist(), bag_lengths.tolist(), leaves.to_pylist()


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("seq_len", "holdout"), [(4, 0), (4, 2), (100, 0), (100, 1), (1, 3)])
def test_cut_matches_numpy_path(nested: bool, side: str, seq_len: int, holdout: int) -> None:
    cfg = DataConfig(seq_len=seq_len, truncate_side=side, holdout_positions=holdout)
    whole = _ragged(300, nested, seed=seq_len * 10 + holdout)
    for arr in (whole, whole.slice(37, 200)):  # a slice: offsets do not start at 0
        cut = cut_feature(arr, cfg, "x")
        assert (cut.positions.tolist(), cut.bag_lengths.tolist(), cut.leaves.to_pylist()) == _numpy_cut(arr, cfg)
        assert cut.empty_in_file.tolist() == [len(row) == 0 for row in arr.to_pylist()]
        assert cut.pos_offsets.tolist() == [0, *np.cumsum(cut.positions).tolist()]
        assert cut.bag_offsets.tolist() == [0, *np.cumsum(cut.bag_lengths).tolist()]


def test_check_length_and_nulls_same_errors_with_and_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(seq_len=3, check_length=True, holdout_positions=1)
    too_long = pa.array([[[1]] * 4, [[1]] * 5, [[2]]], LL_INT)  # row 1 keeps 4 > 3 after the hold-out
    null_leaf = pa.array([[[1]], [[2, None]]], LL_INT)
    compiled = []
    for arr in (too_long, null_leaf):
        with pytest.raises(ValueError) as info:
            cut_feature(arr, cfg, "column 'item_id' in f.orc")
        compiled.append(str(info.value))
    monkeypatch.setattr(jit, "enabled", lambda: False)
    for arr, message in zip((too_long, null_leaf), compiled):
        with pytest.raises(ValueError) as info:
            cut_feature(arr, cfg, "column 'item_id' in f.orc")
        assert str(info.value) == message
    assert "row 1 has 4 positions" in compiled[0] and "null" in compiled[1]


def _random_block(rows: int, seed: int) -> RowBlock:
    rng = np.random.default_rng(seed)
    features = []
    for f in range(3):
        positions = rng.integers(0 if f else 1, 20, rows)
        total = int(positions.sum())
        bag_lengths = rng.choice([0, 1, 1, 2, 3], total) if f else np.ones(total, np.int64)
        values = rng.integers(0, 1000, int(bag_lengths.sum()))
        features.append(FeatureRows(positions.astype(np.int64), bag_lengths.astype(np.int64), values.astype(np.int64)))
    return RowBlock(features)


@pytest.mark.parametrize("item_index", [0, 1])
def test_build_batches_matches_numpy_path(item_index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    block = _random_block(203, seed=item_index)
    keys = ["a", "b", "c"]
    # A view in the middle of the block, as the reader cuts them, and the whole block.
    for part in (block, block.slice(17, 190)):
        compiled = build_batches(part, 16, keys, item_index)
        with monkeypatch.context() as patch:
            patch.setattr(jit, "enabled", lambda: False)
            reference = build_batches(part, 16, keys, item_index)
        assert len(compiled) == len(reference) == -(-part.num_rows // 16)
        for got, want in zip(compiled, reference):
            assert got.sparse_features.lengths().dtype == want.sparse_features.lengths().dtype
            assert got.sparse_features.lengths().tolist() == want.sparse_features.lengths().tolist()
            assert got.sparse_features.values().tolist() == want.sparse_features.values().tolist()
            assert got.sparse_features.stride() == want.sparse_features.stride()
            assert got.item_ids.tolist() == want.item_ids.tolist()
            assert got.seq_lengths.tolist() == want.seq_lengths.tolist()


@pytest.mark.parametrize("threads", [1, 3])
def test_reader_batches_identical_with_and_without_kernels(
    tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(4)
    items = [[[rng.randrange(5000)] for _ in range(rng.randrange(1, 30))] for _ in range(150)]
    behaviours = [[[rng.choice(["pv", "cart", "fav", "buy"])] * rng.choice([1, 2]) for _ in user] for user in items]
    write_orc(
        tmp_path / "part-0.orc",
        {"item_id": pa.array(items, LL_INT), "behavior_id": pa.array(behaviours, LL_STR)},
        rows_per_stripe=23,
    )
    cfg = DataConfig(
        data_paths=str(tmp_path), batch_size=8, seq_len=12, truncate_side="left", holdout_positions=1,
        read_threads=threads, prefetch=2, drop_remainder=False,
        features=[FeatureConfig("item_id", hash_bucket_size=4096),
                  FeatureConfig("behavior_id", hash_type="murmur", hash_bucket_size=100)],
    )  # fmt: skip

    def batches() -> list[tuple]:
        out = []
        for batch in SequenceReader(cfg):
            kjt = batch.sparse_features
            out.append((kjt.values().tolist(), kjt.lengths().tolist(), batch.item_ids.tolist(),
                        batch.seq_lengths.tolist()))  # fmt: skip
        return out

    compiled = batches()
    monkeypatch.setattr(jit, "enabled", lambda: False)
    assert compiled == batches()
    assert sum(len(b[3]) for b in compiled) == sum(len(user) > 1 for user in items)  # emptied by the hold-out


def test_prefetch_bounds_how_far_the_reader_works_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 600 users in stripes of 100, batch 10: groups of 10 batches. With prefetch 1 the producer hands over a
    # group only while nothing waits, so at most one group is ahead of a consumer that has stopped reading.
    rows = [[[i]] for i in range(600)]
    write_orc(tmp_path / "p.orc", {"item_id": pa.array(rows, LL_INT)}, rows_per_stripe=100)
    cfg = DataConfig(data_paths=str(tmp_path), batch_size=10, seq_len=4, read_threads=2, prefetch=1,
                     features=[FeatureConfig("item_id", num_embeddings=1000)])  # fmt: skip
    waiting: list[int] = []
    original = reader_module._Handoff.put

    def put(self: reader_module._Handoff, item: object, batches: int, stop: threading.Event) -> bool:
        accepted = original(self, item, batches, stop)
        waiting.append(self._waiting)
        return accepted

    monkeypatch.setattr(reader_module._Handoff, "put", put)
    batches = iter(SequenceReader(cfg))
    first = next(batches)
    time.sleep(0.5)  # the producer runs as far ahead as it may
    assert 0 < max(waiting) <= 10
    rest = list(batches)
    assert [int(b.item_ids[0, 0]) for b in [first, *rest]] == list(range(0, 600, 10))
