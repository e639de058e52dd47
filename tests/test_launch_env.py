"""`./launch.sh` with SEQREC_ENV=current: the Python environment already there is checked and used, never built.

Each test runs the real launch.sh. The prepared environments: this test run's own interpreter (it has
everything), and bare `python -m venv --without-pip` folders, empty or with fake distribution metadata (a
`*.dist-info/METADATA` is all `importlib.metadata` reads), so a mismatched set costs no install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.util import REPO_ROOT

LAUNCH = str(REPO_ROOT / "launch.sh")
# Exit code of trainer.main and trainer.deps for missing or broken dependencies.
EXIT_BROKEN_DEPENDENCIES = 3

# Everything the trainer needs besides torch, fbgemm and torchrec, as fake metadata.
OTHERS = {
    "numpy": "2.0.0",
    "pyarrow": "20.0.0",
    "torchx": "0.7.0",
    "tensordict": "0.15.3",
    "torchmetrics": "1.0.3",
    "pyre-extensions": "0.0.32",
    "tqdm": "4.66.0",
}


def _launch(*args: str, timeout_s: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """./launch.sh ARGS with this environment's SEQREC_* settings replaced by ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEQREC_") and k != "VIRTUAL_ENV"}
    # launch.sh exported the flavour this test run's environment was built for; keep it for that environment.
    if "SEQREC_FLAVOUR" in os.environ:
        base["SEQREC_FLAVOUR"] = os.environ["SEQREC_FLAVOUR"]
    return subprocess.run(
        [LAUNCH, *args], env={**base, **env}, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def _bare_venv(path: Path, distributions: dict[str, str] | None = None) -> Path:
    """A venv without pip (no registry needed) holding only the given fake distributions; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    (site,) = path.glob("lib/python*/site-packages")
    for name, version in (distributions or {}).items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return path / "bin" / "python"


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_a_complete_environment_is_used_without_creating_a_venv(tmp_path: Path) -> None:
    venv = tmp_path / "never"
    proc = _launch("setup", SEQREC_ENV="current", SEQREC_PYTHON=sys.executable, SEQREC_VENV=str(venv))
    assert proc.returncode == 0, proc.stderr
    assert not venv.exists()
    assert f"using the current environment of {sys.executable}" in proc.stderr
    assert "OK (" in proc.stdout + proc.stderr


def test_an_empty_environment_names_every_missing_package(tmp_path: Path) -> None:
    python = _bare_venv(tmp_path / "bare")
    # The flag form, and the interpreter found as python3 on PATH, as in an activated venv.
    path = f"{python.parent}{os.pathsep}{os.environ['PATH']}"
    proc = _launch("--use-current-env", "test", PATH=path, SEQREC_FLAVOUR="cpu", SEQREC_VENV=str(tmp_path / "v"))
    assert proc.returncode == EXIT_BROKEN_DEPENDENCIES, proc.stderr
    assert f"at {python.parent / 'python3'}:" in proc.stderr
    expected = ["torch", "fbgemm-gpu-cpu", "torchrec", *OTHERS, "pytest"]
    assert _last_line(proc) == f"missing: {', '.join(expected)}"
    assert "pip install torch==2.13.0" in proc.stderr
    assert "torch 2.11.0 + fbgemm-gpu[-cpu] 1.6.0 + torchrec 1.6.1" in proc.stderr  # the sets it compared with
    assert not (tmp_path / "v").exists()


def test_a_mismatched_set_names_the_packages_and_the_versions_needed(tmp_path: Path) -> None:
    # The lent GPU machine's torch with the default set's fbgemm and torchrec, and tqdm missing.
    fakes = {"torch": "2.11.0+cu130", "fbgemm-gpu": "1.8.0", "torchrec": "1.8.0", **OTHERS}
    del fakes["tqdm"]
    python = _bare_venv(tmp_path / "mixed", fakes)
    proc = _launch("setup", SEQREC_ENV="current", SEQREC_PYTHON=str(python), SEQREC_FLAVOUR="cuda")
    assert proc.returncode == EXIT_BROKEN_DEPENDENCIES, proc.stderr
    assert _last_line(proc) == (
        "missing: tqdm; mismatched: fbgemm-gpu 1.8.0 (needs 1.6.0), torchrec 1.8.0 (needs 1.6.1)"
    )
    assert "pip install --no-deps torchrec==1.6.1" in proc.stderr


def test_the_lent_gpu_machine_set_passes_the_version_check(tmp_path: Path) -> None:
    # Fake metadata, no modules: the versions are accepted, so the check goes on to import fbgemm_gpu.
    fakes = {"torch": "2.11.0+cu130", "fbgemm-gpu": "1.6.0", "torchrec": "1.6.1", **OTHERS}
    python = _bare_venv(tmp_path / "lent", fakes)
    proc = _launch("setup", SEQREC_ENV="current", SEQREC_PYTHON=str(python), SEQREC_FLAVOUR="cuda")
    assert proc.returncode == EXIT_BROKEN_DEPENDENCIES, proc.stderr
    assert "dependency check failed" not in proc.stderr
    assert "import fbgemm_gpu failed" in proc.stderr
    assert "expected torch 2.11.0, fbgemm 1.6.0, torchrec 1.6.1" in proc.stderr


def test_an_interpreter_that_is_not_there_is_named() -> None:
    proc = _launch("setup", SEQREC_ENV="current", SEQREC_PYTHON="/nonexistent/python3")
    assert proc.returncode == EXIT_BROKEN_DEPENDENCIES
    assert "/nonexistent/python3 not found" in _last_line(proc)


def test_an_unknown_mode_is_rejected() -> None:
    proc = _launch("setup", SEQREC_ENV="conda")
    assert proc.returncode == 1
    assert "SEQREC_ENV must be venv or current, got 'conda'" in _last_line(proc)


@pytest.mark.slow
def test_training_runs_in_the_current_environment_whatever_python_is_on_path(tmp_path: Path) -> None:
    # PATH without this environment: the ranks' `python` must still be SEQREC_PYTHON, and torchx its module.
    out = tmp_path / "run"
    proc = _launch(
        "--use-current-env", "--train.train_steps=2", "--train.log_steps=1", f"--train.output_dir={out}",
        timeout_s=300, PATH="/usr/bin:/bin", SEQREC_PYTHON=sys.executable, SEQREC_NPROC="1",
        SEQREC_VENV=str(tmp_path / "never"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "never").exists()
