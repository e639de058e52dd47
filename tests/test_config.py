"""Config loading: every shipped file validates; bad keys and types are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import ConfigError, JobConfig, dump_config, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(dump_config(cfg))
    assert load_config(resolved) == cfg


def test_seq2seq_config_is_the_seed() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "seq2seq.toml")
    m, d = cfg.model, cfg.data
    assert (m.hidden_size, m.num_layers, m.nhead, m.dim_feedforward, m.dropout, m.emb_size) == (
        1024, 8, 8, 1024, 0.1, 512
    )
    assert (d.batch_size, d.seq_len, d.truncate_side, d.check_length) == (16, 1024, "right", False)
    assert (cfg.optim.dense_lr, cfg.optim.sparse_lr) == (1e-3, 1e-3)
    assert (cfg.train.log_steps, cfg.train.save_steps) == (10, 2000)
    feats = {f.name: f for f in d.features}
    assert list(feats) == ["item_id", "cate_id", "behavior_id", "timestamp"]
    assert all(f.emb_dim == 128 and f.shard_name == f.name for f in feats.values())
    assert (feats["item_id"].hash_type, feats["item_id"].hash_bucket_size) == ("none", 2_048_000)
    assert (feats["cate_id"].hash_type, feats["cate_id"].hash_bucket_size) == ("none", 2048)
    assert (feats["timestamp"].hash_type, feats["timestamp"].hash_bucket_size) == ("murmur", 2_048_000)
    assert feats["behavior_id"].hash_type == "murmur"
    # Seed-exact loss settings: no temperature, no false-negative masking, bf16 autocast.
    assert (m.temperature, m.mask_same_item, m.bf16) == (1.0, False, True)


def _write(tmp_path: Path, text: str) -> Path:
    base = (Path(__file__).resolve().parents[1] / "configs" / "default.toml").read_text()
    path = tmp_path / "c.toml"
    path.write_text(base + text)
    return path


def test_overrides_are_typed_and_applied(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    cfg = load_config(path, ["--model.num_layers=4", "--train.train_steps=50", "--data.data_paths=/x/y,/z",
                             "--model.temperature=0.05", "--data.features.1.hash_bucket_size=128"])
    assert cfg.model.num_layers == 4 and cfg.train.train_steps == 50
    assert cfg.data.paths() == ["/x/y", "/z"]
    assert cfg.model.temperature == 0.05
    assert cfg.data.features[1].hash_bucket_size == 128


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.num_layer=4", "model.num_layer"),
        ("--modle.num_layers=4", "modle"),
        ("--model.num_layers=four", "model.num_layers"),
        ("--model.num_layers=true", "model.num_layers"),
        ("--model.dropout=high", "model.dropout"),
        ("--data.truncate_side=middle", "data.truncate_side"),
        ("--data.features.9.emb_dim=4", "data.features.9"),
        ("--data.features.0.emb_dimm=4", "data.features.0.emb_dimm"),
        ("--model.nhead=3", "model.nhead"),
        ("--model.emb_size=100", "model.emb_size"),
        ("--data.batch_size=0", "data.batch_size"),
        ("--data.read_workers=-1", "data.read_workers"),
        ("--data.item_feature=nope", "data.item_feature"),
        ("--data.data_paths=", "data.data_paths"),
        ("--data.features.0.emb_dim=16", "emb_dim"),
        ("--train.train_steps=0", "train.train_steps"),
        ("model.num_layers", "--section.key=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(_write(tmp_path, ""), [override])


def test_more_negatives_than_a_batch_has_bags_is_an_error(tmp_path: Path) -> None:
    # One negative per bag of the batch's B x T grid: 4 x 8 = 32 bags carry at most 32 negatives.
    base = ["--data.batch_size=4", "--data.seq_len=8", '--model.target_features=["item_id"]']
    load_config(_write(tmp_path, ""), [*base, "--model.num_negatives=32"])
    with pytest.raises(ConfigError, match=r"model\.num_negatives = 33 .*4 x 8 = 32.*at most 32"):
        load_config(_write(tmp_path, ""), [*base, "--model.num_negatives=33"])


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(_write(tmp_path, "\n[train.lr]\nvalue = 1\n"))


def test_unbounded_hash_bucket_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hash_bucket_size = 0"):
        load_config(_write(tmp_path, ""), ["--data.features.2.hash_bucket_size=0"])


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_parse_override_keeps_bare_words_as_strings() -> None:
    assert parse_override("--data.data_paths=/a/b.orc") == ("data.data_paths", "/a/b.orc")
    assert parse_override("--model.dropout=0.2") == ("model.dropout", 0.2)


def test_every_fault_is_reported_at_once_with_the_file_and_a_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    overrides = ["--model.nhed=4", "--train.batch_size=8", "--model.encoder=hstuu"]
    with pytest.raises(ConfigError) as raised:
        load_config(path, overrides)
    text = str(raised.value)
    assert text.startswith(f"{path}: 3 problems:")
    assert "did you mean 'model.nhead'? (from the override --model.nhed=4)" in text
    assert "did you mean 'data.batch_size'?" in text
    assert "model.encoder: 'hstuu' is not one of ['transformer', 'hstu']; did you mean 'hstu'?" in text
    assert len(raised.value.faults) == 3


def test_every_rule_fault_is_reported_at_once(tmp_path: Path) -> None:
    overrides = ["--model.nhead=3", "--data.batch_size=0", "--optim.dense_lr=0", "--eval.best_metric=auc"]
    with pytest.raises(ConfigError) as raised:
        load_config(_write(tmp_path, ""), overrides)
    text = str(raised.value)
    for key in ("model.nhead", "data.batch_size", "optim.dense_lr", "eval.best_metric"):
        assert key in text, (key, text)
