"""The whole job against a real S3 API (moto server on 127.0.0.1): shards, checkpoint and output on S3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import forward
from s3_server import SLOW_DOWN, FaultProxy, S3Server
from transformers import AutoModelForSequenceClassification

from pipeline import schema as S
from pipeline.config import load_config
from pipeline.run import plan, run_job
from pipeline.storage import StorageError

TEXTS = ["the match was won by the club", "shares in the bank fell", "the band played a new album", "vote for the party"]


def upload(fs: s3fs.S3FileSystem, local: Path, remote: str) -> None:
    for file in local.iterdir():
        fs.put_file(str(file), f"{remote}/{file.name}")


def job(input_path: str, model: str, output: str, endpoint: str | None = None, **storage) -> dict:
    return {
        "input": {"path": input_path, "id_columns": ["doc_id"]},
        "model": {"path": model, "task": "sequence-classification"},
        "output": {"path": output},
        "storage": {"endpoint_url": endpoint, **storage},
    }


def test_s3_input_checkpoint_and_output_equal_the_forward_pass_of_the_local_checkpoint(
    ray_session, tiny_models, s3_proxy: FaultProxy, s3_bucket: str, tmp_path
):
    shards = tmp_path / "in"
    shards.mkdir()
    for k in range(3):
        rows = [f"{TEXTS[(i + k) % 4]} {' '.join(TEXTS[: i % 4])}" for i in range(40)]
        pq.write_table(pa.table({"doc_id": [f"{k}-{i}" for i in range(40)], "text": rows}), shards / f"{k}.parquet")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_proxy.endpoint_url})
    upload(fs, shards, f"{s3_bucket}/in")
    local_model = tiny_models["sequence-classification"]
    upload(fs, local_model, f"{s3_bucket}/models/topic")

    s3_proxy.inject(SLOW_DOWN, count=3)  # transient throttling, retried with backoff
    remote = run_job(
        load_config(
            raw=job(f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/models/topic", f"s3://{s3_bucket}/out", s3_proxy.endpoint_url)
        )
    )
    assert s3_proxy.pending_faults == 0
    assert remote["rows_in"] == remote["rows_out"] == 120
    local = plan(load_config(raw=job(str(shards), str(local_model), str(tmp_path / "out"))), 2, 0)
    assert remote["model"]["model_revision"] == local.metadata()["model_revision"]  # same bytes, content-hashed

    assert fs.exists(f"{s3_bucket}/out/{S.SUCCESS}") and fs.exists(f"{s3_bucket}/out/{S.MANIFEST}")
    got = pq.read_table(f"{s3_bucket}/out", filesystem=fs).to_pylist()
    texts = {r["doc_id"]: r["text"] for r in pq.read_table(shards).to_pylist()}
    assert sorted(r["doc_id"] for r in got) == sorted(texts)
    for row in got:
        out, _ = forward(local_model, AutoModelForSequenceClassification, texts[row["doc_id"]])
        np.testing.assert_allclose(row[S.LOGITS], out.logits[0].numpy(), atol=1e-4)
        assert row[S.LABEL] == local.model.id2label[int(out.logits[0].argmax())]


def test_missing_bucket_and_bad_credentials_fail_before_anything_starts(
    tiny_models, s3_server: S3Server, s3_bucket: str, tmp_path
):
    model = str(tiny_models["sequence-classification"])
    with pytest.raises(StorageError, match="no-such-bucket"):
        plan(load_config(raw=job("s3://no-such-bucket/in/", model, str(tmp_path / "o"), s3_server.endpoint_url)))
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/a.parquet", Body=b"x")
    with s3_server.iam_enforced(), pytest.raises(StorageError, match=s3_bucket):
        plan(
            load_config(
                raw=job(f"s3://{s3_bucket}/in/", model, str(tmp_path / "o"), s3_server.endpoint_url, key="AKIAWRONG", secret="nope")
            )
        )
