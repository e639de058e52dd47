"""Contrastive next-item loss: each query's next item against a choice of negatives (seed bugs fixed, see the
README's "What differs from the seed").

Negatives, any mix of:

* **all in-batch targets** (the seed's loss): every other pair's target is a negative. Cost O(P^2 H) for P
  pairs in a rank's batch: its share of a step grows with the batch.
* **K sampled in-batch targets per query** (HSTU): K targets drawn uniformly from the batch's P targets, so
  popular items are drawn as often as they occur. Queries are taken in groups of ``group_size`` that share
  one draw, so that their logits are one tensor-core product ``[group, H] x [H, K]`` instead of P gathers of
  K rows (``group_size = 1`` draws per query). Cost O(P K H).
* **M uniform items from the table**, shared by every query of the batch (the ``num_negatives`` rows the
  model looked up): they cover the long tail that in-batch negatives never show. Cost O(P M H).

A negative that is the query's own target (the same pair, or the same item among sampled table rows) is
never a negative; with ``mask_same_item`` neither is another occurrence of the query's target item.

**Log-Q correction** (``LogQ``, Yi et al., RecSys 2019: sampled softmax with a sampling-bias correction):
in-batch candidates turn up as often as their items occur in the data, so a plain softmax over them pushes
popular items down for being popular. Each logit is lowered by the log of how many times its item is
expected among a query's candidates: ``log c_j`` for all in-batch targets (item j occurs ``c_j`` times in
the rank's batch), ``log(K c_j / P)`` for K draws from the P targets, ``log(M / rows)`` for M uniform table
rows; the positive by the same as its item's in-batch candidates. The hit count is taken on the uncorrected
scores (what ranking at serving time sees).

Two implementations side by side, as generative-recommenders keeps its ops: ``reference_loss`` writes every
logit out (plain PyTorch, the definition the tests check against), ``chunked_loss`` computes the same loss
query chunk by query chunk in a custom autograd function that recomputes each chunk's logits in the
backward instead of keeping them, so peak memory is O(chunk x (P + K + M)) instead of O(P x (P + K + M)),
with its products in bf16 on CUDA (fp32 accumulation and log-sum-exp).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

InBatch = Literal["all", "sampled", "none"]


@dataclass(frozen=True)
class NegativeSpec:
    """Which negatives each query is scored against (from ``[model]``, see ``model/config.py``)."""

    in_batch: InBatch = "all"
    # K: in-batch targets drawn per query group ("sampled").
    num_sampled: int = 0
    # Queries sharing one draw of K ("sampled").
    group_size: int = 1
    mask_same_item: bool = False


@dataclass
class LossOutput:
    loss: torch.Tensor
    # Queries whose own target scored at least as high as every negative (the seed's hit_rate numerator).
    hits: torch.Tensor
    # Number of (query, target) pairs that entered the loss: real positions with a real next item.
    num_targets: torch.Tensor


@dataclass
class LogQ:
    """What the log-Q correction subtracts (see the module docstring)."""

    # [P] per pair j: log of the expected count of pair j's item among one query's in-batch candidates
    # (also what the pair's own positive logit loses).
    pairs: torch.Tensor
    # Per uniform table row: log(M / rows).
    table: float = 0.0


def item_counts(ids: torch.Tensor) -> torch.Tensor:
    """``[P]``: how often each pair's item occurs among the P pairs. Sort and search, not ``unique``: no
    output of data-dependent size, so no device-to-host sync on CUDA."""
    ordered = ids.sort().values
    return torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids, right=False)


def log_q(ids: torch.Tensor, spec: NegativeSpec, table_draws: int = 0, table_rows: int = 0) -> LogQ:
    """The correction for pairs with item ids ``ids`` and the negatives of ``spec`` (plus ``table_draws``
    uniform draws from ``table_rows`` rows)."""
    table = math.log(table_draws / table_rows) if table_draws and table_rows else 0.0
    if spec.in_batch == "none":
        # Uniform candidates only: the same correction for every column, i.e. none.
        return LogQ(pairs=torch.full(ids.shape, table, device=ids.device), table=table)
    counts = item_counts(ids).double()
    if spec.in_batch == "sampled":
        counts = counts * (spec.num_sampled / max(ids.numel(), 1))
    return LogQ(pairs=counts.log().float(), table=table)


def sample_in_batch(num_pairs: int, spec: NegativeSpec, device: torch.device) -> torch.Tensor | None:
    """``[ceil(P / group_size), K]`` in-batch target rows drawn uniformly with replacement (torch's global
    generator of ``device``, which checkpoints save and restore), or None when the spec samples none."""
    if spec.in_batch != "sampled" or num_pairs == 0:
        return None
    groups = -(-num_pairs // spec.group_size)
    return torch.randint(0, num_pairs, (groups, spec.num_sampled), device=device)


def normalize_pairs(
    queries: torch.Tensor, keys: torch.Tensor, temperature: float, table: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cosine similarity / temperature as plain dot products: unit keys, queries of norm 1 / temperature.

    The temperature scales the ``[P, H]`` queries rather than the ``[P, P + K + M]`` logits: the same logits
    (up to rounding) for two fewer passes over the large tensor, forward and backward.
    """
    q = F.normalize(queries.float(), p=2, dim=-1, eps=1e-6) / temperature
    k = F.normalize(keys.float(), p=2, dim=-1, eps=1e-6)
    t = F.normalize(table.float(), p=2, dim=-1, eps=1e-6) if table is not None else None
    return q, k, t


def _empty(queries: torch.Tensor, keys: torch.Tensor, table: torch.Tensor | None) -> LossOutput:
    # Nothing to predict in this batch; a zero that still touches every input keeps DDP in step.
    zero = queries.sum() * 0.0 + keys.sum() * 0.0
    if table is not None:
        zero = zero + table.sum() * 0.0
    count = torch.zeros((), dtype=torch.long, device=queries.device)
    return LossOutput(loss=zero, hits=count, num_targets=count.clone())


# ----------------------------------------------------------------------------------------------- reference


def reference_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    ids: torch.Tensor,
    spec: NegativeSpec,
    temperature: float = 1.0,
    table: torch.Tensor | None = None,
    table_ids: torch.Tensor | None = None,
    sampled: torch.Tensor | None = None,
    correction: LogQ | None = None,
) -> LossOutput:
    """Every logit written out. ``queries``, ``keys``: ``[P, H]``, pair i = (query i, its next item's
    representation keys[i], item ids[i]); ``table``: ``[M, H]`` sampled table rows with ids ``table_ids``;
    ``sampled``: ``[G, K]`` rows of ``keys`` (from ``sample_in_batch``), group g serving queries
    ``g * group_size ...``; ``correction``: the log-Q correction, if any."""
    if queries.shape[0] == 0:
        return _empty(queries, keys, table)
    q, k, t = normalize_pairs(queries, keys, temperature, table)
    num = q.shape[0]
    rows = torch.arange(num, device=q.device)
    pair_q = correction.pairs if correction is not None else torch.zeros(num, device=q.device)
    table_q = correction.table if correction is not None else 0.0
    positive = (q * k).sum(-1, keepdim=True)
    columns, shifts = [positive], [pair_q.unsqueeze(1)]
    if spec.in_batch == "all":
        logits = q @ k.t()
        masked = rows.unsqueeze(1) == rows.unsqueeze(0)  # the diagonal is the positive itself
        if spec.mask_same_item:
            masked |= ids.unsqueeze(1) == ids.unsqueeze(0)
        columns.append(logits.masked_fill(masked, float("-inf")))
        shifts.append(pair_q.unsqueeze(0).expand(num, num))
    if spec.in_batch == "sampled":
        assert sampled is not None
        drawn = sampled[rows // spec.group_size]  # [P, K] rows of keys
        logits = (q.unsqueeze(1) * k[drawn]).sum(-1)
        masked = drawn == rows.unsqueeze(1)
        if spec.mask_same_item:
            masked |= ids[drawn] == ids.unsqueeze(1)
        columns.append(logits.masked_fill(masked, float("-inf")))
        shifts.append(pair_q[drawn])
    if t is not None and t.shape[0]:
        logits = q @ t.t()
        if table_ids is not None:
            logits = logits.masked_fill(ids.unsqueeze(1) == table_ids.unsqueeze(0), float("-inf"))
        columns.append(logits)
        shifts.append(torch.full((num, t.shape[0]), table_q, device=q.device))
    raw = torch.cat(columns, dim=1)
    logits = raw - torch.cat(shifts, dim=1)
    loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    with torch.no_grad():
        hits = (raw[:, :1] >= raw[:, 1:]).all(dim=1).sum() if raw.shape[1] > 1 else torch.tensor(num)
    return LossOutput(loss=loss, hits=hits.to(q.device), num_targets=torch.tensor(num, device=q.device))


# ------------------------------------------------------------------------------------------------ chunked


# Largest logits chunk (rows x columns, fp32) per device type: on a GPU few large chunks keep kernel launches
# down (1 GiB); on a CPU smaller ones stay in cache.
_CHUNK_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 22}


def chunk_rows(
    num_pairs: int, per_row: int, spec: NegativeSpec, device: torch.device, requested: int = 0
) -> int:
    """Queries per chunk: ``requested``, or as many as keep a chunk's working set (``per_row`` elements per
    query: its logits, and its share of the sampled keys) within the device's budget; always a multiple of
    the sampling group, so that no group straddles two chunks."""
    group = spec.group_size if spec.in_batch == "sampled" else 1
    if requested:
        rows = requested
    else:
        rows = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"]) // max(per_row, 1)
    rows = max(group, rows - rows % group)
    return min(rows, -(-num_pairs // group) * group)


_FP32_OUT: dict[str, bool] = {}


def _fp32_product(op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 (torch.mm or torch.bmm)
    """``op(a, b)`` with an fp32 result. bf16 operands (CUDA) accumulate in fp32 and come out in fp32
    (``out_dtype``) rather than rounded to bf16, which would cost about 30 times the error of rounding the
    inputs themselves; where a torch build lacks it, the product is rounded and upcast (logged once)."""
    if a.dtype == torch.float32:
        return op(a, b)
    if _FP32_OUT.get(a.device.type, True):
        try:
            return op(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError) as error:
            _FP32_OUT[a.device.type] = False
            logger.warning("%s(out_dtype=float32) is not available here (%s): loss logits go through %s",
                           op.__name__, error, a.dtype)  # fmt: skip
    return op(a, b).float()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _fp32_product(torch.mm, a, b)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _fp32_product(torch.bmm, a, b)


@dataclass
class _Chunk:
    """One chunk of queries, rows ``start:stop``, with its operands in the compute dtype."""

    start: int
    stop: int
    q: torch.Tensor  # [C, H] compute dtype
    drawn: torch.Tensor | None  # [g, K] rows of keys drawn for the chunk's g sampling groups
    drawn_keys: torch.Tensor | None  # [g, K, H] those keys
    per_row: torch.Tensor | None  # [C, K] the rows of keys each query of the chunk is scored against

    @property
    def size(self) -> int:
        return self.stop - self.start


class _Operands:
    """Inputs of the chunked loss in the compute dtype, plus the masks' ingredients."""

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        ids: torch.Tensor,
        table: torch.Tensor | None,
        table_ids: torch.Tensor | None,
        sampled: torch.Tensor | None,
        spec: NegativeSpec,
        dtype: torch.dtype,
        correction: LogQ | None = None,
    ) -> None:
        self.spec, self.ids, self.table_ids, self.sampled = spec, ids, table_ids, sampled
        self.correction = correction
        self.q, self.k = q.to(dtype), k.to(dtype)
        self.table = table.to(dtype) if table is not None and table.shape[0] else None
        self.num = q.shape[0]
        self.rows = torch.arange(self.num, device=q.device)

    def chunk(self, start: int, stop: int) -> _Chunk:
        if self.sampled is None:
            return _Chunk(start, stop, self.q[start:stop], None, None, None)
        first = start // self.spec.group_size  # chunks start on a group boundary (chunk_rows)
        drawn = self.sampled[first : first + -(-(stop - start) // self.spec.group_size)]
        per_row = drawn.repeat_interleave(self.spec.group_size, dim=0)[: stop - start]
        # The groups' keys, [g, K, H]: gathered per chunk, so that one draw per query (group_size 1)
        # costs chunk x K x H, not P x K x H.
        return _Chunk(start, stop, self.q[start:stop], drawn, self.k[drawn], per_row)

    def negatives(self, c: _Chunk) -> list[torch.Tensor]:
        """The chunk's fp32 negative logits, one ``[C, n]`` block per source, masked entries at -inf."""
        spec, rows, ids = self.spec, self.rows[c.start : c.stop], self.ids[c.start : c.stop]
        blocks = []
        if spec.in_batch == "all":
            logits = _mm(c.q, self.k.t())
            masked = rows.unsqueeze(1) == self.rows.unsqueeze(0)
            if spec.mask_same_item:
                masked |= ids.unsqueeze(1) == self.ids.unsqueeze(0)
            blocks.append(logits.masked_fill_(masked, float("-inf")))
        if c.drawn is not None and c.drawn_keys is not None and c.per_row is not None:
            logits = _bmm(self._grouped(c.q, c.drawn.shape[0]), c.drawn_keys.transpose(1, 2))  # [g, size, K]
            logits = logits.reshape(-1, c.drawn.shape[1])[: c.size]
            masked = c.per_row == rows.unsqueeze(1)
            if spec.mask_same_item:
                masked |= self.ids[c.per_row] == ids.unsqueeze(1)
            blocks.append(logits.masked_fill_(masked, float("-inf")))
        if self.table is not None:
            logits = _mm(c.q, self.table.t())
            if self.table_ids is not None:
                logits.masked_fill_(ids.unsqueeze(1) == self.table_ids.unsqueeze(0), float("-inf"))
            blocks.append(logits)
        return blocks

    def correct(self, c: _Chunk, blocks: list[torch.Tensor]) -> None:
        """Apply the log-Q correction to the chunk's negative blocks, in place (masked entries stay -inf)."""
        if self.correction is None:
            return
        pairs, it = self.correction.pairs, iter(blocks)
        if self.spec.in_batch == "all":
            next(it).sub_(pairs.unsqueeze(0))
        if c.per_row is not None:
            next(it).sub_(pairs[c.per_row])
        if self.table is not None and self.correction.table:
            next(it).sub_(self.correction.table)

    def positive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``[P]`` fp32 positive logits, corrected (the uncorrected ones decide hits)."""
        raw = (q * k).sum(-1)
        return raw if self.correction is None else raw - self.correction.pairs

    def _grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """``[C, H]`` -> ``[g, group_size, H]``, the last group padded with zero rows."""
        size = self.spec.group_size
        pad = groups * size - x.shape[0]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.view(groups, size, -1)

    def accumulate_grads(
        self, c: _Chunk, weights: list[torch.Tensor], dq: torch.Tensor, dk: torch.Tensor, dt: torch.Tensor | None
    ) -> None:
        """Given d(loss)/d(logit) of each negative block (fp32), add the chunk's share of the gradients of q
        (its own rows), k (all rows) and the table rows."""
        spec, blocks = self.spec, iter(weights)
        dq_c = dq[c.start : c.stop]
        if spec.in_batch == "all":
            g = next(blocks).to(self.k.dtype)
            dq_c += _mm(g, self.k)
            dk += _mm(g.t(), c.q)
        if c.drawn is not None and c.drawn_keys is not None:
            groups = c.drawn.shape[0]
            g = self._grouped(next(blocks).to(self.k.dtype), groups)  # [g, size, K]
            dq_c += _bmm(g, c.drawn_keys).reshape(-1, dq.shape[1])[: c.size]
            d_drawn = _bmm(g.transpose(1, 2), self._grouped(c.q, groups))  # [g, K, H]
            dk.index_add_(0, c.drawn.reshape(-1), d_drawn.reshape(-1, dk.shape[1]))
        if self.table is not None:
            assert dt is not None
            g = next(blocks).to(self.table.dtype)
            dq_c += _mm(g, self.table)
            dt += _mm(g.t(), c.q)


class _ChunkedContrastive(torch.autograd.Function):
    """Mean over queries of ``logsumexp([positive, negatives]) - positive``, chunk by chunk.

    Forward keeps only each query's log-sum-exp; backward recomputes a chunk's logits, turns them into
    softmax weights and folds them straight into the gradients of queries, keys and table rows.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        table: torch.Tensor | None,
        ids: torch.Tensor,
        table_ids: torch.Tensor | None,
        sampled: torch.Tensor | None,
        spec: NegativeSpec,
        rows_per_chunk: int,
        dtype: torch.dtype,
        correction: LogQ | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ops = _Operands(q, k, ids, table, table_ids, sampled, spec, dtype, correction)
        raw_positive = (q * k).sum(-1)  # fp32: the positive logit is kept exact
        positive = ops.positive(q, k)
        lse = torch.empty_like(positive)
        hits = torch.zeros((), dtype=torch.long, device=q.device)
        for start in range(0, ops.num, rows_per_chunk):
            c = ops.chunk(start, min(start + rows_per_chunk, ops.num))
            pos = positive[c.start : c.stop]
            blocks = ops.negatives(c)
            if not blocks:
                lse[c.start : c.stop] = pos
                hits += c.stop - c.start
                continue
            raw_best = torch.stack([b.amax(dim=1) for b in blocks]).amax(dim=0)
            hits += (raw_positive[c.start : c.stop] >= raw_best).sum()
            ops.correct(c, blocks)
            best = raw_best if correction is None else torch.stack([b.amax(dim=1) for b in blocks]).amax(dim=0)
            top = torch.maximum(best, pos)  # finite: the positive is never masked
            total = torch.exp(pos - top)
            for b in blocks:
                total += torch.exp(b - top.unsqueeze(1)).sum(dim=1)
            lse[c.start : c.stop] = top + torch.log(total)
        ctx.mark_non_differentiable(hits)
        ctx.save_for_backward(q, k, table, ids, table_ids, sampled, positive, lse)
        ctx.spec, ctx.rows_per_chunk, ctx.dtype, ctx.correction = spec, rows_per_chunk, dtype, correction
        return (lse - positive).mean(), hits

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_hits: torch.Tensor | None):  # type: ignore[override]
        q, k, table, ids, table_ids, sampled, positive, lse = ctx.saved_tensors
        ops = _Operands(q, k, ids, table, table_ids, sampled, ctx.spec, ctx.dtype, ctx.correction)
        scale = grad_loss.float() / ops.num
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        dt = torch.zeros_like(table) if table is not None else None
        # d/d(positive) = (softmax(positive) - 1) / P: the positive pairs' share, on matching rows of q and k.
        g_pos = ((positive - lse).exp() - 1.0) * scale
        dq += g_pos.unsqueeze(1) * k
        dk += g_pos.unsqueeze(1) * q
        for start in range(0, ops.num, ctx.rows_per_chunk):
            c = ops.chunk(start, min(start + ctx.rows_per_chunk, ops.num))
            shift = lse[c.start : c.stop].unsqueeze(1)
            blocks = ops.negatives(c)
            ops.correct(c, blocks)
            weights = [torch.exp(b - shift).mul_(scale) for b in blocks]
            if weights:
                ops.accumulate_grads(c, weights, dq, dk, dt)
        return dq, dk, dt, None, None, None, None, None, None, None


def chunked_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    ids: torch.Tensor,
    spec: NegativeSpec,
    temperature: float = 1.0,
    table: torch.Tensor | None = None,
    table_ids: torch.Tensor | None = None,
    sampled: torch.Tensor | None = None,
    rows_per_chunk: int = 0,
    dtype: torch.dtype | None = None,
    correction: LogQ | None = None,
) -> LossOutput:
    """``reference_loss``'s value and gradients at O(chunk x (P + K + M)) memory. ``dtype``: the products'
    operand type (default fp32; the model passes bf16 on CUDA); softmax and log-sum-exp are always fp32."""
    if queries.shape[0] == 0:
        return _empty(queries, keys, table)
    q, k, t = normalize_pairs(queries, keys, temperature, table)
    num = q.shape[0]
    per_row = (num if spec.in_batch == "all" else 0) + (t.shape[0] if t is not None else 0)
    if spec.in_batch == "sampled":
        per_row += spec.num_sampled * (1 + q.shape[1] // spec.group_size)
    rows = chunk_rows(num, per_row, spec, q.device, rows_per_chunk)
    loss, hits = _ChunkedContrastive.apply(
        q, k, t, ids, table_ids, sampled, spec, rows, dtype or torch.float32, correction
    )
    return LossOutput(loss=loss, hits=hits, num_targets=torch.full((), num, dtype=torch.long, device=q.device))


# ------------------------------------------------------------------------------- the padded grid's pairs


def next_item_mask(seq_lengths: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` bool: position t predicts position t+1, and both are real (not padding, item present)."""
    positions = torch.arange(item_ids.shape[1] - 1, device=item_ids.device)
    inside = positions.unsqueeze(0) < (seq_lengths.unsqueeze(1) - 1)
    return inside & (item_ids[:, 1:] >= 0)


def _pairs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    seq_lengths: torch.Tensor,
    item_ids: torch.Tensor,
    bugs: tuple[str, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(queries, keys, target ids) of the (query, next item) pairs that enter the loss."""
    if "copy_shift" in bugs:
        # The seed's pairing: the query at t+1 (which has already seen item t) against item t.
        q, k, ids = hidden[:, 1:], targets[:, :-1], item_ids[:, :-1]
    else:
        q, k, ids = hidden[:, :-1], targets[:, 1:], item_ids[:, 1:]
    if "padding" in bugs:
        return q.flatten(0, 1), k.flatten(0, 1), ids.flatten()
    valid = next_item_mask(seq_lengths, item_ids)
    return q[valid], k[valid], ids[valid]


def next_item_contrastive_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    seq_lengths: torch.Tensor,
    item_ids: torch.Tensor,
    temperature: float = 1.0,
    mask_same_item: bool = False,
    negatives: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    seed_loss_bugs: tuple[str, ...] = (),
) -> LossOutput:
    """The loss on the padded ``[B, T, H]`` grid with every in-batch target as a negative (the seed's loss,
    its bugs fixed unless ``seed_loss_bugs`` puts them back): ``reference_loss`` of the grid's pairs.

    The query at t is paired with the target at t+1 (the seed paired t+1 with t, which under causal
    attention teaches the model to copy its input). Padding never enters as query or target.
    ``negatives``: ``[M, H]`` representations of items sampled from the table, ``negative_ids`` their ids.
    """
    queries, keys, ids = _pairs(hidden, targets, seq_lengths, item_ids, seed_loss_bugs)
    spec = NegativeSpec(in_batch="all", mask_same_item=mask_same_item)
    return reference_loss(queries, keys, ids, spec, temperature, negatives, negative_ids)
