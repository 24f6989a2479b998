"""jobs.nightly: exactly-once, resumable, versioned scoring of date partitions, one driver per date."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from conftest import WORDS
from drivers import finish, kill, receipted_rows, holding, start, wait_until

from jobs.nightly import main
from pipeline import read_output
from pipeline import schema as S
from pipeline.commit import CRASH_EXIT_CODE, HOST, Lease
from pipeline.config import StorageConfig

DATE = "2026-11-20"


def write_shard(root: Path, name: str, rows: int, start: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"{name}-{i}" for i in range(start, start + rows)]
    texts = [" ".join(WORDS[i % 40 : i % 40 + 2 + i % 25]) for i in range(rows)]
    texts[3] = None  # quarantined, never lost
    pq.write_table(pa.table({"doc_id": ids, "text": texts}), root / f"{name}.parquet")


@pytest.fixture
def job(tmp_path, tiny_models) -> dict:
    """A config file scoring <tmp>/events/dt=${DATE}/ into <tmp>/scores/."""
    config = {
        "input": {"path": str(tmp_path / "events" / "dt=${DATE}"), "id_columns": ["doc_id"]},
        "model": {"path": str(tiny_models["sequence-classification"]), "task": "sequence-classification"},
        "output": {"path": str(tmp_path / "scores"), "rows_per_file": 20},
        "tokenize": {"batch_size": 20},
        "inference": {"batch_size": 20},
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"config": str(path), "events": tmp_path / "events" / f"dt={DATE}", "scores": tmp_path / "scores" / f"dt={DATE}"}


def version_dirs(scores: Path) -> list[Path]:
    return sorted(p for p in scores.glob("version=*") if p.is_dir())


def published_ids(version: Path) -> list[str]:
    assert (version / S.SUCCESS).exists()
    ids = read_output(str(version), columns=["doc_id"])["doc_id"].to_pylist()
    assert sorted(pq.read_table(version, columns=["doc_id"])["doc_id"].to_pylist()) == sorted(ids)  # plain readers agree
    return ids


def rejected_ids(version: Path) -> list[str]:
    return read_output(str(version), columns=["doc_id"], rejected=True)["doc_id"].to_pylist()


def manifest_of(version: Path) -> dict:
    return json.loads((version / S.MANIFEST).read_text())


def expected_ids(events: Path) -> list[str]:
    return sorted(pq.read_table(events, columns=["doc_id"])["doc_id"].to_pylist())


def test_rerun_is_a_noop_new_shards_alone_are_scored_and_changes_make_new_versions(ray_session, job, capsys):
    write_shard(job["events"], "a", 60)
    write_shard(job["events"], "b", 40)
    assert main(["--config", job["config"], "--date", DATE]) == 0
    [version] = version_dirs(job["scores"])
    assert sorted(published_ids(version) + rejected_ids(version)) == expected_ids(job["events"])
    assert (job["scores"] / "_CURRENT").read_text() == version.name

    capsys.readouterr()
    assert main(["--config", job["config"], "--date", DATE]) == 0
    assert "already complete (2 shards" in capsys.readouterr().out

    write_shard(job["events"], "c", 30)
    assert main(["--config", job["config"], "--date", DATE]) == 0
    assert "scoring 1 new shard(s) of 3" in capsys.readouterr().out
    ids = published_ids(version) + rejected_ids(version)
    assert sorted(ids) == expected_ids(job["events"]) and len(ids) == len(set(ids)) == 130
    manifest = manifest_of(version)
    assert len(manifest["runs"]) == 2 and set(manifest["shards"]) == {"a.parquet", "b.parquet", "c.parquet"}
    assert manifest["rows_in"] == 130 == manifest["rows_out"] + manifest["rows_rejected"]
    assert sorted(f for run in manifest["runs"].values() for f in run["files"]) == sorted(
        [*manifest["files"], *manifest["rejected_files"]]
    )
    assert not (version / S.STAGING).exists()
    # The date directory reads as its _CURRENT version.
    by_date = read_output(str(job["scores"]), columns=["doc_id"])["doc_id"].to_pylist()
    assert sorted(by_date) == sorted(published_ids(version))

    # A different config is a different version; the published one is untouched.
    assert main(["--config", job["config"], "--date", DATE, "--set", "model.max_length=32"]) == 0
    assert len(version_dirs(job["scores"])) == 2
    assert sorted(published_ids(version) + rejected_ids(version)) == expected_ids(job["events"])

    # A scored shard that changes is refused, not silently mixed.
    write_shard(job["events"], "a", 61)
    assert main(["--config", job["config"], "--date", DATE]) == 2
    assert "changed after they were scored" in capsys.readouterr().err


def test_killed_runs_are_resumed_row_by_row_and_a_crash_after_the_commit_point_is_finished(ray_session, job, capsys):
    for name in "ab":
        write_shard(job["events"], name, 30)
    small_parts = ("output.rows_per_file=5", "tokenize.batch_size=5", "inference.batch_size=5")
    driver = start("jobs.nightly", job["config"], "--date", DATE, overrides=(*small_parts, "faults.delay_s=0.4"))
    staging = lambda: [p / S.STAGING for p in version_dirs(job["scores"])]  # noqa: E731
    wait_until(lambda: sum(receipted_rows(p) for p in staging()) >= 30, driver)
    kill(driver)  # mid-run: some parts receipted, nothing committed
    [version] = version_dirs(job["scores"])
    assert not (version / S.SUCCESS).exists() and not (version / S.MANIFEST).exists()

    # The next driver takes the dead one's lease over at once (its process is gone), resumes its parts,
    # commits, and dies right after the commit point.
    crashing = start("jobs.nightly", job["config"], "--date", DATE, overrides=(*small_parts, "faults.crash_at=committed"))
    code, log = finish(crashing)
    assert code == CRASH_EXIT_CODE and "took over the lease" in log, log
    manifest = manifest_of(version)
    [run] = manifest["runs"].values()
    assert manifest["shards"].keys() == {"a.parquet", "b.parquet"}
    assert run["rows_resumed"] >= 30 and run["rows_resumed"] + run["rows_scored"] == 60
    assert not (version / S.SUCCESS).exists() and (version / S.STAGING).exists()  # committed, not cleaned up

    assert main(["--config", job["config"], "--date", DATE]) == 0
    out = capsys.readouterr().out
    assert "finished the interrupted commit" in out and "already complete" in out
    ids = published_ids(version) + rejected_ids(version)
    assert sorted(ids) == expected_ids(job["events"]) and len(ids) == len(set(ids)) == 60
    assert not (version / S.STAGING).exists() and (job["scores"] / S.CURRENT).read_text() == version.name


def test_a_second_driver_for_the_same_date_is_refused_naming_the_holder(ray_session, job, s3_server, s3_bucket, capsys):
    """The date's lease and versions on S3. The lease is the commit protocol's, shared with jobs.run, whose tests
    take it on local disk and on S3 (test_outputs); here: the date's lease, its dry-run and its output."""
    write_shard(job["events"], "a", 20)
    config = yaml.safe_load(Path(job["config"]).read_text())
    endpoint = s3_server.endpoint_url
    config["output"]["path"] = f"s3://{s3_bucket}/scores"
    config["storage"] = {"endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    held = lambda: bool(fs.invalidate_cache() or fs.glob(f"{s3_bucket}/scores/dt={DATE}/{S.LEASE}/*.json"))  # noqa: E731
    Path(job["config"]).write_text(yaml.safe_dump(config))
    day = f"{config['output']['path']}/dt={DATE}"

    with holding("jobs.nightly", job["config"], "--date", DATE, held=held) as first:
        code = main(["--config", job["config"], "--date", DATE])  # a second driver (this process) for the date
        log = "".join(capsys.readouterr())
        dry_code = main(["--config", job["config"], "--date", DATE, "--dry-run"])
    plan_text = capsys.readouterr().out
    assert dry_code == 0 and "1 of 1 shard(s) to score" in plan_text and "lease held by run " in plan_text, plan_text
    assert code == 2, log
    assert f"{day} is being written by run " in log and f"pid {first.pid} on {HOST}" in log, log
    code, log = finish(first)
    assert code == 0, log
    storage_cfg = StorageConfig(endpoint_url=endpoint)
    ids = read_output(day, storage_cfg, columns=["doc_id"])["doc_id"].to_pylist()
    ids += read_output(day, storage_cfg, columns=["doc_id"], rejected=True)["doc_id"].to_pylist()
    assert sorted(ids) == expected_ids(job["events"]) and len(ids) == len(set(ids)) == 20
    assert Lease(day, storage_cfg, "", 1).state() == "free"


def test_backfill_and_date_validation(ray_session, job, tmp_path, capsys):
    for day in ("2026-11-18", "2026-11-19"):
        write_shard(tmp_path / "events" / f"dt={day}", "a", 10)
    assert main(["--config", job["config"], "--backfill", "2026-11-18", "2026-11-19"]) == 0
    for day in ("2026-11-18", "2026-11-19"):
        [version] = version_dirs(tmp_path / "scores" / f"dt={day}")
        assert len(published_ids(version)) == 9
    assert main(["--config", job["config"], "--date", "2026-13-01"]) == 2
    assert "--date expects YYYY-MM-DD" in capsys.readouterr().err


def test_an_unreadable_shard_is_quarantined_and_left_pending(ray_session, job, capsys):
    """A shard that cannot be read is recorded in _rejected/ and the run exits 3, but the ledger does not list
    it: once it reads, the next run scores it like any new shard, and every row is there exactly once."""
    write_shard(job["events"], "a", 30)
    write_shard(job["events"], "b", 30)
    shard = job["events"] / "b.parquet"
    good = shard.read_bytes()
    data = bytearray(good)
    footer = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
    data[4:footer] = b"\xff" * (footer - 4)  # the footer still reads; the pages do not
    shard.write_bytes(bytes(data))

    assert main(["--config", job["config"], "--date", DATE]) == 3
    printed = capsys.readouterr()
    assert "PARTIAL: 1 unreadable shard(s) quarantined and left pending: ['b.parquet']" in printed.out
    [version] = version_dirs(job["scores"])
    assert set(manifest_of(version)["shards"]) == {"a.parquet"}
    rejected = read_output(str(version), rejected=True).to_pylist()
    [record] = [r for r in rejected if r["reason"] == "unreadable_shard"]
    assert record["source_file"] == "b.parquet" and "30 rows by its footer" in record["detail"]
    ids = published_ids(version) + [r["doc_id"] for r in rejected if r["doc_id"]]
    assert sorted(ids) == sorted(f"a-{i}" for i in range(30))

    shard.write_bytes(good)  # repaired
    assert main(["--config", job["config"], "--date", DATE]) == 0
    assert set(manifest_of(version)["shards"]) == {"a.parquet", "b.parquet"}
    ids = published_ids(version) + rejected_ids(version)
    scored = [i for i in ids if i is not None]
    assert sorted(scored) == expected_ids(job["events"]) and len(scored) == len(set(scored)) == 60

def test_a_date_scored_in_several_runs_applies_one_int8_calibration(ray_session, job, tiny_models):
    """int8 ranges are fixed before a run from its own rows; a later run into the same version (a late
    shard) applies the first run's ranges, so every part is on one scale and the output stays searchable."""
    from pipeline.index import build_index

    embed = ["--set", f"model.path={tiny_models['embedding']}", "--set", "model.task=embedding",
             "--set", "output.embedding.precision=int8"]  # fmt: skip
    write_shard(job["events"], "a", 20)
    assert main(["--config", job["config"], "--date", DATE, *embed]) == 0
    write_shard(job["events"], "b", 20, start=20)
    assert main(["--config", job["config"], "--date", DATE, *embed]) == 0
    [version] = version_dirs(job["scores"])
    parts = [version / name for name in manifest_of(version)["files"]]
    ranges = {json.dumps(json.loads(pq.read_schema(p).metadata[S.METADATA_KEY])["quantization_ranges"]) for p in parts}
    assert len(parts) >= 2 and len(ranges) == 1 and None not in ranges
    assert build_index(str(version)).rows == 38
