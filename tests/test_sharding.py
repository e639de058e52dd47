"""Sharded embeddings against an unsharded reference: 2 gloo ranks, real TorchRec, fbgemm's CPU kernels.

For each sharding type the CPU supports (table_wise, row_wise, column_wise, data_parallel) the sharded
``SparseArch`` (a table shared by two features, ``list<list<T>>`` bags mean-pooled, empty bags) must give
each rank the embeddings the reference gives for that rank's batch, and after several optimizer steps hold
the weights the reference computes in float64:

- sharded tables (fused EXACT_ROWWISE_ADAGRAD): the row gradient is the *sum* over both ranks' batches;
  a column-wise table keeps one Adagrad accumulator per row and column shard;
- data_parallel tables (dense kernel, no fused optimizer): DDP *averages* the gradient over ranks and the
  trainer's dense AdamW updates the replicas. fbgemm's CPU dense kernel ignores PoolingMode.NONE and sums
  the ids of each bag (pinned below), so on CPU data_parallel is checked with one id per position only and
  the trainer never picks it by itself (trainer/sharding.py).

Tolerance: 1e-6 absolute on embeddings and 1e-5 absolute on weights (fp32 kernels vs a float64 reference).
All four types run in one spawn of two processes (~20 s on two cores).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from data.config import DataConfig, FeatureConfig
from tests.util import run_ranks
from trainer.config import JobConfig, JobFeatureConfig, OptimConfig

pytestmark = pytest.mark.slow

WORLD = 2
ROWS = {"item_table": 40, "cate_id": 12}
DIM = 256  # column-wise shards are at least 128 wide: 256 gives two column shards
B, T, STEPS = 3, 4, 3
OPTIM = OptimConfig(sparse_lr=0.05, dense_lr=0.01, dense_weight_decay=0.01, sparse_eps=1e-8)
SHARDING_TYPES = ["table_wise", "row_wise", "column_wise", "data_parallel"]
EMB_ATOL, WEIGHT_ATOL = 1e-6, 1e-5


def _table_types(sharding_type: str) -> dict[str, tuple[str, str]]:
    """(sharding type, kernel) per table. fbgemm's CPU dense kernel is right only for one data-parallel
    feature with one id per position (see the module docstring), so the data_parallel case makes cate_id
    data-parallel next to a row-wise table: one DMP with both kinds."""
    if sharding_type == "data_parallel":
        return {"item_table": ("row_wise", "fused"), "cate_id": ("data_parallel", "dense")}
    return {t: (sharding_type, "fused") for t in ROWS}


def _features(sharding_type: str) -> list[JobFeatureConfig]:
    types = _table_types(sharding_type)

    def constraints(table: str) -> dict[str, Any]:
        return dict(emb_dim=DIM, sharding_types=[types[table][0]], compute_kernels=[types[table][1]])

    return [
        # Two features reading one table (the seed's shard_name).
        JobFeatureConfig(name="item_id", hash_bucket_size=ROWS["item_table"], shard_name="item_table",
                         **constraints("item_table")),
        JobFeatureConfig(name="cate_id", hash_bucket_size=ROWS["cate_id"], **constraints("cate_id")),
        JobFeatureConfig(name="item_id2", hash_bucket_size=ROWS["item_table"], shard_name="item_table",
                         **constraints("item_table")),
    ]  # fmt: skip


FEATURE_TABLE = {"item_id": "item_table", "cate_id": "cate_id", "item_id2": "item_table"}


def _batch(gen: torch.Generator, one_id: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per feature (values, lengths) for B*T bags of 0..3 ids: list<list<T>> with empty positions
    (features in ``one_id``: exactly one id per position)."""
    out = {}
    for name, table in FEATURE_TABLE.items():
        if name in one_id:
            lengths = torch.ones(B * T, dtype=torch.long)
        else:
            lengths = torch.randint(0, 4, (B * T,), generator=gen)
        out[name] = (torch.randint(0, ROWS[table], (int(lengths.sum()),), generator=gen), lengths)
    return out


def _kjt(batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = list(batch)
    return KeyedJaggedTensor.from_lengths_sync(
        keys, torch.cat([batch[k][0] for k in keys]), torch.cat([batch[k][1] for k in keys])
    )


def _reference_forward(tables: dict[str, torch.Tensor], batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    pooled = []
    for name, (values, lengths) in batch.items():
        rows = tables[FEATURE_TABLE[name]][values]
        bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        summed = torch.zeros(lengths.numel(), DIM, dtype=rows.dtype).index_add(0, bag, rows)
        pooled.append(summed / lengths.clamp(min=1).unsqueeze(1).to(rows.dtype))
    return torch.cat(pooled, dim=1)


def _local_pieces(tensor: Any) -> list[tuple[tuple[int, int], torch.Tensor]]:
    if hasattr(tensor, "local_shards"):
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in tensor.local_shards()]  # type: ignore[misc]
    return [((0, 0), tensor)]


def _run_sharding_type(sharding_type: str, rank: int) -> dict[str, Any]:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from model.sparse import SparseArch
    from trainer.optim import build_optimizer
    from trainer.rowwise_adam import exact_rowwise_adagrad_step
    from trainer.sharding import make_planner, make_sharders

    features = _features(sharding_type)
    cfg = JobConfig(data=DataConfig(data_paths="unused", batch_size=B, seq_len=T, features=features), optim=OPTIM)
    device = torch.device("cpu")
    sharders = make_sharders(cfg, device)
    arch = SparseArch(features, device=torch.device("meta"))
    plan = make_planner(cfg, WORLD, WORLD, "cpu").collective_plan(arch, sharders, dist.group.WORLD)
    dmp = DistributedModelParallel(arch, env=ShardingEnv.from_process_group(dist.group.WORLD), device=device,
                                   plan=plan, sharders=sharders)  # fmt: skip
    # The trainer's optimizer; a bare SparseArch has dense parameters only when a table is data-parallel.
    optimizer = build_optimizer(dmp, OPTIM) if sharding_type == "data_parallel" else dmp.fused_optimizer
    param_plan = plan.plan["embedding_collection"]
    chosen = {t: (p.sharding_type, p.compute_kernel) for t, p in param_plan.items()}  # type: ignore[union-attr]

    ref = _initial_tables()
    weights = {n.split(".")[-2]: t for n, t in dmp.state_dict().items() if n.endswith(".weight")}
    with torch.no_grad():
        for table, tensor in weights.items():
            for (r0, c0), local in _local_pieces(tensor):
                local.copy_(ref[table][r0 : r0 + local.shape[0], c0 : c0 + local.shape[1]])

    types = _table_types(sharding_type)
    blocks: dict[str, list[int] | None] = {}
    for table, p in param_plan.items():  # type: ignore[union-attr]
        widths = sorted({(s.shard_offsets[1], s.shard_sizes[1]) for s in p.sharding_spec.shards}) if p.sharding_spec else []
        blocks[table] = [w for _, w in widths] if types[table][0] == "column_wise" else None
    adagrad = {t: torch.zeros(ROWS[t], len(blocks[t] or [DIM]), dtype=torch.float64) for t in ROWS}
    replicated = [t for t in ROWS if types[t][0] == "data_parallel"]
    adamw = torch.optim.AdamW([ref[t] for t in replicated], lr=OPTIM.dense_lr, betas=tuple(OPTIM.dense_betas),
                              eps=OPTIM.dense_eps, weight_decay=OPTIM.dense_weight_decay) if replicated else None  # fmt: skip

    emb_err = 0.0
    data_gen = torch.Generator().manual_seed(11)
    for _ in range(STEPS):
        batches = [_batch(data_gen, set(replicated) & {"cate_id"}) for _ in range(WORLD)]
        targets = [torch.randn(B * T, 3 * DIM, generator=data_gen) for _ in range(WORLD)]
        out = dmp(_kjt(batches[rank]))
        (out * targets[rank]).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

        leaves = {t: w.detach().clone().requires_grad_(True) for t, w in ref.items()}
        ref_outs = [_reference_forward(leaves, b) for b in batches]
        emb_err = max(emb_err, (out.double() - ref_outs[rank]).abs().max().item())
        sum(((o * tg.double()).sum() for o, tg in zip(ref_outs, targets)), torch.tensor(0.0)).backward()
        with torch.no_grad():
            for t in ROWS:
                grad = leaves[t].grad
                assert grad is not None
                if t in replicated:
                    ref[t].grad = grad / WORLD  # DDP averages the replicas' gradients
                else:  # fbgemm sums the rows' gradients from every rank's lookups
                    exact_rowwise_adagrad_step(ref[t], adagrad[t], grad, OPTIM.sparse_lr, OPTIM.sparse_eps, blocks[t])
            if adamw is not None:
                adamw.step()

    weight_err = 0.0
    moved = 0.0
    initial = _initial_tables()
    for table, tensor in weights.items():
        for (r0, c0), local in _local_pieces(tensor):
            rows, cols = slice(r0, r0 + local.shape[0]), slice(c0, c0 + local.shape[1])
            weight_err = max(weight_err, (local.double() - ref[table][rows, cols]).abs().max().item())
            moved = max(moved, (ref[table][rows, cols] - initial[table][rows, cols]).abs().max().item())
    return {"chosen": chosen, "emb_err": emb_err, "weight_err": weight_err, "moved": moved, "blocks": blocks}


def _initial_tables() -> dict[str, torch.Tensor]:
    """The same float64 start on every rank (each rank copies in the part it holds)."""
    gen = torch.Generator().manual_seed(7)
    return {t: torch.rand(ROWS[t], DIM, generator=gen, dtype=torch.float64) * 0.2 - 0.1 for t in ROWS}


def _sharding_worker(rank: int) -> dict[str, dict[str, Any]]:
    dist.init_process_group("gloo")  # the rank's environment comes from run_ranks
    try:
        return {st: _run_sharding_type(st, rank) for st in SHARDING_TYPES}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharding_results() -> list[dict[str, Any]]:
    return run_ranks(_sharding_worker, WORLD)


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_sharded_embeddings_and_updates_match_unsharded_reference(
    sharding_results: list[dict[str, Any]], sharding_type: str
) -> None:
    for rank, results in enumerate(sharding_results):
        r = results[sharding_type]
        assert r["chosen"] == _table_types(sharding_type), r["chosen"]
        assert r["emb_err"] < EMB_ATOL, (rank, r)
        assert r["moved"] > 1e-3, (rank, r)  # the steps did change the weights...
        assert r["weight_err"] < WEIGHT_ATOL, (rank, r)  # ...as the reference did
    if sharding_type == "column_wise":
        assert sharding_results[0][sharding_type]["blocks"]["item_table"] == [128, 128]


def test_fbgemm_cpu_dense_kernel_sums_bags_despite_pooling_none() -> None:
    """Why data_parallel is off by default on CPU. If this starts failing, fbgemm fixed its CPU dense kernel:
    allow "dense" again in trainer.sharding._cpu_kernels and test data_parallel with list<list<T>> bags."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen

    tbe = DenseTableBatchedEmbeddingBagsCodegen([(10, 4)], pooling_mode=PoolingMode.NONE, use_cpu=True)
    weight = tbe.weights.detach().view(10, 4)
    out = tbe(torch.tensor([0, 1, 2, 5]), torch.tensor([0, 3, 3, 4]))  # bags [0, 1, 2], [], [5]
    assert out.shape == (3, 4)  # one row per bag, not one per id
    torch.testing.assert_close(out[0], weight[0] + weight[1] + weight[2])


# ---------------------------------------------------------------------------------------------------------
# Managed collisions (bucket 0): unbounded 63-bit ids, more distinct ids than capacity, 2 gloo ranks

MC_CAPACITY = 8  # 4 rows per rank
MC_FEATURES = [
    FeatureConfig(name="item_id", emb_dim=16, hash_bucket_size=50),
    FeatureConfig(name="behavior_id", emb_dim=16, hash_type="murmur", hash_bucket_size=0, mc_capacity=MC_CAPACITY,
                  mc_eviction_interval=1),
]  # fmt: skip
# Row-wise MC sharding sends an id to the rank owning its range of the 63-bit id space: 3 fresh ids per half
# fit the 4 rows of each rank.
HALF = 2**62
FIRST_IDS = [11, 2**40 + 5, HALF - 7, HALF + 3, HALF + 2**50, 2**63 - 2]


def _mc_kjt(behavior_ids: list[int], gen: torch.Generator) -> Any:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    n = len(behavior_ids)
    values = torch.cat([torch.randint(0, 50, (n,), generator=gen), torch.tensor(behavior_ids, dtype=torch.long)])
    return KeyedJaggedTensor.from_lengths_sync(["item_id", "behavior_id"], values, torch.ones(2 * n, dtype=torch.long))


def _mc_worker(rank: int) -> dict[str, Any]:
    import logging

    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.distributed.types import ShardingEnv

    from data.batch import SequenceBatch
    from model.config import ModelConfig
    from model.next_item import NextItemModel
    from model.sparse import SparseArch, managed_collision_stats
    from trainer.build import TrainStep
    from trainer.dist import DistContext
    from trainer.optim import build_optimizer
    from trainer.sharding import make_planner, make_sharders, prepare_for_planning, shard_model

    dist.init_process_group("gloo")
    result: dict[str, Any] = {}
    try:
        cfg = JobConfig(data=DataConfig(data_paths="unused", batch_size=2, seq_len=6, features=MC_FEATURES), optim=OPTIM)
        device = torch.device("cpu")
        gen = torch.Generator().manual_seed(rank)

        # Part 1: the bare sparse arch. Fresh ids are admitted at once (interval 1) into distinct rows.
        arch = SparseArch(MC_FEATURES, device=torch.device("meta"))
        prepare_for_planning(arch, WORLD)
        sharders = make_sharders(cfg, device)
        plan = make_planner(cfg, WORLD, WORLD, "cpu").collective_plan(arch, sharders, dist.group.WORLD)
        result["mc_plan"] = plan.plan["mc_embedding_collection"]["behavior_id"].sharding_type  # type: ignore[index]
        dmp = DistributedModelParallel(arch, env=ShardingEnv.from_process_group(dist.group.WORLD), device=device,
                                       plan=plan, sharders=sharders)  # fmt: skip
        with torch.no_grad():  # distinct rows, so distinct embeddings mean distinct rows
            for name, tensor in dmp.state_dict().items():
                if name.endswith("behavior_id.weight"):
                    for shard in tensor.local_shards():
                        shard.tensor.copy_(torch.randn(shard.tensor.shape, generator=torch.Generator().manual_seed(rank)))
        ids = FIRST_IDS + FIRST_IDS[::-1]  # each id twice
        out = dmp(_mc_kjt(ids, gen))[:, 16:]  # the behaviour half of each position
        out.sum().backward()
        result["first"] = out.detach()
        # Then many more distinct ids than rows: evictions.
        for step in range(6):
            fresh = torch.randint(1, 2**63 - 1, (20,), generator=torch.Generator().manual_seed(100 * step + rank))
            dmp(_mc_kjt(fresh.tolist(), gen)).sum().backward()
        result["bare_stats"] = managed_collision_stats(dmp)

        # Part 2: the trainer's path (shard_model + TrainPipelineSparseDist) with the MC-EC pipelined.
        records: list[str] = []

        class _Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        pipeline_logger = logging.getLogger("torchrec.distributed.train_pipeline.utils")
        pipeline_logger.setLevel(logging.INFO)
        pipeline_logger.addHandler(_Keep())
        model_cfg = ModelConfig(hidden_size=16, num_layers=1, nhead=2, dim_feedforward=16, dropout=0.0, emb_size=32)
        ctx = DistContext(rank, WORLD, rank, WORLD, device, "gloo", dist.group.WORLD)
        model = shard_model(TrainStep(NextItemModel(MC_FEATURES, model_cfg, device=torch.device("meta"))), cfg, ctx)
        pipeline = TrainPipelineSparseDist(model, build_optimizer(model, OPTIM), device)

        def batches() -> Any:
            for step in range(6):
                fresh = torch.randint(1, 2**63 - 1, (12,), generator=torch.Generator().manual_seed(7 * step + rank))
                kjt = _mc_kjt(fresh.tolist(), gen)
                items = kjt["item_id"].values().view(2, 6)
                yield SequenceBatch(kjt, torch.full((2,), 6), items)

        losses = []
        it = batches()
        while True:
            try:
                losses.append(float(pipeline.progress(it).loss))
            except StopIteration:
                break
        result["losses"] = losses
        result["pipelined"] = [r for r in records if "will be pipelined" in r]
        result["pipeline_stats"] = managed_collision_stats(model)
        return result
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def mc_results() -> list[dict[str, Any]]:
    return run_ranks(_mc_worker, WORLD)


def test_managed_collision_table_admits_ids_without_collisions_and_counts_evictions(
    mc_results: list[dict[str, Any]],
) -> None:
    for rank, r in enumerate(mc_results):
        assert r["mc_plan"] == "row_wise"
        first = r["first"]
        n = len(FIRST_IDS)
        # The same id twice embeds the same; six fresh ids (3 per rank's 4 rows) get six different rows.
        torch.testing.assert_close(first[:n], first[n:].flip(0))
        assert len({tuple(row.tolist()) for row in first[:n]}) == n, (rank, first[:n])
    admitted = sum(r["bare_stats"]["behavior_id"][0] for r in mc_results)
    evicted = sum(r["bare_stats"]["behavior_id"][1] for r in mc_results)
    assert admitted >= len(FIRST_IDS) and evicted > 0, (admitted, evicted)


def test_managed_collision_table_is_pipelined_in_the_trainer_path(mc_results: list[dict[str, Any]]) -> None:
    for r in mc_results:
        assert len(r["losses"]) == 6 and all(math.isfinite(x) for x in r["losses"]), r["losses"]
        assert any("mc_embedding_collection" in line for line in r["pipelined"]), r["pipelined"]
        assert any("sparse.embedding_collection" in line for line in r["pipelined"]), r["pipelined"]
    assert sum(r["pipeline_stats"]["behavior_id"][1] for r in mc_results) > 0
