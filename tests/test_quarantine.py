"""Bad input is quarantined with a reason, never lost; schema problems fail before any actor starts.

Every other malformed input users have hit is a case of the bad-input corpus (tests/test_bad_inputs.py).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.bbc import load_articles
from pipeline import schema as S
from pipeline.config import load_config
from pipeline.run import plan, run_job
from pipeline.source import InputError


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
