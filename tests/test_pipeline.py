"""End-to-end: the Ray pipeline's output equals a direct forward pass of the same model.

Real Ray (one shared session), real transformers, tiny random checkpoints.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import forward, record_output, sentence
from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

from pipeline import read_output
from pipeline import schema as S
from pipeline.config import load_config
from pipeline.embedding import pool
from pipeline.run import plan, run_job


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> Path:
    """5 Parquet shards, 120 rows each, with ids, a text pair and a bad row per shard."""
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("parquet")
    for shard in range(5):
        texts = [sentence(rng) for _ in range(120)]
        texts[7] = "   "  # rejected: empty_text
        pq.write_table(
            pa.table(
                {
                    "doc_id": [f"doc-{shard}-{i}" for i in range(120)],
                    "shard": pa.array([shard] * 120, pa.int32()),
                    "text": texts,
                    "pair": [sentence(rng) for _ in range(120)],
                    "unused": ["x" * 100] * 120,
                }
            ),
            root / f"part-{shard}.parquet",
        )
    return root


@pytest.fixture(scope="module")
def jsonl_shards(tmp_path_factory) -> Path:
    """A plain and a gzipped JSONL shard, with one malformed line and one non-string text."""
    rng = random.Random(2)
    root = tmp_path_factory.mktemp("jsonl")
    lines = [json.dumps({"text": sentence(rng)}) for _ in range(90)]
    lines[10] = '{"text": "unterminated'
    lines[20] = json.dumps({"text": 42})
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": sentence(rng)}) for _ in range(70)) + "\n")
    return root


def run(tmp_path: Path, **raw) -> tuple[dict, pa.Table]:
    raw.setdefault("output", {})["path"] = str(tmp_path / "out")
    cfg = load_config(raw=raw)
    manifest = run_job(cfg)
    record_output(cfg, tmp_path / "out")  # test_tasks checks the task's declared fields on it
    return manifest, read_output(str(tmp_path / "out"))


def read_rows(path: Path, column: str, pair: str | None = None) -> dict[str, tuple]:
    table = pq.read_table(path)
    return {
        row["doc_id"]: (row[column], row[pair] if pair else None)
        for row in table.to_pylist()
    }


def check_conservation(manifest: dict, table: pa.Table, rejected: int) -> None:
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["rows_out"] == table.num_rows
    assert manifest["rows_rejected"] == rejected


def test_sequence_classification_of_text_pairs_matches_forward_pass(ray_session, tiny_models, parquet_shards, tmp_path):
    """(text, pair) rows; single texts are compared with the forward pass in test_hub_id_with_pinned_revision_loads_offline."""
    model_dir = tiny_models["sequence-classification"]
    manifest, table = run(
        tmp_path,
        input={"path": str(parquet_shards), "id_columns": ["doc_id", "shard"], "text_pair_column": "pair"},
        model={"path": str(model_dir), "task": "sequence-classification"},
        inference={"batch_size": 64, "max_tokens_per_batch": 512},
        output={"cls_embedding": True},
    )
    check_conservation(manifest, table, rejected=5)
    assert table.schema.names == ["doc_id", "shard", S.NUM_TOKENS, S.TRUNCATED, S.LOGITS, S.LABEL, S.LABEL_ID, S.SCORE, S.CLS_EMBEDDING]
    assert table.schema.field("shard").type == pa.int32()  # id columns pass through unchanged
    assert table.schema.field(S.LOGITS).type == pa.list_(pa.float32(), 5)
    metadata = json.loads(pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata[S.METADATA_KEY])
    assert metadata["task"] == "sequence-classification" and len(metadata["config_hash"]) == 16
    assert (tmp_path / "out" / S.SUCCESS).exists() and manifest["padding_efficiency"] >= 0.85
    assert manifest["stages"]["tokenize"]["rows"] == 600 and manifest["stages"]["infer"]["rows_per_worker_s"] > 0

    source = read_rows(parquet_shards, "text", "pair")
    id2label = AutoModelForSequenceClassification.from_pretrained(model_dir).config.id2label
    truncated = 0
    for row in table.to_pylist():
        out, inputs = forward(model_dir, AutoModelForSequenceClassification, *source[row["doc_id"]])
        assert inputs["token_type_ids"].max() == 1
        logits = out.logits[0].numpy()
        probs = torch.softmax(out.logits[0], -1).numpy()
        np.testing.assert_allclose(row[S.LOGITS], logits, atol=1e-4)
        np.testing.assert_allclose(row[S.CLS_EMBEDDING], out.hidden_states[-1][0, 0].numpy(), atol=1e-4)
        assert row[S.LABEL_ID] == int(probs.argmax()) and row[S.LABEL] == id2label[row[S.LABEL_ID]]
        assert row[S.SCORE] == pytest.approx(float(probs.max()), abs=1e-4)
        assert row[S.NUM_TOKENS] == inputs["input_ids"].shape[1]
        assert row["shard"] == int(row["doc_id"].split("-")[1])
        truncated += row[S.TRUNCATED]
    assert truncated == manifest["rows_truncated"] > 0

    rejected = read_output(str(tmp_path / "out"), rejected=True).to_pylist()
    assert sorted(r["doc_id"] for r in rejected) == [f"doc-{s}-7" for s in range(5)]
    assert {r["reason"] for r in rejected} == {"empty_text"} and {r["source_row"] for r in rejected} == {7}


def test_embeddings_from_jsonl_match_forward_pass(ray_session, tiny_models, jsonl_shards, tmp_path):
    """Mean pooling, normalised (other poolings through the job: test_embedding_fidelity, and cls without
    normalize in test_search's tiny_output)."""
    model_dir = tiny_models["embedding"]
    manifest, table = run(
        tmp_path,
        input={"path": str(jsonl_shards)},
        model={"path": str(model_dir), "task": "embedding"},
        output={"embedding": {"pooling": "mean", "normalize": True}},
    )
    check_conservation(manifest, table, rejected=2)
    assert manifest["rejected_by_reason"] == {"malformed_json": 1, "not_string": 1}
    lines = {
        "a.jsonl": (jsonl_shards / "a.jsonl").read_text().splitlines(),
        "b.jsonl.gz": gzip.open(jsonl_shards / "b.jsonl.gz", "rt").read().splitlines(),
    }
    assert sorted(table[S.GENERATED_ID].to_pylist()) == sorted(
        f"{name}:{n}" for name, content in lines.items() for n in range(1, len(content) + 1)
        if f"{name}:{n}" not in ("a.jsonl:11", "a.jsonl:21")
    )
    for row in table.to_pylist():
        name, line = row[S.GENERATED_ID].rsplit(":", 1)
        text = json.loads(lines[name][int(line) - 1])["text"]
        out, inputs = forward(model_dir, AutoModel, text)
        expected = torch.nn.functional.normalize(pool(out.last_hidden_state, inputs["attention_mask"], "mean"), dim=-1)[0].numpy()
        np.testing.assert_allclose(row[S.EMBEDDING], expected, atol=1e-4)


def test_token_classification_matches_hf_pipeline(ray_session, tiny_models, parquet_shards, tmp_path):
    from transformers import pipeline

    model_dir = tiny_models["token-classification"]
    manifest, table = run(
        tmp_path,
        input={"path": str(parquet_shards / "part-1.parquet"), "id_columns": ["doc_id"]},
        model={"path": str(model_dir), "task": "token-classification"},
    )
    check_conservation(manifest, table, rejected=1)
    ner = pipeline("token-classification", model=str(model_dir), aggregation_strategy="simple")
    source = read_rows(parquet_shards, "text")
    model = AutoModelForTokenClassification.from_pretrained(model_dir)
    entities_seen = 0
    for row in table.to_pylist():
        text = source[row["doc_id"]][0]
        out, inputs = forward(model_dir, AutoModelForTokenClassification, text)
        expected_labels = [model.config.id2label[i] for i in out.logits[0, 1:-1].argmax(-1).tolist()]
        assert row[S.TOKEN_LABELS] == expected_labels
        if row[S.TRUNCATED]:
            continue  # the HF pipeline does not truncate; it would see more tokens
        expected = ner(text)
        assert [(e["label"], e["start"], e["end"]) for e in row[S.ENTITIES]] == [
            (e["entity_group"], e["start"], e["end"]) for e in expected
        ]
        for got, want in zip(row[S.ENTITIES], expected):
            assert got["score"] == pytest.approx(float(want["score"]), abs=1e-4)
            assert got["text"] == text[want["start"] : want["end"]]
        entities_seen += len(expected)
    assert entities_seen > 50


def test_hub_id_with_pinned_revision_loads_offline(ray_session, tiny_models, parquet_shards, tmp_path):
    """A checkpoint laid out in the standard Hub cache loads by id with HF_HUB_OFFLINE=1: pinned to its commit,
    the run scores single texts as the forward pass of the same weights does; ``main`` resolves to that commit."""
    import os

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--tiny-org--tiny-classifier"
    shutil.copytree(tiny_models["sequence-classification"], repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)

    def raw(revision: str) -> dict:
        return {
            "input": {"path": str(parquet_shards / "part-2.parquet"), "id_columns": ["doc_id"]},
            "model": {"path": "tiny-org/tiny-classifier", "revision": revision, "task": "sequence-classification"},
            "output": {"path": str(tmp_path / revision / "out")},
        }

    assert plan(load_config(raw=raw("main")), 2, 0).metadata()["model_revision"] == commit
    manifest, table = run(tmp_path / commit, **raw(commit))
    assert manifest["model"]["model_revision"] == commit
    check_conservation(manifest, table, rejected=1)
    source = read_rows(parquet_shards, "text")
    for row in table.to_pylist():
        out, _ = forward(tiny_models["sequence-classification"], AutoModelForSequenceClassification, source[row["doc_id"]][0])
        np.testing.assert_allclose(row[S.LOGITS], out.logits[0].numpy(), atol=1e-4)
        assert row[S.LABEL_ID] == int(out.logits[0].argmax())


def test_generated_ids_lead_when_only_label_or_group_columns_pass_through(ray_session, tiny_models, parquet_shards, tmp_path):
    """No input.id_columns, but a group column to pass through: kept and rejected rows still carry the
    generated ``<file>:<row>`` id, ahead of the group column."""
    manifest, table = run(
        tmp_path,
        input={"path": str(parquet_shards / "part-0.parquet"), "text_pair_column": "pair", "group_column": "shard"},
        model={"path": str(tiny_models["rerank"]), "task": "rerank"},
    )
    check_conservation(manifest, table, rejected=1)
    assert table.schema.names[:2] == [S.GENERATED_ID, "shard"]
    assert sorted(table[S.GENERATED_ID].to_pylist()) == sorted(f"part-0.parquet:{i}" for i in range(120) if i != 7)
    [rejected] = read_output(str(tmp_path / "out"), rejected=True).to_pylist()
    assert rejected[S.GENERATED_ID] == "part-0.parquet:7" and rejected["shard"] == 0
