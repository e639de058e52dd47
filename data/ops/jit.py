"""Optional numba: ``kernel`` and ``inline`` compile a function, or give None where numba is unavailable.

Why compiled: on a 2-core machine the reader's own work (hashing the string columns, laying batches out)
cost as much CPU as pyarrow's decode, and its numpy version is many array passes per 8-byte block or per
batch, each holding the GIL between passes. One compiled loop per array does the same work in a fraction
of the time and releases the GIL for all of it (``nogil``), so decode threads overlap for real.

numba is a dependency (setup.cfg), but the reader still works, slower, where it cannot be imported (a
platform or Python version without numba wheels) or when ``SEQREC_NO_NUMBA=1`` is set: the decorators then
return None instead of a kernel, and every entry point takes its numpy path because ``enabled()`` is False.
``enabled()`` logs which path runs, once per process. Callers look it up as ``jit.enabled()`` at call time,
so that tests can switch a whole process to the numpy paths by patching this one function.

Kernels are compiled on first use and cached on disk (``cache=True``: ``data/ops/__pycache__``, or numba's
user-wide cache when that is read-only; compiled per process where neither is writable), so a later process
loads them in about 0.1 s instead of compiling them again (seconds). numba keys a cached kernel on its own
source file only: after editing a helper that kernels of another file inline (``data.ops.strings``), delete
``data/ops/__pycache__`` so that they are compiled again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _import_njit() -> tuple[Callable[..., Any] | None, str | None]:
    """numba's ``njit``, or None and why not."""
    if os.environ.get("SEQREC_NO_NUMBA", "") not in ("", "0"):
        return None, "SEQREC_NO_NUMBA is set"
    try:
        from numba import njit
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return None, str(exc)
    return njit, None


njit, _UNAVAILABLE = _import_njit()
_announced = threading.Event()


def enabled() -> bool:
    """True when the compiled kernels run (numba importable and not disabled); logs the choice once."""
    if not _announced.is_set():
        _announced.set()
        if njit is None:
            logger.warning(
                "numba unavailable (%s): the reader hashes and lays out batches with numpy, several times "
                "slower per value; install numba (setup.cfg pins it) for the compiled kernels",
                _UNAVAILABLE,
            )
        else:
            logger.info("reader kernels: numba (compiled, GIL released)")
    return njit is not None


def _compiler(**options: Any) -> Callable[[F], F | None]:
    """A decorator compiling with ``options``, GIL released and cached on disk; None without numba."""

    def decorate(fn: F) -> F | None:
        if njit is None:
            return None
        try:
            return njit(nogil=True, cache=True, **options)(fn)
        except RuntimeError:  # no writable cache location (read-only install and home): compile per process
            return njit(nogil=True, **options)(fn)

    return decorate


# A loop called from Python. Indices are computed, never user input: bounds checks would only cost time.
kernel = _compiler(boundscheck=False)
# A helper that kernels call: inlined into each of them (numba IR), so it costs no call per value.
inline = _compiler(inline="always")
