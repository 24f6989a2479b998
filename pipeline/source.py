"""Stage 1, source: find input shards, check their schema, stream validated rows.

Contract of every block this stage yields (see ``pipeline.schema``):
passthrough columns (id columns or a generated ``id``, plus the gold label column),
``_source_file``, ``_source_row``, ``_text`` (null when rejected), optionally
``_text_pair``, and ``_error``/``_error_detail`` (null for good rows).

Shards are Parquet, JSONL or Arrow IPC files: files under ``input.path``, or the data files a
Hugging Face dataset resolves to (``pipeline.hf_datasets``); ``open_input`` picks the route.

Bad rows are never dropped: they carry a ``Reason`` to the sink, which quarantines them.
Problems that make a whole shard unusable (missing text column, wrong column type,
unreadable file) raise ``InputError`` on the driver, before any actor starts.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import posixpath
import re
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource import DefaultFileMetadataProvider, FileBasedDatasource
from ray.exceptions import UserCodeException

from pipeline import schema as S
from pipeline.commit import Ranges, covered, covered_rows
from pipeline.config import InputConfig, StorageConfig
from pipeline.schema import Reason
from pipeline.storage import check_access, filesystem, relative_to

if TYPE_CHECKING:
    from pipeline.hf_datasets import DatasetRef

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
SUFFIXES = {"parquet": (".parquet", ".pq"), "jsonl": JSONL_SUFFIXES, "arrow": (".arrow",)}
TYPED = ("parquet", "arrow")  # formats whose files declare their schema and are read record batch by record batch
TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())
READ_BATCH_ROWS = 2048


# (row or line number, parsed record or None, (reason, detail) when the row is rejected)
Record = tuple[int, "dict | None", "tuple[Reason, str | None] | None"]


class InputError(ValueError):
    """An input shard that cannot be read as configured; names the file, column and expectation."""


class ShardChangedError(InputError, UserCodeException):
    """A shard that the pre-run scan read whole failed when read again, in a read task. As a
    ``UserCodeException`` it is reported by Ray Data as a user error, without internal stack traces."""


@dataclass(frozen=True)
class Shards:
    """The input, resolved on the driver: files in a deterministic order, each with its format."""

    root: str  # ids are file paths relative to this
    files: list[str]
    sizes: dict[str, int]  # from the one listing; read tasks reuse it instead of listing again
    formats: dict[str, str]  # file -> "parquet", "jsonl" or "arrow"
    passthrough: list[str]  # columns copied to the output unchanged
    fs: fsspec.AbstractFileSystem
    skipped: tuple[str, ...] = ()  # files under the input that are not shards (README, .csv), relative
    dataset: DatasetRef | None = None  # what a Hugging Face dataset input resolved to

    def relative(self, path: str) -> str:
        return relative_to(path, self.root)

    def format_of(self, path: str) -> str:
        return self.formats[path]

    def describe(self) -> str:
        """E.g. ``3 parquet file(s)``, or ``3 file(s): 2 jsonl, 1 parquet``."""
        counts: dict[str, int] = {}
        for path in self.files:
            counts[self.formats[path]] = counts.get(self.formats[path], 0) + 1
        if len(counts) == 1:
            return f"{len(self.files)} {next(iter(counts))} file(s)"
        return f"{len(self.files)} file(s): " + ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items()))


def infer_format(path: str) -> str | None:
    """A file's shard format by its extension; None for files that are not shards."""
    return next((fmt for fmt, suffixes in SUFFIXES.items() if path.endswith(suffixes)), None)


def discover(cfg: InputConfig, fs: fsspec.AbstractFileSystem, path: str, passthrough: list[str]) -> Shards:
    """List the shards under ``path`` (file, directory or glob), skipping ``_``/``.`` names.

    Each file is read by its extension; with ``input.format`` set, shards of the other format are an
    error. Files that are not shards at all are returned as ``skipped``, never silently dropped. A
    single file named by ``input.path`` is read as ``input.format`` whatever its extension.
    """
    single = False
    if globlib.has_magic(path):
        listing = fs.glob(path, detail=True)
        root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        listing = fs.find(path, detail=True)
        root = path.rstrip("/")
    elif fs.isfile(path):
        listing, root, single = {path: fs.info(path)}, posixpath.dirname(path), True
    else:
        raise InputError(f"input.path {cfg.path} does not exist")
    # A symlink (the Hub cache links snapshot files to blobs) counts as what it points to; a broken one is no file.
    listing = {name: _followed(fs, name, info) for name, info in listing.items()}
    sizes = {name: info["size"] for name, info in listing.items() if info["type"] == "file"}
    sizes = {f: size for f, size in sizes.items() if not any(part[:1] in "_." for part in relative_to(f, root).split("/"))}
    if not sizes:
        raise InputError(f"input.path {cfg.path} holds no input files")
    if single and not cfg.format and infer_format(path) is None:
        raise InputError(f"cannot infer the format of {path}: set input.format to parquet, jsonl or arrow")
    forced = cfg.format if single else None
    return shards_of(cfg, fs, root, sizes, passthrough, where=f"input.path {cfg.path}", forced=forced)


def _followed(fs: fsspec.AbstractFileSystem, name: str, info: dict) -> dict:
    """``info`` of a listed entry, a symlink's target's when it is one (local listings report links as such)."""
    if not info.get("islink"):
        return info
    try:
        return fs.info(name)
    except FileNotFoundError:
        return info


def shards_of(
    cfg: InputConfig,
    fs: fsspec.AbstractFileSystem,
    root: str,
    sizes: dict[str, int],
    passthrough: list[str],
    *,
    where: str,
    forced: str | None = None,
    dataset: DatasetRef | None = None,
) -> Shards:
    """The shards among listed files (path -> size), in path order: each read by its extension (or as
    ``forced``), ``input.format`` enforced; files that are not shards are kept as ``skipped``.
    ``where`` names the input in errors."""
    files = sorted(sizes)
    formats = {f: forced or infer_format(f) for f in files}
    if cfg.format:
        other = [relative_to(f, root) for f, fmt in formats.items() if fmt not in (None, cfg.format)]
        if other:
            raise InputError(
                f"input.format is {cfg.format}, but {len(other)} file(s) under {where} are shards of another "
                f"format: {other[:5]}. Move them away, or unset input.format to read each file by its extension"
            )
    shards = [f for f in files if formats[f]]
    skipped = [relative_to(f, root) for f in files if not formats[f]]
    if not shards:
        raise InputError(f"{where} holds no Parquet, JSONL or Arrow shards (only {skipped[:5]})")
    return Shards(
        root=root,
        files=shards,
        sizes={f: sizes[f] for f in shards},
        formats={f: formats[f] for f in shards},
        passthrough=passthrough,
        fs=fs,
        skipped=tuple(skipped),
        dataset=dataset,
    )


def open_input(cfg: InputConfig, storage: StorageConfig | None, passthrough: list[str]) -> Shards:
    """The shards of ``input.path``: a Hugging Face dataset (a Hub repo, or a ``save_to_disk`` directory
    local or on S3) resolved by ``pipeline.hf_datasets``, else the files ``discover`` lists there."""
    from pipeline import hf_datasets

    if hf_datasets.is_hub(cfg.path):
        return hf_datasets.hub_shards(cfg, passthrough)
    check_access(cfg.path, storage)
    fs, path = filesystem(cfg.path, storage)
    if hf_datasets.is_saved(fs, path):
        return hf_datasets.saved_shards(cfg, fs, path, passthrough)
    if cfg.split is not None:
        raise InputError(
            f"input.split selects a split of a Hugging Face dataset (hf://datasets/... or a save_to_disk directory), "
            f"but {cfg.path} is neither: remove input.split"
        )
    return discover(cfg, fs, path, passthrough)


@dataclass(frozen=True)
class Unreadable:
    """A shard quarantined whole, before the run, because it could not be read to its end."""

    error: str
    rows: int | None  # rows by its Parquet footer; None for JSONL and Arrow, or when the footer itself is unreadable
    rows_read: int = 0  # rows read before the error (what JSONL can tell)

    @property
    def rows_counted(self) -> int:
        """Rows it adds to ``rows_in`` and ``rows_rejected``: its footer's count, else the rows read."""
        return self.rows if self.rows is not None else self.rows_read


def _describe(e: BaseException) -> str:
    """``Type: message`` on one line (Arrow's messages span several), at most 500 characters."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:500]


def check_schema(shards: Shards, cfg: InputConfig) -> tuple[pa.Schema, dict[str, int], dict[str, Unreadable]]:
    """Check every shard opens and has the configured columns with usable types (in parallel).

    Returns the declared type of each passthrough column, each Parquet shard's row count from
    its footer, and the shards that cannot even be opened (a Parquet footer, an Arrow stream's
    schema or a JSONL shard's first lines that do not read): those are quarantined whole, the rest
    run. Types come from the schemas of the Parquet and Arrow shards (which must agree) when the
    input has any, else from the first value of each column in the first lines of every JSONL shard
    (see ``sample_jsonl``). ``InputError`` when no shard is readable or the columns do not fit the config.
    """
    typed = [path for path in shards.files if shards.format_of(path) in TYPED]
    jsonl = [path for path in shards.files if shards.format_of(path) == "jsonl"]

    def footer(path: str) -> tuple[pa.Schema, int | None] | Unreadable:
        """The shard's schema and, for Parquet, its row count."""
        fmt = shards.format_of(path)
        try:
            with shards.fs.open(path, "rb") as f:
                if fmt == "arrow":
                    return _arrow_reader(f)[0], None
                metadata = pq.read_metadata(f)
                return metadata.schema.to_arrow_schema(), metadata.num_rows
        except Exception as e:  # noqa: BLE001 - any failure here means the shard is unreadable
            kind = "Arrow IPC" if fmt == "arrow" else "Parquet"
            return Unreadable(f"not a readable {kind} file ({_describe(e)})", rows=None)

    with ThreadPoolExecutor(16) as pool:
        footers = dict(zip(typed, pool.map(footer, typed)))
        samples = dict(zip(jsonl, pool.map(lambda path: sample_jsonl(shards, path), jsonl)))
    unreadable = {path: f for path, f in {**footers, **samples}.items() if isinstance(f, Unreadable)}
    _require_some(shards, unreadable)
    readable = {path: f for path, f in footers.items() if not isinstance(f, Unreadable)}
    records = [r for s in samples.values() if not isinstance(s, Unreadable) for r in s]
    jsonl_types = _jsonl_types(shards, cfg, records) if jsonl else None
    expected = None
    for path, (file_schema, _) in readable.items():
        for column in [cfg.text_column, cfg.text_pair_column]:
            if column is None:
                continue
            if column not in file_schema.names:
                raise InputError(f"{path}: missing text column {column!r} (has {file_schema.names})")
            if _values(file_schema.field(column).type) not in TEXT_TYPES:
                raise InputError(
                    f"{path}: column {column!r} is {file_schema.field(column).type}, expected string or binary"
                )
        missing = [c for c in shards.passthrough if c not in file_schema.names]
        if missing:
            raise InputError(f"{path}: missing id/label column(s) {missing} (has {file_schema.names})")
        passthrough = pa.schema([file_schema.field(c) for c in shards.passthrough])
        if expected is None:
            expected = passthrough
        elif not passthrough.equals(expected):
            raise InputError(f"{path}: id/label column types {passthrough} differ from other shards' {expected}")
    rows = {path: count for path, (_, count) in readable.items() if count is not None}
    return expected if expected is not None else jsonl_types, rows, unreadable


def _values(type: pa.DataType) -> pa.DataType:
    """The type of the values: a dictionary-encoded column's (pandas categoricals), else ``type``."""
    return type.value_type if pa.types.is_dictionary(type) else type


def _require_some(shards: Shards, unreadable: dict[str, Unreadable]) -> None:
    if len(unreadable) == len(shards.files):
        path, problem = next(iter(unreadable.items()))
        raise InputError(
            f"none of the {len(shards.files)} input file(s) is readable, e.g. {path}: {problem.error}"
        )


SAMPLE_BYTES = 64 << 10  # what the plan reads of each JSONL shard
SAMPLE_ROWS = 20


def _jsonl_types(shards: Shards, cfg: InputConfig, records: list[dict]) -> pa.Schema:
    """Declared passthrough types from sample JSONL ``records``; ``InputError`` for a configured column
    that none of them holds, or ids that are not scalars."""
    fields = []
    for column in list(dict.fromkeys([cfg.text_column, cfg.text_pair_column, *shards.passthrough])):
        if column is None:
            continue
        first = next((r[column] for r in records if r.get(column) is not None), None)
        if first is None and records:
            role = "text" if column in (cfg.text_column, cfg.text_pair_column) else "id/label"
            raise InputError(
                f"{role} column {column!r} has no value in any of the {len(records)} rows read from the first lines "
                f"of each shard (they have {sorted({k for r in records for k in r})[:20]}); fix input.text_column / "
                "input.id_columns"
            )
        if column in shards.passthrough:
            if first is not None and not isinstance(first, (str, int, float)):  # bool is an int
                raise InputError(
                    f"column {column!r} holds JSON {type_name(first)}s (first value in the first lines of the shards); "
                    "ids and labels must be strings, numbers or booleans"
                )
            fields.append(pa.field(column, json_type(first)))
    return pa.schema(fields)


def sample_jsonl(shards: Shards, path: str) -> list[dict] | Unreadable:
    """The JSON objects on the first lines (up to ``SAMPLE_ROWS``, within ``SAMPLE_BYTES``) of a shard;
    ``Unreadable`` when it cannot be opened or decompressed at all."""
    try:
        with open_shard(shards, path) as f:
            head = f.read(SAMPLE_BYTES)
    except Exception as e:  # noqa: BLE001 - any failure here means the shard is unreadable
        return Unreadable(f"not a readable JSONL file ({_describe(e)})", rows=None)
    lines = head.split(b"\n")[:-1] if len(head) == SAMPLE_BYTES else head.split(b"\n")
    parsed = (_parse_line(0, line) for line in lines if line.strip())
    return [record for _, record, _ in parsed if record is not None][:SAMPLE_ROWS]


def json_type(value: Any) -> pa.DataType:
    """The Arrow type a JSON scalar is declared as: string, int64, float64 or bool (null: string)."""
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()


def coerce(value: Any, type: pa.DataType) -> tuple[Any, str | None]:
    """``(value as type, None)`` when the conversion is lossless, else ``(None, why)``; ``value`` is not null.

    JSONL values are converted to their column's declared type: an int to a string column as its
    decimal digits (7 -> "7"), an int to a float column when the float holds it exactly. Nothing
    else converts: no "7" -> 7, no 7.0 -> 7, no bools as numbers. Types JSON does not have (from a
    Parquet footer, where values are typed already) pass through.
    """
    integer = isinstance(value, int) and not isinstance(value, bool)
    if pa.types.is_string(type) or pa.types.is_large_string(type):
        if isinstance(value, str) or integer:
            return str(value), None
    elif pa.types.is_integer(type):
        if integer:
            bits = type.bit_width - pa.types.is_signed_integer(type)
            low = -(1 << bits) if pa.types.is_signed_integer(type) else 0
            if low <= value < 1 << bits:
                return value, None
            return None, f"{value} does not fit in {type}"
    elif pa.types.is_floating(type):
        if isinstance(value, float):
            return value, None
        if integer and abs(value) <= 1 << 53:
            return float(value), None
    elif pa.types.is_boolean(type):
        if isinstance(value, bool):
            return value, None
    else:
        return value, None
    return None, f"{type_name(value)} {json.dumps(value, default=str)[:40]} where the column holds {type}"


def type_name(value: Any) -> str:
    """How JSON would call the type of a parsed value."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def open_shard(shards: Shards, path: str):
    """A binary file object for one shard (JSONL decompressed by extension)."""
    return shards.fs.open(path, "rb", compression=None if shards.format_of(path) in TYPED else "infer")


def projected_columns(cfg: InputConfig, passthrough: list[str]) -> list[str]:
    """The columns the pipeline reads: text, text pair, id and label columns."""
    return list(dict.fromkeys(c for c in [cfg.text_column, cfg.text_pair_column, *passthrough] if c))


@dataclass(frozen=True)
class InputScan:
    """What a pass over the input found, independently of the pipeline run."""

    rows: int  # rows of the readable shards, plus what the unreadable ones count (``Unreadable.rows_counted``)
    duplicates: dict[str, dict[int, str]]  # relative shard -> row -> where that id was seen first
    unreadable: dict[str, Unreadable]  # shard path -> why it failed


def scan_input(
    shards: Shards, cfg: InputConfig, types: pa.Schema, footer_rows: dict[str, int], check_duplicates: bool
) -> InputScan:
    """Read every shard to its end before any actor starts: count rows, find unreadable shards and,
    with ``check_duplicates``, duplicate ids.

    One Ray task per shard decodes every page of the projected Parquet columns (verifying page
    checksums where the writer stored them), every record batch of an Arrow shard, or every line of
    a JSONL shard (a gzip stream to its end, CRC included). A shard that fails is reported in ``unreadable`` with the rows read before
    the error, and is not read again; the run quarantines it whole. Tasks hash the ids of each
    row (16 bytes, after ``coerce``; rows without a usable id are skipped): the driver keeps the
    first occurrence in (shard, row) order and marks later ones, ~24 bytes of memory per input row.
    Tasks reserve a whole CPU: the scan runs before any stage starts, and more tasks than CPUs
    would only start more worker processes.
    """
    import ray

    columns = projected_columns(cfg, shards.passthrough)
    id_columns = cfg.id_columns if check_duplicates else []
    id_types = [types.field(c).type for c in id_columns]

    def digest(record: dict | None, problem) -> bytes | None:
        if record is None or problem:
            return None
        ids = []
        for c, t in zip(id_columns, id_types):
            value, why = coerce(record.get(c), t)
            if value is None or why or (isinstance(value, str) and _has_surrogate(value)):
                return None
            ids.append(value)
        return _id_digest(tuple(ids))

    @ray.remote(num_cpus=1)
    def scan(path: str) -> tuple[int, np.ndarray, np.ndarray, str | None]:
        count, rows, digests = 0, [], []
        try:
            with open_shard(shards, path) as f:
                if shards.format_of(path) in TYPED:
                    for batch in _batches(f, shards.format_of(path), columns):
                        if id_columns:
                            ids = batch.select(id_columns)
                            typed = _typed_digests(ids, id_types)
                            if typed is None:  # a column of another type, or invalid UTF-8: row by row
                                typed = [digest(record, problem) for _, record, problem in _parquet_records(ids, 0)]
                            for i, d in enumerate(typed):
                                if d is not None:
                                    rows.append(count + i)
                                    digests.append(d)
                        count += batch.num_rows
                elif not id_columns:
                    for line in f:
                        count += bool(line.strip())
                else:
                    for row, record, problem in read_records(f, shards.format_of(path), columns):
                        count += 1
                        if (d := digest(record, problem)) is not None:
                            rows.append(row)
                            digests.append(d)
        except Exception as e:  # noqa: BLE001 - any failure to read to the end makes the shard unreadable
            return count, np.empty(0, np.int64), np.empty(0, "V16"), _describe(e)
        return count, np.array(rows, np.int64), np.frombuffer(b"".join(digests), "V16"), None

    results = dict(zip(shards.files, ray.get([scan.remote(p) for p in shards.files])))
    unreadable = {
        path: Unreadable(error, rows=footer_rows.get(path), rows_read=count)
        for path, (count, _, _, error) in results.items()
        if error is not None
    }
    total = sum(count for path, (count, *_) in results.items() if path not in unreadable)
    total += sum(u.rows_counted for u in unreadable.values())
    digests = np.concatenate([d for _, _, d, _ in results.values()])
    if not len(digests):
        return InputScan(total, {}, unreadable)
    rows = np.concatenate([r for _, r, _, _ in results.values()])
    shard = np.concatenate([np.full(len(r), i) for i, (_, r, _, _) in enumerate(results.values())])
    _, first, inverse, counts = np.unique(digests, return_index=True, return_inverse=True, return_counts=True)
    later = counts[inverse] > 1
    later[first] = False
    duplicates: dict[str, dict[int, str]] = {}
    for k in np.flatnonzero(later):
        origin = first[inverse[k]]
        where = f"{shards.relative(shards.files[shard[origin]])}:{rows[origin]}"
        duplicates.setdefault(shards.relative(shards.files[shard[k]]), {})[int(rows[k])] = where
    return InputScan(total, duplicates, unreadable)


def _id_digest(ids: tuple) -> bytes:
    """16 bytes for a row's id values (after ``coerce``): equal ids, whatever the shard's format, hash alike."""
    return hashlib.blake2b(repr(ids).encode(), digest_size=16).digest()


def _typed_digests(ids: pa.RecordBatch, types: list[pa.DataType]) -> list[bytes | None] | None:
    """``_id_digest`` of each row of a typed shard's id columns (None for a row with a null id), column by
    column: the scan's digests without coercing row by row. None (take the row path) unless every column
    already has its declared type, which ``coerce`` would return unchanged, and every string is UTF-8."""
    if any(column.type != t for column, t in zip(ids.columns, types)):
        return None
    try:
        values = [column.to_pylist() for column in ids.columns]
    except UnicodeDecodeError:
        return None
    return [None if None in row else _id_digest(row) for row in zip(*values)]


def _batches(f, fmt: str, columns: list[str], rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Decoded batches of up to ``rows`` rows of the projected columns of a Parquet or Arrow shard."""
    return _parquet_batches(f, columns, rows) if fmt == "parquet" else _arrow_batches(f, columns, rows)


def _parquet_batches(f, columns: list[str], rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Decoded batches of up to ``rows`` rows of the projected columns, page checksums verified where present
    (the file is opened on the first ``next``)."""
    yield from pq.ParquetFile(f, page_checksum_verification=True).iter_batches(batch_size=rows, columns=columns)


ARROW_FILE_MAGIC = b"ARROW1"


def _arrow_reader(f) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema and record batches of an Arrow IPC shard: the stream format (what ``datasets``'
    ``save_to_disk`` writes) read batch by batch as it streams, or the random-access file format."""
    magic = f.read(len(ARROW_FILE_MAGIC))
    f.seek(0)
    if magic == ARROW_FILE_MAGIC:
        reader = pa.ipc.open_file(f)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    reader = pa.ipc.open_stream(f)
    return reader.schema, iter(reader)


def _arrow_batches(f, columns: list[str], rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The projected columns of an Arrow IPC shard, one record batch at a time, in slices of at most ``rows`` rows."""
    schema, batches = _arrow_reader(f)
    present = [c for c in columns if c in schema.names]
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows).select(present)


def _parquet_records(batch: pa.RecordBatch, first_row: int) -> Iterator[Record]:
    """The batch's rows as dicts; a string value that is not valid UTF-8 (Arrow does not check what
    writers store) rejects its row as ``invalid_utf8`` instead of failing the batch."""
    try:
        records = [(record, None) for record in batch.to_pylist()]
    except UnicodeDecodeError:
        records = _decoded_records(batch)
    for i, (record, problem) in enumerate(records):
        yield first_row + i, record, problem


def _decoded_records(batch: pa.RecordBatch) -> list[tuple[dict, tuple[Reason, str] | None]]:
    """The batch's rows with each string value decoded on its own; one that is not UTF-8 becomes null."""
    columns = {
        name: column.dictionary_decode() if pa.types.is_dictionary(column.type) else column
        for name, column in zip(batch.schema.names, batch.columns)
    }
    binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}
    strings = [name for name, column in columns.items() if column.type in binary]
    columns.update({name: columns[name].view(binary[columns[name].type]) for name in strings})
    records = []
    for record in pa.RecordBatch.from_pydict(columns).to_pylist():
        problem = None
        for name in strings:
            try:
                record[name] = record[name] if record[name] is None else record[name].decode("utf-8")
            except UnicodeDecodeError as e:
                record[name] = None
                problem = problem or (Reason.INVALID_UTF8, f"column {name!r}: {e}")
        records.append((record, problem))
    return records


def read_records(f, fmt: str, columns: list[str]) -> Iterator[Record]:
    """Every row of one shard: Parquet and Arrow projected to ``columns``; JSONL line by line, tolerant."""
    if fmt in TYPED:
        row = 0
        for batch in _batches(f, fmt, columns):
            yield from _parquet_records(batch, row)
            row += batch.num_rows
        return
    line_no, pending = 0, b""
    while chunk := f.read(1 << 22):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            line_no += 1
            if line.strip():
                yield _parse_line(line_no, line)
    if pending.strip():
        yield _parse_line(line_no + 1, pending)


def _parse_line(line_no: int, line: bytes) -> Record:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        return line_no, None, (Reason.INVALID_UTF8, str(e))
    except ValueError as e:
        return line_no, None, (Reason.MALFORMED_JSON, str(e))
    except RecursionError:
        return line_no, None, (Reason.MALFORMED_JSON, "nested too deeply")
    if not isinstance(record, dict):
        return line_no, None, (Reason.MALFORMED_JSON, f"a JSON {type(record).__name__}, not an object")
    return line_no, record, None


_SURROGATE = re.compile("[\ud800-\udfff]")
INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})  # controls, format characters (zero-width...), spaces


def _has_surrogate(value: str) -> bool:
    """Whether ``value`` holds a lone UTF-16 surrogate, which UTF-8 cannot encode: a JSON ``\\ud800``
    escape without its pair, or CESU-8 bytes, which ``json.loads`` decodes with ``surrogatepass``."""
    return not value.isascii() and _SURROGATE.search(value) is not None


def visible(text: str) -> bool:
    """Whether ``text`` has a character that is not whitespace, a control or a format character
    (zero-width space, word joiner, byte order mark...): text a reader would see."""
    return any(unicodedata.category(c) not in INVISIBLE for c in text)


def check_text(value: Any, max_bytes: int) -> tuple[str | None, Reason | None, str | None]:
    """Validate one text value: ``(text, None, None)`` or ``(None, reason, detail)``."""
    if value is None:
        return None, Reason.NULL_TEXT, None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, Reason.INVALID_UTF8, str(e)
    if not isinstance(value, str):
        return None, Reason.NOT_STRING, f"got {type(value).__name__}"
    if _has_surrogate(value):
        at = _SURROGATE.search(value).start()
        return None, Reason.INVALID_UTF8, f"lone UTF-16 surrogate {value[at]!r} at character {at}: not encodable"
    if len(value) > max_bytes // 4 and len(value.encode("utf-8")) > max_bytes:
        return None, Reason.TEXT_TOO_LARGE, f"{len(value.encode('utf-8'))} bytes > input.max_text_bytes={max_bytes}"
    if not visible(value):
        return None, Reason.EMPTY_TEXT, "only whitespace, control or format characters" if value.strip() else None
    return value, None, None


def _utf8(column: pa.Array) -> pa.Array:
    """A text column as ``string``: dictionaries decoded, binary cast; ``ArrowInvalid`` if a value is not UTF-8."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column.validate(full=True)
    return column.cast(pa.string())


def text_problems(texts: pa.Array, max_bytes: int) -> Iterator[tuple[np.ndarray, Reason, list[str | None]]]:
    """``check_text``'s rejections of a UTF-8 column, as (rows, reason, detail per row), in the order it checks."""
    null = texts.is_null().to_numpy(zero_copy_only=False)
    yield null, Reason.NULL_TEXT, [None] * int(null.sum())
    size = pc.binary_length(texts).fill_null(0).to_numpy()
    large = size > max_bytes
    yield large, Reason.TEXT_TOO_LARGE, [f"{b} bytes > input.max_text_bytes={max_bytes}" for b in size[large].tolist()]
    # A printable ASCII character other than space is visible; the rare rest is checked character by character.
    ascii_visible = pc.match_substring_regex(texts, "[!-~]").fill_null(True).to_numpy(zero_copy_only=False)
    unsure = np.flatnonzero(~ascii_visible & ~null & ~large)
    blank = [i for i in unsure.tolist() if not visible(texts[i].as_py())]
    empty = np.zeros(len(texts), dtype=bool)
    empty[blank] = True
    details = ["only whitespace, control or format characters" if texts[i].as_py().strip() else None for i in blank]
    yield empty, Reason.EMPTY_TEXT, details


class Rejections:
    """Per row of a block, the first rejection reason and detail added for it (null for good rows)."""

    def __init__(self, rows: int):
        self.reasons = np.full(rows, None, dtype=object)
        self.details = np.full(rows, None, dtype=object)

    def add(self, rows: np.ndarray, reason: Reason, details: str | list[str | None]) -> None:
        """Reject ``rows`` (a mask) that no earlier check rejected; ``details`` is one for all, or one per row."""
        fresh = rows & (self.reasons == None)  # noqa: E711 - element-wise
        if isinstance(details, list):
            details = [d[:500] if d else d for d in np.array(details, dtype=object)[fresh[rows]]]
        elif details:
            details = details[:500]
        self.reasons[fresh] = str(reason)
        self.details[fresh] = details


class ListedFiles(DefaultFileMetadataProvider):
    """Hands Ray Data the driver's one listing of the shards instead of listing them again."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes

    def expand_paths(self, paths: list[str], filesystem, partitioning=None, ignore_missing_paths=False):
        for path in paths:
            yield path, self.sizes.get(path)


class ShardDatasource(FileBasedDatasource):
    """Streams Parquet or Arrow (projected row batches) or JSONL (line by line, tolerant) shards.

    ``types`` declares each passthrough column's type (``check_schema``): values are converted
    to it (``coerce``) or their row is rejected, so every block has the same schema.
    ``skip`` (relative shard -> row ranges, ``pipeline.commit``) holds rows a killed run already
    wrote: they are not read again. Blocks hold at most ``block_rows`` rows.
    """

    def __init__(
        self,
        shards: Shards,
        cfg: InputConfig,
        filesystem,
        types: pa.Schema,
        duplicates: dict[str, dict[int, str]],
        skip: dict[str, Ranges] | None = None,
        block_rows: int = READ_BATCH_ROWS,
    ):
        super().__init__(shards.files, filesystem=filesystem, meta_provider=ListedFiles(shards.sizes))
        self._shards = shards
        self._cfg = cfg
        self._types = types
        self._duplicates = duplicates
        self._skip = skip or {}
        self._block_rows = block_rows

    def _open_input_source(self, filesystem, path: str, **open_args):
        try:
            if self._shards.format_of(path) in TYPED:  # a Parquet footer, an Arrow file's magic: random access
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)
        except Exception as e:  # noqa: BLE001 - see _changed
            raise self._changed(path, e) from None

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        relative = self._shards.relative(path)
        skip = self._skip.get(relative, [])
        fmt = self._shards.format_of(path)
        if fmt in TYPED:
            first_row = 0
            for batch in self._guarded(_batches(f, fmt, self._columns(), self._block_rows), path):
                rows = np.arange(first_row, first_row + batch.num_rows, dtype=np.int64)
                first_row += batch.num_rows
                if skip:
                    fresh = ~covered_rows(skip, rows)
                    batch, rows = batch.filter(pa.array(fresh)), rows[fresh]
                if len(rows):
                    yield self._parquet_block(relative, batch, rows)
            return
        batch: list[Record] = []
        for item in self._guarded(read_records(f, self._shards.format_of(path), self._columns()), path):
            if skip and covered(skip, item[0]):
                continue
            batch.append(item)
            if len(batch) == self._block_rows:
                yield self._block(relative, batch)
                batch = []
        if batch:
            yield self._block(relative, batch)

    def _guarded(self, items: Iterator, path: str) -> Iterator:
        try:
            yield from items
        except Exception as e:  # noqa: BLE001 - see _changed
            raise self._changed(path, e) from None

    def _changed(self, path: str, e: Exception) -> ShardChangedError:
        """``scan_input`` read every shard to its end before the run: one that fails now changed since."""
        return ShardChangedError(
            f"input shard {self._shards.relative(path)} became unreadable during the run ({_describe(e)}), after the "
            "pre-run scan had read it whole: was it replaced or deleted? Nothing was published; run the job again"
        )

    def _columns(self) -> list[str]:
        return projected_columns(self._cfg, self._shards.passthrough)

    def _block(self, relative: str, items: list[Record]) -> pa.Table:
        cfg = self._cfg
        columns: dict[str, list] = {c: [] for c in self._shards.passthrough}
        generated_ids, rows, texts, pairs, errors, details = [], [], [], [], [], []
        duplicates = self._duplicates.get(relative, {})
        for row, record, parse_error in items:
            record = record or {}
            rows.append(row)
            generated_ids.append(f"{relative}:{row}")
            error = parse_error
            for c in self._shards.passthrough:
                value, problem = self._passthrough(c, record.get(c))
                columns[c].append(value)
                error = error or problem
            if not error and row in duplicates:
                error = (Reason.DUPLICATE_ID, f"id already at {duplicates[row]}")
            text = pair = None
            if not error:
                text, reason, detail = check_text(record.get(cfg.text_column), cfg.max_text_bytes)
                error = (reason, detail) if reason else None
                if cfg.text_pair_column and not error:
                    pair, reason, detail = check_text(record.get(cfg.text_pair_column), cfg.max_text_bytes)
                    error = (reason, f"text pair: {detail or reason}") if reason else None
                if error:
                    text = pair = None
            texts.append(text)
            pairs.append(pair)
            errors.append(str(error[0]) if error else None)
            details.append(error[1][:500] if error and error[1] else None)
        table: dict[str, Any] = {}
        if not cfg.id_columns:
            table[S.GENERATED_ID] = pa.array(generated_ids, pa.string())
        for c, values in columns.items():
            table[c] = pa.array(values, self._types.field(c).type)
        table[S.SOURCE_FILE] = pa.array([relative] * len(items), pa.string())
        table[S.SOURCE_ROW] = pa.array(rows, pa.int64())
        table[S.TEXT] = pa.array(texts, pa.string())
        if cfg.text_pair_column:
            table[S.TEXT_PAIR] = pa.array(pairs, pa.string())
        table[S.ERROR] = pa.array(errors, pa.string())
        table[S.ERROR_DETAIL] = pa.array(details, pa.string())
        return pa.table(table)

    def _parquet_block(self, relative: str, batch: pa.RecordBatch, rows: np.ndarray) -> pa.Table:
        """``_block`` for a Parquet or Arrow row batch (``rows``: its rows' numbers in the shard), computed column by
        column: the same table, the same rejections.

        Typed shards' values have their declared types already (``check_schema``), so what is left to check per row
        is a null id, a duplicate id and the text (``check_text``); only texts without a visible ASCII character
        are looked at one by one. A batch with a string that is not UTF-8 goes through ``_block`` row by row.
        """
        cfg, n = self._cfg, batch.num_rows
        try:
            texts = [_utf8(batch.column(c)) for c in (cfg.text_column, cfg.text_pair_column) if c]
            for c in self._shards.passthrough:
                if pa.types.is_string(batch.column(c).type) or pa.types.is_large_string(batch.column(c).type):
                    batch.column(c).validate(full=True)
        except pa.ArrowInvalid:
            return self._block(relative, [(row, *item[1:]) for row, item in zip(rows.tolist(), _parquet_records(batch, 0))])
        rejected = Rejections(n)
        for c in cfg.id_columns:
            missing = batch.column(c).is_null().to_numpy(zero_copy_only=False)
            rejected.add(missing, Reason.MISSING_ID, f"no value in id column {c!r}")
        duplicates = self._duplicates.get(relative, {})
        if duplicates:
            later = np.isin(rows, np.fromiter(duplicates, np.int64, len(duplicates)))
            rejected.add(later, Reason.DUPLICATE_ID, [f"id already at {duplicates[row]}" for row in rows[later].tolist()])
        for text, prefix in zip(texts, ("", "text pair: ")):
            for mask, reason, details in text_problems(text, cfg.max_text_bytes):
                rejected.add(mask, reason, [prefix + (detail or str(reason)) for detail in details] if prefix else details)
        ok = pa.array(rejected.reasons == None)  # noqa: E711 - element-wise
        table: dict[str, Any] = {}
        if not cfg.id_columns:
            table[S.GENERATED_ID] = pc.binary_join_element_wise(pa.repeat(relative, n), pa.array(rows).cast(pa.string()), ":")
        for c in self._shards.passthrough:
            table[c] = batch.column(c).cast(self._types.field(c).type)
        table[S.SOURCE_FILE] = pa.repeat(pa.scalar(relative, pa.string()), n)
        table[S.SOURCE_ROW] = pa.array(rows)
        table[S.TEXT] = pc.if_else(ok, texts[0], pa.scalar(None, pa.string()))
        if cfg.text_pair_column:
            table[S.TEXT_PAIR] = pc.if_else(ok, texts[1], pa.scalar(None, pa.string()))
        table[S.ERROR] = pa.array(rejected.reasons, pa.string())
        table[S.ERROR_DETAIL] = pa.array(rejected.details, pa.string())
        return pa.table(table)

    def _passthrough(self, column: str, value: Any) -> tuple[Any, tuple[Reason, str] | None]:
        """The value to write for an id or label column, and the rejection it causes (if any).

        A null or absent id is ``missing_id``; an id or label that does not convert losslessly to its
        column's type is ``bad_id`` / ``bad_label``; a string UTF-8 cannot encode is ``invalid_utf8``.
        Rejected values are written as null.
        """
        is_id = column in self._cfg.id_columns
        if value is None:
            return None, (Reason.MISSING_ID, f"no value in id column {column!r}") if is_id else None
        value, why = coerce(value, self._types.field(column).type)
        if why:
            return None, (Reason.BAD_ID if is_id else Reason.BAD_LABEL, f"column {column!r}: {why}")
        if isinstance(value, str) and _has_surrogate(value):
            return None, (Reason.INVALID_UTF8, f"column {column!r} holds a lone UTF-16 surrogate")
        return value, None
