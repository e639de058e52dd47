"""``model.compile``: the compiled transformer gives the eager one's values and gradients, on batches of
different sizes without recompiling per shape, and a compiler failure falls back to eager with a warning.

The real ``torch.compile`` (Inductor, C++ on a CPU) on a tiny transformer: about half a minute, once.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from data.batch import PackedLayout
from model.attention import PackedAttention
from model.config import ModelConfig
from model.transformer import CausalTransformer
from trainer import compile as compile_mod
from trainer.compile import compile_enabled, compile_transformer

CFG = ModelConfig(hidden_size=16, num_layers=2, nhead=4, dim_feedforward=24, dropout=0.0, emb_size=8, compile=True)


def _forward_backward(model: CausalTransformer, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    layout = PackedLayout.from_batch(torch.tensor(lengths), None, max_len=max(lengths))
    x = torch.randn(layout.num_tokens, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, PackedAttention(layout, "auto", x.device))
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_compiled_transformer_matches_eager_across_batch_shapes() -> None:
    torch.manual_seed(0)
    eager = CausalTransformer(CFG).double()
    compiled = copy.deepcopy(eager)
    assert compile_transformer(compiled, CFG, torch.device("cpu")) == CFG.num_layers
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    frames: list[int] = []
    for seed, lengths in enumerate(([7, 3, 5, 1, 6], [4, 4, 2], [9, 2, 8, 3])):  # a new token count each time
        want = _forward_backward(eager, lengths, seed)
        got = _forward_backward(compiled, lengths, seed)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
        for name, grad in want[2].items():
            torch.testing.assert_close(got[2][name], grad, rtol=1e-10, atol=1e-12, msg=name)
        frames.append(counters["unique_graphs"] - before)
    assert all(isinstance(getattr(b, "attention_input"), compile_mod._CompiledOrEager) for b in compiled.layers)
    # Dynamic shapes: the graphs compiled for the first batch serve the next two.
    assert frames[0] > 0 and frames[1] == frames[0] and frames[2] == frames[0], frames


def test_compile_failure_falls_back_to_eager_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken_compile(fn, **_kw):  # noqa: ANN001, ANN202 - stands in for torch.compile
        def run(*args):  # noqa: ANN002, ANN202
            calls.append(fn)
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(compile_mod.torch, "compile", broken_compile)
    torch.manual_seed(0)
    eager = CausalTransformer(CFG).double()
    model = copy.deepcopy(eager)
    compile_transformer(model, CFG, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="trainer.compile"):
        got = _forward_backward(model, [5, 2], 0)
        again = _forward_backward(model, [3, 3], 1)
    want = _forward_backward(eager, [5, 2], 0)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert again[0].shape == (6, 16)
    # One failure switches every block's methods to eager: the compiler is tried once, and said once.
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "runs uncompiled" in warnings[0] and "no C++ compiler found" in warnings[0]
    assert "more detail" not in warnings[0]


def test_compile_auto_is_cuda_only() -> None:
    auto = ModelConfig(compile="auto")
    assert not compile_enabled(auto, torch.device("cpu")) and compile_enabled(auto, torch.device("cuda"))
    assert compile_enabled(ModelConfig(compile=True), torch.device("cpu"))
    assert not compile_enabled(ModelConfig(compile=False), torch.device("cuda"))
    assert compile_transformer(CausalTransformer(ModelConfig(compile=False, hidden_size=8, nhead=2, num_layers=1,
                                                              dim_feedforward=8, emb_size=8)),
                               ModelConfig(compile=False), torch.device("cuda")) == 0  # fmt: skip
