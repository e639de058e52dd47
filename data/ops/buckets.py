"""Raw values -> embedding-row ids: hashes of strings, and integers, taken modulo a bucket or range-checked.

A bucket ``b > 0`` maps a value ``v`` to ``v % b``; a hash without a bucket keeps its low 63 bits
(``& INT64_MAX``: an unbounded id that the model maps through a managed-collision module). A power-of-two
bucket is applied as a mask, ``v & (b - 1)``: the same result, and a 64-bit division costs about ten
times an AND (in numpy), more than hashing a short string (in the kernels).

Entry points: ``hashed_ids`` (strings) and ``int_ids`` (integers), each with its kernel and numpy path
below it. ``hash_strings`` and ``hash_ids`` are the kernels on raw Arrow string buffers.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.ops import jit
from data.ops.farmhash import farm_fingerprint64_strings, farm_ids
from data.ops.murmur import murmur_ids, murmurhash64a_strings
from data.ops.strings import string_offsets

INT64_MAX = (1 << 63) - 1
_ALL_BITS = (1 << 64) - 1


def modulo(values: np.ndarray, bucket: int) -> np.ndarray:
    """``values % bucket`` for non-negative (or unsigned) ids; a mask when ``bucket`` is a power of two."""
    if bucket & (bucket - 1) == 0:
        return values & values.dtype.type(bucket - 1)
    return values % values.dtype.type(bucket)


# ------------------------------------------------------------------------------------- hashed strings


def hashed_ids(strings: pa.Array, hash_type: str, bucket: int) -> np.ndarray:
    """int64 ids of a non-empty, non-null string array: the seed-0 ``hash_type`` hash ("murmur" or "farm")
    of every string, then ``% bucket`` (bucket > 0) or ``& INT64_MAX``."""
    if jit.enabled():
        # Compiled: hashing a short string costs a few ns, less than looking it up in a dictionary, so every
        # value is hashed, and bucketed, in the same pass.
        offsets, data = string_offsets(strings)
        return hash_ids(data, offsets, hash_type, bucket)
    return _hashed_ids_numpy(strings, hash_type, bucket)


def hash_strings(data: np.ndarray, offsets: np.ndarray, hash_type: str, seed: int = 0) -> np.ndarray:
    """uint64 MurmurHash64A (``hash_type="murmur"``, seeded) or FarmHash Fingerprint64 (``"farm"``) of the
    strings ``data[offsets[i]:offsets[i+1]]`` (Arrow string layout). Kernel only."""
    return _hash(data, offsets, hash_type, seed, _ALL_BITS, False).view(np.uint64)


def hash_ids(data: np.ndarray, offsets: np.ndarray, hash_type: str, bucket: int) -> np.ndarray:
    """int64 ids: the seed-0 hash of every string, then ``% bucket`` (bucket > 0) or ``& INT64_MAX``.
    Kernel only."""
    # Power-of-two buckets by mask: a 64-bit division per value costs more than the hash of a short string.
    if bucket == 0 or bucket & (bucket - 1) == 0:
        return _hash(data, offsets, hash_type, 0, INT64_MAX if bucket == 0 else bucket - 1, False)
    return _hash(data, offsets, hash_type, 0, bucket, True)


def _hash(data: np.ndarray, offsets: np.ndarray, hash_type: str, seed: int, operand: int, divide: bool) -> np.ndarray:
    """The kernels' ids: the hash ``% operand`` if ``divide``, else ``& operand``."""
    out = np.empty(len(offsets) - 1, dtype=np.int64)
    if hash_type == "farm":
        farm_ids(data, offsets, np.uint64(operand), divide, out)
    else:
        murmur_ids(data, offsets, np.uint64(seed), np.uint64(operand), divide, out)
    return out


# Distinct share of a sample above which hashing every value beats dictionary-encoding first (measured:
# encoding costs about as much per value as hashing a short string).
_DEDUP_MAX_DISTINCT_SHARE = 0.5
_DEDUP_SAMPLE = 512


def _mostly_repeated(values: pa.Array) -> bool:
    sample = values.slice(0, _DEDUP_SAMPLE)
    return pc.count_distinct(sample).as_py() <= _DEDUP_MAX_DISTINCT_SHARE * len(sample)


def _hash_numpy(strings: pa.Array, hash_type: str) -> np.ndarray:
    return farm_fingerprint64_strings(strings) if hash_type == "farm" else murmurhash64a_strings(strings)


def _hashed_ids_numpy(values: pa.Array, hash_type: str, bucket: int) -> np.ndarray:
    # Hash each distinct value once when values repeat a lot (behaviours, popular items); columns of mostly
    # distinct values (timestamps) are hashed directly.
    if _mostly_repeated(values):
        encoded = pc.dictionary_encode(values)
        hashes = _hash_numpy(encoded.dictionary, hash_type)
        indices = encoded.indices.to_numpy(zero_copy_only=False)
    else:
        hashes, indices = _hash_numpy(values, hash_type), None
    if bucket > 0:
        mapped = modulo(hashes, bucket)
    else:
        mapped = hashes & np.uint64(INT64_MAX)
    mapped = mapped.astype(np.int64)
    return mapped if indices is None else mapped[indices]


# -------------------------------------------------------------------------------------------- integers


def int_ids(ids: np.ndarray, bucket: int, num_embeddings: int) -> tuple[np.ndarray, int | None]:
    """int64 ids of non-empty integer ids: ``% bucket`` (bucket > 0; ids must be >= 0), else checked to lie
    in ``[0, num_embeddings)``. Returns (ids, an invalid id or None).

    The invalid id reported is the first one, except on the numpy path with a bucket: the lowest one.
    """
    if jit.enabled():
        mapped, bad = map_ints(ids, bucket, num_embeddings)
        return mapped, (int(ids[bad]) if bad >= 0 else None)
    if bucket > 0:
        lowest = int(ids.min())
        return (ids, lowest) if lowest < 0 else (modulo(ids, bucket), None)
    bad = (ids < 0) | (ids >= num_embeddings)
    return (ids, int(ids[np.argmax(bad)])) if bad.any() else (ids, None)


def map_ints(values: np.ndarray, bucket: int, num_embeddings: int) -> tuple[np.ndarray, int]:
    """The kernel of ``int_ids``: (ids, index of the first invalid id or -1)."""
    out = np.empty(len(values), dtype=np.int64)
    if bucket > 0:
        masked = bucket & (bucket - 1) == 0
        bad = _map_ints(values, bucket - 1 if masked else bucket, not masked, True, out)
    else:
        bad = _map_ints(values, num_embeddings, False, False, out)
    return out, int(bad)


@jit.kernel
def _map_ints(values, operand, divide, bucketed, out):
    # Returns the index of the first invalid id (negative with a bucket, outside [0, operand) without).
    for i in range(len(values)):
        v = values[i]
        if bucketed:
            if v < 0:
                return i
            out[i] = v % operand if divide else v & operand
        else:
            if v < 0 or v >= operand:
                return i
            out[i] = v
    return -1
