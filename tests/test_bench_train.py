"""Smoke test of the training benchmark: both paths train on tiny shapes and are the same model."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import pytest
import torch

from bench.baseline import BaselinePath, plain_contrastive_loss
from bench.bench_train import TrainerPath, copy_trainer_weights
from bench.train_shape import Shape, model_config, synthetic_batches
from model.loss import NegativeSpec, reference_loss

TINY = Shape(
    batch=4, seq_len=12, emb_dim=8, item_rows=500, cate_rows=16, behavior_rows=4, timestamp_rows=300,
    hidden=16, layers=2, heads=2, ffn=32, dropout=0.0, max_values=2, num_batches=3, log_steps=2,
    in_batch_negatives="all",
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


def test_trainer_path_trains_with_sampled_negatives(restore_environ: None) -> None:
    shape = dataclasses.replace(TINY, in_batch_negatives="sampled", num_in_batch_negatives=5, in_batch_group_size=3)
    batches = synthetic_batches(shape)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TrainerPath(shape, batches, tmp)
        try:
            losses = [float(trainer.step()) for _ in range(4)]
        finally:
            trainer.close()
    baseline = BaselinePath(shape, batches)
    losses += [float(baseline.step()) for _ in range(2)]
    assert all(math.isfinite(x) and x > 0 for x in losses), losses


def test_baseline_sampled_loss_is_the_projects_loss_written_plainly() -> None:
    shape = dataclasses.replace(TINY, in_batch_negatives="sampled", num_in_batch_negatives=7, in_batch_group_size=3,
                                mask_same_item=True, temperature=0.3)  # fmt: skip
    cfg = model_config(shape)
    torch.manual_seed(0)
    hidden, targets = torch.randn(3, 6, 16), torch.randn(3, 6, 16)
    lengths, items = torch.tensor([6, 4, 5]), torch.randint(0, 4, (3, 6))
    items[1, 4:] = -1
    items[2, 5:] = -1
    torch.manual_seed(1)
    plain = plain_contrastive_loss(hidden, targets, lengths, items, cfg)
    valid = (torch.arange(5) < (lengths.unsqueeze(1) - 1)) & (items[:, 1:] >= 0)
    q, k, ids = hidden[:, :-1][valid], targets[:, 1:][valid], items[:, 1:][valid]
    torch.manual_seed(1)  # the same draws: [ceil(P / group), K] uniform rows
    sampled = torch.randint(0, q.shape[0], (-(-q.shape[0] // 3), 7))
    spec = NegativeSpec("sampled", num_sampled=7, group_size=3, mask_same_item=True)
    expected = reference_loss(q, k, ids, spec, 0.3, sampled=sampled)
    assert plain.item() == pytest.approx(expected.loss.item(), rel=1e-5)


def test_a_batch_that_does_not_fit_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing as mp

    from bench import bench_train

    def out_of_memory(*_args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB\nmore")

    monkeypatch.setattr(bench_train, "_serve", out_of_memory)
    parent, child = mp.Pipe()
    bench_train._worker("trainer", TINY, 0, child)
    message = parent.recv()
    assert message["error"].startswith("out of memory (CUDA out of memory. Tried to allocate 80.00 GiB")
