"""A short summary of a ``torch.profiler`` run of training steps: where the time goes, by kind of work.

On CUDA it sums the GPU kernels' time by category (from kernel names), and counts per step what keeps a GPU
waiting on its host: kernel launches and host-device synchronisations. On CPU it sums the operators' self
CPU time by the same categories.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.autograd import DeviceType

# First match wins; matched against the lower-cased kernel or operator name.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("flash", "fmha", "attention", "varlen", "sdpa")),
    ("embedding (fbgemm)", ("fbgemm", "embedding", "split_embedding", "tbe")),
    ("dense optimizer", ("adam", "multi_tensor_apply")),
    ("compiled (fused) element-wise", ("triton_",)),
    ("matmul", ("gemm", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "matmul", "sgemm")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("dropout / random", ("dropout", "bernoulli", "philox", "rand", "uniform_", "fused_dropout")),
    ("softmax / log-sum-exp", ("softmax", "logsumexp", "exp", "log_")),
    ("copy / cast", ("copy", "_to_copy", "memcpy", "memset", "cast")),
    ("index / scatter / gather", ("index", "scatter", "gather", "repeat_interleave", "nonzero", "masked")),
    ("reduction", ("reduce", "sum", "amax", "max", "norm")),
    ("other element-wise", ("elementwise", "vectorized", "unrolled", "aten::")),
]

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def category(name: str) -> str:
    lowered = name.lower()
    for label, needles in CATEGORIES:
        if any(n in lowered for n in needles):
            return label
    return "other"


def _self_device_us(event: object) -> float:
    # torch >= 2.4 calls it device time; older releases cuda time.
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


def summarize(prof: torch.profiler.profile, steps: int, device: torch.device, wall_s: float) -> str:
    """Markdown lines: per-step time by category, plus launches, syncs and GPU busy share on CUDA."""
    per_category: dict[str, float] = defaultdict(float)
    launches = syncs = scalar_reads = 0
    for event in prof.key_averages():
        key = event.key
        if device.type == "cuda":
            if event.device_type == DeviceType.CUDA:
                per_category[category(key)] += _self_device_us(event)
            elif key in LAUNCHES:
                launches += event.count
            elif key in SYNCS:
                syncs += event.count
            elif key == "aten::_local_scalar_dense":  # .item() / .tolist() of a device tensor
                scalar_reads += event.count
        elif event.device_type == DeviceType.CPU and not key.startswith("ProfilerStep"):
            per_category[category(key)] += float(event.self_cpu_time_total)
    busy_ms = sum(per_category.values()) / 1000 / steps
    step_ms = 1000 * wall_s / steps
    lines = []
    if device.type == "cuda":
        lines.append(
            f"GPU kernels {busy_ms:.1f} ms of {step_ms:.1f} ms per step ({busy_ms / step_ms:.0%} busy); per step: "
            f"{launches / steps:,.0f} kernel launches, {syncs / steps:.1f} host syncs, {scalar_reads / steps:.1f} "
            "device-scalar reads"
        )
    else:
        lines.append(f"operators' self CPU time {busy_ms:.1f} ms per step (all threads) for {step_ms:.1f} ms of wall time")
    lines += ["", "| category | ms/step | share |", "|---|---:|---:|"]
    total = sum(per_category.values()) or 1.0
    for label, us in sorted(per_category.items(), key=lambda kv: -kv[1]):
        if us / total >= 0.005:
            lines.append(f"| {label} | {us / 1000 / steps:.2f} | {us / total:.0%} |")
    return "\n".join(lines)
