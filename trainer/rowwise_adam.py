"""Pure-PyTorch references of fbgemm's fused row-wise embedding optimizers.

fbgemm applies these inside the embedding backward, on CUDA (PARTIAL_ROWWISE_ADAM) or CPU
(EXACT_ROWWISE_ADAGRAD); the references here update a whole table from the gradient summed per row, so
tests can check the fused kernels (and the sharded tables built on them) step by step. Only rows that
were looked up in a step ("touched") change; the caller says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PartialRowwiseAdamReference:
    """fbgemm's PARTIAL_ROWWISE_ADAM: per-element first moment, one second-moment scalar per row.

    For a touched row i with summed gradient g (width D) at global step t (counted per training forward of
    the table batch, whether or not the row is touched):

    - ``m_i <- beta1 m_i + (1 - beta1) g``
    - ``v_i <- beta2 v_i + (1 - beta2) mean_d(g_d^2)``
    - ``w_i <- w_i - lr ((m_i / (1 - beta1^t)) / (sqrt(v_i / (1 - beta2^t)) + eps) + weight_decay w_i)``
    """

    weight: torch.Tensor
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Number of steps taken so far; fbgemm calls it `iter` and does not keep it in the optimizer state.
    step: int = 0
    momentum1: torch.Tensor = field(init=False)
    momentum2: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.weight = self.weight.detach().clone().double()
        self.momentum1 = torch.zeros_like(self.weight)
        self.momentum2 = torch.zeros(self.weight.shape[0], dtype=self.weight.dtype)

    @torch.no_grad()
    def update(self, grad: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
        """One step: ``grad`` is ``[rows, D]`` (summed per row), ``touched`` the bool mask of looked-up rows."""
        self.step += 1
        t = self.step
        g = grad.double()[touched]
        rows = touched.nonzero().squeeze(-1)
        m = self.beta1 * self.momentum1[rows] + (1 - self.beta1) * g
        v = self.beta2 * self.momentum2[rows] + (1 - self.beta2) * g.pow(2).mean(dim=1)
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        w = self.weight[rows]
        self.weight[rows] = w - self.lr * (m_hat / (v_hat.sqrt().unsqueeze(1) + self.eps) + self.weight_decay * w)
        self.momentum1[rows], self.momentum2[rows] = m, v
        return self.weight


def exact_rowwise_adagrad_step(
    weight: torch.Tensor,
    state: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    eps: float = 1e-8,
    column_blocks: list[int] | None = None,
) -> None:
    """fbgemm's EXACT_ROWWISE_ADAGRAD, in place: ``G_i += mean_d(g_d^2)``; ``w_i -= lr g / (sqrt(G_i) + eps)``.

    ``state`` is ``[rows, blocks]``. A column-wise sharded table keeps one accumulator per row *per column
    shard* (the mean runs over the shard's columns only), so ``column_blocks`` lists the shard widths;
    ``None`` is one block (the whole row). Untouched rows have a zero gradient and do not change.
    """
    blocks = column_blocks or [weight.shape[1]]
    start = 0
    for b, width in enumerate(blocks):
        g = grad[:, start : start + width]
        state[:, b] += g.pow(2).mean(dim=1)
        weight[:, start : start + width] -= lr * g / (state[:, b].sqrt().unsqueeze(1) + eps)
        start += width
