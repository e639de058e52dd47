"""The chunked contrastive loss against its written-out reference, and the reference against hand cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.loss import (
    NegativeSpec,
    chunk_rows,
    chunked_loss,
    item_counts,
    log_q,
    next_item_contrastive_loss,
    reference_loss,
    sample_in_batch,
)


def _inputs(num: int = 37, hidden: int = 8, items: int = 9, table: int = 5, seed: int = 0):
    """Pairs with repeated items (few ids), so same-item masking has work to do."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num, hidden, generator=g, dtype=torch.float64)
    k = torch.randn(num, hidden, generator=g, dtype=torch.float64)
    ids = torch.randint(0, items, (num,), generator=g)
    # Make same-item keys alike, as item-only targets are.
    k = k + 2.0 * torch.randn(items, hidden, generator=g, dtype=torch.float64)[ids]
    t = torch.randn(table, hidden, generator=g, dtype=torch.float64)
    t_ids = torch.randint(0, items, (table,), generator=g)
    return q, k, ids, t, t_ids


SPECS = [
    NegativeSpec("all"),
    NegativeSpec("all", mask_same_item=True),
    NegativeSpec("sampled", num_sampled=6, group_size=1),
    NegativeSpec("sampled", num_sampled=6, group_size=4, mask_same_item=True),
    NegativeSpec("sampled", num_sampled=50, group_size=8),  # more draws than pairs
    NegativeSpec("none"),
]


# No negatives at all (in_batch "none" without table rows) is rejected by the config: not a case.
CASES = [(spec, with_table) for spec in SPECS for with_table in (False, True) if with_table or spec.in_batch != "none"]


@pytest.mark.parametrize(
    ("spec", "with_table"), CASES,
    ids=[f"{s.in_batch}-K{s.num_sampled}-g{s.group_size}-m{int(s.mask_same_item)}-t{int(t)}" for s, t in CASES],
)  # fmt: skip
@pytest.mark.parametrize("rows", [1, 8, 0])
def test_chunked_equals_reference_values_and_gradients(spec: NegativeSpec, with_table: bool, rows: int) -> None:
    q, k, ids, t, t_ids = _inputs()
    if rows and spec.in_batch == "sampled" and rows % spec.group_size:
        rows = spec.group_size  # chunks hold whole sampling groups
    torch.manual_seed(1)
    sampled = sample_in_batch(q.shape[0], spec, q.device)
    table, table_ids = (t, t_ids) if with_table else (None, None)

    def run(fn, **kw):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, t)]
        out = fn(leaves[0], leaves[1], ids, spec, 0.3, leaves[2] if with_table else None, table_ids, sampled, **kw)
        out.loss.backward()
        return out, [x.grad for x in leaves]

    ref, ref_grads = run(reference_loss)
    got, got_grads = run(chunked_loss, rows_per_chunk=rows)
    torch.testing.assert_close(got.loss.double(), ref.loss.double(), rtol=1e-6, atol=1e-7)
    assert got.hits.item() == ref.hits.item() and got.num_targets.item() == ref.num_targets.item() == 37
    for name, a, b in zip("qkt", got_grads, ref_grads, strict=True):
        if b is None:
            assert a is None or not with_table and name == "t"
            continue
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-7, msg=name)
    if table is None:
        assert got_grads[2] is None


def test_all_in_batch_equals_the_seed_loss_as_it_was() -> None:
    # Today's definition, written as before this change: cross-entropy of [P, P] cosine logits with the
    # diagonal as label, sampled table rows appended (accidental hits masked), same items optionally masked.
    q, k, ids, t, t_ids = _inputs(num=23)
    for mask_same_item in (False, True):
        qn, kn, tn = F.normalize(q, dim=-1) / 0.2, F.normalize(k, dim=-1), F.normalize(t, dim=-1)
        logits = qn @ kn.t()
        if mask_same_item:
            same = ids.unsqueeze(0) == ids.unsqueeze(1)
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
        extra = (qn @ tn.t()).masked_fill(ids.unsqueeze(1) == t_ids.unsqueeze(0), float("-inf"))
        expected = F.cross_entropy(torch.cat([logits, extra], dim=1), torch.arange(23))
        spec = NegativeSpec("all", mask_same_item=mask_same_item)
        got = chunked_loss(q, k, ids, spec, 0.2, t, t_ids, rows_per_chunk=5)
        assert got.loss.item() == pytest.approx(expected.item(), rel=1e-6)  # the loss computes in fp32


def test_sampled_negatives_by_hand() -> None:
    # Query 0 (target [1, 0], item 5) draws rows [1, 0, 2]: row 0 is itself (masked), row 1 is [0, 1],
    # row 2 is item 5 again: a negative unless same items are masked.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    ids = torch.tensor([5, 6, 5])
    sampled = torch.tensor([[1, 0, 2]])  # one group of three queries
    spec = NegativeSpec("sampled", num_sampled=3, group_size=3)
    out = reference_loss(q, k, ids, spec, 1.0, sampled=sampled)
    # Query 0: logits [1 | 0, -inf, 1]; query 1: [1 | -inf, 0, 0]; query 2: [cos 45° | s, s, -inf], s = cos 45°.
    s = math.sqrt(0.5)
    expected = [
        math.log(math.e + 1 + math.e) - 1,
        math.log(math.e + 2) - 1,
        math.log(3 * math.exp(s)) - s,
    ]
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    masked = reference_loss(q, k, ids, NegativeSpec("sampled", 3, 3, mask_same_item=True), 1.0, sampled=sampled)
    # Masking same items drops row 2 for query 0 and row 0 (item 5) for query 2.
    expected[0], expected[2] = math.log(math.e + 1) - 1, math.log(2)
    assert masked.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    # Hits: query 0 ties with row 2 (same item): a tie with the target item counts; query 2 ties too.
    assert out.hits.item() == 3


def test_chunked_bf16_products_stay_close_to_fp32() -> None:
    q, k, ids, t, t_ids = _inputs(num=300, hidden=64, items=50, table=40)
    q, k, t = q.float(), k.float(), t.float()
    spec = NegativeSpec("all", mask_same_item=True)
    exact = chunked_loss(q, k, ids, spec, 0.05, t, t_ids, rows_per_chunk=64)
    low = chunked_loss(q, k, ids, spec, 0.05, t, t_ids, rows_per_chunk=64, dtype=torch.bfloat16)
    assert low.loss.item() == pytest.approx(exact.loss.item(), rel=2e-2)


def test_chunks_hold_whole_groups_and_respect_the_budget() -> None:
    cpu = torch.device("cpu")
    spec = NegativeSpec("sampled", num_sampled=128, group_size=64)
    assert chunk_rows(1000, 100, spec, cpu, requested=100) == 64  # rounded down to whole groups
    assert chunk_rows(1000, 100, spec, cpu, requested=10) == 64  # at least one group
    assert chunk_rows(100, 100, spec, cpu) == 128  # never more than the pairs, in whole groups
    rows = chunk_rows(100_000, 100_000, NegativeSpec("all"), cpu)
    assert rows * 100_000 <= 1 << 22 and rows >= 1


def test_loss_memory_grows_linearly_with_the_pairs() -> None:
    # The largest tensor the chunked loss allocates, forward and backward, for P and 4P pairs: with a fixed
    # chunk it grows with P (the [P, H] inputs and gradients), never with P^2.
    def peak(num: int, spec: NegativeSpec) -> int:
        q, k, ids = torch.randn(num, 16), torch.randn(num, 16), torch.randint(0, 10**6, (num,))
        q.requires_grad_(True)
        sizes: list[int] = []

        def record(x: torch.Tensor) -> torch.Tensor:
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(record, lambda x: x):
            out = chunked_loss(q, k, ids, spec, 0.1, sampled=sample_in_batch(num, spec, q.device), rows_per_chunk=64)
        out.loss.backward()
        return max(sizes)

    for spec in (NegativeSpec("all"), NegativeSpec("sampled", num_sampled=32, group_size=8)):
        assert peak(4096, spec) <= 4 * peak(1024, spec) + 64


def test_no_pairs_gives_a_zero_that_reaches_every_input() -> None:
    q = torch.zeros(0, 4, requires_grad=True)
    k = torch.zeros(0, 4, requires_grad=True)
    out = chunked_loss(q, k, torch.zeros(0, dtype=torch.long), NegativeSpec("all"))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.num_targets.item() == 0 and q.grad is not None


def test_padded_grid_loss_is_the_all_in_batch_reference() -> None:
    torch.manual_seed(0)
    hidden, targets = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    lengths, ids = torch.tensor([4, 3]), torch.tensor([[1, 2, 3, 4], [5, 2, -1, -1]])
    grid = next_item_contrastive_loss(hidden, targets, lengths, ids, 0.5, mask_same_item=True)
    q = torch.stack([hidden[0, 0], hidden[0, 1], hidden[0, 2], hidden[1, 0]])
    k = torch.stack([targets[0, 1], targets[0, 2], targets[0, 3], targets[1, 1]])
    pairs = chunked_loss(q, k, torch.tensor([2, 3, 4, 2]), NegativeSpec("all", mask_same_item=True), 0.5)
    assert grid.loss.item() == pytest.approx(pairs.loss.item(), rel=1e-6)
    assert grid.num_targets.item() == 4


@pytest.mark.parametrize(("spec", "with_table"), CASES, ids=[f"{s.in_batch}-g{s.group_size}-t{int(t)}" for s, t in CASES])
def test_log_q_corrected_chunked_equals_reference(spec: NegativeSpec, with_table: bool) -> None:
    q, k, ids, t, t_ids = _inputs()
    torch.manual_seed(1)
    sampled = sample_in_batch(q.shape[0], spec, q.device)
    correction = log_q(ids, spec, table_draws=t.shape[0] if with_table else 0, table_rows=9)

    def run(fn, **kw):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, t)]
        out = fn(leaves[0], leaves[1], ids, spec, 0.3, leaves[2] if with_table else None, t_ids if with_table else None,
                 sampled, **kw)  # fmt: skip
        out.loss.backward()
        return out, [x.grad for x in leaves]

    ref, ref_grads = run(reference_loss, correction=correction)
    got, got_grads = run(chunked_loss, rows_per_chunk=8, correction=correction)
    plain, _ = run(reference_loss)
    torch.testing.assert_close(got.loss.double(), ref.loss.double(), rtol=1e-6, atol=1e-7)
    for a, b in zip(got_grads, ref_grads, strict=True):
        if b is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-7)
    # Hits are counted on the uncorrected scores; the loss itself moves (except with uniform negatives only).
    assert got.hits.item() == ref.hits.item() == plain.hits.item()
    if spec.in_batch != "none":
        assert abs(ref.loss.item() - plain.loss.item()) > 1e-4


def test_log_q_by_hand() -> None:
    ids = torch.tensor([3, 5, 3, 3, 7])
    assert item_counts(ids).tolist() == [3, 1, 3, 3, 1]
    every = log_q(ids, NegativeSpec("all"), table_draws=4, table_rows=100)
    torch.testing.assert_close(every.pairs, torch.tensor([3.0, 1.0, 3.0, 3.0, 1.0]).log())
    assert every.table == pytest.approx(math.log(0.04))
    # K = 10 draws from the 5 targets: item 3 is expected 10 * 3/5 = 6 times among a query's candidates.
    drawn = log_q(ids, NegativeSpec("sampled", num_sampled=10, group_size=1))
    torch.testing.assert_close(drawn.pairs, torch.tensor([6.0, 2.0, 6.0, 6.0, 2.0]).log())
    # Two pairs, item A twice as common: after correction both in-batch negatives weigh the same.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    pair_ids = torch.tensor([1, 2, 2])
    out = reference_loss(q, k, pair_ids, NegativeSpec("all"), 1.0, correction=log_q(pair_ids, NegativeSpec("all")))
    # Query 0: positive 1 - log 1, negatives 0 - log 2 (twice) -> loss log(e + 2 * 1/2) - 1.
    # Queries 1 and 2: positive 1 - log 2, negatives: pair 0 (0 - log 1) and the other item-2 pair (1 - log 2).
    l0 = math.log(math.e + 1.0) - 1.0
    l12 = math.log(math.e / 2 + 1.0 + math.e / 2) - (1.0 - math.log(2))
    assert out.loss.item() == pytest.approx((l0 + 2 * l12) / 3, rel=1e-6)
