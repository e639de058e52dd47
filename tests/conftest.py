"""Fixtures shared by several test files (process helpers are in tests/util.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.sample import SampleParams, ensure_sample_data


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sample data for the jobs the checkpoint and end-to-end tests launch: 4 files, so each of 2 ranks
    reads several, in stripes of 64 rows, so that the ranks hold unequal numbers of batches.

    Made once per session and only read by the jobs (each writes its outputs elsewhere).
    """
    return ensure_sample_data(tmp_path_factory.mktemp("sample"), SampleParams(users=1200, files=4, rows_per_stripe=64))
