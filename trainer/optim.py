"""Optimizers: fbgemm's fused sparse optimizer (already inside DMP) combined with AdamW for dense weights."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR
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
    # One fused kernel over all dense tensors on CUDA instead of a multi-tensor loop of element-wise ops.
    fused = bool(dense_params) and all(p.device.type == "cuda" for p in dense_params.values())
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: torch.optim.AdamW(
            params,
            lr=cfg.dense_lr,
            betas=(cfg.dense_betas[0], cfg.dense_betas[1]),
            eps=cfg.dense_eps,
            weight_decay=cfg.dense_weight_decay,
            fused=fused or None,
        ),
    )
    return CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense)])


def lr_multiplier(step: int, cfg: OptimConfig, train_steps: int) -> float:
    """Factor on the configured rates before optimizer step ``step + 1`` (0-based ``step``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return 1.0
    span = max(train_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    shape = 1.0 - progress if cfg.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: CombinedOptimizer, cfg: OptimConfig, train_steps: int) -> LambdaLR:
    """One schedule for every param group: the fused (sparse) groups read their lr at each step too."""
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, train_steps))


def restore_schedule(scheduler: LambdaLR, step: int) -> None:
    """Put the schedule where it was after ``step`` steps.

    Only the step is restored, not the scheduler's per-group state: the number of param groups follows the
    sharding plan (one fused optimizer per embedding kernel group), which may differ on resume.
    """
    scheduler.last_epoch = step
    for group, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=False):
        group["lr"] = group["initial_lr"] * lr_lambda(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # type: ignore[attr-defined]
