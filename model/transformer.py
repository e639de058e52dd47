"""The seed's pre-LayerNorm causal transformer (``x + attn(LN(x))``, ``x + FFN(LN(x))``, final LN).

It runs on packed rows, ``[N, H]`` real positions user after user (``model/attention.py`` keeps the users
apart in attention; every other layer works per position and never sees padding), or, for the seed-loss
ablation that scores the padding too, on the padded ``[B, T, H]`` grid.

Each block is two position-wise halves around attention, ``attention_input`` and ``attention_output_and_ffn``:
tensor-in, tensor-out methods that the trainer may compile (``model.compile``), fusing LayerNorm, casts,
dropout, GELU and the residual adds, while attention stays the flash kernel it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import PackedAttention
from model.config import ModelConfig


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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = Dropout(cfg.dropout)
        self.nhead = cfg.nhead
        self.hidden_size = cfg.hidden_size

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.dropout(attended)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` padded grid (the packed path goes through ``TransformerBlock``)."""
        batch, seq, _ = x.shape
        q, k, v = (
            t.view(batch, seq, self.nhead, -1).transpose(1, 2) for t in self.qkv(x).split(self.hidden_size, dim=2)
        )
        # is_causal alone: the seed also passed a 0/1 float attn_mask, which SDPA rejects together with
        # is_causal (and would have *added* to the scores). Right padding needs no key mask: a real
        # position only ever attends to earlier, real positions.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.output(out.transpose(1, 2).reshape(batch, seq, self.hidden_size))


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

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> ``[N, 3H]`` queries, keys and values."""
        return self.attn.qkv(self.norm1(x))

    def attention_output_and_ffn(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.output(attended)
        return x + self.ffn(self.norm2(x))

    def forward(self, x: torch.Tensor, attend: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
        """``x``: ``[N, H]`` packed rows with ``attend`` (a ``PackedAttention``), or the ``[B, T, H]`` grid."""
        if attend is None:
            x = x + self.attn(self.norm1(x))
            return x + self.ffn(self.norm2(x))
        return self.attention_output_and_ffn(x, attend(self.attention_input(x), self.attn.nhead))


class CausalTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor, attend: PackedAttention | None = None) -> torch.Tensor:
        """``[N, H]`` packed rows -> ``[N, H]`` given ``attend``; without it the padded grid, ``[B, T, H]``."""
        for layer in self.layers:
            x = layer(x, attend)
        return self.final_norm(x)
