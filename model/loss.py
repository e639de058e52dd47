"""In-batch contrastive next-item loss, with the seed's bugs fixed (see README "What differs from the seed")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor
    # Queries whose own target scored highest among all candidates (the seed's hit_rate numerator).
    hits: torch.Tensor
    # Number of (query, target) pairs that entered the loss: real positions with a real next item.
    num_targets: torch.Tensor


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
    """Cross-entropy of cosine similarities between each query and every in-batch target (plus shared
    sampled negatives).

    hidden: ``[B, T, H]`` transformer outputs; targets: ``[B, T, H]`` target representations of each
    position. The query at t is paired with the target at t+1 (the seed paired t+1 with t, which under
    causal attention teaches the model to copy its input). Padding never enters as query or target.
    negatives: ``[M, H]`` representations of items sampled from the table, ``negative_ids`` their ids: a
    sampled item that is the query's own target is not a negative and is masked.
    """
    queries, keys, ids = _pairs(hidden, targets, seq_lengths, item_ids, seed_loss_bugs)
    # The temperature scales the [N, H] queries rather than the [N, N] logits: the same logits (up to
    # rounding) for two fewer passes over N^2 values (forward and backward), N being thousands per batch.
    queries = F.normalize(queries.float(), p=2, dim=-1, eps=1e-6) / temperature
    keys = F.normalize(keys.float(), p=2, dim=-1, eps=1e-6)
    num_targets = torch.tensor(queries.shape[0], device=hidden.device)
    if queries.shape[0] == 0:
        # Nothing to predict in this batch; a zero that still touches every parameter keeps DDP in step.
        zero = hidden.sum() * 0.0 + targets.sum() * 0.0
        if negatives is not None:
            zero = zero + negatives.sum() * 0.0
        return LossOutput(loss=zero, hits=num_targets.clone(), num_targets=num_targets)

    logits = queries @ keys.t()
    if mask_same_item:
        same = ids.unsqueeze(0) == ids.unsqueeze(1)
        same.fill_diagonal_(False)
        # Another occurrence of the query's own target item is not a negative.
        logits = logits.masked_fill(same, float("-inf"))
    if negatives is not None and negatives.shape[0]:
        extra = queries @ F.normalize(negatives.float(), p=2, dim=-1, eps=1e-6).t()
        if negative_ids is not None:
            extra = extra.masked_fill(ids.unsqueeze(1) == negative_ids.unsqueeze(0), float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    labels = torch.arange(queries.shape[0], device=hidden.device)
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        hits = (logits.argmax(dim=1) == labels).sum()
    return LossOutput(loss=loss, hits=hits, num_targets=num_targets)
