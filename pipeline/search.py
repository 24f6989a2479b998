"""Text search over an embedding or sparse-embedding output: embed queries as the job embedded its rows,
search, fetch the texts of the hits from the job's input (output files hold ids and vectors, not texts),
and optionally rerank the hits with a cross-encoder (``Reranker``: the ``rerank`` task's head).

Everything comes from what an output records about itself: its file-level Parquet metadata (checkpoint,
revision, ``max_length``, dtype, the embedding chain) and its manifest (``pipeline.commit``: the job config,
with the embedding task's settings, input path, text and id columns, tokenizer path, trust flags). Queries go
through the job's own embedding chain (``pipeline.embedding``) with the checkpoint's query prompt, as
sentence-transformers' ``encode_query``, in float32 whatever the stored precision. The index itself lives in
``pipeline.index``. Sparse outputs: queries go through the job's SPLADE head, hits are ranked by dot
product, exactly (``pipeline.index.sparse_search``).

    hits = Searcher("out/bbc_embed").search("football match goal striker", k=5)
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pydantic import ValidationError

from pipeline import embedding
from pipeline import schema as S
from pipeline.checkpoint import ResolvedModel, actor_tokenizer, load_model, resolve
from pipeline.commit import OutputError, committed_output
from pipeline.config import InputConfig, JobConfig, ModelConfig, StorageConfig
from pipeline.index import (
    QUERY,
    RESCORE_MULTIPLIER,
    IndexInfo,
    SearchError,
    load_info,
    open_output,
    open_sparse_output,
    output_metadata,
    search,
    sparse_search,
)
from pipeline.tasks import ModelBatch
from pipeline.source import Shards, open_input, open_shard, read_records, visible
from pipeline.storage import arrow_filesystem
from pipeline.tasks import build

RERANK_SCORE = "rerank_score"  # hits column: the --rerank-model cross-encoder's score of (query, text)


def job_config(output_path: str, storage: StorageConfig | None = None) -> JobConfig:
    """The config of the job that wrote ``output_path`` (nightly: its latest run), from its manifest."""
    try:
        config = committed_output(output_path, storage).manifest["config"]
    except OutputError as e:
        raise SearchError(str(e)) from None
    try:
        return JobConfig.model_validate(config)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise SearchError(
            f"{output_path} was written with a config this version cannot read ({'.'.join(map(str, first['loc']))}: "
            f"{first['msg']}): re-run its embedding job with this version"
        ) from None


def check_query(query: str) -> None:
    """``SearchError`` for a query with nothing to embed (empty, whitespace or invisible characters only)."""
    if not isinstance(query, str) or not visible(query):
        raise SearchError("the query is empty (or only whitespace and invisible characters): give some text to search for")


def pinned_model(output_path: str, storage: StorageConfig, metadata: dict[str, Any]) -> tuple[JobConfig, ResolvedModel, ModelConfig]:
    """(the job config, the resolved checkpoint, its model config) behind an output, pinned to the checkpoint
    bytes its ``metadata`` records; ``SearchError`` when the checkpoint changed since."""
    job = job_config(output_path, storage)
    # A Hub commit sha pins the download; local, s3:// and pkg:// checkpoints ignore the revision and
    # are checked by content hash below.
    model = job.model.model_copy(
        update={
            "path": metadata["model_path"],
            "revision": metadata["model_revision"],
            "dtype": metadata["dtype"],
            "max_length": metadata["max_length"],
        }
    )
    resolved = resolve(model, storage, job.tokenize.path)
    if resolved.fingerprint != metadata["model_revision"]:
        raise SearchError(
            f"{model.path} now holds checkpoint {resolved.fingerprint}, but {output_path} was embedded with "
            f"{metadata['model_revision']}: queries would land in another vector space. Restore that "
            "checkpoint or re-run the embedding job"
        )
    return job, resolved, model


class QueryEmbedder:
    """Embeds queries as the job behind an embedding output embedded its rows: the same checkpoint bytes,
    tokenizer, ``max_length`` and dtype, and the job's own embedding chain rebuilt from its config, with
    the query prompt instead of the document prompt: the checkpoint's ``query`` prompt (as
    ``encode_query``), or ``prompt`` / ``prompt_name`` (one of the checkpoint's) when given. Vectors
    are float32, before quantisation (binary outputs are searched by the sign of each dimension, then
    rescored with the float query, as sentence-transformers does)."""

    def __init__(
        self,
        output_path: str,
        storage: StorageConfig | None = None,
        device: str = "cpu",
        prompt: str | None = None,
        prompt_name: str | None = None,
    ):
        storage = storage or StorageConfig()
        job, resolved, model = pinned_model(output_path, storage, open_output(output_path, storage).metadata)
        task = build(job, resolved)
        self.tokenizer = actor_tokenizer(resolved, lowercase=task.chain.lowercase)
        self.tokenizer.padding_side = "right"  # as the model actors pad (pooling reads the attention mask either way)
        self.max_length = resolved.max_length
        if prompt_name is not None:
            if prompt_name not in task.chain.prompts:
                raise SearchError(f"prompt name {prompt_name!r} is not one of {model.path}'s prompts: "
                                  f"{sorted(task.chain.prompts) or 'it has none'}")
            prompt = task.chain.prompts[prompt_name]
        length = None if prompt is None else embedding.prompt_length(self.tokenizer, prompt, self.max_length)
        self.chain = task.chain.for_queries(prompt, length)
        self.model = load_model(resolved, task, device, model.dtype)
        self.device = device

    def __call__(self, texts: list[str]) -> np.ndarray:
        """One float32 vector per text."""
        import torch

        # As the pipeline: the prompt in front, truncate to max_length, no token type ids, pads masked out.
        encoded = self.tokenizer(
            [self.chain.prompt + text for text in texts],
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_token_type_ids=False,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            outputs = self.model(**encoded)
            return self.chain.embed(outputs.last_hidden_state, encoded["attention_mask"]).cpu().numpy()


class SparseQueryEncoder:
    """Encodes queries as the sparse-embedding job behind an output encoded its rows (``SparseEncoder.encode_query``
    without a prompt): the same checkpoint bytes, tokenizer, ``max_length``, dtype and SPLADE head
    (``pipeline.tasks.sparse_embedding``). Vectors are dense float32 over the vocabulary."""

    def __init__(self, output_path: str, storage: StorageConfig | None = None, device: str = "cpu"):
        storage = storage or StorageConfig()
        job, resolved, model = pinned_model(output_path, storage, open_sparse_output(output_path, storage).metadata)
        self.task = build(job, resolved)
        self.tokenizer = actor_tokenizer(resolved)
        self.max_length = resolved.max_length
        self.model = load_model(resolved, self.task, device, model.dtype)
        self.device = device

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt").to(self.device)
        with torch.inference_mode():
            vectors = self.task.head(self.model(**encoded), ModelBatch(dict(encoded)))[S.SPARSE_EMBEDDING]
        dense = np.zeros((len(texts), self.task.vocab_size), dtype=np.float32)
        for row, vector in enumerate(vectors):
            dense[row, [e["index"] for e in vector]] = [e["value"] for e in vector]
        return dense


class Reranker:
    """Scores (query, document) pairs with a cross-encoder checkpoint exactly as a ``rerank`` job does:
    its tokenizer (pairs, truncated to the checkpoint's max length) and the rerank task's head
    (``pipeline.tasks.rerank``: ``CrossEncoder.predict``'s score)."""

    def __init__(self, model_path: str, storage: StorageConfig | None = None, device: str = "cpu", batch_size: int = 32):
        from pipeline.checkpoint import CheckpointError
        from pipeline.config import ConfigError
        from pipeline.tasks.rerank import Rerank

        try:
            resolved = resolve(ModelConfig(path=model_path, task=Rerank.name), storage or StorageConfig())
            self.task = Rerank.for_checkpoint(resolved)
        except (CheckpointError, ConfigError) as e:
            raise SearchError(f"--rerank-model: {e}") from None
        self.tokenizer = actor_tokenizer(resolved)
        self.max_length = resolved.max_length
        self.model = load_model(resolved, self.task, device, "float32")
        self.device, self.batch_size = device, batch_size

    def __call__(self, query: str, documents: list[str]) -> np.ndarray:
        """One score per document, in order (float32)."""
        import torch

        scores = []
        for start in range(0, len(documents), self.batch_size):
            chunk = documents[start : start + self.batch_size]
            encoded = self.tokenizer([query] * len(chunk), chunk, truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                scores.append(self.task.head(self.model(**encoded), ModelBatch(dict(encoded)))[S.SCORE])
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)


class Searcher:
    """Text search over one embedding or sparse-embedding output: its query encoder, its index (if built),
    its input, and optionally a cross-encoder that reranks the hits (``rerank_model``)."""

    def __init__(
        self,
        output_path: str,
        storage: StorageConfig | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
        rerank_model: str | None = None,
    ):
        self.output_path, self.storage = output_path, storage
        self.job = job_config(output_path, storage)
        metadata = output_metadata(output_path, storage)
        dataset = metadata.get("input_dataset", {})
        if dataset.get("kind") == "hub":  # texts come from the commit that was embedded, not today's
            self.job = self.job.model_copy(update={"input": self.job.input.model_copy(update={"revision": dataset["revision"]})})
        self.sparse = metadata.get("task") == "sparse-embedding"
        if self.sparse and (prompt is not None or prompt_name is not None):
            raise SearchError("sparse-embedding outputs are searched without a prompt: drop --prompt / --prompt-name")
        self.embed = (
            SparseQueryEncoder(output_path, storage)
            if self.sparse
            else QueryEmbedder(output_path, storage, prompt=prompt, prompt_name=prompt_name)
        )
        # None: every search is exact (sparse outputs always are)
        self.index_info: IndexInfo | None = None if self.sparse else load_info(output_path, storage)
        self.rerank = Reranker(rerank_model, storage) if rerank_model else None

    def search(self, query: str, k: int = 10, exact: bool = False, rescore_multiplier: int = RESCORE_MULTIPLIER) -> pa.Table:
        """The ``k`` rows most similar to ``query``, best first: ``score``, the id columns and the input text.

        Over chunk rows: the ``k`` best documents, each with its best chunk's place and span and, in ``chunk``,
        that chunk's text quoted from the document.

        With a reranker, the ``k`` hits are scored again by it (``rerank_score``, on the hit's chunk over chunk
        rows) and ordered by that score, best first; hits whose text the input no longer has go last, without one."""
        check_query(query)
        vectors = self.embed([query])
        if self.sparse:
            hits = sparse_search(self.output_path, vectors, k, storage=self.storage)
        else:
            hits = search(self.output_path, vectors, k, exact=exact, storage=self.storage,
                          rescore_multiplier=rescore_multiplier)
        texts = fetch_texts(self.job, hits, self.storage)
        hits = hits.drop_columns([QUERY])
        if S.CHAR_START in hits.column_names:
            spans = zip(texts, hits[S.CHAR_START].to_pylist(), hits[S.CHAR_END].to_pylist())
            hits = hits.append_column(S.CHUNK, pa.array([t[a:b] if t is not None else None for t, a, b in spans], pa.string()))
        hits = hits.append_column(self.job.input.text_column, pa.array(texts, pa.string()))
        if self.rerank is None:
            return hits
        passages = hits[S.CHUNK].to_pylist() if S.CHUNK in hits.column_names else texts
        found = [i for i, text in enumerate(passages) if text is not None]
        scores = np.full(len(passages), np.nan, dtype=np.float32)
        scores[found] = self.rerank(query, [passages[i] for i in found])
        order = sorted(range(len(passages)), key=lambda i: (np.isnan(scores[i]), -np.nan_to_num(scores[i])))
        hits = hits.append_column(RERANK_SCORE, pa.array(scores, pa.float32(), mask=np.isnan(scores)))
        return hits.take(pa.array(order, pa.int64()))


def fetch_texts(job: JobConfig, ids: pa.Table, storage: StorageConfig | None = None) -> list[str | None]:
    """The input text of each row of ``ids`` (output id columns); None where the input no longer has it.

    Binary texts are decoded as UTF-8 with ``errors="replace"``. Parquet input with ``input.id_columns`` is
    read through a ``pyarrow.dataset`` filter on those columns; JSONL input, or generated ``<file>:<row>``
    ids, by one pass over the shards that hold the rows.
    """
    cfg = job.input
    shards = open_input(cfg, storage, [])
    key_columns = cfg.id_columns or [S.GENERATED_ID]
    keys = [tuple(row.values()) for row in ids.select(key_columns).to_pylist()]
    if cfg.id_columns and all(shards.format_of(f) == "parquet" for f in shards.files):
        dataset = ds.dataset(shards.files, filesystem=arrow_filesystem(shards.fs), format="parquet")
        matches = functools.reduce(operator.and_, (pc.field(c).isin(ids[c].combine_chunks()) for c in cfg.id_columns))
        rows = dataset.to_table(columns=[*cfg.id_columns, cfg.text_column], filter=matches).to_pylist()
        found = {tuple(row[c] for c in cfg.id_columns): row[cfg.text_column] for row in rows}
    else:
        found = _scan(shards, cfg, set(keys))
    texts = [found.get(key) for key in keys]
    return [text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text for text in texts]


def _scan(shards: Shards, cfg: InputConfig, keys: set[tuple]) -> dict[tuple, Any]:
    """Texts of the rows whose id (columns, or generated ``<file>:<row>``) is in ``keys``, by reading shards."""
    wanted_files = None if cfg.id_columns else {key[0].rsplit(":", 1)[0] for key in keys}
    found = {}
    for path in shards.files:
        relative = shards.relative(path)
        if wanted_files is not None and relative not in wanted_files:
            continue
        with open_shard(shards, path) as f:
            for row, record, _ in read_records(f, shards.format_of(path), [*cfg.id_columns, cfg.text_column]):
                if record is None:
                    continue
                key = tuple(record.get(c) for c in cfg.id_columns) if cfg.id_columns else (f"{relative}:{row}",)
                if key in keys:
                    found[key] = record.get(cfg.text_column)
    return found
