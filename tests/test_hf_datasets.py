"""Hugging Face datasets as input (``pipeline.hf_datasets``), offline.

Hub datasets are laid out exactly as ``huggingface_hub`` caches them (``datasets--<org>--<name>/refs/``,
``snapshots/<sha>/`` links to ``blobs/``) in the temporary ``HF_HUB_CACHE`` that ``conftest.py`` sets with
``HF_HUB_OFFLINE=1``: two commits of one repo with two configs in its README, and its
``refs/convert/parquet`` branch. ``save_to_disk`` directories are written by ``datasets`` itself. A job's
output from either equals, exactly, the output of the same rows given as plain Parquet.

The source stage is the same for every task (``test_every_route_reads_the_same_records`` compares its
records), so the whole runs take two tasks, one per way a task reads its rows: ``embedding`` (one text;
its output is searched, with texts fetched from the dataset) and ``rerank`` (a text pair), both from the
Hub; the ``save_to_disk`` route runs ``rerank``, which reads both columns.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import sentence

from jobs import nightly as nightly_job
from jobs.run import main as run_main
from pipeline import read_output
from pipeline import schema as S
from pipeline.config import load_config
from pipeline.hf_datasets import CONVERT_BRANCH
from pipeline.run import run_job
from pipeline.search import Searcher
from pipeline.source import InputError, open_input, read_records

REPO_ID = "tiny-org/news"
OLD, MAIN, CONVERT = (hashlib.sha1(name.encode()).hexdigest() for name in ("old", "main", "convert"))
TASKS = ("embedding", "rerank")  # a single text and a text pair: the two ways the source stage feeds a task
TASK_INPUT = {"rerank": {"text_pair_column": "topic"}}  # (text, topic) pairs

CARD = """---
license: cc-by-4.0
configs:
- config_name: en
  default: true
  data_files:
  - split: train
    path: data/en/train-*
  - split: test
    path: data/en/test-*
- config_name: fr
  data_files:
  - split: train
    path: data/fr/train-*
---
# News, in two languages
"""


def rows(seed: int, n: int, bad: bool = False) -> pa.Table:
    """``n`` rows of text and an unused column; ``bad``: one empty and one null text among them."""
    rng = random.Random(seed)
    texts = [sentence(rng) for _ in range(n)]
    if bad:
        texts[3], texts[n - 2] = "  \u200b ", None
    return pa.table({"text": texts, "topic": [rng.choice(["a", "b"]) for _ in range(n)]})


def parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def cache_dir(repo_id: str) -> Path:
    return Path(os.environ["HF_HUB_CACHE"]) / ("datasets--" + repo_id.replace("/", "--"))


def put_commit(repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> None:
    """One commit of a dataset repo as ``huggingface_hub`` caches it: ``snapshots/<commit>/<path>`` linking to
    ``blobs/<sha256>``, and ``refs/<name>`` holding the commit for each ref that names it."""
    repo = cache_dir(repo_id)
    for path, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


EN_TRAIN = {  # the config and split the jobs read, at MAIN: 24 rows in two shards, two of them bad
    "data/en/train-00000-of-00002.parquet": rows(1, 12, bad=True),
    "data/en/train-00001-of-00002.parquet": rows(2, 12),
}


@pytest.fixture(scope="module")
def hub() -> str:
    """``tiny-org/news`` in the Hub cache: OLD and MAIN (refs/main) with configs en (train, test) and fr (train),
    and the Parquet conversion (refs/convert/parquet)."""
    put_commit(REPO_ID, OLD, {"README.md": CARD.encode(), "data/en/train-00000-of-00001.parquet": parquet(rows(3, 5)),
                              "data/en/test-00000-of-00001.parquet": parquet(rows(4, 3)),
                              "data/fr/train-00000-of-00001.parquet": parquet(rows(5, 3))})  # fmt: skip
    put_commit(
        REPO_ID,
        MAIN,
        {
            "README.md": CARD.encode(),
            ".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
            **{path: parquet(table) for path, table in EN_TRAIN.items()},
            "data/en/test-00000-of-00001.parquet": parquet(rows(6, 4)),
            "data/fr/train-00000-of-00001.parquet": parquet(rows(7, 4)),
        },
        refs=("main",),
    )
    put_commit(
        REPO_ID,
        CONVERT,
        {
            ".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
            "en/train/0000.parquet": parquet(rows(8, 4)),
            "en/partial-test/0000.parquet": parquet(rows(9, 4)),
            "fr/train/0000.parquet": parquet(rows(10, 4)),
            "fr/train/0001.parquet": parquet(rows(11, 4)),
        },
        refs=(CONVERT_BRANCH,),
    )
    return f"hf://datasets/{REPO_ID}"


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The rows of config en, split train at MAIN as a plain Parquet directory, under the same relative paths."""
    root = tmp_path_factory.mktemp("plain")
    for path, table in EN_TRAIN.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / path)
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The same 24 rows, in the same order, saved by ``datasets`` into three Arrow shards."""
    root = tmp_path_factory.mktemp("saved") / "news"
    table = pa.concat_tables(EN_TRAIN.values())
    datasets.Dataset.from_dict(table.to_pydict()).save_to_disk(str(root), num_shards=3)
    return root


@pytest.fixture(scope="module")
def saved_dict(tmp_path_factory) -> Path:
    """A ``DatasetDict`` with splits train and test."""
    root = tmp_path_factory.mktemp("saved") / "news_dict"
    splits = {"train": rows(12, 6), "test": rows(13, 4)}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v.to_pydict()) for k, v in splits.items()}).save_to_disk(str(root))
    return root


def job(tiny_models, task: str, input: dict, out: Path) -> dict:
    return {
        "input": {**TASK_INPUT.get(task, {}), **input},
        "model": {"path": str(tiny_models[task]), "task": task},
        "output": {"path": str(out)},
        "tokenize": {"batch_size": 8},
        "inference": {"batch_size": 1},  # one row per forward pass: bitwise the same whatever order rows arrive in
    }


@pytest.fixture(scope="module")
def reference(ray_session, tiny_models, plain, tmp_path_factory):
    """The output of the Parquet route for a task (run once per task), read through its manifest."""
    root, done = tmp_path_factory.mktemp("reference"), set()

    def output(task: str, rejected: bool = False) -> pa.Table:
        if task not in done:
            manifest = run_job(load_config(raw=job(tiny_models, task, {"path": str(plain)}, root / task)))
            assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (24, 22, 2)
            done.add(task)
        return read_output(str(root / task), rejected=rejected)

    return output


def bare(table: pa.Table, *drop: str) -> pa.Table:
    """``table`` without the file-level metadata (which records the input) and the ``drop`` columns."""
    return table.drop_columns(list(drop)).replace_schema_metadata(None)


def test_every_route_reads_the_same_records(hub, plain, saved):
    """The source stage's view of the rows: the same records, in the same order, with the same declared types."""
    cfg = load_config(raw={"input": {"path": str(plain)}, "model": {"path": "x/y", "task": "embedding"},
                           "output": {"path": "/tmp/unused"}}).input  # fmt: skip
    routes = {
        "plain": open_input(cfg, None, []),
        "hub": open_input(cfg.model_copy(update={"path": hub, "split": "train"}), None, []),
        "saved": open_input(cfg.model_copy(update={"path": str(saved)}), None, []),
    }
    seen = {}
    for name, shards in routes.items():
        records = []
        for path in shards.files:
            with shards.fs.open(path, "rb") as f:
                records += [(record, problem) for _, record, problem in read_records(f, shards.format_of(path), ["text"])]
        seen[name] = records
    assert len(seen["plain"]) == 24 and seen["hub"] == seen["plain"] and seen["saved"] == seen["plain"]
    assert [routes["saved"].relative(f) for f in routes["saved"].files] == [f"data-{k:05d}-of-00003.arrow" for k in range(3)]
    assert set(routes["saved"].formats.values()) == {"arrow"} and routes["saved"].dataset.kind == "save_to_disk"


@pytest.mark.parametrize("task", TASKS)
def test_hub_dataset_output_equals_the_parquet_route(ray_session, tiny_models, hub, reference, tmp_path, task):
    """Offline, from the cache: the same files at the same paths under the repo, so the same generated ids.
    The embedding job pins the commit and names the config; the rerank job reads main's default config."""
    pinned = {"revision": MAIN, "config": "en"} if task == "embedding" else {}
    manifest = run_job(load_config(raw=job(tiny_models, task, {"path": hub, "split": "train", **pinned}, tmp_path / "hub")))
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (24, 22, 2)
    assert manifest["rejected_by_reason"] == {"empty_text": 1, "null_text": 1}
    for rejected in (False, True):
        got, want = read_output(str(tmp_path / "hub"), rejected=rejected), reference(task, rejected)
        assert bare(got.sort_by(S.GENERATED_ID)).equals(bare(want.sort_by(S.GENERATED_ID)))
    assert reference(task)[S.GENERATED_ID].to_pylist()[0].startswith("data/en/train-0000")
    metadata = json.loads(pq.read_schema(next((tmp_path / "hub").glob("part-*.parquet"))).metadata[S.METADATA_KEY])
    assert metadata["input_dataset"] == {
        "kind": "hub", "name": REPO_ID, "revision": MAIN, "config": "en", "split": "train",
        "requested": pinned.get("revision", "main"), "layout": "README configs",
    }  # fmt: skip

    if task == "embedding":  # search fetches the hits' texts from the dataset, at the commit that was embedded
        text = EN_TRAIN["data/en/train-00001-of-00002.parquet"]["text"][5].as_py()
        hits = Searcher(str(tmp_path / "hub")).search(text, k=1, exact=True)
        assert hits[S.GENERATED_ID].to_pylist() == ["data/en/train-00001-of-00002.parquet:5"]
        assert hits["text"].to_pylist() == [text]


def test_save_to_disk_output_equals_the_parquet_route(ray_session, tiny_models, saved, reference, tmp_path):
    """Three Arrow shards of 8 rows: ids name them, and row for row the output is the Parquet route's. The
    rerank job reads both of a row's texts from the Arrow shards (the embedding job reads one, from the Hub)."""
    task = "rerank"
    manifest = run_job(load_config(raw=job(tiny_models, task, {"path": str(saved)}, tmp_path / "saved")))
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (24, 22, 2)

    def by_position(table: pa.Table, shard_rows: int, *drop: str) -> pa.Table:
        """Sorted by the row's place in the input (its shard, in name order, then its row), without the id
        and the ``drop`` columns."""
        files = sorted({i.rsplit(":", 1)[0] for i in table[S.GENERATED_ID].to_pylist()})
        place = [files.index(i.rsplit(":", 1)[0]) * shard_rows + int(i.rsplit(":", 1)[1]) for i in table[S.GENERATED_ID].to_pylist()]
        return bare(table.append_column("place", pa.array(place)).sort_by("place"), S.GENERATED_ID, "place", *drop)

    got = read_output(str(tmp_path / "saved"))
    assert by_position(got, 8).equals(by_position(reference(task), 12))
    texts = pa.concat_tables(EN_TRAIN.values())["text"].to_pylist()
    bad = [n for n, text in enumerate(texts) if text is None or not text.strip(" \u200b")]
    assert bad == [3, 10]
    expected_ids = {f"data-{n // 8:05d}-of-00003.arrow:{n % 8}" for n in range(24) if n not in bad}
    assert set(got[S.GENERATED_ID].to_pylist()) == expected_ids
    where = ("source_file", "source_row")  # the shard and row, which the id names too
    assert by_position(read_output(str(tmp_path / "saved"), rejected=True), 8, *where).equals(
        by_position(reference(task, rejected=True), 12, *where)
    )
    rejected = read_output(str(tmp_path / "saved"), rejected=True).to_pylist()
    assert sorted((r["source_file"], r["source_row"], r["reason"]) for r in rejected) == [
        ("data-00000-of-00003.arrow", 3, "empty_text"), ("data-00001-of-00003.arrow", 2, "null_text")
    ]  # fmt: skip
    metadata = json.loads(pq.read_schema(next((tmp_path / "saved").glob("part-*.parquet"))).metadata[S.METADATA_KEY])
    assert metadata["input_dataset"]["kind"] == "save_to_disk"


# ---- what --dry-run shows, and what it refuses ---------------------------------------------------------


@pytest.fixture
def dry_run(tmp_path, tiny_models, capsys):
    """``python -m jobs.run --dry-run`` of an embedding job, with ``--set`` overrides: (exit code, stdout, stderr)."""
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job(tiny_models, "embedding", {"path": "unset"}, tmp_path / "out")))

    def run(*overrides: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run_main(["--config", str(config), "--dry-run", *(a for o in overrides for a in ("--set", o))])
        printed = capsys.readouterr()
        assert "Traceback" not in printed.out + printed.err
        return code, printed.out, printed.err

    return run


def test_dry_run_shows_the_dataset_commit_config_split_and_files(hub, saved_dict, dry_run):
    code, out, _ = dry_run(f"input.path={hub}", "input.split=train")
    assert code == 0, out
    assert f"dataset  Hub dataset {REPO_ID} @ {MAIN} (main), config en, split train [README configs]" in out
    assert "files    data/en/train-00000-of-00002.parquet, data/en/train-00001-of-00002.parquet\n" in out

    code, out, _ = dry_run(f"input.path={hub}", f"input.revision={OLD}", "input.split=train")  # pinned: not main
    assert code == 0 and f"@ {OLD}, config en, split train [README configs]" in out
    assert "files    data/en/train-00000-of-00001.parquet\n" in out

    code, out, _ = dry_run(f"input.path={hub}", "input.config=fr")  # its only split
    assert code == 0 and "config fr, split train" in out and "files    data/fr/train-00000-of-00001.parquet\n" in out

    for revision in (CONVERT_BRANCH, CONVERT):  # the Parquet conversion, by its branch or by its commit
        code, out, _ = dry_run(f"input.path={hub}", f"input.revision={revision}", "input.config=fr")
        assert code == 0 and f"@ {CONVERT}" in out and "config fr, split train [Parquet conversion]" in out, out
        assert "files    fr/train/0000.parquet, fr/train/0001.parquet\n" in out
    code, out, _ = dry_run(f"input.path={hub}", f"input.revision={CONVERT_BRANCH}", "input.config=en", "input.split=test")
    assert code == 0 and "files    en/partial-test/0000.parquet\n" in out  # a partial conversion

    card = b"---\nconfigs:\n- config_name: de\n  data_dir: data/de\n- config_name: it\n  data_dir: data/it\n---\n"
    put_commit("tiny-org/dirs", MAIN, {"README.md": card, **{f"data/{c}/{s}-00000-of-00001.parquet": parquet(rows(15, 2))
                                                            for c in ("de", "it") for s in ("train", "test")}}, refs=("main",))  # fmt: skip
    code, out, _ = dry_run("input.path=hf://datasets/tiny-org/dirs", "input.config=it", "input.split=test")  # a data_dir
    assert code == 0 and "config it, split test [README configs]" in out and "files    data/it/test-00000-of-00001.parquet\n" in out

    code, out, _ = dry_run(f"input.path={hub}/data/fr")  # a path in the repo: its files, ids from the repo root
    assert code == 0 and f"@ {MAIN} (main) [path in the repo]" in out
    assert "files    data/fr/train-00000-of-00001.parquet\n" in out

    code, out, _ = dry_run(f"input.path={saved_dict}", "input.split=test")
    assert code == 0 and f"dataset  save_to_disk dataset {saved_dict}, split test, fingerprint " in out
    assert "files    test/data-00000-of-00001.arrow\n" in out and "1 arrow file(s)" in out


def test_bad_dataset_inputs_are_refused_before_anything_starts(hub, saved, saved_dict, dry_run, tmp_path):
    put_commit("tiny-org/csvs", MAIN, {"data/train.csv": b"text\nhello\n"}, refs=("main",))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for f in saved.iterdir():
        if f.name != "data-00001-of-00003.arrow":
            (incomplete / f.name).write_bytes(f.read_bytes())
    missing = "f" * 40
    cases = {
        "unknown config": ([f"input.path={hub}", "input.config=de"], "has no config 'de'; its configs are ['en', 'fr']: fix input.config"),
        "unknown split": ([f"input.path={hub}", "input.split=validation"], "has no split 'validation'; its splits are ['train', 'test']"),
        "split unchosen": ([f"input.path={hub}"], "config en has 2 splits, ['train', 'test'], and no default: choose one with input.split"),
        "uncached commit": (
            [f"input.path={hub}", f"input.revision={missing}", "input.split=train"],
            f"revision {missing} is not in the Hub cache ({os.environ['HF_HUB_CACHE']}; it holds ",
            f"{MAIN} (main)", f"{CONVERT} ({CONVERT_BRANCH})", OLD, "and HF_HUB_OFFLINE=1 forbids downloading it",
        ),
        "uncached branch": ([f"input.path={hub}", "input.revision=dev"], "revision dev is not in the Hub cache"),
        "uncached dataset": (["input.path=hf://datasets/tiny-org/elsewhere"], "it holds no revision of this dataset), and HF_HUB_OFFLINE=1"),
        "path and config": ([f"input.path={hub}/data", "input.config=fr"], "input.config and input.split do not apply"),
        "missing path": ([f"input.path={hub}/data/de"], f"does not exist (at commit {MAIN} in its cached snapshot"),
        "no org": (["input.path=hf://datasets/news"], "hf://datasets/<org>/<name>"),
        "a model": (["input.path=hf://tiny-org/news"], "hf:// reads Hub datasets only"),
        "revision in the path": ([f"input.path={hub}@main"], "give the revision as input.revision"),
        "csv only": (["input.path=hf://datasets/tiny-org/csvs"], "none of them Parquet, JSONL or Arrow: read the Hub's Parquet conversion"),
        "config of a directory": ([f"input.path={saved}", "input.config=en"], "input.config applies to Hub datasets"),
        "revision of a directory": ([f"input.path={saved}", "input.revision=main"], "input.revision applies to Hub datasets"),
        "split of plain files": ([f"input.path={saved}/data-00000-of-00003.arrow", "input.split=train"], "input.split selects a split"),
        "split of a Dataset": ([f"input.path={saved}", "input.split=train"], "is a save_to_disk Dataset, not a DatasetDict of splits: remove input.split"),
        "DatasetDict split unchosen": ([f"input.path={saved_dict}"], "has 2 splits, ['train', 'test'], and no default"),
        "DatasetDict unknown split": ([f"input.path={saved_dict}", "input.split=dev"], "its splits are ['train', 'test']"),
        "arrow file missing": ([f"input.path={incomplete}"], "lists ['data-00001-of-00003.arrow'], which is missing"),
    }
    for name, (overrides, *messages) in cases.items():
        code, out, err = dry_run(*overrides)
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, (name, out, err)
        assert all(message in err for message in messages), (name, err)


def test_online_without_network_explains_offline_mode_and_the_cache(hub, monkeypatch):
    """Without HF_HUB_OFFLINE the Hub is asked; a refused connection (what no network looks like) says what to do."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    cfg = load_config(raw=job({"embedding": "x/y"}, "embedding", {"path": hub, "split": "train"}, Path("/tmp/o"))).input
    with pytest.raises(InputError) as e:
        open_input(cfg, None, [])
    assert "cannot reach the Hub (http://127.0.0.1:9) for hf://datasets/tiny-org/news" in str(e.value)
    assert f"set HF_HUB_OFFLINE=1 to read the dataset from the Hub cache ({os.environ['HF_HUB_CACHE']}; it holds" in str(e.value)
    assert f"{MAIN} (main)" in str(e.value)


def test_a_snapshot_the_cached_listing_shows_incomplete_is_refused():
    """An interrupted download: the cached file listing of the commit names a shard that is not there."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    data = parquet(rows(14, 3))
    put_commit("tiny-org/partial", MAIN, {"data/train-00000-of-00002.parquet": data}, refs=("main",))
    listing = {f"data/train-0000{k}-of-00002.parquet": TreeCacheEntry(size=len(data), blob_id=f"{k}" * 40) for k in (0, 1)}
    write_tree_cache(str(cache_dir("tiny-org/partial")), MAIN, listing)
    cfg = load_config(raw=job({"embedding": "x/y"}, "embedding", {"path": "hf://datasets/tiny-org/partial"}, Path("/o"))).input
    with pytest.raises(InputError, match=r"is incomplete: 1 file\(s\) are missing \(data/train-00001-of-00002.parquet\)"):
        open_input(cfg, None, [])


def test_arrow_shards_stream_batch_by_batch_in_both_ipc_formats(tmp_path, dry_run, saved):
    """An Arrow shard is read a record batch at a time (sliced to the read batch size); the stream format is
    what save_to_disk writes, the file format (Feather v2) is read too; a broken one is quarantined by the plan."""
    table = pa.table({"text": [f"row {i}" for i in range(5000)], "n": list(range(5000))})
    with pa.ipc.new_stream(tmp_path / "stream.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=5000)
    with pa.ipc.new_file(tmp_path / "file.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=3000)
    for name in ("stream.arrow", "file.arrow"):
        with open(tmp_path / name, "rb") as f:
            records = list(read_records(f, "arrow", ["text"]))
        assert [(row, record) for row, record, _ in records] == [(i, {"text": f"row {i}"}) for i in range(5000)]

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in saved.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:5] if f.name == "data-00001-of-00003.arrow" else f.read_bytes())
    code, out, _ = dry_run(f"input.path={broken}")
    assert code == 3 and "UNREADABLE data-00001-of-00003.arrow: not a readable Arrow IPC file" in out, out


# ---- nightly: a new revision of the dataset is new input -----------------------------------------------


def test_nightly_scores_a_new_dataset_revision_as_new_input(ray_session, tiny_models, tmp_path, capsys):
    repo, date = "tiny-org/events", "2026-11-20"
    first, second = (hashlib.sha1(name.encode()).hexdigest() for name in ("events-1", "events-2"))
    put_commit(repo, first, {"data/train-00000-of-00001.parquet": parquet(rows(20, 10))}, refs=("main",))
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(job(tiny_models, "sequence-classification", {"path": f"hf://datasets/{repo}"}, tmp_path / "scores")))
    day = tmp_path / "scores" / f"dt={date}"

    assert nightly_job.main(["--config", str(config), "--date", date]) == 0
    [old] = list(day.glob("version=*"))
    assert old.name.endswith(f"-{first[:12]}")
    ledger = json.loads((old / S.MANIFEST).read_text())["shards"]
    assert list(ledger) == ["data/train-00000-of-00001.parquet"] and ledger["data/train-00000-of-00001.parquet"]["revision"] == first
    capsys.readouterr()
    assert nightly_job.main(["--config", str(config), "--date", date]) == 0
    assert "already complete (1 shards" in capsys.readouterr().out

    # A new commit on main changes the shard (same name, other rows): it is new input, scored into a version of
    # its own, and readers move to it; the old version is left as it was.
    put_commit(repo, second, {"data/train-00000-of-00001.parquet": parquet(rows(21, 7))}, refs=("main",))
    before = (old / S.MANIFEST).read_text()
    assert nightly_job.main(["--config", str(config), "--date", date]) == 0
    assert "scoring 1 new shard(s) of 1" in capsys.readouterr().out
    [new] = [v for v in day.glob("version=*") if v != old]
    assert new.name == old.name.replace(first[:12], second[:12]) and (day / S.CURRENT).read_text() == new.name
    assert (old / S.MANIFEST).read_text() == before
    scored = read_output(str(day), columns=[S.GENERATED_ID])[S.GENERATED_ID].to_pylist()
    assert sorted(scored) == sorted(f"data/train-00000-of-00001.parquet:{r}" for r in range(7))
    assert json.loads((new / S.MANIFEST).read_text())["rows_in"] == 7

    # The old revision, pinned, is the old version: complete, nothing rescored.
    assert nightly_job.main(["--config", str(config), "--date", date, "--set", f"input.revision={first}"]) == 0
    assert "already complete" in capsys.readouterr().out
