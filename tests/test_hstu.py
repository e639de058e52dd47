"""The HSTU encoder against a plain reference of its block written out per user, and its two attention
implementations (padded grid, groups of users) against each other: outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data.batch import PackedLayout
from model import attention
from model.config import ModelConfig
from model.hstu import TIME_BUCKETS, HSTUAttention, HSTUBlock, HSTUEncoder, time_buckets

LENGTHS = [7, 3, 0, 5, 1, 6]
MAX_LEN = 8
CFG = ModelConfig(hidden_size=12, num_layers=2, nhead=3, dropout=0.0, emb_size=12, encoder="hstu",
                  hstu_attention_dim=5, hstu_linear_dim=4)  # fmt: skip


def _times(layout: PackedLayout, seed: int = 0) -> torch.Tensor:
    """Increasing event times per user, gaps from a second to about a month."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.exp(torch.rand(layout.num_tokens, generator=g, dtype=torch.float64) * 15).long()
    times, start = torch.empty(layout.num_tokens, dtype=torch.long), 0
    for n in layout.lengths:
        times[start : start + n] = 1_500_000_000 + gaps[start : start + n].cumsum(0)
        start += n
    return times


def _reference_block(block: HSTUBlock, x: torch.Tensor, times: torch.Tensor | None, lengths: list[int]) -> torch.Tensor:
    """The block's formula, one user and one (query, key) pair at a time."""
    out, start = [], 0
    heads, dqk, dv = block.nhead, block.qk_dim, block.v_dim
    for n in lengths:
        xs = x[start : start + n]
        proj = F.silu(F.layer_norm(xs, xs.shape[-1:], eps=1e-6) @ block.uvqk.weight.t())
        u, v, q, k = proj.split([heads * dv, heads * dv, heads * dqk, heads * dqk], dim=1)
        rows = []
        for i in range(n):
            heads_out = []
            for h in range(heads):
                acc = torch.zeros(dv, dtype=x.dtype)
                for j in range(i + 1):  # causal: keys up to the query itself
                    score = q[i, h * dqk : (h + 1) * dqk] @ k[j, h * dqk : (h + 1) * dqk]
                    score = score + block.bias.position[min(i - j, MAX_LEN - 1)]
                    if times is not None:
                        dt = float(times[start + i] - times[start + j])
                        bucket = min(max(int(math.log(max(dt, 1.0)) / 0.301), 0), TIME_BUCKETS)
                        score = score + block.bias.time[bucket]
                    acc = acc + F.silu(score) / MAX_LEN * v[j, h * dv : (h + 1) * dv]
                heads_out.append(acc)
            rows.append(torch.cat(heads_out))
        a = torch.stack(rows) if rows else x.new_zeros(0, heads * dv)
        gated = u * F.layer_norm(a, a.shape[-1:], eps=1e-6)
        out.append(xs + block.out(gated))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("with_time", [False, True])
@pytest.mark.parametrize("backend", ["padded", "grouped"])
def test_block_matches_the_written_out_reference(backend: str, with_time: bool) -> None:
    torch.manual_seed(0)
    block = HSTUBlock(CFG, MAX_LEN, with_time).double()
    with torch.no_grad():  # non-zero time biases and output bias, so their paths are checked too
        block.out.bias.normal_()
        if block.bias.time is not None:
            block.bias.time.normal_()
    layout = PackedLayout.from_batch(torch.tensor(LENGTHS), None, max_len=max(LENGTHS))
    times = _times(layout) if with_time else None
    x = torch.randn(layout.num_tokens, 12, dtype=torch.float64, requires_grad=True)
    got = block(x, HSTUAttention(layout, backend, x.device, times))
    want = _reference_block(block, x, times, [n for n in LENGTHS if n])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), [x, *block.parameters()])
    want_grads = torch.autograd.grad(want.square().sum(), [x, *block.parameters()])
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("users_per_group", [1, 2, 8])
def test_grouped_attention_equals_the_padded_grid(users_per_group: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "USERS_PER_ATTENTION_GROUP", users_per_group)
    monkeypatch.setattr("model.hstu.USERS_PER_ATTENTION_GROUP", users_per_group)
    torch.manual_seed(1)
    encoder = HSTUEncoder(CFG, MAX_LEN, with_time=True).double()
    layout = PackedLayout.from_batch(torch.tensor(LENGTHS), None, max_len=max(LENGTHS))
    times = _times(layout, seed=3)
    x = torch.randn(layout.num_tokens, 12, dtype=torch.float64)
    results = []
    for backend in ("padded", "grouped"):
        leaf = x.clone().requires_grad_(True)
        encoder.zero_grad(set_to_none=True)
        out = encoder(leaf, HSTUAttention(layout, backend, leaf.device, times))
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), leaf.grad, [p.grad.clone() for p in encoder.parameters()]))
    (a, da, pa), (b, db, pb) = results
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(da, db, rtol=1e-10, atol=1e-12)
    for ga, gb in zip(pa, pb, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_a_position_never_sees_later_ones() -> None:
    torch.manual_seed(2)
    encoder = HSTUEncoder(CFG, MAX_LEN, with_time=True).double()
    layout = PackedLayout.from_batch(torch.tensor([6]), None, max_len=6)
    times = _times(layout)
    x = torch.randn(6, 12, dtype=torch.float64)
    changed = x.clone()
    changed[4:] += 10.0
    later_times = times.clone()
    later_times[4:] += 10**6
    a = encoder(x, HSTUAttention(layout, "grouped", x.device, times))
    b = encoder(changed, HSTUAttention(layout, "grouped", x.device, later_times))
    torch.testing.assert_close(a[:4], b[:4], rtol=0, atol=0)
    assert not torch.allclose(a[4:], b[4:])


def test_time_buckets_grow_with_the_log_of_the_gap() -> None:
    seconds = torch.tensor([0, 1, 2, 60, 3600, 86_400, 10**9, 10**18])
    buckets = time_buckets(seconds).tolist()
    assert buckets[:2] == [0, 0] and buckets == sorted(buckets) and buckets[-1] == TIME_BUCKETS
    assert buckets[3] == int(math.log(60) / 0.301)


def test_hstu_has_no_varlen_backend() -> None:
    layout = PackedLayout.from_batch(torch.tensor([2]), None, max_len=2)
    with pytest.raises(ValueError, match="model.encoder = 'hstu'"):
        HSTUAttention(layout, "varlen", torch.device("cpu"), None)
    assert HSTUAttention(layout, "auto", torch.device("cpu"), None).backend == "grouped"
    assert HSTUAttention(layout, "auto", torch.device("cuda"), None).backend == "padded"
