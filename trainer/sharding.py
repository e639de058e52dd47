"""Sharding: planner -> ``DistributedModelParallel`` with fbgemm's fused sparse optimizer.

The model arrives built on the ``meta`` device; DMP materialises each rank's shards and the dense part.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingCollection

from model.sparse import trunc_normal_init_
from trainer.config import JobConfig, OptimConfig
from trainer.dist import DistContext

logger = logging.getLogger(__name__)

_SPARSE_OPTIMIZERS = {
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
    "exact_rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "exact_adagrad": EmbOptimType.EXACT_ADAGRAD,
    "exact_sgd": EmbOptimType.EXACT_SGD,
}
# fbgemm's CPU kernels implement only these (DESIGN.md §3); Adam asserts "not supported in CPU mode".
_CPU_SPARSE_OPTIMIZERS = {"exact_rowwise_adagrad", "exact_adagrad", "exact_sgd"}


def sparse_optimizer_name(cfg: OptimConfig, device: torch.device) -> str:
    """Resolve ``optim.sparse_optimizer`` for the device, saying once why CPU cannot use row-wise Adam."""
    name = cfg.sparse_optimizer
    on_cpu = device.type == "cpu"
    if name == "auto":
        if not on_cpu:
            return "partial_rowwise_adam"
        logger.warning(
            "sparse optimizer: fbgemm has no row-wise Adam kernel on CPU; using EXACT_ROWWISE_ADAGRAD instead "
            "(PARTIAL_ROWWISE_ADAM is used on CUDA)"
        )
        return "exact_rowwise_adagrad"
    if on_cpu and name not in _CPU_SPARSE_OPTIMIZERS:
        raise ValueError(
            f"optim.sparse_optimizer = {name!r} has no fbgemm CPU kernel; use one of "
            f"{sorted(_CPU_SPARSE_OPTIMIZERS)} or 'auto' on CPU"
        )
    return name


def fused_params(cfg: OptimConfig, device: torch.device) -> dict[str, Any]:
    """fbgemm TBE arguments: the sparse optimizer runs fused into the embedding backward."""
    return {
        "optimizer": _SPARSE_OPTIMIZERS[sparse_optimizer_name(cfg, device)],
        "learning_rate": cfg.sparse_lr,
        "eps": cfg.sparse_eps,
        "beta1": cfg.sparse_beta1,
        "beta2": cfg.sparse_beta2,
        "weight_decay": cfg.sparse_weight_decay,
    }


def plan_sharding(
    model: nn.Module, cfg: JobConfig, ctx: DistContext, sharders: list[EmbeddingCollectionSharder]
) -> ShardingPlan:
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=ctx.world_size, local_world_size=ctx.local_world_size),
        kernel_config=KernelConfig(compute_device=ctx.device.type),
    )
    constraints = None
    if ctx.device.type == "cpu":
        # On CPU only "fused" (sharded) and "dense" (data-parallel) exist; left open, the planner may
        # pick UVM kernels and fail.
        tables = [t.name for m in model.modules() if isinstance(m, EmbeddingCollection) for t in m.embedding_configs()]
        constraints = {t: ParameterConstraints(compute_kernels=["fused", "dense"]) for t in tables}
    planner = EmbeddingShardingPlanner(
        topology=topology,
        # One bag per position: the lookups per rank and step are batch_size * seq_len bags of ~1 id.
        batch_size=cfg.data.batch_size * cfg.data.seq_len,
        constraints=constraints,
        # The heuristic reservation guesses dense sizes from materialised tensors, which a meta model lacks.
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
    )
    return planner.collective_plan(model, sharders, ctx.control_group if ctx.backend == "gloo" else None)


def shard_model(model: nn.Module, cfg: JobConfig, ctx: DistContext) -> DistributedModelParallel:
    """Plan (on rank 0, broadcast) and wrap the meta-device model in DMP; re-init the embedding shards."""
    sharders = [EmbeddingCollectionSharder(fused_params=fused_params(cfg.optim, ctx.device))]
    plan = plan_sharding(model, cfg, ctx, sharders)
    if ctx.is_main:
        logger.info("sharding plan:\n%s", plan)
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
        device=ctx.device,
        plan=plan,
        sharders=sharders,  # type: ignore[arg-type]
    )
    init_embedding_shards_(dmp, seed=cfg.train.seed)
    return dmp


def init_embedding_shards_(dmp: DistributedModelParallel, seed: int) -> None:
    """fbgemm initialises tables uniformly; apply the seed's TruncNormal(std=0.001) to every local shard.

    Each shard draws from a generator keyed by (seed, table, shard offsets): disjoint shards get
    different draws, and a replicated (data-parallel) table gets the same draw on every rank, so the
    replicas stay identical without another broadcast.
    """
    for name, tensor in dmp.state_dict().items():
        if "embedding_collection" not in name or not name.endswith(".weight"):
            continue
        for offsets, local in _local_shards(tensor):
            generator = torch.Generator().manual_seed(seed + zlib.crc32(f"{name}@{offsets}".encode()))
            # Draw on the host and copy: the generator lives on the CPU whatever the shard's device.
            local.copy_(trunc_normal_init_(torch.empty(local.shape), generator))


def _local_shards(tensor: Any) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    if hasattr(tensor, "local_shards"):  # ShardedTensor (row-/table-/column-wise)
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in tensor.local_shards()]
    if hasattr(tensor, "to_local"):  # DTensor
        return [((0, 0), tensor.to_local())]
    return [((0, 0), tensor)]
