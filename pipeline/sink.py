"""Stage 4, sink: Parquet parts, quarantined rows, per-task stats, a receipt per part.

Each write task writes, into its run's staging directory, its good rows to
``part-<run>-<task>-<id>.parquet`` (zstd, with the run's file-level metadata) and its rejected
rows to ``_rejected/`` under the same name; after closing them it writes the part's receipt
(``pipeline.commit.Receipt``: files, row counts, stats, the input rows it holds) and returns it.
``on_write_complete`` keeps the receipts of the tasks that succeeded; ``pipeline.commit`` commits
their parts.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink, WriteResult

from pipeline import schema as S
from pipeline.commit import Receipt, to_ranges
from pipeline.config import StorageConfig
from pipeline.storage import filesystem, join


@dataclass
class WriteStats:
    """What one write task (or, summed, the whole run) wrote."""

    rows_out: int = 0  # input rows written (documents, however many rows each wrote)
    rows_rejected: int = 0
    chunks_out: int = 0  # rows written: rows_out unless the task writes several rows per input row (chunks)
    real_tokens: int = 0
    padded_tokens: int = 0
    rows_truncated: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    rows_by_node: Counter = field(default_factory=Counter)
    rows_by_actor: Counter = field(default_factory=Counter)  # "<actor id>:<pid>" -> rows
    confusion: Counter = field(default_factory=Counter)  # (gold, predicted) -> rows

    def add(self, other: WriteStats) -> None:
        for name in ("rows_out", "rows_rejected", "chunks_out", "real_tokens", "padded_tokens", "rows_truncated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("rejected_by_reason", "rows_by_node", "rows_by_actor", "confusion"):
            getattr(self, name).update(getattr(other, name))

    def to_json(self) -> dict:
        """JSON-able form for receipts; ``confusion`` as ``[gold, predicted, rows]`` triples."""
        scalars = ("rows_out", "rows_rejected", "chunks_out", "real_tokens", "padded_tokens", "rows_truncated")
        data = {name: getattr(self, name) for name in scalars}
        data.update({name: dict(getattr(self, name)) for name in ("rejected_by_reason", "rows_by_node", "rows_by_actor")})
        return {**data, "confusion": [[gold, pred, n] for (gold, pred), n in self.confusion.items()]}

    @classmethod
    def from_json(cls, data: dict) -> WriteStats:
        counters = {name: Counter(data[name]) for name in ("rejected_by_reason", "rows_by_node", "rows_by_actor")}
        confusion = Counter({(gold, pred): n for gold, pred, n in data["confusion"]})
        scalars = {k: v for k, v in data.items() if k not in counters and k != "confusion"}
        return cls(**scalars, **counters, confusion=confusion)

    @classmethod
    def total(cls, receipts: Iterable[Receipt]) -> WriteStats:
        stats = cls()
        for receipt in receipts:
            stats.add(cls.from_json(receipt.stats))
        return stats


class _PartWriter:
    """Lazily opened Parquet writer for one output file."""

    def __init__(self, fs, path: str, schema: pa.Schema):
        self.fs, self.path, self.schema = fs, path, schema
        self.writer: pq.ParquetWriter | None = None
        self.handle = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.handle = self.fs.open(self.path, "wb")
            self.writer = pq.ParquetWriter(self.handle, self.schema, compression="zstd")
        self.writer.write_table(table)

    def close(self) -> bool:
        if self.writer is None:
            return False
        self.writer.close()
        self.handle.close()
        return True


class ParquetSink(Datasink[Receipt | None]):
    """Writes inference results; see the module docstring."""

    def __init__(
        self,
        staging_uri: str,
        run_id: str,
        storage: StorageConfig,
        results: pa.Schema,
        passthrough: list[str],
        passthrough_schema: pa.Schema,
        label_column: str | None,
        prediction_column: str | None,
        rows_per_file: int,
        progress,
    ):
        """``results``: the task's output columns (with file metadata); passthrough columns go first.

        ``passthrough_schema``: the declared type of each passthrough column (``source.check_schema``);
        every block's values already have it. ``label_column`` (gold)
        and ``prediction_column`` (the task's ``evaluates``) feed the confusion matrix.
        """
        self.staging_uri = staging_uri
        self.run_id = run_id
        self.storage = storage
        self.results = results
        self.passthrough = passthrough
        self.passthrough_schema = passthrough_schema
        self.label_column = label_column
        self.prediction_column = prediction_column
        self.rows_per_file = rows_per_file
        self.progress = progress
        self.receipts: list[Receipt] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def _schemas(self, table: pa.Table) -> tuple[pa.Schema, pa.Schema]:
        # A generated id (no input.id_columns) leads, then the id, label and group columns passed through.
        generated = [table.schema.field(S.GENERATED_ID)] if S.GENERATED_ID in table.column_names else []
        fields = [*generated, *(self.passthrough_schema.field(c) for c in self.passthrough)]
        schema = pa.schema([*fields, *self.results], metadata=self.results.metadata)
        return schema, S.rejected_schema(fields)

    def write(self, blocks: Iterable[Block], ctx) -> Receipt | None:
        fs, root = filesystem(self.staging_uri, self.storage)
        name = f"part-{self.run_id}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        data = rejected = None
        stats = WriteStats()
        origins, written = [], []  # (_source_file, _source_row) of every row, good and rejected; of good ones
        for block in blocks:
            started = time.perf_counter()
            table = BlockAccessor.for_block(block).to_arrow()
            if not table.num_rows:  # a shuffle's empty partitions (Task.group_by) may not even carry the columns
                continue
            origins.append(table.select([S.SOURCE_FILE, S.SOURCE_ROW]))
            if data is None:
                schema, rejected_schema = self._schemas(table)
                data = _PartWriter(fs, join(root, name), schema)
                rejected = _PartWriter(fs, join(root, S.REJECTED_DIR, name), rejected_schema)
            ok = pc.is_null(table[S.ERROR])
            good, bad = table.filter(ok), table.filter(pc.invert(ok))
            if good.num_rows:
                data.write(good.select(data.schema.names).cast(data.schema))
                written.append(good.select([S.SOURCE_FILE, S.SOURCE_ROW]))
                self._count(good, stats)
            if bad.num_rows:
                rejected.write(_rejected_rows(bad, rejected.schema))
                stats.rows_rejected += bad.num_rows
                stats.rejected_by_reason.update(bad[S.ERROR].to_pylist())
            self.progress.beat.remote("write", table.num_rows, time.perf_counter() - started)
        if data is None:
            return None
        data.close()
        rejected.close()
        if written:  # an input row's chunks are consecutive rows of one part: count each row once
            stats.rows_out = pa.concat_tables(written).group_by([S.SOURCE_FILE, S.SOURCE_ROW]).aggregate([]).num_rows
        origin = pa.concat_tables(origins)
        rows = {
            shard: to_ranges(origin.filter(pc.equal(origin[S.SOURCE_FILE], shard))[S.SOURCE_ROW].to_numpy())
            for shard in pc.unique(origin[S.SOURCE_FILE]).to_pylist()
        }
        receipt = Receipt(
            run=self.run_id,
            part=name,
            data_rows=stats.chunks_out,
            rejected_rows=stats.rows_rejected,
            rows=rows,
            stats=stats.to_json(),
        )
        receipt.write(fs, root)  # last: a part without its receipt is garbage
        return receipt

    def _count(self, good: pa.Table, stats: WriteStats) -> None:
        stats.chunks_out += good.num_rows
        stats.real_tokens += int(pc.sum(good[S.NUM_TOKENS]).as_py() or 0)
        stats.padded_tokens += int(pc.sum(good[S.PADDED_TOKENS]).as_py() or 0)
        stats.rows_truncated += int(pc.sum(good[S.TRUNCATED].cast(pa.int64())).as_py() or 0)
        stats.rows_by_node.update(counts(good[S.NODE]))
        stats.rows_by_actor.update(counts(good[S.ACTOR]))
        if self.label_column:
            stats.confusion.update(zip(good[self.label_column].to_pylist(), good[self.prediction_column].to_pylist()))

    def on_write_complete(self, write_result: WriteResult[Receipt | None]) -> None:
        self.receipts = [receipt for receipt in write_result.write_returns if receipt is not None]


def counts(column: pa.ChunkedArray) -> dict:
    """How many times each value occurs in ``column`` (a few distinct values over many rows)."""
    return {item["values"]: item["counts"] for item in pc.value_counts(column).to_pylist()}


def _rejected_rows(bad: pa.Table, schema: pa.Schema) -> pa.Table:
    names = {S.SOURCE_FILE: "source_file", S.SOURCE_ROW: "source_row", S.ERROR: "reason", S.ERROR_DETAIL: "detail"}
    return bad.rename_columns([names.get(c, c) for c in bad.column_names]).select(schema.names).cast(schema)


def write_rejected(staging_uri: str, storage: StorageConfig, part: str, schema: pa.Schema, records: list[dict]) -> None:
    """Write ``records`` (dicts of ``schema``'s columns; missing ones null) as ``_rejected/<part>`` in a run's
    staging, from the driver: what is quarantined before the run, such as unreadable shards."""
    fs, root = filesystem(staging_uri, storage)
    with fs.open(join(root, S.REJECTED_DIR, part), "wb") as f:
        pq.write_table(pa.Table.from_pylist(records, schema=schema), f, compression="zstd")


def evaluation(confusion: Counter) -> dict:
    """Accuracy and confusion matrix (rows: gold, columns: predicted) from (gold, pred) counts."""
    labels = sorted({str(label) for pair in confusion for label in pair})
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for (gold, pred), count in confusion.items():
        matrix[index[str(gold)], index[str(pred)]] += count
    total = int(matrix.sum())
    return {
        "accuracy": float(np.trace(matrix) / total) if total else None,
        "labels": labels,
        "confusion_matrix": matrix.tolist(),
    }
