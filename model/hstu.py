"""HSTU encoder (Zhai et al., "Actions Speak Louder than Words", ICML 2024): the second choice beside the
causal transformer (``model.encoder = "hstu"``).

One block, on ``[N, H]`` packed rows (the batch's real positions, user after user)::

    U, V, Q, K = split(SiLU(LN(x) W))                  # one projection, no bias
    A          = SiLU(Q K^T + rab(positions, times)) / n  # pointwise: no softmax, causal within each user
    x         <- x + W_o(dropout(U * LN(A V)))          # gating by U instead of a separate FFN

``n`` is a constant (the configured ``data.seq_len``), as in the paper's reference: with no softmax the
scores are not normalised per row, and dividing by the longest possible length keeps a block's output on
the same scale whatever the user's length. ``rab`` is a learned relative attention bias per head-shared
scalar: one per distance in positions (distances past the table share its last entry) plus, when the batch
carries timestamps, one per log-bucket of the time between the query's event and the key's.

One difference from the paper's reference code, on purpose: it buckets ``ts[i + 1] - ts[j]``, the time from
a key to the *next* event (the one being predicted), which a serving request knows but a held-out
evaluation target does not carry here; we bucket ``ts[i] - ts[j]``, what position ``i`` itself knows.

Two implementations of the attention side by side (as generative-recommenders keeps its ops): ``padded``
scatters the rows onto the zero-padded ``[B, T]`` grid and runs one batched product, the reference; and
``grouped`` does the same per group of users of similar length (``model/attention.py``'s groups), which
skips most of the padding. Both give the grid's values at the real positions: a real query only ever
weighs earlier, real keys of its own user.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from data.batch import PackedLayout
from model.attention import USERS_PER_ATTENTION_GROUP, attention_groups
from model.config import ModelConfig
from model.transformer import Dropout

# Time-bias buckets: floor(ln(seconds) / 0.301), as in the paper's reference (about 2.3 buckets per doubling;
# bucket 0 for at most a second, the last one, 128, for anything past ~e^38 s).
TIME_BUCKETS = 128
_TIME_BUCKET_SCALE = 0.301


def time_buckets(seconds: torch.Tensor) -> torch.Tensor:
    """Non-negative time differences -> bucket ids in ``[0, TIME_BUCKETS]``."""
    return (torch.log(seconds.abs().clamp(min=1).double()) / _TIME_BUCKET_SCALE).long().clamp(0, TIME_BUCKETS)


class RelativeBias(nn.Module):
    """``rab``: a learned scalar per relative position (and per time bucket), added to every head's scores."""

    def __init__(self, max_len: int, with_time: bool) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.empty(max_len))
        self.time = nn.Parameter(torch.empty(TIME_BUCKETS + 1)) if with_time else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.position, std=0.02)
        if self.time is not None:
            nn.init.normal_(self.time, std=0.02)

    def forward(self, width: int, times: torch.Tensor | None) -> torch.Tensor:
        """``[users, width, width]`` bias of a left-aligned grid (``[1, width, width]`` without times);
        ``times``: ``[users, width]`` seconds (the padding's values never reach a real query)."""
        steps = torch.arange(width, device=self.position.device)
        distance = (steps.unsqueeze(1) - steps.unsqueeze(0)).clamp(0, self.position.numel() - 1)
        bias = self.position[distance].unsqueeze(0)
        if self.time is not None and times is not None:
            bias = bias + self.time[time_buckets(times.unsqueeze(2) - times.unsqueeze(1))]
        return bias


def _causal(width: int, device: torch.device) -> torch.Tensor:
    return torch.ones(width, width, dtype=torch.bool, device=device).tril_()


def pointwise_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, norm: float
) -> torch.Tensor:
    """``[users, heads, w, d]`` queries/keys, ``[users, heads, w, dv]`` values, ``[users or 1, w, w]`` bias ->
    ``[users, heads, w, dv]``: ``SiLU(q k^T + bias) / norm``, causal, times ``v``."""
    scores = torch.matmul(q, k.transpose(-1, -2)) + bias.unsqueeze(1)
    weights = F.silu(scores).mul_(1.0 / norm).masked_fill_(~_causal(q.shape[2], q.device), 0.0)
    return torch.matmul(weights, v)


class HSTUAttention:
    """One batch's HSTU attention over packed rows: ``grouped`` (CPU default) or ``padded`` (the reference,
    and the CUDA default: one batched product instead of a loop of small ones)."""

    def __init__(self, layout: PackedLayout, backend: str, device: torch.device, times: torch.Tensor | None) -> None:
        if backend == "auto":
            backend = "grouped" if device.type == "cpu" else "padded"
        if backend not in ("grouped", "padded"):
            raise ValueError(f"model.attention = {backend!r} is not available for model.encoder = 'hstu' (grouped, padded, auto)")
        self.layout, self.backend, self.times = layout, backend, times
        self.groups = attention_groups(layout.lengths, USERS_PER_ATTENTION_GROUP, device) if backend == "grouped" else []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nhead: int,
                 bias: RelativeBias, norm: float) -> torch.Tensor:  # fmt: skip
        """``[N, heads * d]`` q, k and ``[N, heads * dv]`` v -> ``[N, heads * dv]``."""
        if self.layout.num_tokens == 0:
            return v.new_zeros(0, v.shape[1])
        if self.backend == "padded":
            index, users, width = self.layout.index, self.layout.batch, self.layout.max_len
            return self._grid(q, k, v, nhead, bias, norm, index, users, width, None)
        out = v.new_empty(v.shape)
        for g in self.groups:
            out[g.rows] = self._grid(q, k, v, nhead, bias, norm, g.slots, g.users, g.width, g.rows)
        return out

    def _grid(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nhead: int, bias: RelativeBias, norm: float,
        slots: torch.Tensor, users: int, width: int, rows: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """The rows (``rows``, all of them when None) scattered to ``slots`` of a ``[users, width]`` grid,
        attended there, gathered back."""

        def grid(x: torch.Tensor) -> torch.Tensor:
            x = x if rows is None else x.index_select(0, rows)
            padded = x.new_zeros(users * width, x.shape[1]).index_copy(0, slots, x)
            return padded.view(users, width, nhead, -1).transpose(1, 2)  # [users, heads, width, d]

        times = None
        if self.times is not None:
            t = self.times if rows is None else self.times.index_select(0, rows)
            times = t.new_zeros(users * width).index_copy(0, slots, t).view(users, width)
        out = pointwise_attention(grid(q), grid(k), grid(v), bias(width, times), norm)
        return out.transpose(1, 2).reshape(users * width, -1).index_select(0, slots)


class HSTUBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int, with_time: bool) -> None:
        super().__init__()
        heads, h = cfg.nhead, cfg.hidden_size
        self.nhead = heads
        self.qk_dim = cfg.hstu_attention_dim or h // heads
        self.v_dim = cfg.hstu_linear_dim or h // heads
        self.uvqk = nn.Linear(h, heads * (2 * self.v_dim + 2 * self.qk_dim), bias=False)
        self.out = nn.Linear(heads * self.v_dim, h)
        self.bias = RelativeBias(max_len, with_time)
        self.dropout = Dropout(cfg.dropout)
        self.norm = float(max_len)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.uvqk.weight, std=0.02)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        # LayerNorms without affine weights, as in the paper: the gate U and W_o carry the scale.
        normed = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        u, v, q, k = F.silu(self.uvqk(normed)).split(
            [self.nhead * self.v_dim, self.nhead * self.v_dim, self.nhead * self.qk_dim, self.nhead * self.qk_dim], dim=1
        )
        attended = attend(q, k, v, self.nhead, self.bias, self.norm)
        gated = u * F.layer_norm(attended, attended.shape[-1:], eps=1e-6)
        return x + self.out(self.dropout(gated))


class HSTUEncoder(nn.Module):
    """``num_layers`` HSTU blocks over packed rows. No final norm: the loss compares directions (cosine)."""

    def __init__(self, cfg: ModelConfig, max_len: int, with_time: bool) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"HSTU needs the longest sequence length (data.seq_len), got {max_len}")
        self.layers = nn.ModuleList(HSTUBlock(cfg, max_len, with_time) for _ in range(cfg.num_layers))
        self.with_time = with_time

    def forward(self, x: torch.Tensor, attend: HSTUAttention) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, attend)
        return x
