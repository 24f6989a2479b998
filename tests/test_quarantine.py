"""Bad input is quarantined with a reason, never lost; schema problems fail before any actor starts.

Every other malformed input users have hit is a case of the bad-input corpus (tests/test_bad_inputs.py).
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.config import load_config
from pipeline.run import plan
from pipeline.source import InputError


def test_the_real_non_utf8_bbc_article_is_quarantined(bbc_embeddings):
    """The corpus's one article that is not UTF-8, the last row of the real-model runs' shard (conftest.bbc_embeddings):
    recorded in ``_rejected/`` with its reason and place, every other article scored."""
    bad_article = bbc_embeddings.bad_article
    with pytest.raises(UnicodeDecodeError):
        bad_article.raw.decode("utf-8")
    manifest, output = bbc_embeddings.run("float32")
    others = len(bbc_embeddings.articles)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (others + 1, others, 1)
    [rejected] = pq.read_table(output / S.REJECTED_DIR).to_pylist()
    assert rejected["doc_id"] == bad_article.doc_id and rejected["reason"] == "invalid_utf8"
    assert rejected["source_row"] == others and "can't decode byte" in rejected["detail"]


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
