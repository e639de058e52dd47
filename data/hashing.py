"""Map raw feature values (integers or strings) to embedding-row ids, vectorised over whole arrays.

RecIS semantics (``varlen_feature(name, hash_type, hash_bucket_size)``), see DESIGN.md section 1:

* ``hash_type="none"``: integer ids. With a bucket they are taken modulo the bucket; without one they must
  already lie in ``[0, num_embeddings)``. String leaves cannot be used without a hash.
* ``hash_type="murmur"``: MurmurHash64A (seed 0) over the UTF-8 bytes of each string, then
  ``hash % bucket`` (bucket > 0) or ``hash & INT64_MAX`` (bucket 0, an unbounded 63-bit id that the model
  maps through a managed-collision module). Integer leaves are hashed through their decimal string form
  (``123`` hashes like ``"123"``): RecIS hashes the string form of a value, so the same id gives the same
  row whether a file stores it as a number or as text.
* ``hash_type="farm"``: FarmHash ``Fingerprint64`` (``farmhashna::Hash64`` of Google's farmhash, the
  function TensorFlow's and BigQuery's ``FARM_FINGERPRINT`` use) over the UTF-8 bytes, then the same
  ``% bucket`` / ``& INT64_MAX`` as murmur. Integers hash through their decimal form, as for murmur.

Everything here works on whole Arrow/numpy arrays, never a Python loop per value: the compiled kernels of
``data.kernels`` hash and bucket every value in one pass; without numba, strings are hashed once per
*distinct* value, as numpy ``uint64`` arithmetic over all strings at once, one step per 8-byte block.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.config import FeatureConfig
from data import kernels
from data.farmhash import ByteWindows, farm_fingerprint64_strings, string_buffers, string_offsets

INT64_MAX = (1 << 63) - 1
_MASK64 = (1 << 64) - 1

# MurmurHash64A constants (Austin Appleby, MurmurHash2 64-bit variant "A").
_M = 0xC6A4A7935BD1E995
_R = 47
_M_U64 = np.uint64(_M)
_R_U64 = np.uint64(_R)



def murmurhash64a(data: bytes, seed: int = 0) -> int:
    """Scalar reference MurmurHash64A, written straight from the reference definition.

    Slow (pure Python); it exists to pin down the vectorised implementation in tests.
    """
    length = len(data)
    h = (seed ^ (length * _M)) & _MASK64
    nblocks = length // 8
    for i in range(nblocks):
        k = int.from_bytes(data[8 * i : 8 * i + 8], "little")
        k = (k * _M) & _MASK64
        k ^= k >> _R
        k = (k * _M) & _MASK64
        h ^= k
        h = (h * _M) & _MASK64
    tail = data[8 * nblocks :]
    if tail:
        # The reference's fall-through switch: XOR tail byte i at bit 8*i, then one multiply.
        for i in range(len(tail) - 1, -1, -1):
            h ^= tail[i] << (8 * i)
        h = (h * _M) & _MASK64
    h ^= h >> _R
    h = (h * _M) & _MASK64
    h ^= h >> _R
    return h


def murmurhash64a_strings(strings: pa.Array, seed: int = 0) -> np.ndarray:
    """MurmurHash64A of every string of a (non-null) string/large_string array, as ``uint64``.

    All strings advance together one 8-byte block per step (a mask selects the strings that still have a
    full block, skipped while all do), so the Python loop runs ``max_len / 8`` times, never once per string.
    """
    if strings.null_count:
        raise ValueError("cannot hash null strings")
    n = len(strings)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    starts, lengths, data = string_buffers(strings)
    words = ByteWindows(data).w64
    # uint64 array arithmetic wraps modulo 2**64, which is exactly the hash's arithmetic. In-place ops and one
    # scratch array: at a stripe's size the hash is bound by the number of numpy passes and allocations.
    with np.errstate(over="ignore"):
        h = lengths.astype(np.uint64)
        h *= _M_U64
        h ^= np.uint64(seed)
        scratch = np.empty(n, dtype=np.uint64)
        nblocks = lengths >> 3
        fewest = int(nblocks.min())
        pos = starts.copy()  # next block of every string
        for block in range(int(nblocks.max())):
            active = None if block < fewest else nblocks > block
            k = words[pos] if active is None else words[pos[active]]
            k *= _M_U64
            k ^= k >> _R_U64
            k *= _M_U64
            if active is None:
                h ^= k
                h *= _M_U64
                pos += 8
            else:
                h[active] = (h[active] ^ k) * _M_U64
                pos[active] += 8
        rem = lengths & 7
        low, high = int(rem.min()), int(rem.max())
        if high:
            # The reference XORs the 1..7 tail bytes in little-endian order: one masked 8-byte load.
            tail = words[pos]
            if low == high:  # e.g. fixed-width ids or timestamps: one scalar mask
                tail &= np.uint64((1 << (8 * low)) - 1)
                h ^= tail
                h *= _M_U64
            else:
                tail &= (np.uint64(1) << (rem.astype(np.uint64) << np.uint64(3))) - np.uint64(1)
                h ^= tail  # 0 where there is no tail
                has_tail = rem > 0
                h[has_tail] *= _M_U64
        np.right_shift(h, _R_U64, out=scratch)
        h ^= scratch
        h *= _M_U64
        np.right_shift(h, _R_U64, out=scratch)
        h ^= scratch
    return h


def _where(feature: FeatureConfig, column: str | None, source: str | None) -> str:
    """Human-readable location for error messages: feature, column, file."""
    col = column or feature.name
    text = f"feature {feature.name!r} (column {col!r})" if col != feature.name else f"column {col!r}"
    return f"{text} in {source}" if source else text


def check_feature(feature: FeatureConfig) -> None:
    """Reject a feature configuration that cannot map ids, before any file is read (``FeatureConfig.validate``)."""
    feature.validate(f"feature {feature.name!r}")


def is_supported_leaf(leaf: pa.DataType) -> bool:
    return pa.types.is_integer(leaf) or pa.types.is_string(leaf) or pa.types.is_large_string(leaf)


def check_leaf_type(
    feature: FeatureConfig, leaf: pa.DataType, column: str | None = None, source: str | None = None
) -> None:
    """Errors for a leaf type this feature cannot map (checked once per file, not per value)."""
    where = _where(feature, column, source)
    if not is_supported_leaf(leaf):
        raise ValueError(f"{where}: values must be integers or strings, found Arrow type {leaf}")
    if feature.hash_type == "none" and not pa.types.is_integer(leaf):
        raise ValueError(
            f"string {where} needs hash_type (e.g. hash_type = \"murmur\"): strings cannot be used as ids directly"
        )


def _to_int64(values: pa.Array, where: str) -> np.ndarray:
    try:
        ints = pc.cast(values, pa.int64(), safe=True)
    except pa.ArrowInvalid as exc:  # uint64 beyond INT64_MAX
        raise ValueError(f"{where}: integer id does not fit in int64 ({exc})") from exc
    return ints.to_numpy(zero_copy_only=False)


def _modulo(values: np.ndarray, bucket: int) -> np.ndarray:
    """``values % bucket`` for non-negative (or unsigned) ids; a mask when ``bucket`` is a power of two.

    Same result either way; 64-bit division is about ten times slower than an AND in numpy, and power-of-two
    buckets are the usual choice.
    """
    if bucket & (bucket - 1) == 0:
        return values & values.dtype.type(bucket - 1)
    return values % values.dtype.type(bucket)


def _map_plain_ints(values: pa.Array, feature: FeatureConfig, where: str) -> np.ndarray:
    ids = values.to_numpy() if values.type == pa.int64() else _to_int64(values, where)
    if ids.size == 0:
        return ids.astype(np.int64)
    if kernels.enabled():
        mapped, bad = kernels.map_ints(ids, feature.hash_bucket_size, feature.num_embeddings)
        if bad >= 0:
            _raise_bad_id(int(ids[bad]), feature, where)
        return mapped
    if feature.hash_bucket_size > 0:
        lowest = int(ids.min())
        if lowest < 0:
            _raise_bad_id(lowest, feature, where)
        return _modulo(ids, feature.hash_bucket_size)
    bad = (ids < 0) | (ids >= feature.num_embeddings)
    if bad.any():
        _raise_bad_id(int(ids[np.argmax(bad)]), feature, where)
    return ids


def _raise_bad_id(value: int, feature: FeatureConfig, where: str) -> None:
    if feature.hash_bucket_size > 0:
        raise ValueError(
            f"{where}: found id {value}; ids must be non-negative to be taken modulo "
            f"hash_bucket_size {feature.hash_bucket_size} (or use hash_type = \"murmur\")"
        )
    raise ValueError(
        f"{where}: id {value} is outside [0, {feature.num_embeddings}) (num_embeddings) and the feature "
        "has no hash_bucket_size; set hash_bucket_size or a larger num_embeddings"
    )


# Distinct share of a sample above which hashing every value beats dictionary-encoding first (measured:
# encoding costs about as much per value as hashing a short string).
_DEDUP_MAX_DISTINCT_SHARE = 0.5
_DEDUP_SAMPLE = 512


def _mostly_repeated(values: pa.Array) -> bool:
    sample = values.slice(0, _DEDUP_SAMPLE)
    return pc.count_distinct(sample).as_py() <= _DEDUP_MAX_DISTINCT_SHARE * len(sample)


def _hash(strings: pa.Array, hash_type: str) -> np.ndarray:
    return farm_fingerprint64_strings(strings) if hash_type == "farm" else murmurhash64a_strings(strings)


def _map_hashed(values: pa.Array, feature: FeatureConfig) -> np.ndarray:
    if pa.types.is_integer(values.type):
        values = pc.cast(values, pa.string())  # decimal form, see the module docstring
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    if kernels.enabled():
        # Compiled: hashing a short string costs a few ns, less than looking it up in a dictionary, so every
        # value is hashed, and bucketed, in the same pass.
        offsets, data = string_offsets(values)
        return kernels.hash_ids(data, offsets, feature.hash_type, feature.hash_bucket_size)
    # numpy: hash each distinct value once when values repeat a lot (behaviours, popular items); columns of
    # mostly distinct values (timestamps) are hashed directly.
    if _mostly_repeated(values):
        encoded = pc.dictionary_encode(values)
        hashes = _hash(encoded.dictionary, feature.hash_type)
        indices = encoded.indices.to_numpy(zero_copy_only=False)
    else:
        hashes, indices = _hash(values, feature.hash_type), None
    if feature.hash_bucket_size > 0:
        mapped = _modulo(hashes, feature.hash_bucket_size)
    else:
        mapped = hashes & np.uint64(INT64_MAX)
    mapped = mapped.astype(np.int64)
    return mapped if indices is None else mapped[indices]


def map_ids(
    values: pa.Array | pa.ChunkedArray,
    feature: FeatureConfig,
    column: str | None = None,
    source: str | None = None,
) -> np.ndarray:
    """Embedding-row ids (``int64``) for a flat array of leaf values of ``feature``.

    ``column`` and ``source`` (the file) only enrich error messages.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    where = _where(feature, column, source)
    check_feature(feature)
    check_leaf_type(feature, values.type, column, source)
    if values.null_count:
        raise ValueError(f"{where}: contains null values; nulls are not allowed in id columns")
    if feature.hash_type in ("murmur", "farm"):
        return _map_hashed(values, feature)
    return _map_plain_ints(values, feature, where)
