"""The one place that builds the model from a job config, and the module the trainer shards.

Training, evaluation, the sharding dry run, export and both benchmarks build through here, so they can never
disagree on what the model is (which features, which item feature, which dense settings).
"""

from __future__ import annotations

import torch
from torch import nn

from data.batch import SequenceBatch
from model.next_item import NextItemModel, NextItemOutput
from trainer.config import JobConfig


def build_model(cfg: JobConfig, device: torch.device | None = None) -> NextItemModel:
    """The model of ``cfg``: on ``meta`` for sharding (DMP materialises each rank's own shards), on the CPU
    (default) for export and single-process use."""
    return NextItemModel(
        cfg.data.features, cfg.model, device=device, item_feature=cfg.data.item_feature,
        max_len=cfg.data.seq_len, with_time=bool(cfg.data.time_feature),
    )  # fmt: skip


class TrainStep(nn.Module):
    """Adapts the model's named output to the ``(loss, output)`` pair the TorchRec pipeline expects. It is the
    module DMP wraps, so its parameter names (``model.``...) are those of every checkpoint."""

    def __init__(self, model: NextItemModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: SequenceBatch) -> tuple[torch.Tensor, NextItemOutput]:
        out = self.model(batch)
        return out.loss, out


def build_train_module(cfg: JobConfig) -> TrainStep:
    """The model on ``meta``, wrapped for the pipeline: what ``trainer.sharding.shard_model`` takes."""
    return TrainStep(build_model(cfg, torch.device("meta")))
