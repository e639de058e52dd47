"""Leave-one-out evaluation on a hand-checkable model, on 1 and 2 gloo ranks (real sharding, real ORC files).

The model is made transparent: embedding width = hidden width, the input projection is the identity, every
transformer weight is zero except the LayerNorms' (ones). Each block then passes its input through and the
final LayerNorm only rescales zero-mean vectors, so a user's query is the embedding of their last history
item and the score of candidate c is cos(e_last, e_c). The item vectors below make those cosines easy to
read, and the expected ranks are computed here by plain loops over them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pytest
import torch

from data.config import DataConfig, FeatureConfig
from model.config import ModelConfig
from tests.util import start_ranks
from trainer.config import ConfigError, EvalConfig, JobConfig, TrainConfig, validate
from trainer.evaluator import _draw_excluding, eval_data_config, ranking_metrics

# Zero-mean rows (so LayerNorm only rescales them); cosines with row 0 are 1, .707, 0, -1, .5, -.5, 0, 0.
VECTORS = np.array(
    [
        [1, -1, 0, 0],
        [1, -1, 1, -1],
        [0, 0, 1, -1],
        [-1, 1, 0, 0],
        [1, 0, -1, 0],
        [0, 1, 0, -1],
        [1, 1, -1, -1],
        [-1, -1, 1, 1],
    ],
    dtype=np.float64,
)
# Two files of users (one per rank on two ranks, unequal on purpose: the ranks must stay in step).
FILES = [
    [[2, 0, 1], [3, 5, 4, 6], [7, 7, 2], [1, 4], [6, 3, 0, 5, 2]],
    [[5, 6, 0, 7], [0, 1], [4, 4, 4, 3]],
]
KS = [1, 3, 5]


# --------------------------------------------------------------------------------------------- pure parts


def test_ranking_metrics_by_hand() -> None:
    counts = np.zeros(30, dtype=np.int64)
    for rank in (0, 1, 3, 20):
        counts[rank] += 1
    m = ranking_metrics(counts, [1, 10])
    assert m["hr@1"] == 0.25
    assert m["hr@10"] == 0.75
    assert m["ndcg@1"] == 0.25
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 21) / 4)


def test_draw_excluding_avoids_history_and_repeats() -> None:
    candidates = np.arange(10)
    rng = np.random.default_rng(0)
    drawn = _draw_excluding(rng, candidates, np.array([1, 2, 3]), 7)
    assert sorted(drawn.tolist()) == [0, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="num_negatives"):
        _draw_excluding(rng, candidates, np.array([1, 2, 3]), 8)


def _job(data_paths: str = "x", **eval_kwargs: Any) -> JobConfig:
    features = [FeatureConfig(name="item_id", emb_dim=4, num_embeddings=len(VECTORS))]
    return JobConfig(
        data=DataConfig(data_paths=data_paths, batch_size=2, seq_len=3, truncate_side="right", features=features,
                        holdout_positions=2, read_threads=1),
        model=ModelConfig(hidden_size=4, num_layers=1, nhead=1, dim_feedforward=4, dropout=0.0, emb_size=4,
                          target_features=["item_id"]),
        train=TrainConfig(train_steps=1, eval_steps=1),
        eval=EvalConfig(ks=KS, best_metric="ndcg@3", item_chunk=3, **eval_kwargs),
    )  # fmt: skip


def test_eval_reader_settings() -> None:
    cfg = _job(split="valid")
    valid = eval_data_config(cfg)
    assert (valid.holdout_positions, valid.seq_len, valid.truncate_side, valid.shuffle) == (1, 4, "left", False)
    assert eval_data_config(_job(split="test")).holdout_positions == 0


def test_config_requires_item_only_targets_and_a_holdout() -> None:
    cfg = _job()
    cfg.data.features.append(FeatureConfig(name="cate_id", emb_dim=4, num_embeddings=3))
    cfg.model.emb_size = 8
    cfg.model.target_features = []
    with pytest.raises(ConfigError, match="model.target_features"):
        validate(cfg)
    cfg = _job()
    cfg.data.holdout_positions = 0
    with pytest.raises(ConfigError, match="data.holdout_positions"):
        validate(cfg)
    cfg = _job()
    cfg.eval.best_metric = "ndcg@10"
    with pytest.raises(ConfigError, match="eval.best_metric"):
        validate(cfg)


# ------------------------------------------------------------------------------------ expected, by loops


def _cos(a: int, b: int) -> float:
    u, v = VECTORS[a], VECTORS[b]
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def _expected_ranks(split: str, exclude_history: bool) -> list[int]:
    ranks = []
    for user in (u for f in FILES for u in f):
        if len(user) < 3:
            continue  # no validation target: not evaluated on either split
        seq = user if split == "test" else user[:-1]
        # The model reads the newest seq_len (3) items; "history" means those.
        history, target = seq[:-1][-3:], seq[-1]
        query = history[-1]
        above = 0
        for c in range(len(VECTORS)):
            if c == target or (exclude_history and c in history):
                continue
            above += _cos(query, c) > _cos(query, target) + 1e-9
        ranks.append(above)
    return ranks


def test_expected_ranks_by_hand() -> None:
    assert len(FILES[0][4]) > 3 + 1  # one user is longer than the window: truncation is exercised
    # The first user, [2, 0, 1]: query = item 0, target = item 1 (cos .707); only item 0 (cos 1) is above,
    # and item 0 is in the history.
    assert _expected_ranks("test", exclude_history=False)[0] == 1
    assert _expected_ranks("test", exclude_history=True)[0] == 0


# ---------------------------------------------------------------------------------------- distributed


def _write_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, users in enumerate(FILES):
        table = pa.table({"item_id": pa.array(users, pa.list_(pa.int64()))})
        orc.write_table(table, folder / f"part-{i}.orc")


def _make_transparent(dmp: Any) -> None:
    """Identity projection, zero transformer weights, unit LayerNorms, and VECTORS as the item table."""
    model = dmp.module.model
    with torch.no_grad():
        for name, p in model.dense.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        model.dense.proj.weight.copy_(torch.eye(4))
        for key, value in dmp.state_dict().items():
            if "embedding" not in key or not key.endswith("weight"):
                continue
            for shard in value.local_shards():
                rows, cols = shard.metadata.shard_offsets
                n, d = shard.tensor.shape
                shard.tensor.copy_(torch.from_numpy(VECTORS[rows : rows + n, cols : cols + d]).float())


def _worker(rank: int, data: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from model.next_item import NextItemModel
    from trainer.build import TrainStep
    from trainer.dist import destroy_distributed, init_distributed
    from trainer.evaluator import Evaluator
    from trainer.sharding import shard_model

    ctx = init_distributed("cpu", timeout_s=60)  # the rank's environment comes from start_ranks
    results = []
    try:
        base = _job(data)
        model = NextItemModel(base.data.features, base.model, torch.device("meta"), "item_id")
        dmp = shard_model(TrainStep(model), base, ctx)
        _make_transparent(dmp)
        for run in runs:
            cfg = _job(data, **run)
            evaluator = Evaluator(cfg, ctx, dmp)
            result = evaluator.run()
            results.append(result.to_json())
    finally:
        destroy_distributed()
    return results


RUNS = [
    {"split": "test"},
    {"split": "valid"},
    {"split": "test", "exclude_history": True},
    {"split": "test", "candidates": "data"},
    {"split": "test", "protocol": "sampled", "num_negatives": 3, "seed": 7},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """Rank 0's results of every run in RUNS, per world size.

    The 1-rank and the 2-rank job run side by side: the lone rank would leave a core idle otherwise.
    """
    data = tmp_path_factory.mktemp("data")
    _write_files(data)
    with start_ranks(_worker, 1, (str(data), RUNS)) as one, start_ranks(_worker, 2, (str(data), RUNS)) as two:
        return {1: one.results()[0], 2: two.results()[0]}


def _from_ranks(ranks: list[int]) -> dict[str, float]:
    return ranking_metrics(np.bincount(ranks, minlength=len(VECTORS)), KS)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize(
    "run, split, exclude", [(0, "test", False), (1, "valid", False), (2, "test", True)], ids=["test", "valid", "excl"]
)
def test_full_ranking_matches_the_hand_model(results: dict, world: int, run: int, split: str, exclude: bool) -> None:
    expected = _expected_ranks(split, exclude)
    got = results[world][run]
    assert got["num_users"] == len(expected)
    assert got["num_candidates"] == len(VECTORS)
    for name, value in _from_ranks(expected).items():
        assert got["metrics"][name] == pytest.approx(value, abs=1e-12), name


def test_data_candidates_are_the_items_that_occur(results: dict) -> None:
    # Every row 0..7 occurs in FILES, so "data" and "table" rank the same items.
    assert results[1][3]["num_candidates"] == len(VECTORS)
    assert results[1][3]["metrics"] == results[1][0]["metrics"]


def test_one_and_two_ranks_give_identical_numbers(results: dict) -> None:
    for one, two in zip(results[1], results[2], strict=True):
        assert one["metrics"] == two["metrics"]
        assert one["num_users"] == two["num_users"]


def test_both_splits_score_the_same_users(results: dict) -> None:
    assert results[1][0]["num_users"] == results[1][1]["num_users"] == sum(len(u) >= 3 for f in FILES for u in f)


def test_sampled_protocol_is_bounded_by_full_ranking(results: dict) -> None:
    sampled, full = results[1][4], results[1][0]
    assert sampled["protocol"] == "sampled, 3 negatives"
    assert sampled["num_users"] == full["num_users"]
    # 3 negatives out of the 7 other items: each target ranks at least as high as in the full ranking.
    for k in KS:
        assert sampled["metrics"][f"hr@{k}"] >= full["metrics"][f"hr@{k}"]
    assert sampled["metrics"]["hr@5"] == 1.0  # 4 candidates: every rank is < 5
