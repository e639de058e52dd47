"""The checkout is a pip package: `pip install '.[cuda]'` resolves to the default matched set.

pip builds the metadata from pyproject.toml + setup.cfg in a temporary folder (no network, no install:
``--dry-run --no-deps --no-build-isolation``) and reports what it would install.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.util import REPO_ROOT
from trainer.deps import DEFAULT_SET


def _has_pip() -> bool:
    # From the metadata, not importlib.util.find_spec("pip"): setuptools' distutils shim takes a lookup of
    # "pip" for pip running and switches itself off for the whole process, and torch.compile's C++ build
    # (torch.utils.cpp_extension imports setuptools) then fails in every later test.
    try:
        importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_pip(), reason="this environment has no pip")
def test_pip_install_cuda_extra_names_the_default_set(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--report", str(report), ".[cuda]"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    (install,) = json.loads(report.read_text())["install"]
    metadata = install["metadata"]
    assert metadata["name"] == "seqrec"
    requires = set(metadata["requires_dist"])
    assert f"torch=={DEFAULT_SET.torch}" in requires
    assert f'fbgemm-gpu=={DEFAULT_SET.fbgemm}; extra == "cuda"' in requires
    assert f'torchrec=={DEFAULT_SET.torchrec}; extra == "cuda"' in requires
    # The CPU extra must not pull torchrec: its metadata requires the CUDA fbgemm-gpu (installed --no-deps).
    assert not any(r.startswith("torchrec") and '"cpu"' in r for r in requires)
    assert install["requested_extras"] == ["cuda"]
