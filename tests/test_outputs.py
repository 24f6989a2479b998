"""Outputs users can trust (pipeline.commit): overwrite removes only our own files, and only after the new
run committed; one writer at a time; a killed run costs only what it had not receipted; no shard skipped.

Everything runs for real: the local filesystem, the S3 API server (moto in server mode), drivers as
separate processes on the tests' Ray cluster, SIGKILL and SIGSTOP.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import WORDS
from drivers import finish, kill, receipted_rows, holding, start, wait_until, write_config
from s3_server import S3Server

from jobs.run import main
from pipeline import read_output, read_output_dataset
from pipeline import schema as S
from pipeline.commit import CRASH_EXIT_CODE, HOST, Lease, OutputError, committed_output
from pipeline.config import load_config
from pipeline.index import open_output, search
from pipeline.run import plan, run_job
from pipeline.source import InputError


def write_shards(root: Path, shards: int, rows: int) -> list[str]:
    """``shards`` Parquet files of ``rows`` rows (doc_id, text); row 3 of each has no text (quarantined)."""
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for k in range(shards):
        texts = [" ".join(WORDS[(i + k) % 40 : (i + k) % 40 + 2 + i % 20]) for i in range(rows)]
        texts[3] = None
        doc_ids = [f"{k}-{i}" for i in range(rows)]
        pq.write_table(pa.table({"doc_id": doc_ids, "text": texts}), root / f"{k}.parquet")
        ids += doc_ids
    return sorted(ids)


def job(input_path: str, output_path: str, model: Path, task: str = "sequence-classification", **sections) -> dict:
    """A tiny job: parts of 5 rows, so a run publishes parts (and receipts) as it goes."""
    raw = {
        "input": {"path": input_path, "id_columns": ["doc_id"]},
        "model": {"path": str(model), "task": task},
        "output": {"path": output_path, "rows_per_file": 5},
        "tokenize": {"batch_size": 5},
        "inference": {"batch_size": 5},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def all_ids(output: str, storage=None) -> list[str]:
    """Every id the committed output holds, scored and quarantined, through the supported reader."""
    scored = read_output(output, storage, columns=["doc_id"])["doc_id"].to_pylist()
    return sorted(scored + read_output(output, storage, columns=["doc_id"], rejected=True)["doc_id"].to_pylist())


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(config: str, *args: str, capsys) -> tuple[int, str]:
    code = main(["--config", config, *args])
    out = capsys.readouterr()
    return code, out.out + out.err


# ---- where an output may go: refused before anything starts, and in --dry-run ---------------------------


LOCAL_CASES = {
    # case: (output, input, mode, message); paths relative to the test's directory, "~" is $HOME
    "output is the input": ("data/in", "data/in", "overwrite", "is the input"),
    "output inside the input": ("data/in/scores", "data/in", "overwrite", "is inside the input"),
    "output contains the input": ("data", "data/in", "overwrite", "contains the input"),
    "glob input, output under its prefix": ("data/in/scores", "data/in/*.parquet", "overwrite", "is inside the input"),
    "input a file in the output": ("data/in", "data/in/0.parquet", "overwrite", "contains the input"),
    "home directory": ("home", "data/in", "overwrite", "is the home directory"),
    "tilde": ("~", "data/in", "overwrite", "is the home directory"),
    "unrelated files": ("home/projects", "data/in", "overwrite", "not empty and holds no output of this pipeline"),
    "unrelated files, mode error": ("home/projects", "data/in", "error", "not empty and holds no output of this pipeline"),
    "filesystem root": ("/", "data/in", "overwrite", "is the filesystem root"),
    "dot-dot": ("data/../home", "data/in", "overwrite", "contains '..'"),
    "a file": ("data/notes.txt", "data/in", "overwrite", "notes.txt is not a writable directory"),
    "an older release's output": ("old/run", "data/in", "overwrite", "written by an older encoder-batch"),
    "an older release's nightly version": ("old/nightly", "data/in", "overwrite", "written by an older encoder-batch"),
}


@pytest.mark.parametrize("case", LOCAL_CASES)
def test_unsafe_local_outputs_are_refused_and_nothing_is_touched(
    ray_session, tiny_models, tmp_path, monkeypatch, capsys, case
):
    work = tmp_path / "work"
    home = work / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("private key")
    (home / "projects").mkdir()
    (home / "projects" / "thesis.tex").write_text("years of work")
    write_shards(work / "data" / "in", 2, 10)
    (work / "data" / "notes.txt").write_text("keep me")
    for old, record in [("run", S.MANIFEST), ("nightly", "_ledger.json")]:  # before the commit protocol
        (work / "old" / old).mkdir(parents=True)
        (work / "old" / old / record).write_text(json.dumps({"files": ["part-00000-ab12.parquet"]}))
        (work / "old" / old / "part-00000-ab12.parquet").write_text("rows")
    monkeypatch.setenv("HOME", str(home))
    output, input_path, mode, message = LOCAL_CASES[case]
    resolve = lambda p: p if p.startswith(("/", "~")) else str(work / p)  # noqa: E731
    raw = job(resolve(input_path), resolve(output), tiny_models["sequence-classification"], output={"mode": mode})
    config = write_config(tmp_path / "job.yaml", raw)
    before = snapshot(work)

    for args in (["--dry-run"], []):  # the plan, and a real run: both refuse before anything starts
        code, out = run_main(config, *args, capsys=capsys)
        assert code == 2 and message in out, out
        assert "Traceback" not in out
    assert snapshot(work) == before


S3_CASES = {
    "bucket root": ("s3://{bucket}", "bucket root"),
    "bucket root with a slash": ("s3://{bucket}/", "bucket root"),
    "output is the input": ("s3://{bucket}/data/in/", "is the input"),
    "output inside the input": ("s3://{bucket}/data/in/scores", "is inside the input"),
    "output contains the input": ("s3://{bucket}/data", "contains the input"),
    "another team's prefix": ("s3://{bucket}/team", "not empty and holds no output of this pipeline"),
    "dot-dot": ("s3://{bucket}/data/../team", "contains '..'"),
}


@pytest.mark.parametrize("case", S3_CASES)
def test_unsafe_s3_outputs_are_refused_and_nothing_is_touched(
    ray_session, tiny_models, s3_server: S3Server, s3_bucket: str, tmp_path, capsys, case
):
    client = s3_server.client()
    write_shards(tmp_path / "in", 2, 10)
    for shard in (tmp_path / "in").iterdir():
        client.upload_file(str(shard), s3_bucket, f"data/in/{shard.name}")
    client.put_object(Bucket=s3_bucket, Key="team/report.parquet", Body=b"another team's data")
    client.put_object(Bucket=s3_bucket, Key="data/in-archive/2025.parquet", Body=b"old")
    output, message = S3_CASES[case]
    raw = job(f"s3://{s3_bucket}/data/in", output.format(bucket=s3_bucket), tiny_models["sequence-classification"])
    raw["output"]["mode"] = "overwrite"
    raw["storage"] = {"endpoint_url": s3_server.endpoint_url}
    config = write_config(tmp_path / "job.yaml", raw)
    objects = lambda: {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])}  # noqa: E731
    before = objects()

    for args in (["--dry-run"], []):
        code, out = run_main(config, *args, capsys=capsys)
        assert code == 2 and message in out, out
    assert objects() == before


# ---- overwrite: only our files, only after the new run committed -----------------------------------------


def test_killed_overwrite_keeps_the_old_output_and_its_rerun_replaces_exactly_it(ray_session, tiny_models, tmp_path, capsys):
    ids = write_shards(tmp_path / "in", 4, 10)
    out = tmp_path / "out"
    raw = job(str(tmp_path / "in"), str(out), tiny_models["sequence-classification"])
    old = run_job(load_config(raw=raw))
    (out / "_confusion_matrix.png").write_text("a plot the user keeps here")  # not ours: never deleted

    raw["output"]["mode"] = "overwrite"
    config = write_config(tmp_path / "job.yaml", raw)
    code, log = finish(start("jobs.run", config, overrides=("faults.crash_at=moved",)))
    assert code == CRASH_EXIT_CODE, log
    # Killed mid-commit, its parts already at their final names: the old manifest still rules.
    assert committed_output(str(out)).manifest["run"] == old["run"]
    assert all_ids(str(out)) == ids
    assert len(set(p.name for p in out.glob("part-*.parquet")) - set(old["files"])) > 0  # unlisted new parts
    assert not (out / S.SUCCESS).exists()  # so a plain reader of the directory stops

    code, plan_text = run_main(config, "--dry-run", capsys=capsys)
    assert code == 0, plan_text
    for expected in (
        f"replaces run {old['run']} committed at",
        "deletes only the files its manifest lists and staging left by killed runs",
        "keeps up to 40 rows in",
        "is gone: a run now takes it over",  # the lease of the crashed driver
    ):
        assert expected in plan_text, plan_text
    new = run_job(load_config(raw=raw))
    assert (new["rows_resumed"], new["rows_scored"]) == (40, 0)  # every part was receipted: nothing scored twice
    assert new["superseded"] == sorted([*old["files"], *old["rejected_files"]])
    assert all_ids(str(out)) == ids
    plain = pq.read_table(out, columns=["doc_id"])["doc_id"].to_pylist()  # the directory itself holds the same rows
    assert sorted(plain) == sorted(read_output(str(out), columns=["doc_id"])["doc_id"].to_pylist())
    assert (out / S.SUCCESS).exists() and (out / "_confusion_matrix.png").exists()
    assert {p.name for p in out.glob("part-*.parquet")} == set(new["files"])
    assert not (out / S.STAGING).exists()
    assert Lease(str(out), None, "", 1).state() == "free"


def test_a_rerun_with_another_config_discards_the_killed_runs_parts(ray_session, tiny_models, tmp_path, capsys):
    ids = write_shards(tmp_path / "in", 2, 10)
    out = tmp_path / "out"
    raw = job(str(tmp_path / "in"), str(out), tiny_models["sequence-classification"])
    code, log = finish(start("jobs.run", write_config(tmp_path / "job.yaml", raw), overrides=("faults.crash_at=moved",)))
    assert code == CRASH_EXIT_CODE, log
    killed = {p.name for p in out.glob("part-*.parquet")}
    assert killed and not (out / S.MANIFEST).exists()

    manifest = run_job(load_config(raw=raw, overrides=["model.max_length=32"]))  # another config: nothing to resume
    assert "discarding the staged output of run" in capsys.readouterr().out
    assert (manifest["rows_resumed"], manifest["rows_scored"]) == (0, 20)
    assert {p.name for p in out.glob("part-*.parquet")} == set(manifest["files"]) and not killed & set(manifest["files"])
    assert all_ids(str(out)) == ids and not (out / S.STAGING).exists()


# ---- a killed run costs only what it had not receipted ---------------------------------------------------


def test_a_run_killed_midway_resumes_row_by_row_and_index_and_search_see_each_row_once(ray_session, tiny_models, tmp_path, capsys):
    # Shards of 60 rows, parts of 5-20: a shard spans several parts. Killed once half the rows are receipted:
    # the other half (12 model calls of 0.4 s) leaves room for the calls in flight at the kill (a model actor
    # queues several), which may still land parts, on a machine loaded enough to be slow to kill it.
    ids = write_shards(tmp_path / "in", 2, 60)
    out = tmp_path / "out"
    raw = job(str(tmp_path / "in"), str(out), tiny_models["embedding"], task="embedding")
    config = write_config(tmp_path / "job.yaml", raw)
    driver = start("jobs.run", config, overrides=("faults.delay_s=0.4",))
    wait_until(lambda: receipted_rows(out / S.STAGING) >= 60, driver)
    kill(driver)
    time.sleep(1)  # write tasks of the dead driver that were finishing
    receipted = receipted_rows(out / S.STAGING)
    assert 60 <= receipted < 120  # so at least one shard is half written
    assert not (out / S.MANIFEST).exists() and not (out / S.SUCCESS).exists()

    manifest = run_job(load_config(raw=raw))
    assert f"took over the lease of {out} from run " in capsys.readouterr().out  # at once: its process is gone
    assert manifest["rows_resumed"] >= receipted >= 60  # every receipted part kept (and any that landed late)
    assert manifest["rows_resumed"] + manifest["rows_scored"] == 120 and manifest["rows_scored"] <= 120 - receipted
    assert manifest["rows_out"] + manifest["rows_rejected"] == manifest["rows_in"] == 120
    assert all_ids(str(out)) == ids  # every row exactly once
    assert not (out / S.STAGING).exists() and (out / S.SUCCESS).exists()

    # jobs.index / jobs.search read exactly the committed parts: no document twice.
    assert open_output(str(out)).parts == sorted(manifest["files"])
    query = read_output(str(out), columns=[S.EMBEDDING])[S.EMBEDDING].to_numpy(zero_copy_only=False)[0]
    hits = search(str(out), query.reshape(1, -1), k=200, exact=True)["doc_id"].to_pylist()
    assert len(hits) == len(set(hits)) == manifest["rows_out"] == 118


def test_covered_rows_is_covered_for_many_rows():
    import numpy as np

    from pipeline.commit import covered, covered_rows

    ranges = [(0, 3), (5, 6), (10, 20)]
    rows = np.arange(-1, 25)
    assert covered_rows(ranges, rows).tolist() == [covered(ranges, int(r)) for r in rows]
    assert not covered_rows([], rows).any()


# ---- one writer at a time ----------------------------------------------------------------------------------


def test_a_second_driver_on_the_same_output_is_refused_naming_the_holder(ray_session, tiny_models, tmp_path, capsys):
    ids = write_shards(tmp_path / "in", 2, 10)
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", job(str(tmp_path / "in"), str(out), tiny_models["sequence-classification"]))

    with holding("jobs.run", config, held=lambda: any((out / S.LEASE).glob("*.json"))) as first:
        code, log = run_main(config, capsys=capsys)  # a second driver (this process) for the same output
        dry_code, plan_text = run_main(config, "--dry-run", capsys=capsys)
    assert code == 2, log
    assert f"{out} is being written by run " in log and f"pid {first.pid} on {HOST}" in log, log
    assert dry_code == 0 and "lease held by run " in plan_text and "a run now is refused" in plan_text, plan_text
    code, log = finish(first)
    assert code == 0, log
    assert all_ids(str(out)) == ids  # one run's rows, once
    assert Lease(str(out), None, "", 1).state() == "free"


def test_a_driver_paused_past_its_lease_ttl_loses_the_lease_and_does_not_commit(ray_session, tiny_models, tmp_path):
    write_shards(tmp_path / "in", 2, 10)
    out, go = tmp_path / "out", tmp_path / "go"
    raw = job(str(tmp_path / "in"), str(out), tiny_models["sequence-classification"], execution={"lease_ttl_s": 3})
    config = write_config(tmp_path / "job.yaml", raw)
    with holding("jobs.run", config, held=lambda: any((out / S.LEASE).glob("*.json"))) as paused:
        time.sleep(3.5)  # its lease is stale now, though its process lives
        [taker] = lease_processes(str(out), "", ["taker"], 60, go)
        wait_until(lambda: taker.stdout.readline().startswith("took over"), taker, timeout=60)
    code, log = finish(paused)  # it finishes scoring, then finds the lease gone right before committing
    assert code == 2 and "lost the lease" in log and "to run taker" in log and "it does not commit" in log, log
    assert not (out / S.MANIFEST).exists() and not (out / S.SUCCESS).exists()
    go.write_text("")
    assert finish(taker, timeout=60)[0] == 0


def test_on_s3_one_driver_writes_at_a_time_and_overwrite_replaces_only_its_own_files(
    ray_session, tiny_models, s3_server: S3Server, s3_bucket: str, tmp_path, capsys
):
    client = s3_server.client()
    ids = write_shards(tmp_path / "in", 2, 10)
    for shard in (tmp_path / "in").iterdir():
        client.upload_file(str(shard), s3_bucket, f"data/in/{shard.name}")
    out = f"s3://{s3_bucket}/data/in-scores"  # shares a name prefix with the input, not a directory
    client.put_object(Bucket=s3_bucket, Key="data/in-scores-old/keep.parquet", Body=b"an older output")
    storage_section = {"endpoint_url": s3_server.endpoint_url}
    raw = job(f"s3://{s3_bucket}/data/in", out, tiny_models["sequence-classification"], storage=storage_section)
    storage = load_config(raw=raw).storage
    config = write_config(tmp_path / "job.yaml", raw)
    lease = lambda: client.list_objects_v2(Bucket=s3_bucket, Prefix=f"data/in-scores/{S.LEASE}/").get("Contents")  # noqa: E731

    with holding("jobs.run", config, held=lambda: bool(lease())) as first:
        code, log = run_main(config, capsys=capsys)  # a second driver (this process) for the same output
    assert code == 2, log
    assert f"{out} is being written by run " in log and f"pid {first.pid} on {HOST}" in log, log
    code, log = finish(first)
    assert code == 0, log
    committed = committed_output(out, storage).manifest
    assert all_ids(out, storage) == ids
    client.put_object(Bucket=s3_bucket, Key="data/in-scores/_notes.md", Body=b"the user's own file")

    with pytest.raises(OutputError, match="already holds run .* set output.mode: overwrite"):
        plan(load_config(raw=raw))
    raw["output"]["mode"] = "overwrite"
    second = run_job(load_config(raw=raw))

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    parts = {k[len("data/in-scores/") :] for k in keys if k.startswith("data/in-scores/") and "part-" in k}
    assert parts == {*second["files"], *second["rejected_files"]}
    assert second["superseded"] == sorted([*committed["files"], *committed["rejected_files"]])
    assert not set(second["superseded"]) & parts
    assert {"data/in-scores/_notes.md", "data/in-scores-old/keep.parquet", "data/in/0.parquet", "data/in/1.parquet"} <= keys
    assert all_ids(out, storage) == ids
    assert read_output_dataset(out, storage).count() == second["rows_out"] == 18
    assert Lease(out, storage, "", 1).state() == "free"


LEASE_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pipeline.commit import Lease, LeaseHeld, LeaseLost
    from pipeline.config import StorageConfig

    # Once the file `start` exists, take the lease; once `go` exists, check it still holds it and release it.
    location, endpoint, run, ttl, start, go = sys.argv[1:7]
    lease = Lease(location, StorageConfig(endpoint_url=endpoint or None), run, float(ttl))
    print("ready", flush=True)
    while start and not os.path.exists(start):
        time.sleep(0.005)
    try:
        lease.acquire(print)
    except LeaseHeld as e:
        print("refused:", e, flush=True)
        sys.exit(2)
    print("holds", flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
    try:
        lease.check()
    except LeaseLost as e:
        print("lost:", e, flush=True)
        sys.exit(3)
    lease.release()
    print("released", flush=True)
    """
)


def lease_processes(
    location: str, endpoint: str, runs: list[str], ttl: float, go: Path, start: Path | str = ""
) -> list[subprocess.Popen]:
    """Processes running LEASE_SCRIPT, one per run id, returned once all are ready to take the lease."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", LEASE_SCRIPT, location, endpoint, run, str(ttl), str(start), str(go)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for run in runs
    ]  # fmt: skip
    for process in processes:
        wait_until(lambda: process.stdout.readline().startswith("ready"), process, timeout=60)
    return processes


def lease_location(storage: str, tmp_path: Path, request) -> tuple[str, str]:
    if storage == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/out", request.getfixturevalue("s3_server").endpoint_url
    return str(tmp_path / "out"), ""


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_drivers_racing_for_a_stale_lease_have_exactly_one_winner(tmp_path, request, storage):
    location, endpoint = lease_location(storage, tmp_path, request)
    go = tmp_path / "go"
    [dead] = lease_processes(location, endpoint, ["dead-run"], 60, go)  # takes the lease, is killed holding it
    wait_until(lambda: dead.stdout.readline().startswith("holds"), dead, timeout=30)
    dead.kill()
    dead.wait()
    start = tmp_path / "start"
    racers = lease_processes(location, endpoint, [f"racer-{i}" for i in range(4)], 60, go, start)
    start.write_text("")  # all of them see the same stale lease and try at once
    deadline = time.time() + 60
    while sum(racer.poll() is not None for racer in racers) < 3 and time.time() < deadline:
        time.sleep(0.1)  # the losers are refused while the winner holds the lease
    go.write_text("")
    results = [finish(racer, timeout=60) for racer in racers]
    assert sorted(code for code, _ in results) == [0, 2, 2, 2], results
    [winner] = [out for code, out in results if code == 0]
    assert f"took over the lease of {location} from run dead-run" in winner and "is gone" in winner
    assert all("is being written by run racer-" in out for code, out in results if code == 2), results


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_stopped_holder_loses_its_lease_after_the_ttl_and_cannot_commit(tmp_path, request, storage):
    location, endpoint = lease_location(storage, tmp_path, request)
    go, ttl = tmp_path / "go", 3
    [holder] = lease_processes(location, endpoint, ["paused-run"], ttl, go)
    wait_until(lambda: holder.stdout.readline().startswith("holds"), holder, timeout=30)
    [early] = lease_processes(location, endpoint, ["early"], 60, go, tmp_path / "early")
    [taker] = lease_processes(location, endpoint, ["taker"], 60, go, tmp_path / "taker")
    os.kill(holder.pid, signal.SIGSTOP)  # alive on this host, but no longer renewing
    stopped_at = time.time()
    try:
        (tmp_path / "early").write_text("")
        code, out = finish(early, timeout=30)
        assert code == 2 and "is being written by run paused-run" in out, out  # within its ttl: still held
        time.sleep(max(0.0, stopped_at + ttl + 0.5 - time.time()))
        (tmp_path / "taker").write_text("")
        wait_until(lambda: taker.stdout.readline().startswith("took over"), taker, timeout=30)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    go.write_text("")
    code, out = finish(holder, timeout=30)
    assert code == 3 and "paused-run lost the lease" in out and "to run taker" in out, out
    code, out = finish(taker, timeout=30)
    assert code == 0 and "released" in out, out


# ---- no shard silently skipped ------------------------------------------------------------------------------


def test_mixed_shard_formats_are_all_scored_and_other_files_are_listed_as_skipped(
    ray_session, tiny_models, tmp_path, capsys
):
    root = tmp_path / "day"
    write_shards(root, 1, 10)  # 0.parquet
    (root / "1.jsonl").write_text("".join(json.dumps({"doc_id": f"j-{i}", "text": "the match"}) + "\n" for i in range(7)))
    with gzip.open(root / "2.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"doc_id": f"g-{i}", "text": "the band"}) + "\n" for i in range(5)))
    (root / "README.md").write_text("how this data was made")
    (root / "labels.csv").write_text("doc_id,label\n")
    raw = job(str(root), str(tmp_path / "out"), tiny_models["sequence-classification"])
    config = write_config(tmp_path / "job.yaml", raw)

    code, out = run_main(config, "--dry-run", capsys=capsys)
    assert code == 0 and "3 file(s): 2 jsonl, 1 parquet" in out, out
    assert "skipped, not shards: ['README.md', 'labels.csv']" in out, out
    manifest = run_job(load_config(raw=raw))
    assert manifest["rows_in"] == 22 and manifest["files_skipped"] == ["README.md", "labels.csv"]
    assert len(all_ids(str(tmp_path / "out"))) == 22

    with pytest.raises(InputError, match=r"input.format is parquet, but 2 file\(s\) .* \['1.jsonl', '2.jsonl.gz'\]"):
        plan(load_config(raw=raw, overrides=["input.format=parquet", "output.path=" + str(tmp_path / "out2")]))
