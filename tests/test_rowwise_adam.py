"""fbgemm's PARTIAL_ROWWISE_ADAM: the pure-PyTorch reference against a hand-computed case (CPU), and the fused
CUDA kernel against the reference over several steps and a checkpoint round trip (GPU only)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.rowwise_adam import PartialRowwiseAdamReference, exact_rowwise_adagrad_step


def test_partial_rowwise_adam_reference_matches_hand_computed_steps() -> None:
    ref = PartialRowwiseAdamReference(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), lr=0.01, beta1=0.9, beta2=0.999)
    touched = torch.tensor([True, False])

    # Step 1, g = [0.1, -0.3]: m = 0.1 g = [0.01, -0.03]; v = 0.001 * mean(0.01, 0.09) = 5e-5;
    # bias-corrected m_hat = g, v_hat = 0.05; w -= 0.01 * g / sqrt(0.05).
    ref.update(torch.tensor([[0.1, -0.3], [7.0, 7.0]]), touched)
    s = math.sqrt(0.05)
    torch.testing.assert_close(ref.weight[0], torch.tensor([1 - 0.001 / s, 2 + 0.003 / s], dtype=torch.float64))
    torch.testing.assert_close(ref.momentum1[0], torch.tensor([0.01, -0.03], dtype=torch.float64))
    assert ref.momentum2[0].item() == pytest.approx(5e-5)
    # The untouched row keeps weight and state, whatever its gradient says.
    torch.testing.assert_close(ref.weight[1], torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert ref.momentum2[1].item() == 0.0

    # Step 2, g = [0.2, 0], decoupled weight decay 0.5: m = 0.9 m + 0.1 g = [0.029, -0.027];
    # v = 0.999 * 5e-5 + 0.001 * 0.02 = 6.995e-5; m_hat = m / 0.19, v_hat = v / 0.001999;
    # w -= 0.01 * (m_hat / sqrt(v_hat) + 0.5 w)  ->  [0.98239085, 2.01094599].
    ref.weight_decay = 0.5
    ref.update(torch.tensor([[0.2, 0.0], [0.0, 0.0]]), touched)
    torch.testing.assert_close(ref.momentum1[0], torch.tensor([0.029, -0.027], dtype=torch.float64))
    assert ref.momentum2[0].item() == pytest.approx(6.995e-5)
    torch.testing.assert_close(
        ref.weight[0], torch.tensor([0.98239085, 2.01094599], dtype=torch.float64), atol=1e-8, rtol=0
    )
    assert ref.step == 2


def test_exact_rowwise_adagrad_reference_hand_case() -> None:
    # G = mean(0.09, 0.16) = 0.125; w -= 0.1 * g / sqrt(0.125). Column blocks keep one G per block.
    w = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    state = torch.zeros(1, 1, dtype=torch.float64)
    exact_rowwise_adagrad_step(w, state, torch.tensor([[0.3, 0.4]], dtype=torch.float64), lr=0.1, eps=0.0)
    s = math.sqrt(0.125)
    torch.testing.assert_close(w, torch.tensor([[1 - 0.03 / s, 1 - 0.04 / s]], dtype=torch.float64))
    w2, state2 = torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    exact_rowwise_adagrad_step(w2, state2, torch.tensor([[0.3, 0.4]]).double(), lr=0.1, eps=0.0, column_blocks=[1, 1])
    torch.testing.assert_close(w2, torch.tensor([[0.9, 0.9]], dtype=torch.float64))  # g / |g| per block


# ---------------------------------------------------------------------------------------------------------
# GPU: fbgemm's fused kernel through TorchRec (DMP, one rank), as the trainer uses it


def _cuda_fbgemm_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import fbgemm_gpu  # noqa: F401

        return hasattr(torch.ops.fbgemm, "split_embedding_codegen_lookup_partial_rowwise_adam_function")
    except Exception:
        return False


ROWS, DIM, STEPS = 64, 16, 4
HYPER = dict(learning_rate=0.05, eps=1e-8, beta1=0.9, beta2=0.999, weight_decay=0.01)


def _one_rank_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)


def _dmp(weight: torch.Tensor):  # type: ignore[no-untyped-def]
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection

    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name="t", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f"])],
        device=torch.device("meta"),
    )
    sharder = EmbeddingCollectionSharder(fused_params={"optimizer": EmbOptimType.PARTIAL_ROWWISE_ADAM, **HYPER})
    dmp = DistributedModelParallel(ec, device=torch.device("cuda"), sharders=[sharder])  # type: ignore[list-item]
    with torch.no_grad():
        for name, tensor in dmp.state_dict().items():
            if name.endswith("t.weight"):
                for shard in tensor.local_shards():
                    shard.tensor.copy_(weight)
    return dmp


def _step(dmp, ids: torch.Tensor, grad_out: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], ids.cuda(), torch.ones_like(ids).cuda())
    out = dmp(kjt)["f"].values()
    (out * grad_out.cuda()).sum().backward()


def _table(dmp) -> torch.Tensor:  # type: ignore[no-untyped-def]
    (tensor,) = [t for n, t in dmp.state_dict().items() if n.endswith("t.weight")]
    return tensor.local_shards()[0].tensor.detach().double().cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_fbgemm_available(), reason="needs CUDA and the CUDA fbgemm-gpu build")
def test_fused_partial_rowwise_adam_matches_reference_across_checkpoint_round_trip() -> None:
    _one_rank_group()
    gen = torch.Generator().manual_seed(0)
    w0 = torch.rand(ROWS, DIM, generator=gen) * 0.2 - 0.1
    ref = PartialRowwiseAdamReference(
        w0, lr=HYPER["learning_rate"], beta1=HYPER["beta1"], beta2=HYPER["beta2"], eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
    )  # fmt: skip
    batches = []
    for _ in range(2 * STEPS):
        ids = torch.randint(0, ROWS // 2, (24,), generator=gen)  # rows >= ROWS/2 are never touched
        batches.append((ids, torch.randn(24, DIM, generator=gen)))

    def ref_step(ids: torch.Tensor, grad_out: torch.Tensor) -> None:
        grad = torch.zeros(ROWS, DIM, dtype=torch.float64).index_add_(0, ids, grad_out.double())
        touched = torch.zeros(ROWS, dtype=torch.bool)
        touched[ids] = True
        ref.update(grad, touched)

    dmp = _dmp(w0)
    for ids, g in batches[:STEPS]:
        _step(dmp, ids, g)
        ref_step(ids, g)
    torch.testing.assert_close(_table(dmp), ref.weight, atol=1e-5, rtol=1e-4)

    # Checkpoint round trip: weights + optimizer state into a fresh model. fbgemm does not keep the step
    # counter in the state, so without set_optimizer_step the bias correction would restart at t = 1.
    model_state = {k: v for k, v in dmp.state_dict().items()}
    optim_state = dmp.fused_optimizer.state_dict()
    restored = _dmp(torch.zeros(ROWS, DIM))
    restored.load_state_dict(model_state)
    restored.fused_optimizer.init_state()
    restored.fused_optimizer.load_state_dict(optim_state)
    restored.fused_optimizer.set_optimizer_step(STEPS)
    for ids, g in batches[STEPS:]:
        _step(restored, ids, g)
        ref_step(ids, g)
    torch.testing.assert_close(_table(restored), ref.weight, atol=1e-5, rtol=1e-4)
