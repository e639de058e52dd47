"""``model.compile``: ``torch.compile`` of the transformer's position-wise halves, with a fallback to eager.

What is compiled is each block's ``attention_input`` (LayerNorm, QKV projection) and
``attention_output_and_ffn`` (output projection, dropouts, residual adds, LayerNorm, FFN with GELU): tensor-in,
tensor-out methods, compiled with dynamic shapes since the number of packed rows changes every batch.
Inductor fuses the element-wise work (and the bf16 casts autocast puts around it) into a few kernels per
block; the matmuls stay cuBLAS and attention stays the flash kernel between the two halves, which keeps the
compiled graphs free of the per-batch layout (nothing to guard on, nothing to recompile for).

Applied by the trainer after sharding, like any other parallelism/compilation step; the model files only
name the methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model.config import ModelConfig
from model.transformer import TransformerBlock

logger = logging.getLogger(__name__)

COMPILED_METHODS = ("attention_input", "attention_output_and_ffn")


def compile_enabled(cfg: ModelConfig, device: torch.device) -> bool:
    """``model.compile``: "auto" compiles on CUDA only (on a CPU the compile time rarely pays back)."""
    return device.type == "cuda" if cfg.compile == "auto" else bool(cfg.compile)


class _Fallback:
    """Shared by every compiled method of a model: once one fails to compile, all run eagerly."""

    def __init__(self) -> None:
        self.error: BaseException | None = None


class _CompiledOrEager:
    """Calls the compiled method; if compiling it fails, says why once and runs the eager one from then on."""

    def __init__(self, eager: Callable[..., Any], fallback: _Fallback, name: str) -> None:
        self.eager, self.fallback, self.name = eager, fallback, name
        self.compiled = torch.compile(eager, dynamic=True)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.fallback.error is None:
            try:
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - any compiler failure (no triton, no C++ compiler, ...)
                self.fallback.error = error
                logger.warning(
                    "model.compile: torch.compile of %s failed (%s: %s); the transformer runs uncompiled "
                    "(set model.compile = false to skip compiling)",
                    self.name, type(error).__name__, str(error).strip().splitlines()[0] if str(error) else "",
                )  # fmt: skip
        # A genuine error in the model raises here again, uncompiled, where its traceback is readable.
        return self.eager(*args)


def compile_transformer(model: nn.Module, cfg: ModelConfig, device: torch.device) -> int:
    """Compile every ``TransformerBlock`` of ``model`` in place (the instance's methods are replaced, so
    state dicts, DDP and checkpoints see the same module tree). Returns the number of blocks compiled."""
    if not compile_enabled(cfg, device):
        return 0
    fallback = _Fallback()
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    for block in blocks:
        for name in COMPILED_METHODS:
            setattr(block, name, _CompiledOrEager(getattr(block, name), fallback, f"{type(block).__name__}.{name}"))
    logger.info("model.compile: %d transformer blocks compiled (dynamic shapes) on %s", len(blocks), device.type)
    return len(blocks)
