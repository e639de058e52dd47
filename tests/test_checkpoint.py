"""Checkpoints and failure behaviour, with real processes: torchrun, gloo, DCP files on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.util import REPO_ROOT, launched, run_job, torchrun
from trainer.checkpoint import MARKER, MC_STATE, signature, signature_differences
from trainer.config import load_config

TIMEOUT_S = 240
# Exact resume: the same batches, RNG streams and optimizer states give bit-identical losses on CPU;
# 1e-6 leaves room only for a different summation order, which would itself be a bug to look at.
RESUME_TOLERANCE = 1e-6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_step_run(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rank, two steps, a checkpoint at step 2: the starting point of several tests (copied, not shared)."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    done = _run(1, _args(sample_dir, out, "--train.train_steps=2", "--train.save_steps=2"))
    assert done.returncode == 0, done.stdout[-3000:]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _args(sample: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", "configs/default.toml", f"--data.data_paths={sample}", f"--train.output_dir={out}",
        "--train.log_steps=1", "--train.progress_bar=false", "--model.num_layers=1", *extra,
    ]  # fmt: skip


def _run(nproc: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    """A torchrun job of ``nproc`` ranks to its end; its log (stderr with stdout) in ``.stdout``."""
    return run_job(torchrun(*args, nproc=nproc), timeout_s=TIMEOUT_S, merge_stderr=True)


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("step_*") if (p / MARKER).is_file())


def test_exact_resume_matches_a_straight_run(sample_dir: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--train.save_steps=4", "--train.train_epochs=0"]
    first = _run(2, _args(sample_dir, straight, "--train.train_steps=8", *common))
    assert first.returncode == 0, first.stdout[-3000:]
    half = _run(2, _args(sample_dir, resumed, "--train.train_steps=4", *common))
    assert half.returncode == 0, half.stdout[-3000:]
    rest = _run(2, _args(sample_dir, resumed, "--train.train_steps=8", *common))
    assert rest.returncode == 0, rest.stdout[-3000:]
    assert "resumed from" in rest.stdout and "at step 4" in rest.stdout

    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= RESUME_TOLERANCE, {s: (a[s], b[s]) for s in a}
    assert _checkpoints(resumed) == ["step_4", "step_8"]


# Bucket-0 (managed-collision) features: behavior_id as in configs/seq2seq.toml, with a few rows; timestamp with
# far more distinct ids than its 64 rows, admitted every 3 steps, so that evictions happen and the step-4
# checkpoint falls between two admission rounds (ids seen at step 4 wait for the round at step 6).
MC_ARGS = [
    "--data.features.2.hash_bucket_size=0", "--data.features.2.mc_capacity=8",
    "--data.features.3.hash_bucket_size=0", "--data.features.3.mc_capacity=64",
    "--data.features.3.mc_eviction_interval=3", "--train.train_epochs=0", "--train.save_steps=4",
]  # fmt: skip
_MC_TOTALS = re.compile(r"(\w+) ([\d,]+) admitted, ([\d,]+) evicted")


def _mc_totals(log: str) -> dict[str, tuple[int, int]]:
    """``{table: (admitted, evicted)}`` over all ranks, from the last managed-collision line of a job's log."""
    line = [line for line in log.splitlines() if "managed collisions (all ranks):" in line][-1]
    return {t: (int(a.replace(",", "")), int(e.replace(",", ""))) for t, a, e in _MC_TOTALS.findall(line)}


def _mc_state(checkpoint: Path, rank: int) -> dict[str, dict[str, object]]:
    import torch

    return torch.load(checkpoint / f"rank_{rank}.pt", weights_only=False)[MC_STATE]


@pytest.fixture(scope="module")
def mc_runs(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """8 straight steps, and 4 steps + resume + 4 steps, of a config with two bucket-0 features (2 ranks)."""
    root = tmp_path_factory.mktemp("mc")
    straight, resumed = root / "straight", root / "resumed"
    logs = {}
    for name, out, steps in (("straight", straight, 8), ("half", resumed, 4), ("rest", resumed, 8)):
        done = _run(2, _args(sample_dir, out, f"--train.train_steps={steps}", *MC_ARGS))
        assert done.returncode == 0, done.stdout[-3000:]
        logs[name] = done.stdout
    return {"straight": straight, "resumed": resumed, "logs": logs}


def test_exact_resume_with_managed_collision_tables(mc_runs: dict[str, object]) -> None:
    import torch

    straight, resumed, logs = mc_runs["straight"], mc_runs["resumed"], mc_runs["logs"]
    assert isinstance(straight, Path) and isinstance(resumed, Path) and isinstance(logs, dict)
    assert "resumed from" in logs["rest"] and "at step 4" in logs["rest"]
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= RESUME_TOLERANCE, {s: (a[s], b[s]) for s in a}

    totals = _mc_totals(logs["straight"])
    assert totals["timestamp"][1] > 0, totals  # evictions happened, so the mapping changed during the run
    assert totals["behavior_id"][0] > 0, totals
    assert _mc_totals(logs["rest"]) == totals
    # What the sharded state dict lacks ends up the same on every rank as well: counters, pending ids, schedule.
    for rank in range(2):
        want, got = _mc_state(straight / "step_8", rank), _mc_state(resumed / "step_8", rank)
        assert len(want) == 2, want.keys()
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"rank {rank}: managed-collision state differs")
    pending = _mc_state(resumed / "step_4", 0)
    assert any(s["history"].numel() for s in pending.values()), "step 4 should hold ids awaiting step 6's round"


def test_checkpoint_without_managed_collision_state_still_loads(
    sample_dir: Path, mc_runs: dict[str, object], tmp_path: Path
) -> None:
    """A checkpoint of an older version (no managed-collision entry in rank_<r>.pt) resumes, with a warning."""
    import torch

    resumed = mc_runs["resumed"]
    assert isinstance(resumed, Path)
    out = tmp_path / "run"
    shutil.copytree(resumed / "step_4", out / "step_4")
    for rank in range(2):
        path = out / "step_4" / f"rank_{rank}.pt"
        state = torch.load(path, weights_only=False)
        del state[MC_STATE]
        torch.save(state, path)
    done = _run(2, _args(sample_dir, out, "--train.train_steps=5", *MC_ARGS))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "holds no managed-collision counters" in done.stdout and "at step 4" in done.stdout
    assert done.stdout.count("holds no managed-collision counters") == 1  # rank 0 alone


def test_managed_collision_checkpoint_on_fewer_ranks_only(
    sample_dir: Path, mc_runs: dict[str, object], tmp_path: Path
) -> None:
    straight, logs = mc_runs["straight"], mc_runs["logs"]
    assert isinstance(straight, Path) and isinstance(logs, dict)
    out = tmp_path / "one"
    # 2 ranks -> 1: the two shards of each table merge; rank 0 carries on the counters of both old ranks.
    one = _run(1, _args(sample_dir, out, "--train.train_steps=5", f"--resume-from={straight / 'step_4'}", *MC_ARGS))
    assert one.returncode == 0, one.stdout[-3000:]
    assert "managed-collision tables resharded from 2 ranks" in one.stdout
    at_4 = _mc_totals(logs["half"])
    assert all(_mc_totals(one.stdout)[t][0] >= at_4[t][0] for t in at_4), (_mc_totals(one.stdout), at_4)
    # 1 rank -> 2 would split a shard: a clear error before anything loads.
    two = _run(2, _args(sample_dir, out, "--train.train_steps=6", *MC_ARGS))
    assert two.returncode != 0
    assert "load only on a number of ranks that divides 1" in two.stdout, two.stdout[-3000:]


def test_export_refuses_managed_collision_tables(mc_runs: dict[str, object], tmp_path: Path) -> None:
    from trainer.export import export

    straight = mc_runs["straight"]
    assert isinstance(straight, Path)
    with pytest.raises(ValueError, match=r"managed-collision \(bucket 0\) features \['behavior_id', 'timestamp'\]"):
        export(straight / "step_8", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_resume_on_another_world_size(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    two = _run(2, _args(sample_dir, out, "--train.train_steps=3", "--train.save_steps=3"))
    assert two.returncode == 0, two.stdout[-3000:]
    one = _run(1, _args(sample_dir, out, "--train.train_steps=5", "--train.save_steps=5"))
    assert one.returncode == 0, one.stdout[-3000:]
    assert "written by 2 ranks, this run has 1" in one.stdout
    assert "resumed from" in one.stdout
    assert _checkpoints(out) == ["step_3", "step_5"]

    # Back to the 2-rank checkpoint, on 2 ranks with another sharding plan (row-wise tables by default).
    other_plan = _run(
        2,
        _args(sample_dir, out, "--train.train_steps=5", "--train.save_steps=5", f"--resume-from={out / 'step_3'}",
              "--train.output_dir=" + str(tmp_path / "replanned"),
              '--data.features.0.sharding_types=["table_wise"]', '--data.features.3.sharding_types=["column_wise"]'),
    )  # fmt: skip
    assert other_plan.returncode == 0, other_plan.stdout[-3000:]
    assert "table_wise" in other_plan.stdout and "resumed from" in other_plan.stdout
    assert "written by" not in other_plan.stdout  # same world size: data position and RNG restored too


def test_incompatible_checkpoint_names_what_differs(sample_dir: Path, two_step_run: Path, tmp_path: Path) -> None:
    out = _copy(two_step_run, tmp_path)
    bad = _run(1, _args(sample_dir, out, "--train.train_steps=4", "--data.features.0.hash_bucket_size=4096"))
    assert bad.returncode != 0
    assert "does not fit this config" in bad.stdout and "'item_id' rows: 2048 in the checkpoint, 4096 now" in bad.stdout


def test_signature_differences_lists_every_change() -> None:
    cfg = load_config(REPO_ROOT / "configs" / "default.toml")
    other = load_config(REPO_ROOT / "configs" / "default.toml", ["--model.num_layers=3", "--data.features.3.name=ts"])
    diffs = signature_differences(signature(cfg), signature(other))
    assert "model.num_layers: 2 in the checkpoint, 3 now" in diffs
    assert "table 'timestamp' is in the checkpoint but not in the config" in diffs


def test_failed_checkpoint_write_keeps_the_previous_one(sample_dir: Path, two_step_run: Path, tmp_path: Path) -> None:
    out = _copy(two_step_run, tmp_path)
    # A file where the next checkpoint's temporary folder must go: the write fails like on a full or
    # read-only disk (permission bits cannot be used: tests may run as root, which ignores them).
    blocker = out / ".tmp_step_4"
    blocker.write_text("in the way")
    failed = _run(1, _args(sample_dir, out, "--train.train_steps=4", "--train.save_steps=2"))
    assert failed.returncode != 0
    assert "writing checkpoint" in failed.stdout and "step_4 failed" in failed.stdout
    assert _checkpoints(out) == ["step_2"]
    blocker.unlink()
    again = _run(1, _args(sample_dir, out, "--train.train_steps=4", "--train.save_steps=2"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resumed from" in again.stdout and _checkpoints(out) == ["step_2", "step_4"]


def test_nonfinite_loss_stops_naming_the_step(sample_dir: Path, two_step_run: Path, tmp_path: Path) -> None:
    out = _copy(two_step_run, tmp_path)
    # A temperature this small turns the cosine logits into inf, and the cross-entropy into NaN.
    nan = _run(1, _args(sample_dir, out, "--train.train_steps=4", "--train.save_steps=2", "--train.log_steps=10",
                        "--model.temperature=1e-45"))  # fmt: skip
    assert nan.returncode != 0
    assert "not finite at step 3" in nan.stdout
    assert _checkpoints(out) == ["step_2"]


def _rank_pid(rank: int, out: Path) -> int:
    """PID of the trainer process of ``rank`` writing into ``out`` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainer.main" in cmdline and str(out).encode() in b" ".join(cmdline) and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no trainer process for rank {rank}")


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert proc.poll() is None, "the job ended before the checkpoint appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.5)


@pytest.mark.parametrize("max_restarts", [0, 1])
def test_killed_rank(sample_dir: Path, tmp_path: Path, max_restarts: int) -> None:
    out = tmp_path / "run"
    steps = "--train.train_steps=60" if max_restarts else "--train.train_steps=100000"
    args = _args(sample_dir, out, steps, "--train.save_steps=20", "--train.train_epochs=0")
    with launched(torchrun(*args, nproc=2, max_restarts=max_restarts), stderr=subprocess.STDOUT) as proc:
        _wait_for(out / "step_20", proc)
        os.kill(_rank_pid(1, out), signal.SIGKILL)
        start = time.monotonic()
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    if max_restarts == 0:
        # The surviving rank does not wait out the collective timeout: torchrun stops it.
        assert proc.returncode != 0
        assert time.monotonic() - start < 60
    else:
        errors = [line for line in output.splitlines() if " ERROR " in line or "Error" in line]
        assert proc.returncode == 0, "\n".join(errors[-20:]) + output[-2000:]
        assert "resumed from" in output
        assert _checkpoints(out)[-1] == "step_60"


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_reloads_to_the_same_scores(sample_dir: Path, tmp_path: Path, fmt: str) -> None:
    """Train in this process (one gloo rank), export, reload without TorchRec's distributed runtime, and
    compare the loss and in-batch scores of the trained sharded model with those of the reloaded one."""
    import torch

    from data.reader import SequenceReader
    from trainer.dist import destroy_distributed, init_distributed
    from trainer.export import export, load_exported
    from trainer.trainer import Trainer

    out = tmp_path / "run"
    overrides = _args(sample_dir, out, "--train.train_steps=3", "--train.save_steps=3")[2:]
    cfg = load_config(REPO_ROOT / "configs" / "default.toml", overrides)
    ctx = init_distributed("cpu")
    try:
        trainer = Trainer(cfg, ctx)
        trainer.train()
        batch = next(iter(SequenceReader(cfg.data)))
        trainer.pipeline.detach()  # give the sharded module its own forward back (the pipeline rewrote it)
        trainer.model.eval()
        with torch.no_grad():
            _, trained = trainer.model(batch)
    finally:
        destroy_distributed()

    files = export(out / "step_3", tmp_path / "export", fmt)  # type: ignore[arg-type]
    assert all(p.is_file() for p in files)
    served = load_exported(tmp_path / "export")
    with torch.no_grad():
        reloaded = served(batch)
    assert reloaded.loss.item() == pytest.approx(trained.loss.item(), rel=1e-5)
    assert reloaded.hits.item() == trained.hits.item()
