"""Exactly-once, resumable scoring of one date partition, driven by a run ledger.

Layout under ``output.path``::

    dt=2026-11-20/
      _CURRENT                         # name of the version readers should use
      version=<model>-<config>/        # a new model revision or config => a new version
        _ledger.json                   # input shard -> run, run -> files; the commit record
        _SUCCESS                       # present only while every ledger run is published
        part-*.parquet, _rejected/, _manifests/<run>.json
        _staging/<run>/                # a run's output until it is published

Protocol, each step safe to kill at any point:
1. Roll forward: publish runs the ledger commits but did not finish moving; delete
   staging directories the ledger does not know (runs killed before committing).
2. Score only the shards the ledger does not list, into ``_staging/<run>/``, with the calibration
   of the version's first run if the task has one (``Task.calibrated_like``: int8 ranges).
3. Commit: remove ``_SUCCESS``, then write the ledger naming the run, its files and its
   shards (one atomic write). Before this point a kill leaves the shards pending; after
   it the run is kept and step 1 finishes it. No shard is ever scored into two runs.
4. Publish: move the run's files into the version directory, mark it published, write
   ``_SUCCESS`` and ``_CURRENT``.

Readers only trust a version directory that holds ``_SUCCESS``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, replace

import fsspec
import ray
from fsspec.implementations.local import LocalFileSystem

from pipeline import schema as S
from pipeline.config import ConfigError, JobConfig
from pipeline.run import plan, run_job
from pipeline.storage import filesystem, join, relative_to

LEDGER = "_ledger.json"
STAGING = "_staging"
CURRENT = "_CURRENT"


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


@dataclass
class Partition:
    """One version directory of one date, with its ledger."""

    uri: str
    fs: fsspec.AbstractFileSystem
    root: str
    ledger: dict

    @classmethod
    def open(cls, uri: str, cfg: JobConfig) -> Partition:
        fs, root = filesystem(uri, cfg.storage)
        path = join(root, LEDGER)
        ledger = json.loads(fs.cat_file(path)) if fs.exists(path) else {"shards": {}, "runs": {}}
        return cls(uri, fs, root, ledger)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def save_ledger(self) -> None:
        """Atomic: a rename on local disks, a single PUT (atomic per object) on S3."""
        data = json.dumps(self.ledger, indent=1, sort_keys=True)
        if isinstance(self.fs, LocalFileSystem):
            tmp = self.path(f"{LEDGER}.{uuid.uuid4().hex}.tmp")
            self.fs.pipe_file(tmp, data.encode())
            self.fs.mv(tmp, self.path(LEDGER))
        else:
            self.fs.pipe_file(self.path(LEDGER), data.encode())

    def roll_forward(self) -> list[str]:
        """Finish publishing committed runs; drop staging left by uncommitted ones. Returns finished runs."""
        finished = []
        for run_id, run in sorted(self.ledger["runs"].items()):
            if not run["published"]:
                self._publish(run_id, run)
                finished.append(run_id)
        staging = self.path(STAGING)
        if self.fs.exists(staging):
            for entry in self.fs.ls(staging, detail=False):
                if posixpath.basename(entry.rstrip("/")) not in self.ledger["runs"]:
                    self.fs.rm(entry, recursive=True)
        if self.ledger["runs"] and not self.fs.exists(self.path(S.SUCCESS)):
            self._mark_complete()
        return finished

    def commit(self, run_id: str, manifest: dict, shards: dict[str, dict]) -> None:
        staged = self.path(STAGING, run_id)
        files = sorted(
            relative_to(f, staged)
            for f in self.fs.find(staged)
            if posixpath.basename(f) not in (S.SUCCESS,)
        )
        if self.fs.exists(self.path(S.SUCCESS)):
            self.fs.rm(self.path(S.SUCCESS))
        self.ledger["runs"][run_id] = {
            "files": files,
            "published": False,
            "rows_in": manifest["rows_in"],
            "rows_out": manifest["rows_out"],
            "rows_rejected": manifest["rows_rejected"],
            "model_revision": manifest["model"]["model_revision"],
            "config_hash": manifest["model"]["config_hash"],
        }
        for shard, signature in shards.items():
            self.ledger["shards"][shard] = {**signature, "run": run_id}
        self.save_ledger()

    def publish(self, run_id: str) -> None:
        self._publish(run_id, self.ledger["runs"][run_id])
        self._mark_complete()

    def _publish(self, run_id: str, run: dict) -> None:
        staged = self.path(STAGING, run_id)
        for name in run["files"]:
            target = self.path(S.MANIFEST_DIR, f"{run_id}.json") if name == S.MANIFEST else self.path(name)
            if self.fs.exists(join(staged, name)):  # idempotent: a killed publish may have moved some
                self.fs.mv(join(staged, name), target)
        run["published"] = True
        self.save_ledger()
        if self.fs.exists(staged):
            self.fs.rm(staged, recursive=True)

    def _mark_complete(self) -> None:
        self.fs.pipe_file(self.path(S.SUCCESS), b"")
        self.fs.pipe_file(join(posixpath.dirname(self.root), CURRENT), posixpath.basename(self.root).encode())


def shard_signature(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    """What identifies a shard's content: size plus ETag (object stores) or mtime (disks)."""
    info = fs.info(path)
    return {"size": info["size"], "etag": info.get("ETag") or info.get("etag"), "mtime": info.get("mtime")}


def score_date(cfg: JobConfig, date: str, log=print) -> dict:
    """Score the shards of ``date`` that its ledger does not list yet; see the module docstring."""
    if not ray.is_initialized():
        ray.init()  # the plan sizes pools for the cluster the job runs on, not for this driver's machine
    job = plan(cfg)
    version = f"version={job.model.fingerprint[:12]}-{cfg.fingerprint()}"
    partition = Partition.open(join(cfg.output.path, f"dt={date}", version), cfg)
    recovered = partition.roll_forward()
    if recovered:
        log(f"dt={date}: finished publishing interrupted run(s) {recovered}")
    first = min(partition.ledger["runs"], default=None)  # run ids start with their time
    if first is not None:  # later runs into this version apply its first run's calibration (int8 ranges)
        with partition.fs.open(partition.path(S.MANIFEST_DIR, f"{first}.json")) as f:
            job = replace(job, task=job.task.calibrated_like(json.load(f)["model"]))

    shards = {job.shards.relative(f): (f, shard_signature(job.shards.fs, f)) for f in job.shards.files}
    done = partition.ledger["shards"]
    changed = [s for s, (_, sig) in shards.items() if s in done and {k: done[s][k] for k in sig} != sig]
    if changed:
        raise ConfigError(
            f"dt={date}: input shard(s) {changed[:3]} changed after they were scored in {version}. A scored day's "
            "inputs must not change; write new shards instead, or delete the version directory to rescore it"
        )
    pending = {s: v for s, v in shards.items() if s not in done}
    if not pending:
        log(f"dt={date}: already complete ({len(done)} shards, {version}); nothing to do")
        return {"date": date, "version": version, "status": "complete", "new_shards": 0}

    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    log(f"dt={date}: scoring {len(pending)} new shard(s) of {len(shards)} as run {run_id} ({version})")
    staged_cfg = cfg.model_copy(
        update={"output": cfg.output.model_copy(update={"path": join(partition.uri, STAGING, run_id), "mode": "overwrite"})}
    )
    manifest = run_job(staged_cfg, files=[path for path, _ in pending.values()], job=job)
    # A shard quarantined as unreadable is not scored: it stays pending, and the next run tries it again.
    unreadable = sorted(entry["file"] for entry in manifest["shards_unreadable"])
    partition.commit(run_id, manifest, {s: sig for s, (_, sig) in pending.items() if s not in unreadable})
    if cfg.faults.crash_after_commit:
        os._exit(17)
    partition.publish(run_id)
    log(f"dt={date}: published run {run_id}: {manifest['rows_out']} rows out, {manifest['rows_rejected']} rejected")
    if unreadable:
        log(f"dt={date}: PARTIAL: {len(unreadable)} unreadable shard(s) quarantined and left pending: {unreadable[:5]}")
    return {"date": date, "version": version, "status": "scored", "new_shards": len(pending), "manifest": manifest}
