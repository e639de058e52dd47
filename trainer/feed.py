"""The batches a training run consumes: pulled in step on every rank, with the sampled negatives attached,
counted so that a checkpoint records exactly where the reader stands."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.batch import SequenceBatch, with_negatives
from data.reader import SequenceReader
from trainer.dist import DistContext

logger = logging.getLogger(__name__)


class NegativeSampler:
    """Uniform item ids for the batch pulled ``index``-th: a function of (seed, rank, index) alone, so
    a resumed run draws the same negatives as an uninterrupted one."""

    def __init__(self, key: str, count: int, rows: int, seed: int, rank: int, start_index: int) -> None:
        self.key, self.count, self.rows = key, count, rows
        self.seed, self.rank = seed, rank
        self.index = start_index
        self._told_short = False

    def __call__(self, batch: SequenceBatch) -> SequenceBatch:
        rng = np.random.default_rng([self.seed, self.rank, self.index])
        self.index += 1
        ids = torch.from_numpy(rng.integers(0, self.rows, size=self.count, dtype=np.int64))
        out = with_negatives(batch, self.key, ids)
        used = 0 if out.negative_ids is None else out.negative_ids.numel()
        if used < self.count and not self._told_short:
            # A batch of short sequences has fewer bags (users x its longest sequence) than negatives; the
            # log-Q correction counts the draws actually used, so this is said, not an error.
            self._told_short = True
            logger.info(
                "a batch of %d bags carries %d of the model.num_negatives = %d uniform negatives (batches of "
                "shorter sequences carry fewer; said once)", batch.sparse_features.stride(), used, self.count,
            )
        return out


class _Feed(Iterator[SequenceBatch]):
    def __init__(self, source: StepAlignedBatches) -> None:
        self._source = source

    def __next__(self) -> SequenceBatch:
        return next(self._source)


class StepAlignedBatches(Iterator[SequenceBatch]):
    """The reader's batches, pulled in step on every rank, counting what was pulled.

    Every rank pulls while *every* rank has a batch, so no rank waits forever in a collective for a peer
    that ran out of data. The pipeline pulls a batch or two ahead of the step it trains, so the reader
    position to checkpoint after k trained batches lies that many batches back (``held_batches``).
    """

    def __init__(
        self, reader: SequenceReader | Iterable[SequenceBatch], ctx: DistContext, negatives: NegativeSampler | None = None
    ) -> None:
        self._reader = reader
        self._negatives = negatives
        self._batches = iter(reader)
        self._ctx = ctx
        self._pulled = 0
        self._exhausted = False
        self._pause_after: int | None = None

    def until(self, pulls: int | None) -> Iterator[SequenceBatch]:
        """These batches, stopping after ``pulls`` in total (None: at the end of the data). The pipeline then
        trains what it holds and runs empty, so evaluation sees the model at exactly that step. Returns a
        new iterator object each time: TorchRec's pipeline remembers an iterator that once ran dry."""
        self._pause_after = pulls
        return _Feed(self)

    def __next__(self) -> SequenceBatch:
        if self._exhausted or (self._pause_after is not None and self._pulled >= self._pause_after):
            raise StopIteration
        batch = next(self._batches, None)
        # Counted even when all ranks stop below: the reader handed it out, so its position moved on.
        self._pulled += batch is not None
        if not self._all_ranks_have(batch is not None):
            self._exhausted = True
            if batch is not None:
                logger.warning(
                    "rank %d: another rank ran out of data first; this rank's remaining batches are not trained "
                    "on (balance the input files across ranks to avoid it)",
                    self._ctx.rank,
                )
            raise StopIteration
        assert batch is not None
        return self._negatives(batch) if self._negatives else batch

    def _all_ranks_have(self, has_batch: bool) -> bool:
        if self._ctx.world_size == 1:
            return has_batch  # nobody to agree with: no collective on the step's critical path
        flag = torch.tensor([1 if has_batch else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._ctx.control_group)
        return bool(flag.item())

    def reader_state(self, trained: int) -> dict[str, Any]:
        """Reader position after ``trained`` batches of this run have been trained on."""
        if not isinstance(self._reader, SequenceReader):
            raise TypeError("checkpoints need a SequenceReader's position; these batches come from memory")
        self._reader.held_batches = self._pulled - trained
        try:
            return self._reader.state_dict()
        finally:
            self._reader.held_batches = 0
