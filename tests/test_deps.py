"""The start-up dependency check: accepts matched torch/fbgemm/torchrec sets, names what is wrong otherwise."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

from trainer.deps import (
    DEFAULT_SET,
    MATCHED_SETS,
    OPTIONAL_REQUIREMENTS,
    OTHER_REQUIREMENTS,
    TEST_REQUIREMENTS,
    DependencyError,
    check_dependencies,
    check_versions,
    optional_notes,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

CPU_SET = {
    "torch": "2.13.0+cpu",
    "fbgemm-gpu-cpu": "1.8.0",
    "torchrec": "1.8.0",
    "torchx": "0.7.0",
    "pyarrow": "26.0.1",
    "numpy": "2.4.6",
    "tensordict": "0.15.3",
    "torchmetrics": "1.0.3",
    "pyre-extensions": "0.0.32",
    "tqdm": "4.70.1",
}


def _with(**changes: str | None) -> dict[str, str]:
    """CPU_SET with distributions replaced (keyword names use _ for -) or removed (None)."""
    installed = dict(CPU_SET)
    for key, version in changes.items():
        name = key.replace("_", "-")
        if version is None:
            installed.pop(name, None)
        else:
            installed[name] = version
    return installed


def test_this_environment_passes() -> None:
    assert check_dependencies() in MATCHED_SETS


def test_matched_sets_are_accepted() -> None:
    assert check_versions(CPU_SET, "cpu") == DEFAULT_SET
    assert check_versions(CPU_SET, None) == DEFAULT_SET
    cuda = _with(torch="2.13.1+cu128", fbgemm_gpu_cpu=None, fbgemm_gpu="1.8.0+cu128")
    assert check_versions(cuda, "cuda") == DEFAULT_SET
    lent = _with(torch="2.11.0+cu130", fbgemm_gpu_cpu=None, fbgemm_gpu="1.6.0", torchrec="1.6.1")
    assert check_versions(lent, "cuda").torchrec == "1.6.1"


@pytest.mark.parametrize(
    ("installed", "flavour", "expected"),
    [
        (_with(torchrec="1.7.0"), "cpu", r"torchrec 1\.7\.0 .*pip install --no-deps torchrec==1\.8\.0"),
        (_with(torchrec=None), "cpu", r"torchrec is not installed.*pip install --no-deps torchrec==1\.8\.0"),
        (_with(fbgemm_gpu_cpu="1.6.0"), "cpu", r"fbgemm-gpu-cpu 1\.6\.0 .*pip install fbgemm-gpu-cpu==1\.8\.0"),
        (_with(fbgemm_gpu="1.8.0"), "cpu", r"both fbgemm-gpu-cpu 1\.8\.0 and fbgemm-gpu 1\.8\.0"),
        (_with(fbgemm_gpu_cpu=None), "cuda", r"fbgemm is not installed.*pip install fbgemm-gpu==1\.8\.0"),
        (CPU_SET, "cuda", r"needs fbgemm-gpu, but the CPU-only build fbgemm-gpu-cpu"),
        (_with(torch="2.12.0"), "cpu", r"torch 2\.12\.0 is not part of a supported set"),
        (_with(torch=None), "cpu", r"torch is not installed.*pip install torch==2\.13\.0"),
        (_with(torchx=None), "cpu", r"torchx is not installed.*torchx==0\.7\.0"),
        (_with(pyarrow=None), "cpu", r"pyarrow is not installed"),
        # The lent-GPU torch with the default torchrec is still a mismatch.
        (_with(torch="2.11.0", fbgemm_gpu_cpu="1.6.0"), "cpu", r"torchrec 1\.8\.0 .*needs 1\.6\.1"),
    ],
)
def test_mismatches_name_the_package_and_the_fix(installed: dict[str, str], flavour: str, expected: str) -> None:
    with pytest.raises(DependencyError, match=re.compile(expected, re.S)) as caught:
        check_versions(installed, flavour)
    assert "./launch.sh" in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(DependencyError) as caught:
        check_versions(_with(torchrec="1.6.1", fbgemm_gpu_cpu="1.7.0", pyarrow=None), "cpu")
    message = str(caught.value)
    assert "torchrec 1.6.1" in message and "fbgemm-gpu-cpu 1.7.0" in message and "pyarrow" in message


def test_without_torch_everything_else_is_still_listed() -> None:
    # One round of fixes, not one per run: the summary line names every missing package.
    with pytest.raises(DependencyError) as caught:
        check_versions({"torchrec": "1.6.1", "numpy": "2.0.0"}, "cpu", test=True)
    message = str(caught.value)
    expected_missing = ["torch", "fbgemm-gpu-cpu", *(n for n in OTHER_REQUIREMENTS if n != "numpy"), "pytest"]
    assert message.splitlines()[-1] == (
        f"missing: {', '.join(expected_missing)}; mismatched: torchrec 1.6.1 (needs 1.8.0)"
    )
    # Without a torch, the other two are judged against the set the fix installs.
    assert "torchrec 1.6.1 does not match torch 2.13.0 of the default set" in message
    assert {p.label for p in caught.value.problems if p.missing} == set(expected_missing)


def test_the_test_suite_needs_pytest_only_when_asked() -> None:
    assert check_versions(CPU_SET, "cpu") == DEFAULT_SET
    with pytest.raises(DependencyError, match=r"(?s)pytest is not installed.*missing: pytest$"):
        check_versions(CPU_SET, "cpu", test=True)
    assert check_versions(_with(pytest="9.0.0"), "cpu", test=True) == DEFAULT_SET


def test_optional_packages_are_notes_not_errors() -> None:
    assert check_versions(CPU_SET, "cpu") == DEFAULT_SET  # CPU_SET has neither numba nor tensorboard
    numba, tensorboard = optional_notes(CPU_SET)
    assert "numba is not installed" in numba and "numpy" in numba
    assert "tensorboard is not installed" in tensorboard and "train.tensorboard" in tensorboard
    assert optional_notes(_with(numba="0.68.1", tensorboard="2.21.0")) == []


def test_unknown_flavour_is_rejected() -> None:
    with pytest.raises(DependencyError, match="unknown flavour 'rocm'"):
        check_versions(CPU_SET, "rocm")


def _setup_cfg_pins() -> dict[str, str]:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO_ROOT / "setup.cfg")
    lines = [
        *cfg.get("options", "install_requires").split(),
        *cfg.get("options.extras_require", "cpu").split(),
        *cfg.get("options.extras_require", "cuda").split(),
        *cfg.get("seqrec", "no_deps_requires").split(),
    ]
    pins = {}
    for line in lines:
        name, _, version = line.partition("==")
        if version:
            pins[name] = version
    return pins


def test_default_set_matches_setup_cfg_pins() -> None:
    # launch.sh installs setup.cfg's pins and the trainer checks DEFAULT_SET: they must not drift apart.
    pins = _setup_cfg_pins()
    assert pins["torch"] == DEFAULT_SET.torch
    assert pins["fbgemm-gpu-cpu"] == pins["fbgemm-gpu"] == DEFAULT_SET.fbgemm
    assert pins["torchrec"] == DEFAULT_SET.torchrec
    assert pins["torchx"] == OTHER_REQUIREMENTS["torchx"].partition("==")[2]


def test_every_setup_cfg_requirement_is_checked() -> None:
    # SEQREC_ENV=current uses an environment launch.sh did not build: the check must cover all of it.
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO_ROOT / "setup.cfg")
    required = {
        line.strip()
        for line in cfg.get("options", "install_requires").splitlines()
        if line.strip() and not line.strip().startswith("#")
    }
    checked = {*OTHER_REQUIREMENTS.values(), *(r for r, _ in OPTIONAL_REQUIREMENTS.values())}
    assert required - {f"torch=={DEFAULT_SET.torch}"} == checked
    test_extra = cfg.get("options.extras_require", "test").split()
    assert set(TEST_REQUIREMENTS.values()) <= set(test_extra)
