"""Map a feature's raw values (integers or strings) to embedding-row ids, with RecIS's semantics.

RecIS semantics (``varlen_feature(name, hash_type, hash_bucket_size)``):

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

This module owns the rules and the error messages; the per-value work (hashes and buckets, compiled or
numpy, on whole arrays, never a Python loop per value) is ``data.ops``: ``murmur``, ``farmhash``,
``buckets``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.config import FeatureConfig
from data.ops import buckets


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


def _map_plain_ints(values: pa.Array, feature: FeatureConfig, where: str) -> np.ndarray:
    ids = values.to_numpy() if values.type == pa.int64() else _to_int64(values, where)
    if ids.size == 0:
        return ids.astype(np.int64)
    mapped, bad = buckets.int_ids(ids, feature.hash_bucket_size, feature.num_embeddings)
    if bad is not None:
        _raise_bad_id(bad, feature, where)
    return mapped


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


def _map_hashed(values: pa.Array, feature: FeatureConfig) -> np.ndarray:
    if pa.types.is_integer(values.type):
        values = pc.cast(values, pa.string())  # decimal form, see the module docstring
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    return buckets.hashed_ids(values, feature.hash_type, feature.hash_bucket_size)


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
