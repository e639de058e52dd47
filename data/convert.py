"""Convert event logs into the seed's ORC schema: one row per user, events oldest first.

``python -m data.convert {taobao,sasrec,movielens,events} INPUT... --out DIR [options]`` (``--help`` on each).

Output schema (the seed's, see README "Data"): ``user_id`` int64 and, per event, one position holding one
value: ``item_id`` / ``cate_id`` as ``list<list<int64>>``, ``behavior_id`` / ``timestamp`` as
``list<list<string>>`` (timestamps in decimal). Columns the source does not have are left out (SASRec text
has only users and items, so its output has ``user_id`` and ``item_id``). MovieLens categories are the
movie's genres, several per position (``cate_id`` then holds one value per genre of the movie).

Streaming, in two passes so that inputs larger than memory work:

1. read the inputs in chunks (``--chunk-bytes`` of CSV text, ``--chunk-rows`` of Parquet), validate each
   chunk and append its events to one spill file per output part (``user_id % parts``);
2. per part: load its spill file, sort by (user, time, input order), group by user, write
   ``part-NNNNN.orc`` with stripes of ``--rows-per-stripe`` users (the reader shards by stripe).

Peak memory is about one chunk plus one part, so choose ``--parts`` such that ``input size / parts`` fits.
Every bad input (missing column, wrong type, empty value, negative or too large id, a row with too few or too
many fields, unreadable file) is an error naming the file, the column and the line (as an editor numbers it).
Both passes work in a hidden folder next to ``--out`` that is renamed to ``--out`` at the end, so a failed run
leaves nothing behind (see ``convert``).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.orc as orc
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

INT_COLUMNS = ("user_id", "item_id", "cate_id")
STRING_COLUMNS = ("behavior_id",)
# Output column order (timestamp last, as in the seed).
OUTPUT_ORDER = ("user_id", "item_id", "cate_id", "behavior_id", "timestamp")
_INT_PATTERN = r"^[0-9]{1,19}$"  # non-negative decimal; the int64 range is checked by the cast


@dataclass
class Source:
    """One input file and how to read it: which source column feeds which output column."""

    path: Path
    fmt: str  # "csv" or "parquet"
    mapping: dict[str, str]  # output column -> source column name
    csv_names: list[str] | None = None  # column names of a header-less CSV
    delimiter: str = ","
    time_kind: str = "int"  # sort timestamps as "int" or as "string"
    # item id -> its categories (MovieLens genres): cate_id becomes a list per event, looked up by item.
    item_categories: dict[int, list[int]] | None = None
    item_categories_path: Path | None = None


@dataclass
class Options:
    out: Path
    parts: int = 8
    rows_per_stripe: int = 1024
    chunk_bytes: int = 64 << 20
    chunk_rows: int = 1 << 20
    # Uncompressed gives exact stripe sizes; with a codec the writer only sees compressed bytes once a
    # compression block fills, so stripes come out larger than rows_per_stripe.
    compression: str = "uncompressed"


@dataclass
class Stats:
    users: int = 0
    events: int = 0
    files: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- reading


def _fail(source: Source, column: str, row: int | None, what: str) -> ValueError:
    """An error naming the file, the column and, where known, the line of row ``row`` (1-based, a CSV's header
    line included: the row count of the chunks read so far)."""
    where = f"{source.path}, column {column!r}"
    if row is not None:
        where += f", line {_editor_line(source, row)}"
    return ValueError(f"{where}: {what}")


def _editor_line(source: Source, row: int) -> int:
    """The line an editor shows for row ``row`` of ``source``. pyarrow's CSV parser skips empty lines without
    counting them, so rows and lines part at the first empty line: count the non-empty lines up to the row
    (only on the error path, so reading the file's start again costs nothing that matters)."""
    if source.fmt != "csv":
        return row
    seen = 0
    # Universal newlines, like the parser: "\n", "\r\n" and "\r" all end a line.
    with source.path.open(encoding="utf-8", errors="replace", newline=None) as lines:
        for number, line in enumerate(lines, start=1):
            if line not in ("\n", ""):
                seen += 1
                if seen == row:
                    return number
    return row


def _csv_options(source: Source, opts: Options) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    wanted = sorted(set(source.mapping.values()))
    read = pacsv.ReadOptions(column_names=source.csv_names, block_size=opts.chunk_bytes)
    # Everything as text: we parse ids ourselves so that a bad value names its column and line.
    convert = pacsv.ConvertOptions(
        include_columns=wanted, column_types={c: pa.string() for c in wanted}, strings_can_be_null=False
    )
    return read, pacsv.ParseOptions(delimiter=source.delimiter), convert


def _csv_chunks(source: Source, opts: Options) -> Iterator[pa.RecordBatch]:
    read, parse, convert = _csv_options(source, opts)
    try:
        reader = pacsv.open_csv(source.path, read_options=read, parse_options=parse, convert_options=convert)
        yield from reader
    except (pa.ArrowInvalid, pa.ArrowKeyError) as exc:
        wanted = convert.include_columns
        missing = [c for c in wanted if f"'{c}'" in str(exc) and "not exist" in str(exc)]
        if missing:
            raise _fail(source, missing[0], None, f"column is missing ({exc})") from exc
        if (bad := _wrong_column_count(source, opts)) is not None:
            raise bad from exc
        raise ValueError(f"{source.path}: cannot parse as CSV: {exc}") from exc


def _wrong_column_count(source: Source, opts: Options) -> ValueError | None:
    """The first row with more or fewer fields than the header (or the format's columns), as an error naming
    its line; None when no row has. Found by reading the file again on one thread: a multi-threaded read (the
    fast one, kept for the conversion itself) does not know which row it is looking at."""
    read, parse, convert = _csv_options(source, opts)
    read.use_threads = False
    found: list[pacsv.InvalidRow] = []

    def record(row: pacsv.InvalidRow) -> str:
        found.append(row)
        return "error"

    parse.invalid_row_handler = record
    try:
        for _ in pacsv.open_csv(source.path, read_options=read, parse_options=parse, convert_options=convert):
            pass
    except (pa.ArrowInvalid, pa.ArrowKeyError):
        pass
    if not found or found[0].number is None:
        return None
    row = found[0]
    columns = f"({', '.join(source.csv_names)})" if source.csv_names else "(as in the header)"
    return ValueError(
        f"{source.path}, line {_editor_line(source, row.number)}: expected {row.expected_columns} columns "
        f"{columns}, found {row.actual_columns}: {row.text!r}"
    )


def _parquet_chunks(source: Source, opts: Options) -> Iterator[pa.RecordBatch]:
    try:
        handle = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{source.path}: cannot read as Parquet: {exc}") from exc
    names = handle.schema_arrow.names
    for column in source.mapping.values():
        if column not in names:
            raise _fail(source, column, None, f"column is missing (columns: {names})")
    try:
        yield from handle.iter_batches(batch_size=opts.chunk_rows, columns=sorted(set(source.mapping.values())))
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{source.path}: cannot read as Parquet: {exc}") from exc


def _as_ids(values: pa.Array, source: Source, column: str, first_line: int) -> pa.Array:
    """Non-negative int64 ids from integer or decimal-text values; an error names the first bad line."""
    if values.null_count:
        raise _fail(source, column, first_line + _first_true(values.is_null()), "empty (null) value")
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        ok = pc.match_substring_regex(values, _INT_PATTERN)
        if not pc.all(ok).as_py():
            bad = _first_true(pc.invert(ok))
            text = values[bad].as_py()
            what = "negative id" if text.startswith("-") else "empty value" if not text else "not an integer id"
            raise _fail(source, column, first_line + bad, f"{what}: {text!r}")
        try:
            return pc.cast(values, pa.int64())
        except pa.ArrowInvalid:
            bad = _first_true(pc.greater(pc.utf8_length(values), 18))  # a 19-digit value beyond INT64_MAX
            raise _fail(source, column, first_line + bad, f"id {values[bad].as_py()} is beyond int64") from None
    if not pa.types.is_integer(values.type):
        raise _fail(source, column, None, f"has Arrow type {values.type}; expected integer ids")
    try:
        ids = pc.cast(values, pa.int64())
    except pa.ArrowInvalid as exc:
        raise _fail(source, column, None, f"id beyond int64 ({exc})") from exc
    negative = pc.less(ids, 0)
    if pc.any(negative).as_py():
        bad = _first_true(negative)
        raise _fail(source, column, first_line + bad, f"negative id: {ids[bad].as_py()}")
    return ids


def _as_strings(values: pa.Array, source: Source, column: str, first_line: int) -> pa.Array:
    if values.null_count:
        raise _fail(source, column, first_line + _first_true(values.is_null()), "empty (null) value")
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_integer(values.type):
        text = pc.cast(values, pa.string())
    else:
        raise _fail(source, column, None, f"has Arrow type {values.type}; expected strings or integers")
    empty = pc.equal(pc.utf8_length(text), 0)
    if pc.any(empty).as_py():
        raise _fail(source, column, first_line + _first_true(empty), "empty value")
    return text


def _time_key(values: pa.Array, source: Source, column: str, first_line: int) -> tuple[pa.Array, pa.Array]:
    """(sort key, decimal/text form) of a time column."""
    if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        values = pc.cast(values, pa.int64())
    if source.time_kind == "int":
        ids = _as_ids(values, source, column, first_line)  # Unix time: a non-negative integer
        return ids, pc.cast(ids, pa.string())
    text = _as_strings(values, source, column, first_line)
    return text, text


def _categories_of(items: pa.Array, source: Source, first_line: int) -> pa.Array:
    """``list<int64>`` categories of each event's item; an item the categories file lacks is an error."""
    assert source.item_categories is not None
    table = source.item_categories
    lists = []
    for i, item in enumerate(items.to_numpy(zero_copy_only=False).tolist()):
        found = table.get(item)
        if found is None:
            raise _fail(source, "item", first_line + i, f"item {item} is not in {source.item_categories_path}")
        lists.append(found)
    return pa.array(lists, pa.list_(pa.int64()))


def read_movielens_items(path: Path) -> dict[int, list[int]]:
    """MovieLens ``u.item`` (``|``-separated, ISO-8859-1): movie id -> indices of its genre flags (0-18, in
    the file's genre order; a movie without any flag gets the "unknown" genre 0)."""
    if not path.is_file():
        raise FileNotFoundError(f"--items: file does not exist: {path}")
    genres: dict[int, list[int]] = {}
    for line_no, line in enumerate(path.read_text(encoding="iso-8859-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5 + _MOVIELENS_GENRES or not fields[0].isdigit():
            raise ValueError(
                f"{path}, line {line_no}: expected 'movie id | title | release date | video release date | "
                f"IMDb URL' and {_MOVIELENS_GENRES} genre flags, got {len(fields)} fields"
            )
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise ValueError(f"{path}, line {line_no}: genre flags must be 0 or 1, got {flags}")
        genres[int(fields[0])] = [i for i, flag in enumerate(flags) if flag == "1"] or [0]
    if not genres:
        raise ValueError(f"{path}: no movies")
    return genres


_MOVIELENS_GENRES = 19


def _first_true(mask: pa.Array) -> int:
    return int(np.argmax(mask.to_numpy(zero_copy_only=False)))


def normalise_chunk(batch: pa.RecordBatch, source: Source, first_line: int, first_event: int) -> pa.Table:
    """Validated events of one chunk: output columns plus ``_time`` (sort key) and ``_seq`` (input order)."""
    columns: dict[str, pa.Array] = {}
    for out, src in source.mapping.items():
        values = batch.column(src)
        if out in INT_COLUMNS:
            columns[out] = _as_ids(values, source, src, first_line)
        elif out in STRING_COLUMNS:
            columns[out] = _as_strings(values, source, src, first_line)
        else:  # timestamp
            columns["_time"], columns[out] = _time_key(values, source, src, first_line)
    if source.item_categories is not None:
        columns["cate_id"] = _categories_of(columns["item_id"], source, first_line)
    if "_time" not in columns:
        columns["_time"] = pa.array(np.zeros(batch.num_rows, dtype=np.int64))
    columns["_seq"] = pa.array(np.arange(first_event, first_event + batch.num_rows, dtype=np.int64))
    return pa.table(columns)


def read_events(source: Source, opts: Options, first_event: int) -> Iterator[pa.Table]:
    """Validated event chunks of one source file."""
    if not source.path.is_file():
        raise FileNotFoundError(f"input file does not exist: {source.path}")
    chunks = _csv_chunks(source, opts) if source.fmt == "csv" else _parquet_chunks(source, opts)
    # Rows count from 1 and include a CSV header line (``_fail`` names the editor's line of a row).
    line = 2 if source.fmt == "csv" and source.csv_names is None else 1
    for batch in chunks:
        if batch.num_rows:
            yield normalise_chunk(batch, source, line, first_event)
            line += batch.num_rows
            first_event += batch.num_rows


# ------------------------------------------------------------------------------------------- writing


def _nested(values: pa.Array, row_offsets: np.ndarray) -> pa.Array:
    """list<list<T>> with ``row_offsets`` delimiting the users: one value per position, or the values of
    each position where ``values`` is already a list per event (several categories)."""
    if len(values) > np.iinfo(np.int32).max:
        raise ValueError(f"{len(values)} events in one part: use more --parts")
    if pa.types.is_list(values.type):
        inner = values
    else:
        inner = pa.ListArray.from_arrays(pa.array(np.arange(len(values) + 1, dtype=np.int32)), values)
    return pa.ListArray.from_arrays(pa.array(row_offsets.astype(np.int32)), inner)


def group_users(events: pa.Table) -> pa.Table:
    """One row per user (ascending id), positions oldest first (ties keep the input order)."""
    events = events.sort_by([("user_id", "ascending"), ("_time", "ascending"), ("_seq", "ascending")])
    users = events.column("user_id").to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]])) if len(users) else np.zeros(0, int)
    offsets = np.append(starts, len(users))
    columns = {"user_id": pa.array(users[starts], pa.int64())}
    for name in OUTPUT_ORDER[1:]:
        if name in events.column_names:
            columns[name] = _nested(events.column(name).combine_chunks(), offsets)
    return pa.table(columns)


def write_part(table: pa.Table, path: Path, opts: Options) -> None:
    # A 1-byte stripe_size closes a stripe after every written batch of rows_per_stripe users (the writer
    # checks its size estimate after each batch), which gives the reader stripe-level shards.
    orc.write_table(table, str(path), stripe_size=1, batch_size=opts.rows_per_stripe, compression=opts.compression)


def convert(sources: list[Source], opts: Options) -> Stats:
    """Run both passes in a hidden folder next to ``opts.out``, which becomes ``opts.out`` only once every part
    is written: a failed conversion leaves nothing behind (not even the folder or its new parent folders), and
    a reader never sees a half-written output. An ``opts.out`` that holds only the part files of an earlier
    conversion is replaced whole (no stale part of a run with more ``--parts`` survives next to the new
    ones); one holding anything else is refused before any work."""
    if opts.parts < 1 or opts.rows_per_stripe < 1 or opts.chunk_bytes < 1 or opts.chunk_rows < 1:
        raise ValueError("--parts, --rows-per-stripe, --chunk-bytes and --chunk-rows must be positive")
    out = opts.out.absolute()
    earlier = _earlier_output(out)
    created = _missing_folders(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        stats = _convert_into(sources, opts, work)
        _publish(work, out, earlier)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in created:  # innermost first
            _remove_if_empty(folder)
        raise
    return stats


def _convert_into(sources: list[Source], opts: Options, work: Path) -> Stats:
    """Both passes; ``work`` ends up holding the part files only."""
    stats = Stats()
    spills = _spill(sources, opts, work, stats)
    for index, spill in enumerate(spills):
        part = _load_spill(spill)
        spill.unlink(missing_ok=True)  # read: its disk space is free for the next parts
        table = group_users(part) if part is not None else None
        if table is None or table.num_rows == 0:
            continue
        target = work / f"part-{index:05d}.orc"
        write_part(table, target, opts)
        stats.users += table.num_rows
        stats.files.append(target.name)
    return stats


_PART_NAME = re.compile(r"part-\d{5}\.orc")


def _earlier_output(out: Path) -> list[Path]:
    """The part files of an earlier conversion in ``out`` (to be replaced); an error if ``out`` holds anything
    else, so that a mistyped ``--out`` never deletes someone's files."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    entries = sorted(out.iterdir())
    foreign = [e.name for e in entries if not (e.is_file() and _PART_NAME.fullmatch(e.name))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(
            f"--out {out} holds files other than an earlier conversion's part-NNNNN.orc ({shown}); choose a new or "
            "empty folder (a folder of part files alone is replaced)"
        )
    return entries


def _publish(work: Path, out: Path, earlier: list[Path]) -> None:
    """``work`` becomes ``out``; an earlier output there is moved aside first and deleted after, so that
    ``out`` holds either the old parts or the new ones, never a mix."""
    if not out.exists():
        work.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old / out.name)
    try:
        work.rename(out)
    except OSError:
        (old / out.name).rename(out)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
    if earlier:
        logger.info("replaced the %d part files of an earlier conversion in %s", len(earlier), out)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (someone else wrote there meanwhile) or already gone: leave it
        pass


def _spill(sources: list[Source], opts: Options, work: Path, stats: Stats) -> list[Path]:
    """Pass 1: every event to the spill file of its part (``user_id % parts``)."""
    paths = [work / f"spill-{i:05d}.arrow" for i in range(opts.parts)]
    writers: dict[int, ipc.RecordBatchStreamWriter] = {}
    try:
        for source in sources:
            for chunk in read_events(source, opts, stats.events):
                stats.events += chunk.num_rows
                part_of = pc.remainder(chunk.column("user_id"), opts.parts).to_numpy()
                for part in np.unique(part_of):
                    rows = chunk.filter(pa.array(part_of == part))
                    if part not in writers:
                        writers[part] = ipc.new_stream(paths[part], rows.schema)
                    writers[part].write_table(rows)
    finally:
        for writer in writers.values():
            writer.close()
    return paths


def _load_spill(path: Path) -> pa.Table | None:
    if not path.exists():
        return None
    with ipc.open_stream(path) as reader:
        return reader.read_all()


# ----------------------------------------------------------------------------------------------- CLI


def _inputs(paths: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named on the command line; folders expand to their files with the given suffixes."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise ValueError(f"input folder {raw} contains no {'/'.join(suffixes)} files")
            out.extend(found)
        elif not path.exists():
            raise FileNotFoundError(f"input file does not exist: {raw}")
        else:
            out.append(path)
    return out


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="input files or folders")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder for part-NNNNN.orc, written whole at the end; an earlier conversion's "
                        "part files there are replaced, any other content is refused")
    parser.add_argument("--parts", type=int, default=8,
                        help="output files (users split by user_id %% parts); default 8")
    parser.add_argument("--rows-per-stripe", type=int, default=1024, help="users per ORC stripe; default 1024")
    parser.add_argument("--chunk-bytes", type=int, default=64 << 20, help="CSV bytes read per chunk; default 64 MiB")
    parser.add_argument("--chunk-rows", type=int, default=1 << 20, help="Parquet rows read per chunk; default 1Mi")
    parser.add_argument("--compression", default="uncompressed",
                        choices=["uncompressed", "zstd", "snappy", "lz4", "zlib"],
                        help="ORC compression; default uncompressed (exact stripe sizes; with a codec stripes "
                        "hold at least --rows-per-stripe users)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    taobao = sub.add_parser(
        "taobao", help="Taobao UserBehavior CSV", description="Taobao UserBehavior CSV (no header): "
        "user_id,item_id,category_id,behavior_type,timestamp -> user_id, item_id, cate_id, behavior_id, timestamp"
    )
    _common(taobao)
    sasrec = sub.add_parser(
        "sasrec", help="SASRec 'user item' text", description="SASRec text ('user item' per line, space-separated, "
        "time order within each user) -> user_id, item_id"
    )
    _common(sasrec)
    movielens = sub.add_parser(
        "movielens", help="MovieLens ratings (u.data) + genres (u.item)", description="MovieLens 100K-style "
        "ratings, tab-separated without a header ('user item rating timestamp'), sorted by time per user -> "
        "user_id, item_id, behavior_id (the rating, 1-5, as text), timestamp; with --items, cate_id = the "
        "movie's genres (several values per position)"
    )
    _common(movielens)
    movielens.add_argument("--items", type=Path, help="the movies file (u.item: '|'-separated, ISO-8859-1) for cate_id")
    events = sub.add_parser(
        "events", help="generic CSV/Parquet event log", description="Generic event log (CSV with a header, or "
        "Parquet) with a column mapping -> user_id, item_id and the optional columns mapped"
    )
    _common(events)
    events.add_argument("--user", required=True, help="source column of user ids (non-negative integers)")
    events.add_argument("--item", required=True, help="source column of item ids (non-negative integers)")
    events.add_argument("--cate", help="source column of category ids (non-negative integers) -> cate_id")
    events.add_argument("--behavior", help="source column of behaviour names or codes -> behavior_id (strings)")
    events.add_argument("--time", help="source column of event times -> timestamp (sort key; without it, file order)")
    events.add_argument("--time-kind", default="int", choices=["int", "string"],
                        help="sort times as integers (Unix time; default) or as strings (e.g. ISO 8601)")
    events.add_argument("--format", default="auto", choices=["auto", "csv", "parquet"],
                        help="input format; auto = by extension (.parquet/.pq, else CSV)")
    events.add_argument("--delimiter", default=",", help="CSV delimiter; default ','")
    return parser


def sources_from_args(args: argparse.Namespace) -> list[Source]:
    if args.kind == "taobao":
        names = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
        mapping = {"user_id": "user_id", "item_id": "item_id", "cate_id": "category_id",
                   "behavior_id": "behavior_type", "timestamp": "timestamp"}
        return [Source(p, "csv", mapping, names) for p in _inputs(args.inputs, (".csv", ".txt"))]
    if args.kind == "sasrec":
        mapping = {"user_id": "user", "item_id": "item"}
        return [Source(p, "csv", mapping, ["user", "item"], " ") for p in _inputs(args.inputs, (".txt",))]
    if args.kind == "movielens":
        names = ["user", "item", "rating", "time"]
        mapping = {"user_id": "user", "item_id": "item", "behavior_id": "rating", "timestamp": "time"}
        genres = read_movielens_items(args.items) if args.items else None
        return [
            Source(p, "csv", mapping, names, "\t", item_categories=genres, item_categories_path=args.items)
            for p in _inputs(args.inputs, (".data", ".tsv", ".txt", ".csv"))
        ]
    mapping = {"user_id": args.user, "item_id": args.item}
    optional = {"cate_id": args.cate, "behavior_id": args.behavior, "timestamp": args.time}
    mapping.update({out: src for out, src in optional.items() if src})
    out = []
    for path in _inputs(args.inputs, (".csv", ".parquet", ".pq", ".txt", ".tsv")):
        fmt = args.format if args.format != "auto" else "parquet" if path.suffix in (".parquet", ".pq") else "csv"
        out.append(Source(path, fmt, mapping, None, args.delimiter, args.time_kind))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = Options(args.out, args.parts, args.rows_per_stripe, args.chunk_bytes, args.chunk_rows, args.compression)
    started = time.perf_counter()
    try:
        stats = convert(sources_from_args(args), opts)
    except (ValueError, OSError) as exc:  # OSError: FileNotFoundError, and a folder that cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{stats.events} events of {stats.users} users -> {len(stats.files)} files in {args.out} "
        f"({time.perf_counter() - started:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
