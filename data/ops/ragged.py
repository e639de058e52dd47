"""Index arithmetic of ragged arrays: rows of positions of values, stored flat with per-row counts.

Arrow ``list<T>`` / ``list<list<T>>`` columns are ragged arrays (offsets into a flat child), and so are the
reader's decoded features (``data.rows.FeatureRows``): these helpers turn counts into offsets and ranges
into flat indices, without a Python loop per row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def is_list_type(t: pa.DataType) -> bool:
    """A ``list`` or ``large_list`` Arrow type (one level of raggedness)."""
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    """``[len(counts) + 1]`` int64 offsets: 0, then the running sums of ``counts``."""
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], starts[i] + lengths[i])`` over i, without a Python loop."""
    total = int(lengths.sum())
    return np.repeat(starts - exclusive_cumsum(lengths)[:-1], lengths) + np.arange(total, dtype=np.int64)
