"""End to end through the real launchers: torchx (as ./launch.sh uses it) and torchrun, two gloo ranks.

Each test spawns real processes; together they take about a minute on two cores.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.orc as orc
import pytest

from tests.util import VENV_BIN, python_module, run_job, torchrun

# Generous: two ranks importing torchrec on two cores take ~15 s before the first step.
JOB_TIMEOUT_S = 240

pytestmark = pytest.mark.slow


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """The job's exit code and output, and how long it ran (some tests bound how fast a failure ends it)."""
    start = time.monotonic()
    proc = run_job(cmd, timeout_s=JOB_TIMEOUT_S)
    return proc, time.monotonic() - start


def _torchrun(*trainer_args: str) -> list[str]:
    return torchrun(*trainer_args, nproc=2)


def _losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_two_ranks_through_torchx_loss_falls(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
        "trainer/component.py:train", "--config", "configs/default.toml", "--nproc_per_node", "2", "--cpu", "2",
        "--", f"--data.data_paths={sample_dir}", f"--train.output_dir={out}",
        "--train.train_steps=30", "--train.log_steps=5",
    ]  # fmt: skip
    proc, _ = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = _losses(out)
    assert len(losses) == 6
    # First window vs last window: a falling loss, by a margin no noise explains.
    assert losses[-1] < losses[0] - 0.5, losses
    logs = proc.stdout + proc.stderr
    assert "finished after 30 steps" in logs
    assert "EXACT_ROWWISE_ADAGRAD" in logs  # the CPU fallback is announced
    # Both ranks finished and the resolved config was written next to the outputs.
    assert logs.count("finished after 30 steps") == 2
    assert (out / "config.toml").is_file()


def test_epoch_run_on_unbalanced_ranks_ends_together(sample_dir: Path, tmp_path: Path) -> None:
    # 4 files x stripes of 64 rows split over 2 ranks: the ranks hold different numbers of batches, and
    # the run must still end on both (no rank waiting forever in a collective for the other).
    out = tmp_path / "run"
    proc, elapsed = _run(
        _torchrun(
            "--config", "configs/default.toml", f"--data.data_paths={sample_dir}", f"--train.output_dir={out}",
            "--train.train_steps=0", "--train.train_epochs=1", "--data.batch_size=48", "--model.num_layers=1",
        )
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("finished after") == 2


def test_bad_config_key_fails_fast_with_the_key(tmp_path: Path) -> None:
    proc, elapsed = _run(_torchrun("--config", "configs/default.toml", "--model.num_layer=3"))
    assert proc.returncode != 0
    assert "model.num_layer" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 60


def test_missing_data_path_fails_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    proc, elapsed = _run(_torchrun("--config", "configs/default.toml", f"--data.data_paths={missing}"))
    assert proc.returncode != 0
    assert str(missing) in proc.stderr
    assert elapsed < 120


def test_one_rank_failing_mid_run_stops_the_job(sample_dir: Path, tmp_path: Path) -> None:
    # Two files, one per rank; rank 1's file holds a negative item id deep inside, so rank 1 fails after
    # training has started while rank 0 waits in a collective. The job must end, non-zero, naming the file.
    data = tmp_path / "data"
    data.mkdir()
    table = orc.ORCFile(sorted(sample_dir.glob("*.orc"))[0]).read()
    orc.write_table(table, data / "part-0.orc")
    items = table.column("item_id").to_pylist()
    items[200] = [[-5] for _ in items[200]]
    bad = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(items, table.schema.field("item_id").type))
    orc.write_table(bad, data / "part-1.orc")

    proc, elapsed = _run(
        _torchrun(
            "--config", "configs/default.toml", f"--data.data_paths={data}", f"--train.output_dir={tmp_path / 'o'}",
            "--train.train_steps=0", "--train.train_epochs=3", "--data.read_threads=1", "--data.prefetch=1",
        )
    )  # fmt: skip
    assert proc.returncode != 0
    assert "part-1.orc" in proc.stderr and "item_id" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < JOB_TIMEOUT_S


def test_periodic_evaluation_marks_the_best_checkpoint_and_the_cli_agrees(sample_dir: Path, tmp_path: Path) -> None:
    # Leave-one-out training with validation every 10 steps on 2 ranks; then `python -m trainer.evaluate`
    # on 1 rank must reproduce the logged validation numbers of the best checkpoint exactly.
    out = tmp_path / "run"
    settings = [
        "--config", "configs/default.toml", f"--data.data_paths={sample_dir}", "--data.holdout_positions=2",
        '--model.target_features=["item_id"]', "--model.num_negatives=64", "--eval.ks=[1,10]",
        "--eval.best_metric=hr@10", "--eval.candidates=data",
    ]  # fmt: skip
    proc, _ = _run(
        _torchrun(
            # 25 steps: the last evaluation comes after a step that is no multiple of eval_steps.
            *settings, f"--train.output_dir={out}", "--train.train_steps=25", "--train.eval_steps=10",
            "--train.save_steps=5", "--train.max_to_keep=1", "--model.num_layers=1",
        )
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20, 25]
    best = json.loads((out / "best.json").read_text())
    best_eval = max(evals, key=lambda e: e["metrics"]["hr@10"])
    assert best["step"] == best_eval["step"] and best["metric"] == "hr@10"
    checkpoint = Path(best["checkpoint"])
    # Pruning to max_to_keep = 1 keeps the best checkpoint next to the newest one.
    assert (checkpoint / "COMPLETE").is_file() and (out / "step_25" / "COMPLETE").is_file()

    proc, _ = _run(
        python_module("trainer.evaluate", *settings, "--model.num_layers=1", "--checkpoint", str(checkpoint),
                      "--eval.split=valid", "--out", str(tmp_path / "valid.json"))
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads((tmp_path / "valid.json").read_text())
    assert cli["metrics"] == best_eval["metrics"]
    assert cli["num_users"] == best_eval["num_users"] > 0

    # The run folder alone: its best checkpoint, evaluated with the config saved in it (no --config, no
    # overrides but the split); stdout's line names the split and protocol.
    proc, _ = _run(python_module("trainer.evaluate", "--checkpoint", str(out), "--eval.split=valid"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"config: {checkpoint / 'config.toml'} (the checkpoint's own" in proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == {"split": "valid", "protocol": "full", **best_eval["metrics"]}
