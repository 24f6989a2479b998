"""Text search over an embedding output: embed queries as the job embedded its rows, search, and fetch
the texts of the hits from the job's input (output files hold ids and vectors, not texts).

Everything comes from what an output records about itself: its file-level Parquet metadata (checkpoint,
revision, ``max_length``, dtype, the embedding chain) and its manifest (``pipeline.commit``: the job config,
with the embedding task's settings, input path, text and id columns, tokenizer path, trust flags). Queries go
through the job's own embedding chain (``pipeline.embedding``) with the checkpoint's query prompt, as
sentence-transformers' ``encode_query``, in float32 whatever the stored precision. The index itself lives in
``pipeline.index``.

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
from pipeline.checkpoint import actor_tokenizer, load_model, resolve
from pipeline.commit import OutputError, committed_output
from pipeline.config import InputConfig, JobConfig, StorageConfig
from pipeline.index import QUERY, RESCORE_MULTIPLIER, IndexInfo, SearchError, load_info, open_output, search
from pipeline.source import Shards, discover, open_shard, read_records, visible
from pipeline.storage import arrow_filesystem, filesystem
from pipeline.tasks import build


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
        metadata = open_output(output_path, storage).metadata
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
        task = build(job, resolved)
        self.tokenizer = actor_tokenizer(resolved, lowercase=task.chain.lowercase)
        self.tokenizer.padding_side = "right"  # as the model actors pad (pooling reads the attention mask either way)
        self.max_length = resolved.max_length
        if prompt_name is not None:
            if prompt_name not in task.chain.prompts:
                raise SearchError(f"prompt name {prompt_name!r} is not one of {metadata['model_path']}'s prompts: "
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


class Searcher:
    """Text search over one embedding output: its query embedder, its index (if built) and its input."""

    def __init__(
        self,
        output_path: str,
        storage: StorageConfig | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
    ):
        self.output_path, self.storage = output_path, storage
        self.job = job_config(output_path, storage)
        self.embed = QueryEmbedder(output_path, storage, prompt=prompt, prompt_name=prompt_name)
        self.index_info: IndexInfo | None = load_info(output_path, storage)  # None: every search is exact

    def search(self, query: str, k: int = 10, exact: bool = False, rescore_multiplier: int = RESCORE_MULTIPLIER) -> pa.Table:
        """The ``k`` rows most similar to ``query``, best first: ``score``, the id columns and the input text."""
        check_query(query)
        hits = search(self.output_path, self.embed([query]), k, exact=exact, storage=self.storage,
                      rescore_multiplier=rescore_multiplier)
        texts = fetch_texts(self.job, hits, self.storage)
        return hits.drop_columns([QUERY]).append_column(self.job.input.text_column, pa.array(texts, pa.string()))


def fetch_texts(job: JobConfig, ids: pa.Table, storage: StorageConfig | None = None) -> list[str | None]:
    """The input text of each row of ``ids`` (output id columns); None where the input no longer has it.

    Binary texts are decoded as UTF-8 with ``errors="replace"``. Parquet input with ``input.id_columns`` is
    read through a ``pyarrow.dataset`` filter on those columns; JSONL input, or generated ``<file>:<row>``
    ids, by one pass over the shards that hold the rows.
    """
    cfg = job.input
    fs, path = filesystem(cfg.path, storage)
    shards = discover(cfg, fs, path, [])
    key_columns = cfg.id_columns or [S.GENERATED_ID]
    keys = [tuple(row.values()) for row in ids.select(key_columns).to_pylist()]
    if cfg.id_columns and all(shards.format_of(f) == "parquet" for f in shards.files):
        dataset = ds.dataset(shards.files, filesystem=arrow_filesystem(fs), format="parquet")
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
