"""Search over embedding outputs: the ANN index against exact search, the query embedder, snippets, the CLIs.

Recall bar: ``RECALL_BAR`` = 0.95 recall@10 of the index against exact search. The index measured 0.99+ on
real all-MiniLM-L6-v2 embeddings from 2k to 200k vectors (see ``pipeline.index``) and ~0.998 on the hard
synthetic data below, so 0.95 leaves room for graph-construction variance (faiss builds in parallel) while
still failing a broken index: too small a search beam (efSearch 16: ~0.8), a wrong metric, unnormalised
vectors or a misaligned row -> id mapping all fall below it.
Recall is tie-aware: BBC holds duplicate articles, whose vectors tie exactly, so a hit counts when its
exact score reaches the k-th best exact score.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import WORDS

from jobs import bbc
from jobs import index as index_job
from jobs import search as search_job
from pipeline import read_output
from pipeline import schema as S
from pipeline.commit import PROTOCOL
from pipeline.config import load_config
from pipeline.schema import INDEX_DIR
from pipeline.index import INFO_FILE, QUERY, SearchError, build_index, load_info, open_output, search
from pipeline.run import run_job
from pipeline.search import QueryEmbedder, Searcher, fetch_texts, job_config

K = 10
RECALL_BAR = 0.95
SPORTS_QUERY = "football match goal striker"
REPO = Path(__file__).resolve().parents[1]


def recall_at_k(hits: pa.Table, truth: np.ndarray, row_ids: list[str], id_column: str = "doc_id") -> float:
    """Share of each query's top ``K`` that ``hits`` found, against exact scores ``truth`` (queries x rows)."""
    position = {doc: i for i, doc in enumerate(row_ids)}
    kth = -np.sort(-truth, axis=1)[:, K - 1]
    found = sum(
        truth[q, position[doc]] >= kth[q] - 1e-5 for q, doc in zip(hits[QUERY].to_pylist(), hits[id_column].to_pylist())
    )
    return found / (len(truth) * K)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    return a @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


# ---- the index on synthetic outputs written directly (no model, no Ray) ------------------------------


def write_output(
    root: Path, vectors: np.ndarray, *, parts: int = 3, embedding_dtype: str = "float32", id_column: str = "doc_id"
) -> list[str]:
    """An embedding output as the pipeline commits it: id + stats + vectors in ``parts`` files with metadata,
    a manifest listing them, _SUCCESS."""
    metadata = {"task": "embedding", "model_path": "synthetic", "model_revision": "0", "normalize": False,
                "precision": embedding_dtype}
    field = pa.field(S.EMBEDDING, S.vector(vectors.shape[1], pa.from_numpy_dtype(np.dtype(embedding_dtype))))
    schema = S.output_schema([pa.field(id_column, pa.string())], [field], metadata)
    ids = [f"doc-{i:05d}" for i in range(len(vectors))]
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for p, rows in enumerate(np.array_split(np.arange(len(vectors)), parts)):
        flat = pa.array(vectors[rows].astype(embedding_dtype).reshape(-1))
        columns = [
            pa.array([ids[r] for r in rows]),
            pa.array(np.full(len(rows), 8, np.int32)),
            pa.array(np.zeros(len(rows), bool)),
            pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        ]
        pq.write_table(pa.Table.from_arrays(columns, schema=schema), root / f"part-{p:05d}-test.parquet")
        files[f"part-{p:05d}-test.parquet"] = len(rows)
    manifest = {"protocol": PROTOCOL, "run": "test", "files": files, "rejected_files": {}, "config": {}}
    (root / S.MANIFEST).write_text(json.dumps(manifest))
    (root / S.SUCCESS).write_text("")
    return ids


def clustered(rng: np.random.Generator, n: int, centers: np.ndarray) -> np.ndarray:
    """Points around random ``centers``, with random norms: cosine, not dot product, must rank them."""
    points = centers[rng.integers(len(centers), size=n)] + 2.5 * rng.standard_normal((n, centers.shape[1]))
    return (points * rng.uniform(0.2, 5.0, size=(n, 1))).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic() -> tuple[np.ndarray, np.ndarray]:
    """(4,000 base vectors, 200 queries) in 64 dims from 40 heavily overlapping clusters: hard for a graph
    index (recall@10 ~0.998 at the index's efSearch 128, ~0.98 at 64, ~0.8 at 16)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, 64))
    return clustered(rng, 4000, centers), clustered(rng, 200, centers)


@pytest.mark.parametrize("embedding_dtype", ["float32", "float16"])
def test_index_recall_against_exact(tmp_path, synthetic, embedding_dtype, record_property):
    vectors, queries = synthetic
    ids = write_output(tmp_path, vectors, embedding_dtype=embedding_dtype)
    stored = vectors.astype(embedding_dtype).astype(np.float32)
    truth = cosine(queries, stored)

    info = build_index(str(tmp_path))
    ann = search(str(tmp_path), queries, K)
    exact = search(str(tmp_path), queries, K, exact=True)

    recall = recall_at_k(ann, truth, ids)
    record_property("recall_at_10", recall)
    print(f"synthetic {embedding_dtype}: recall@10 {recall:.4f} ({info.rows} vectors, {info.params})")
    assert recall >= RECALL_BAR
    assert recall_at_k(exact, truth, ids) == 1.0
    assert ann.num_rows == exact.num_rows == len(queries) * K
    for hits in (ann, exact):  # scores are the cosine of the returned rows, best first per query
        rows = [int(doc[4:]) for doc in hits["doc_id"].to_pylist()]
        np.testing.assert_allclose(hits[S.SCORE].to_numpy(), truth[hits[QUERY].to_numpy(), rows], atol=1e-5)
        assert all(np.all(np.diff(hits[S.SCORE].to_numpy()[q * K : (q + 1) * K]) <= 0) for q in range(len(queries)))


def test_index_layout_and_info(tmp_path, synthetic):
    vectors, _ = synthetic
    ids = write_output(tmp_path, vectors[:500], parts=2)
    info = build_index(str(tmp_path))

    assert sorted(p.name for p in (tmp_path / INDEX_DIR).iterdir()) == ["ids.parquet", "index.faiss", "index.json"]
    recorded = json.loads((tmp_path / INDEX_DIR / INFO_FILE).read_text())
    assert {k: recorded[k] for k in ("kind", "metric", "dim", "rows")} == {
        "kind": "hnsw", "metric": "inner_product", "dim": 64, "rows": 500
    }
    assert recorded["parts"] == ["part-00000-test.parquet", "part-00001-test.parquet"]
    assert recorded["embedding"] == open_output(str(tmp_path)).metadata
    assert load_info(str(tmp_path)) == info
    assert pq.read_table(tmp_path / INDEX_DIR / "ids.parquet")["doc_id"].to_pylist() == ids  # index row order


def test_exact_fallback_without_index(tmp_path, synthetic):
    vectors, queries = synthetic
    ids = write_output(tmp_path, vectors[:1000])
    assert load_info(str(tmp_path)) is None

    hits = search(str(tmp_path), queries[:20], K)
    truth = cosine(queries[:20], vectors[:1000])
    expected = [ids[r] for r in np.argsort(-truth, axis=1)[:, :K].reshape(-1)]
    assert hits["doc_id"].to_pylist() == expected
    assert hits.column_names == [QUERY, S.SCORE, "doc_id"]
    assert search(str(tmp_path), queries[:1], 5000).num_rows == 1000  # k > rows: every row once


def test_stale_index_is_refused_until_rebuilt(tmp_path, synthetic):
    vectors, queries = synthetic
    write_output(tmp_path, vectors[:300], parts=1)
    build_index(str(tmp_path))
    write_output(tmp_path, vectors[:600], parts=2)  # a second part appears: the index lacks its rows

    with pytest.raises(SearchError, match="stale"):
        search(str(tmp_path), queries[:1], K)
    assert search(str(tmp_path), queries[:1], K, exact=True).num_rows == K
    assert build_index(str(tmp_path)).rows == 600
    assert search(str(tmp_path), queries[:1], K).num_rows == K


def test_unfinished_outputs_wrong_queries_and_clashing_ids_are_refused(tmp_path, synthetic):
    write_output(tmp_path, synthetic[0][:10], parts=1)
    manifest = (tmp_path / S.MANIFEST).read_bytes()
    (tmp_path / S.MANIFEST).unlink()
    with pytest.raises(SearchError, match="no finished run"):
        build_index(str(tmp_path))
    (tmp_path / S.MANIFEST).write_bytes(manifest)
    with pytest.raises(SearchError, match="8 dimensions, the embeddings 64"):
        search(str(tmp_path), np.ones((1, 8)), K)
    write_output(tmp_path / "clash", synthetic[0][:10], parts=1, id_column=S.SCORE)
    with pytest.raises(SearchError, match=r"\['score'\] .* clash"):
        search(str(tmp_path / "clash"), synthetic[1][:1], K, exact=True)


def test_k_below_one_is_refused_and_k_beyond_the_rows_returns_every_row_once(tmp_path, synthetic):
    vectors, queries = synthetic
    ids = write_output(tmp_path, vectors[:300], parts=2)
    with pytest.raises(SearchError, match="k must be at least 1, got 0"):
        search(str(tmp_path), queries[:1], 0)
    build_index(str(tmp_path))
    for k in (500, 10_000_000):  # 500: the index, its beam capped at the 300 rows; 10M: exact, part by part
        for exact in (False, True):
            hits = search(str(tmp_path), queries[:2], k, exact=exact)
            for q in (0, 1):
                found = hits.filter(pc.equal(hits[QUERY], q))["doc_id"].to_pylist()
                assert len(found) == len(set(found)) and set(found) <= set(ids) and len(found) >= 290, (k, exact)


def test_empty_queries_are_refused_before_anything_loads(tmp_path, tiny_output, capsys):
    for query in ("", "  \n", "\u200b\u2060"):
        assert search_job.main(["--embeddings", str(tmp_path / "nothing-here"), "--query", query]) == 2
        assert "error: the query is empty" in capsys.readouterr().err
    with pytest.raises(SearchError, match="the query is empty"):
        Searcher(str(tiny_output)).search(" ", k=3)


def test_clis_explain_unusable_outputs(tmp_path, capsys):
    assert index_job.main(["--embeddings", str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err
    assert search_job.main(["--embeddings", str(tmp_path), "--query", "anything"]) == 2
    assert f"no finished run (no {S.MANIFEST})" in capsys.readouterr().err


# ---- snippets: texts fetched from the job's input by id ------------------------------------------------


def test_fetch_texts_by_id_columns_from_parquet(tmp_path):
    texts = [b"caf\xc3\xa9 one", b"two", b"bad \xff bytes"]
    pq.write_table(pa.table({"doc_id": ["a", "b", "c"], "text": pa.array(texts, pa.binary())}), tmp_path / "in.parquet")
    job = load_config(raw={
        "input": {"path": str(tmp_path), "id_columns": ["doc_id"]},
        "model": {"path": "unused", "task": "embedding"},
        "output": {"path": str(tmp_path / "out")},
    })
    ids = pa.table({"doc_id": ["c", "a", "gone"]})
    assert fetch_texts(job, ids) == ["bad \ufffd bytes", "café one", None]


def test_fetch_texts_by_generated_ids_from_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "third line"}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "only"}\n')
    job = load_config(raw={
        "input": {"path": str(tmp_path)}, "model": {"path": "unused", "task": "embedding"}, "output": {"path": "out"}
    })
    ids = pa.table({S.GENERATED_ID: ["a.jsonl:3", "b.jsonl.gz:1", "a.jsonl:1"]})
    assert fetch_texts(job, ids) == ["third line", "only", "first"]


# ---- the real pipeline on a tiny random model: queries embedded exactly like the rows ------------------


@pytest.fixture(scope="module")
def tiny_output(tmp_path_factory, tiny_models, ray_session) -> Path:
    """80 rows through the pipeline with non-default settings the query embedder must pick up."""
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(3)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(2, 30))) for _ in range(80)]
    binary = pa.array([t.encode() for t in texts], pa.binary())
    pq.write_table(pa.table({"doc_id": [f"t{i}" for i in range(80)], "text": binary}), root / "in.parquet")
    run_job(load_config(raw={
        "input": {"path": str(root / "in.parquet"), "id_columns": ["doc_id"]},
        "model": {"path": str(tiny_models["embedding"]), "task": "embedding", "dtype": "float32", "max_length": 16},
        "output": {"path": str(root / "out"), "embedding": {"pooling": "cls", "normalize": False}},
    }))
    return root / "out"


def test_query_embedder_reproduces_the_pipeline_vectors(tiny_output):
    output = read_output(str(tiny_output))
    texts = fetch_texts(job_config(str(tiny_output)), output.select(["doc_id"]))
    embed = QueryEmbedder(str(tiny_output))

    assert (embed.chain.pooling, embed.chain.normalize, embed.max_length) == (("cls",), False, 16)
    stored = np.stack(output[S.EMBEDDING].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(embed(texts), stored, atol=1e-5)


def test_query_embedder_refuses_a_changed_checkpoint(tmp_path, tiny_output):
    metadata = open_output(str(tiny_output)).metadata
    changed = tmp_path / "out"
    changed.mkdir()
    for name in [S.SUCCESS, S.MANIFEST]:
        (changed / name).write_bytes((tiny_output / name).read_bytes())
    stale = {**metadata, "model_revision": "0" * 16}
    for part in tiny_output.glob("part-*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata({S.METADATA_KEY: json.dumps(stale)}), changed / part.name)
    with pytest.raises(SearchError, match="another vector space"):
        QueryEmbedder(str(changed))


def test_an_output_of_an_older_config_is_refused_with_one_line(tmp_path, tiny_output, capsys):
    """Outputs written before output.embedding.dtype became precision: a clear line, not a traceback."""
    old = tmp_path / "old"
    shutil.copytree(tiny_output, old)
    manifest = json.loads((old / S.MANIFEST).read_text())
    manifest["config"]["output"]["embedding"]["dtype"] = "float32"
    (old / S.MANIFEST).write_text(json.dumps(manifest))
    assert search_job.main(["--embeddings", str(old), "--query", "goal"]) == 2
    err = capsys.readouterr().err
    assert "cannot read (output.embedding" in err and "re-run its embedding job" in err and "Traceback" not in err


# ---- the real model on a stratified BBC subset --------------------------------------------------------


@pytest.fixture(scope="module")
def bbc_output(bbc_embeddings) -> Path:
    """configs/bbc_embed.yaml (all-MiniLM-L6-v2, bf16) over 150 BBC articles, 30 per label (conftest.bbc_embeddings,
    whose bfloat16 run test_real_model checks against float32), indexed."""
    _, output = bbc_embeddings.run("bfloat16")
    assert index_job.main(["--embeddings", str(output)]) == 0
    return output


def test_sports_query_finds_sports_articles(bbc_output):
    hits = Searcher(str(bbc_output)).search(SPORTS_QUERY, k=5)
    assert hits.column_names == [S.SCORE, "doc_id", "topic", "text"]
    topics = hits["topic"].to_pylist()
    assert topics[0] == "sports" and topics.count("sports") >= 4, hits.to_pylist()
    assert all(text for text in hits["text"].to_pylist())  # every hit's text was found in the input


def test_search_cli_prints_hits_with_snippets(bbc_output, capsys):
    articles = {a.doc_id: a for a in bbc.load_articles()}
    printed = {}
    for flags in ([], ["--exact"]):
        capsys.readouterr()
        assert search_job.main(["--embeddings", str(bbc_output), "--query", SPORTS_QUERY, "-k", "5", *flags]) == 0
        printed[bool(flags)] = capsys.readouterr().out.splitlines()
    print("\n".join(printed[False]))

    title, header, *lines = printed[False]
    assert "hnsw index (150 rows)" in title and "exact search" in printed[True][0]
    assert header.split() == ["#", "score", "doc_id", "topic", "text"] and len(lines) == 5
    top = lines[0].split()[2]
    assert top.startswith("sports/")
    assert " ".join(articles[top].decode().split())[:60] in lines[0]  # the snippet is the article's text
    assert [line.split()[2] for line in printed[True][2:]] == [line.split()[2] for line in lines]


def test_real_embeddings_ann_recall(bbc_output, record_property):
    output = read_output(str(bbc_output))
    vectors = np.stack(output[S.EMBEDDING].to_numpy(zero_copy_only=False))
    queries = np.concatenate([vectors, QueryEmbedder(str(bbc_output))([SPORTS_QUERY, "oil prices"])])
    truth = cosine(queries, vectors)

    hits = search(str(bbc_output), queries, K)
    recall = recall_at_k(hits, truth, output["doc_id"].to_pylist())
    record_property("recall_at_10", recall)
    print(f"BBC subset: recall@10 {recall:.4f} over {len(queries)} queries, {len(vectors)} vectors")
    assert recall >= RECALL_BAR
    assert recall_at_k(search(str(bbc_output), queries, K, exact=True), truth, output["doc_id"].to_pylist()) == 1.0
