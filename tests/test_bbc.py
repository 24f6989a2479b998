"""The BBC corpus helpers: the corpus itself, the fixed split, Parquet shards and short sentences."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest

from jobs import bbc

COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def articles() -> list[bbc.Article]:
    return bbc.load_articles()


def test_corpus_has_2225_articles_in_5_labels(articles):
    assert len(articles) == 2225
    assert Counter(a.label for a in articles) == COUNTS
    assert [a.doc_id for a in articles] == sorted(a.doc_id for a in articles)
    assert len({a.doc_id for a in articles}) == len(articles)
    assert articles[0].doc_id == "business/001"
    assert articles[0].raw == articles[0].path.read_bytes()


def test_exactly_one_article_is_not_utf8(articles):
    def valid(a: bbc.Article) -> bool:
        try:
            a.decode()
        except UnicodeDecodeError:
            return False
        return True

    assert [a.doc_id for a in articles if not valid(a)] == ["sports/199"]


def test_split_is_stable_and_stratified(articles):
    train, test = bbc.split(articles)
    assert {a.doc_id for a in train}.isdisjoint(a.doc_id for a in test)
    assert len(train) + len(test) == len(articles)
    assert Counter(a.label for a in test) == {label: round(n * 0.2) for label, n in COUNTS.items()}
    # Pinned: the split is a fixed function of the doc ids, whatever the input order.
    assert [a.doc_id for a in test[:3]] == ["business/006", "business/009", "business/011"]
    _, again_test = bbc.split(list(reversed(articles)))
    assert {a.doc_id for a in again_test} == {a.doc_id for a in test}
    assert {a.doc_id for a in bbc.split(articles, seed=1)[1]} != {a.doc_id for a in test}


def test_shards_round_trip_raw_bytes(tmp_path, articles):
    shards = bbc.write_shards(tmp_path, articles, num_shards=8)
    assert [p.name for p in shards] == [f"part-{i:05d}.parquet" for i in range(8)]
    for shard in shards:
        metadata = pq.ParquetFile(shard).metadata
        assert metadata.row_group(0).column(2).compression == "ZSTD"
        assert set(pq.read_table(shard, columns=["topic"])["topic"].to_pylist()) == set(COUNTS)  # labels mixed

    table = pq.read_table(tmp_path)  # dataset discovery skips _manifest.json
    assert table.schema == bbc.SHARD_SCHEMA
    rows = {r["doc_id"]: r for r in table.to_pylist()}
    assert len(rows) == len(articles)
    for a in articles:
        assert rows[a.doc_id]["topic"] == a.label
        assert rows[a.doc_id]["text"] == a.raw  # including the invalid UTF-8 of sports/199
    assert b"\xa315.8m" in rows["sports/199"]["text"]


def test_prepare_is_idempotent(tmp_path):
    shards = bbc.prepare(tmp_path, num_shards=4)
    written = {p: p.stat().st_mtime_ns for p in [*shards, tmp_path / bbc.MANIFEST]}
    assert bbc.prepare(tmp_path, num_shards=4) == shards
    assert {p: p.stat().st_mtime_ns for p in written} == written

    resharded = bbc.prepare(tmp_path, num_shards=2)
    assert sorted(tmp_path.glob("part-*.parquet")) == resharded  # the 4-shard files are gone
    assert pq.read_table(tmp_path).num_rows == 2225


def test_sentences_are_short_clean_texts(articles):
    texts = bbc.sentences(articles)
    assert len(texts) > 30_000
    assert texts[0] == "Ad sales boost Time Warner profit"  # business/001's headline
    assert all(20 <= len(t) <= 300 and "\n" not in t and "\ufffd" not in t for t in texts)
    assert not any("Chelsea sack Mutu" in t for t in texts)  # sports/199 is skipped
