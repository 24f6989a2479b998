"""Bad input is quarantined with a reason, never lost; schema problems fail before any actor starts."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.bbc import load_articles
from pipeline import schema as S
from pipeline.config import load_config
from pipeline.run import plan, run_job
from pipeline.source import InputError

SECRET = "s3cr3t-PLANTED-9f8e7d"


@pytest.fixture(scope="module")
def bad_article():
    """The one real BBC article that is not valid UTF-8."""
    [article] = [a for a in load_articles() if not _is_utf8(a.raw)]
    return article


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_every_bad_row_is_quarantined_with_its_reason(ray_session, tiny_models, bad_article, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # must never reach logs, manifests or metadata
    root = tmp_path / "in"
    root.mkdir()
    good = "the club won the match"
    lines = [
        json.dumps({"doc_id": "ok-1", "text": good}),
        json.dumps({"doc_id": "null", "text": None}),
        json.dumps({"doc_id": "missing"}),
        json.dumps({"doc_id": "empty", "text": "  \n "}),
        json.dumps({"doc_id": "number", "text": 12}),
        json.dumps({"doc_id": "list", "text": ["a"]}),
        '{"doc_id": "broken", "text": "no closing',
        '["not", "an", "object"]',
        b'{"doc_id": "latin1", "text": "caf\xe9"}'.decode("latin-1"),  # written as raw bytes below
        json.dumps({"doc_id": "huge", "text": "word " * 700_000}),  # 3.5 MB
        json.dumps({"doc_id": "long", "text": "the match " * 500}),  # truncated, not rejected
        json.dumps({"doc_id": "ok-1", "text": "a repeated id"}),
    ]
    data = b"\n".join(l.encode("latin-1") if l.startswith('{"doc_id": "latin1"') else l.encode() for l in lines)
    (root / "a.jsonl").write_bytes(data + b"\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"doc_id": "ok-2", "text": good}) + "\n" + json.dumps({"doc_id": "ok-1", "text": good}) + "\n")

    cfg = load_config(
        raw={
            "input": {"path": str(root), "id_columns": ["doc_id"]},
            "model": {"path": str(tiny_models["sequence-classification"]), "task": "sequence-classification"},
            "output": {"path": str(tmp_path / "out")},
            "storage": {"key": "AKIA-PLANTED", "secret": SECRET},
        }
    )
    manifest = run_job(cfg)
    assert manifest["rows_in"] == 14 == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["rejected_by_reason"] == {
        "null_text": 2,
        "empty_text": 1,
        "not_string": 2,
        "malformed_json": 2,
        "invalid_utf8": 1,
        "text_too_large": 1,
        "duplicate_id": 2,
    }
    assert manifest["rows_truncated"] == 1
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["doc_id"] for r in out) == ["long", "ok-1", "ok-2"]
    rejected = {(r["doc_id"], r["source_file"], r["source_row"]): r for r in pq.read_table(tmp_path / "out" / S.REJECTED_DIR).to_pylist()}
    assert rejected[("ok-1", "a.jsonl", 12)]["reason"] == "duplicate_id"
    assert rejected[("ok-1", "a.jsonl", 12)]["detail"] == "id already at a.jsonl:1"
    assert rejected[("ok-1", "b.jsonl.gz", 2)]["reason"] == "duplicate_id"
    assert rejected[(None, "a.jsonl", 7)]["reason"] == "malformed_json"
    assert rejected[(None, "a.jsonl", 9)]["reason"] == "invalid_utf8"  # undecodable line: no id to recover
    assert rejected[("huge", "a.jsonl", 10)]["reason"] == "text_too_large"

    written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    logs = capfd.readouterr()
    for secret in (SECRET, "AKIA-PLANTED"):
        assert secret.encode() not in written and secret not in logs.out + logs.err


def test_the_real_non_utf8_bbc_article_is_quarantined(ray_session, tiny_models, bad_article, tmp_path):
    others = [a for a in load_articles()[:20] if a.doc_id != bad_article.doc_id]
    rows = [*others, bad_article]
    path = tmp_path / "in" / "bbc.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"doc_id": [a.doc_id for a in rows], "text": pa.array([a.raw for a in rows], pa.binary())}), path)
    manifest = run_job(
        load_config(
            raw={
                "input": {"path": str(path), "id_columns": ["doc_id"]},
                "model": {"path": str(tiny_models["embedding"]), "task": "embedding"},
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (len(rows), len(others), 1)
    [rejected] = pq.read_table(tmp_path / "out" / S.REJECTED_DIR).to_pylist()
    assert rejected["doc_id"] == bad_article.doc_id and rejected["reason"] == "invalid_utf8"
    assert rejected["source_row"] == len(others) and "can't decode byte" in rejected["detail"]


def test_unreadable_shards_fail_before_any_actor_starts(tiny_models, tmp_path):
    model = {"path": str(tiny_models["embedding"]), "task": "embedding"}
    for name, content, message in [
        ("bad.parquet", b"PAR1 not really", "not a readable Parquet file"),
        ("bad.jsonl.gz", b"\x1f\x8b garbage", "not a readable JSONL file"),
    ]:
        root = tmp_path / name
        root.mkdir()
        (root / name).write_bytes(content)
        with pytest.raises(InputError, match=message):
            plan(load_config(raw={"input": {"path": str(root)}, "model": model, "output": {"path": str(tmp_path / "o")}}))
