"""Stage 1, source: find input shards, check their schema, stream validated rows.

Contract of every block this stage yields (see ``pipeline.schema``):
passthrough columns (id columns or a generated ``id``, plus the gold label column),
``_source_file``, ``_source_row``, ``_text`` (null when rejected), optionally
``_text_pair``, and ``_error``/``_error_detail`` (null for good rows).

Bad rows are never dropped: they carry a ``Reason`` to the sink, which quarantines them.
Problems that make a whole shard unusable (missing text column, wrong column type,
unreadable file) raise ``InputError`` on the driver, before any actor starts.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import DefaultFileMetadataProvider, FileBasedDatasource

from pipeline import schema as S
from pipeline.commit import Ranges, covered
from pipeline.config import InputConfig
from pipeline.schema import Reason

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
SUFFIXES = {"parquet": (".parquet", ".pq"), "jsonl": JSONL_SUFFIXES}
TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())
READ_BATCH_ROWS = 2048


# (row or line number, parsed record or None, (reason, detail) when the row is rejected)
Record = tuple[int, "dict | None", "tuple[Reason, str | None] | None"]


class InputError(ValueError):
    """An input shard that cannot be read as configured; names the file, column and expectation."""


@dataclass(frozen=True)
class Shards:
    """The input, resolved on the driver: files in a deterministic order, each with its format."""

    root: str  # ids are file paths relative to this
    files: list[str]
    sizes: dict[str, int]  # from the one listing; read tasks reuse it instead of listing again
    formats: dict[str, str]  # file -> "parquet" or "jsonl"
    passthrough: list[str]  # columns copied to the output unchanged
    fs: fsspec.AbstractFileSystem
    skipped: tuple[str, ...] = ()  # files under the input that are not shards (README, .csv), relative

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self.root) if self.root else posixpath.basename(path)

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
    sizes = {name: info["size"] for name, info in listing.items() if info["type"] == "file"}
    files = sorted(sizes)
    files = [f for f in files if not any(part[:1] in "_." for part in posixpath.relpath(f, root).split("/"))]
    if not files:
        raise InputError(f"input.path {cfg.path} holds no input files")
    formats = {f: cfg.format if single and cfg.format else infer_format(f) for f in files}
    if single and formats[path] is None:
        raise InputError(f"cannot infer the format of {path}: set input.format to parquet or jsonl")
    if cfg.format:
        other = [posixpath.relpath(f, root) for f, fmt in formats.items() if fmt not in (None, cfg.format)]
        if other:
            raise InputError(
                f"input.format is {cfg.format}, but {len(other)} file(s) under {cfg.path} are shards of another "
                f"format: {other[:5]}. Move them away, or unset input.format to read each file by its extension"
            )
    shards = [f for f in files if formats[f]]
    skipped = [posixpath.relpath(f, root) for f in files if not formats[f]]
    if not shards:
        raise InputError(f"input.path {cfg.path} holds no Parquet or JSONL shards (only {skipped[:5]})")
    return Shards(
        root=root,
        files=shards,
        sizes={f: sizes[f] for f in shards},
        formats={f: formats[f] for f in shards},
        passthrough=passthrough,
        fs=fs,
        skipped=tuple(skipped),
    )


def check_schema(shards: Shards, cfg: InputConfig) -> tuple[pa.Schema | None, dict[str, int]]:
    """Check every shard opens and has the configured columns with usable types (in parallel).

    Returns the schema of the passthrough columns and each Parquet shard's row count from its
    footer. JSONL has neither: its values are checked row by row, its rows counted by
    ``scan_input``, and without Parquet shards the passthrough types are inferred from the data
    (schema None).
    """
    jsonl = [path for path in shards.files if shards.format_of(path) == "jsonl"]
    parquet = [path for path in shards.files if shards.format_of(path) == "parquet"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda path: _probe_jsonl(shards, path), jsonl))
    if not parquet:
        return None, {}

    def footer(path: str) -> pq.FileMetaData:
        try:
            with shards.fs.open(path, "rb") as f:
                return pq.read_metadata(f)
        except Exception as e:  # noqa: BLE001 - any failure here means the shard is unreadable
            raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None

    with ThreadPoolExecutor(16) as pool:
        footers = list(pool.map(footer, parquet))
    expected = None
    for path, file_schema in zip(parquet, (f.schema.to_arrow_schema() for f in footers)):
        for column in [cfg.text_column, cfg.text_pair_column]:
            if column is None:
                continue
            if column not in file_schema.names:
                raise InputError(f"{path}: missing text column {column!r} (has {file_schema.names})")
            if file_schema.field(column).type not in TEXT_TYPES:
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
    return expected, {path: f.num_rows for path, f in zip(parquet, footers)}


def _probe_jsonl(shards: Shards, path: str) -> None:
    """Fail early on a JSONL shard that cannot be opened or decompressed at all."""
    try:
        with open_shard(shards, path) as f:
            f.read(1024)
    except Exception as e:  # noqa: BLE001 - any failure here means the shard is unreadable
        raise InputError(f"{path}: not a readable JSONL file ({type(e).__name__}: {e})") from None


def open_shard(shards: Shards, path: str):
    """A binary file object for one shard (JSONL decompressed by extension)."""
    return shards.fs.open(path, "rb", compression=None if shards.format_of(path) == "parquet" else "infer")


@dataclass(frozen=True)
class InputScan:
    """What a pass over the input found, independently of the pipeline run."""

    rows: int
    duplicates: dict[str, dict[int, str]]  # relative shard -> row -> where that id was seen first


def scan_input(shards: Shards, id_columns: list[str], footer_rows: dict[str, int]) -> InputScan:
    """Count input rows and, with ``id_columns``, find duplicate ids.

    Parquet rows without ids to check are the ``footer_rows`` that ``check_schema`` read.
    Otherwise one Ray task per shard counts rows (non-blank JSONL lines) and reads only the id
    columns, returning a 16-byte hash per row; the driver keeps the first occurrence in
    (shard, row) order and marks later ones. Its memory is ~24 bytes per input row, only when
    ``input.reject_duplicate_ids`` is on. Tasks reserve a whole CPU: the scan runs before any
    stage starts, and more tasks than CPUs would only start more worker processes.
    """
    import ray

    counted = {path: footer_rows[path] for path in shards.files if not id_columns and path in footer_rows}
    if len(counted) == len(shards.files):
        return InputScan(sum(counted.values()), {})

    @ray.remote(num_cpus=1)
    def scan(path: str) -> tuple[int, np.ndarray, np.ndarray]:
        with open_shard(shards, path) as f:
            if not id_columns:
                return sum(1 for line in f if line.strip()), np.empty(0, np.int64), np.empty(0, "V16")
            count, rows, digests = 0, [], []
            for row, record, _ in read_records(f, shards.format_of(path), id_columns):
                count += 1
                ids = tuple(record.get(c) for c in id_columns) if record else (None,)
                if any(v is not None for v in ids):
                    rows.append(row)
                    digests.append(hashlib.blake2b(repr(ids).encode(), digest_size=16).digest())
        return count, np.array(rows, np.int64), np.frombuffer(b"".join(digests), "V16")

    # With id columns every shard is scanned, so results[i] is shards.files[i]; without, no digests.
    results = ray.get([scan.remote(p) for p in shards.files if p not in counted])
    total = sum(counted.values()) + sum(count for count, _, _ in results)
    digests = np.concatenate([d for _, _, d in results])
    if not len(digests):
        return InputScan(total, {})
    rows = np.concatenate([r for _, r, _ in results])
    shard = np.concatenate([np.full(len(r), i) for i, (_, r, _) in enumerate(results)])
    _, first, inverse, counts = np.unique(digests, return_index=True, return_inverse=True, return_counts=True)
    later = counts[inverse] > 1
    later[first] = False
    duplicates: dict[str, dict[int, str]] = {}
    for k in np.flatnonzero(later):
        origin = first[inverse[k]]
        where = f"{shards.relative(shards.files[shard[origin]])}:{rows[origin]}"
        duplicates.setdefault(shards.relative(shards.files[shard[k]]), {})[int(rows[k])] = where
    return InputScan(total, duplicates)


def read_records(f, fmt: str, columns: list[str]) -> Iterator[Record]:
    """Every row of one shard: Parquet projected to ``columns``; JSONL line by line, tolerant."""
    if fmt == "parquet":
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                yield row, record, None
                row += 1
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
    if not isinstance(record, dict):
        return line_no, None, (Reason.MALFORMED_JSON, f"a JSON {type(record).__name__}, not an object")
    return line_no, record, None


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
    if len(value) > max_bytes // 4 and len(value.encode("utf-8")) > max_bytes:
        return None, Reason.TEXT_TOO_LARGE, f"{len(value.encode('utf-8'))} bytes > input.max_text_bytes={max_bytes}"
    if not value.strip():
        return None, Reason.EMPTY_TEXT, None
    return value, None, None


class ListedFiles(DefaultFileMetadataProvider):
    """Hands Ray Data the driver's one listing of the shards instead of listing them again."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes

    def expand_paths(self, paths: list[str], filesystem, partitioning=None, ignore_missing_paths=False):
        for path in paths:
            yield path, self.sizes.get(path)


class ShardDatasource(FileBasedDatasource):
    """Streams Parquet (projected row batches) or JSONL (line by line, tolerant) shards.

    ``skip`` (relative shard -> row ranges, ``pipeline.commit``) holds rows a killed run already
    wrote: they are not read again. Blocks hold at most ``block_rows`` rows.
    """

    def __init__(
        self,
        shards: Shards,
        cfg: InputConfig,
        filesystem,
        duplicates: dict[str, dict[int, str]],
        skip: dict[str, Ranges] | None = None,
        block_rows: int = READ_BATCH_ROWS,
    ):
        super().__init__(shards.files, filesystem=filesystem, meta_provider=ListedFiles(shards.sizes))
        self._shards = shards
        self._cfg = cfg
        self._duplicates = duplicates
        self._skip = skip or {}
        self._block_rows = block_rows

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._shards.format_of(path) == "parquet":  # Parquet needs random access for its footer.
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        relative = self._shards.relative(path)
        skip = self._skip.get(relative, [])
        batch: list[Record] = []
        for item in read_records(f, self._shards.format_of(path), self._columns()):
            if skip and covered(skip, item[0]):
                continue
            batch.append(item)
            if len(batch) == self._block_rows:
                yield self._block(relative, batch)
                batch = []
        if batch:
            yield self._block(relative, batch)

    def _columns(self) -> list[str]:
        cols = [self._cfg.text_column, self._cfg.text_pair_column, *self._shards.passthrough]
        return list(dict.fromkeys(c for c in cols if c))

    def _block(self, relative: str, items: list[Record]) -> pa.Table:
        cfg = self._cfg
        columns: dict[str, list] = {c: [] for c in self._shards.passthrough}
        generated_ids, rows, texts, pairs, errors, details = [], [], [], [], [], []
        duplicates = self._duplicates.get(relative, {})
        for row, record, parse_error in items:
            if row in duplicates:
                parse_error = (Reason.DUPLICATE_ID, f"id already at {duplicates[row]}")
            rows.append(row)
            generated_ids.append(f"{relative}:{row}")
            record = record or {}
            for c in self._shards.passthrough:
                columns[c].append(record.get(c))
            if parse_error:
                text, pair, error = None, None, parse_error
            else:
                text, reason, detail = check_text(record.get(cfg.text_column), cfg.max_text_bytes)
                error = (reason, detail) if reason else None
                pair = None
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
            try:
                table[c] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise InputError(f"{relative}: column {c!r} mixes value types ({e})") from None
        table[S.SOURCE_FILE] = pa.array([relative] * len(items), pa.string())
        table[S.SOURCE_ROW] = pa.array(rows, pa.int64())
        table[S.TEXT] = pa.array(texts, pa.string())
        if cfg.text_pair_column:
            table[S.TEXT_PAIR] = pa.array(pairs, pa.string())
        table[S.ERROR] = pa.array(errors, pa.string())
        table[S.ERROR_DETAIL] = pa.array(details, pa.string())
        return pa.table(table)
