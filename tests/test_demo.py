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
