"""Sharding: planner -> ``DistributedModelParallel`` with fbgemm's fused sparse optimizer.

The model arrives built on the ``meta`` device; DMP materialises each rank's shards and the dense part.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
from torchrec.distributed.mc_modules import ManagedCollisionCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    Stats,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import CacheParams, ModuleSharder, ShardingEnv, ShardingPlan

from model.sparse import set_mc_buckets, trunc_normal_init_
from trainer.config import JobConfig, JobFeatureConfig, OptimConfig
from trainer.dist import DistContext

logger = logging.getLogger(__name__)

_SPARSE_OPTIMIZERS = {
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
    "exact_rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "exact_adagrad": EmbOptimType.EXACT_ADAGRAD,
    "exact_sgd": EmbOptimType.EXACT_SGD,
}
# fbgemm's CPU kernels implement only these (and EMAINPLACE_ROWWISE_ADAGRAD); ADAM and PARTIAL_ROWWISE_ADAM
# assert "not supported in CPU mode".
_CPU_SPARSE_OPTIMIZERS = {"exact_rowwise_adagrad", "exact_adagrad", "exact_sgd"}


def sparse_optimizer_name(cfg: OptimConfig, device: torch.device) -> str:
    """Resolve ``optim.sparse_optimizer`` for the device (quietly: ``sparse_optimizer_notes`` says why)."""
    name = cfg.sparse_optimizer
    on_cpu = device.type == "cpu"
    if name == "auto":
        return "exact_rowwise_adagrad" if on_cpu else "partial_rowwise_adam"
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


def mc_fused_params(cfg: OptimConfig, device: torch.device) -> dict[str, Any]:
    """fbgemm arguments of managed-collision tables.

    Admitting ids resets the evicted rows' weights and optimizer state; for EXACT_ROWWISE_ADAGRAD fbgemm does
    it with ``fbgemm::reset_weight_momentum``, which has no CPU kernel. On CPU those tables therefore use
    EXACT_ADAGRAD (whose reset fbgemm skips; TorchRec re-initialises the weights) and the log says so.
    """
    params = fused_params(cfg, device)
    if _mc_tables_use_exact_adagrad(cfg, device):
        params["optimizer"] = EmbOptimType.EXACT_ADAGRAD
    return params


def _mc_tables_use_exact_adagrad(cfg: OptimConfig, device: torch.device) -> bool:
    return device.type == "cpu" and sparse_optimizer_name(cfg, device) == "exact_rowwise_adagrad"


def sparse_optimizer_notes(cfg: JobConfig, device: torch.device) -> list[str]:
    """Why the sparse optimizer on ``device`` differs from the one configured, one line per substitution.

    Kept apart from resolving it (``sparse_optimizer_name``, ``mc_fused_params``), which every rank does, and
    sometimes twice: ``shard_model`` logs these once, on rank 0, instead of once per rank and call.
    """
    notes = []
    if device.type == "cpu" and cfg.optim.sparse_optimizer == "auto":
        notes.append(
            "sparse optimizer: fbgemm has no row-wise Adam kernel on CPU; using EXACT_ROWWISE_ADAGRAD instead "
            "(PARTIAL_ROWWISE_ADAM is used on CUDA)"
        )
    if any(f.managed_collision for f in cfg.data.features) and _mc_tables_use_exact_adagrad(cfg.optim, device):
        notes.append(
            "managed-collision tables: fbgemm cannot reset row-wise Adagrad state on CPU at evictions; "
            "using EXACT_ADAGRAD for them"
        )
    return notes


def make_sharders(cfg: JobConfig, device: torch.device) -> list[ModuleSharder[nn.Module]]:
    """One sharder per kind of embedding module the model holds (see ``model.sparse.SparseArch``)."""
    sharders: list[ModuleSharder[nn.Module]] = [
        EmbeddingCollectionSharder(fused_params=fused_params(cfg.optim, device))  # type: ignore[list-item]
    ]
    if any(f.managed_collision for f in cfg.data.features):
        sharders.append(
            ManagedCollisionEmbeddingCollectionSharder(  # type: ignore[arg-type]
                EmbeddingCollectionSharder(fused_params=mc_fused_params(cfg.optim, device)),
                ManagedCollisionCollectionSharder(),
            )
        )
    return sharders


def table_constraints(features: list[JobFeatureConfig], compute_device: str) -> dict[str, ParameterConstraints]:
    """Planner constraints per table (``FeatureConfig.table``) from the features' sharding settings."""
    constraints: dict[str, ParameterConstraints] = {}
    for table, group in _tables(features).items():
        f = group[0]  # config validation makes the features of one table agree
        sharding_types = list(f.sharding_types) or None
        kernels = list(f.compute_kernels) or None
        if f.managed_collision:
            # TorchRec shards managed-collision tables row-wise only.
            sharding_types = ["row_wise"]
        if compute_device == "cpu":
            kernels = _cpu_kernels(table, sharding_types, kernels)
        constraints[table] = ParameterConstraints(
            sharding_types=sharding_types,
            compute_kernels=kernels,
            cache_params=CacheParams(load_factor=f.cache_load_factor) if f.cache_load_factor > 0 else None,
            # One entry per feature reading the table: ids per bag (position).
            pooling_factors=[g.pooling_factor for g in group],
        )
    return constraints


def _cpu_kernels(table: str, sharding_types: list[str] | None, kernels: list[str] | None) -> list[str]:
    """fbgemm on CPU has only "fused" (sharded) and "dense" (data-parallel) kernels; left open, the planner
    may pick UVM kernels and fail. "dense" only when asked for: fbgemm's CPU dense kernel ignores
    PoolingMode.NONE and sums each bag, so a data-parallel EmbeddingCollection gets one row per position
    instead of one per id (right only when every position holds exactly one id; see tests/test_sharding.py).
    """
    if sharding_types and "data_parallel" in sharding_types:
        logger.warning(
            "table %s: data_parallel on CPU uses fbgemm's dense CPU kernel, which sums the ids of a position; "
            "only positions with exactly one id embed correctly (CUDA is not affected)",
            table,
        )
        return ["dense"] if sharding_types == ["data_parallel"] else ["fused", "dense"]
    return ["fused"]


def _tables(features: list[JobFeatureConfig]) -> dict[str, list[JobFeatureConfig]]:
    tables: dict[str, list[JobFeatureConfig]] = {}
    for f in features:
        tables.setdefault(f.table, []).append(f)
    return tables


def make_planner(
    cfg: JobConfig,
    world_size: int,
    local_world_size: int,
    compute_device: str,
    hbm_cap_bytes: int | None = None,
    ddr_cap_bytes: int | None = None,
    batch_size: int | None = None,
    stats: list[Stats] | None = None,
) -> EmbeddingShardingPlanner:
    """The planner the trainer and the dry run (``trainer.plan``) share.

    ``batch_size`` is users per rank (default ``data.batch_size``); capacities default to the planner's
    (the local device's, or TorchRec's defaults when planning for a device this machine does not have).
    """
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=hbm_cap_bytes,
            ddr_cap_bytes=ddr_cap_bytes,
        ),
        kernel_config=KernelConfig(compute_device=compute_device),
    )
    return EmbeddingShardingPlanner(
        topology=topology,
        # One bag per position: the lookups per rank and step are batch_size * seq_len bags.
        batch_size=(batch_size or cfg.data.batch_size) * cfg.data.seq_len,
        constraints=table_constraints(cfg.data.features, compute_device),
        # The heuristic reservation guesses dense sizes from materialised tensors, which a meta model lacks.
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
        stats=stats,
    )


def prepare_for_planning(model: nn.Module, world_size: int) -> None:
    """What the model needs to know about the job before it is planned: the MCH id-space buckets."""
    set_mc_buckets(model, world_size)


class _CpuDataParallelNoise(logging.Filter):
    """Drops TorchRec's "No available compute kernels" warning for data_parallel under our CPU constraint.

    On CPU every table is constrained to the "fused" kernel (``_cpu_kernels``) unless data_parallel is asked
    for, and data_parallel has only the "dense" kernel; the planner's enumerator therefore finds no kernel for
    data_parallel and warns once per table on every CPU run (four lines for the default config), although
    leaving data_parallel out is exactly what the constraint is for. Only that combination is dropped: any
    other sharding type or kernel set, and every other planner message, still comes through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (
            text.startswith("No available compute kernels")
            and "Constrained compute kernels: ['fused'], allowed compute kernels: ['dense']," in text
            and "sharding type: data_parallel." in text
        )


_ENUMERATOR_LOGGER = "torchrec.distributed.planner.enumerators"


@contextlib.contextmanager
def quiet_cpu_kernel_gaps(compute_device: str) -> Iterator[None]:
    """While planning for ``compute_device``: on CPU, without ``_CpuDataParallelNoise``'s warnings."""
    if compute_device != "cpu":
        yield
        return
    noise = _CpuDataParallelNoise()
    enumerators = logging.getLogger(_ENUMERATOR_LOGGER)
    enumerators.addFilter(noise)
    try:
        yield
    finally:
        enumerators.removeFilter(noise)


def plan_sharding(
    model: nn.Module, cfg: JobConfig, ctx: DistContext, sharders: list[ModuleSharder[nn.Module]]
) -> ShardingPlan:
    """Plan on rank 0 and broadcast it, so every rank shards the same way."""
    planner = make_planner(cfg, ctx.world_size, ctx.local_world_size, ctx.device.type)
    with quiet_cpu_kernel_gaps(ctx.device.type):
        return planner.collective_plan(model, sharders, ctx.control_group if ctx.backend == "gloo" else None)


def shard_model(model: nn.Module, cfg: JobConfig, ctx: DistContext) -> DistributedModelParallel:
    """Plan (on rank 0, broadcast) and wrap the meta-device model in DMP; re-init the embedding shards."""
    for f in cfg.data.features:
        if f.managed_collision and f.mc_capacity % ctx.world_size:
            raise ValueError(
                f"data.features ({f.name}): mc_capacity {f.mc_capacity} must be a multiple of the world size "
                f"{ctx.world_size} (managed-collision tables are split evenly across ranks)"
            )
    prepare_for_planning(model, ctx.world_size)
    sharders = make_sharders(cfg, ctx.device)
    if ctx.is_main:
        for note in sparse_optimizer_notes(cfg, ctx.device):
            logger.warning("%s", note)
    plan = plan_sharding(model, cfg, ctx, sharders)
    if ctx.is_main:
        logger.info("sharding plan:\n%s", plan)
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
        device=ctx.device,
        plan=plan,
        sharders=sharders,
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
