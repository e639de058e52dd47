"""TensorBoard scalars of a real run (one gloo rank in this process), read back from the event files, and of
its resume; training without the tensorboard package."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest

from data.sample import SampleParams, ensure_sample_data
from tests.util import tiny_leave_one_out
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DENSE_LR, SPARSE_LR, WARMUP = 2e-3, 0.04, 4


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_sample_data(tmp_path_factory.mktemp("sample"), SampleParams(users=300, files=1, rows_per_stripe=64))


def _cfg(sample_dir: Path, out: Path, *overrides: str):  # noqa: ANN202
    small = [
        *tiny_leave_one_out(sample_dir, out), "--train.train_epochs=0", "--train.log_steps=2",
        "--train.eval_steps=4", "--train.save_steps=4",
        f"--optim.dense_lr={DENSE_LR}", f"--optim.sparse_lr={SPARSE_LR}", f"--optim.warmup_steps={WARMUP}",
    ]  # fmt: skip
    return load_config(ROOT / "configs" / "default.toml", [*small, *overrides])


def _train(cfg) -> None:  # noqa: ANN001
    from trainer.dist import destroy_distributed, init_distributed
    from trainer.trainer import Trainer

    ctx = init_distributed("cpu")
    try:
        Trainer(cfg, ctx).train()
    finally:
        destroy_distributed()


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, as TensorBoard shows them (purged steps of an interrupted run left out); a step
    written twice fails the test."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    found: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)
        found[tag] = {e.step: e.value for e in events}
    return found


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scalars_of_a_run_and_of_its_resume(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(_cfg(sample_dir, out, "--train.train_steps=6"))  # checkpoints at 4 and 6
    # Resumed from step 4 as after a crash past it: steps 5 and 6 are trained and written again, and the
    # first run's values of step 6 must no longer show.
    _train(_cfg(sample_dir, out, "--train.train_steps=6", f"--train.resume_from={out / 'step_4'}"))

    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder, appended
    scalars = _scalars(out / "tensorboard")
    expected = {
        "train/loss", "train/hit_rate", "train/tokens_per_s", "train/samples_per_s", "train/peak_mem_gib",
        "train/grad_norm_dense", "optim/lr_dense", "optim/lr_sparse", "eval/valid_full/ndcg@10", "eval/valid_full/mrr",
    }  # fmt: skip
    assert expected <= set(scalars), sorted(scalars)
    for tag in ("train/loss", "train/grad_norm_dense", "optim/lr_dense", "train/tokens_per_s"):
        assert sorted(scalars[tag]) == [2, 4, 6], (tag, scalars[tag])

    # The same numbers as the log: the resumed run's lines are the last ones of each step.
    logged = {r["step"]: r for r in _jsonl(out / "metrics.jsonl")}
    for step, record in logged.items():
        assert scalars["train/loss"][step] == pytest.approx(record["loss"], rel=1e-6)
        assert scalars["train/hit_rate"][step] == pytest.approx(record["hit_rate"], rel=1e-6)
        assert scalars["train/peak_mem_gib"][step] == pytest.approx(record["peak_mem_gib"], rel=1e-6)
    assert all(math.isfinite(v) and v > 0 for v in scalars["train/loss"].values())
    assert all(math.isfinite(v) and v > 0 for v in scalars["train/grad_norm_dense"].values())
    assert all(v > 0 for v in scalars["train/tokens_per_s"].values())

    # The rates each logged step trained with: warmup over 4 steps, then the configured ones.
    for step, factor in ((2, 2 / WARMUP), (4, 1.0), (6, 1.0)):
        assert scalars["optim/lr_dense"][step] == pytest.approx(DENSE_LR * factor, rel=1e-6)
        assert scalars["optim/lr_sparse"][step] == pytest.approx(SPARSE_LR * factor, rel=1e-6)

    evaluated = {r["step"]: r["metrics"] for r in _jsonl(out / "eval.jsonl")}
    assert sorted(scalars["eval/valid_full/ndcg@10"]) == [4, 6]
    for step in (4, 6):
        assert scalars["eval/valid_full/ndcg@10"][step] == pytest.approx(evaluated[step]["ndcg@10"], rel=1e-6)


def test_switched_off_writes_nothing(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(_cfg(sample_dir, out, "--train.train_steps=2", "--train.eval_steps=0", "--train.tensorboard=false"))
    assert (out / "metrics.jsonl").is_file()
    assert not (out / "tensorboard").exists()


def test_missing_package_warns_once_and_training_goes_on(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As on the lent GPU machine: importing tensorboard fails (None in sys.modules makes `import` raise).
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        _train(_cfg(sample_dir, out, "--train.train_steps=4", "--train.eval_steps=0"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    warnings = [message for message in warned if "tensorboard" in message]
    assert len(warnings) == 1, warnings
    assert "train.tensorboard = false" in warnings[0] and "pip install tensorboard==" in warnings[0]
    assert [r["step"] for r in _jsonl(out / "metrics.jsonl")] == [2, 4]
    assert not (out / "tensorboard").exists()
