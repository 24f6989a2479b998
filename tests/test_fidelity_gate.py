"""The fidelity gate: a run that does not compute in float32 measures, on a sample of its own input,
what it keeps of float32's outputs, records it in the manifest, and fails before writing when a
figure misses ``model.min_fidelity``. Real Ray (the shared session), tiny random checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import NER_LABELS, TOPICS, text_shards
from drivers import write_config

from jobs.run import main
from pipeline import fidelity
from pipeline import schema as S
from pipeline.config import ConfigError, load_config
from pipeline.nightly import check_dtype
from pipeline.run import fidelity_gate, plan, sample_rows
from pipeline.sequences import LongText
from pipeline.tasks.question_answering import QuestionAnswering
from pipeline.tasks.rerank import Rerank
from pipeline.tasks.sequence_classification import SequenceClassification
from pipeline.tasks.sparse_embedding import SparseChain, SparseEmbedding
from pipeline.tasks.token_classification import TokenClassification
from pipeline.tasks.zero_shot_classification import ZeroShotClassification


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two Parquet shards of 24 rows; row 3 of each is rejected (empty text)."""
    return text_shards(tmp_path_factory.mktemp("gate-input"), shards=2, rows=24, empty_row=3, seed=7)


def config(shards: Path, out: Path, model: Path, task: str, **model_keys) -> dict:
    return {
        "input": {"path": str(shards), "id_columns": ["doc_id"]},
        "model": {"path": str(model), "task": task, **model_keys},
        "output": {"path": str(out)},
    }


TRUNCATE = LongText("truncate", 32, 0, False)


# ---- measures -------------------------------------------------------------------------------------


def test_recall_at_10_counts_shared_neighbours_excluding_the_row_itself():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(40, 8))
    assert fidelity.recall_at_k(reference, reference) == 1.0
    # Brute force: per row, the 10 most similar other rows, by cosine.
    noisy = reference + rng.normal(scale=0.5, size=reference.shape)

    def top(v: np.ndarray, i: int) -> set[int]:
        u = v / np.linalg.norm(v, axis=1, keepdims=True)
        sims = [(float(u[i] @ u[j]), j) for j in range(len(v)) if j != i]
        return {j for _, j in sorted(sims, reverse=True)[:10]}

    expected = np.mean([len(top(noisy, i) & top(reference, i)) / 10 for i in range(40)])
    assert fidelity.recall_at_k(noisy, reference) == pytest.approx(expected)
    assert 0 < expected < 1
    assert fidelity.recall_at_k(reference[:1], reference[:1]) is None  # one row has no neighbours
    assert fidelity.recall_at_k(reference[:4], reference[:4]) == 1.0  # k shrinks to the 3 others


def test_embedding_figures():
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    vectors = np.array([[1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    figures = fidelity.embedding_fidelity(vectors, reference)
    assert figures["cosine_min"] == pytest.approx(np.sqrt(0.5), abs=1e-6)
    assert figures["cosine_mean"] == pytest.approx((np.sqrt(0.5) + 2) / 3, abs=1e-6)
    assert fidelity.cosines(np.array([[0.0, 1.0]]), np.array([[0.0, 0.0]])).tolist() == [0.0]


def test_classification_figures():
    task = SequenceClassification(dict(enumerate(TOPICS)), False, False, 32, TRUNCATE)
    reference = {S.LABEL_ID: np.array([0, 1, 2, 3]), S.LOGITS: np.zeros((4, 5), np.float32)}
    logits = np.zeros((4, 5), np.float32)
    logits[2, 4] = 0.25
    outputs = {S.LABEL_ID: np.array([0, 1, 4, 3]), S.LOGITS: logits}
    assert task.fidelity(outputs, reference) == {"label_agreement": 0.75, "max_logit_diff": 0.25}


def test_token_classification_figures():
    task = TokenClassification(dict(enumerate(NER_LABELS)), TRUNCATE)
    ent = {"text": "x", "label": "PER", "start": 0, "end": 1, "score": 0.9}
    reference = {S.TOKEN_LABELS: [["B-PER", "O"], ["O", "O"]], S.ENTITIES: [[ent], []]}
    outputs = {S.TOKEN_LABELS: [["B-PER", "O"], ["O", "B-LOC"]], S.ENTITIES: [[ent], [{**ent, "label": "LOC"}]]}
    assert task.fidelity(outputs, reference) == {"label_agreement": 0.75, "entity_f1": pytest.approx(2 / 3)}


def test_rerank_figures_are_pairwise_order_agreement():
    task = Rerank("torch.nn.Sigmoid", None)
    reference = {S.SCORE: np.array([0.9, 0.5, 0.1, 0.5])}
    outputs = {S.SCORE: np.array([0.8, 0.2, 0.3, 0.6])}  # of the 5 pairs float32 does not tie, (1, 2) swapped
    figures = task.fidelity(outputs, reference)
    assert figures["order_agreement"] == pytest.approx(4 / 5)
    assert figures["max_score_diff"] == pytest.approx(0.3)
    assert task.fidelity(reference, reference)["order_agreement"] == 1.0
    assert fidelity.order_agreement(np.array([1.0]), np.array([1.0])) == 1.0


def test_sparse_figures_compare_the_vectors_made_dense():
    task = SparseEmbedding(SparseChain("max", "relu", None), vocab_size=6, top_k=None)
    reference = {S.SPARSE_EMBEDDING: [[{"index": 1, "value": 1.0}], [{"index": 2, "value": 1.0}, {"index": 5, "value": 1.0}]]}
    outputs = {S.SPARSE_EMBEDDING: [[{"index": 1, "value": 2.0}], [{"index": 2, "value": 1.0}]]}
    figures = task.fidelity(outputs, reference)
    assert figures["cosine_min"] == pytest.approx(np.sqrt(0.5)) and figures["cosine_mean"] == pytest.approx((1 + np.sqrt(0.5)) / 2)


def test_zero_shot_and_question_answering_figures():
    task = ZeroShotClassification(("a", "b"), ("It is a.", "It is b."), False, 2, 0)
    reference = {S.LABELS: [["a", "b"], ["b", "a"]], S.SCORES: [[0.6, 0.4], [0.9, 0.1]]}
    outputs = {S.LABELS: [["b", "a"], ["b", "a"]], S.SCORES: [[0.55, 0.45], [0.9, 0.1]]}
    figures = task.fidelity(outputs, reference)
    assert figures["label_agreement"] == 0.5 and figures["max_score_diff"] == pytest.approx(0.15)  # a: 0.6 -> 0.45
    qa = QuestionAnswering(48, 16, 15, 1, False, 101)
    reference = {S.ANSWER_START: [3, 10, 0], S.ANSWER_END: [7, 12, 4]}
    outputs = {S.ANSWER_START: [3, 10, 0], S.ANSWER_END: [7, 13, 4]}
    assert qa.fidelity(outputs, reference) == {"label_agreement": pytest.approx(2 / 3)}


# ---- the gate in runs ------------------------------------------------------------------------------


def test_a_cross_encoder_whose_order_bfloat16_loses_is_refused_before_it_writes(ray_session, tiny_models, shards, tmp_path, capsys):
    """The tiny random cross-encoder scores every pair within 4e-5 of 0.5042: bfloat16 rounds most of them
    to one value, so its ranking of the sample is not float32's, and the gate says so, in one line, before
    the run writes anything."""
    out = tmp_path / "out"
    raw = config(shards, out, tiny_models["rerank"], "rerank", dtype="bfloat16", fidelity_rows=30)
    raw["input"]["text_pair_column"] = "text"
    assert main(["--config", write_config(tmp_path / "job.yaml", raw)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"error: fidelity gate: torch bfloat16 reached order_agreement=0\.\d+ against torch float32 on 30 rows", line), line
    assert "model.min_fidelity.order_agreement=0.99" in line and "--set model.min_fidelity.order_agreement=<lower>" in line
    written = [p.name for p in out.rglob("*") if p.is_file()]
    assert not [n for n in written if n.endswith(".parquet") or n in (S.MANIFEST, S.SUCCESS)], written


def test_float32_and_a_disabled_gate_skip_it_and_say_so(tiny_models, shards, tmp_path):
    def gate(**model_keys) -> dict:
        job = plan(load_config(raw=config(shards, tmp_path / "out", tiny_models["embedding"], "embedding", **model_keys)), 2, 0)
        return fidelity_gate(job, job.shards, progress=None).fidelity  # no sample is scored: no Ray needed

    skipped = {"backend": "torch", "dtype": "float32", "reference": "torch float32", "skipped": "torch float32 is the reference"}
    assert gate() == skipped
    assert gate(dtype="bfloat16", fidelity_rows=0)["skipped"] == "model.fidelity_rows is 0"


def test_the_sample_is_the_first_valid_rows_with_their_pairs(tiny_models, shards, tmp_path):
    raw = config(shards, tmp_path / "out", tiny_models["sequence-classification"], "sequence-classification")
    raw["input"]["text_pair_column"] = "doc_id"
    job = plan(load_config(raw=raw), 2, 0)
    sample = sample_rows(job.shards, job.cfg.input, 10)
    first = pq.read_table(shards / "0.parquet").to_pylist()
    second = pq.read_table(shards / "1.parquet").to_pylist()
    expected = [r for r in first[:6] if r["text"]] + [r for r in second[:6] if r["text"]]  # 5 per shard; row 3 is empty
    assert sample[S.TEXT].to_pylist() == [r["text"] for r in expected]
    assert sample[S.TEXT_PAIR].to_pylist() == [r["doc_id"] for r in expected]


def test_thresholds_do_not_change_what_a_run_resumes_but_the_dtype_does(tiny_models, shards, tmp_path):
    """A resumed run keeps a killed run's parts only if it computes in the same dtype: ``auto`` is float16
    on a GPU cluster and float32 on a CPU one. A nightly version refuses runs in another dtype."""
    raw = config(shards, tmp_path / "out", tiny_models["embedding"], "embedding")
    cpu, gpu = plan(load_config(raw=raw), 2, 0), plan(load_config(raw=raw), 4, 1)
    assert (cpu.dtype, gpu.dtype) == ("float32", "float16")
    assert cpu.identity()["dtype"] == "float32" and gpu.identity()["dtype"] == "float16"
    lowered = config(shards, tmp_path / "out", tiny_models["embedding"], "embedding", min_fidelity={"cosine_min": 0.5}, fidelity_rows=8)
    assert plan(load_config(raw=lowered), 2, 0).identity() == cpu.identity()
    check_dtype(cpu, cpu.metadata(), "2026-01-01", "version=x")
    with pytest.raises(ConfigError, match="was scored in float16, but this run would compute in float32"):
        check_dtype(cpu, gpu.metadata(), "2026-01-01", "version=x")


def test_float16_on_a_cluster_without_gpus_is_warned_about(tiny_models, shards, tmp_path):
    """float16 has no fast CPU kernels: the plan (``--dry-run``) and the run say so; on a GPU, or in bfloat16, nothing."""
    raw = lambda dtype: config(shards, tmp_path / "out", tiny_models["embedding"], "embedding", dtype=dtype)  # noqa: E731
    cpu = plan(load_config(raw=raw("float16")), 2, 0)
    assert cpu.dtype_warning.startswith("float16 has no fast CPU kernels") and "use bfloat16" in cpu.dtype_warning
    assert f"WARNING {cpu.dtype_warning}" in cpu.describe()
    assert plan(load_config(raw=raw("float16")), 4, 1).dtype_warning is None
    assert plan(load_config(raw=raw("auto")), 4, 1).dtype_warning is None  # auto is float16 on a GPU cluster
    assert plan(load_config(raw=raw("bfloat16")), 2, 0).dtype_warning is None
    assert "WARNING" not in plan(load_config(raw=raw("bfloat16")), 2, 0).describe()
