"""Causal self-attention over packed rows: each user's real positions attend to that user's earlier ones.

The transformer runs on ``[N, H]`` rows, the batch's N real positions user after user (``PackedLayout``), so
nothing but attention ever needs the users apart. Three ways to attend, side by side, all giving what the
padded ``[B, T]`` grid gives at the real positions (a real position never attends to the right padding):

* ``padded_attention``, the reference: scatter the rows onto the zero-padded grid, one causal SDPA call,
  gather the rows back. On CUDA it is also the fallback where ``varlen`` cannot run: fp32, or a torch
  without ``torch.nn.attention.varlen``. Its cost grows with the padding, in attention only.
* ``varlen_attention`` (CUDA): FlashAttention's variable-length kernel on the rows themselves, one call,
  no padding at all.
* ``grouped_attention`` (CPU): users sorted by length and cut into groups, each group on its own padded grid.
  A CPU has no variable-length kernel; per group, one SDPA call pays for a little padding instead of one
  call per user (each call is a parallel region whose every thread must finish; on a busy shared CPU that
  wait, not the arithmetic, dominated a per-user loop).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from functools import cache
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from data.batch import PackedLayout

logger = logging.getLogger(__name__)

AttentionBackend = Literal["auto", "varlen", "grouped", "padded"]

# Users per attention call of the grouped (CPU) backend.
USERS_PER_ATTENTION_GROUP = 8


def _split_heads(qkv: torch.Tensor, nhead: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[n, 3H]`` -> q, k, v of ``[n, heads, head_dim]`` (views)."""
    return qkv.view(qkv.shape[0], 3, nhead, -1).unbind(1)


def padded_attention(qkv: torch.Tensor, layout: PackedLayout, nhead: int) -> torch.Tensor:
    """``[N, 3H]`` -> ``[N, H]`` through the zero-padded ``[B, T]`` grid and one causal SDPA call."""
    batch, width = layout.batch, layout.max_len
    grid = qkv.new_zeros(batch * width, qkv.shape[1]).index_copy(0, layout.index, qkv)
    q, k, v = grid.view(batch, width, 3, nhead, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, T, head_dim]
    return out.transpose(1, 2).reshape(batch * width, -1).index_select(0, layout.index)


@cache
def _varlen() -> Callable[..., torch.Tensor] | None:
    """torch's variable-length FlashAttention with its causal switch bound, or None if this torch has none.

    Its causal argument changed between releases: ``is_causal=True`` in torch 2.10, ``window_size=(-1, 0)``
    (no limit to the left, none to the right) from 2.11 on.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        return lambda *args: varlen_attn(*args, window_size=(-1, 0))
    if "is_causal" in parameters:
        return lambda *args: varlen_attn(*args, is_causal=True)
    return None


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and _varlen() is not None


def varlen_attention(qkv: torch.Tensor, layout: PackedLayout, nhead: int) -> torch.Tensor:
    """``[N, 3H]`` (bf16 or fp16, CUDA) -> ``[N, H]``: one variable-length flash call over every user."""
    attend = _varlen()
    if attend is None:
        raise RuntimeError("model.attention = 'varlen' needs torch.nn.attention.varlen (torch >= 2.10)")
    q, k, v = _split_heads(qkv, nhead)
    longest = layout.longest
    out = attend(q, k, v, layout.cu_seqlens, layout.cu_seqlens, longest, longest)
    return out.reshape(qkv.shape[0], -1)


class AttentionGroup(NamedTuple):
    rows: torch.Tensor  # [n] packed row of each real position of the group's users
    slots: torch.Tensor  # [n] flat index of the same positions in the group's [users, width] grid
    users: int
    width: int


def attention_groups(lengths: tuple[int, ...], users_per_group: int, device: torch.device) -> list[AttentionGroup]:
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
        groups.append(AttentionGroup(rows.to(device), slots.to(device), len(users), width))
    return groups


def grouped_attention(qkv: torch.Tensor, groups: list[AttentionGroup], nhead: int) -> torch.Tensor:
    """``[N, 3H]`` -> ``[N, H]``, one causal SDPA call per group of users of similar length."""
    if not groups:
        return qkv.new_zeros(0, qkv.shape[-1] // 3)
    outputs, order = [], []
    for g in groups:
        grid = qkv.new_zeros(g.users * g.width, qkv.shape[-1]).index_copy(0, g.slots, qkv.index_select(0, g.rows))
        q, k, v = grid.view(g.users, g.width, 3, nhead, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        outputs.append(out.transpose(1, 2).reshape(g.users * g.width, -1).index_select(0, g.slots))
        order.append(g.rows)
    out = torch.cat(outputs)
    # Back to packed row order: every row is written once (the groups' rows are a permutation of all rows).
    return out.new_empty(out.shape).index_copy_(0, torch.cat(order), out)


class PackedAttention:
    """One batch's attention: the backend resolved for the device, and what it needs prepared once for all
    layers (the CPU groups)."""

    def __init__(self, layout: PackedLayout, backend: AttentionBackend, device: torch.device) -> None:
        self.layout = layout
        self.requested = backend
        if backend == "auto":
            backend = "grouped" if device.type == "cpu" else "varlen" if varlen_available(device) else "padded"
        if backend == "varlen" and not varlen_available(device):
            raise ValueError(
                f"model.attention = 'varlen' runs on CUDA with torch >= 2.10 (torch.nn.attention.varlen); "
                f"this is {device.type} with torch {torch.__version__}: use 'auto'"
            )
        self.backend = backend
        self.groups = (
            attention_groups(layout.lengths, USERS_PER_ATTENTION_GROUP, device) if backend == "grouped" else []
        )

    def __call__(self, qkv: torch.Tensor, nhead: int) -> torch.Tensor:
        if self.layout.num_tokens == 0:
            return qkv.new_zeros(0, qkv.shape[-1] // 3)
        if self.backend == "grouped":
            return grouped_attention(qkv, self.groups, nhead)
        if self.backend == "varlen":
            if qkv.dtype in (torch.bfloat16, torch.float16):
                return varlen_attention(qkv, self.layout, nhead)
            if self.requested == "varlen":
                raise ValueError(f"model.attention = 'varlen' needs bf16 or fp16 activations (model.bf16), got {qkv.dtype}")
        return padded_attention(qkv, self.layout, nhead)
