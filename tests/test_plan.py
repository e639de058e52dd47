"""The sharding dry run (trainer.plan) and the per-table constraints it shares with the trainer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.util import REPO_ROOT, python_module, run_job
from trainer.config import ConfigError, JobConfig, JobFeatureConfig, load_config
from trainer.plan import PlanDoesNotFitError, dry_run, main
from trainer.sharding import table_constraints

SEQ2SEQ = str(REPO_ROOT / "configs" / "seq2seq.toml")


def test_seq2seq_on_8_gpus_fits_with_behavior_id_row_wise_managed_collisions() -> None:
    report = dry_run(load_config(SEQ2SEQ), world_size=8, local_world_size=8, hbm_gb=80)
    tables = {t.table: t for t in report.tables}
    assert set(tables) == {"item_id", "cate_id", "behavior_id", "timestamp"}
    assert tables["behavior_id"].sharding_type == "row_wise"
    assert tables["behavior_id"].rows == 65536
    assert tables["item_id"].rows == 2_048_000 and tables["item_id"].dim == 128
    assert all(set(t.ranks) <= set(range(8)) and t.ranks for t in tables.values())
    assert report.sparse_optimizer == "partial_rowwise_adam"  # planned for CUDA
    assert all(0 < u.hbm_bytes < u.hbm_cap_bytes for u in report.ranks)
    assert report.estimate_ms > 0
    assert any("behavior_id" in note for note in report.notes)


def test_config_constraints_reach_the_planner(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([
        SEQ2SEQ, "--world-size", "4", "--local-world-size", "2", "--hbm-gb", "16", "--json",
        '--data.features.0.sharding_types=["table_wise"]',
        '--data.features.3.compute_kernels=["fused_uvm_caching"]', "--data.features.3.cache_load_factor=0.1",
    ])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    tables = {t["table"]: t for t in report["tables"]}
    assert tables["item_id"]["sharding_type"] == "table_wise" and len(tables["item_id"]["ranks"]) == 1
    assert tables["timestamp"]["compute_kernel"] == "fused_uvm_caching"
    assert tables["timestamp"]["ddr_bytes"] > 0  # the table itself lives in host memory (UVM)
    assert report["world_size"] == 4 and len(report["ranks"]) == 4


def test_tables_that_do_not_fit_are_named_with_the_capacity() -> None:
    with pytest.raises(PlanDoesNotFitError) as e:
        # Too little HBM alone is not enough: the planner then moves tables to host memory (UVM caching).
        dry_run(load_config(SEQ2SEQ), world_size=2, local_world_size=2, hbm_gb=0.5, ddr_gb=0.5)
    message = str(e.value)
    assert "do not fit" in message and "2 ranks x 0.5 GiB HBM and 0.5 GiB DDR" in message
    assert "item_id 2,048,000 x 128" in message and "timestamp" in message


@pytest.mark.slow
def test_cli_exit_codes_and_text_output() -> None:
    def plan(*args: str) -> subprocess.CompletedProcess[str]:
        return run_job(python_module("trainer.plan", SEQ2SEQ, *args), timeout_s=180)

    ok = plan("--world-size", "16", "--local-world-size", "8", "--hbm-gb", "80")
    assert ok.returncode == 0, ok.stderr
    assert "plan for 16 ranks (2 nodes x 8 GPUs)" in ok.stdout
    assert "behavior_id" in ok.stdout and "est. ms/step" in ok.stdout
    bad = plan("--world-size", "3", "--local-world-size", "2", "--hbm-gb", "80")
    assert bad.returncode == 2 and "--local-world-size" in bad.stderr


def test_table_constraints_per_device() -> None:
    features = [
        JobFeatureConfig(name="a", hash_bucket_size=10, pooling_factor=2.0, compute_kernels=["fused_uvm_caching"],
                         cache_load_factor=0.3),
        JobFeatureConfig(name="b", hash_bucket_size=10, shard_name="a", pooling_factor=2.0,
                         compute_kernels=["fused_uvm_caching"], cache_load_factor=0.3),
        JobFeatureConfig(name="m", hash_type="murmur", mc_capacity=64),
    ]  # fmt: skip
    cuda = table_constraints(features, "cuda")
    assert cuda["a"].compute_kernels == ["fused_uvm_caching"]
    assert cuda["a"].cache_params is not None and cuda["a"].cache_params.load_factor == 0.3
    assert cuda["a"].pooling_factors == [2.0, 2.0]  # one per feature reading the table
    assert cuda["m"].sharding_types == ["row_wise"]
    cpu = table_constraints(features, "cpu")
    # fbgemm's CPU kernels: only "fused" unless data_parallel is asked for (tests/test_sharding.py says why).
    assert cpu["a"].compute_kernels == ["fused"] and cpu["m"].compute_kernels == ["fused"]


def _config(tmp_path: Path, feature_lines: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f"""
[data]
data_paths = "x"

[[data.features]]
name = "item_id"
emb_dim = 8
hash_bucket_size = 100

[[data.features]]
name = "behavior_id"
emb_dim = 8
hash_type = "murmur"
{feature_lines}

[model]
emb_size = 16
hidden_size = 16
nhead = 2
"""
    )
    return path


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ("hash_bucket_size = 0", "set mc_capacity"),
        ('hash_bucket_size = 0\nmc_capacity = 64\nsharding_types = ["table_wise"]', "can only be row_wise"),
        ("hash_bucket_size = 16\nmc_capacity = 64", "mc_capacity applies only"),
        ('hash_bucket_size = 16\ncompute_kernels = ["uvm"]', "compute_kernels"),
        ("hash_bucket_size = 16\ncache_load_factor = 1.5", "cache_load_factor"),
        ("hash_bucket_size = 0\nmc_capacity = 64\nmc_eviction_interval = 0", "mc_eviction_interval"),
    ],
)
def test_sharding_and_managed_collision_settings_are_validated(tmp_path: Path, lines: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_config(tmp_path, lines))


def test_bucket_zero_with_capacity_is_a_managed_collision_table(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "hash_bucket_size = 0\nmc_capacity = 64"))
    behavior = cfg.data.features[1]
    assert behavior.managed_collision and behavior.table_rows == 64
    assert not cfg.data.features[0].managed_collision


# ------------------------------------------------------------------------------- what planning logs


def _plan_on_cpu(cfg: JobConfig) -> None:
    import torch

    from trainer.build import build_model
    from trainer.sharding import make_planner, make_sharders, prepare_for_planning

    model = build_model(cfg, torch.device("meta"))
    prepare_for_planning(model, 2)
    make_planner(cfg, 2, 2, "cpu").plan(model, make_sharders(cfg, torch.device("cpu")))


def test_cpu_planning_drops_only_torchrec_data_parallel_kernel_noise(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from trainer.sharding import quiet_cpu_kernel_gaps

    cfg = load_config(REPO_ROOT / "configs" / "default.toml")
    enumerators = logging.getLogger("torchrec.distributed.planner.enumerators")
    noise = "No available compute kernels after applying user provided constraints for {}"
    # On the enumerator's own logger: trainer.plan's main (run in-process above) turns "torchrec" down to ERROR.
    with caplog.at_level(logging.WARNING, logger=enumerators.name):
        _plan_on_cpu(cfg)
        # Without the filter: one warning per table, each about data_parallel under the CPU "fused" constraint.
        unfiltered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("No available compute")]
        assert len(unfiltered) == 4 and all("sharding type: data_parallel." in m for m in unfiltered)
        caplog.clear()
        with quiet_cpu_kernel_gaps("cpu"):
            _plan_on_cpu(cfg)
            # Anything else from the same logger still comes through.
            enumerators.warning(noise.format("t") + ". Constrained compute kernels: ['fused'], allowed compute "
                                "kernels: ['dense'], filtered compute kernels: [], sharding type: table_wise.")
            enumerators.warning("No available sharding types after applying user provided constraints for t.")
        kept = [r.getMessage() for r in caplog.records if r.name == enumerators.name]
        assert len(kept) == 2 and "sharding type: table_wise." in kept[0] and "sharding types" in kept[1]
        caplog.clear()
        _plan_on_cpu(cfg)  # the filter is gone after the block
        assert sum(r.getMessage().startswith("No available compute") for r in caplog.records) == 4


def test_sparse_optimizer_substitutions_are_notes_not_per_rank_warnings(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import torch

    from trainer.sharding import make_sharders, sparse_optimizer_name, sparse_optimizer_notes

    cfg = load_config(REPO_ROOT / "configs" / "seq2seq.toml")  # behavior_id is a managed-collision table
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="trainer.sharding"):
        make_sharders(cfg, cpu)  # every rank resolves the optimizers: it must not log (shard_model does, rank 0)
        assert sparse_optimizer_name(cfg.optim, cpu) == "exact_rowwise_adagrad"
    assert not caplog.records
    notes = sparse_optimizer_notes(cfg, cpu)
    assert len(notes) == 2
    assert "using EXACT_ROWWISE_ADAGRAD instead" in notes[0] and "using EXACT_ADAGRAD for them" in notes[1]
    assert sparse_optimizer_notes(cfg, cuda) == []
    assert sparse_optimizer_notes(load_config(REPO_ROOT / "configs" / "default.toml"), cpu) == notes[:1]
