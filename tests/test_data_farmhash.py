"""FarmHash Fingerprint64: scalar reference and vectorised version against fixed vectors and pyfarmhash."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from data.config import FeatureConfig
from data.ids import map_ids
from data.ops.buckets import INT64_MAX
from data.ops.farmhash import farm_fingerprint64, farm_fingerprint64_strings

# Fingerprint64 values, one or more per code path (lengths 0, 1-3, 4-7, 8-16, 17-32, 33-64, >64 with one
# and several 64-byte blocks). "" is farmhash's k2 = 0x9ae16a3b2f90404f, i.e. BigQuery's
# FARM_FINGERPRINT('') = -7286425919675154353; the rest were checked against pyfarmhash 0.5.1 (a C++ build
# of Google's farmhash) and are written literally so a change to either implementation is caught.
FIXED_VECTORS = {
    "": 11160318154034397263,
    "a": 12917804110809363939,
    "pv": 6592460515497050844,
    "cart": 17373322897559973354,
    "hello": 13009744463427800296,
    "abcdefgh": 18368443631171807497,
    "1700000000": 9705057031555970165,
    "héllo wörld ✓": 276027234456023084,
    "abcdefghijklmnopq": 11394395984755135400,
    "x" * 40: 17003596230054984852,
    "y" * 100: 17121492607157028355,
    "z" * 200: 8728890208429024092,
}

_ALPHABET = "az09 _-" + "éßñü" + "中文字✓€" + "😀🚀"


def _strings_of_every_length(max_bytes: int, seed: int) -> list[str]:
    """At least one string of every UTF-8 byte length 0..max_bytes (ASCII padding hits exact lengths)."""
    rng = random.Random(seed)
    out = []
    for target in range(max_bytes + 1):
        for _ in range(2):
            text = ""
            while len(text.encode()) < target - 4:
                text += rng.choice(_ALPHABET)
            text += "q" * (target - len(text.encode()))
            out.append(text)
    return out


def test_bigquery_empty_string_vector() -> None:
    assert farm_fingerprint64(b"") - (1 << 64) == -7286425919675154353


def test_fixed_vectors_scalar() -> None:
    for text, expected in FIXED_VECTORS.items():
        assert farm_fingerprint64(text.encode()) == expected, text


@pytest.mark.parametrize("arrow_type", [pa.string(), pa.large_string()])
def test_fixed_vectors_vectorised(arrow_type: pa.DataType) -> None:
    got = farm_fingerprint64_strings(pa.array(list(FIXED_VECTORS), arrow_type))
    assert got.dtype == np.uint64
    assert [int(v) for v in got] == list(FIXED_VECTORS.values())


def test_vectorised_matches_scalar_on_every_length() -> None:
    texts = _strings_of_every_length(200, seed=1)
    assert {len(t.encode()) for t in texts} == set(range(201))
    sliced = pa.array(["pad"] + texts).slice(1)  # a non-zero array offset too
    assert [int(v) for v in farm_fingerprint64_strings(sliced)] == [farm_fingerprint64(t.encode()) for t in texts]


def test_against_pyfarmhash() -> None:
    farmhash = pytest.importorskip("farmhash", reason="pyfarmhash (test extra) is the independent reference")
    texts = _strings_of_every_length(300, seed=2)
    expected = [farmhash.fingerprint64(t) for t in texts]
    assert [farm_fingerprint64(t.encode()) for t in texts] == expected
    assert [int(v) for v in farm_fingerprint64_strings(pa.array(texts))] == expected


def test_map_ids_farm_bucket_and_bucket_zero() -> None:
    values = pa.array(["pv", "cart", "pv", "y" * 100])
    raw = [farm_fingerprint64(v.encode()) for v in values.to_pylist()]
    assert map_ids(values, FeatureConfig("b", hash_type="farm", hash_bucket_size=97)).tolist() == [h % 97 for h in raw]
    unbounded = map_ids(values, FeatureConfig("b", hash_type="farm"))
    assert unbounded.tolist() == [h & INT64_MAX for h in raw]
    # Integers hash through their decimal form, as with murmur.
    ints = map_ids(pa.array([1700000000], pa.int64()), FeatureConfig("t", hash_type="farm"))
    assert ints.tolist() == [FIXED_VECTORS["1700000000"] & INT64_MAX]


def test_null_strings_rejected() -> None:
    with pytest.raises(ValueError, match="null"):
        farm_fingerprint64_strings(pa.array(["a", None]))
