"""The packed path (real positions only) against the padded grid it replaces, and the layout behind it."""

from __future__ import annotations

import pytest
import torch

from data.batch import PackedLayout, SequenceBatch
from model import attention, transformer
from model.attention import PackedAttention, attention_groups
from model.config import ModelConfig
from model.loss import next_item_mask
from model.transformer import CausalTransformer

LENGTHS = torch.tensor([7, 3, 0, 5, 1, 6])  # a user without positions too


def _run(model: CausalTransformer, x: torch.Tensor, real: torch.Tensor, backend: str | None):
    """Outputs on the grid, the input's gradient and the weights' gradients, padded (backend None) or packed."""
    x = x.detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    if backend is None:
        out = model(x)
    else:
        layout = PackedLayout.from_batch(LENGTHS, None, max_len=x.shape[1])
        rows = model(x.reshape(-1, x.shape[-1]).index_select(0, layout.index), PackedAttention(layout, backend, x.device))
        out = x.new_zeros(x.shape).view(-1, x.shape[-1]).index_copy(0, layout.index, rows).view_as(x)
    # Only real positions carry a loss, as in training; the weights make every position's gradient distinct.
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights * real.unsqueeze(-1)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("backend", "users_per_group"), [("grouped", 1), ("grouped", 2), ("grouped", 8), ("padded", 0), ("auto", 8)]
)
def test_packed_transformer_matches_the_padded_grid_on_real_positions(
    backend: str, users_per_group: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Grouped attention: one user per group, several groups, one group; padded: the reference backend.
    monkeypatch.setattr(attention, "USERS_PER_ATTENTION_GROUP", users_per_group)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=16, num_layers=2, nhead=4, dim_feedforward=24, dropout=0.0, emb_size=8)
    model = CausalTransformer(cfg).double()
    real = torch.arange(7).unsqueeze(0) < LENGTHS.unsqueeze(1)
    x = torch.randn(6, 7, 16, dtype=torch.float64)

    padded_out, padded_dx, padded_grads = _run(model, x, real, None)
    packed_out, packed_dx, packed_grads = _run(model, x, real, backend)

    torch.testing.assert_close(packed_out[real], padded_out[real], rtol=1e-12, atol=1e-12)
    assert (packed_out[~real] == 0).all()
    torch.testing.assert_close(packed_dx, padded_dx, rtol=1e-12, atol=1e-12)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_layout_packs_user_after_user_and_pairs_each_position_with_the_next() -> None:
    lengths = torch.tensor([2, 0, 3, 1])
    items = torch.tensor([[4, 5, -1], [-1, -1, -1], [6, -1, 8], [9, -1, -1]])  # user 2's middle position is empty
    layout = PackedLayout.from_batch(lengths, items)
    assert layout.index.tolist() == [0, 1, 6, 7, 8, 9]
    assert layout.cu_seqlens.tolist() == [0, 2, 5, 6] and layout.cu_seqlens.dtype == torch.int32
    assert layout.distance.tolist() == [1, 0, 2, 1, 0, 0]
    # Queries: row 0 (item 5 next), row 3 (item 8 next); row 2's next position holds no item.
    assert layout.query_rows.tolist() == [0, 3] and layout.target_ids.tolist() == [5, 8]
    assert (layout.num_tokens, layout.num_pairs, layout.longest, layout.max_len) == (6, 2, 3, 3)
    assert layout.counts.tolist() == [6, 2, 4]
    # The same pairs as the padded grid's next-item mask, in the same order.
    mask = next_item_mask(lengths, items)
    assert items[:, 1:][mask].tolist() == layout.target_ids.tolist()


def test_layout_travels_with_the_batch_to_its_device() -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = KeyedJaggedTensor(keys=["item_id"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1, 0]))
    batch = SequenceBatch(kjt, torch.tensor([2, 1]), torch.tensor([[1, 2], [3, -1]]))
    moved = batch.to(torch.device("cpu"))
    assert moved.layout is not None and moved.layout.num_pairs == 1 and moved.layout.query_rows.tolist() == [0]


def test_attention_groups_sort_users_by_length() -> None:
    groups = attention_groups((2, 0, 3, 1), 2, torch.device("cpu"))
    # Users sorted by length (the empty one left out), two per group, each group as wide as its longest.
    assert [(g.users, g.width, g.rows.tolist(), g.slots.tolist()) for g in groups] == [
        (2, 2, [5, 0, 1], [0, 2, 3]),
        (1, 3, [2, 3, 4], [0, 1, 2]),
    ]


def test_auto_attention_is_grouped_on_cpu_and_varlen_needs_cuda() -> None:
    layout = PackedLayout.from_batch(torch.tensor([2, 1]), None, max_len=2)
    assert PackedAttention(layout, "auto", torch.device("cpu")).backend == "grouped"
    with pytest.raises(ValueError, match="model.attention = 'varlen'"):
        PackedAttention(layout, "varlen", torch.device("cpu"))


def test_cpu_dropout_keeps_one_minus_p_and_rescales() -> None:
    torch.manual_seed(0)
    dropout = transformer.Dropout(0.25).train()
    x = torch.ones(400, 500, requires_grad=True)
    out = dropout(x)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient goes through the same scaled mask
    torch.manual_seed(0)
    assert torch.equal(transformer.Dropout(0.25).train()(x), out)  # seeded: the same mask again
    assert torch.equal(dropout.eval()(x), x)
