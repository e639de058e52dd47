"""Plan a pass over the input: files -> read units -> this rank's units.

``list_input_files`` expands ``cfg.data_paths`` (local paths or URIs, see ``data.fs``) to data files;
``enumerate_units`` splits them into ``ReadUnit`` s (one ORC stripe or Parquet row group each, the smallest
piece a rank reads on its own) in a fixed order, validating every file's schema up front so that a bad
file fails at start-up rather than hours into training; ``assign_units`` deals unit i to rank
``i % world_size``. Only file footers are read here, never column data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.orc as orc
import pyarrow.parquet as pq

from data.config import DataConfig, FeatureConfig
from data.fs import Location, resolve
from data.ids import check_leaf_type, is_supported_leaf
from data.ops.ragged import is_list_type

FileFormat = Literal["orc", "parquet"]
_EXTENSIONS: dict[str, FileFormat] = {".orc": "orc", ".parquet": "parquet", ".parq": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class ReadUnit:
    """The smallest piece of input a rank reads on its own: one ORC stripe or one Parquet row group."""

    path: str  # as shown in messages: a local path or a URI
    fmt: FileFormat
    index: int
    # Where to open it (None: ``path`` on the local filesystem). Not part of the unit's identity.
    fs: pafs.FileSystem | None = field(default=None, compare=False, repr=False)
    fs_path: str = field(default="", compare=False, repr=False)

    @property
    def label(self) -> str:
        kind = "stripe" if self.fmt == "orc" else "row group"
        return f"{self.path} ({kind} {self.index})"

    def open(self) -> str | pa.NativeFile:
        return self.path if self.fs is None else self.fs.open_input_file(self.fs_path)


def _is_marker(name: str) -> bool:
    # Hidden files (.crc, .DS_Store) and job markers (_SUCCESS, _committed_*, our sample marker) are not data.
    return name.startswith((".", "_"))


def _format_of(path: PurePath, file_format: str) -> FileFormat | None:
    by_extension = _EXTENSIONS.get(path.suffix.lower())
    if file_format == "auto":
        return by_extension
    # An explicit format also accepts extension-less Hive-style names such as part-00000.
    if by_extension == file_format or (not path.suffix and file_format in ("orc", "parquet")):
        return file_format  # type: ignore[return-value]
    return None


def _list_folder(folder: Location, file_format: str) -> list[tuple[str, FileFormat]]:
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=False))
    found = []
    for info in sorted(infos, key=lambda i: i.path):
        fmt = _format_of(PurePath(info.base_name), file_format)
        if info.type == pafs.FileType.File and not _is_marker(info.base_name) and fmt:
            found.append((folder.child(info.path).shown, fmt))
    return found


def list_input_files(cfg: DataConfig) -> list[tuple[str, FileFormat]]:
    """Files named by ``cfg.data_paths`` (folders expand to their data files, sorted by name).

    Paths may be local or URIs of any filesystem ``data.fs.resolve`` serves (``s3://``, ``gs://``, ...).
    """
    paths = cfg.paths()
    if not paths:
        raise ValueError("data_paths is empty: name at least one ORC/Parquet file or folder")
    files: list[tuple[str, FileFormat]] = []
    for raw in paths:
        location = resolve(raw)
        try:
            info = location.fs.get_file_info(location.path)
        except OSError as exc:
            raise OSError(f"cannot access data path {raw}: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"data path does not exist: {raw}")
        if info.type == pafs.FileType.Directory:
            found = _list_folder(location, cfg.file_format)
            if not found:
                raise ValueError(f"data folder {raw} contains no .orc or .parquet files")
            files.extend(found)
        else:
            # A file named explicitly is read in the configured format whatever its extension.
            name = PurePath(location.path)
            fmt = _format_of(name, "auto") if cfg.file_format == "auto" else cfg.file_format
            if fmt is None:
                raise ValueError(
                    f"cannot tell the format of {raw} from its extension; name it .orc/.parquet or set file_format"
                )
            files.append((location.shown, fmt))
    return files


def leaf_type(column_type: pa.DataType, feature: FeatureConfig, column: str, source: str) -> pa.DataType:
    """Leaf type of a ``list<T>`` or ``list<list<T>>`` column; error for any other layout or leaf."""
    inner = column_type.value_type if is_list_type(column_type) else None
    leaf = inner.value_type if inner is not None and is_list_type(inner) else inner
    if leaf is None or not is_supported_leaf(leaf):
        raise ValueError(
            f"column {column!r} in {source} has Arrow type {column_type}; expected list<T> or list<list<T>> "
            "with an integer or string T"
        )
    check_leaf_type(feature, leaf, column, source)
    return leaf


# Where each format keeps its magic bytes: ORC starts with "ORC" and ends with a postscript whose last field is
# the magic again (then the postscript's length byte); Parquet starts and ends with "PAR1".
_HEAD_MAGIC: dict[FileFormat, bytes] = {"orc": b"ORC", "parquet": b"PAR1"}
_FORMAT_NAME: dict[FileFormat, str] = {"orc": "an ORC", "parquet": "a Parquet"}


def _tail_magic_ok(fmt: FileFormat, tail: bytes) -> bool:
    return tail[-4:-1] == b"ORC" if fmt == "orc" else tail[-4:] == b"PAR1"


def diagnose_unreadable(fmt: FileFormat, fs: pafs.FileSystem | None, fs_path: str) -> str | None:
    """Why a file pyarrow could not open or read is bad, in the user's terms: empty, not of this format, or
    cut short; None when its first and last bytes look right (then only pyarrow's own message is known).

    pyarrow says "Failed to parse the postscript" or "magic bytes not found in footer", which does not tell a
    copy that stopped half-way (the usual cause) from a file of another kind. Both formats carry magic bytes at
    the start and at the end, so comparing the two ends tells them apart without parsing anything. Never
    raises: a file that cannot even be inspected leaves the original error to speak for itself.
    """
    a_kind = _FORMAT_NAME[fmt]
    kind = a_kind.split()[1]
    head_magic = _HEAD_MAGIC[fmt]
    try:
        with (fs or pafs.LocalFileSystem()).open_input_file(fs_path) as handle:
            size = handle.size()
            head = handle.read_at(min(size, len(head_magic)), 0)
            tail = handle.read_at(min(size, 4), max(0, size - 4))
    except (pa.ArrowException, OSError):
        return None
    if size == 0:
        return "the file is empty (0 bytes)"
    if not head_magic.startswith(head):
        return (
            f"it is not {a_kind} file: its {size:,} bytes do not start with the {kind} magic bytes "
            f"{head_magic.decode()!r}; event logs in CSV or text are converted with python -m data.convert"
        )
    if size <= len(head_magic) or not _tail_magic_ok(fmt, tail):
        return (
            f"the file looks truncated ({size:,} bytes): it starts like {a_kind} file but does not end "
            f"with {a_kind} footer; was it copied or written only in part?"
        )
    return None


def unreadable_file_message(
    what: str, fmt: FileFormat, fs: pafs.FileSystem | None, fs_path: str, exc: BaseException
) -> str:
    """``what`` (e.g. "cannot read orc file X"), the diagnosis when there is one, then pyarrow's message."""
    why = diagnose_unreadable(fmt, fs, fs_path)
    return f"{what}: {why} (pyarrow: {exc})" if why else f"{what}: {exc}"


def open_file(source: str | pa.NativeFile, fmt: FileFormat) -> orc.ORCFile | pq.ParquetFile:
    """A reader of one ORC or Parquet file (it parses the footer: schema and stripes / row groups)."""
    return orc.ORCFile(source) if fmt == "orc" else pq.ParquetFile(source)


def _file_schema_and_units(source: str | pa.NativeFile, fmt: FileFormat) -> tuple[pa.Schema, int, int]:
    """Schema, units and rows of one file (all from its footer)."""
    handle = open_file(source, fmt)
    if fmt == "orc":
        return handle.schema, handle.nstripes, handle.nrows
    return handle.schema_arrow, handle.metadata.num_row_groups, handle.metadata.num_rows


def enumerate_units(
    files: list[tuple[str, FileFormat]], features: list[FeatureConfig], time_column: str = ""
) -> tuple[list[ReadUnit], int]:
    """All units of all files in a fixed order (file order, then stripe order), and the files' rows in all;
    validates each schema (the features' columns, and the event-time column if there is one)."""
    # The time column takes integers or decimal strings: checked like a hashed feature's column.
    checked = [*features, FeatureConfig(time_column, hash_type="murmur")] if time_column else features
    units: list[ReadUnit] = []
    rows = 0
    for path, fmt in files:
        location = resolve(path)
        fs = None if location.local else location.fs
        try:
            source = path if fs is None else fs.open_input_file(location.path)
            schema, count, file_rows = _file_schema_and_units(source, fmt)
        except (pa.ArrowException, OSError) as exc:
            message = unreadable_file_message(f"cannot read {fmt} file {path}", fmt, fs, location.path, exc)
            raise ValueError(message) from exc
        for feature in checked:
            index = schema.get_field_index(feature.name)
            if index < 0:
                raise ValueError(f"column {feature.name!r} is missing in {path} (columns: {schema.names})")
            leaf_type(schema.field(index).type, feature, feature.name, path)
        units.extend(ReadUnit(path, fmt, i, fs, location.path) for i in range(count))
        rows += file_rows
    return units, rows


def assign_units(units: list[ReadUnit], rank: int, world_size: int) -> list[ReadUnit]:
    """Round-robin: unit i goes to rank ``i % world_size`` (every unit read by exactly one rank)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if len(units) < world_size:
        raise ValueError(
            f"only {len(units)} read units (stripes/row groups) for {world_size} ranks: every rank needs at "
            "least one; write more, smaller stripes or use fewer ranks"
        )
    return units[rank::world_size]
