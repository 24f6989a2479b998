"""The demo's plots say what they show: PCA axes with their explained variance, and which articles the
confusion matrix's accuracy covers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jobs.demo import plot_confusion, plot_projection
from pipeline import schema as S


def test_the_projection_labels_its_axes_with_the_variance_they_explain(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60, 8)) * np.array([4.0, 2.0, 1, 1, 1, 1, 1, 1])  # PC1 dominates, then PC2
    table = pa.table({
        "topic": [["sport", "tech", "politics"][i % 3] for i in range(60)],
        S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), 8),
    })
    [ax] = plot_projection(table, tmp_path / "projection.png").axes
    centred = vectors - vectors.mean(axis=0)
    share = np.linalg.svd(centred, compute_uv=False) ** 2 / np.sum(centred**2)
    assert ax.get_xlabel() == f"PC1 ({share[0]:.1%} of variance)" and ax.get_ylabel() == f"PC2 ({share[1]:.1%} of variance)"
    assert (tmp_path / "projection.png").stat().st_size > 0


def test_the_confusion_matrix_title_says_training_articles_are_included(tmp_path):
    evaluation = {"accuracy": 0.75, "labels": ["a", "b"], "confusion_matrix": [[2, 1], [0, 1]]}
    [ax, *_] = plot_confusion(evaluation, tmp_path / "confusion.png").axes
    assert ax.get_title() == "BBC topics: accuracy 0.750 on all 4 articles\n(the classifier's training articles included)"


def test_the_demo_embeds_chunks_and_its_search_quotes_the_best_one(ray_session, tmp_path, capsys):
    """configs/bbc_embed_chunks.yaml (the demo's embedding job) on four BBC articles, then the demo's index,
    search and quote: each article once, the quote being the hit's chunk, sliced from the article."""
    import pyarrow.parquet as pq

    from jobs import bbc
    from jobs.demo import EMBED_CONFIG, ROOT, index_and_search, quote
    from pipeline.config import load_config
    from pipeline.run import run_job

    long = [a for a in bbc.load_articles() if len(a.raw) > 3000]  # several chunks each
    articles = [a for label in ("business", "sports") for a in [a for a in long if a.label == label][:2]]
    texts = [a.decode() for a in articles]
    pq.write_table(pa.table({"doc_id": [a.doc_id for a in articles], "topic": [a.label for a in articles],
                             "text": texts}), tmp_path / "bbc.parquet")  # fmt: skip
    cfg = load_config(ROOT / EMBED_CONFIG, [f"input.path={tmp_path / 'bbc.parquet'}", f"output.path={tmp_path / 'out'}"])
    assert cfg.input.long_text == "chunk"
    embed = run_job(cfg)
    assert embed["documents_out"] == 4 and embed["chunks_out"] > 8 and embed["rows_truncated"] == 0

    sport = next(i for i, a in enumerate(articles) if a.label == "sports")
    index, searcher, hits = index_and_search(str(tmp_path / "out"), query=" ".join(texts[sport].split()[300:330]), k=4)
    assert index.rows == embed["chunks_out"] and hits.num_rows == 4 and len(set(hits["doc_id"].to_pylist())) == 4
    best = hits.to_pylist()[0]
    assert best["doc_id"] == articles[sport].doc_id and best[S.CHUNK_INDEX] > 0
    assert best[S.CHUNK] == texts[sport][best[S.CHAR_START] : best[S.CHAR_END]]
    lines = quote(best).splitlines()
    assert lines[0].startswith(f"best hit: {best['doc_id']} (sports), score ")
    assert f"chunk {best[S.CHUNK_INDEX] + 1} of {best[S.NUM_CHUNKS]}, characters {best[S.CHAR_START]}-" in lines[0]
    assert " ".join(" ".join(lines[1:]).strip(' "').split()) == " ".join(best[S.CHUNK].split())
