"""``rerank``: the job's scores equal sentence-transformers' ``CrossEncoder.predict`` on every row, and its
ranks equal ``CrossEncoder.rank`` over each query's documents, with groups spread over shards, blocks and
model-actor calls (a nightly run); rows missing their document are quarantined; nightly reruns are no-ops."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import WORDS, copy_checkpoint, sentence

from pipeline import read_output
from pipeline import schema as S
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, load_config
from pipeline.run import plan, run_job

DATE = "2026-11-20"


def write_pairs(root: Path, shards: int = 2, rows: int = 24, seed: int = 3) -> dict[str, tuple]:
    """Shards of (doc_id, qid, query, document): every query's documents are spread over every shard."""
    rng = random.Random(seed)
    queries = {f"q{i}": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) for i in range(5)}
    source = {}
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        ids = [f"s{s}-{i}" for i in range(rows)]
        qids = [f"q{(i + s) % 5}" for i in range(rows)]
        documents = [sentence(rng) for _ in range(rows)]
        if s == 0:
            documents[4] = None  # quarantined: a pair without its document
            qids[7] = None  # scored, but in no group: no rank
        texts = [queries[q] if q else "stray query" for q in qids]
        pq.write_table(pa.table({"doc_id": ids, "qid": qids, "query": texts, "document": documents}), root / f"part{s}.parquet")
        source.update({i: (q, t, d) for i, q, t, d in zip(ids, qids, texts, documents)})
    return source


def config(inputs: Path, model: Path, out: Path, **input_keys) -> dict:
    return {
        "input": {"path": str(inputs), "id_columns": ["doc_id"], "text_column": "query", "text_pair_column": "document",
                  **input_keys},
        "model": {"path": str(model), "task": "rerank"},
        # Small blocks and calls: one query's rows are read, tokenized and scored in many places.
        "tokenize": {"batch_size": 8},
        "inference": {"batch_size": 8, "max_tokens_per_batch": 256},
        "output": {"path": str(out), "rows_per_file": 10},
    }


def cross_encoder(model: Path):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model), device="cpu")


def test_scores_and_ranks_equal_cross_encoder_in_a_nightly_run_that_reruns_as_a_no_op(ray_session, tiny_models, tmp_path, capsys):
    """Through jobs.nightly (a rerun of the date is a no-op); the rank of a plain run is in test_pipeline's
    generated-ids test and test_hf_datasets."""
    from jobs.nightly import main

    source = write_pairs(tmp_path / "events" / f"dt={DATE}")
    raw = config(tmp_path / "events" / "dt=${DATE}", tiny_models["rerank"], tmp_path / "scores", group_column="qid")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--config", str(tmp_path / "job.yaml"), "--date", DATE]) == 0
    capsys.readouterr()
    assert main(["--config", str(tmp_path / "job.yaml"), "--date", DATE]) == 0
    assert "already complete (2 shards" in capsys.readouterr().out
    day = str(tmp_path / "scores" / f"dt={DATE}")
    [version] = (tmp_path / "scores" / f"dt={DATE}").glob("version=*")
    manifest = json.loads((version / S.MANIFEST).read_text())
    assert len(manifest["runs"]) == 1
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rejected_by_reason"]) == (48, 47, {"null_text": 1})
    assert read_output(day, rejected=True)["doc_id"].to_pylist() == ["s0-4"]
    table = read_output(day)
    assert table.schema.names == ["doc_id", "qid", S.NUM_TOKENS, S.TRUNCATED, S.SCORE, S.RANK]
    assert table.schema.field(S.SCORE).type == pa.float32() and table.schema.field(S.RANK).type == pa.int32()
    rows = {row["doc_id"]: row for row in table.to_pylist()}

    model = cross_encoder(tiny_models["rerank"])
    ids = sorted(rows)
    expected = model.predict([source[i][1:] for i in ids])  # sigmoid of the logit: CrossEncoder's default
    for i, score in zip(ids, expected):
        assert rows[i][S.SCORE] == pytest.approx(float(score), abs=1e-4), i
    assert sum(rows[i][S.TRUNCATED] for i in ids) > 0  # long documents: truncated as CrossEncoder truncates

    groups = defaultdict(list)  # query -> its document ids in input order (shard, row), as rank() is given them
    for i in sorted(ids, key=lambda i: (int(i[1]), int(i.split("-")[1]))):
        groups[rows[i]["qid"]].append(i)
    assert rows["s0-7"][S.RANK] is None and None in groups
    del groups[None]
    assert len(groups) == 5
    for qid, members in groups.items():
        query = source[members[0]][1]
        ranking = model.rank(query, [source[i][2] for i in members])
        assert [rows[members[hit["corpus_id"]]][S.RANK] for hit in ranking] == list(range(1, len(members) + 1)), qid


def test_an_activation_saved_by_cross_encoder_is_applied(ray_session, tiny_models, tmp_path):
    """A CrossEncoder saved with its own activation (here none: Identity) scores with it, as predict does."""
    import torch
    from sentence_transformers import CrossEncoder

    saved = tmp_path / "ce-identity"
    CrossEncoder(str(tiny_models["rerank"]), activation_fn=torch.nn.Identity()).save(str(saved))
    source = write_pairs(tmp_path / "in", shards=1, rows=12)
    run_job(load_config(raw=config(tmp_path / "in", saved, tmp_path / "out")))
    table = read_output(str(tmp_path / "out"))
    assert S.RANK not in table.schema.names  # no group column, no rank
    rows = {row["doc_id"]: row[S.SCORE] for row in table.to_pylist()}
    expected = cross_encoder(saved).predict([source[i][1:] for i in rows])
    assert max(abs(expected)) < 0.25  # raw logits of this tiny model: its sigmoid would be about 0.5
    for (i, score), ref in zip(rows.items(), expected):
        assert score == pytest.approx(float(ref), abs=1e-4), i


def test_rerank_refuses_what_it_cannot_reproduce(tiny_models, tmp_path):
    base = config(tmp_path / "in", tiny_models["rerank"], tmp_path / "out")
    write_pairs(tmp_path / "in", shards=1, rows=8)
    no_pair = {**base, "input": {k: v for k, v in base["input"].items() if k != "text_pair_column"}}
    with pytest.raises(ConfigError, match="rerank needs input.text_pair_column: the column holding the document"):
        load_config(raw=no_pair)
    grouped = {**base, "model": {"path": str(tiny_models["sequence-classification"]), "task": "sequence-classification"},
               "input": {**base["input"], "group_column": "qid"}}
    with pytest.raises(ConfigError, match="input.group_column is for model.task: rerank"):
        load_config(raw=grouped)
    five_labels = {**base, "model": {"path": str(tiny_models["sequence-classification"]), "task": "rerank"}}
    with pytest.raises(ConfigError, match="rerank needs a cross-encoder with one output .* 5 labels"):
        plan(load_config(raw=five_labels))
    custom = copy_checkpoint(tiny_models["rerank"], tmp_path / "custom",
                             **{"config_sentence_transformers.json": '{"activation_fn": "my_package.Squash"}'})
    with pytest.raises(CheckpointError, match="activation 'my_package.Squash' is not a torch class"):
        plan(load_config(raw={**base, "model": {"path": str(custom), "task": "rerank"}}))


def test_search_reranks_the_dense_top_k_with_the_rerank_head(ray_session, tiny_models, tmp_path, capsys):
    from jobs.search import main
    from pipeline.search import RERANK_SCORE, Searcher

    rng = random.Random(11)
    texts = [sentence(rng) for _ in range(16)]
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(16)], "text": texts}), tmp_path / "docs.parquet")
    run_job(load_config(raw={"input": {"path": str(tmp_path / "docs.parquet"), "id_columns": ["doc_id"]},
                             "model": {"path": str(tiny_models["embedding"]), "task": "embedding"},
                             "output": {"path": str(tmp_path / "emb")}}))
    query = "the team won the cup"
    dense = Searcher(str(tmp_path / "emb")).search(query, k=6)
    hits = Searcher(str(tmp_path / "emb"), rerank_model=str(tiny_models["rerank"])).search(query, k=6)
    assert sorted(hits["doc_id"].to_pylist()) == sorted(dense["doc_id"].to_pylist())  # the dense top 6, reordered
    expected = cross_encoder(tiny_models["rerank"]).predict([(query, t) for t in hits["text"].to_pylist()])
    assert hits[RERANK_SCORE].to_numpy() == pytest.approx(expected, abs=1e-4)
    assert list(expected) == sorted(expected, reverse=True)
    assert main(["--embeddings", str(tmp_path / "emb"), "--query", query, "--rerank-model", str(tiny_models["rerank"])]) == 0
    assert RERANK_SCORE in capsys.readouterr().out
    assert main(["--embeddings", str(tmp_path / "emb"), "--query", query, "--rerank-model", str(tiny_models["embedding"])]) == 2
    assert "has no rerank head" in capsys.readouterr().err
