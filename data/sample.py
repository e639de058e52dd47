"""Deterministic sample data in the seed's ORC schema, with structure a next-item model can learn.

One row per user: ``user_id`` (int64) and four oldest-first sequence columns, ``item_id`` and ``cate_id``
as ``list<list<int64>>`` and ``behavior_id`` and ``timestamp`` as ``list<list<string>>``.

What makes it learnable:

* item popularity follows a Zipf law (a popularity baseline beats uniform chance);
* every item belongs to a category (and some to a second one, so those positions carry two category
  values and exercise mean pooling over several values);
* every item has a few likely successors (mostly popular items of its own category); a user follows that
  transition table with probability ``follow_prob`` at each step, else jumps to a popular item.

Usage: ``python -m data.sample --out DIR [--users N --items N ...]`` or ``ensure_sample_data(dir, params)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.orc as orc

logger = logging.getLogger(__name__)

MARKER = "_SAMPLE_PARAMS.json"
BEHAVIORS = ("pv", "cart", "fav", "buy")
# Page views dominate real logs; purchases are rare.
BEHAVIOR_PROBS = (0.82, 0.09, 0.06, 0.03)
# 2023-11-14T22:13:20Z: any fixed start keeps the output deterministic.
START_TIME = 1_700_000_000


@dataclass(frozen=True)
class SampleParams:
    users: int = 4000
    items: int = 2000
    categories: int = 50
    files: int = 8
    min_len: int = 5
    max_len: int = 50
    seed: int = 0
    # Rows per ORC stripe: several stripes per file so that stripe-level sharding is exercised.
    rows_per_stripe: int = 128
    # Likely successors per item and the chance that a step follows one (else a popular jump).
    successors: int = 3
    follow_prob: float = 0.8
    zipf_exponent: float = 1.0
    # Share of items that also belong to a second category (two values at their positions).
    multi_category_share: float = 0.1

    def validate(self) -> None:
        if min(self.users, self.items, self.categories, self.files, self.min_len, self.rows_per_stripe) < 1:
            raise ValueError(f"sample sizes must be positive: {self}")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len {self.min_len} > max_len {self.max_len}")
        if self.categories < 2 or self.items < self.successors + 1:
            raise ValueError("need at least 2 categories and more items than successors per item")
        if not 0.0 <= self.follow_prob <= 1.0 or not 0.0 <= self.multi_category_share <= 1.0:
            raise ValueError("follow_prob and multi_category_share must lie in [0, 1]")


@dataclass
class _Catalog:
    popularity: np.ndarray  # [items] probabilities
    category: np.ndarray  # [items] primary category
    second_category: np.ndarray  # [items] second category or -1
    successors: np.ndarray  # [items, successors]
    successor_probs: np.ndarray  # [successors], the same for every item


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    weights = weights[rng.permutation(n)]  # popular ids spread over the id range
    return weights / weights.sum()


def _make_catalog(p: SampleParams, rng: np.random.Generator) -> _Catalog:
    popularity = _zipf(p.items, p.zipf_exponent, rng)
    category = rng.choice(p.categories, size=p.items, p=_zipf(p.categories, 0.7, rng))
    # A second category differs from the first by a non-zero offset.
    second = (category + rng.integers(1, p.categories, size=p.items)) % p.categories
    second = np.where(rng.random(p.items) < p.multi_category_share, second, -1)
    successors = np.empty((p.items, p.successors), dtype=np.int64)
    for cat in range(p.categories):  # loop per category; draws are vectorised over its items
        members = np.flatnonzero(category == cat)
        if len(members) == 0:
            continue
        # Successors mostly come from the same category, weighted by popularity; a few from anywhere.
        pool = members if len(members) > p.successors else np.arange(p.items)
        weights = popularity[pool] / popularity[pool].sum()
        picks = rng.choice(pool, size=(len(members), p.successors), p=weights)
        anywhere = rng.choice(p.items, size=(len(members), p.successors), p=popularity)
        successors[members] = np.where(rng.random(picks.shape) < 0.8, picks, anywhere)
    # Popular items tend to pick themselves; a self-loop would teach "repeat the input", so redraw those
    # from the popularity law (and shift any that hit themselves again).
    self_loop = successors == np.arange(p.items)[:, None]
    successors[self_loop] = rng.choice(p.items, size=int(self_loop.sum()), p=popularity)
    self_loop = successors == np.arange(p.items)[:, None]
    successors[self_loop] = (successors[self_loop] + 1) % p.items
    ranks = 1.0 / np.arange(1, p.successors + 1) ** 1.5
    return _Catalog(popularity, category, second, successors, ranks / ranks.sum())


def _simulate_items(p: SampleParams, catalog: _Catalog, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[users, max_len] item ids: a Markov walk over the transition table with popular jumps."""
    items = np.empty((p.users, p.max_len), dtype=np.int64)
    items[:, 0] = rng.choice(p.items, size=p.users, p=catalog.popularity)
    for t in range(1, int(lengths.max())):  # one vectorised step for all users at a time
        prev = items[:, t - 1]
        which = rng.choice(p.successors, size=p.users, p=catalog.successor_probs)
        follow = catalog.successors[prev, which]
        jump = rng.choice(p.items, size=p.users, p=catalog.popularity)
        items[:, t] = np.where(rng.random(p.users) < p.follow_prob, follow, jump)
    return items


def _nested(values: pa.Array, inner_lengths: np.ndarray, outer_lengths: np.ndarray) -> pa.ListArray:
    """list<list<T>> from flat values, values per position and positions per row."""
    inner_offsets = pa.array(np.concatenate([[0], np.cumsum(inner_lengths)]).astype(np.int32))
    outer_offsets = pa.array(np.concatenate([[0], np.cumsum(outer_lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(outer_offsets, pa.ListArray.from_arrays(inner_offsets, values))


def generate_table(p: SampleParams) -> pa.Table:
    """All users as one Arrow table (fully determined by ``p``)."""
    p.validate()
    rng = np.random.default_rng(p.seed)
    catalog = _make_catalog(p, rng)
    lengths = rng.integers(p.min_len, p.max_len + 1, size=p.users)
    walk = _simulate_items(p, catalog, lengths, rng)
    valid = np.arange(p.max_len)[None, :] < lengths[:, None]
    items = walk[valid]  # row-major: users in order, events oldest-first
    positions = len(items)

    second = catalog.second_category[items]
    cate_counts = 1 + (second >= 0)
    cates = np.stack([catalog.category[items], second], axis=1)[np.arange(2)[None, :] < cate_counts[:, None]]

    behaviors = rng.choice(len(BEHAVIORS), size=positions, p=BEHAVIOR_PROBS)
    # Seconds between events: mostly minutes, sometimes days; >= 1 so timestamps strictly increase.
    gaps = np.maximum(1, rng.exponential(600.0, size=positions).astype(np.int64))
    breaks = rng.random(positions) < 0.05
    gaps[breaks] += rng.integers(3600, 7 * 86400, size=int(breaks.sum()))
    starts = START_TIME + rng.integers(0, 30 * 86400, size=p.users)
    row_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cum = np.cumsum(gaps)
    timestamps = np.repeat(starts, lengths) + cum - np.repeat(cum[row_start], lengths)

    ones = np.ones(positions, dtype=np.int64)
    return pa.table(
        {
            "user_id": pa.array(np.arange(p.users, dtype=np.int64)),
            "item_id": _nested(pa.array(items), ones, lengths),
            "cate_id": _nested(pa.array(cates.astype(np.int64)), cate_counts, lengths),
            "behavior_id": _nested(pc.take(pa.array(BEHAVIORS), pa.array(behaviors)), ones, lengths),
            "timestamp": _nested(pc.cast(pa.array(timestamps), pa.string()), ones, lengths),
        }
    )


def write_files(table: pa.Table, out_dir: Path, p: SampleParams) -> list[Path]:
    """Split ``table`` into ``p.files`` contiguous parts, each ORC file with several stripes."""
    bounds = np.linspace(0, table.num_rows, p.files + 1).astype(int)
    paths = []
    for index in range(p.files):
        path = out_dir / f"part-{index:05d}.orc"
        part = table.slice(bounds[index], bounds[index + 1] - bounds[index])
        # The writer closes a stripe once its size estimate passes stripe_size, checked after each batch,
        # so a 1-byte stripe_size makes each batch of rows_per_stripe rows its own stripe (the string
        # columns make the estimate non-zero after any batch; tests check the stripe row counts).
        orc.write_table(part, str(path), stripe_size=1, batch_size=p.rows_per_stripe)
        paths.append(path)
    return paths


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_sample_data(out_dir: str | os.PathLike, params: SampleParams | None = None) -> Path:
    """Sample data in ``out_dir``, generated only if it is missing or was made with other parameters.

    Written into a temporary sibling folder and renamed into place, so a reader never sees half a data
    set, and ranks racing to generate the same data all end up with one complete copy.
    """
    p = params or SampleParams()
    out = Path(out_dir)
    wanted = asdict(p)
    if _read_marker(out) == wanted:
        return out
    if out.exists() and any(out.iterdir()) and _read_marker(out) is None:
        raise FileExistsError(f"{out} exists and is not a sample data folder (no {MARKER}); not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_files(generate_table(p), tmp, p)
        (tmp / MARKER).write_text(json.dumps(wanted, sort_keys=True))  # last: marks the folder complete
        if out.exists():
            if _read_marker(out) == wanted:  # another process finished first
                return out
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "data")
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:
            if _read_marker(out) != wanted:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote sample data (%s) to %s in %.2fs", p, out, time.perf_counter() - started)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (regenerated only if parameters changed)")
    defaults = SampleParams()
    for f in fields(SampleParams):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name),
                            help=f"default {getattr(defaults, f.name)}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(_parser().parse_args(argv))
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = ensure_sample_data(out, SampleParams(**args))
    files = sorted(path.glob("*.orc"))
    print(f"sample data: {path} ({len(files)} ORC files)")


if __name__ == "__main__":
    main()
