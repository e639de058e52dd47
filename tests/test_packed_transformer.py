"""The transformer's packed path (real positions only) against the padded grid it replaces on CPU."""

from __future__ import annotations

import pytest
import torch

from model import transformer
from model.config import ModelConfig
from model.transformer import CausalTransformer, PackedSequences


def _run(model: CausalTransformer, x: torch.Tensor, real: torch.Tensor, lengths: torch.Tensor | None):
    x = x.detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, lengths)
    # Only real positions carry a loss, as in training; the weights make every position's gradient distinct.
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights * real.unsqueeze(-1)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("users_per_group", [1, 2, 8])
def test_packed_transformer_matches_the_padded_grid_on_real_positions(
    users_per_group: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attention runs on groups of users of similar length: one user per group, several groups, one group.
    monkeypatch.setattr(transformer, "USERS_PER_ATTENTION_GROUP", users_per_group)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=16, num_layers=2, nhead=4, dim_feedforward=24, dropout=0.0, emb_size=8)
    model = CausalTransformer(cfg).double()
    lengths = torch.tensor([7, 3, 0, 5, 1, 6])  # a user without positions too
    real = torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1)
    x = torch.randn(6, 7, 16, dtype=torch.float64)

    padded_out, padded_dx, padded_grads = _run(model, x, real, None)
    packed_out, packed_dx, packed_grads = _run(model, x, real, lengths)

    torch.testing.assert_close(packed_out[real], padded_out[real], rtol=1e-12, atol=1e-12)
    assert (packed_out[~real] == 0).all()
    torch.testing.assert_close(packed_dx, padded_dx, rtol=1e-12, atol=1e-12)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_packed_sequences_round_trip_and_groups() -> None:
    lengths = torch.tensor([2, 0, 3, 1])
    packed = PackedSequences(lengths, 3, users_per_group=2)
    grid = torch.arange(12.0).view(4, 3, 1)
    rows = packed.pack(grid)
    assert rows.squeeze(1).tolist() == [0.0, 1.0, 6.0, 7.0, 8.0, 9.0]
    assert packed.unpack(rows).squeeze(-1).tolist() == [[0, 1, 0], [0, 0, 0], [6, 7, 8], [9, 0, 0]]
    # Users sorted by length (the empty one left out), two per group, each group as wide as its longest.
    assert [(g.users, g.width, g.rows.tolist(), g.slots.tolist()) for g in packed.groups] == [
        (2, 2, [5, 0, 1], [0, 2, 3]),
        (1, 3, [2, 3, 4], [0, 1, 2]),
    ]


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
