"""The seed's pre-LayerNorm causal transformer (``x + attn(LN(x))``, ``x + FFN(LN(x))``, final LN)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


# Users per attention call on packed rows: users are sorted by length and grouped, each group padded only to
# its own longest user. Fewer, larger calls than one per user (each op is a parallel region that must wait
# for every thread; on a busy shared CPU that wait, not the arithmetic, dominated the per-user loop), at
# the price of attending over the little padding left inside a group of similar lengths.
USERS_PER_ATTENTION_GROUP = 8


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose keep mask comes from ``torch.rand`` on CPU.

    ATen's CPU ``bernoulli_`` draws one double per element in a serial loop unless the CPU is an Intel one
    (then MKL's parallel generator): on the AMD development machine that is about 7 ms forward + backward
    for a ``[4100, 256]`` activation, six per step, 6% of ``bench.bench_train``'s CPU step. A ``rand`` mask
    costs about 4.5 ms. Same keep probability (1 - p, up to float32 resolution) and 1 / (1 - p) scaling;
    other random draws than ``nn.Dropout``. Elsewhere (CUDA) the native fused kernel stays.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu":
            return super().forward(x)
        keep_scaled = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * keep_scaled


class _AttentionGroup(NamedTuple):
    rows: torch.Tensor  # [n] packed row of each real position of the group's users
    slots: torch.Tensor  # [n] flat index of the same positions in the group's [users, width] grid
    users: int
    width: int


class PackedSequences:
    """The real positions of a right-padded ``[B, T]`` batch, laid out as ``[N, H]`` rows (user after user).

    Every layer but attention works per position, so on the packed rows it skips the padding (a third of the
    positions for lengths uniform in [T/4, T]) and gives the same values on the real positions. Attention
    runs on groups of users of similar length, each group on its own right-padded grid: causal attention
    over a user's real prefix is exactly what the full padded grid computes for those positions (a real
    position never attends to the right padding).
    """

    def __init__(self, seq_lengths: torch.Tensor, max_len: int, users_per_group: int | None = None) -> None:
        self.batch, self.max_len = int(seq_lengths.numel()), max_len
        real = torch.arange(max_len, device=seq_lengths.device).unsqueeze(0) < seq_lengths.unsqueeze(1)
        # Flat [B*T] index of every real position, in user-major order.
        self.index = real.view(-1).nonzero().squeeze(1)
        group_size = users_per_group or USERS_PER_ATTENTION_GROUP
        self.groups = _attention_groups(seq_lengths.tolist(), group_size, seq_lengths.device)
        # Packed row -> its row in the concatenation of the groups' outputs.
        grouped_rows = torch.cat([g.rows for g in self.groups]) if self.groups else self.index
        self.ungroup = torch.empty_like(grouped_rows)
        self.ungroup[grouped_rows] = torch.arange(grouped_rows.numel(), device=grouped_rows.device)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` -> ``[N, H]``."""
        return x.reshape(self.batch * self.max_len, -1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> ``[B, T, H]`` with zeros at the padding."""
        padded = x.new_zeros(self.batch * self.max_len, x.shape[-1]).index_copy(0, self.index, x)
        return padded.view(self.batch, self.max_len, -1)

    def causal_attention(self, qkv: torch.Tensor, nhead: int) -> torch.Tensor:
        """``[N, 3H]`` packed queries, keys and values -> ``[N, H]``: causal SDPA within each user's rows."""
        if not self.groups:
            return qkv.new_zeros(0, qkv.shape[-1] // 3)
        outputs = []
        for g in self.groups:
            grid = qkv.new_zeros(g.users * g.width, qkv.shape[-1]).index_copy(0, g.slots, qkv.index_select(0, g.rows))
            # [users * width, 3H] -> q, k, v of [users, heads, width, head_dim]
            q, k, v = grid.view(g.users, g.width, 3, nhead, -1).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            outputs.append(out.transpose(1, 2).reshape(g.users * g.width, -1).index_select(0, g.slots))
        return torch.cat(outputs).index_select(0, self.ungroup)


def _attention_groups(lengths: list[int], users_per_group: int, device: torch.device) -> list[_AttentionGroup]:
    """Users without positions left out, the others sorted by length and cut into groups (host-side)."""
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    order = sorted((u for u, length in enumerate(lengths) if length), key=lengths.__getitem__)
    groups = []
    for first in range(0, len(order), users_per_group):
        users = order[first : first + users_per_group]
        width = max(lengths[u] for u in users)
        rows = torch.cat([torch.arange(starts[u], starts[u + 1]) for u in users])
        slots = torch.cat([torch.arange(lengths[u]) + i * width for i, u in enumerate(users)])
        groups.append(_AttentionGroup(rows.to(device), slots.to(device), len(users), width))
    return groups


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = Dropout(cfg.dropout)
        self.nhead = cfg.nhead
        self.hidden_size = cfg.hidden_size

    def forward(self, x: torch.Tensor, packed: PackedSequences | None = None) -> torch.Tensor:
        """``x``: ``[B, T, H]``, or ``[N, H]`` real positions when ``packed`` says where they lie."""
        if packed is not None:
            out = self.dropout(packed.causal_attention(self.qkv(x), self.nhead))
            return self.dropout(self.proj(out))
        batch, seq, _ = x.shape
        q, k, v = (
            t.view(batch, seq, self.nhead, -1).transpose(1, 2) for t in self.qkv(x).split(self.hidden_size, dim=2)
        )
        # is_causal alone: the seed also passed a 0/1 float attn_mask, which SDPA rejects together with
        # is_causal (and would have *added* to the scores). Right padding needs no key mask: a real
        # position only ever attends to earlier, real positions.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.dropout(out.transpose(1, 2).reshape(batch, seq, self.hidden_size))
        return self.dropout(self.proj(out))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.dim_feedforward),
            nn.GELU(),
            nn.Linear(cfg.dim_feedforward, cfg.hidden_size),
            Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, packed: PackedSequences | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), packed)
        return x + self.ffn(self.norm2(x))


class CausalTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor, seq_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, H]`` -> ``[B, T, H]``. Given the users' real lengths (right padding), a CPU run computes the
        real positions only (same values there; zeros at the padding, whose outputs nobody reads)."""
        if seq_lengths is not None and x.device.type == "cpu":
            # CPU only: packing needs the lengths on the host (a device sync on CUDA) and attention runs as one
            # small kernel per group of users, cheap on a CPU but a launch-bound loop on a GPU, where the padded
            # grid's single flash-attention call stays the better trade.
            packed = PackedSequences(seq_lengths, x.shape[1])
            h = packed.pack(x)
            for layer in self.layers:
                h = layer(h, packed)
            return packed.unpack(self.final_norm(h))
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)
