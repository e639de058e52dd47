"""Training benchmark: the project's trainer path against a plain-PyTorch baseline of the same model.

``python -m bench.bench_train [--device cpu|cuda] [--batch N] [--seq-len N] [--emb-dim N] [--hidden N] ...``

In one invocation, on identical synthetic batches (``SequenceBatch``, sequence lengths uniform in
``[seq_len/4, seq_len]``, each batch padded on the right to its longest user, as the reader does):

* **trainer**: the project's trainer itself, ``trainer.trainer.Trainer`` built from the shape's job config
  (``NextItemModel`` on ``meta`` -> planner -> ``DistributedModelParallel`` with fbgemm's fused sparse
  optimizer: EXACT_ROWWISE_ADAGRAD on CPU, PARTIAL_ROWWISE_ADAM on CUDA; AdamW; ``TrainPipelineSparseDist``;
  ``model.compile``), fed the synthetic batches instead of a reader and stepped by ``Trainer.train_step``
  with the loop's metric logging, in one process with a world-size-1 process group (gloo on CPU, NCCL on
  CUDA).
* **baseline**: the same model written as plain PyTorch (``bench/baseline.py``): per-table
  ``nn.Embedding(sparse=True)``, the padded ``[B, T]`` transformer, ``SparseAdam`` + ``AdamW``; the fixed
  yardstick.

Each path runs in its own subprocess (so that its peak memory is its own); the parent interleaves rounds of
``--steps`` steps on the paths and keeps each path's fastest round (the machine may be shared).
``--paths trainer,baseline,baseline-malloc`` adds the baseline with the trainer's host allocator setting
(``runtime/host.py``), to tell how much of the gap that setting alone makes.

**FLOPs.** Only useful work counts (real tokens, causal half of attention), so the achieved FLOP/s of the two
paths compare like their tokens/s and padding is never credited. Per step, with ``P = E*H + L*(4*H^2 +
2*H*F)`` the weights in matmuls (projection; QKV, attention output, FFN of each layer), ``N`` real tokens,
``len_b`` the real length of user b and ``N_t`` the (query, next item) pairs of the loss::

    FLOPs = 6 * P * N                      # forward (2 per multiply-add) + backward (2x forward)
          + 6 * L * H * sum_b len_b^2      # causal attention: Q.K^T and A.V, len^2*H each forward
          + 6 * H * N_t * C                # the loss's logits: [N_t, H] x [H, C]

with ``C`` the logits per query: ``N_t`` with every in-batch target as a negative (the seed's loss), ``K + 1``
with K sampled ones (``--in-batch-negatives sampled``, the default).

Embedding lookups, LayerNorm, softmax and the optimizers are not counted. The peak to compare with is
measured in the same run: the best of a few large ``torch.mm`` in fp32 and in bf16 on the device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import logging
import math
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from bench.baseline import BaselinePath
from bench.profile_summary import summarize
from bench.train_shape import BATCHES, PRESETS, Shape, batch_tokens, job_config, synthetic_batches, useful_flops
from data.batch import SequenceBatch

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- trainer path


class _Cycle:
    """The synthetic batches, round and round: the trainer's data source in place of a reader."""

    def __init__(self, batches: list[SequenceBatch]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[SequenceBatch]:
        return itertools.cycle(self._batches)


class TrainerPath:
    """The project's trainer, one rank: ``trainer.trainer.Trainer`` built from the shape's job config (meta ->
    plan -> DMP -> pipeline, compile, fused optimizers), fed the synthetic batches, stepped by its own
    ``train_step`` with the loop's metric logging every ``log_steps``."""

    name = "trainer"

    def __init__(self, shape: Shape, batches: list[SequenceBatch], output_dir: str) -> None:
        from trainer.dist import init_distributed
        from trainer.trainer import Trainer

        self.shape = shape
        self.ctx = init_distributed(shape.device)
        self.trainer = Trainer(job_config(shape, output_dir), self.ctx, batches=_Cycle(batches))
        self.model = self.trainer.model
        self._feed = self.trainer.batches.until(None)
        self.model.train()

    def step(self) -> torch.Tensor:
        out = self.trainer.train_step(self._feed)
        if self.trainer.step % self.shape.log_steps == 0:
            self.trainer.metrics.log(self.trainer.step)
        return out.loss.detach()

    def close(self) -> None:
        from trainer.dist import destroy_distributed

        self.trainer.close()
        destroy_distributed()


def copy_trainer_weights(trainer: TrainerPath, baseline: BaselinePath) -> None:
    """Give the baseline the trainer's initial weights (one rank: every table is one local shard)."""
    state = trainer.model.state_dict()
    with torch.no_grad():
        for name, table in baseline.model.embeddings.items():
            sharded = state[f"model.sparse.embedding_collection.embeddings.{name}.weight"]
            shards = sharded.local_shards() if hasattr(sharded, "local_shards") else None
            full = shards[0].tensor if shards else sharded
            table.weight.copy_(full)
        prefix = "model.dense."
        dense = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        baseline.model.dense.load_state_dict(dense)


# -------------------------------------------------------------------------------------- worker process


def _peak_memory_gib(device: torch.device) -> dict[str, float]:
    peak = {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}  # Linux: KiB
    if device.type == "cuda":
        peak["cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(path_name: str, shape: Shape, warmup: int, conn: Connection) -> None:
    """``_serve`` one path; running out of device memory is a result (the batch does not fit), sent back."""
    try:
        _serve(path_name, shape, warmup, conn)
    except torch.OutOfMemoryError as error:
        conn.send({"error": f"out of memory ({str(error).splitlines()[0][:120]})"})


def _serve(path_name: str, shape: Shape, warmup: int, conn: Connection) -> None:
    """Build one path, warm it up, then run timed rounds on the parent's command."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The planner warns about every kernel it filters out; that is expected here (CPU: "fused" only).
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    if shape.threads:
        torch.set_num_threads(shape.threads)
    device = torch.device(shape.device)
    batches = synthetic_batches(shape)
    tokens = [batch_tokens(b) for b in batches]
    flops = [useful_flops(shape, b) for b in batches]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if path_name == "trainer":
            path: TrainerPath | BaselinePath = TrainerPath(shape, batches, tmp)
        else:
            path = BaselinePath(shape, batches, malloc_tuned=path_name == "baseline-malloc")
        build_s = time.perf_counter() - started
        done, losses = 0, []
        for _ in range(warmup):
            losses.append(path.step())
            done += 1
        _sync(device)
        conn.send({"build_s": build_s, "warmup_losses": [float(x) for x in losses]})
        while True:
            command, arg = conn.recv()
            if command == "run":
                first = done
                _sync(device)
                started, cpu_started = time.perf_counter(), time.process_time()
                losses = [path.step() for _ in range(arg)]
                _sync(device)
                seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
                done += arg
                picked = [i % len(batches) for i in range(first, done)]
                conn.send({
                    "seconds": seconds, "cpu_s": cpu_s, "tokens": sum(tokens[i] for i in picked),
                    "flops": sum(flops[i] for i in picked), "losses": [float(x) for x in losses],
                })  # fmt: skip
            elif command == "profile":
                conn.send(_profile(path, arg[0], device, arg[1]))
            elif command == "memory":
                conn.send(_peak_memory_gib(device))
            else:
                path.close()
                conn.send(None)
                return


def _profile(path: TrainerPath | BaselinePath, steps: int, device: torch.device, full: bool) -> str:
    """The summary by kind of work (``bench/profile_summary.py``), plus torch's table with ``--profile-table``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            path.step()
        _sync(device)
        wall_s = time.perf_counter() - started
    text = summarize(prof, steps, device, wall_s)
    if full:
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        text += "\n\n" + prof.key_averages().table(sort_by=sort, row_limit=40)
    return text


class PathFailed(RuntimeError):
    """A path could not run at this shape (out of device memory); its worker has exited."""


class Worker:
    """The parent's handle on one path's subprocess."""

    def __init__(self, path_name: str, shape: Shape, warmup: int) -> None:
        ctx = mp.get_context("spawn")
        self.name = path_name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(path_name, shape, warmup, child), name=f"bench-{path_name}")
        self._proc.start()
        child.close()
        self.ready = self._recv()

    def _recv(self) -> Any:
        try:
            message = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"{self.name} worker died (exit code {self._proc.exitcode})") from None
        if isinstance(message, dict) and "error" in message:
            self._proc.join(timeout=60)
            raise PathFailed(f"{self.name}: {message['error']}")
        return message

    def call(self, command: str, arg: Any = None) -> Any:
        self._conn.send((command, arg))
        return self._recv()

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(EOFError, BrokenPipeError, RuntimeError):
                self.call("stop")
        self._proc.join(timeout=60)


# ------------------------------------------------------------------------------------------ peak matmul


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` product on ``device``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: library dispatch, thread pool, clocks
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Result:
    name: str
    seconds: float
    tokens: int
    flops: float
    steps: int
    build_s: float = 0.0
    memory: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


def _table(runs: dict[int, dict[str, Result]], peaks: dict[str, float], device: str, spec_bf16: float) -> str:
    """One row per (batch, path); ratios against the baseline of the same batch, and against the first batch's
    tokens/s of the same path (does a larger batch pay per token?)."""
    mem_key = "cuda_gib" if device == "cuda" else "rss_gib"
    mem_label = "peak CUDA mem GiB" if device == "cuda" else "peak RSS GiB"
    spec = f" MFU ({spec_bf16:g} TFLOP/s bf16 spec) |" if spec_bf16 else ""
    lines = [
        f"| batch | path | ms/step | tokens/s | vs baseline | vs batch {min(runs)} | dense TFLOP/s | % fp32 mm peak | "
        f"% bf16 mm peak |{spec} {mem_label} |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (2 if spec else 1),
    ]
    first = runs[min(runs)]
    for batch, results in runs.items():
        base = results.get("baseline")
        for r in results.values():
            ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else ""
            scale = f"{r.tokens_per_s / first[r.name].tokens_per_s:.2f}x" if r.name in first else ""
            mfu = f" {r.flops_per_s / (spec_bf16 * 1e12):.1%} |" if spec_bf16 else ""
            lines.append(
                f"| {batch} | {r.name} | {1000 * r.seconds / r.steps:,.1f} | {r.tokens_per_s:,.0f} | {ratio} | {scale} | "
                f"{r.flops_per_s / 1e12:.3f} | {r.flops_per_s / peaks['fp32']:.1%} | {r.flops_per_s / peaks['bf16']:.1%} |"
                f"{mfu} {r.memory.get(mem_key, float('nan')):.2f} |"
            )
    return "\n".join(lines)


def _describe(shape: Shape, batches: list[SequenceBatch], peaks: dict[str, float], args: argparse.Namespace) -> str:
    real = sum(batch_tokens(b) for b in batches)
    padded = sum(b.item_ids.numel() for b in batches)
    table_gib = sum(shape.rows().values()) * shape.emb_dim * 4 / 2**30
    return "\n".join([
        f"device {shape.device}: {_device_name(shape.device)}; torch {torch.__version__}, "
        f"{shape.threads or torch.get_num_threads()} threads; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"tables {', '.join(f'{n} {r:,}' for n, r in shape.rows().items())} rows x {shape.emb_dim} "
        f"({table_gib:.2f} GiB of fp32 weights); values per position 1..{shape.max_values}",
        f"transformer hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads, ffn {shape.ffn}, "
        f"dropout {shape.dropout}, emb_size {shape.emb_size}; bf16 autocast {'on' if shape.bf16 and shape.device == 'cuda' else 'off'}",
        f"batch {shape.batch}, seq_len {shape.seq_len} (lengths uniform in [{max(2, shape.seq_len // 4)}, {shape.seq_len}]): "
        f"{real / padded:.0%} of padded positions are real; {len(batches)} batches cycled",
        f"loss: in-batch negatives {_negatives(shape)}, temperature {shape.temperature}, same-item masking "
        f"{'on' if shape.mask_same_item else 'off'}; trainer: attention {shape.attention}, compile {shape.compile}",
        f"rounds {args.rounds} x {args.steps} steps per path, interleaved, fastest round kept; {args.warmup} warm-up steps",
    ])  # fmt: skip


def _negatives(shape: Shape) -> str:
    if shape.in_batch_negatives == "sampled":
        return f"sampled ({shape.num_in_batch_negatives} per query, one draw per {shape.in_batch_group_size} queries)"
    return shape.in_batch_negatives


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Shape]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--paths",
        default="trainer,baseline",
        help="comma-separated: trainer, baseline, baseline-malloc (the baseline with the trainer's malloc setting)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per path (fastest kept)")
    parser.add_argument(
        "--steps", type=int, default=8, help="timed steps per round (a multiple of --num-batches: same work each round)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after building")
    parser.add_argument("--mm-size", type=int, default=0, help="matmul size of the peak measurement (0: 4096 CPU, 8192 CUDA)")
    parser.add_argument(
        "--profile", type=int, default=None, help="also profile N steps of each path: time by kind of work (default 4 on CUDA, 0 on CPU)"
    )
    parser.add_argument("--profile-table", action="store_true", help="with --profile: torch.profiler's full table too")
    parser.add_argument(
        "--spec-bf16-tflops", type=float, default=0.0, help="the device's dense bf16 spec peak: adds an MFU column"
    )
    defaults = Shape()
    for field in dataclasses.fields(Shape):
        if field.name in ("device", "batch"):
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[str(field.type)]
            parser.add_argument(flag, type=kind, default=None, help=f"default {getattr(defaults, field.name)} (CPU)")
    parser.add_argument(
        "--batch", default=None, help="users per step; comma-separated for several runs (default 32 CPU, 16,64 CUDA)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible on this machine")
    values = {**PRESETS[args.device], "device": args.device}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Shape) if getattr(args, f.name, None) is not None})
    values["batch"] = 0
    try:
        args.batches = [int(b) for b in (args.batch or BATCHES[args.device]).split(",")]
    except ValueError:
        parser.error(f"--batch: comma-separated user counts expected, got {args.batch!r}")
    args.mm_size = args.mm_size or (8192 if args.device == "cuda" else 4096)
    if args.profile is None:
        args.profile = 4 if args.device == "cuda" else 0
    return args, Shape(**values)


def measure(
    shape: Shape, names: list[str], args: argparse.Namespace
) -> tuple[dict[str, Result], dict[str, str], dict[str, str]]:
    """Every path at one shape: interleaved rounds, fastest kept; profiles if asked. Returns the results, the
    profiles and the paths that did not fit in device memory (with the reason)."""
    workers, failed = [], {}
    for name in names:  # built one after the other
        try:
            workers.append(Worker(name, shape, args.warmup))
        except PathFailed as error:
            failed[name] = str(error)
    results: dict[str, Result] = {}
    try:
        for round_index in range(args.rounds):
            # Interleaved rounds: a load change on the shared machine hits both paths alike.
            for w in workers:
                r = w.call("run", args.steps)
                print(f"batch {shape.batch} round {round_index + 1}/{args.rounds} {w.name}: "
                      f"{1000 * r['seconds'] / args.steps:,.1f} ms/step, loss {r['losses'][-1]:.4f}",
                      file=sys.stderr, flush=True)  # fmt: skip
                result = Result(w.name, r["seconds"], r["tokens"], r["flops"], args.steps, w.ready["build_s"])
                if w.name not in results or result.tokens_per_s > results[w.name].tokens_per_s:
                    results[w.name] = result
                if not all(math.isfinite(x) for x in r["losses"]):
                    raise RuntimeError(f"{w.name}: non-finite loss {r['losses']}")
        profiles = {w.name: w.call("profile", (args.profile, args.profile_table)) for w in workers} if args.profile else {}
        for w in workers:
            results[w.name].memory = w.call("memory")
    finally:
        for w in workers:
            w.close()
    return results, profiles, failed


def main(argv: list[str] | None = None) -> None:
    args, shape = parse_args(argv)
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    device = torch.device(shape.device)
    peaks = {"fp32": matmul_peak(device, torch.float32, args.mm_size), "bf16": matmul_peak(device, torch.bfloat16, args.mm_size)}
    runs: dict[int, dict[str, Result]] = {}
    failures: list[str] = []
    for batch in args.batches:
        at = dataclasses.replace(shape, batch=batch)
        runs[batch], profiles, failed = measure(at, names, args)
        failures += [f"batch {batch}: {message}" for message in failed.values()]
        for name, text in profiles.items():
            print(f"\n=== profile: {name}, batch {batch}, {args.profile} steps ===\n{text}\n")
        print(_describe(at, synthetic_batches(at), peaks, args))
        print("build s: " + ", ".join(f"{r.name} {r.build_s:.1f}" for r in runs[batch].values()) + "\n")
    peaks["fp32"] = max(peaks["fp32"], matmul_peak(device, torch.float32, args.mm_size))
    peaks["bf16"] = max(peaks["bf16"], matmul_peak(device, torch.bfloat16, args.mm_size))
    print(f"measured matmul peak ({args.mm_size}^3): fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")  # fmt: skip
    if any(runs.values()):
        print(_table({b: r for b, r in runs.items() if r}, peaks, shape.device, args.spec_bf16_tflops))
    for failure in failures:
        print(f"did not fit: {failure}")
    for batch, results in runs.items():
        if "trainer" in results and "baseline" in results:
            ratio = results["trainer"].tokens_per_s / results["baseline"].tokens_per_s
            print(f"batch {batch}: trainer / baseline tokens/s {ratio:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
