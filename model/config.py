"""Typed configuration of the dense model and its loss (the seed's ``ModelConfig`` plus loss fixes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    hidden_size: int = 1024
    num_layers: int = 8
    nhead: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.1
    # Width of the concatenated feature embeddings; must equal the sum of the features' emb_dim.
    emb_size: int = 512
    # Cosine logits lie in [-1, 1]; dividing by a temperature < 1 lets cross-entropy go below ~log(N).
    # 1.0 reproduces the seed.
    temperature: float = 1.0
    # Treat other in-batch positions holding the same target item as non-negatives (seed: false).
    mask_same_item: bool = False
    # Features whose embeddings make up a position's *target* representation (what the query at the
    # previous position must match). Empty = every feature, as in the seed. Ranking all items in
    # evaluation and sampled negatives need a representation of an item on its own, i.e. this set
    # must be just the item feature (e.g. ["item_id"]); the other features then only describe the input.
    target_features: list[str] = field(default_factory=list)
    # Negatives of the contrastive loss (model/loss.py); the three sources mix freely.
    # In-batch targets: "all" = every other pair's target in the rank's batch (the seed's loss; its cost grows
    # with the square of the batch's tokens), "sampled" = num_in_batch_negatives of them drawn per query
    # (HSTU; cost linear in the tokens), "none".
    in_batch_negatives: Literal["all", "sampled", "none"] = "all"
    num_in_batch_negatives: int = 128
    # "sampled": queries that share one draw (consecutive pairs of the batch). One matrix product per group
    # on tensor cores instead of one gather of K rows per query; 1 = an independent draw per query.
    in_batch_group_size: int = 64
    # Extra negatives per batch drawn uniformly from the item table and shared by every query, next to
    # the in-batch ones ("mixed negatives"): in-batch negatives are biased towards popular items, uniform
    # ones cover the tail that full-ranking evaluation scores too. 0 = in-batch only (seed).
    num_negatives: int = 0
    # Log-Q correction of the in-batch negatives (Yi et al., RecSys 2019; model/loss.py): each candidate's
    # logit minus the log of how often its item is expected among a query's candidates, so that popular
    # items are not pushed down merely for turning up as negatives more often.
    logq_correction: bool = False
    # Queries per chunk of the loss, whose logits are recomputed in the backward instead of kept (peak memory
    # O(chunk x negatives)); 0 = as many as keep a chunk's logits within 1 GiB on CUDA, 16 MiB on CPU.
    loss_chunk_size: int = 0
    # Learned embeddings of each position's distance to the user's newest item, added to the projected
    # inputs (SASRec uses learned positions too); distances >= max_positions share the last row. 0 = none,
    # as in the seed (the causal mask alone then carries order).
    max_positions: int = 0
    # For ablations only: put back bugs of the seed's loss (README, "What differs from the seed"). "copy_shift" pairs the query
    # at t+1 with the item at t (which causal attention lets the model copy); "padding" lets padded
    # positions enter the loss as queries and targets.
    seed_loss_bugs: list[Literal["copy_shift", "padding"]] = field(default_factory=list)
    # bf16 autocast of the transformer on CUDA (seed: always on), and bf16 products in the loss; ignored on CPU.
    bf16: bool = True
    # The sequence encoder: "transformer" (the seed's causal transformer, model/transformer.py) or "hstu"
    # (Zhai et al. 2024, model/hstu.py: pointwise SiLU attention with relative position and time bias, gating
    # by U, no separate FFN; dim_feedforward is unused).
    encoder: Literal["transformer", "hstu"] = "transformer"
    # HSTU's per-head widths of Q/K (attention) and U/V (linear); 0 = hidden_size / nhead.
    hstu_attention_dim: int = 0
    hstu_linear_dim: int = 0
    # Attention over the packed rows (model/attention.py): "auto" = "varlen" on CUDA (FlashAttention's
    # variable-length kernel, no padding) where torch has it, else "padded"; "grouped" on CPU.
    attention: Literal["auto", "varlen", "grouped", "padded"] = "auto"
    # torch.compile the transformer's position-wise halves (LayerNorm, casts, dropout, GELU and residual adds
    # fused): "auto" = on CUDA only. A compile that fails logs why and the run goes on uncompiled.
    compile: bool | Literal["auto"] = "auto"
