"""Sharding dry run: plan a config's embedding tables for a cluster this machine need not have.

``python -m trainer.plan CONFIG --world-size N --local-world-size M --hbm-gb G [--ddr-gb D] [--batch-size B]
[--json] [--section.key=value ...]`` builds the model on the ``meta`` device (nothing is allocated), runs the
same TorchRec planner the trainer runs (``trainer.sharding.make_planner``) for a CUDA topology, and prints
the plan per table, each rank's HBM/DDR use and the planner's step-time estimate. No GPU and no process
group are needed. Exit codes: 0 planned, 1 the tables do not fit (the message names the biggest tables and
the capacity), 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.config import ConfigError, JobConfig, load_config

logger = logging.getLogger(__name__)

GIB = 1024**3


@dataclass
class TablePlan:
    table: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    hbm_bytes: int
    ddr_bytes: int


@dataclass
class RankUse:
    rank: int
    hbm_bytes: int
    ddr_bytes: int
    hbm_cap_bytes: int
    ddr_cap_bytes: int
    # The planner's estimate of this rank's embedding work per step (forward + backward compute and comms).
    perf_ms: float


@dataclass
class PlanReport:
    world_size: int
    local_world_size: int
    batch_size: int
    tables: list[TablePlan]
    ranks: list[RankUse]
    # max over ranks of perf_ms: the ranks wait for each other, so the slowest one sets the step time.
    estimate_ms: float
    sparse_optimizer: str
    notes: list[str] = field(default_factory=list)


class PlanDoesNotFitError(RuntimeError):
    """The planner found no placement within the given memory."""


def _recorder() -> Any:
    """A planner ``Stats`` that keeps the chosen sharding options (TorchRec's stats only log them)."""
    from torchrec.distributed.planner.types import Stats

    class _Recorder(Stats):
        def __init__(self) -> None:
            self.best_plan: list[Any] = []
            self.topology: Any = None

        def log(self, sharding_plan: Any, topology: Any, batch_size: int, storage_reservation: Any,
                num_proposals: int, num_plans: int, run_time: float, best_plan: list[Any],
                *args: Any, **kwargs: Any) -> None:  # fmt: skip
            self.best_plan, self.topology = best_plan, topology

    return _Recorder()


def dry_run(
    cfg: JobConfig,
    world_size: int,
    local_world_size: int,
    hbm_gb: float,
    ddr_gb: float | None = None,
    batch_size: int | None = None,
) -> PlanReport:
    """Plan ``cfg`` for ``world_size`` CUDA ranks with ``hbm_gb`` GiB each; raises PlanDoesNotFitError."""
    import torch
    from torchrec.distributed.planner.types import PlannerError

    from trainer.build import build_model
    from trainer.sharding import make_planner, make_sharders, prepare_for_planning, sparse_optimizer_name

    device = torch.device("cuda")  # the target; nothing is allocated on it
    model = build_model(cfg, torch.device("meta"))
    prepare_for_planning(model, world_size)
    recorder = _recorder()
    planner = make_planner(
        cfg, world_size, local_world_size, "cuda",
        hbm_cap_bytes=int(hbm_gb * GIB),
        ddr_cap_bytes=int(ddr_gb * GIB) if ddr_gb is not None else None,
        batch_size=batch_size, stats=[recorder],
    )  # fmt: skip
    try:
        planner.plan(model, make_sharders(cfg, device))
    except PlannerError as e:
        raise PlanDoesNotFitError(_does_not_fit_message(cfg, world_size, hbm_gb, ddr_gb, e)) from e
    notes = [
        f"{f.table}: managed collisions (bucket 0), {f.mc_capacity:,} rows, {f.mc_eviction_policy} eviction "
        f"every {f.mc_eviction_interval} steps"
        for f in cfg.data.features
        if f.managed_collision
    ]
    return _report(
        recorder, world_size, local_world_size, batch_size or cfg.data.batch_size,
        sparse_optimizer_name(cfg.optim, device), notes,
    )  # fmt: skip


def _report(
    recorder: Any, world_size: int, local_world_size: int, batch_size: int, optimizer: str, notes: list[str]
) -> PlanReport:
    hbm = [0] * world_size
    ddr = [0] * world_size
    perf = [0.0] * world_size
    tables = []
    for option in sorted(recorder.best_plan, key=lambda o: o.name):
        rows, dim = (int(x) for x in option.tensor.shape)
        ranks = sorted({int(s.rank) for s in option.shards})
        for shard in option.shards:
            hbm[shard.rank] += shard.storage.hbm
            ddr[shard.rank] += shard.storage.ddr
            perf[shard.rank] += shard.perf.total
        tables.append(
            TablePlan(
                table=option.name, rows=rows, dim=dim, sharding_type=option.sharding_type,
                compute_kernel=option.compute_kernel, ranks=ranks,
                hbm_bytes=sum(s.storage.hbm for s in option.shards),
                ddr_bytes=sum(s.storage.ddr for s in option.shards),
            )  # fmt: skip
        )
    devices = recorder.topology.devices
    ranks = [
        RankUse(r, hbm[r], ddr[r], devices[r].storage.hbm, devices[r].storage.ddr, perf[r]) for r in range(world_size)
    ]
    return PlanReport(
        world_size, local_world_size, batch_size, tables, ranks, max(perf) if perf else 0.0, optimizer, notes
    )


def _does_not_fit_message(
    cfg: JobConfig, world_size: int, hbm_gb: float, ddr_gb: float | None, error: Exception
) -> str:
    # Weights alone (fp32), biggest first: enough to see which table to shrink, shard to UVM or cache.
    sizes: dict[str, tuple[int, int]] = {f.table: (f.table_rows, f.emb_dim) for f in cfg.data.features}
    by_size = sorted(sizes.items(), key=lambda kv: -kv[1][0] * kv[1][1])
    biggest = ", ".join(f"{name} {rows:,} x {dim} = {rows * dim * 4 / GIB:.2f} GiB" for name, (rows, dim) in by_size[:3])
    total = sum(rows * dim * 4 for rows, dim in sizes.values()) / GIB
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    ddr = f" and {ddr_gb:g} GiB DDR" if ddr_gb is not None else " and TorchRec's default DDR"
    return (
        f"the embedding tables do not fit: {total:.2f} GiB of fp32 weights (plus optimizer state) on "
        f"{world_size} ranks x {hbm_gb:g} GiB HBM{ddr} (15% reserved for dense parameters and activations). "
        f"Biggest tables: {biggest}. Add ranks, HBM or host memory (UVM), or shrink the tables. "
        f"Planner: {first_line}"
    )


# ---------------------------------------------------------------------------------------------------------
# Output


def _nodes(r: PlanReport) -> str:
    n = r.world_size // r.local_world_size
    return f"{n} node" if n == 1 else f"{n} nodes"


def _gib(n: int) -> str:
    return f"{n / GIB:.3f}"


def _ranks_text(ranks: list[int], world_size: int) -> str:
    if len(ranks) == world_size and world_size > 1:
        return f"all {world_size}"
    if len(ranks) > 4 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_report(report: PlanReport, max_rank_rows: int = 8) -> str:
    r = report
    out = [
        f"plan for {r.world_size} ranks ({_nodes(r)} x {r.local_world_size} GPUs), "
        f"batch {r.batch_size} users/rank, sparse optimizer {r.sparse_optimizer}",
        "",
    ]
    out += _table(
        ["table", "rows", "dim", "sharding", "kernel", "ranks", "HBM GiB", "DDR GiB"],
        [
            [t.table, f"{t.rows:,}", str(t.dim), t.sharding_type, t.compute_kernel,
             _ranks_text(t.ranks, r.world_size), _gib(t.hbm_bytes), _gib(t.ddr_bytes)]
            for t in r.tables
        ],
    )  # fmt: skip
    out.append("")
    ranks = r.ranks
    shown = ranks if len(ranks) <= max_rank_rows else sorted(ranks, key=lambda u: -u.hbm_bytes)[:max_rank_rows]
    out += _table(
        ["rank", "HBM GiB", "HBM cap", "HBM %", "DDR GiB", "DDR cap", "est. ms/step"],
        [
            [str(u.rank), _gib(u.hbm_bytes), _gib(u.hbm_cap_bytes), f"{100 * u.hbm_bytes / u.hbm_cap_bytes:.1f}",
             _gib(u.ddr_bytes), _gib(u.ddr_cap_bytes), f"{u.perf_ms:.3f}"]
            for u in sorted(shown, key=lambda u: u.rank)
        ],
    )  # fmt: skip
    if len(ranks) > max_rank_rows:
        out.append(f"({max_rank_rows} of {len(ranks)} ranks shown: those with the most HBM in use)")
    hbm = [u.hbm_bytes for u in ranks]
    out += [
        "",
        f"HBM per rank: min {_gib(min(hbm))}, max {_gib(max(hbm))} GiB of {_gib(ranks[0].hbm_cap_bytes)}; "
        f"embedding step estimate (slowest rank, planner's model): {r.estimate_ms:.3f} ms",
        *(f"note: {n}" for n in r.notes),
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.plan",
        description="Plan the embedding sharding of CONFIG for a CUDA cluster (no GPU or process group needed). "
        "Unknown --section.key=value arguments override the config.",
    )
    parser.add_argument("config", help="TOML config file")
    parser.add_argument("--world-size", type=int, required=True, help="total number of GPUs (ranks)")
    parser.add_argument("--local-world-size", type=int, help="GPUs per node (default: min(8, world size))")
    parser.add_argument("--hbm-gb", type=float, required=True, help="HBM per GPU in GiB (e.g. 80 for an H100)")
    parser.add_argument("--ddr-gb", type=float, help="host memory per rank in GiB (default: TorchRec's)")
    parser.add_argument("--batch-size", type=int, help="users per rank and step (default: data.batch_size)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--verbose", action="store_true", help="also show TorchRec's own planner tables")
    return parser.parse_known_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if args.world_size < 1 or args.local_world_size < 1 or args.world_size % args.local_world_size:
        raise ConfigError(
            f"--world-size {args.world_size} must be a positive multiple of --local-world-size {args.local_world_size}"
        )
    if args.hbm_gb <= 0 or (args.ddr_gb is not None and args.ddr_gb <= 0):
        raise ConfigError("--hbm-gb and --ddr-gb must be > 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # ERROR at the root: TorchRec logs notes through the root logger ("Sharding spec not found" for each
    # data-parallel table); our own warnings (trainer.*) still show.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("trainer").setLevel(logging.WARNING)
    # TorchRec logs its planner tables (torchrec.distributed.planner.stats) at INFO; ours is shorter.
    logging.getLogger("torchrec").setLevel(logging.INFO if args.verbose else logging.ERROR)
    if args.local_world_size is None:
        args.local_world_size = min(8, args.world_size)
    try:
        _check_args(args)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"trainer.plan: bad config or arguments: {e}", file=sys.stderr)
        return 2
    try:
        report = dry_run(cfg, args.world_size, args.local_world_size, args.hbm_gb, args.ddr_gb, args.batch_size)
    except PlanDoesNotFitError as e:
        print(f"trainer.plan: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
