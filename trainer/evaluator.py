"""Leave-one-out evaluation: full-ranking (or sampled) HR@K, NDCG@K and MRR, distributed over ranks.

Per user, the model reads the history and its hidden state at the last history position is the query; the
held-out next item is the target. The query is scored, by cosine similarity as in the loss, against every
candidate item's target representation (``DenseArch.item_representation``: the same projection the loss
uses). The target's rank is the number of candidates scoring strictly higher, the target itself left out.

How the work is split, so memory stays bounded for millions of items and every rank does a share:

* candidates are cut into chunks of ``eval.item_chunk`` ids, dealt round-robin to ranks; each rank looks its
  chunks up once through the sharded embedding collection and keeps their normalised representations;
* users are read by every rank's own reader (stripes dealt to ranks, as in training); at each step the ranks
  gather all queries, each scores them against its own candidates and the counts are summed over ranks.

Ranks are counted into an integer histogram, and the metrics are computed from it once at the end, so
the numbers do not depend on the number of ranks or on batch order.

Used during training (``train.eval_steps``) and by the command line of a checkpoint (``trainer/evaluate.py``:
``python -m trainer.evaluate --config CONFIG --checkpoint PATH``, usually ``./launch.sh eval``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import SequenceBatch, negatives_key, with_negatives
from data.config import WHOLE_SEQUENCES, DataConfig
from data.reader import SequenceReader
from model.next_item import NextItemModel
from trainer.config import EvalConfig, JobConfig
from trainer.dist import DistContext

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    split: str
    protocol: str
    metrics: dict[str, float]
    num_users: int
    num_candidates: int
    seconds: float

    def summary(self) -> str:
        values = " ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return (
            f"eval {self.split} ({self.protocol}, {self.num_users:,} users, {self.num_candidates:,} candidates, "
            f"{self.seconds:.1f}s): {values}"
        )

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ metrics


def ranking_metrics(rank_counts: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Metrics from a histogram: ``rank_counts[r]`` users whose target had ``r`` candidates above it.

    HR@K = share of users with rank < K; NDCG@K = mean of 1/log2(rank + 2) over those (one relevant item,
    so the ideal DCG is 1); MRR = mean of 1/(rank + 1) over all users.
    """
    total = int(rank_counts.sum())
    if total == 0:
        return {name: float("nan") for name in EvalConfig(ks=ks).metric_names()}
    ranks = np.arange(len(rank_counts), dtype=np.float64)
    gains = 1.0 / np.log2(ranks + 2.0)
    metrics: dict[str, float] = {}
    for k in ks:
        top = rank_counts[:k]
        metrics[f"hr@{k}"] = float(top.sum() / total)
        metrics[f"ndcg@{k}"] = float((top * gains[:k]).sum() / total)
    metrics["mrr"] = float((rank_counts / (ranks + 1.0)).sum() / total)
    return metrics


def eval_data_config(cfg: JobConfig) -> DataConfig:
    """The reader settings of evaluation: every user once, in file order, history plus the target.

    The validation split holds out the last position (its target is the second-to-last item), the test
    split none. ``seq_len + 1`` positions are kept so that the query still sees ``seq_len`` items, always
    the newest ones, whatever side training truncates.
    """
    e = cfg.eval
    return dataclasses.replace(
        cfg.eval_data(),
        batch_size=e.batch_size or cfg.data.batch_size,
        seq_len=cfg.data.seq_len + 1,
        truncate_side="left",
        check_length=False,
        holdout_positions=1 if e.split == "valid" else 0,
        shuffle=False,
        drop_remainder=False,
    )


# ---------------------------------------------------------------------------------------------- evaluator


@dataclass
class _Queries:
    """One rank's users of one step: normalised queries and what scoring them needs."""

    vectors: torch.Tensor  # [n, H] float32, unit length
    targets: torch.Tensor  # [n] item ids
    history: torch.Tensor  # [n, T] earlier item ids, -1 padded
    negatives: torch.Tensor  # [n, K] sampled protocol's negative ids, or [n, 0]


class Evaluator:
    """Runs one evaluation over ``cfg.eval`` with an already sharded (and trained or restored) model.

    Every rank must call :meth:`run` together: the lookups and the scoring are collectives.
    """

    def __init__(self, cfg: JobConfig, ctx: DistContext, dmp: DistributedModelParallel) -> None:
        self.cfg, self.ctx, self.dmp = cfg, ctx, dmp
        self.data_cfg = eval_data_config(cfg)
        model = dmp.module.model  # type: ignore[union-attr]  # TrainStep -> NextItemModel, unwrapped
        if not isinstance(model, NextItemModel):
            raise TypeError(f"expected a NextItemModel inside the DMP, got {type(model).__name__}")
        self.model = model
        self.layout = model.layout
        self.item_rows = next(f for f in cfg.data.features if f.name == cfg.data.item_feature).table_rows
        self._keys = list(self.layout.feature_names)
        if self.layout.negatives:
            self._keys.append(negatives_key(self.layout.item_feature))

    # ------------------------------------------------------------------------------------ public entry

    @torch.no_grad()
    def run(self) -> EvalResult:
        started = time.perf_counter()
        was_training = self.dmp.training
        self.dmp.eval()  # dropout off; managed-collision tables stop admitting ids
        try:
            candidates = self._candidates()
            local_ids, local_vectors = self._candidate_vectors(candidates)
            counts = self._rank_users(candidates, local_ids, local_vectors)
        finally:
            self.dmp.train(was_training)
        e = self.cfg.eval
        result = EvalResult(
            split=e.split,
            protocol=e.protocol if e.protocol == "full" else f"sampled, {e.num_negatives} negatives",
            metrics=ranking_metrics(counts, e.ks),
            num_users=int(counts.sum()),
            num_candidates=int(candidates.size),
            seconds=time.perf_counter() - started,
        )
        if self.ctx.is_main:
            logger.info("%s", result.summary())
        return result

    # ------------------------------------------------------------------------------------- candidates

    def _reader(self, whole_sequences: bool = False) -> SequenceReader:
        cfg = self.data_cfg
        if whole_sequences:
            # Every item of the sequence: no holdout and no truncation (a batch pads to its longest user).
            cfg = dataclasses.replace(cfg, holdout_positions=0, seq_len=WHOLE_SEQUENCES)
        return SequenceReader(cfg, rank=self.ctx.rank, world_size=self.ctx.world_size, epochs=1)

    def _candidates(self) -> np.ndarray:
        """Sorted candidate item ids, the same on every rank."""
        if self.cfg.eval.candidates == "table":
            return np.arange(self.item_rows, dtype=np.int64)
        seen = [np.empty(0, dtype=np.int64)]
        # Whole sequences, whatever the split: an item seen only as some user's test target is an item too.
        for batch in self._reader(whole_sequences=True):
            ids = batch.item_ids.numpy()
            seen.append(np.unique(ids[ids >= 0]))
        mine = np.unique(np.concatenate(seen))
        gathered: list[np.ndarray | None] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, mine, group=self.ctx.control_group)
        return np.unique(np.concatenate([g for g in gathered if g is not None]))

    def _candidate_vectors(self, candidates: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """This rank's chunks of candidates: (sorted ids, ``[n, H]`` unit-length representations)."""
        chunk, world = self.cfg.eval.item_chunk, self.ctx.world_size
        bounds = list(range(0, candidates.size, chunk))
        mine = bounds[self.ctx.rank :: world]
        # Every rank makes the same number of lookups (a lookup is a collective); a rank out of chunks
        # looks up one id and drops it.
        rounds = math.ceil(len(bounds) / world)
        ids_parts, vector_parts = [], []
        for r in range(rounds):
            ids = candidates[mine[r] : mine[r] + chunk] if r < len(mine) else candidates[:1]
            vectors = self._item_vectors(torch.from_numpy(ids))
            if r < len(mine):
                ids_parts.append(ids)
                vector_parts.append(vectors)
        if not ids_parts:
            return np.empty(0, dtype=np.int64), torch.empty(0, self.cfg.model.hidden_size, device=self.ctx.device)
        return np.concatenate(ids_parts), torch.cat(vector_parts)

    def _item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit-length target representations of ``ids`` through the sharded embedding collection."""
        kjt = self._lookup_kjt(ids)
        embeddings = self.model.sparse(kjt.to(self.ctx.device))
        item = embeddings[:, self.layout.columns(self.layout.item_feature)]
        return F.normalize(self.model.dense.item_representation(item).float(), dim=-1, eps=1e-6)

    def _lookup_kjt(self, ids: torch.Tensor) -> KeyedJaggedTensor:
        """A KJT with one bag per id on the item key and empty bags on every other key."""
        n = ids.numel()
        lengths = [
            torch.ones(n, dtype=torch.int32) if k == self.layout.item_feature else torch.zeros(n, dtype=torch.int32)
            for k in self._keys
        ]
        return KeyedJaggedTensor(keys=self._keys, values=ids.long(), lengths=torch.cat(lengths), stride=n)

    # ------------------------------------------------------------------------------------------- users

    def _rank_users(self, candidates: np.ndarray, local_ids: np.ndarray, local_vectors: torch.Tensor) -> np.ndarray:
        """Histogram of the targets' ranks over all users of all ranks."""
        size = candidates.size if self.cfg.eval.protocol == "full" else self.cfg.eval.num_negatives + 1
        counts = np.zeros(size, dtype=np.int64)
        for queries in self._steps(candidates):
            gathered = self._gather(queries)
            if self.cfg.eval.protocol == "full":
                ranks = self._full_ranks(gathered, local_ids, local_vectors)
            else:
                ranks = self._sampled_ranks(gathered, local_ids, local_vectors)
            counts += np.bincount(ranks.cpu().numpy(), minlength=size)[:size]
        return counts

    def _steps(self, candidates: np.ndarray) -> Iterator[_Queries]:
        """This rank's queries, step by step, for as long as any rank still has users (ranks without a
        batch take part in the collectives with an empty one)."""
        batches = iter(self._reader())
        while True:
            batch = next(batches, None)
            has = torch.tensor([0 if batch is None else 1])
            dist.all_reduce(has, op=dist.ReduceOp.MAX, group=self.ctx.control_group)
            if has.item() == 0:
                return
            yield self._queries(batch, candidates)

    def _queries(self, batch: SequenceBatch | None, candidates: np.ndarray) -> _Queries:
        if batch is None:
            # The sharded lookup is a collective: run it on a one-position dummy user and keep nothing.
            batch = _dummy_batch(self.layout.feature_names)
            keep_none = True
        else:
            keep_none = False
        if self.layout.negatives:
            # The model has a negatives key; evaluation samples none but the key must be there.
            batch = with_negatives(batch, negatives_key(self.layout.item_feature), torch.empty(0, dtype=torch.long))
        kjt = batch.sparse_features
        embeddings = self.model.sparse(kjt.to(self.ctx.device))
        item_ids = batch.item_ids.to(self.ctx.device)
        lengths = batch.seq_lengths.to(self.ctx.device).long()
        times = None if batch.timestamps is None else batch.timestamps.to(self.ctx.device)
        hidden, _ = self.model.dense.encode(embeddings, item_ids.shape, lengths, times)
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(lengths.numel(), device=item_ids.device)
        targets = item_ids[rows, last]
        # A user needs a target item (an empty last position has none) and history. As in SASRec, users
        # with fewer than 3 items are not evaluated on either split (they have no validation target), so
        # both splits score the same users.
        min_length = 2 if self.cfg.eval.split == "valid" else 3
        keep = (lengths >= min_length) & (targets >= 0) & (not keep_none)
        query = hidden[rows, (last - 1).clamp(min=0)][keep]
        history = item_ids[keep]
        history = torch.where(
            torch.arange(history.shape[1], device=history.device).unsqueeze(0) < (last[keep]).unsqueeze(1), history, -1
        )
        targets = targets[keep]
        negatives = torch.empty(int(keep.sum()), 0, dtype=torch.long, device=item_ids.device)
        if self.cfg.eval.protocol == "sampled":
            negatives = self._sample_negatives(history.cpu(), targets.cpu(), candidates).to(item_ids.device)
        return _Queries(F.normalize(query.float(), dim=-1, eps=1e-6), targets, history, negatives)

    def _sample_negatives(self, history: torch.Tensor, targets: torch.Tensor, candidates: np.ndarray) -> torch.Tensor:
        """``num_negatives`` candidates per user that are neither in the history nor the target, drawn with
        a generator seeded by the user's own items, so a user gets the same negatives on any rank."""
        k = self.cfg.eval.num_negatives
        out = np.empty((targets.numel(), k), dtype=np.int64)
        for i, (hist, target) in enumerate(zip(history.numpy(), targets.numpy(), strict=True)):
            seen = np.append(hist[hist >= 0], target)
            key = zlib.crc32(seen.tobytes())
            rng = np.random.default_rng([self.cfg.eval.seed, key])
            out[i] = _draw_excluding(rng, candidates, np.unique(seen), k)
        return torch.from_numpy(out)

    # ----------------------------------------------------------------------------------------- scoring

    def _gather(self, q: _Queries) -> _Queries:
        """Every rank's queries, in rank order (padded to a common count for the collective, then cut)."""
        world = self.ctx.world_size
        if world == 1:
            return q
        n = torch.tensor([q.targets.numel(), q.history.shape[1]])
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=self.ctx.control_group)
        most, width = max(int(s[0]) for s in sizes), max(int(s[1]) for s in sizes)
        history = F.pad(q.history, (0, width - q.history.shape[1]), value=-1)
        parts = [q.vectors, q.targets.unsqueeze(1).float(), history.float(), q.negatives.float()]
        # One float64 buffer per rank: ids stay exact (< 2**53) and it is a single collective.
        packed = torch.cat([p.double() for p in parts], dim=1)
        packed = F.pad(packed, (0, 0, 0, most - packed.shape[0]))
        out = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(out, packed)
        merged = torch.cat([o[: int(s[0])] for o, s in zip(out, sizes, strict=True)])
        h, k = q.vectors.shape[1], q.negatives.shape[1]
        return _Queries(
            vectors=merged[:, :h].float(),
            targets=merged[:, h].long(),
            history=merged[:, h + 1 : h + 1 + width].long(),
            negatives=merged[:, h + 1 + width : h + 1 + width + k].long(),
        )

    def _local_positions(self, ids: torch.Tensor, local_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in this rank's candidates, found mask) of ``ids``."""
        flat = ids.reshape(-1).cpu().numpy()
        pos = np.searchsorted(local_ids, flat).clip(max=max(local_ids.size - 1, 0))
        found = (local_ids[pos] == flat) if local_ids.size else np.zeros(flat.shape, dtype=bool)
        device = self.ctx.device
        return (
            torch.from_numpy(pos).to(device).view(ids.shape),
            torch.from_numpy(found).to(device).view(ids.shape),
        )

    def _owned_scores(
        self, q: _Queries, ids: torch.Tensor, local_ids: np.ndarray, vectors: torch.Tensor
    ) -> torch.Tensor:
        """Scores of ``ids`` ([Q, M]) for the candidates this rank holds, 0 elsewhere; summed over ranks
        every score is present exactly once (x + 0 is exact)."""
        pos, found = self._local_positions(ids, local_ids)
        scores = torch.zeros(ids.shape, dtype=torch.float32, device=self.ctx.device)
        if vectors.shape[0]:
            picked = vectors[pos.clamp(max=vectors.shape[0] - 1)]  # [Q, M, H]
            scores = torch.where(found, (picked * q.vectors.unsqueeze(1)).sum(-1), scores)
        if self.ctx.world_size > 1:
            dist.all_reduce(scores)
        return scores

    def _full_ranks(self, q: _Queries, local_ids: np.ndarray, vectors: torch.Tensor) -> torch.Tensor:
        target_scores = self._owned_scores(q, q.targets.unsqueeze(1), local_ids, vectors)[:, 0]
        above = torch.zeros(q.targets.numel(), dtype=torch.long, device=self.ctx.device)
        excluded = self._excluded_pairs(q, local_ids)
        ids = torch.from_numpy(local_ids).to(self.ctx.device)
        for start in range(0, local_ids.size, self.cfg.eval.item_chunk):
            stop = min(start + self.cfg.eval.item_chunk, local_ids.size)
            scores = q.vectors @ vectors[start:stop].t()  # [Q, C]
            higher = (scores > target_scores.unsqueeze(1)) & (ids[start:stop].unsqueeze(0) != q.targets.unsqueeze(1))
            if excluded is not None:
                rows, cols = excluded
                inside = (cols >= start) & (cols < stop)
                higher[rows[inside], cols[inside] - start] = False
            above += higher.sum(dim=1)
        if self.ctx.world_size > 1:
            dist.all_reduce(above)
        return above

    def _excluded_pairs(self, q: _Queries, local_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(query row, local candidate position) of history items to leave out (eval.exclude_history)."""
        if not self.cfg.eval.exclude_history or not local_ids.size:
            return None
        pos, found = self._local_positions(q.history.clamp(min=0), local_ids)
        found &= q.history >= 0
        rows = torch.arange(q.history.shape[0], device=pos.device).unsqueeze(1).expand_as(pos)
        return rows[found], pos[found]

    def _sampled_ranks(self, q: _Queries, local_ids: np.ndarray, vectors: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([q.targets.unsqueeze(1), q.negatives], dim=1)  # the target first
        scores = self._owned_scores(q, ids, local_ids, vectors)
        return (scores[:, 1:] > scores[:, :1]).sum(dim=1)


# ------------------------------------------------------------------------------------------------ helpers


def _draw_excluding(rng: np.random.Generator, candidates: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct candidates not in ``excluded`` (sorted); an error if there are not enough."""
    available = candidates.size - np.isin(excluded, candidates).sum()
    if available < k:
        raise ValueError(f"eval.num_negatives = {k}, but a user has only {available} candidate items left to sample")
    picked = np.empty(0, dtype=np.int64)
    while picked.size < k:
        draw = candidates[rng.integers(0, candidates.size, size=2 * k)]
        draw = draw[~np.isin(draw, excluded) & ~np.isin(draw, picked)]
        _, first = np.unique(draw, return_index=True)
        picked = np.concatenate([picked, draw[np.sort(first)]])
    return picked[:k]


def _dummy_batch(keys: tuple[str, ...]) -> SequenceBatch:
    n = len(keys)
    kjt = KeyedJaggedTensor(
        keys=list(keys), values=torch.zeros(n, dtype=torch.long), lengths=torch.ones(n, dtype=torch.int32), stride=1
    )
    return SequenceBatch(kjt, torch.ones(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))


def write_result(output_dir: Path, step: int, result: EvalResult) -> None:
    """Append one line to ``output_dir/eval.jsonl``."""
    with (output_dir / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **result.to_json()}) + "\n")
