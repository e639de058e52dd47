"""Smoke test of the training benchmark: both paths train on tiny shapes and are the same model."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

from bench.bench_train import BaselinePath, Shape, TrainerPath, copy_trainer_weights, synthetic_batches

TINY = Shape(
    batch=4, seq_len=12, emb_dim=8, item_rows=500, cate_rows=16, behavior_rows=4, timestamp_rows=300,
    hidden=16, layers=2, heads=2, ffn=32, dropout=0.0, max_values=2, num_batches=3, log_steps=2,
)  # fmt: skip


@pytest.fixture
def restore_environ():
    # init_distributed writes RANK, WORLD_SIZE, MASTER_PORT, ... for a one-rank job; later tests must not see them.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_trainer_and_baseline_are_the_same_model(restore_environ: None) -> None:
    batches = synthetic_batches(TINY)
    assert all(int(b.seq_lengths.min()) >= TINY.seq_len // 4 for b in batches)
    baseline = BaselinePath(TINY, batches)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TrainerPath(TINY, batches, tmp)
        try:
            copy_trainer_weights(trainer, baseline)
            trainer_losses = [float(trainer.step()) for _ in range(3)]
        finally:
            trainer.close()
    baseline_losses = [float(baseline.step()) for _ in range(3)]

    assert all(math.isfinite(x) for x in trainer_losses + baseline_losses), (trainer_losses, baseline_losses)
    # Same weights, same batch: the same loss before any update (later steps differ: the trainer's tables
    # use fbgemm's row-wise Adagrad on CPU, the baseline SparseAdam).
    assert trainer_losses[0] == pytest.approx(baseline_losses[0], rel=1e-5)
    # And the batches are what the model sees: padding is present and varies.
    assert any(int(b.seq_lengths.min()) < b.max_len for b in batches)
    assert torch.is_tensor(batches[0].item_ids) and (batches[0].item_ids < 0).any()
