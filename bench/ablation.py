"""Loss ablation: the seed's loss as written, then each fix added in turn, same data, steps and model.

``python -m bench.ablation [--config configs/amazon_games.toml] [--steps 800] [--nproc 2] [--out DIR]
[--section.key=value ...]``

Each variant is a real training run (torchrun, gloo on CPU) of ``--steps`` steps followed by the leave-one-out
validation of the final model (full ranking over the config's candidates). Prints a Markdown table; the
per-run logs and metrics stay in ``--out/<variant>/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Cumulative: each row keeps the fixes above it. The first row is the seed's loss (README, "What differs
# from the seed", fixes 1-4).
VARIANTS: list[tuple[str, list[str]]] = [
    (
        "seed loss as written (copy shift, padding in the loss, temperature 1, no masking, in-batch only)",
        ['--model.seed_loss_bugs=["copy_shift", "padding"]', "--model.temperature=1.0",
         "--model.mask_same_item=false", "--model.num_negatives=0"],
    ),  # fmt: skip
    ("+ next-item shift (t predicts t+1)", ['--model.seed_loss_bugs=["padding"]', "--model.temperature=1.0",
                                           "--model.mask_same_item=false", "--model.num_negatives=0"]),  # fmt: skip
    ("+ padding masked", ["--model.seed_loss_bugs=[]", "--model.temperature=1.0", "--model.mask_same_item=false",
                          "--model.num_negatives=0"]),  # fmt: skip
    ("+ temperature (config value)", ["--model.seed_loss_bugs=[]", "--model.mask_same_item=false",
                                      "--model.num_negatives=0"]),  # fmt: skip
    ("+ same-item false negatives masked", ["--model.seed_loss_bugs=[]", "--model.mask_same_item=true",
                                            "--model.num_negatives=0"]),  # fmt: skip
    ("+ sampled negatives (config value)", ["--model.seed_loss_bugs=[]", "--model.mask_same_item=true"]),
    ("+ log-Q correction (config value) = the recipe's loss", ["--model.seed_loss_bugs=[]", "--model.mask_same_item=true",
                                                             "--model.logq_correction=true"]),  # fmt: skip
]
# Every row but the last trains without the log-Q correction (the seed's loss has none).
_NO_LOGQ = "--model.logq_correction=false"


def run_variant(name: str, overrides: list[str], args: argparse.Namespace, extra: list[str], out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
        "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "-m", "trainer.main", "--config", args.config,
        f"--train.output_dir={out}", "--no-resume", f"--train.train_steps={args.steps}", "--train.train_epochs=0",
        f"--train.eval_steps={args.steps}", "--train.eval_epochs=0", "--train.early_stop_patience=0",
        "--train.save_best=false", "--train.save_steps=0", "--train.progress_bar=false", _NO_LOGQ,
        f"--train.log_steps={max(args.steps // 10, 1)}", *overrides, *extra,
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (out / "run.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise SystemExit(f"variant {name!r} failed (exit {proc.returncode}); see {out / 'run.log'}")
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "eval": evals[-1], "last": logs[-1], "minutes": (time.monotonic() - started) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/amazon_games.toml")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default="outputs/ablation")
    args, extra = parser.parse_known_args()
    rows = []
    for i, (name, overrides) in enumerate(VARIANTS):
        rows.append(run_variant(name, overrides, args, extra, Path(args.out) / f"variant_{i}"))
        r = rows[-1]
        print(f"done: {name}: {json.dumps(r['eval']['metrics'])} ({r['minutes']:.1f} min)", file=sys.stderr)
    print(f"\nconfig {args.config}, {args.steps} steps, {args.nproc} ranks; validation split, full ranking "
          f"({rows[0]['eval']['num_candidates']:,} candidates, {rows[0]['eval']['num_users']:,} users)\n")  # fmt: skip
    print("| loss | train loss (last window) | HR@10 | NDCG@10 | HR@50 | MRR |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["eval"]["metrics"]
        print(f"| {r['name']} | {r['last']['loss']:.3f} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['hr@50']:.4f} "
              f"| {m['mrr']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
