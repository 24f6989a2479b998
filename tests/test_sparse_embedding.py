"""``sparse-embedding``: the job's SPLADE vectors equal sentence-transformers' ``SparseEncoder.encode`` on every
row (the same non-zero indices, weights within 1e-4), for a bare MaskedLM checkpoint and for a SparseEncoder
saved with its own pooling and ``max_active_dims``; bad rows are quarantined; nightly reruns are no-ops."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import build_vocab, copy_checkpoint, record_output, sentence

from pipeline import read_output
from pipeline import schema as S
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, load_config
from pipeline.run import plan, run_job
from pipeline.search import Searcher
from pipeline.tasks.sparse_embedding import SPARSE_TYPE

DATE = "2026-11-20"


def write_texts(path: Path, rows: int = 30, seed: int = 8) -> dict[str, str]:
    rng = random.Random(seed)
    ids = [f"d{i}" for i in range(rows)]
    texts = [sentence(rng) for _ in range(rows)]
    texts[2] = None  # quarantined
    texts[5] = " \u200b "  # nothing visible: quarantined
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"doc_id": ids, "text": texts}), path)
    return dict(zip(ids, texts))


def config(inputs: Path, model: Path, out: Path, **output) -> dict:
    return {
        "input": {"path": str(inputs), "id_columns": ["doc_id"]},
        "model": {"path": str(model), "task": "sparse-embedding"},
        "inference": {"batch_size": 8, "max_tokens_per_batch": 256},
        "output": {"path": str(out), **output},
    }


def assert_equal_to_reference(table: pa.Table, source: dict[str, str], model: Path, **encode) -> int:
    """Every row's (index, value) pairs equal ``SparseEncoder(model).encode``'s non-zeros; returns the pairs compared."""
    from sentence_transformers import SparseEncoder

    ids = table["doc_id"].to_pylist()
    reference = SparseEncoder(str(model), device="cpu").encode([source[i] for i in ids], convert_to_sparse_tensor=False, **encode)
    reference = reference.numpy() if hasattr(reference, "numpy") else np.asarray(reference)
    compared = 0
    for i, vector, expected in zip(ids, table[S.SPARSE_EMBEDDING].to_pylist(), reference):
        indices = [entry["index"] for entry in vector]
        assert indices == np.flatnonzero(expected).tolist(), i
        np.testing.assert_allclose([entry["value"] for entry in vector], expected[indices], atol=1e-4, err_msg=i)
        compared += len(indices)
    return compared


def test_a_masked_lm_checkpoint_encodes_as_sparse_encoder(ray_session, tiny_models, tmp_path):
    source = write_texts(tmp_path / "in.parquet")
    cfg = load_config(raw=config(tmp_path / "in.parquet", tiny_models["sparse-embedding"], tmp_path / "out"))
    manifest = run_job(cfg)
    record_output(cfg, tmp_path / "out")  # test_tasks checks the declared fields on it
    assert (manifest["rows_in"], manifest["rows_out"]) == (30, 28)
    assert manifest["rejected_by_reason"] == {"null_text": 1, "empty_text": 1}
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert schema.field(S.SPARSE_EMBEDDING).type == SPARSE_TYPE
    metadata = json.loads(schema.metadata[S.METADATA_KEY])
    assert metadata["vocab_size"] == len(build_vocab())
    assert (metadata["sparse_pooling"], metadata["sparse_activation"], metadata["sparse_top_k"]) == ("max", "relu", None)
    table = read_output(str(tmp_path / "out"))
    assert sum(table[S.TRUNCATED].to_pylist()) > 0
    assert assert_equal_to_reference(table, source, tiny_models["sparse-embedding"]) > 28 * 10

    # Search: the query through the job's SPLADE head, hits by dot product, as SparseEncoder would rank them.
    from sentence_transformers import SparseEncoder

    from jobs.search import main

    encoder = SparseEncoder(str(tiny_models["sparse-embedding"]), device="cpu")
    query = "the team won the cup match"
    ids = table["doc_id"].to_pylist()
    documents = encoder.encode([source[i] for i in ids], convert_to_tensor=True).to_dense()
    expected = (documents @ encoder.encode_query([query], convert_to_tensor=True).to_dense().T).squeeze(1).numpy()
    hits = Searcher(str(tmp_path / "out")).search(query, k=5)
    order = np.argsort(-expected, kind="stable")[:5]
    assert hits["doc_id"].to_pylist() == [ids[i] for i in order]
    np.testing.assert_allclose(hits[S.SCORE].to_numpy(), expected[order], rtol=1e-4, atol=1e-4)
    assert main(["--embeddings", str(tmp_path / "out"), "--query", query, "-k", "3"]) == 0
    assert main(["--embeddings", str(tmp_path / "out"), "--query", query, "--prompt", "q: "]) == 2


def test_a_saved_sparse_encoder_with_its_pooling_and_top_k_runs_nightly(ray_session, tiny_models, tmp_path):
    """sum pooling, log1p_relu and max_active_dims=7 from the checkpoint, through jobs.nightly twice (the second a no-op)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    from jobs.nightly import main

    encoder = SparseEncoder(str(tiny_models["sparse-embedding"]), device="cpu")
    saved = tmp_path / "splade"
    SparseEncoder(modules=[encoder[0], SpladePooling("sum", "log1p_relu")], max_active_dims=7).save(str(saved))
    source = write_texts(tmp_path / "events" / f"dt={DATE}" / "a.parquet", rows=20)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config(tmp_path / "events" / "dt=${DATE}", saved, tmp_path / "scores")))
    assert main(["--config", str(tmp_path / "job.yaml"), "--date", DATE]) == 0
    assert main(["--config", str(tmp_path / "job.yaml"), "--date", DATE]) == 0
    table = read_output(str(tmp_path / "scores" / f"dt={DATE}"))
    assert table.num_rows == 18 and {len(v) for v in table[S.SPARSE_EMBEDDING].to_pylist()} == {7}
    assert assert_equal_to_reference(table, source, saved) == 18 * 7

    # output.sparse_top_k overrides the checkpoint's max_active_dims
    run_job(load_config(raw=config(tmp_path / "events" / f"dt={DATE}", saved, tmp_path / "out", sparse_top_k=3)))
    table = read_output(str(tmp_path / "out"))
    assert assert_equal_to_reference(table, source, saved, max_active_dims=3) == 18 * 3


def test_sparse_embedding_refuses_what_it_cannot_reproduce(tiny_models, tmp_path):
    write_texts(tmp_path / "in.parquet", rows=8)
    base = config(tmp_path / "in.parquet", tiny_models["sparse-embedding"], tmp_path / "out")
    with pytest.raises(ConfigError, match="sparse-embedding takes a single text; remove input.text_pair_column"):
        load_config(raw={**base, "input": {**base["input"], "text_pair_column": "text"}})
    with pytest.raises(CheckpointError, match="has no sparse-embedding head"):
        plan(load_config(raw={**base, "model": {"path": str(tiny_models["embedding"]), "task": "sparse-embedding"}}))
    st_config = '{"model_type": "SparseEncoder", "prompts": {"document": "doc: "}}'
    prompted = copy_checkpoint(tiny_models["sparse-embedding"], tmp_path / "prompted",
                               **{"config_sentence_transformers.json": st_config})
    with pytest.raises(CheckpointError, match="sets prompts"):
        plan(load_config(raw={**base, "model": {"path": str(prompted), "task": "sparse-embedding"}}))
