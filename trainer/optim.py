"""Optimizers: fbgemm's fused sparse optimizer (already inside DMP) combined with AdamW for dense weights."""

from __future__ import annotations

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from trainer.config import OptimConfig


def build_optimizer(dmp: DistributedModelParallel, cfg: OptimConfig) -> CombinedOptimizer:
    """One ``KeyedOptimizer`` over the whole model, as TorchRec's pipeline and checkpoints expect.

    Embedding tables are updated inside the backward pass by fbgemm (``dmp.fused_optimizer``); their
    parameters are filtered out here so AdamW only sees the dense ones.
    """
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: torch.optim.AdamW(
            params,
            lr=cfg.dense_lr,
            betas=(cfg.dense_betas[0], cfg.dense_betas[1]),
            eps=cfg.dense_eps,
            weight_decay=cfg.dense_weight_decay,
        ),
    )
    return CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense)])
