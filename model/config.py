"""Typed configuration of the dense model and its loss (the seed's ``ModelConfig`` plus loss fixes)."""

from __future__ import annotations

from dataclasses import dataclass


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
    # bf16 autocast of the transformer on CUDA (seed: always on); ignored on CPU.
    bf16: bool = True
