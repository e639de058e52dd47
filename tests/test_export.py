"""The export folder's reload (trainer.export) and the evaluation entry's path handling, without training:
both take a folder as typed (``"exported/"``) as well as a ``Path``. The trained round trip is in
tests/test_checkpoint.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.util import REPO_ROOT
from trainer.build import build_model
from trainer.config import ConfigError, dump_config, load_config
from trainer.export import _write_table, export, load_exported, read_table


def _fake_export(folder: Path, fmt: str) -> dict[str, torch.Tensor]:
    """An export folder as trainer.export writes it, from a freshly built model (random weights)."""
    cfg = load_config(REPO_ROOT / "configs" / "default.toml", ["--model.num_layers=1"])
    model = build_model(cfg)
    (folder / "tables").mkdir(parents=True)
    for name, module in model.sparse.embedding_collection.embeddings.items():
        _write_table(folder / "tables", name, module.weight.detach().numpy(), fmt)  # type: ignore[arg-type]
    torch.save({"config": dump_config(cfg), "state_dict": model.dense.state_dict()}, folder / "dense.pt")
    (folder / "config.toml").write_text(dump_config(cfg))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_load_exported_takes_a_string_or_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    expected = _fake_export(tmp_path / "exported", fmt)
    monkeypatch.chdir(tmp_path)
    for folder in ("exported/", Path("exported"), os.fspath(tmp_path / "exported")):
        state = load_exported(folder).state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), folder
    table = next(iter(expected))
    assert read_table("exported", table.split(".")[-2]).shape == tuple(expected[table].shape)


def test_load_exported_of_another_folder_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} is not an export folder: it has no dense\.pt"):
        load_exported(str(tmp_path))


def test_export_takes_strings(tmp_path: Path) -> None:
    # Before any file is written, the checkpoint's config is looked up under the string path.
    with pytest.raises(ConfigError, match=r"config file not found: .*step_1/config\.toml"):
        export(str(tmp_path / "step_1"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
