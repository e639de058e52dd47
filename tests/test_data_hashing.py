"""Id mapping: MurmurHash64A (scalar reference vs vectorised), modulo buckets and errors."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from data.config import FeatureConfig
from data.ids import check_feature, map_ids
from data.ops.buckets import INT64_MAX
from data.ops.murmur import murmurhash64a, murmurhash64a_strings

# Computed with the scalar reference (and cross-checked once against a C build of Appleby's MurmurHash64A);
# written literally so a change to either implementation is caught.
FIXED_VECTORS = {
    "": 0,
    "a": 510903276987443985,
    "pv": 11864363586698456875,
    "cart": 1047745439411091280,
    "fav": 16199047777721450753,
    "buy": 12103365446357145302,
    "hello": 2191231550387646743,
    "1700000000": 15337263782902198055,
    "héllo wörld ✓": 14742354002132628458,
    "abcdefgh": 12671724553504926360,
    "abcdefghijklmnopq": 1124046681825084455,
}

# Code points from 1-, 2-, 3- and 4-byte UTF-8 ranges.
_ALPHABET = "az09 _-" + "éßñü" + "中文字✓€" + "😀🚀"


def _random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        target = rng.randint(0, 40)  # byte length to reach (roughly; multi-byte chars may overshoot by 3)
        chars: list[str] = []
        while len("".join(chars).encode()) < target:
            chars.append(rng.choice(_ALPHABET))
        out.append("".join(chars))
    return out


def test_fixed_vectors_scalar() -> None:
    for text, expected in FIXED_VECTORS.items():
        assert murmurhash64a(text.encode()) == expected, text


def test_fixed_vectors_vectorised() -> None:
    texts = list(FIXED_VECTORS)
    got = murmurhash64a_strings(pa.array(texts))
    assert got.dtype == np.uint64
    assert [int(v) for v in got] == list(FIXED_VECTORS.values())


def test_seed_changes_hash() -> None:
    assert murmurhash64a(b"pv", seed=1) != murmurhash64a(b"pv")
    got = murmurhash64a_strings(pa.array(["pv", "cart"]), seed=7)
    assert [int(v) for v in got] == [murmurhash64a(b"pv", 7), murmurhash64a(b"cart", 7)]


@pytest.mark.parametrize("arrow_type", [pa.string(), pa.large_string()])
def test_vectorised_matches_scalar_on_random_strings(arrow_type: pa.DataType) -> None:
    texts = _random_strings(600, seed=3)
    lengths = {len(t.encode()) for t in texts}
    assert set(range(0, 41)) <= lengths  # every byte length 0..40 is exercised
    got = murmurhash64a_strings(pa.array(texts, type=arrow_type))
    assert [int(v) for v in got] == [murmurhash64a(t.encode()) for t in texts]


def test_vectorised_respects_array_slice_offset() -> None:
    texts = _random_strings(50, seed=5)
    sliced = pa.array(texts).slice(17, 20)
    assert [int(v) for v in murmurhash64a_strings(sliced)] == [murmurhash64a(t.encode()) for t in texts[17:37]]


def test_empty_array() -> None:
    assert murmurhash64a_strings(pa.array([], pa.string())).shape == (0,)
    assert map_ids(pa.array([], pa.string()), FeatureConfig("b", hash_type="murmur")).shape == (0,)


def test_murmur_bucket_and_bucket_zero() -> None:
    values = pa.array(["pv", "cart", "pv", "buy"])
    raw = [murmurhash64a(v.encode()) for v in values.to_pylist()]
    bucketed = map_ids(values, FeatureConfig("b", hash_type="murmur", hash_bucket_size=1000))
    assert bucketed.dtype == np.int64
    assert bucketed.tolist() == [h % 1000 for h in raw]
    unbounded = map_ids(values, FeatureConfig("b", hash_type="murmur", hash_bucket_size=0))
    assert unbounded.tolist() == [h & INT64_MAX for h in raw]
    assert (unbounded >= 0).all()


@pytest.mark.parametrize("bucket", [1, 16, 4096, 2_048_000, 1 << 40, 1000])
def test_bucket_is_modulo_for_powers_of_two_and_others(bucket: int) -> None:
    # Power-of-two buckets take a mask instead of a division: the same ids either way.
    values = pa.array([f"{i:010d}" for i in range(0, 10**9, 7_777_777)] + ["pv", "cart", ""])
    raw = [murmurhash64a(v.encode()) for v in values.to_pylist()]
    got = map_ids(values, FeatureConfig("t", hash_type="murmur", hash_bucket_size=bucket))
    assert got.tolist() == [h % bucket for h in raw]
    ints = pa.array([0, 1, 2**40 + 3, 2**62 + 5, 123_456_789], pa.int64())
    plain = map_ids(ints, FeatureConfig("i", hash_bucket_size=bucket))
    assert plain.tolist() == [v % bucket for v in ints.to_pylist()]


def test_murmur_hashes_integers_by_decimal_string() -> None:
    feature = FeatureConfig("t", hash_type="murmur", hash_bucket_size=2048000)
    ints = map_ids(pa.array([1700000000, -5, 0], pa.int64()), feature)
    strings = map_ids(pa.array(["1700000000", "-5", "0"]), feature)
    assert ints.tolist() == strings.tolist()


def test_murmur_on_chunked_array() -> None:
    chunked = pa.chunked_array([pa.array(["a", "pv"]), pa.array(["pv"])])
    got = map_ids(chunked, FeatureConfig("b", hash_type="murmur"))
    assert got.tolist() == [FIXED_VECTORS[s] & INT64_MAX for s in ("a", "pv", "pv")]


def test_plain_ids_modulo_bucket() -> None:
    got = map_ids(pa.array([0, 5, 2048, 4097], pa.int64()), FeatureConfig("cate_id", hash_bucket_size=2048))
    assert got.tolist() == [0, 5, 0, 1]
    unsigned = map_ids(pa.array([7, 9], pa.uint32()), FeatureConfig("c", hash_bucket_size=4))
    assert unsigned.tolist() == [3, 1]


def test_plain_negative_id_with_bucket_is_error() -> None:
    with pytest.raises(ValueError, match=r"cate_id.*-3.*non-negative"):
        map_ids(pa.array([1, -3]), FeatureConfig("cate_id", hash_bucket_size=10))


def test_plain_ids_in_range_without_bucket() -> None:
    feature = FeatureConfig("item_id", num_embeddings=10)
    assert map_ids(pa.array([0, 9, 3], pa.int32()), feature).tolist() == [0, 9, 3]


@pytest.mark.parametrize("bad", [10, -1])
def test_plain_id_out_of_range_names_feature_value_and_file(bad: int) -> None:
    feature = FeatureConfig("item_id", num_embeddings=10)
    with pytest.raises(ValueError) as info:
        map_ids(pa.array([1, bad, 2]), feature, column="item_id", source="/data/part-0.orc")
    message = str(info.value)
    assert "item_id" in message and str(bad) in message and "/data/part-0.orc" in message
    assert "[0, 10)" in message


def test_string_without_hash_type_is_error() -> None:
    with pytest.raises(ValueError, match=r"string column 'behavior_id'.*needs hash_type"):
        map_ids(pa.array(["pv"]), FeatureConfig("behavior_id", hash_bucket_size=10))


def test_unsupported_leaf_type_is_error() -> None:
    with pytest.raises(ValueError, match=r"'x'.*double"):
        map_ids(pa.array([1.5]), FeatureConfig("x", hash_type="murmur"))


def test_nulls_are_error() -> None:
    with pytest.raises(ValueError, match=r"'x'.*null"):
        map_ids(pa.array([1, None]), FeatureConfig("x", hash_bucket_size=5))


def test_uint64_beyond_int64_is_error() -> None:
    with pytest.raises(ValueError, match=r"'x'.*int64"):
        map_ids(pa.array([2**63], pa.uint64()), FeatureConfig("x", hash_bucket_size=5))


def test_check_feature_needs_rows_for_plain_ids() -> None:
    with pytest.raises(ValueError, match="num_embeddings"):
        check_feature(FeatureConfig("item_id"))
    check_feature(FeatureConfig("item_id", num_embeddings=5))
    check_feature(FeatureConfig("behavior_id", hash_type="murmur"))


@pytest.mark.parametrize("hash_type", ["murmur", "farm"])
def test_repeated_and_distinct_columns_hash_alike(hash_type: str) -> None:
    # Mostly repeated values go through dictionary encoding, mostly distinct ones are hashed directly;
    # both paths give the same ids.
    from data.ops.farmhash import farm_fingerprint64

    reference = farm_fingerprint64 if hash_type == "farm" else murmurhash64a
    repeated = pa.array(["pv", "buy"] * 600)
    distinct = pa.array([str(i) for i in range(1200)])
    feature = FeatureConfig("b", hash_type=hash_type, hash_bucket_size=1 << 40)
    for values in (repeated, distinct):
        expected = [reference(v.encode()) % (1 << 40) for v in values.to_pylist()]
        assert map_ids(values, feature).tolist() == expected
