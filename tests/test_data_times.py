"""Event times (``data.time_feature``): read next to the features, cut like them, laid out per position, and
carried to the model inside the batch's packed layout; bad time columns are errors naming the column."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from data.config import DataConfig, FeatureConfig
from data.reader import SequenceReader
from tests.test_data_reader import L_INT, LL_INT, LL_STR, write_orc

ITEMS = [[[1], [2], [3]], [[4], [5]], [[6]]]


def _config(path: Path, time_feature: str, **kwargs: object) -> DataConfig:
    settings: dict = dict(batch_size=2, seq_len=10, read_threads=1, drop_remainder=False, time_feature=time_feature)
    settings.update(kwargs)
    features = [FeatureConfig("item_id", num_embeddings=100)]
    if time_feature == "timestamp":  # the seed's schema: the time column is a hashed feature too
        features.append(FeatureConfig("timestamp", hash_type="murmur", hash_bucket_size=64))
    return DataConfig(data_paths=str(path), features=features, **settings)


def test_string_times_of_a_hashed_feature_become_seconds_per_position(tmp_path: Path) -> None:
    times = [[["100"], ["160"], ["3700"]], [["5"], ["6"]], [["9"]]]
    path = write_orc(tmp_path / "a.orc", {"item_id": pa.array(ITEMS, LL_INT), "timestamp": pa.array(times, LL_STR)})
    batches = list(SequenceReader(_config(path, "timestamp", holdout_positions=1)))
    # The last position is held out of every user, times included; padding is -1 (never attended to).
    assert batches[0].timestamps.tolist() == [[100, 160], [5, -1]]
    assert batches[0].item_ids.tolist() == [[1, 2], [4, -1]]
    assert len(batches) == 1  # the third user had one position: nothing left after the holdout
    layout = batches[0].to(torch.device("cpu")).layout
    assert layout is not None and layout.times is not None and layout.times.tolist() == [100, 160, 5]


def test_an_integer_time_column_that_is_not_a_feature(tmp_path: Path) -> None:
    path = write_orc(tmp_path / "a.orc", {"item_id": pa.array(ITEMS, LL_INT),
                                          "ts": pa.array([[7, 8, 9], [1, 2], [3]], L_INT)})  # fmt: skip
    cfg = _config(path, "ts", truncate_side="left", seq_len=2)
    batches = list(SequenceReader(cfg))
    assert [b.timestamps.tolist() for b in batches] == [[[8, 9], [1, 2]], [[3]]]  # each batch padded to its own longest user
    # Decoding in worker processes gives the same times.
    workers = list(SequenceReader(DataConfig(**{**cfg.__dict__, "read_workers": 1})))
    assert [b.timestamps.tolist() for b in workers] == [b.timestamps.tolist() for b in batches]


def test_bad_time_columns_are_errors_naming_the_column(tmp_path: Path) -> None:
    items = pa.array(ITEMS, LL_INT)
    missing = write_orc(tmp_path / "missing.orc", {"item_id": items})
    with pytest.raises(ValueError, match=r"column 'ts' is missing in .*missing\.orc"):
        SequenceReader(_config(missing, "ts"))
    words = write_orc(tmp_path / "words.orc", {"item_id": items, "ts": pa.array([["a", "b", "c"], ["d", "e"], ["f"]], pa.list_(pa.string()))})
    with pytest.raises(ValueError, match=r"time column 'ts' in .*words\.orc.*integers or decimal strings"):
        list(SequenceReader(_config(words, "ts")))
    short = write_orc(tmp_path / "short.orc", {"item_id": items, "ts": pa.array([[1, 2], [3, 4], [5]], L_INT)})
    with pytest.raises(ValueError, match=r"time column 'ts' in .*short\.orc.*row 0 has 2 positions but item column"):
        list(SequenceReader(_config(short, "ts")))
