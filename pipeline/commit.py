"""The one commit protocol of every output: a run stages its parts, a manifest commits them, a lease keeps
other drivers out, receipts let a killed run be resumed. ``jobs.run`` and ``jobs.nightly`` both use it.

A *table* is one output directory (a local directory or an ``s3://`` prefix): ``output.path`` for
``jobs.run``, ``<output.path>/dt=<date>/version=<model>-<config>/`` for ``jobs.nightly``::

    _manifest.json                 the commit record: exactly the output's files, with their row counts
    _SUCCESS                       written last; while it exists the directory holds exactly those files
    part-<run>-<task>-<id>.parquet                 scored rows
    _rejected/part-<run>-<task>-<id>.parquet       quarantined rows
    _staging/<run>/                where a run writes while it runs:
        _run.json                  what it computes (model revision, config hash, input path and sizes)
        part-*.parquet, _rejected/part-*.parquet
        _receipts/<part>.json      a write task's completion marker (see Resuming)
    _lease/<generation>.json       the one driver allowed to write (jobs.nightly: under dt=<date>/)

**Readers** read the files the manifest lists and nothing else: :func:`read_output` (a pyarrow Table),
:func:`read_output_dataset` (a Ray Dataset) or :func:`committed_output` (the file list). They accept a
``jobs.run`` output directory, a nightly ``version=`` directory, or a nightly ``dt=<date>`` directory,
which they read through its ``_CURRENT``. Because of the ``_SUCCESS`` invariant, a plain
``pyarrow.parquet.read_table(dir)`` (which skips ``_`` names) sees the same rows once ``_SUCCESS`` is there.

**Commit**, by the driver holding the lease; every step is safe to kill:

1. Check the lease is still held; remove ``_SUCCESS``.
2. Move the staged files of every kept receipt to their final names (a move is idempotent: a file
   already at its final name is left there).
3. Check the lease again and write ``_manifest.json`` (local: a renamed temporary file; S3: one PUT).
   This is the commit point. ``jobs.run`` lists only the new files (it replaces the output) and
   records the old ones as ``superseded``; ``jobs.nightly`` adds the new files to the listed ones.
4. Delete the ``superseded`` files, the files of staged runs that the manifest does not list, and
   ``_staging/``.
5. Write ``_SUCCESS`` (nightly: then ``dt=<date>/_CURRENT``).

A kill before 3 leaves the previous manifest in force (its files are untouched; parts moved in 2 are
unlisted, so manifest readers never see them, and ``_SUCCESS`` is absent, so plain readers stop). The
next run resumes the killed run's receipts, wherever their files are. A kill after 3 leaves the new
manifest in force; the next driver that takes the lease repeats 4 and 5 for it (it knows what to delete
from the manifest's ``staged_runs`` and ``superseded``) before anything else.

**What overwrite deletes.** Only files this pipeline wrote: those the previous manifest lists, after
the new manifest replaced it, and staging that killed runs left (``_staging/``, plus parts their
receipts name that a killed commit had moved). Nothing else in the directory is touched: not
``_index/``, not files a user put there. :func:`check_location` and :func:`inspect_output` refuse,
before anything starts and in ``--dry-run``: a path with ``..``; the filesystem root, the home
directory, a bucket root; an output equal to, inside or containing the input (normalised paths, a
glob by its literal prefix); a file; a non-empty directory that holds neither a manifest nor the
staging or lease of a run of ours (in both modes: ``error`` refuses such a directory as well as one
holding a committed run; ``overwrite`` refuses only the former).

**Lease.** ``_lease/`` holds numbered generations; the highest one is the holder. A driver takes
the lease by creating the next generation with create-if-absent (local: ``link``, which fails if the
name exists; S3: ``PutObject`` with ``If-None-Match: *``), so of two drivers that see the same free
or stale lease exactly one wins. The record holds host, pid, run id, start time and the last renewal;
a heartbeat thread renews it every ``execution.lease_ttl_s / 4``. A lease is free once released, when
its renewal is older than its TTL, or at once when its holder ran on this host and its process is
gone. A driver that finds it held is refused at once, naming the holder. The holder checks it still
holds the lease right before the commit point and aborts with :class:`LeaseLost` if it does not (it
was paused past its TTL and another driver took over). Clocks of the hosts must agree to well within
the TTL (NTP does).

**Resuming.** A write task, after closing its part files, writes a receipt ``_receipts/<part>.json``:
the part's files, their row counts, the sink's statistics, and the input rows the part holds as row
ranges per shard (``_source_file`` / ``_source_row``, good and rejected rows alike). A part without a
receipt is garbage. A rerun on the same table whose model revision, config hash and input path match
keeps every receipted part of the killed run whose shards have not changed size, skips exactly those
input rows (row by row: a half-written shard is not duplicated) and commits old and new parts together,
recording ``rows_resumed`` and ``rows_scored`` in the manifest. A staged run that does not match is
discarded with a message. Receipts kept are disjoint (checked again at commit); a retried write task's
duplicate receipt is dropped, and this run's own parts come from the write results Ray Data returns,
never from a listing.

Why not Ray's ``ray.data.checkpoint.CheckpointConfig`` (2.60). It checkpoints the ids of written
rows and filters them out of the next read, which is the right idea, but for this pipeline:
(1) our sink is a custom ``Datasink``, not a ``_FileDatasink``; for those Ray writes the checkpoint
after the data ("at-least-once", it warns), so a kill between the two duplicates rows; (2) it keys on
one unique id column, while our ids may be several columns, are generated, or repeat (a repeated id
is quarantined, not dropped), so a synthetic row key would be needed anyway; (3) our rejected rows
go to a second file per task, which its prefix-matched clean-up of pending files does not know;
(4) it has no notion of the model or config that produced a checkpoint, so a rerun with another
model would silently skip rows scored by the old one; (5) it deletes its checkpoint when Ray's write
finishes, before our manifest commits, so a kill between the two loses the resume state; and (6) its
filter runs as an extra actor pool (up to 10 actors reserving 1 GiB each), which our CPU sizing
would have to leave room for. Receipts give the same row-level skip within our own commit protocol.
"""

from __future__ import annotations

import bisect
import glob as globlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import schema as S
from pipeline.config import ConfigError, JobConfig, StorageConfig
from pipeline.storage import (
    ACCESS_PROBE_PREFIX,
    arrow_filesystem,
    create_exclusive,
    filesystem,
    join,
    literal_prefix,
    write_atomic,
)

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

PROTOCOL = 1  # manifests carry it; a manifest without it comes from an older layout
LEGACY_LEDGER = "_ledger.json"  # nightly versions of older releases: their commit record
HOST = socket.gethostname()
CRASH_EXIT_CODE = 17  # faults.crash_at
Log = Callable[[str], None]
Ranges = list[tuple[int, int]]  # sorted, disjoint, half-open [start, end) row ranges


class OutputError(ConfigError):
    """An output location that cannot be written safely; the message names the reason and the fix."""


class LeaseHeld(OutputError):
    """Another driver is writing this output (or nightly date) now."""


class LeaseLost(OutputError):
    """This driver's lease was taken over while it ran, so it must not commit."""


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(timespec="seconds")


# ---- where an output may go ----------------------------------------------------------------------------


def check_location(output: str, input_path: str) -> None:
    """Refuse an ``output.path`` no run should write (see "What overwrite deletes" above)."""
    if ".." in output.split("/"):
        raise OutputError(f"output.path {output!r} contains '..': write the path without '..' segments")
    scheme, out = _normalized(output)
    if scheme == "s3" and "/" not in out:
        raise OutputError(f"output.path {output} is a bucket root: write under a prefix, e.g. s3://{out}/scores/")
    if scheme == "file" and out == "/":
        raise OutputError("output.path is the filesystem root: choose a directory of its own")
    if scheme == "file" and out == _normalized("~")[1]:
        raise OutputError(f"output.path {output} is the home directory: choose a directory of its own")
    in_scheme, prefix = _normalized(literal_prefix(input_path), keep_slash=True)
    if in_scheme != scheme:
        return
    if globlib.has_magic(input_path):  # the pattern may match anything that starts with its literal prefix
        inside = (out + "/").startswith(prefix)
    else:
        prefix = prefix.rstrip("/") or "/"
        inside = out == prefix or out.startswith(prefix.rstrip("/") + "/")
    if inside:
        where = "is the input" if out == prefix else "is inside the input"
        raise OutputError(f"output.path {output} {where} ({input_path}): choose a location outside the input")
    if prefix.startswith(out + "/"):
        raise OutputError(f"output.path {output} contains the input ({input_path}): choose a location outside the input")


def _normalized(path: str, keep_slash: bool = False) -> tuple[str, str]:
    """``(scheme, path)`` for comparing locations: ``bucket/key`` on S3; an absolute, symlink-free local path.

    A trailing slash is dropped unless ``keep_slash`` (a glob's literal prefix ends where it ends).
    """
    if path.startswith("s3://"):
        key = path[len("s3://") :]
        return "s3", key if keep_slash else key.rstrip("/")
    local = path[len("file://") :] if path.startswith("file://") else path
    resolved = os.path.realpath(os.path.expanduser(local))
    return "file", resolved + "/" if keep_slash and local.endswith("/") and resolved != "/" else resolved


# ---- receipts: a write task's completion marker --------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    """What one write task wrote: its part, the files' row counts, its stats and the input rows behind it."""

    run: str
    part: str  # part-<run>-<task>-<id>.parquet
    data_rows: int  # rows in <part>; 0: no such file
    rejected_rows: int  # rows in _rejected/<part>; 0: no such file
    rows: dict[str, Ranges]  # input shard (relative name) -> the rows of it this part holds, good and rejected
    stats: dict[str, Any]  # the sink's WriteStats of this part, as JSON

    @property
    def files(self) -> dict[str, int]:
        """The part's files, relative to the table root, and their rows."""
        files = {self.part: self.data_rows} if self.data_rows else {}
        if self.rejected_rows:
            files[join(S.REJECTED_DIR, self.part)] = self.rejected_rows
        return files

    @property
    def input_rows(self) -> int:
        """Input rows behind the part: its data and rejected rows, unless a row wrote several (chunks)."""
        return sum(end - start for ranges in self.rows.values() for start, end in ranges)

    def write(self, fs: fsspec.AbstractFileSystem, staging_root: str) -> None:
        """Write the receipt into its run's staging directory, in one atomic step: last thing a write task does."""
        write_atomic(fs, join(staging_root, S.RECEIPTS, f"{self.part}.json"), json.dumps(asdict(self)).encode())

    @classmethod
    def parse(cls, data: bytes) -> Receipt:
        body = json.loads(data)
        body["rows"] = {shard: [tuple(r) for r in ranges] for shard, ranges in body["rows"].items()}
        return cls(**body)


def to_ranges(rows: np.ndarray) -> Ranges:
    """Row numbers, in any order, as ranges [start, end)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, ends = rows[np.r_[0, breaks]], rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return list(zip(starts.tolist(), ends.tolist()))


def merge_ranges(a: Ranges, b: Ranges) -> Ranges:
    merged: Ranges = []
    for start, end in sorted([*a, *b]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlaps(a: Ranges, b: Ranges) -> bool:
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][0] < b[j][1] and b[j][0] < a[i][1]:
            return True
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return False


def covered(ranges: Ranges, row: int) -> bool:
    """Whether ``row`` falls in ``ranges``."""
    i = bisect.bisect_right(ranges, (row, float("inf"))) - 1
    return i >= 0 and row < ranges[i][1]


def covered_rows(ranges: Ranges, rows: np.ndarray) -> np.ndarray:
    """``covered`` for each of ``rows`` at once: a boolean mask."""
    if not ranges:
        return np.zeros(len(rows), dtype=bool)
    starts, ends = np.array(ranges, dtype=np.int64).T
    i = np.searchsorted(starts, rows, side="right") - 1
    return (i >= 0) & (rows < ends[np.maximum(i, 0)])


def _check_disjoint(receipts: list[Receipt]) -> None:
    """No input row in two parts: the exactly-once guarantee, checked before every commit."""
    seen: dict[str, Ranges] = {}
    for receipt in receipts:
        for shard, ranges in receipt.rows.items():
            if overlaps(seen.get(shard, []), ranges):
                raise RuntimeError(f"rows of {shard} are in two parts ({receipt.part} and another): not committing")
            seen[shard] = merge_ranges(seen.get(shard, []), ranges)


# ---- a table on disk or S3 -----------------------------------------------------------------------------


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def files_of(manifest: dict) -> dict[str, int]:
    """Every file a manifest lists, data and rejected, relative to the table root -> rows."""
    return {**manifest["files"], **manifest["rejected_files"]}


@dataclass
class StagedRun:
    """What a run left in ``_staging/<run>/``: its ``_run.json``, its receipts and the files present."""

    run: str
    info: dict | None
    receipts: list[Receipt]
    files: set[str]  # relative to the run's staging directory

    def mismatch(self, identity: dict) -> str | None:
        """Why this run's parts cannot be part of a run with ``identity``, or None if they can."""
        if self.info is None:
            return f"it has no {S.RUN_FILE}"
        differ = [key for key, value in identity.items() if self.info["identity"].get(key) != value]
        return f"{' and '.join(differ)} differ{'s' if len(differ) == 1 else ''}" if differ else None

    def rows(self) -> int:
        return sum(r.input_rows for r in self.receipts)


class Table:
    """One output directory (local or an S3 prefix) as the commit protocol reads and writes it.

    Listings bypass fsspec's listing cache: other drivers change the directory too.
    """

    def __init__(self, uri: str, storage: StorageConfig | None = None):
        self.uri = uri.rstrip("/")
        self.fs, root = filesystem(uri, storage)
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def names(self, *parts: str) -> list[str]:
        """Names directly under ``parts``; [] where nothing is."""
        self.fs.invalidate_cache()
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(*parts), detail=False))
        except FileNotFoundError:
            return []

    def read(self, *parts: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(*parts))
        except FileNotFoundError:
            return None

    def manifest(self) -> dict | None:
        """The commit record; None if nothing was committed. Outputs of older releases are refused."""
        data = self.read(S.MANIFEST)
        manifest = None if data is None else json.loads(data)
        legacy = manifest is None and self.read(LEGACY_LEDGER) is not None
        if legacy or (manifest is not None and manifest.get("protocol") != PROTOCOL):
            raise OutputError(
                f"{self.uri} was written by an older encoder-batch, before its commit protocol: move it away or "
                "delete it, or write to a new output.path"
            )
        return manifest

    def write_json(self, data: dict, *parts: str) -> None:
        write_atomic(self.fs, self.path(*parts), json.dumps(data, indent=1, sort_keys=True, default=str).encode())

    def part_files(self) -> set[str]:
        """Part files at the table root and in ``_rejected/``, relative to the root."""
        return {n for n in self.names() if _is_part(n)} | {
            join(S.REJECTED_DIR, n) for n in self.names(S.REJECTED_DIR) if _is_part(n)
        }

    def remove(self, names: Iterable[str]) -> None:
        """Delete these files (relative to the root); missing ones are fine."""
        for name in names:
            try:
                self.fs.rm_file(self.path(name))
            except FileNotFoundError:
                pass

    def remove_tree(self, *parts: str) -> None:
        try:
            self.fs.rm(self.path(*parts), recursive=True)
        except FileNotFoundError:
            pass

    def move(self, source: str, target: str) -> None:
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(posixpath.dirname(self.path(target)), exist_ok=True)
        self.fs.mv(self.path(source), self.path(target))

    def staged_files(self) -> set[str]:
        """Files under ``_staging/``, as ``<run>/<path>``."""
        self.fs.invalidate_cache()
        base = self.path(S.STAGING) + "/"
        try:
            return {f[len(base) :] for f in self.fs.find(base)}
        except FileNotFoundError:
            return set()

    def staged_runs(self) -> dict[str, StagedRun]:
        """Every run directory under ``_staging/`` with its ``_run.json`` and (parseable) receipts."""
        by_run: dict[str, set[str]] = {run: set() for run in self.names(S.STAGING)}
        for path in self.staged_files():
            run, _, rest = path.partition("/")
            by_run.setdefault(run, set()).add(rest)
        runs = {}
        for run, files in sorted(by_run.items()):
            receipts_dir = f"{S.RECEIPTS}/"
            wanted = [self.path(S.STAGING, run, f) for f in sorted(files) if f.startswith(receipts_dir) and f.endswith(".json")]
            receipts = []
            for data in (self.fs.cat(wanted, on_error="omit") if wanted else {}).values():
                try:
                    receipts.append(Receipt.parse(data))
                except (ValueError, KeyError, TypeError):
                    continue  # unreadable: its part is treated as garbage
            info = self.read(S.STAGING, run, S.RUN_FILE)
            runs[run] = StagedRun(run, json.loads(info) if info else None, receipts, files)
        return runs


# ---- the lease ----------------------------------------------------------------------------------------

_GENERATION = re.compile(r"(\d{10})\.json")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def expired(holder: dict) -> str | None:
    """Why ``holder``'s lease may be taken over, or None while it is live."""
    if holder.get("released"):
        return "it finished and released it"
    if holder["host"] == HOST and not _alive(holder["pid"]):
        return f"its process {holder['pid']} on this host is gone"
    idle = time.time() - holder["renewed_at"]
    if idle > holder["ttl_s"]:
        return f"it was last renewed {idle:.0f} s ago (its ttl is {holder['ttl_s']:g} s)"
    return None


def describe_holder(holder: dict) -> str:
    return (
        f"run {holder['run']} (pid {holder['pid']} on {holder['host']}, since {holder['started_at']}, "
        f"renewed {max(0.0, time.time() - holder['renewed_at']):.0f} s ago)"
    )


class Lease:
    """The exclusive right to write one location, held by one driver (see "Lease" above)."""

    def __init__(self, location: str, storage: StorageConfig | None, run_id: str, ttl_s: float):
        self.uri = location.rstrip("/")
        self.fs, root = filesystem(location, storage)
        self.dir = join(root, S.LEASE)
        self.run_id, self.ttl_s = run_id, ttl_s
        self.generation = 0  # 0: not held
        self.started_at = _iso()
        self.lost: dict | None = None  # the holder that took over, as the heartbeat found it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _path(self, generation: int) -> str:
        return join(self.dir, f"{generation:010d}.json")

    def _top(self) -> tuple[int, dict | None]:
        """The highest generation and its record: the holder (0, None when never held)."""
        self.fs.invalidate_cache()
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(self.dir, detail=False)]
        except FileNotFoundError:
            names = []
        top = max((int(m.group(1)) for n in names if (m := _GENERATION.fullmatch(n))), default=0)
        if not top:
            return 0, None
        try:
            return top, json.loads(self.fs.cat_file(self._path(top)))
        except FileNotFoundError:
            return self._top()  # pruned by a newer holder between the listing and the read

    def _record(self, released: bool = False) -> bytes:
        return json.dumps(
            {
                "generation": self.generation,
                "run": self.run_id,
                "host": HOST,
                "pid": os.getpid(),
                "started_at": self.started_at,
                "renewed_at": time.time(),
                "ttl_s": self.ttl_s,
                "released": released,
            }
        ).encode()

    def state(self) -> str:
        """The lease as a run starting now would find it, for ``--dry-run``."""
        _, holder = self._top()
        if holder is None or holder.get("released"):
            return "free"
        why = expired(holder)
        if why is None:
            return f"held by {describe_holder(holder)}: a run now is refused"
        return f"stale: held by {describe_holder(holder)}, but {why}: a run now takes it over"

    def acquire(self, log: Log) -> None:
        """Take the lease or raise :class:`LeaseHeld` naming its holder; then renew it in the background."""
        for _ in range(10):
            top, holder = self._top()
            why = expired(holder) if holder else None
            if holder is not None and why is None:
                raise LeaseHeld(
                    f"{self.uri} is being written by {describe_holder(holder)}. Wait for it to finish; if that "
                    f"driver is dead, its lease expires {holder['ttl_s']:g} s after its last renewal "
                    "(execution.lease_ttl_s), at once if it ran on this host"
                )
            self.generation = top + 1
            try:
                create_exclusive(self.fs, self._path(self.generation), self._record())
            except FileExistsError:
                _, winner = self._top()
                if not (winner and winner["run"] == self.run_id):  # else: our own PUT, answered late and retried
                    continue  # another driver took this generation first: look again
            if holder is not None and not holder.get("released"):
                log(f"took over the lease of {self.uri} from {describe_holder(holder)}: {why}")
            break
        else:
            self.generation = 0
            raise LeaseHeld(f"could not take the lease of {self.uri}: other drivers kept taking it first")
        for generation in range(1, self.generation):  # older generations: never the holder again
            try:
                self.fs.rm_file(self._path(generation))
            except FileNotFoundError:
                pass
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="lease-heartbeat")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                top, holder = self._top()
                if top != self.generation:
                    self.lost = holder or {}
                    logger.warning("lease of %s lost to %s", self.uri, holder)
                    return
                write_atomic(self.fs, self._path(self.generation), self._record())
            except Exception:  # noqa: BLE001 - a missed beat; the lease holds until its ttl runs out
                logger.warning("could not renew the lease of %s", self.uri, exc_info=True)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this driver still holds the lease."""
        top, holder = self._top()
        if self.lost is None and top == self.generation and holder and holder["run"] == self.run_id:
            return
        taker = holder if top != self.generation else self.lost
        raise LeaseLost(
            f"run {self.run_id} lost the lease of {self.uri} to "
            f"{describe_holder(taker) if taker and 'run' in taker else 'another driver'} (it stopped renewing it for "
            f"longer than execution.lease_ttl_s={self.ttl_s:g} s): it does not commit. Its receipted parts "
            "stay staged for the holder's run to resume"
        )

    def release(self) -> None:
        """Stop renewing; mark the lease released if this driver still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.generation:
            return
        try:
            top, holder = self._top()
            if top == self.generation and holder and holder["run"] == self.run_id:
                write_atomic(self.fs, self._path(self.generation), self._record(released=True))
        except Exception:  # noqa: BLE001 - never hide the run's own error; the lease then expires by its ttl
            logger.warning("could not release the lease of %s", self.uri, exc_info=True)
        self.generation = 0


# ---- the writer: resume, commit, finish ----------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """Parts kept from killed runs, and the input rows they hold (which this run skips)."""

    receipts: list[Receipt] = field(default_factory=list)
    skip: dict[str, Ranges] = field(default_factory=dict)  # shard (relative) -> rows already written

    @property
    def rows(self) -> int:
        return sum(r.input_rows for r in self.receipts)


class Writer:
    """Writes one table for one run: ``with Writer(uri, cfg) as writer:`` takes the lease (on ``lease_uri``,
    default the table) and finishes a commit a killed run left half done; ``resume`` adopts what killed runs
    staged; ``commit`` publishes. Leaving the block releases the lease. ``current``: write ``_CURRENT`` in the
    table's parent (nightly versions).
    """

    def __init__(
        self, uri: str, cfg: JobConfig, *, lease_uri: str | None = None, current: bool = False, log: Log = print
    ):
        self.table = Table(uri, cfg.storage)
        self.cfg, self.current, self.log = cfg, current, log
        self.run_id = new_run_id()
        self.lease = Lease(lease_uri or uri, cfg.storage, self.run_id, cfg.execution.lease_ttl_s)
        self.manifest: dict | None = None
        self.staged: dict[str, StagedRun] = {}

    @property
    def staging_uri(self) -> str:
        """Where this run's sink writes its parts and receipts."""
        return join(self.table.uri, S.STAGING, self.run_id)

    def __enter__(self) -> Writer:
        self.lease.acquire(self.log)
        try:
            self.manifest = self.table.manifest()
            self.staged = self.table.staged_runs()
            if self.manifest is not None:
                consumed = set(self.manifest["staged_runs"]) & set(self.staged)
                if self._finish(consumed):
                    self.log(f"{self.table.uri}: finished the interrupted commit of run {self.manifest['run']}")
        except BaseException:
            self.lease.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.lease.release()

    def resume(self, identity: dict, sizes: dict[str, int], keep: bool = True) -> Resume:
        """Keep the receipted parts of killed runs with this ``identity`` that hold rows of these shards
        (relative name -> size) only, unchanged in size; discard other staged runs (all of them without
        ``keep``: a task whose columns depend on a whole group of rows). Records this run's own ``_run.json``."""
        present = self.table.part_files()
        kept: list[Receipt] = []
        skip: dict[str, Ranges] = {}
        for run in sorted(self.staged):
            staged = self.staged[run]
            why = staged.mismatch(identity) or (None if keep else "the task ranks rows within groups, so a group's rows are scored in one run")
            if why:
                self.log(f"{self.table.uri}: discarding the staged output of run {run}: {why}")
                self._discard(run, present)
                continue
            for receipt in sorted(staged.receipts, key=lambda r: r.part):
                usable = (
                    all(s in sizes and staged.info["sizes"].get(s) == sizes[s] for s in receipt.rows)
                    and all(f in staged.files or f in present for f in receipt.files)
                    and not any(overlaps(skip.get(s, []), ranges) for s, ranges in receipt.rows.items())
                )
                if usable:
                    kept.append(receipt)
                    for shard, ranges in receipt.rows.items():
                        skip[shard] = merge_ranges(skip.get(shard, []), ranges)
        info = {"run": self.run_id, "identity": identity, "sizes": sizes, "host": HOST, "pid": os.getpid()}
        self.table.write_json({**info, "started_at": _iso()}, S.STAGING, self.run_id, S.RUN_FILE)
        resume = Resume(kept, skip)
        if kept:
            runs = sorted({r.run for r in kept})
            self.log(f"{self.table.uri}: resuming run(s) {', '.join(runs)}: keeping {resume.rows} rows, {len(kept)} part(s)")
        return resume

    def part_metadata(self, receipt: Receipt) -> dict[str, Any]:
        """The file-level metadata (``schema.METADATA_KEY``) of a kept part's data file, staged or already moved."""
        staged = self.table.path(S.STAGING, receipt.run, receipt.part)
        path = staged if self.table.fs.exists(staged) else self.table.path(receipt.part)
        with self.table.fs.open(path, "rb") as f:
            metadata = pq.read_schema(f).metadata or {}
        return json.loads(metadata.get(S.METADATA_KEY, b"{}"))

    def commit(self, manifest: dict, receipts: list[Receipt], *, replace: bool) -> dict:
        """Publish the parts of ``receipts`` with ``manifest`` (the run's statistics) as the table's commit
        record: the table's only files (``replace``) or added to those already committed. Returns the record."""
        _check_disjoint(receipts)
        self.lease.check()
        table = self.table
        table.remove([S.SUCCESS])
        staged, present = table.staged_files(), table.part_files()
        for receipt in receipts:
            for name in receipt.files:
                if join(receipt.run, name) in staged:
                    table.move(join(S.STAGING, receipt.run, name), name)
                elif name not in present:
                    raise RuntimeError(f"{name} of run {receipt.run} is neither staged nor in {table.uri}")
        self._fault("moved")
        previous = files_of(self.manifest) if self.manifest else {}
        files = {} if replace else dict(previous)
        for receipt in receipts:
            files.update(receipt.files)
        rejected = f"{S.REJECTED_DIR}/"
        record = {
            **manifest,
            "protocol": PROTOCOL,
            "run": self.run_id,
            "committed_at": _iso(),
            "resumed_from": sorted({r.run for r in receipts} - {self.run_id}),
            "staged_runs": sorted({*self.staged, self.run_id}),  # their staging is deleted after the commit point
            "files": {n: rows for n, rows in sorted(files.items()) if not n.startswith(rejected)},
            "rejected_files": {n: rows for n, rows in sorted(files.items()) if n.startswith(rejected)},
            "superseded": sorted(set(previous) - set(files)),
        }
        self.lease.check()
        table.write_json(record, S.MANIFEST)  # the commit point
        self.manifest = record
        self._fault("committed")
        self._finish(set(self.staged), everything=True)
        return record

    def _finish(self, consumed: set[str], everything: bool = False) -> bool:
        """Steps 4-5 of a commit, idempotent: delete what the manifest superseded and the staging of the
        ``consumed`` runs (with parts of theirs it does not list; ``everything``: all of ``_staging/``); then
        ``_SUCCESS`` (and ``_CURRENT``), unless another run's parts sit unlisted at their final names. Returns
        whether there was anything to do."""
        table, listed = self.table, set(files_of(self.manifest))
        present = table.part_files()
        stale = [f for f in self.manifest["superseded"] if f in present]
        for run in consumed:
            stale += [f for r in self.staged[run].receipts for f in r.files if f in present and f not in listed]
        table.remove(stale)
        for run in consumed:
            table.remove_tree(S.STAGING, run)
            del self.staged[run]
        if everything or not self.staged:
            table.remove_tree(S.STAGING)
        waiting = [f for s in self.staged.values() for r in s.receipts for f in r.files if f in present - listed]
        done = bool(stale or consumed)
        if not waiting:
            if table.read(S.SUCCESS) is None:
                write_atomic(table.fs, table.path(S.SUCCESS), b"")
                done = True
            if self.current:
                parent, version = posixpath.split(table.root)
                if self._read_current(parent) != version:
                    write_atomic(table.fs, join(parent, S.CURRENT), version.encode())
        return done

    def _read_current(self, parent: str) -> str | None:
        try:
            return self.table.fs.cat_file(join(parent, S.CURRENT)).decode().strip()
        except FileNotFoundError:
            return None

    def _discard(self, run: str, present: set[str]) -> None:
        """Delete a staged run that cannot be resumed, with any of its parts a killed commit had moved."""
        listed = set(files_of(self.manifest)) if self.manifest else set()
        self.table.remove(f for r in self.staged[run].receipts for f in r.files if f in present and f not in listed)
        self.table.remove_tree(S.STAGING, run)
        del self.staged[run]

    def _fault(self, step: str) -> None:
        if self.cfg.faults.crash_at == step:
            os._exit(CRASH_EXIT_CODE)


# ---- what a run would find, for the plan ---------------------------------------------------------------


def inspect_output(
    uri: str, storage: StorageConfig | None, *, identity: dict, mode: str | None, lease_uri: str | None = None
) -> list[str]:
    """What a run would do at the table ``uri``, as plan lines (overwrite decision, staged runs, lease);
    raises :class:`OutputError` for a location it must not touch. ``mode`` is ``output.mode`` for jobs.run,
    None for a nightly version directory (a run only ever adds to it)."""
    table = Table(uri, storage)
    if table.fs.isfile(table.root):
        raise OutputError(f"output.path {uri} is a file: point it at a directory")
    names = [n for n in table.names() if not n.startswith(ACCESS_PROBE_PREFIX)]
    manifest = table.manifest() if names else None
    if names and manifest is None and not {S.STAGING, S.LEASE} & set(names):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise OutputError(
            f"output.path {uri} is not empty and holds no output of this pipeline ({shown}). Nothing was "
            "deleted or written: choose a new or empty location"
        )
    if manifest is None:
        decision = "new output" if not names else "no committed run yet"
    else:
        files, rows = len(manifest["files"]), sum(manifest["files"].values())
        committed = f"run {manifest['run']} committed at {manifest['committed_at']} ({files} part(s), {rows} rows)"
        if mode == "error":
            raise OutputError(
                f"output.path {uri} already holds {committed}: choose a new path, or set output.mode: overwrite, "
                "which replaces exactly the files its manifest lists once the new run has committed"
            )
        decision = (
            f"replaces {committed} once this run has committed (readers see it until then); deletes only the "
            "files its manifest lists and staging left by killed runs"
            if mode == "overwrite"
            else f"adds to {committed}"
        )
    lines = [decision]
    for run, staged in table.staged_runs().items():
        why = staged.mismatch(identity)
        lines.append(
            f"discards the staged output of run {run}: {why}"
            if why
            else f"resumes run {run}: keeps up to {staged.rows()} rows in {len(staged.receipts)} receipted part(s)"
        )
    lines.append(f"lease {Lease(lease_uri or uri, storage, '', 1).state()}")
    return lines


# ---- readers --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommittedOutput:
    """A committed output as its manifest lists it: read these files and nothing else."""

    uri: str
    fs: fsspec.AbstractFileSystem
    root: str
    manifest: dict

    @property
    def files(self) -> list[str]:
        """Data files, relative to ``root``, in name order."""
        return sorted(self.manifest["files"])

    @property
    def rejected_files(self) -> list[str]:
        return sorted(self.manifest["rejected_files"])

    def paths(self, rejected: bool = False) -> list[str]:
        return [join(self.root, f) for f in (self.rejected_files if rejected else self.files)]


def committed_output(path: str, storage: StorageConfig | None = None) -> CommittedOutput:
    """The committed output at ``path``: a jobs.run ``output.path``, a nightly ``version=`` directory, or a
    nightly ``dt=<date>`` directory (read through its ``_CURRENT``)."""
    table = Table(path, storage)
    manifest = table.manifest()
    current = table.read(S.CURRENT) if manifest is None else None
    if current:
        table = Table(join(table.uri, current.decode().strip()), storage)
        manifest = table.manifest()
    if manifest is None:
        raise OutputError(
            f"{path} holds no finished run (no {S.MANIFEST}): point at the output.path of a finished jobs.run, or "
            "at a dt=<date>/ or version=... directory of jobs.nightly"
        )
    return CommittedOutput(table.uri, table.fs, table.root, manifest)


def read_output(
    path: str, storage: StorageConfig | None = None, columns: list[str] | None = None, *, rejected: bool = False
) -> pa.Table:
    """The rows of the committed output at ``path`` (see :func:`committed_output`), from exactly the files its
    manifest lists; ``rejected``: its quarantined rows. A commit that replaces the files mid-read is retried.
    An output without files (every row rejected, or none scored) reads as an empty table without columns."""
    for attempt in range(3):
        output = committed_output(path, storage)
        paths = output.paths(rejected)
        if not paths:
            return pa.table({})
        try:
            return pq.read_table(paths, filesystem=arrow_filesystem(output.fs), columns=columns, partitioning=None)
        except FileNotFoundError:
            if attempt == 2 or committed_output(path, storage).manifest == output.manifest:
                raise
    raise AssertionError("unreachable")


def read_output_dataset(
    path: str, storage: StorageConfig | None = None, columns: list[str] | None = None, *, rejected: bool = False
) -> ray.data.Dataset:
    """:func:`read_output` as a Ray Dataset: ``ray.data.read_parquet`` over exactly the listed files."""
    import ray.data

    output = committed_output(path, storage)
    paths = output.paths(rejected)
    if not paths:
        return ray.data.from_arrow(pa.table({}))
    return ray.data.read_parquet(paths, filesystem=arrow_filesystem(output.fs), columns=columns, partitioning=None)
