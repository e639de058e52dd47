"""train.profile_steps: the setting's rules, and the traces of a real two-rank run (gloo ranks in processes),
which also writes rank 0's managed-collision counts to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.util import REPO_ROOT, run_ranks
from trainer.config import ConfigError, load_config, profile_window


def _args(sample: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--data.data_paths={sample}", f"--train.output_dir={out}", "--train.progress_bar=false",
        "--model.num_layers=1", "--model.hidden_size=32", "--model.nhead=1", "--model.dim_feedforward=32",
        "--train.train_epochs=0", "--train.log_steps=2", *extra,
    ]  # fmt: skip


def test_window_format() -> None:
    assert profile_window("") is None
    assert profile_window("20:25") == (20, 25)
    for bad in ("20", "25:20", "0:3", "a:b", "3:3", "1:2:3"):
        with pytest.raises(ConfigError, match="train.profile_steps"):
            profile_window(bad)
    with pytest.raises(ConfigError, match=r"train.profile_steps = '5-9'"):
        load_config(REPO_ROOT / "configs" / "default.toml", ["--train.profile_steps=5-9"])


def _train_rank(rank: int, args: list[str]) -> None:
    from trainer.dist import destroy_distributed, init_distributed
    from trainer.trainer import Trainer

    cfg = load_config(REPO_ROOT / "configs" / "default.toml", args)
    ctx = init_distributed("cpu")
    try:
        Trainer(cfg, ctx).train()
    finally:
        destroy_distributed()


def _op_names(path: Path) -> tuple[set[str], list[dict]]:
    events = json.loads(path.read_text())["traceEvents"]
    return {e.get("name", "") for e in events if e.get("cat") == "cpu_op"}, events


@pytest.mark.slow
def test_two_ranks_write_a_trace_each(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # behavior_id as a managed-collision feature: its admissions and evictions are summed over the ranks.
    mc = ["--data.features.2.hash_bucket_size=0", "--data.features.2.mc_capacity=64"]
    run_ranks(_train_rank, 2, (_args(sample_dir, out, "--train.train_steps=4", "--train.profile_steps=3:5", *mc),))

    traces = sorted((out / "profile").rglob("*.pt.trace.json"))
    assert [p.relative_to(out) for p in traces] == [
        Path("profile/steps_3-4/rank0.pt.trace.json"), Path("profile/steps_3-4/rank1.pt.trace.json")
    ]
    for path in traces:
        ops, events = _op_names(path)
        # The steps' real work: the embedding lookups' all-to-all, the transformer's matmuls, the backward.
        assert {"aten::mm", "aten::addmm"} & ops and any("backward" in n.lower() for n in ops), sorted(ops)[:50]
        assert any(n.startswith("c10d::") or "all_to_all" in n or "alltoall" in n for n in ops), sorted(ops)[:50]
        # Two traced steps (3 and 4; 2 was the untraced warmup), with shapes and memory recorded.
        steps = sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))
        assert steps == ["ProfilerStep#2", "ProfilerStep#3"], steps
        assert any("Input Dims" in e.get("args", {}) for e in events if e.get("cat") == "cpu_op")
        assert any(e.get("name") == "[memory]" for e in events)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    admitted = acc.Scalars("managed_collisions/behavior_id/admitted")
    assert [e.step for e in admitted] == [2, 4]
    assert admitted[-1].value > 0  # cumulative over both ranks
    assert [e.step for e in acc.Scalars("managed_collisions/behavior_id/evicted")] == [2, 4]
