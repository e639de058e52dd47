"""Export a checkpoint for serving: embedding tables as Parquet or .npy, the dense model as state dict + config.

    python -m trainer.export --checkpoint outputs/default/step_100 --out exported/ [--format parquet|npy]

Written to ``--out``:

- ``tables/<table>.parquet`` (columns ``id`` int64, ``embedding`` fixed-size list of float32), or
  ``tables/<table>.npy`` (``[rows, dim]`` float32; row i is id i) with ``tables/<table>.ids.npy``; ids are the
  hashed ids the reader produces, i.e. row numbers of the table;
- ``dense.pt``: ``{"config": <resolved TOML>, "state_dict": <DenseArch state>}``;
- ``config.toml``: the config of the run.

``load_exported(out)`` rebuilds a plain, single-process ``NextItemModel`` from these files: no process
group, no sharding, enough to score users against items offline. Runs in one process; the checkpoint may
come from any number of ranks (DCP gathers the shards).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp

from model.next_item import NextItemModel
from trainer.build import build_model
from trainer.checkpoint import CheckpointManager
from trainer.config import JobConfig, dump_config, load_config

logger = logging.getLogger(__name__)

# The trainer wraps the model in TrainStep, so checkpoint keys start with "model.".
_PREFIX = "model."
ExportFormat = Literal["parquet", "npy"]
# What every public function here takes for a folder: "exported/" as typed, or a Path.
StrPath = str | os.PathLike[str]


def load_checkpoint_model(checkpoint: StrPath, cfg: JobConfig | None = None) -> tuple[NextItemModel, JobConfig]:
    """An unsharded ``NextItemModel`` on the CPU holding the checkpoint's weights."""
    checkpoint = Path(checkpoint)
    cfg = cfg or load_config(checkpoint / "config.toml")
    CheckpointManager.read_meta(checkpoint, cfg)  # complete, and of this shape
    model = build_model(cfg)
    state = {_PREFIX + k: v for k, v in model.state_dict().items()}
    dcp.load({"model": state}, checkpoint_id=str(checkpoint))
    model.load_state_dict({k.removeprefix(_PREFIX): v for k, v in state.items()})
    return model.eval(), cfg


def export(checkpoint: StrPath, out: StrPath, fmt: ExportFormat = "parquet") -> list[Path]:
    """Write the export of ``checkpoint`` to ``out`` (see the module docstring); the files written."""
    checkpoint, out = Path(checkpoint), Path(out)
    managed = [f.name for f in load_config(checkpoint / "config.toml").data.features if f.managed_collision]
    if managed:
        # Their rows are slots, not ids: serving needs the id -> slot mapping (and the rule for ids without a
        # slot), which this format has no place for. Writing only the other tables would serve those
        # features from untrained rows, silently.
        raise ValueError(
            f"export of managed-collision (bucket 0) features {managed} is not supported: their rows are slots of "
            "an id -> slot mapping that the export format does not hold"
        )
    model, cfg = load_checkpoint_model(checkpoint)
    tables_dir = out / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, module in model.sparse.embedding_collection.embeddings.items():
        written += _write_table(tables_dir, name, module.weight.detach().numpy(), fmt)
    dense = out / "dense.pt"
    torch.save({"config": dump_config(cfg), "state_dict": model.dense.state_dict()}, dense)
    (out / "config.toml").write_text(dump_config(cfg))
    return [*written, dense, out / "config.toml"]


def _write_table(folder: Path, name: str, weight: np.ndarray, fmt: ExportFormat) -> list[Path]:
    ids = np.arange(weight.shape[0], dtype=np.int64)
    if fmt == "npy":
        np.save(folder / f"{name}.npy", weight)
        np.save(folder / f"{name}.ids.npy", ids)
        return [folder / f"{name}.npy", folder / f"{name}.ids.npy"]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(weight.reshape(-1), pa.float32()), weight.shape[1])
    path = folder / f"{name}.parquet"
    pq.write_table(pa.table({"id": ids, "embedding": embedding}), path)
    return [path]


def read_table(folder: StrPath, name: str) -> np.ndarray:
    """``[rows, dim]`` weights of an exported table, whichever format it was written in."""
    folder = Path(folder)
    npy = folder / "tables" / f"{name}.npy"
    if npy.is_file():
        return np.load(npy)
    table = pq.read_table(folder / "tables" / f"{name}.parquet")
    order = np.argsort(table.column("id").to_numpy())
    flat = table.column("embedding").combine_chunks().flatten().to_numpy()
    return flat.reshape(table.num_rows, -1)[order]


def load_exported(folder: StrPath) -> NextItemModel:
    """Rebuild the model from an export folder, on the CPU, in eval mode."""
    folder = Path(folder)
    if not (folder / "dense.pt").is_file():
        raise FileNotFoundError(f"{folder} is not an export folder: it has no dense.pt (trainer.export writes one)")
    dense = torch.load(folder / "dense.pt", weights_only=False)
    cfg = load_config(folder / "config.toml")
    model = build_model(cfg)
    model.dense.load_state_dict(dense["state_dict"])
    with torch.no_grad():
        for name, module in model.sparse.embedding_collection.embeddings.items():
            module.weight.copy_(torch.from_numpy(read_table(folder, name)))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a complete step_<N> checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the export to")
    parser.add_argument("--format", choices=["parquet", "npy"], default="parquet", help="embedding table format")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        files = export(args.checkpoint, args.out, args.format)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        logger.error("%s", e)
        return 1
    print(f"exported {args.checkpoint} to {args.out} in {time.perf_counter() - start:.1f}s:")
    for path in files:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
