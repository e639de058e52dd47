"""Training to convergence without guessing a step count: the reader's epoch estimate, evaluation every so
many epochs, early stopping on the validation metric (resumable), and evaluation of a run's best checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from data.reader import SequenceReader
from data.sample import SampleParams, ensure_sample_data
from tests.util import tiny_leave_one_out
from trainer.checkpoint import MARKER
from trainer.config import ConfigError, load_config
from trainer.run_folder import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_sample_data(tmp_path_factory.mktemp("sample"), SampleParams(users=600, files=2, rows_per_stripe=64))


def _cfg(sample_dir: Path, out: Path, *overrides: str):  # noqa: ANN202
    leave_one_out = [
        *tiny_leave_one_out(sample_dir, out), "--train.train_steps=0", "--train.train_epochs=1", "--train.log_steps=1000",
    ]
    return load_config(ROOT / "configs" / "default.toml", [*leave_one_out, *overrides])


def test_epoch_estimate_matches_an_epoch_of_batches(sample_dir: Path, tmp_path: Path) -> None:
    for drop in ("true", "false"):
        cfg = _cfg(sample_dir, tmp_path, f"--data.drop_remainder={drop}", "--data.batch_size=32")
        reader = SequenceReader(cfg.data, epochs=1)
        assert reader.total_rows == 600
        assert reader.estimated_batches_per_epoch() == len(list(reader))  # no user is skipped in this data


def test_early_stop_when_validation_stops_improving(sample_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from trainer.dist import destroy_distributed, init_distributed
    from trainer.trainer import Trainer

    out = tmp_path / "run"
    # Learning rates too small to move the scores: the first evaluation stays the best one.
    cfg = _cfg(sample_dir, out, "--train.train_epochs=100", "--train.eval_epochs=0.25", "--train.early_stop_patience=2",
               "--train.save_steps=4", "--optim.dense_lr=1e-12", "--optim.sparse_lr=1e-12", "--model.dropout=0.0")  # fmt: skip
    ctx = init_distributed("cpu")
    try:
        with caplog.at_level(logging.INFO, logger="trainer"):
            trainer = Trainer(cfg, ctx)
            assert trainer.eval_interval == 4  # a quarter of the 18 batches of an epoch (600 users, batch 32)
            last = trainer.train()
    finally:
        destroy_distributed()
    # Evaluations at steps 4 (the best), 8 and 12: two without improvement, then stop.
    assert last == 12
    assert "early stop at step 12" in caplog.text and "has not improved for 2 evaluations" in caplog.text
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == 4 and best["checkpoint"].endswith("step_4")
    # Evaluating the run folder means its best checkpoint.
    assert resolve_checkpoint(out) == Path(best["checkpoint"])


def test_resolve_checkpoint_of_folders(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (10, 20):
        (run / f"step_{step}").mkdir(parents=True)
        (run / f"step_{step}" / MARKER).write_text("")
    assert resolve_checkpoint(run / "step_10") == run / "step_10"
    assert resolve_checkpoint(run) == run / "step_20"  # no best.json: the latest
    assert resolve_checkpoint(str(run)) == run / "step_20"  # a folder as typed
    (run / "best.json").write_text(json.dumps({"metric": "ndcg@10", "value": 0.1, "step": 10,
                                               "checkpoint": str(run / "step_10")}))  # fmt: skip
    assert resolve_checkpoint(run) == run / "step_10"
    with pytest.raises(FileNotFoundError, match="neither a checkpoint nor a run folder"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_schedule_settings_are_checked(sample_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        _cfg(sample_dir, tmp_path, "--train.eval_steps=5", "--train.eval_epochs=1.0", "--train.train_epochs=1")
    with pytest.raises(ConfigError, match="early_stop_patience stops on the validation metric"):
        _cfg(sample_dir, tmp_path, "--train.early_stop_patience=3", "--train.train_epochs=1")
