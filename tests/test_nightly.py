"""jobs.nightly: exactly-once, resumable, versioned scoring of date partitions."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import WORDS

from jobs.nightly import main
from pipeline import schema as S

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
    return pq.read_table(version, columns=["doc_id"])["doc_id"].to_pylist()


def rejected_ids(version: Path) -> list[str]:
    return pq.read_table(version / S.REJECTED_DIR, columns=["doc_id"])["doc_id"].to_pylist()


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
    ledger = json.loads((version / "_ledger.json").read_text())
    assert len(ledger["runs"]) == 2 and set(ledger["shards"]) == {"a.parquet", "b.parquet", "c.parquet"}
    assert all(run["published"] for run in ledger["runs"].values())
    assert not list((version / "_staging").glob("*"))

    # A different config is a different version; the published one is untouched.
    assert main(["--config", job["config"], "--date", DATE, "--set", "model.max_length=32"]) == 0
    assert len(version_dirs(job["scores"])) == 2
    assert sorted(published_ids(version) + rejected_ids(version)) == expected_ids(job["events"])

    # A scored shard that changes is refused, not silently mixed.
    write_shard(job["events"], "a", 61)
    assert main(["--config", job["config"], "--date", DATE]) == 2
    assert "changed after they were scored" in capsys.readouterr().err


def nightly_process(job: dict, *overrides: str) -> subprocess.Popen:
    """jobs.nightly as its own driver process, on the tests' Ray cluster (as on a real cluster)."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = [sys.executable, "-m", "jobs.nightly", "--config", job["config"], "--date", DATE]
    for o in overrides:
        args += ["--set", o]
    return subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_mid_run_then_rerun_scores_every_row_exactly_once(ray_session, job):
    for name in "abcdef":
        write_shard(job["events"], name, 50)
    driver = nightly_process(job, "faults.delay_s=0.5")
    deadline = time.time() + 240
    while not list(job["scores"].glob("version=*/_staging/*/part-*.parquet")):
        assert driver.poll() is None and time.time() < deadline, driver.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-run: some parts written, nothing committed
    driver.wait()
    [version] = version_dirs(job["scores"])
    assert not (version / S.SUCCESS).exists() and not (version / "_ledger.json").exists()

    assert main(["--config", job["config"], "--date", DATE]) == 0
    ids = published_ids(version) + rejected_ids(version)
    assert sorted(ids) == expected_ids(job["events"]) and len(ids) == len(set(ids)) == 300
    assert not list((version / "_staging").glob("*"))  # the killed run's partial output is gone


def test_a_crash_between_commit_and_publish_is_rolled_forward(ray_session, job, capsys):
    write_shard(job["events"], "a", 50)
    driver = nightly_process(job, "faults.crash_after_commit=true")
    assert driver.wait(timeout=300) == 17, driver.stdout.read().decode()[-3000:]
    [version] = version_dirs(job["scores"])
    ledger = json.loads((version / "_ledger.json").read_text())
    assert [run["published"] for run in ledger["runs"].values()] == [False]
    assert not (version / S.SUCCESS).exists()

    assert main(["--config", job["config"], "--date", DATE]) == 0
    out = capsys.readouterr().out
    assert "finished publishing interrupted run(s)" in out and "already complete" in out
    ids = published_ids(version) + rejected_ids(version)
    assert sorted(ids) == expected_ids(job["events"]) and len(ids) == len(set(ids))


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
    """A shard that cannot be read is recorded in _rejected/ and the run exits 3, but the ledger does not list it."""
    write_shard(job["events"], "a", 30)
    write_shard(job["events"], "b", 30)
    shard = job["events"] / "b.parquet"
    data = bytearray(shard.read_bytes())
    footer = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
    data[4:footer] = b"\xff" * (footer - 4)  # the footer still reads; the pages do not
    shard.write_bytes(bytes(data))

    assert main(["--config", job["config"], "--date", DATE]) == 3
    printed = capsys.readouterr()
    assert "PARTIAL: 1 unreadable shard(s) quarantined and left pending: ['b.parquet']" in printed.out
    [version] = version_dirs(job["scores"])
    assert set(json.loads((version / "_ledger.json").read_text())["shards"]) == {"a.parquet"}
    rejected = pq.read_table(version / S.REJECTED_DIR).to_pylist()
    [record] = [r for r in rejected if r["reason"] == "unreadable_shard"]
    assert record["source_file"] == "b.parquet" and "30 rows by its footer" in record["detail"]

    # Not in the ledger, so pending: the next run scores it (as any new shard) once it reads.
    ids = published_ids(version) + [r["doc_id"] for r in rejected if r["doc_id"]]
    assert sorted(ids) == sorted(f"a-{i}" for i in range(30))


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
    parts = sorted(version.glob("part-*.parquet"))
    ranges = {json.dumps(json.loads(pq.read_schema(p).metadata[S.METADATA_KEY])["quantization_ranges"]) for p in parts}
    assert len(parts) >= 2 and len(ranges) == 1 and None not in ranges
    assert build_index(str(version)).rows == 38
