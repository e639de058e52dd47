"""The CUDA dense path against the references it replaces: FlashAttention's variable-length kernel against the
padded grid, the chunked bf16 loss against the fp32 reference, the compiled transformer against eager, and a
one-rank CUDA training run through torchrun (varlen attention, compile, fused AdamW, PARTIAL_ROWWISE_ADAM).

All marked ``gpu``: skipped without CUDA (``python3 -m pytest -m gpu tests/`` on a GPU host).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.batch import PackedLayout
from model.attention import PackedAttention, padded_attention, varlen_attention, varlen_available
from model.config import ModelConfig
from model.loss import NegativeSpec, chunked_loss, reference_loss, sample_in_batch
from model.transformer import CausalTransformer

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LENGTHS = [200, 3, 0, 129, 1, 64, 77]  # a user without positions, one of a single position


def _close_direction(got: torch.Tensor, want: torch.Tensor, min_cosine: float) -> None:
    """bf16 results: the same vector up to rounding (cosine similarity), and the same scale."""
    got, want = got.double().flatten(), want.double().flatten()
    cosine = F.cosine_similarity(got, want, dim=0).item()
    assert cosine >= min_cosine, cosine
    assert got.norm().item() == pytest.approx(want.norm().item(), rel=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or not varlen_available(CUDA), reason="no varlen_attn")
def test_varlen_attention_matches_the_padded_grid() -> None:
    torch.manual_seed(0)
    layout = PackedLayout.from_batch(torch.tensor(LENGTHS), None, max_len=max(LENGTHS)).to(CUDA)
    qkv = torch.randn(layout.num_tokens, 3 * 128, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(layout.num_tokens, 128, device=CUDA, dtype=torch.bfloat16)
    results = []
    for attend in (varlen_attention, padded_attention):
        qkv.grad = None
        out = attend(qkv, layout, 4)
        (out.float() * grad_out.float()).sum().backward()
        results.append((out.detach(), qkv.grad.clone()))
    (v_out, v_grad), (p_out, p_grad) = results
    torch.testing.assert_close(v_out.float(), p_out.float(), rtol=2e-2, atol=2e-2)
    _close_direction(v_grad, p_grad, 0.999)


SPECS = [
    NegativeSpec("all", mask_same_item=True),
    NegativeSpec("sampled", num_sampled=128, group_size=64, mask_same_item=True),
    NegativeSpec("sampled", num_sampled=16, group_size=1),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.in_batch}-K{s.num_sampled}-g{s.group_size}")
def test_chunked_loss_on_cuda_matches_the_fp32_reference(spec: NegativeSpec) -> None:
    torch.manual_seed(0)
    num, hidden, items = 3000, 256, 500
    ids = torch.randint(0, items, (num,), device=CUDA)
    base = torch.randn(items, hidden, device=CUDA)
    q = torch.randn(num, hidden, device=CUDA)
    k = base[ids] + 0.5 * torch.randn(num, hidden, device=CUDA)
    table, table_ids = torch.randn(100, hidden, device=CUDA), torch.randint(0, items, (100,), device=CUDA)
    sampled = sample_in_batch(num, spec, CUDA)

    def run(fn, **kw):  # noqa: ANN001, ANN003, ANN202
        leaves = [x.clone().requires_grad_(True) for x in (q, k, table)]
        out = fn(leaves[0], leaves[1], ids, spec, 0.1, leaves[2], table_ids, sampled, **kw)
        out.loss.backward()
        return out, [x.grad for x in leaves]

    ref, ref_grads = run(reference_loss)
    exact, exact_grads = run(chunked_loss, rows_per_chunk=512)
    low, low_grads = run(chunked_loss, rows_per_chunk=512, dtype=torch.bfloat16)
    torch.testing.assert_close(exact.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(exact_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert low.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)
    for a, b in zip(low_grads, ref_grads, strict=True):
        _close_direction(a, b, 0.995)


def test_compiled_transformer_matches_eager_under_bf16_autocast() -> None:
    from trainer.compile import compile_transformer

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=256, num_layers=2, nhead=2, dim_feedforward=512, dropout=0.0, emb_size=8, compile=True)
    eager = CausalTransformer(cfg).to(CUDA)
    compiled = copy.deepcopy(eager)
    assert compile_transformer(compiled, cfg, CUDA) == 2
    for lengths in (LENGTHS, [50, 60, 70]):
        layout = PackedLayout.from_batch(torch.tensor(lengths), None, max_len=max(lengths)).to(CUDA)
        x = torch.randn(layout.num_tokens, 256, device=CUDA)
        outs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, PackedAttention(layout, "auto", CUDA))
            out.float().square().mean().backward()
            outs.append((out.detach().float(), model.layers[0].attn.qkv.weight.grad.clone()))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=3e-2, atol=3e-2)
        _close_direction(outs[1][1], outs[0][1], 0.999)


def _cuda_fbgemm() -> bool:
    try:
        import fbgemm_gpu  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no CUDA build
        return False
    return hasattr(torch.ops.fbgemm, "split_embedding_codegen_lookup_partial_rowwise_adam_function")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or not _cuda_fbgemm(), reason="needs the CUDA fbgemm-gpu build")
def test_one_cuda_rank_trains_with_the_fast_path(tmp_path: Path) -> None:
    from data.sample import SampleParams, ensure_sample_data

    data = ensure_sample_data(tmp_path / "data", SampleParams(users=2000, files=2, rows_per_stripe=256))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
        "-m", "trainer.main", "--config", "configs/default.toml", f"--data.data_paths={data}",
        f"--train.output_dir={out}", "--train.device=cuda", "--train.train_steps=60", "--train.log_steps=10",
        "--model.in_batch_negatives=sampled", "--model.num_in_batch_negatives=64", "--model.in_batch_group_size=32",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.3, losses
    assert "transformer blocks compiled" in logs and "runs uncompiled" not in logs, logs[-4000:]
    assert "EXACT_ROWWISE_ADAGRAD" not in logs  # the CPU fallback is not taken: fused row-wise Adam runs


def test_hstu_on_cuda_matches_the_cpu_encoder() -> None:
    from model.hstu import HSTUAttention, HSTUEncoder

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, num_layers=2, nhead=2, dropout=0.0, emb_size=8, encoder="hstu")
    cpu = HSTUEncoder(cfg, 256, with_time=True)
    gpu = copy.deepcopy(cpu).to(CUDA)
    layout = PackedLayout.from_batch(torch.tensor(LENGTHS), None, max_len=max(LENGTHS))
    times = torch.arange(layout.num_tokens, dtype=torch.long) * 37 + 1_600_000_000
    x = torch.randn(layout.num_tokens, 64)
    want = cpu(x, HSTUAttention(layout, "grouped", torch.device("cpu"), times))
    got = gpu(x.to(CUDA), HSTUAttention(layout.to(CUDA), "auto", CUDA, times.to(CUDA)))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-4)
