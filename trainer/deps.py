"""Start-up check that torch, fbgemm-gpu and torchrec form a matched set.

A mismatched set does not fail cleanly: it shows up as an ``undefined symbol`` while fbgemm_gpu loads its
shared libraries, or as a missing ``torch.ops.fbgemm.*`` op deep inside TorchRec. The trainer therefore calls
:func:`check_dependencies` first thing, before it imports torchrec, and every problem found becomes one
:class:`DependencyError` that says what is wrong and what to install.

``python -m trainer.deps [--flavour cpu|cuda] [--test]`` runs the same check and prints ``OK`` with the versions,
or every problem at once and exits 3 (the trainer's exit code for broken dependencies). ``./launch.sh`` runs it
after installing ``.venv``, and in place of installing with ``SEQREC_ENV=current`` (an existing environment).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import re
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FLAVOURS = ("cpu", "cuda")

# Both builds install into the same `fbgemm_gpu/` folder, so exactly one of them may be present.
FBGEMM_CPU = "fbgemm-gpu-cpu"
FBGEMM_CUDA = "fbgemm-gpu"

# An op every fbgemm build registers and TorchRec's jagged tensors use; its absence means the libraries
# did not load (or loaded from a build that does not match torch).
PROBE_OP = "jagged_to_padded_dense"
# An op with a CUDA kernel in the CUDA build and none in the CPU build: tells the two apart at run time.
CUDA_PROBE_OP = "asynchronous_complete_cumsum"

FIX_HINT = "Or let ./launch.sh install the matched set into .venv: ./launch.sh setup (without SEQREC_ENV=current)."

# `python -m trainer.deps` exits with it on a failed check, as trainer.main does.
EXIT_BROKEN_DEPENDENCIES = 3


@dataclass(frozen=True)
class Problem:
    """One distribution that is absent, or present in a version or build that cannot work."""

    label: str  # for the summary line: the distribution, and for a mismatch what is installed and needed
    missing: bool  # absent (else installed in the wrong version or build)
    text: str  # what is wrong and the command that fixes it


class DependencyError(RuntimeError):
    """The installed packages cannot run the trainer; the message says what to install."""

    def __init__(self, message: str, problems: tuple[Problem, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class MatchedSet:
    """torch, fbgemm and torchrec versions that were built against each other.

    Versions are the exact pins to install; any patch release of the same major.minor is accepted.
    """

    label: str
    torch: str
    fbgemm: str
    torchrec: str


# The first entry is the default, pinned in setup.cfg (a test keeps the two in step). Others are the
# combinations known to work on specific machines: the lent GPU machine has Python 3.12 with torch
# 2.11.0+cu130 preinstalled and no package registry; fbgemm-gpu 1.6.0 (linked against libcudart.so.13) and
# torchrec 1.6.1 are the matched set for that torch.
MATCHED_SETS: tuple[MatchedSet, ...] = (
    MatchedSet("default", torch="2.13.0", fbgemm="1.8.0", torchrec="1.8.0"),
    MatchedSet("lent GPU machine", torch="2.11.0", fbgemm="1.6.0", torchrec="1.6.1"),
)
DEFAULT_SET = MATCHED_SETS[0]

# The rest of setup.cfg's install_requires (a test keeps the two in step), with the requirement to install
# when missing. Only their presence is checked: their versions are not tied to torch's build, and an
# environment that came with the host (SEQREC_ENV=current) may well hold other releases that work.
OTHER_REQUIREMENTS: dict[str, str] = {
    "numpy": "numpy>=1.26",
    "pyarrow": "pyarrow>=16",
    "torchx": "torchx==0.7.0",
    "tensordict": "tensordict==0.15.3",
    "torchmetrics": "torchmetrics==1.0.3",
    "pyre-extensions": "pyre-extensions==0.0.32",
    "tqdm": "tqdm>=4.66",
}
# What `./launch.sh test` needs on top (the rest of the test extra only enables optional tests).
TEST_REQUIREMENTS: dict[str, str] = {"pytest": "pytest>=8"}
# Used where installed; without them the trainer runs, with less (name -> (requirement, what is lost)).
OPTIONAL_REQUIREMENTS: dict[str, tuple[str, str]] = {
    "numba": ("numba==0.68.1", "the reader's kernels fall back to numpy, several times slower per value"),
    "tensorboard": ("tensorboard==2.21.0", "no TensorBoard scalars (train.tensorboard); metrics.jsonl is still written"),
}

CHECKED_DISTRIBUTIONS = (
    "torch", FBGEMM_CPU, FBGEMM_CUDA, "torchrec", *OTHER_REQUIREMENTS, *TEST_REQUIREMENTS, *OPTIONAL_REQUIREMENTS
)


def installed_versions() -> dict[str, str]:
    """Versions of the checked distributions that are installed (absent ones are left out)."""
    versions: dict[str, str] = {}
    for name in CHECKED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _series(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version such as ``2.13.0+cpu``; None when it does not start with X.Y."""
    match = re.match(r"^(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _same_series(installed: str, pinned: str) -> bool:
    series = _series(installed)
    return series is not None and series == _series(pinned)


def _fbgemm_distribution(flavour: str | None) -> str:
    return FBGEMM_CUDA if flavour == "cuda" else FBGEMM_CPU


def _fbgemm_install(matched: MatchedSet, flavour: str | None) -> str:
    if flavour is None:
        return f"pip install {FBGEMM_CPU}=={matched.fbgemm} (CPU) or pip install {FBGEMM_CUDA}=={matched.fbgemm} (CUDA)"
    return f"pip install {_fbgemm_distribution(flavour)}=={matched.fbgemm}"


def _select_set(torch_version: str) -> MatchedSet | None:
    return next((s for s in MATCHED_SETS if _same_series(torch_version, s.torch)), None)


def _describe_sets() -> str:
    return "; ".join(
        f"torch {s.torch} + fbgemm-gpu[-cpu] {s.fbgemm} + torchrec {s.torchrec} ({s.label})" for s in MATCHED_SETS
    )


def _fbgemm_problems(
    installed: dict[str, str], matched: MatchedSet, against: str, flavour: str | None
) -> list[Problem]:
    has_cpu, has_cuda = FBGEMM_CPU in installed, FBGEMM_CUDA in installed
    if has_cpu and has_cuda:
        # Both wheels write fbgemm_gpu/; whichever was installed last silently owns some of the files.
        keep = _fbgemm_distribution(flavour)
        text = (
            f"both {FBGEMM_CPU} {installed[FBGEMM_CPU]} and {FBGEMM_CUDA} {installed[FBGEMM_CUDA]} are installed; "
            f"they share the fbgemm_gpu/ folder. Fix: pip uninstall -y {FBGEMM_CPU} {FBGEMM_CUDA} && "
            f"pip install {keep}=={matched.fbgemm}"
        )
        return [Problem(f"{FBGEMM_CPU} and {FBGEMM_CUDA} both installed", False, text)]
    if not has_cpu and not has_cuda:
        label = _fbgemm_distribution(flavour) if flavour else f"{FBGEMM_CPU} or {FBGEMM_CUDA}"
        return [Problem(label, True, f"fbgemm is not installed. Fix: {_fbgemm_install(matched, flavour)}")]
    if flavour == "cuda" and has_cpu:
        text = (
            f"the cuda flavour (GPU training) needs {FBGEMM_CUDA}, but the CPU-only build {FBGEMM_CPU} "
            f"is installed. Fix: pip uninstall -y {FBGEMM_CPU} && pip install {FBGEMM_CUDA}=={matched.fbgemm} "
            "(or set SEQREC_FLAVOUR=cpu to train on the CPU)"
        )
        return [Problem(f"{FBGEMM_CPU} (CPU-only build; cuda needs {FBGEMM_CUDA})", False, text)]
    name = FBGEMM_CUDA if has_cuda else FBGEMM_CPU
    if not _same_series(installed[name], matched.fbgemm):
        text = (
            f"{name} {installed[name]} does not match {against} (needs {matched.fbgemm}). "
            f"Fix: pip install {name}=={matched.fbgemm}"
        )
        return [Problem(f"{name} {installed[name]} (needs {matched.fbgemm})", False, text)]
    return []


def _torchrec_problems(installed: dict[str, str], matched: MatchedSet, against: str) -> list[Problem]:
    # --no-deps: torchrec's metadata requires the CUDA fbgemm-gpu, which would overwrite fbgemm-gpu-cpu.
    fix = f"Fix: pip install --no-deps torchrec=={matched.torchrec}"
    version = installed.get("torchrec")
    if version is None:
        return [Problem("torchrec", True, f"torchrec is not installed. {fix}")]
    if not _same_series(version, matched.torchrec):
        text = f"torchrec {version} does not match {against} (needs {matched.torchrec}). {fix}"
        return [Problem(f"torchrec {version} (needs {matched.torchrec})", False, text)]
    return []


def _torch_problems(installed: dict[str, str]) -> list[Problem]:
    fix = f"Fix: pip install torch=={DEFAULT_SET.torch}"
    version = installed.get("torch")
    if version is None:
        return [Problem("torch", True, f"torch is not installed. {fix}")]
    if _select_set(version) is None:
        text = f"torch {version} is not part of a supported set. {fix}"
        return [Problem(f"torch {version} (unsupported)", False, text)]
    return []


def _missing(installed: dict[str, str], requirements: dict[str, str]) -> list[Problem]:
    return [
        Problem(name, True, f"{name} is not installed. Fix: pip install '{requirement}'")
        for name, requirement in requirements.items()
        if name not in installed
    ]


def _failure_message(problems: list[Problem]) -> str:
    missing = [p.label for p in problems if p.missing]
    mismatched = [p.label for p in problems if not p.missing]
    # Last, on one line: the line a launcher's log shows when it keeps only the tail.
    summary = "; ".join(
        f"{kind}: {', '.join(labels)}" for kind, labels in (("missing", missing), ("mismatched", mismatched)) if labels
    )
    return "\n".join(
        [
            f"dependency check failed for Python {sys.version.split()[0]} at {sys.executable}:",
            *(f"- {p.text}" for p in problems),
            f"Supported sets: {_describe_sets()}.",
            FIX_HINT,
            summary,
        ]
    )


def check_versions(installed: dict[str, str], flavour: str | None = None, *, test: bool = False) -> MatchedSet:
    """Check installed distribution versions (name -> version) against the matched sets.

    ``flavour`` is "cpu", "cuda" or None (either fbgemm build accepted); ``test`` also requires what the test
    suite needs. Returns the matched set in use; raises DependencyError listing every problem otherwise.
    """
    if flavour is not None and flavour not in FLAVOURS:
        raise DependencyError(f"unknown flavour {flavour!r}; expected one of {', '.join(FLAVOURS)}")
    torch_version = installed.get("torch")
    selected = _select_set(torch_version) if torch_version else None
    # Without a usable torch, fbgemm and torchrec are judged against the default set: the one the fix installs.
    matched = selected or DEFAULT_SET
    against = f"torch {torch_version}" if selected else f"torch {DEFAULT_SET.torch} of the {DEFAULT_SET.label} set"
    problems = _torch_problems(installed)
    problems += _fbgemm_problems(installed, matched, against, flavour) + _torchrec_problems(installed, matched, against)
    problems += _missing(installed, OTHER_REQUIREMENTS)
    if test:
        problems += _missing(installed, TEST_REQUIREMENTS)
    if problems:
        raise DependencyError(_failure_message(problems), tuple(problems))
    return matched


def optional_notes(installed: dict[str, str]) -> list[str]:
    """One line per optional package that is absent: what is lost and what to install."""
    return [
        f"note: {name} is not installed, so {lost}. Fix: pip install '{requirement}'"
        for name, (requirement, lost) in OPTIONAL_REQUIREMENTS.items()
        if name not in installed
    ]


def _import(module: str, matched: MatchedSet) -> None:
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as error:
        # An `undefined symbol` here means the shared libraries were built against another torch.
        raise DependencyError(
            f"import {module} failed: {error}\nThe installed torch/fbgemm/torchrec are not a matched set "
            f"(expected torch {matched.torch}, fbgemm {matched.fbgemm}, torchrec {matched.torchrec}). "
            f"Reinstall them together.\n{FIX_HINT}"
        ) from error


def _check_fbgemm_ops(matched: MatchedSet, flavour: str) -> None:
    import fbgemm_gpu
    import torch

    if not hasattr(torch.ops.fbgemm, PROBE_OP):
        raise DependencyError(
            f"fbgemm_gpu imported but torch.ops.fbgemm.{PROBE_OP} is missing: its libraries did not load. "
            f"Reinstall {_fbgemm_install(matched, flavour)}.\n{FIX_HINT}"
        )
    if flavour != "cuda":
        return
    variant = getattr(fbgemm_gpu, "__variant__", "INTERNAL")
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"fbgemm::{CUDA_PROBE_OP}", "CUDA")
    if variant not in ("cuda", "rocm", "INTERNAL") or not has_cuda_kernel:
        raise DependencyError(
            f"fbgemm_gpu is the {variant!r} build without CUDA kernels, but CUDA is in use. "
            f"Fix: pip uninstall -y {FBGEMM_CPU} {FBGEMM_CUDA} && pip install {FBGEMM_CUDA}=={matched.fbgemm}"
            f"\n{FIX_HINT}"
        )


def _detect_flavour() -> str:
    # SEQREC_FLAVOUR is what launch.sh built the environment for; it also lets a GPU machine run on CPU.
    requested = os.environ.get("SEQREC_FLAVOUR")
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_dependencies(flavour: str | None = None, *, test: bool = False) -> MatchedSet:
    """Check versions, then that fbgemm_gpu and torchrec import and register their ops.

    ``flavour`` defaults to $SEQREC_FLAVOUR, else "cuda" when torch sees a GPU, else "cpu"; ``test`` also
    requires the test suite's packages. Raises DependencyError with what to install; returns the matched set in use.
    """
    installed = installed_versions()
    if flavour is None and "torch" in installed:
        _import("torch", DEFAULT_SET)
        flavour = _detect_flavour()
    matched = check_versions(installed, flavour, test=test)
    assert flavour is not None  # check_versions raised if torch was missing
    _import("fbgemm_gpu", matched)
    _check_fbgemm_ops(matched, flavour)
    _import("torchrec", matched)
    logger.debug("dependencies OK: %s (flavour %s)", installed, flavour)
    return matched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check that this Python environment can run seqrec: torch, fbgemm-gpu and torchrec a matched "
        f"set, the other dependencies present. Exits {EXIT_BROKEN_DEPENDENCIES} naming every problem otherwise."
    )
    parser.add_argument("--flavour", choices=FLAVOURS, default=None, help="default: $SEQREC_FLAVOUR or auto-detect")
    parser.add_argument("--test", action="store_true", help="also require what the test suite needs (pytest)")
    args = parser.parse_args(argv)
    try:
        matched = check_dependencies(args.flavour, test=args.test)
    except DependencyError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return EXIT_BROKEN_DEPENDENCIES
    installed = installed_versions()
    for note in optional_notes(installed):
        print(note, file=sys.stderr)
    versions = ", ".join(f"{name} {version}" for name, version in installed.items())
    print(f"OK ({matched.label} set): {versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
