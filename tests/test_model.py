"""Model pieces on a single process: loss against hand-computed cases, embeddings, shapes."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import SequenceBatch, negatives_key, with_negatives
from data.config import FeatureConfig
from model.config import ModelConfig
from model.loss import next_item_contrastive_loss, next_item_mask
from model.next_item import NextItemModel
from model.sparse import EMBEDDING_INIT_STD, SparseArch
from trainer.feed import NegativeSampler


def test_loss_pairs_position_t_with_target_t_plus_1() -> None:
    # One user, 3 positions. Queries at t=0,1 must be matched with targets at t=1,2 (the seed used the
    # reverse shift, which under causal attention rewards copying the input).
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    targets = torch.tensor([[[9.0, 9.0], [0.0, 1.0], [1.0, 0.0]]])
    out = next_item_contrastive_loss(hidden, targets, torch.tensor([3]), torch.tensor([[7, 8, 9]]))
    # Normalised queries [1,0],[0,1] vs keys [0,1],[1,0]: logits [[0,1],[1,0]], labels [0,1].
    assert out.loss.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert out.hits.item() == 0
    assert out.num_targets.item() == 2

    hot = next_item_contrastive_loss(hidden, targets, torch.tensor([3]), torch.tensor([[7, 8, 9]]), temperature=0.5)
    assert hot.loss.item() == pytest.approx(math.log(1 + math.e**2), rel=1e-6)


def test_loss_hits_when_queries_point_at_their_next_item() -> None:
    hidden = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [3.0, 3.0]]])
    targets = torch.tensor([[[2.0, 2.0], [0.0, 2.0], [3.0, 0.0]]])
    out = next_item_contrastive_loss(hidden, targets, torch.tensor([3]), torch.tensor([[1, 2, 3]]))
    assert out.hits.item() == 2
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_padding_is_neither_query_nor_target() -> None:
    torch.manual_seed(0)
    hidden, targets = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    lengths = torch.tensor([4, 2])
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1]])
    base = next_item_contrastive_loss(hidden, targets, lengths, ids)
    assert base.num_targets.item() == 3 + 1

    # Garbage in the padding of user 1 must change nothing.
    hidden2, targets2 = hidden.clone(), targets.clone()
    hidden2[1, 2:] = 1e3
    targets2[1, 2:] = -1e3
    other = next_item_contrastive_loss(hidden2, targets2, lengths, ids)
    assert other.loss.item() == pytest.approx(base.loss.item(), rel=1e-6)

    # And the loss equals the one computed by hand from the 4 real pairs only.
    q = torch.stack([hidden[0, 0], hidden[0, 1], hidden[0, 2], hidden[1, 0]])
    k = torch.stack([targets[0, 1], targets[0, 2], targets[0, 3], targets[1, 1]])
    logits = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).t()
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    assert base.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_next_item_mask_skips_positions_without_an_item() -> None:
    mask = next_item_mask(torch.tensor([4]), torch.tensor([[3, -1, 5, 6]]))
    assert mask.tolist() == [[False, True, True]]


def test_same_item_false_negatives_can_be_masked() -> None:
    # Two queries whose targets are the same item (id 9): without masking each is the other's negative.
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    targets = torch.tensor([[[0.0, 0.0], [1.0, 0.2]], [[0.0, 0.0], [1.0, 0.1]]])
    lengths, ids = torch.tensor([2, 2]), torch.tensor([[1, 9], [2, 9]])
    plain = next_item_contrastive_loss(hidden, targets, lengths, ids)
    masked = next_item_contrastive_loss(hidden, targets, lengths, ids, mask_same_item=True)
    assert plain.loss.item() > 0.5
    # With the duplicate masked out, each row holds a single candidate: its own target.
    assert masked.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert masked.hits.item() == 2


def test_empty_batch_gives_zero_loss_with_gradient() -> None:
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    out = next_item_contrastive_loss(hidden, hidden * 2, torch.tensor([1, 1]), torch.tensor([[1, -1, -1]] * 2))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.num_targets.item() == 0
    assert hidden.grad is not None


FEATURES = [
    FeatureConfig(name="item_id", emb_dim=4, hash_bucket_size=10),
    FeatureConfig(name="prev_item", emb_dim=4, hash_bucket_size=10, shard_name="item_id"),
    FeatureConfig(name="cate_id", emb_dim=4, hash_bucket_size=5),
]


def _kjt(values_per_feature: list[list[list[int]]]) -> KeyedJaggedTensor:
    """values_per_feature[f][bag] = ids of that bag (position)."""
    lengths = [len(bag) for feature in values_per_feature for bag in feature]
    values = [v for feature in values_per_feature for bag in feature for v in bag]
    return KeyedJaggedTensor(
        keys=[f.name for f in FEATURES],
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )


def test_sparse_arch_mean_pools_positions_and_shares_tables() -> None:
    arch = SparseArch(FEATURES)
    tables = dict(arch.embedding_collection.embeddings.named_children())
    assert sorted(tables) == ["cate_id", "item_id"]  # prev_item shares the item_id table
    with torch.no_grad():
        tables["item_id"].weight.copy_(torch.arange(40, dtype=torch.float32).view(10, 4))
        tables["cate_id"].weight.copy_(-torch.arange(20, dtype=torch.float32).view(5, 4))
    # 1 user x 3 positions: item [1], [2, 4], [] ; prev_item [], [1], [2] ; cate [0], [1, 2, 3], [4]
    kjt = _kjt([[[1], [2, 4], []], [[], [1], [2]], [[0], [1, 2, 3], [4]]])
    out = arch(kjt)
    assert out.shape == (3, 4 + 4 + 4)
    item = torch.arange(40.0).view(10, 4)
    cate = -torch.arange(20.0).view(5, 4)
    torch.testing.assert_close(out[0], torch.cat([item[1], torch.zeros(4), cate[0]]))
    torch.testing.assert_close(out[1], torch.cat([(item[2] + item[4]) / 2, item[1], (cate[1] + cate[2] + cate[3]) / 3]))
    torch.testing.assert_close(out[2], torch.cat([torch.zeros(4), item[2], cate[4]]))


def test_sparse_arch_initialises_with_truncated_normal() -> None:
    arch = SparseArch([FeatureConfig(name="item_id", emb_dim=64, hash_bucket_size=5000)])
    weight = arch.embedding_collection.embeddings["item_id"].weight
    assert weight.abs().max().item() <= 2 * EMBEDDING_INIT_STD + 1e-9
    assert weight.std().item() == pytest.approx(EMBEDDING_INIT_STD * 0.88, rel=0.05)  # std of N truncated at 2σ


def test_seq2seq_forward_backward_shapes() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=16, num_layers=2, nhead=2, dim_feedforward=32, dropout=0.0, emb_size=12)
    model = NextItemModel(FEATURES, cfg)
    # 2 users x T=3 positions; user 1 has 2 real positions.
    kjt = _kjt(
        [
            [[1], [2], [3], [4], [5], []],
            [[0], [1], [2], [3], [4], []],
            [[0], [1], [2], [3], [4], []],
        ]
    )
    batch = SequenceBatch(kjt, seq_lengths=torch.tensor([3, 2]), item_ids=torch.tensor([[1, 2, 3], [4, 5, -1]]))
    out = model(batch)
    assert out.num_targets.item() == 3 and out.num_tokens.item() == 5 and out.num_samples.item() == 2
    out.loss.backward()
    grads = [p.grad for p in model.dense.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_model_builds_on_meta_without_allocating() -> None:
    cfg = ModelConfig(hidden_size=1024, num_layers=8, nhead=8, dim_feedforward=1024, emb_size=512)
    big = [FeatureConfig(name=n, emb_dim=128, hash_bucket_size=2_048_000) for n in ("a", "b", "c", "d")]
    model = NextItemModel(big, cfg, device=torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())


# ------------------------------------------------------------------------ targets, negatives, seed bugs


def test_item_only_targets_use_the_input_projection_on_item_columns() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=8, num_layers=1, nhead=2, dim_feedforward=8, dropout=0.0, emb_size=12,
                      target_features=["item_id"])  # fmt: skip
    model = NextItemModel(FEATURES, cfg, item_feature="item_id")
    emb = torch.randn(6, 12)
    _, targets = model.dense.encode(emb, torch.Size([2, 3]))
    # What proj gives when every other feature's embedding is zero.
    only_item = emb.clone()
    only_item[:, 4:] = 0.0
    assert torch.allclose(targets, model.dense.proj(only_item).view(2, 3, 8), atol=1e-6)
    assert torch.allclose(model.dense.item_representation(emb[:, :4]), targets.view(6, 8), atol=1e-6)


def test_items_need_item_only_targets_for_a_representation() -> None:
    cfg = ModelConfig(hidden_size=8, num_layers=1, nhead=2, dim_feedforward=8, emb_size=12)
    model = NextItemModel(FEATURES, cfg)
    with pytest.raises(ValueError, match="target_features"):
        model.dense.item_representation(torch.zeros(1, 4))


def test_sampled_negatives_join_the_softmax_and_accidental_hits_are_masked() -> None:
    # One query [1, 0] with target [1, 0] (item 7); negatives [0, 1] (item 3) and [1, 0] (item 7 again).
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    targets = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    negatives = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    out = next_item_contrastive_loss(
        hidden, targets, torch.tensor([2]), torch.tensor([[5, 7]]), temperature=0.5,
        negatives=negatives, negative_ids=torch.tensor([3, 7]),
    )  # fmt: skip
    # Logits [1/0.5, 0/0.5, (masked)]: -log(e^2 / (e^2 + e^0)).
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    assert out.hits.item() == 1


def test_seed_loss_bugs_reproduce_the_seed() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    targets = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [9.0, 9.0]]])
    lengths, ids = torch.tensor([2]), torch.tensor([[7, 8, -1]])
    # copy_shift: the query at t+1 = 1 ([0, 1]) against the item at t = 0 ([0, 1]): one pair, one hit.
    shifted = next_item_contrastive_loss(hidden, targets, lengths, ids, seed_loss_bugs=("copy_shift",))
    assert shifted.num_targets.item() == 1 and shifted.hits.item() == 1
    # padding: every (t, t+1) pair of the padded grid enters, the pad position included.
    padded = next_item_contrastive_loss(hidden, targets, lengths, ids, seed_loss_bugs=("padding",))
    assert padded.num_targets.item() == 2


def test_model_with_sampled_negatives_trains_their_rows() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=8, num_layers=1, nhead=2, dim_feedforward=8, dropout=0.0, emb_size=12,
                      target_features=["item_id"], num_negatives=3, temperature=0.1)  # fmt: skip
    model = NextItemModel(FEATURES, cfg, item_feature="item_id")
    kjt = _kjt([[[1], [2], [3], [4]], [[0], [1], [2], [3]], [[0], [1], [2], [3]]])
    batch = SequenceBatch(kjt, seq_lengths=torch.tensor([2, 2]), item_ids=torch.tensor([[1, 2], [3, 4]]))
    batch = with_negatives(batch, negatives_key("item_id"), torch.tensor([8, 9, 2]))
    assert batch.sparse_features.keys()[-1] == "item_id.negatives"
    out = model(batch)
    out.loss.backward()
    grad = model.sparse.embedding_collection.embeddings["item_id"].weight.grad
    # Rows 8 and 9 appear only as negatives: they get gradient from the loss.
    assert grad[8].abs().sum() > 0 and grad[9].abs().sum() > 0


def test_a_batch_with_fewer_bags_than_negatives_carries_what_fits_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    kjt = _kjt([[[1], [2], [3], [4]], [[0], [1], [2], [3]], [[0], [1], [2], [3]]])
    batch = SequenceBatch(kjt, seq_lengths=torch.tensor([2, 2]), item_ids=torch.tensor([[1, 2], [3, 4]]))
    sampler = NegativeSampler(negatives_key("item_id"), count=6, rows=10, seed=0, rank=0, start_index=0)
    with caplog.at_level(logging.INFO, logger="trainer.feed"):
        first, second = sampler(batch), sampler(batch)
    # 2 users x 2 positions = 4 bags: 4 of the 6 draws, the first ones, ride along.
    assert first.negative_ids is not None and first.negative_ids.numel() == 4
    full = torch.from_numpy(np.random.default_rng([0, 0, 0]).integers(0, 10, size=6, dtype=np.int64))
    assert torch.equal(first.negative_ids, full[:4])
    assert second.negative_ids is not None and second.negative_ids.numel() == 4
    said = [r.getMessage() for r in caplog.records if "model.num_negatives = 6" in r.getMessage()]
    assert len(said) == 1 and "4 bags carries 4" in said[0]


def test_position_embeddings_count_from_the_newest_item() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=8, num_layers=1, nhead=2, dim_feedforward=8, dropout=0.0, emb_size=12,
                      max_positions=4)  # fmt: skip
    model = NextItemModel(FEATURES, cfg)
    model.dense.position.reset_parameters()
    emb = torch.randn(2 * 5, 12)
    # Two users with 5 and 3 real positions: both newest items get distance 0, so the same embedding row.
    lengths = torch.tensor([5, 3])
    pos = model.dense.position.grid(lengths, 5)
    assert torch.equal(pos[0, 4], pos[1, 2]) and torch.equal(pos[0, 0], pos[0, 1])  # distance 4 clamps to 3
    hidden, targets = model.dense.encode(emb, torch.Size([2, 5]), lengths)
    # Targets stay position-free (items, not items at a position); encode() fills the real positions only.
    real = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    assert torch.allclose(targets[real], model.dense.proj(emb).view(2, 5, 8)[real])
    assert (targets[~real] == 0).all() and (hidden[~real] == 0).all()
    with pytest.raises(ValueError, match="max_positions"):
        model.dense.encode(emb, torch.Size([2, 5]))
