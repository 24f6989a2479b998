"""Measures of what reduced-precision outputs keep of float32's, for the fidelity gate and the benchmark.

The gate (``pipeline.run.fidelity_gate``) scores a sample of the job's input in float32 and in the run's
dtype; each task compares the two with these (``Task.fidelity``). Numpy only: task modules import it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NEIGHBOURS = 10  # recall@10


def cosines(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Row-wise cosine between two (rows, dim) arrays; two zero rows agree (1.0), one zero row does not (0.0)."""
    a, b = np.asarray(vectors, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(np.all(a == b, axis=1), 1.0, 0.0)
    nonzero = norms > 0
    cos[nonzero] = np.sum(a * b, axis=1)[nonzero] / norms[nonzero]
    return cos


def neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows by cosine, (rows, k) indices."""
    unit = np.asarray(vectors, dtype=np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)  # a row is not its own neighbour
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def recall_at_k(vectors: np.ndarray, reference: np.ndarray, k: int = NEIGHBOURS) -> float | None:
    """Mean share of each row's ``k`` nearest rows of the sample (by ``reference``) that ``vectors`` also
    ranks in its ``k`` nearest: how much a search over these vectors would return what float32's would.
    None for a sample of fewer than two rows; ``k`` shrinks to the rows there are."""
    k = min(k, len(reference) - 1)
    if k < 1:
        return None
    found, expected = neighbours(vectors, k), neighbours(reference, k)
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found.tolist(), expected.tolist())]))


def embedding_fidelity(vectors: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """cosine_min/cosine_mean against ``reference`` and recall_at_10 of the sample against itself."""
    cos = cosines(vectors, reference)
    return {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "recall_at_10": recall_at_k(vectors, reference),
    }


def agreement(values: np.ndarray | list, reference: np.ndarray | list) -> float:
    """Share of positions where ``values`` equals ``reference`` (1.0 when both are empty)."""
    values, reference = np.asarray(values), np.asarray(reference)
    return float(np.mean(values == reference)) if len(reference) else 1.0


def order_agreement(scores: np.ndarray, reference: np.ndarray) -> float:
    """Share of the sample's row pairs that ``scores`` orders as ``reference`` does (ties in ``reference``
    left out): how much a ranking by these scores keeps of float32's. 1.0 for fewer than two rows."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    upper = np.triu_indices(len(b), k=1)
    ordered = np.sign(b[:, None] - b[None, :])[upper]
    same = np.sign(a[:, None] - a[None, :])[upper] == ordered
    counted = ordered != 0
    return float(same[counted].mean()) if counted.any() else 1.0
