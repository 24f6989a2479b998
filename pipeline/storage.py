"""Filesystems for local paths and ``s3://`` URIs (through s3fs), configured once per job.

Credentials come from the standard AWS chain (environment, ``AWS_PROFILE``/shared files, container or
instance role) unless ``storage.key``/``storage.secret`` are set; ``storage.anon`` sends unsigned requests
for public buckets. The endpoint is ``storage.endpoint_url``, else ``$AWS_ENDPOINT_URL_S3`` or
``$AWS_ENDPOINT_URL`` (S3-compatible stores), else AWS. It is resolved when :func:`filesystem` runs and
travels with the pickled filesystem, so Ray workers need not share the driver's environment.

Retries. Two layers, both bounded; this module adds none of its own:

* botocore retries every request that fails with throttling (``SlowDown``, ``Throttling``, ...), a 500,
  502, 503 or 504 status, or a dropped/refused connection, with jittered exponential backoff (``standard`` mode,
  :data:`MAX_ATTEMPTS` attempts). ``$AWS_RETRY_MODE`` (e.g. ``adaptive``, which adds client-side rate
  limiting) and ``$AWS_MAX_ATTEMPTS`` override both.
* s3fs re-runs a call whose response body broke off mid-read (``IncompleteRead``, payload errors) and one
  still answered ``SlowDown`` after botocore gave up, up to ``S3FileSystem.retries`` (5) times.

Permanent errors (missing bucket, denied access, unknown key id, wrong secret) are not retried:
:func:`check_access` turns them into a :class:`StorageError` naming the bucket, the key and the fix, so a
job can fail before it starts any actor.

Streaming. :func:`arrow_filesystem` hands S3 to pyarrow and Ray Data through ``FSSpecHandler``, whose
``open_input_file``/``open_input_stream`` return an s3fs file object that issues ranged GETs of
``default_block_size`` (50 MiB) on demand: Parquet reads its footer and then only the column chunks
asked for, JSONL is read front to back, and no object is ever copied whole to local disk or memory
first. Writes (``open_output_stream``) upload each full block as a multipart part, small files in one PUT.

Checkpoints on S3 are the one thing copied to local disk, since ``from_pretrained`` wants a directory:
:func:`fetch_checkpoint` downloads them once per node into a cache keyed by the objects' ETags.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import fsspec
import pyarrow.fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig

if TYPE_CHECKING:
    import s3fs

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
"""botocore attempts per S3 request (first try included) unless ``$AWS_MAX_ATTEMPTS`` is set."""

RETRY_MODE = "standard"
"""botocore retry mode unless ``$AWS_RETRY_MODE`` is set."""


ACCESS_PROBE_PREFIX = ".encoder-batch-access-check-"
"""Name prefix of the empty object :func:`check_access` puts (and deletes) to test write access."""


class StorageError(ValueError):
    """A location that cannot be used as configured; the message names bucket, key and the fix."""


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URI with a scheme other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def filesystem(path: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path_without_scheme)`` for a local path, ``file://`` or ``s3://`` URI."""
    storage = storage or StorageConfig()
    if path.startswith("s3://"):
        import s3fs

        client_kwargs: dict[str, str] = {}
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if storage.region:
            client_kwargs["region_name"] = storage.region
        retries = {
            "mode": os.environ.get("AWS_RETRY_MODE", RETRY_MODE),
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", MAX_ATTEMPTS)),
        }
        fs = s3fs.S3FileSystem(
            anon=storage.anon,
            key=storage.key.get_secret_value() if storage.key else None,
            secret=storage.secret.get_secret_value() if storage.secret else None,
            client_kwargs=client_kwargs,
            config_kwargs={"retries": retries},
            skip_instance_cache=True,
        )
        return fs, path[len("s3://") :]
    if is_remote(path):
        raise StorageError(f"unsupported storage scheme in {path}: use a local path or s3://")
    local = path[len("file://") :] if path.startswith("file://") else path
    return LocalFileSystem(auto_mkdir=True), os.path.abspath(os.path.expanduser(local))


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """Wrap an fsspec filesystem for Ray Data / pyarrow readers (streaming, see the module docstring)."""
    if isinstance(fs, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def join(root: str, *parts: str) -> str:
    """Join relative ``/``-separated parts onto ``root`` (a local path, bucket key or URI).

    Every write location is built here, so nothing the pipeline writes can escape the
    root: absolute parts and ``..`` segments are refused.
    """
    for part in parts:
        if part.startswith("/") or ".." in part.split("/"):
            raise ValueError(f"refusing to write outside {root!r}: path part {part!r}")
    return "/".join([root.rstrip("/"), *parts])


def relative_to(path: str, root: str) -> str:
    """``path`` relative to ``root``, by text alone: object-store keys (``bucket/key``) are not files, so
    nothing here consults the process's working directory (``posixpath.relpath`` calls ``os.getcwd``).

    ``root`` itself, or an empty root, gives the last path segment.
    """
    root = root.rstrip("/")
    if root and path.startswith(root + "/"):
        return path[len(root) + 1 :]
    if root and path != root:
        raise ValueError(f"{path!r} is not under {root!r}")
    return path.rstrip("/").rsplit("/", 1)[-1]


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: readers see the old bytes or the new, never a mix.

    Local: a temporary file beside it, flushed and renamed over it. S3: one PUT (atomic per object).
    """
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    os.replace(_local_tmp(path, data), path)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` unless it exists (then ``FileExistsError``), in one atomic step.

    Local: the bytes go to a temporary file that is hard-linked to ``path`` (``link`` fails if it
    exists), so no reader ever sees it empty. S3: ``PutObject`` with ``If-None-Match: *``.
    """
    if not isinstance(fs, LocalFileSystem):
        bucket, _, key = path.partition("/")
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")  # 412 -> FileExistsError
        fs.invalidate_cache(path)
        return
    tmp = _local_tmp(path, data)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _local_tmp(path: str, data: bytes) -> str:
    """A flushed temporary file holding ``data`` next to ``path`` (same filesystem, so it can be renamed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


# --- access checks -------------------------------------------------------------------------------------

_READ_ACTIONS = "s3:ListBucket and s3:GetObject"
_WRITE_ACTIONS = "s3:ListBucket, s3:PutObject and s3:DeleteObject"
_EXPLANATIONS = {
    "NoSuchBucket": "bucket {bucket!r} does not exist{at}; create it or fix the path",
    "InvalidBucketName": "{bucket!r} is not a valid bucket name; fix the path",
    "AccessDenied": "access denied; grant {actions} on arn:aws:s3:::{bucket}/{key}* to the credentials in use",
    "AllAccessDisabled": "all access to bucket {bucket!r} is disabled; use another bucket",
    "InvalidAccessKeyId": "the access key id is not known{at}; fix AWS_ACCESS_KEY_ID / AWS_PROFILE or storage.key",
    "SignatureDoesNotMatch": "the secret key does not match the access key id; fix AWS_SECRET_ACCESS_KEY or "
    "storage.secret",
    "ExpiredToken": "the session token has expired; refresh the credentials",
    "InvalidToken": "the session token is invalid; refresh the credentials",
}
_EXPLANATIONS["403"] = _EXPLANATIONS["AccessDenied"]  # HEAD responses carry the status code only


@contextmanager
def _explained(fs: s3fs.S3FileSystem, path: str, *, write: bool) -> Iterator[None]:
    """Re-raise s3fs/botocore failures on ``path`` (``bucket/key``) as :class:`StorageError` with the fix."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    try:
        yield
    except (OSError, BotoCoreError, ClientError) as e:
        bucket, _, key = path.partition("/")
        endpoint = fs.client_kwargs.get("endpoint_url")
        cause = e if isinstance(e, ClientError) else e.__cause__
        if isinstance(cause, ClientError):
            code = cause.response.get("Error", {}).get("Code", "")
            template = _EXPLANATIONS.get(code, "{message}")
            reason = template.format(
                bucket=bucket,
                key=key,
                at=f" at {endpoint}" if endpoint else "",
                actions=_WRITE_ACTIONS if write else _READ_ACTIONS,
                message=cause.response.get("Error", {}).get("Message") or str(cause),
            )
            reason = f"{reason} ({code})"
        elif isinstance(e, NoCredentialsError):
            reason = (
                "no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, attach a "
                "role to the machine, or set storage.anon: true for a public bucket"
            )
        elif isinstance(e, EndpointConnectionError):
            reason = f"cannot reach {endpoint or 'AWS'}; check storage.endpoint_url / AWS_ENDPOINT_URL and the network"
        else:
            reason = str(e) or type(e).__name__
        raise StorageError(f"cannot {'write' if write else 'read'} s3://{path}: {reason}") from e


def literal_prefix(path: str) -> str:
    """The part of ``path`` before its first glob character."""
    magic = [i for i in (path.find(c) for c in "*?[") if i >= 0]
    return path[: min(magic)] if magic else path


def check_access(path: str, storage: StorageConfig | None = None, *, write: bool = False) -> None:
    """Fail fast if ``path`` (local path, glob or ``s3://`` URI) cannot be read, or written with ``write``.

    Read: something exists at ``path`` (a glob is checked at its literal prefix) and, on S3, the first
    object under it can be fetched. Write: a local directory could be created; on S3 a probe object is
    put under ``path`` and deleted again. Raises :class:`StorageError` naming bucket, key and the fix.
    Transient failures are retried first (see the module docstring).
    """
    fs, root = filesystem(path, storage)
    if isinstance(fs, LocalFileSystem):
        _check_local(root, write=write)
        return
    prefix = literal_prefix(root).rstrip("/")
    bucket, _, key = prefix.partition("/")
    with _explained(fs, prefix, write=write):
        listing = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
        if write:
            probe = join(key, f"{ACCESS_PROBE_PREFIX}{uuid.uuid4().hex}").lstrip("/")
            fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"")
            fs.call_s3("delete_object", Bucket=bucket, Key=probe)
        elif not listing.get("Contents"):
            raise StorageError(f"cannot read s3://{prefix}: no objects under it; fix the path")
        else:
            fs.call_s3("head_object", Bucket=bucket, Key=listing["Contents"][0]["Key"])


def _check_local(path: str, *, write: bool) -> None:
    if not write:
        if not glob.glob(path):
            raise StorageError(f"cannot read {path}: nothing exists there; fix the path")
        return
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise StorageError(f"cannot write {path}: {existing} is not a writable directory; fix the path or permissions")


# --- checkpoints ---------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``${ENCODER_BATCH_CACHE:-~/.cache/encoder-batch}/checkpoints``, read on each call (per node)."""
    return Path(os.environ.get("ENCODER_BATCH_CACHE", "~/.cache/encoder-batch")).expanduser() / "checkpoints"


def fetch_checkpoint(uri: str, storage: StorageConfig | None = None, cache_root: Path | None = None) -> Path:
    """Local directory holding the checkpoint at ``uri``; local paths are returned as they are.

    An ``s3://`` prefix is listed and every object under it (``config.json``, ``*.safetensors``, tokenizer
    files, sentence-transformers module folders) downloaded into ``<cache_root>/<digest>/``, where the
    digest hashes the sorted ``(key, ETag, size)`` of the objects: a changed checkpoint lands in a new
    directory, an unchanged one is reused without any GET. Downloads go to a temporary directory renamed
    into place under a file lock, so concurrent callers on a node (model actors) share one copy.
    """
    import filelock

    fs, root = filesystem(uri, storage)
    if isinstance(fs, LocalFileSystem):
        return Path(root)
    root = root.rstrip("/")
    with _explained(fs, root, write=False):
        found = fs.find(root, detail=True)
    objects = sorted((path, info["ETag"], info["size"]) for path, info in found.items() if info["type"] == "file")
    if not objects:
        raise StorageError(f"cannot read s3://{root}: no checkpoint files under it; fix model.path")
    relative = [PurePosixPath(path[len(root) + 1 :]) for path, _, _ in objects]
    if any(not rel.parts or ".." in rel.parts for rel in relative):
        raise StorageError(f"s3://{root} is a single object or holds keys with '..'; point at a checkpoint prefix")

    cache_root = cache_root or default_cache_root()
    digest = hashlib.sha256(json.dumps(objects).encode()).hexdigest()
    target = cache_root / digest
    if target.is_dir():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(cache_root / f"{digest}.lock"):
        if target.is_dir():  # another process finished while this one waited
            return target
        for stale in cache_root.glob(f".{digest}.*"):  # left by a process killed mid-download
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=cache_root))
        try:
            with _explained(fs, root, write=False):
                fs.get([path for path, _, _ in objects], [str(staging / rel) for rel in relative])
            for (path, _, size), rel in zip(objects, relative):
                if (staging / rel).stat().st_size != size:
                    raise StorageError(f"s3://{path} changed while it was downloaded; run again")
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("fetched s3://%s (%d files) into %s", root, len(objects), target)
    return target
