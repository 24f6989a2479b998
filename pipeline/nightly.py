"""Exactly-once, resumable scoring of one date partition, committed with ``pipeline.commit``.

Layout under ``output.path``::

    dt=2026-11-20/
      _CURRENT                         # name of the version readers use
      _lease/                          # one driver per date at a time
      version=<model>-<config>/        # a table of pipeline.commit; a new model revision or config => a new version
        _manifest.json                 # the commit record and the shard ledger (below)
        _SUCCESS, part-*.parquet, _rejected/, _staging/<run>/

The manifest of a version lists its files like any output, and adds ``shards`` (input shard ->
size, ETag/mtime, the run that committed it) and ``runs`` (run -> its statistics and files);
``rows_in``/``rows_out``/``rows_rejected``/``rejected_by_reason`` (and, for chunk rows, ``documents_out`` and
``chunks_out``) are totals over the runs.

A run takes the date's lease, finishes a commit a killed run left half done, scores only the shards
the ledger does not list (keeping the rows a killed run of the same version receipted, see
``pipeline.commit``), and commits them added to the version: no shard is in two runs, no row in two
parts. A shard that changes after it was scored is refused. Later runs into a version apply the
calibration its runs recorded, if the task has one (``Task.calibrated_like``: int8 ranges).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import replace

import fsspec
import ray

from pipeline.commit import Receipt, Table, Writer, inspect_output
from pipeline.config import ConfigError, JobConfig
from pipeline.run import Plan, execute, plan
from pipeline.storage import join

TOTALS = ("rows_in", "rows_out", "rows_rejected")
CHUNKED = ("documents_out", "chunks_out")  # in the runs of a chunking task (``Task.chunked``)
SHARED = ("version", "model", "config", "pools")  # the same for every run of a version, kept once


def parse_date(value: str) -> str:
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ConfigError(f"--date expects YYYY-MM-DD, got {value!r}") from None


def date_range(start: str, end: str) -> list[str]:
    first, last = dt.date.fromisoformat(parse_date(start)), dt.date.fromisoformat(parse_date(end))
    if last < first:
        raise ConfigError(f"--backfill {start} {end}: the end is before the start")
    return [(first + dt.timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


def shard_signature(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    """What identifies a shard's content: size plus ETag (object stores) or mtime (disks)."""
    info = fs.info(path)
    return {"size": info["size"], "etag": info.get("ETag") or info.get("etag"), "mtime": info.get("mtime")}


def locations(cfg: JobConfig, job: Plan, date: str) -> tuple[str, str, str]:
    """(the date directory, the version name, the version directory) of ``date`` for this plan."""
    day = join(cfg.output.path, f"dt={date}")
    version = f"version={job.model.fingerprint[:12]}-{cfg.fingerprint()}"
    return day, version, join(day, version)


def pending_shards(job: Plan, ledger: dict, date: str, version: str) -> tuple[dict[str, tuple[str, dict]], int]:
    """The input shards ``ledger`` does not list (relative name -> (path, signature)), and how many it does.

    Raises ``ConfigError`` for a listed shard whose content changed.
    """
    shards = {job.shards.relative(f): (f, shard_signature(job.shards.fs, f)) for f in job.shards.files}
    changed = [s for s, (_, sig) in shards.items() if s in ledger and {k: ledger[s][k] for k in sig} != sig]
    if changed:
        raise ConfigError(
            f"dt={date}: input shard(s) {changed[:3]} changed after they were scored in {version}. A scored day's "
            "inputs must not change; write new shards instead, or delete the version directory to rescore it"
        )
    return {s: v for s, v in shards.items() if s not in ledger}, len(shards)


def with_run(previous: dict | None, run_id: str, run: dict, receipts: list[Receipt], shards: dict[str, dict]) -> dict:
    """The version's manifest once ``run`` commits: its ledger and runs extended, totals over all runs."""
    ledger = {**(previous or {}).get("shards", {}), **{s: {**sig, "run": run_id} for s, sig in shards.items()}}
    entry = {k: v for k, v in run.items() if k not in SHARED}
    entry["files"] = sorted(f for r in receipts for f in r.files)
    runs = {**(previous or {}).get("runs", {}), run_id: entry}
    reasons = sum((Counter(r["rejected_by_reason"]) for r in runs.values()), Counter())
    totals = {k: sum(r[k] for r in runs.values()) for k in (*TOTALS, *CHUNKED) if k in run}
    return {**{k: run[k] for k in SHARED}, **totals, "rejected_by_reason": dict(reasons), "shards": ledger, "runs": runs}


def score_date(cfg: JobConfig, date: str, log=print) -> dict:
    """Score the shards of ``date`` that its version's ledger does not list yet; see the module docstring."""
    if not ray.is_initialized():
        ray.init()  # the plan sizes pools for the cluster the job runs on, not for this driver's machine
    job = plan(cfg, table=False)
    day, version, uri = locations(cfg, job, date)
    inspect_output(uri, cfg.storage, identity=job.identity(), mode=None, lease_uri=day)  # refuses foreign content
    with Writer(uri, cfg, lease_uri=day, current=True, log=log) as writer:
        if writer.manifest:  # every run into a version applies the same calibration (int8 ranges)
            job = replace(job, task=job.task.calibrated_like(writer.manifest["model"]))
        ledger = writer.manifest["shards"] if writer.manifest else {}
        pending, total = pending_shards(job, ledger, date, version)
        if not pending:
            log(f"dt={date}: already complete ({len(ledger)} shards, {version}); nothing to do")
            return {"date": date, "version": version, "status": "complete", "new_shards": 0}
        log(f"dt={date}: scoring {len(pending)} new shard(s) of {total} as run {writer.run_id} ({version})")
        resume = writer.resume(job.identity(), {s: sig["size"] for s, (_, sig) in pending.items()}, keep=job.task.group_by is None)
        shards = replace(job.shards, files=[path for path, _ in pending.values()])
        run, receipts = execute(job, shards, writer, resume)
        # A shard quarantined as unreadable is not scored: it stays pending, and the next run tries it again.
        unreadable = sorted(entry["file"] for entry in run["shards_unreadable"])
        signatures = {s: sig for s, (_, sig) in pending.items() if s not in unreadable}
        manifest = writer.commit(with_run(writer.manifest, writer.run_id, run, receipts, signatures), receipts, replace=False)
    log(
        f"dt={date}: committed run {writer.run_id}: {run['rows_out']} rows out"
        + (f" ({run['chunks_out']} chunks)" if "chunks_out" in run else "")
        + f", {run['rows_rejected']} rejected "
        f"({run['rows_resumed']} kept from a killed run, {run['rows_scored']} scored)"
    )
    if unreadable:
        log(f"dt={date}: PARTIAL: {len(unreadable)} unreadable shard(s) quarantined and left pending: {unreadable[:5]}")
    return {
        "date": date,
        "version": version,
        "status": "partial" if unreadable else "scored",
        "new_shards": len(pending),
        "manifest": manifest,
    }


def describe_date(cfg: JobConfig, date: str) -> str:
    """What ``score_date`` would do for ``date``, for ``--dry-run``: the plan, the version, shards, lease."""
    job = plan(cfg, table=False)
    day, version, uri = locations(cfg, job, date)
    lines = inspect_output(uri, cfg.storage, identity=job.identity(), mode=None, lease_uri=day)
    manifest = Table(uri, cfg.storage).manifest()
    pending, total = pending_shards(job, manifest["shards"] if manifest else {}, date, version)
    return "\n".join(
        [
            job.describe(),
            f"dt={date}  {uri}: {len(pending)} of {total} shard(s) to score",
            *(f"         {line}" for line in lines),
        ]
    )
