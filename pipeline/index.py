"""Nearest-neighbour search over an embedding output: an ANN index next to its Parquet, and an exact fallback.

``build_index`` reads the id columns and ``embedding`` of every part a finished embedding output's
manifest lists (``pipeline.commit``: a jobs.run output, or a nightly date or version directory),
L2-normalises the vectors (a no-op for ``output.embedding.normalize: true``; otherwise it turns inner
product into cosine; int8/uint8 vectors are first dequantised with the ranges recorded in the output's
metadata) and writes, in that output's directory::

    <output>/_index/index.faiss   the index; its row i is row i of ids.parquet
    <output>/_index/ids.parquet   the id columns, in index order (parts sorted by name, rows in file order)
    <output>/_index/index.json    IndexInfo: kind, metric, params, dim, rows, parts, embedding metadata; last

``search`` answers from the index, or by brute force over the parts when ``exact=True`` or there is no
index. Scores are cosine similarities. This is the only module that knows the index library.

Every precision of ``output.embedding.precision`` is searchable. float16 is read as float32; int8/uint8 are
dequantised to float32 bucket values for the HNSW index (the Parquet keeps the compact vectors; the index
does not: at this module's sizes, recall matters more than the 4x); binary/ubinary get a Hamming index, exact
(faiss ``IndexBinaryFlat``: 1 bit per dimension, a scan of 10M 1024-bit vectors is ~10 ms per query core),
and the float query is binarised, its ``k x rescore_multiplier`` nearest by Hamming distance are then
rescored with the float query, as sentence-transformers' ``semantic_search_faiss`` does. Binary scores are
cosines too: of the unit float query to each document's sign vector (rescored; the same order as
sentence-transformers' rescoring), or of the two sign vectors (``rescore_multiplier=0``: Hamming only).

Library: faiss-cpu, HNSW with 32 links per vector over float32 vectors (``HNSW32,Flat``), efConstruction
200, efSearch 128. Compared on 2 shared CPU cores with LanceDB 0.40, hnswlib 0.8 and usearch 2.26 on
all-MiniLM-L6-v2 vectors of 40k BBC sentences (200k: those plus perturbed copies); tie-aware recall@10::

                                       build 40k / 200k   recall@10 40k / 200k   1 query   bytes per vector
    faiss HNSW32,Flat (this)              23 s / 96 s        0.997 / 0.992       0.5 ms    1.8 KB, in RAM
    faiss HNSW32,SQ8                       5 s               0.988               0.2 ms    0.65 KB
    faiss IVF800,PQ48 nprobe 64 (+RFlat)  60-160 s           0.65 (0.92)         0.2 ms    0.1 KB (1.6 KB)
    hnswlib M16 efC200 ef128               9 s               0.993               0.3 ms    1.7 KB
    usearch M16 (defaults)                19 s               0.976               0.3 ms    1.7 KB
    LanceDB IVF_HNSW_SQ, refine 5         28 s / 150 s       0.988 / 0.974       5 ms      on disk, + a vector copy

At BBC size (2,224 articles) all reach 0.99+ in seconds. faiss gives the best recall per millisecond, and
its 66 MB wheel (numpy only) is already a dependency of the demo extra. LanceDB (180 MB plus pydantic and
more) is a storage engine: it keeps a second, Lance-format copy of vectors that already live in Parquet,
with versions to manage, and is ~10x slower per query from Python; its strength, indexes larger than RAM,
matters only far beyond 10M. hnswlib matches faiss but is HNSW-only and barely maintained; usearch built
slower and recalled less at defaults. At 10M vectors (extrapolated) this index takes ~18 GB of RAM, ~15 min
to build on 16 cores and ~1 ms per query; where that memory is too much, ``HNSW32,SQ8`` (~6.5 GB) or
``IVF65536,PQ48`` (~1 GB, lower recall) is a change of ``FACTORY``, recorded in ``index.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import embedding
from pipeline import schema as S
from pipeline.commit import OutputError, committed_output
from pipeline.config import StorageConfig
from pipeline.storage import join

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
INFO_FILE = "index.json"  # written last: an index without it is incomplete and ignored
QUERY = "query"  # hits column: position of the query vector the hit answers

KIND = "hnsw"
METRIC = "inner_product"
FACTORY = "HNSW32,Flat"  # faiss index_factory string
BUILD_PARAMS = {"efConstruction": 200}
SEARCH_PARAMS = {"efSearch": 128}  # search beam; raised to k when k is larger
MAX_INDEX_K = 1024  # more hits than this are found exactly: a beam that wide costs more than it saves
BINARY_KIND, BINARY_METRIC, BINARY_FACTORY = "binary-flat", "hamming", "BFlat"  # binary/ubinary outputs
RESCORE_MULTIPLIER = 4  # binary: Hamming candidates per hit rescored with the float query; 0: no rescoring
POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int32)


class SearchError(ValueError):
    """An output or index that cannot serve the request; the message says how to fix it."""


@dataclass(frozen=True)
class IndexInfo:
    """The contents of ``_index/index.json``: what the index holds and what it was built from."""

    kind: str
    metric: str
    params: dict[str, Any]
    dim: int
    rows: int
    parts: list[str]  # part files it was built from, in row order: a different listing means it is stale
    embedding: dict[str, Any]  # the output's file-level metadata (pipeline.schema.METADATA_KEY)
    build_s: float


@dataclass(frozen=True)
class EmbeddingOutput:
    """A finished embedding output: its parts in row order, id columns, vector size and metadata."""

    fs: fsspec.AbstractFileSystem
    root: str
    parts: list[str]  # file names relative to root
    id_columns: list[str]
    dim: int  # dimensions of the vectors (binary: bits, 8 per stored byte)
    width: int  # values per stored vector
    metadata: dict[str, Any]
    rows: int  # rows in the parts, as the manifest lists them

    @property
    def documents(self) -> list[str] | None:
        """Chunk rows (``input.long_text: chunk``): the id columns naming a chunk's document; else None."""
        if self.metadata.get("long_text") != "chunk":
            return None
        return [c for c in self.id_columns if c not in {f.name for f in S.chunk_fields(text=True)}]

    @property
    def precision(self) -> str:
        return self.metadata.get("precision", "float32")

    @property
    def binary(self) -> bool:
        return self.precision in embedding.PACKED

    def read(self) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """``(id columns, vectors)`` of each part, in order: L2-normalised float32 (int8/uint8 dequantised
        first), or for binary outputs the packed bits as ``ubinary`` bytes."""
        expected = json.dumps(self.metadata, sort_keys=True)
        for name in self.parts:
            with self.fs.open(join(self.root, name), "rb") as f:
                table = pq.read_table(f, columns=[*self.id_columns, S.EMBEDDING])
            if json.dumps(_metadata(table.schema), sort_keys=True) != expected:
                raise SearchError(f"{name} was written by another model or config than {self.parts[0]}")
            values = table[S.EMBEDDING].combine_chunks().flatten().to_numpy().reshape(-1, self.width)
            ids = table.select(self.id_columns).replace_schema_metadata()
            if self.binary:
                yield ids, embedding.unsigned_bits(values, self.precision)
            elif self.precision in embedding.CALIBRATED:
                yield ids, _normalized(embedding.dequantize(values, self.precision, self.metadata["quantization_ranges"]))
            else:
                yield ids, _normalized(values)


def _metadata(schema: pa.Schema) -> dict[str, Any]:
    return json.loads((schema.metadata or {}).get(S.METADATA_KEY, b"{}"))


def _normalized(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy of ``vectors`` (one per row) scaled to unit L2 norm; zero rows stay zero."""
    vectors = np.array(vectors, dtype=np.float32, ndmin=2)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=vectors, where=norms > 0)


def _faiss():
    """The faiss module: imported only to build or query an index, so exact search works without it."""
    try:
        import faiss
    except ImportError:
        raise SearchError("the index needs faiss: pip install faiss-cpu, or search with exact=True") from None
    return faiss


def _committed(output_path: str, storage: StorageConfig | None, task: str | None = None) -> tuple[Any, pa.Schema, dict[str, Any]]:
    """(the committed output at ``output_path``, its first part's schema, its metadata); ``SearchError`` when
    there is none, or when ``task`` is given and the output holds another task's."""
    try:
        committed = committed_output(output_path, storage)
    except OutputError as e:
        raise SearchError(f"{e}; run the embedding job first") from None
    if not committed.files:
        raise SearchError(f"{output_path} holds no part files: every input row was rejected")
    with committed.fs.open(join(committed.root, committed.files[0]), "rb") as f:
        schema = pq.read_schema(f)
    metadata = _metadata(schema)
    if task is not None and metadata.get("task") != task:
        raise SearchError(
            f"{output_path} holds {metadata.get('task', 'unknown')} output, not embeddings: search needs a job run "
            "with model.task: embedding or sparse-embedding"
        )
    return committed, schema, metadata


def output_metadata(output_path: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The file-level metadata of the finished output at ``output_path``, whichever task wrote it."""
    return _committed(output_path, storage)[2]


def open_output(output_path: str, storage: StorageConfig | None = None) -> EmbeddingOutput:
    """The finished embedding output at ``output_path``, as its manifest lists it; ``SearchError`` for anything else."""
    committed, schema, metadata = _committed(output_path, storage, "embedding")
    names = schema.names
    width = schema.field(S.EMBEDDING).type.list_size
    dim = metadata.get("dimensions", width)
    ids = names[: names.index(S.NUM_TOKENS)]
    if metadata.get("long_text") == "chunk":  # a hit names its chunk and the characters it quotes
        ids += [f.name for f in S.chunk_fields(text=False)]
    rows = sum(committed.manifest["files"].values())
    return EmbeddingOutput(committed.fs, committed.root, committed.files, ids, dim, width, metadata, rows)


@dataclass(frozen=True)
class SparseOutput:
    """A finished sparse-embedding output: its parts in row order, id columns and vocabulary size."""

    fs: fsspec.AbstractFileSystem
    root: str
    parts: list[str]
    id_columns: list[str]
    vocab_size: int
    metadata: dict[str, Any]

    def read(self) -> Iterator[tuple[pa.Table, Any]]:
        """``(id columns, vectors)`` of each part, in order: the vectors as a ``scipy.sparse`` CSR matrix
        (rows x vocabulary), so that ``queries @ vectors.T`` is the dot product of every pair."""
        from scipy import sparse

        for name in self.parts:
            with self.fs.open(join(self.root, name), "rb") as f:
                table = pq.read_table(f, columns=[*self.id_columns, S.SPARSE_EMBEDDING])
            column = table[S.SPARSE_EMBEDDING].combine_chunks()
            entries = column.flatten()
            indptr = column.offsets.to_numpy()
            indptr = indptr - indptr[0]
            matrix = sparse.csr_matrix(
                (entries.field("value").to_numpy(), entries.field("index").to_numpy(), indptr),
                shape=(table.num_rows, self.vocab_size),
            )
            yield table.select(self.id_columns).replace_schema_metadata(), matrix


def open_sparse_output(output_path: str, storage: StorageConfig | None = None) -> SparseOutput:
    """The finished sparse-embedding output at ``output_path``; ``SearchError`` for anything else."""
    committed, schema, metadata = _committed(output_path, storage, "sparse-embedding")
    names = schema.names
    return SparseOutput(committed.fs, committed.root, committed.files, names[: names.index(S.NUM_TOKENS)],
                        int(metadata["vocab_size"]), metadata)


def sparse_search(output_path: str, queries: np.ndarray, k: int = 10, storage: StorageConfig | None = None) -> pa.Table:
    """The ``k`` rows of a sparse-embedding output with the largest dot product with each query vector
    (dense float32, queries x vocabulary), best first: exact, one part at a time (a scan; no index).
    Columns as ``search``'s, ``score`` being the dot product (sentence-transformers' SparseEncoder similarity)."""
    output = _searchable(open_sparse_output, output_path, storage, k)
    return _exact_search(output, np.asarray(queries, dtype=np.float32), k)


def _searchable(opener, output_path: str, storage: StorageConfig | None, k: int):
    """``opener(output_path, storage)``, refused (``SearchError``) for ``k`` < 1 or id columns named like hit columns."""
    if k < 1:
        raise SearchError(f"k must be at least 1, got {k}")
    output = opener(output_path, storage)
    clashes = sorted({QUERY, S.SCORE} & set(output.id_columns))
    if clashes:
        raise SearchError(f"id column(s) {clashes} of {output_path} clash with the hits' own columns; rename them")
    return output


def build_index(output_path: str, storage: StorageConfig | None = None) -> IndexInfo:
    """Build ``<output>/_index/`` for the embedding output at ``output_path``, replacing any older one."""
    faiss = _faiss()
    started = time.perf_counter()
    output = open_output(output_path, storage)
    if output.binary:
        index, kind, metric, params = faiss.IndexBinaryFlat(output.width * 8), BINARY_KIND, BINARY_METRIC, {"factory": BINARY_FACTORY}
    else:
        index = faiss.index_factory(output.dim, FACTORY, faiss.METRIC_INNER_PRODUCT)
        _set_params(index, BUILD_PARAMS)
        kind, metric, params = KIND, METRIC, {"factory": FACTORY, **BUILD_PARAMS, **SEARCH_PARAMS}
    ids = []
    for part_ids, vectors in output.read():
        index.add(vectors)
        ids.append(part_ids)
    info = IndexInfo(
        kind=kind,
        metric=metric,
        params={"library": f"faiss {faiss.__version__}", **params},
        dim=output.dim,
        rows=index.ntotal,
        parts=output.parts,
        embedding=output.metadata,
        build_s=round(time.perf_counter() - started, 3),
    )
    fs, index_dir = output.fs, join(output.root, S.INDEX_DIR)
    if fs.exists(index_dir):
        fs.rm(index_dir, recursive=True)
    with fs.open(join(index_dir, INDEX_FILE), "wb") as f:
        (faiss.write_index_binary if output.binary else faiss.write_index)(index, faiss.PyCallbackIOWriter(f.write))
    with fs.open(join(index_dir, IDS_FILE), "wb") as f:
        pq.write_table(pa.concat_tables(ids), f, compression="zstd")
    with fs.open(join(index_dir, INFO_FILE), "w") as f:
        json.dump(asdict(info), f, indent=2, sort_keys=True)
    return info


def load_info(output_path: str, storage: StorageConfig | None = None) -> IndexInfo | None:
    """The ``index.json`` of the finished output's index; None when it has no (complete) index."""
    output = committed_output(output_path, storage)
    path = join(output.root, S.INDEX_DIR, INFO_FILE)
    if not output.fs.exists(path):
        return None
    with output.fs.open(path) as f:
        return IndexInfo(**json.load(f))


def search(
    output_path: str,
    queries: np.ndarray,
    k: int = 10,
    *,
    exact: bool = False,
    storage: StorageConfig | None = None,
    rescore_multiplier: int = RESCORE_MULTIPLIER,
) -> pa.Table:
    """The ``k`` rows most similar to each float query vector, best first.

    Columns: ``query`` (position in ``queries``), ``score`` (cosine similarity), then the output's id
    columns. Over chunk rows (``input.long_text: chunk``): the ``k`` documents with the most similar chunks,
    each with its best chunk (``chunk_index``, ``num_chunks``, ``char_start``, ``char_end``). Uses ``_index/`` unless ``exact`` is set, there is none, or ``k`` exceeds ``MAX_INDEX_K``
    (the beam would have to be as wide as ``k``); then every row is scored. ``k`` larger than the
    number of rows returns every row. Binary outputs: see the module docstring (``rescore_multiplier``).
    Raises ``SearchError`` when the index is stale (the output's parts changed since it was built)
    or ``k`` is below 1.
    """
    output = _searchable(open_output, output_path, storage, k)
    queries = _normalized(queries)
    if queries.shape[1] != output.dim:
        raise SearchError(f"query vectors have {queries.shape[1]} dimensions, the embeddings {output.dim}")
    if rescore_multiplier < 0:
        raise SearchError(f"rescore_multiplier must be 0 (no rescoring) or more, got {rescore_multiplier}")
    info = None if exact else load_info(output_path, storage)
    if output.documents is None:
        return _search(output, queries, k, info, rescore_multiplier)
    # Chunk rows: the best chunk of each document, deduplicated by document. Fetch more chunks until k
    # documents are found or every chunk was scored.
    fetch = k
    while True:
        fetch = min(fetch * 4, output.rows)
        hits = _best_per_document(_search(output, queries, fetch, info, rescore_multiplier), output.documents)
        query = hits[QUERY].to_numpy()
        if fetch >= output.rows or np.bincount(query, minlength=len(queries)).min() >= k:
            rank = np.arange(len(query)) - np.searchsorted(query, query)
            return hits.filter(pa.array(rank < k))


def _best_per_document(hits: pa.Table, documents: list[str]) -> pa.Table:
    """Of each query's hits (best first), the first of each document."""
    hits = hits.sort_by([(QUERY, "ascending"), (S.SCORE, "descending")])
    seen, keep = set(), []
    for row in hits.select([QUERY, *documents]).to_pylist():
        key = tuple(row.values())
        keep.append(key not in seen)
        seen.add(key)
    return hits.filter(pa.array(keep, pa.bool_()))


def _search(output: EmbeddingOutput, queries: np.ndarray, k: int, info: IndexInfo | None, rescore_multiplier: int) -> pa.Table:
    """The ``k`` rows most similar to each query (see ``search``)."""
    if output.binary:
        return _binary_search(output, queries, k, rescore_multiplier, None if info is None else _check_fresh(output, info))
    if info is None or min(k, info.rows) > MAX_INDEX_K:
        return _exact_search(output, queries, k)
    index, ids = _load_index(output, _check_fresh(output, info))
    k = min(k, index.ntotal)
    _set_params(index, {"efSearch": max(k, info.params["efSearch"])})  # a beam narrower than k loses recall
    scores, rows = index.search(queries, k)
    return _hits(ids, rows, scores)


def _check_fresh(output: EmbeddingOutput, info: IndexInfo) -> IndexInfo:
    if info.parts != output.parts:
        raise SearchError(
            f"the index of {output.root} is stale: the output's parts changed since it was built "
            f"({len(info.parts)} then, {len(output.parts)} now). Rebuild it (python -m jobs.index) or search exactly"
        )
    return info


def _load_index(output: EmbeddingOutput, info: IndexInfo) -> tuple[Any, pa.Table]:
    """The faiss index of ``output`` (described by ``info``) and its id columns in index order."""
    faiss = _faiss()
    index_dir = join(output.root, S.INDEX_DIR)
    with output.fs.open(join(index_dir, INDEX_FILE), "rb") as f:
        read = faiss.read_index_binary if info.kind == BINARY_KIND else faiss.read_index
        index = read(faiss.PyCallbackIOReader(f.read))
    with output.fs.open(join(index_dir, IDS_FILE), "rb") as f:
        return index, pq.read_table(f)


def _binary_search(output: EmbeddingOutput, queries: np.ndarray, k: int, multiplier: int, info: IndexInfo | None) -> pa.Table:
    """Binary outputs: each query's ``k x multiplier`` nearest rows by Hamming distance of the sign bits (its
    index, or every part), then the best ``k`` of those by the float query's cosine to their sign vectors."""
    query_bits = embedding.quantize(queries, "ubinary")
    wanted = k * max(1, multiplier)
    if info is not None:
        index, ids = _load_index(output, info)
        distances, rows = index.search(query_bits, min(wanted, index.ntotal))
        stored = _faiss().vector_to_array(index.xb).reshape(index.ntotal, -1)
        bits = stored[np.maximum(rows, 0)]
    else:
        parts = []
        for part_ids, stored in output.read():
            distances = POPCOUNT[query_bits[:, None, :] ^ stored[None, :, :]].sum(axis=2)
            top = np.argsort(distances, axis=1, kind="stable")[:, :wanted]
            parts.append((part_ids, np.take_along_axis(distances, top, axis=1), stored[top], top))
        ids = pa.concat_tables([p[0] for p in parts])
        offsets = np.cumsum([0] + [p[0].num_rows for p in parts[:-1]])
        distances = np.concatenate([p[1] for p in parts], axis=1)
        bits = np.concatenate([p[2] for p in parts], axis=1)
        rows = np.concatenate([p[3] + offset for p, offset in zip(parts, offsets)], axis=1)
        keep = np.argsort(distances, axis=1, kind="stable")[:, :wanted]
        distances, rows = np.take_along_axis(distances, keep, axis=1), np.take_along_axis(rows, keep, axis=1)
        bits = np.take_along_axis(bits, keep[:, :, None], axis=1)
    if multiplier:
        signs = np.unpackbits(bits, axis=-1)[..., : output.dim].astype(np.float32) * 2 - 1
        scores = np.einsum("qd,qcd->qc", queries, signs) / np.sqrt(output.dim)
    else:
        scores = 1 - 2 * distances / output.dim
    scores = np.where(rows >= 0, scores, -np.inf)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return _hits(ids, np.take_along_axis(rows, best, axis=1), np.take_along_axis(scores, best, axis=1))


def _set_params(index, params: dict[str, int]) -> None:
    space = _faiss().ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def _exact_search(output: EmbeddingOutput | SparseOutput, queries: np.ndarray, k: int) -> pa.Table:
    """Brute force, one part at a time: each part's top ``k`` per query, then the best ``k`` of those."""
    candidates = []
    for ids, vectors in output.read():
        scores = np.asarray(queries @ vectors.T)
        top = np.argpartition(-scores, min(k, len(ids)) - 1, axis=1)[:, :k]
        candidates.append(_hits(ids, top, np.take_along_axis(scores, top, axis=1)))
    hits = pa.concat_tables(candidates).sort_by([(QUERY, "ascending"), (S.SCORE, "descending")])
    query = hits[QUERY].to_numpy()
    rank = np.arange(len(query)) - np.searchsorted(query, query)  # position within the query's hits
    return hits.filter(pa.array(rank < k))


def _hits(ids: pa.Table, rows: np.ndarray, scores: np.ndarray) -> pa.Table:
    """Hits from ``(queries, k)`` row positions into ``ids`` and their scores; positions < 0 (none) dropped."""
    found = rows >= 0
    query = np.broadcast_to(np.arange(len(rows), dtype=np.int32)[:, None], rows.shape)[found]
    hits = ids.take(pa.array(rows[found]))
    hits = hits.add_column(0, QUERY, pa.array(query))
    return hits.add_column(1, S.SCORE, pa.array(scores[found], pa.float32()))
