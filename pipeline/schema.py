"""The one home of every column name and metadata key the pipeline writes, and the one place
the output schema is assembled (each task in ``pipeline.tasks`` declares its own fields' types).

Stages exchange Arrow tables. Columns starting with ``_`` are internal: they travel
between stages and are consumed by the sink, never written to the output files.
"""

from __future__ import annotations

import json
from enum import StrEnum

import pyarrow as pa

# ---- internal columns (source -> tokenize -> infer -> sink) -------------------------
SOURCE_FILE = "_source_file"  # input shard the row came from
SOURCE_ROW = "_source_row"  # 0-based row index (Parquet) or line number (JSONL) in that shard
ERROR = "_error"  # per-row rejection reason (a Reason value) or null
ERROR_DETAIL = "_error_detail"  # human-readable detail for the rejection
TEXT = "_text"  # validated text (null for rejected rows)
TEXT_PAIR = "_text_pair"
# Model sequences of a row (pipeline.tasks.base: multi-sequence rows), each column a list per sequence:
INPUT_IDS = "_input_ids"  # list<list<int32>>, unpadded
TOKEN_TYPE_IDS = "_token_type_ids"  # list<list<int8>>, only for pair inputs
OFFSETS = "_offsets"  # list<list<int32>>: flattened (start, end) per token, (-1, -1) for special tokens
SPANS = "_spans"  # list<list<int32>>: (start, end) characters of the row's text the sequence covers
PADDED_TOKENS = "_padded_tokens"  # padded length of the micro-batch the row ran in
NODE = "_node"  # Ray node id of the model actor that scored the row
ACTOR = "_actor"  # "<actor id>:<pid>" of that model actor; a restarted actor shows a new pid
INTERNAL_PREFIX = "_"

# ---- output columns (each task declares its own with their types: pipeline.tasks) -------
GENERATED_ID = "id"
NUM_TOKENS = "num_tokens"  # int32: real tokens the model saw (after truncation)
TRUNCATED = "truncated"  # bool: the text was longer than max_length
LOGITS = "logits"
LABEL = "label"
LABEL_ID = "label_id"
SCORE = "score"
CLS_EMBEDDING = "cls_embedding"
EMBEDDING = "embedding"
TOKEN_LABELS = "token_labels"
ENTITIES = "entities"
RANK = "rank"  # rerank: int32 rank within the row's input.group_column group, 1 = best
SPARSE_EMBEDDING = "sparse_embedding"
# input.long_text: chunk: one row per chunk of a text, with its document's id columns
CHUNK_INDEX = "chunk_index"  # int32: 0, 1, ... within the document
NUM_CHUNKS = "num_chunks"  # int32: chunks of the document
CHAR_START = "char_start"  # int32: the chunk is text[char_start:char_end] of the original text
CHAR_END = "char_end"
CHUNK_TEXT = "chunk_text"  # with output.chunk_text
CHUNK = "chunk"  # pipeline.search: the best chunk's text, quoted from its document


class Reason(StrEnum):
    """Per-row rejection reason codes, written to ``_rejected/`` with the row's id and origin."""

    NULL_TEXT = "null_text"
    EMPTY_TEXT = "empty_text"
    NOT_STRING = "not_string"
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    TEXT_TOO_LARGE = "text_too_large"
    MISSING_ID = "missing_id"
    BAD_ID = "bad_id"
    BAD_LABEL = "bad_label"
    DUPLICATE_ID = "duplicate_id"
    UNREADABLE_SHARD = "unreadable_shard"  # a whole shard, quarantined before the run: one record per shard


def vector(dim: int, dtype: pa.DataType = pa.float32()) -> pa.DataType:
    return pa.list_(dtype, dim)


def chunk_fields(text: bool) -> list[pa.Field]:
    """The columns that place a chunk row in its document (in front of the task's own)."""
    fields = [pa.field(name, pa.int32()) for name in (CHUNK_INDEX, NUM_CHUNKS, CHAR_START, CHAR_END)]
    return [*fields, pa.field(CHUNK_TEXT, pa.string())] if text else fields


def output_schema(id_fields: list[pa.Field], task_fields: list[pa.Field], metadata: dict | None = None) -> pa.Schema:
    """Schema of the output Parquet files: the id columns, ``num_tokens``, ``truncated``, then the
    task's fields (``pipeline.tasks``), with ``metadata`` as the file-level metadata. The sink
    casts every part to it."""
    fields = [*id_fields, pa.field(NUM_TOKENS, pa.int32()), pa.field(TRUNCATED, pa.bool_()), *task_fields]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None)


def rejected_schema(id_fields: list[pa.Field]) -> pa.Schema:
    """Schema of ``_rejected/`` files: enough to find and fix every rejected row."""
    return pa.schema(
        [
            *id_fields,
            pa.field("source_file", pa.string()),
            pa.field("source_row", pa.int64()),
            pa.field("reason", pa.string()),
            pa.field("detail", pa.string()),
        ]
    )


# ---- file-level metadata and run artifacts ----------------------------------------------
METADATA_KEY = b"encoder_batch"  # JSON: model, revision, task, config hash, version, pooling...
# An output directory and its commit protocol (pipeline.commit):
MANIFEST = "_manifest.json"  # the commit record: exactly the files of the output
SUCCESS = "_SUCCESS"  # written last, after the manifest and its clean-up
REJECTED_DIR = "_rejected"
STAGING = "_staging"  # _staging/<run>/: where a run writes until it commits
RUN_FILE = "_run.json"  # _staging/<run>/_run.json: what the run computes (model, config, input)
RECEIPTS = "_receipts"  # _staging/<run>/_receipts/<part>.json: one per finished write task
LEASE = "_lease"  # _lease/<generation>.json: the one driver allowed to write
CURRENT = "_CURRENT"  # jobs.nightly: dt=<date>/_CURRENT names the version readers use
INDEX_DIR = "_index"  # jobs.index: the ANN index over an embedding output (pipeline.index)
