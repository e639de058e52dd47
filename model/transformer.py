"""The seed's pre-LayerNorm causal transformer (``x + attn(LN(x))``, ``x + FFN(LN(x))``, final LN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class PackedSequences:
    """The real positions of a right-padded ``[B, T]`` batch, laid out as ``[N, H]`` rows (user after user).

    Every layer but attention works per position, so on the packed rows it skips the padding (a third of the
    positions for lengths uniform in [T/4, T]) and gives the same values on the real positions. Attention
    runs per user on its own rows: causal attention over a user's real prefix is exactly what the padded
    grid computes for those positions (right padding is never attended to by a real position).
    """

    def __init__(self, seq_lengths: torch.Tensor, max_len: int) -> None:
        self.batch, self.max_len = int(seq_lengths.numel()), max_len
        real = torch.arange(max_len, device=seq_lengths.device).unsqueeze(0) < seq_lengths.unsqueeze(1)
        # Flat [B*T] index of every real position, in user-major order.
        self.index = real.view(-1).nonzero().squeeze(1)
        self.lengths: list[int] = seq_lengths.tolist()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` -> ``[N, H]``."""
        return x.reshape(self.batch * self.max_len, -1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> ``[B, T, H]`` with zeros at the padding."""
        padded = x.new_zeros(self.batch * self.max_len, x.shape[-1]).index_copy(0, self.index, x)
        return padded.view(self.batch, self.max_len, -1)

    def causal_attention(self, qkv: torch.Tensor, nhead: int) -> torch.Tensor:
        """``[N, 3H]`` packed queries, keys and values -> ``[N, H]``: causal SDPA within each user's rows."""
        outputs = []
        # One split into users (its backward is one concatenation); slicing users out one by one instead
        # would give every slice a backward that writes a zero-filled [N, 3H] gradient.
        for rows in qkv.split(self.lengths):
            length = rows.shape[0]
            if length:
                # [L, 3H] -> q, k, v of [1, heads, L, head_dim]
                q, k, v = rows.view(1, length, 3, nhead, -1).permute(2, 0, 3, 1, 4).unbind(0)
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                outputs.append(out.transpose(1, 2).reshape(length, -1))
        return torch.cat(outputs) if outputs else qkv.new_zeros(0, qkv.shape[-1] // 3)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
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
            nn.Dropout(cfg.dropout),
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
            # small kernel per user, cheap on a CPU but a launch-bound loop on a GPU, where the padded grid's
            # single flash-attention call stays the better trade.
            packed = PackedSequences(seq_lengths, x.shape[1])
            h = packed.pack(x)
            for layer in self.layers:
                h = layer(h, packed)
            return packed.unpack(self.final_norm(h))
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)
