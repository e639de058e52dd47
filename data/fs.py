"""Local and remote filesystems for the reader: a path or URI -> a ``pyarrow.fs.FileSystem`` and a path in it.

* No scheme (or ``file://``): the local filesystem.
* ``s3://``, ``gs://``, ``hdfs://``, ``abfs://`` ...: pyarrow's native filesystem when this pyarrow build has
  it (``FileSystem.from_uri``), else any fsspec implementation (``s3fs``, ``gcsfs``, ``adlfs`` ...) wrapped
  with ``FSSpecHandler``. When neither can serve the scheme, the error names the package to install.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

# The usual fsspec implementation per scheme, only for the error message when it is missing.
_FSSPEC_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "hdfs": "pyarrow with libhdfs (or fsspec's webhdfs)",
    "abfs": "adlfs",
    "az": "adlfs",
    "oss": "ossfs",
    "http": "aiohttp",
    "https": "aiohttp",
}


@dataclass(frozen=True)
class Location:
    """A file or folder: the filesystem, the path inside it, and the text shown in messages."""

    fs: pafs.FileSystem
    path: str
    shown: str
    local: bool

    def child(self, path: str) -> Location:
        """A location on the same filesystem (``path`` as the filesystem lists it), shown as a URI that
        ``resolve`` maps back to it (keeping the original's scheme and host, e.g. ``hdfs://nn:8020``)."""
        if self.local:
            return Location(self.fs, path, path, True)
        shown, own = self.shown.rstrip("/"), self.path.rstrip("/")
        if shown.endswith(own):  # hdfs://nn:8020/dir -> /dir
            return Location(self.fs, path, shown[: len(shown) - len(own)] + path, False)
        # s3://bucket/dir -> bucket/dir; memory://dir -> /dir: the path has no host part.
        prefix = shown[: len(shown) - len(own.lstrip("/"))]
        return Location(self.fs, path, prefix + path.lstrip("/"), False)


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def _missing_package(uri: str, scheme: str, detail: BaseException | None) -> ImportError:
    package = _FSSPEC_PACKAGES.get(scheme)
    if package:
        wanted = f"the package {package} (with fsspec)"
    else:
        wanted = f"fsspec and an fsspec implementation for {scheme!r}"
    reason = f" ({detail})" if detail else ""
    return ImportError(
        f"cannot read {uri}: no filesystem for '{scheme}://' is installed; install {wanted} "
        f"or a pyarrow build with {scheme} support{reason}"
    )


def _from_fsspec(uri: str, scheme: str) -> Location:
    try:
        import fsspec
    except ImportError as exc:
        raise _missing_package(uri, scheme, exc) from exc
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as exc:  # fsspec knows the scheme but its implementation package is missing
        raise _missing_package(uri, scheme, exc) from exc
    except ValueError as exc:  # fsspec does not know the scheme at all
        raise _missing_package(uri, scheme, exc) from exc
    return Location(pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path, uri, False)


def resolve(uri: str) -> Location:
    """The filesystem serving ``uri``; raises ImportError naming the package when none is installed."""
    scheme = scheme_of(uri)
    if scheme in ("", "file"):
        path = uri[len("file://") :] if scheme == "file" else uri
        return Location(pafs.LocalFileSystem(), path, path, True)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        return Location(fs, path, uri, False)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, ImportError) as exc:
        # This pyarrow build has no native filesystem for the scheme: fall back to fsspec.
        logger.debug("pyarrow cannot open %s natively (%s); trying fsspec", uri, exc)
    return _from_fsspec(uri, scheme)
