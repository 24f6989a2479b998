"""The BBC corpus helpers: the corpus itself, the fixed split, Parquet shards and short sentences."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import bbc

REPO = Path(__file__).resolve().parents[1]
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


def test_dataset_holds_the_shards_rows_and_the_shipped_config_reads_it(tmp_path, articles):
    """The corpus as a `datasets` dataset (save_to_disk): the same rows and raw bytes as the Parquet shards, and
    what configs/bbc_embed_dataset.yaml plans to embed."""
    import datasets

    from pipeline.config import load_config
    from pipeline.run import plan
    from pipeline.source import open_shard, read_records

    subset = [a for a in articles if a.doc_id == "sports/199"] + articles[::100]  # the non-UTF-8 one, and 23 more
    bbc.write_shards(tmp_path / "shards", subset, num_shards=2)
    bbc.write_dataset(tmp_path / "dataset", subset, num_shards=3)
    loaded = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert loaded.num_rows == len(subset) and loaded.features["text"].dtype == "binary"
    assert {r["doc_id"]: r["text"] for r in loaded} == {a.doc_id: a.raw for a in subset}

    overrides = [f"input.path={tmp_path / 'dataset'}", f"output.path={tmp_path / 'out'}"]
    job = plan(load_config(REPO / "configs/bbc_embed_dataset.yaml", overrides), cpus=2, gpus=0)
    shards = job.shards
    assert [shards.relative(f) for f in shards.files] == [f"data-{k:05d}-of-00003.arrow" for k in range(3)]
    assert shards.dataset.kind == "save_to_disk" and "dataset  save_to_disk dataset" in job.describe()
    records = []
    for f in shards.files:
        with open_shard(shards, f) as stream:
            records += [r for _, r, _ in read_records(stream, "arrow", ["doc_id", "topic", "text"])]
    parquet = pq.read_table(tmp_path / "shards").to_pylist()
    assert sorted(records, key=lambda r: r["doc_id"]) == sorted(parquet, key=lambda r: r["doc_id"])

    bbc.write_dataset(tmp_path / "dataset", subset, num_shards=2)  # rewritten: no shard of the old layout is left
    assert sorted(p.name for p in (tmp_path / "dataset").glob("*.arrow")) == [f"data-{k:05d}-of-00002.arrow" for k in range(2)]
