"""Plan and run a job: source -> tokenize -> infer -> sink, on whichever Ray cluster is current.

``plan`` does everything that can be checked before Ray starts (config, shards and their
schema, checkpoint and head, output location, pool sizing) and is what ``--dry-run``
prints. ``run_job`` executes the plan with Ray Data and returns the manifest.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import pyarrow as pa

from pipeline import __version__
from pipeline import schema as S
from pipeline.checkpoint import ResolvedModel, resolve
from pipeline.config import ConfigError, JobConfig
from pipeline.source import InputError, InputScan, Shards, Unreadable, check_schema, discover, scan_input
from pipeline.storage import check_access, filesystem, join
from pipeline.tasks import Task, build

READ_CPUS = 0.25  # read and write tasks are I/O bound; a small share keeps them schedulable beside the actors
WRITE_CPUS = 0.25
TOKENIZE_CPUS = 0.25  # a fast (Rust) tokenizer keeps up with a model actor on a fraction of a core


class RowCountError(RuntimeError):
    """Rows in != rows out + rows rejected: something was lost, so the run is not published."""


@dataclass(frozen=True)
class Pools:
    """Actor pool sizing; each CPU figure is a Ray reservation per actor."""

    tokenize: tuple[int, int]
    tokenize_cpus: float
    infer: tuple[int, int]
    infer_cpus: float
    infer_gpus: float
    threads: int  # torch threads per model actor: its CPU share, rounded up

    def describe(self) -> str:
        return (
            f"read/write tasks {READ_CPUS}/{WRITE_CPUS} CPU each; tokenize actors {self.tokenize[0]}..{self.tokenize[1]} x "
            f"{self.tokenize_cpus} CPU; model actors {self.infer[0]}..{self.infer[1]} x {self.infer_cpus:g} CPU, "
            f"{self.infer_gpus:g} GPU, {self.threads} torch threads"
        )


def size_pools(cfg: JobConfig, cpus: float, gpus: float, node_cpus: float | None = None) -> Pools:
    """Size the pools for a cluster with ``cpus``/``gpus`` so read and write tasks keep a CPU share.

    Ray Data deadlocks when actors reserve every CPU, since read tasks need one too; a
    configuration that would do so is refused here, before anything starts. ``node_cpus``
    (the largest node's CPUs, default ``cpus``) caps what one actor may reserve.
    """
    inference, tokenize = cfg.inference, cfg.tokenize
    num_gpus = inference.num_gpus if inference.num_gpus is not None else (1.0 if gpus else 0.0)
    auto_size = not ({"size", "max_size"} & inference.pool.model_fields_set)
    infer = (1, max(1, int(gpus // num_gpus))) if num_gpus and auto_size else inference.pool.bounds
    tok = tokenize.pool.bounds
    tok_cpus = tokenize.pool.num_cpus or (1.0 if num_gpus else TOKENIZE_CPUS)
    io = READ_CPUS + WRITE_CPUS
    spare = cpus - io - tok[1] * tok_cpus
    per_node = (node_cpus or cpus) - io - tok_cpus  # an actor must fit beside a tokenizer and I/O on any node
    infer_cpus = inference.pool.num_cpus or (1.0 if num_gpus else round(min(spare / infer[1], per_node), 2))
    needed = io + tok[1] * tok_cpus + infer[1] * infer_cpus
    if infer_cpus <= 0 or needed > cpus + 1e-6 or max(infer_cpus, tok_cpus) > (node_cpus or cpus):
        raise ConfigError(
            f"the actor pools reserve {needed - io:g} of {cpus:g} CPUs and leave less than {io:g} for read and "
            "write tasks, so the pipeline would deadlock. Lower tokenize.pool / inference.pool sizes or num_cpus"
        )
    if num_gpus and num_gpus > gpus:
        raise ConfigError(f"inference.num_gpus={num_gpus:g} but the cluster has {gpus:g} GPUs")
    return Pools(tok, tok_cpus, infer, infer_cpus, num_gpus, max(1, math.ceil(infer_cpus - 1e-6)))


@dataclass(frozen=True)
class Plan:
    cfg: JobConfig
    shards: Shards
    passthrough_schema: pa.Schema  # declared id/label column types (Parquet footers; JSONL: first values)
    footer_rows: dict[str, int]  # rows per Parquet shard, from the footers the plan read; {} for JSONL
    model: ResolvedModel
    task: Task  # model.task configured for this job and checkpoint
    pools: Pools
    unreadable: dict[str, Unreadable] = field(default_factory=dict)  # shards that do not even open

    def metadata(self) -> dict:
        """File-level Parquet metadata: what produced these rows (secrets masked)."""
        cfg = self.cfg
        return cfg.redact({
            "model_path": self.model.source,
            "model_revision": self.model.fingerprint,
            "task": self.task.name,
            "config_hash": cfg.fingerprint(),
            "version": __version__,
            "max_length": self.model.max_length,
            "dtype": cfg.model.dtype,
            "text_column": cfg.input.text_column,
            **self.task.metadata(),
        })

    def output_schema(self, passthrough: pa.Schema) -> pa.Schema:
        return S.output_schema(list(passthrough), self.task.fields(), self.metadata())

    def describe(self) -> str:
        files = self.shards.files
        lines = [
            f"input    {self.cfg.input.path}: {len(files)} {self.shards.format} file(s)"
            + (f" ({files[0]} ... {files[-1]})" if len(files) > 1 else f" ({files[0]})"),
            f"columns  text={self.cfg.input.text_column!r}"
            + (f" pair={self.cfg.input.text_pair_column!r}" if self.cfg.input.text_pair_column else "")
            + f" passthrough={self.shards.passthrough or [S.GENERATED_ID + ' (generated)']}"
            + (f" schema={self.passthrough_schema}" if self.passthrough_schema else ""),
            f"model    {self.model.source} @ {self.model.fingerprint} ({self.model.architecture}, "
            f"max_length {self.model.max_length}, dtype {self.cfg.model.dtype})",
            f"task     {self.task.name} ({self.task.auto_model}"
            + "".join(f", {key} {value}" for key, value in self.task.metadata().items())
            + ")",
        ]
        if self.model.id2label:
            lines.append(f"labels   {self.model.id2label}")
        lines += [
            f"output   {self.cfg.output.path} (mode {self.cfg.output.mode}), columns {self.output_schema(self.passthrough_schema).names}",
            f"pools    {self.pools.describe()}",
        ]
        lines += [
            f"UNREADABLE {self.shards.relative(path)}: {problem.error} (quarantined whole; the run will be partial)"
            for path, problem in self.unreadable.items()
        ]
        return self.cfg.redact("\n".join(lines))


def cluster_resources() -> tuple[float, float, float]:
    """(CPUs, GPUs, largest node's CPUs) of the connected Ray cluster, or of this machine if none is."""
    import ray

    if ray.is_initialized():
        resources = ray.cluster_resources()
        node_cpus = max(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"])
        return resources.get("CPU", 1.0), resources.get("GPU", 0.0), node_cpus
    import torch

    cpus = float(os.cpu_count() or 1)
    return cpus, float(torch.cuda.device_count()), cpus


def plan(cfg: JobConfig, cpus: float | None = None, gpus: float | None = None, node_cpus: float | None = None) -> Plan:
    """Validate everything that can be checked without running inference; see the module docstring.

    Pools are sized for the given resources, else for ``cluster_resources()``.
    """
    if cpus is None:
        cpus, gpus, node_cpus = cluster_resources()
    check_access(cfg.input.path, cfg.storage)
    check_access(cfg.output.path, cfg.storage, write=True)
    fs, in_path = filesystem(cfg.input.path, cfg.storage)
    passthrough = list(dict.fromkeys([*cfg.input.id_columns, *filter(None, [cfg.eval.label_column])]))
    shards = discover(cfg.input, fs, in_path, passthrough)
    passthrough_schema, footer_rows, unreadable = check_schema(shards, cfg.input)
    model = resolve(cfg.model, cfg.storage, cfg.tokenize.path)
    budget = cfg.inference.max_tokens_per_batch
    if budget != "auto" and budget < model.max_length:
        raise ConfigError(
            f"inference.max_tokens_per_batch={budget} is less than the max length of {model.max_length} tokens: "
            f"one full-length row would not fit in a forward pass. Set it to at least {model.max_length}, or auto"
        )
    out_fs, out_root = filesystem(cfg.output.path, cfg.storage)
    if cfg.output.mode == "error" and out_fs.exists(join(out_root, S.SUCCESS)):
        raise ConfigError(
            f"output.path {cfg.output.path} already holds a finished run; choose a new path or set output.mode: overwrite"
        )
    pools = size_pools(cfg, cpus, gpus or 0.0, node_cpus)
    job = Plan(cfg, shards, passthrough_schema, footer_rows, model, build(cfg, model), pools, unreadable)
    clashes = set(passthrough) & set(job.output_schema(pa.schema([])).names)
    if clashes:
        raise ConfigError(
            f"input column(s) {sorted(clashes)} would collide with output columns of the same name; "
            "rename them in the input (e.g. a gold `label` column to `topic`)"
        )
    return job


def user_error(e: BaseException) -> Exception | None:
    """The user's problem (input, config, checkpoint, storage) behind a failed Ray task, as a plain
    exception with its own one-line message (not the task's traceback, nor the retry notes Ray Data
    appends to it); None for anything else."""
    from ray.exceptions import RayTaskError

    from pipeline.checkpoint import CheckpointError
    from pipeline.storage import StorageError

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (InputError, ConfigError, CheckpointError, StorageError)) and not isinstance(e, RayTaskError):
            return type(e)(str(e).split("\n", 1)[0])
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def scan_shards(job: Plan, shards: Shards) -> tuple[Shards, InputScan]:
    """Read every shard to its end before any actor starts (``scan_input``).

    Returns the shards still readable and the scan, whose ``unreadable`` holds every shard to
    quarantine (those the plan could not open, then those the scan could not read to the end) and
    whose ``rows`` counts theirs (``Unreadable.rows_counted``). ``InputError`` if none is readable.
    """
    cfg = job.cfg.input
    known = {path: problem for path, problem in job.unreadable.items() if path in shards.files}
    readable = replace(shards, files=[f for f in shards.files if f not in known])
    scan = InputScan(0, {}, {})
    if readable.files:
        scan = scan_input(readable, cfg, job.passthrough_schema, job.footer_rows, cfg.reject_duplicate_ids)
        readable = replace(readable, files=[f for f in readable.files if f not in scan.unreadable])
    unreadable = {**known, **scan.unreadable}
    if not readable.files:
        path, problem = next(iter(unreadable.items()))
        raise InputError(
            f"none of the {len(shards.files)} input shard(s) is readable, e.g. {shards.relative(path)}: {problem.error}"
        )
    return readable, replace(scan, rows=scan.rows + sum(p.rows_counted for p in known.values()), unreadable=unreadable)


def quarantine(job: Plan, unreadable: dict[str, Unreadable]) -> list[dict]:
    """Write one ``_rejected/`` record (reason ``unreadable_shard``) per unreadable shard; their manifest entries."""
    from pipeline.sink import write_rejected

    entries = [
        {"file": job.shards.relative(path), "error": job.cfg.redact(problem.error), "rows": problem.rows,
         "rows_counted": problem.rows_counted}
        for path, problem in unreadable.items()
    ]  # fmt: skip
    if entries:
        ids = list(job.passthrough_schema) or [pa.field(S.GENERATED_ID, pa.string())]
        records = []
        for e in entries:
            held = f"{e['rows']} rows by its footer" if e["rows"] is not None else f"{e['rows_counted']} rows read before it"
            records.append({"source_file": e["file"], "reason": str(S.Reason.UNREADABLE_SHARD), "detail": f"{e['error']}; {held}"})
        write_rejected(job.cfg.output.path, job.cfg.storage, S.rejected_schema(ids), records)
    return entries


def run_job(cfg: JobConfig, files: list[str] | None = None, job: Plan | None = None) -> dict:
    """Run the job on the current Ray cluster (started locally if none); return the manifest.

    ``files`` restricts the input to these shards (as listed by ``plan``), e.g. the ones
    a nightly run has not scored yet. ``job`` is a plan already made for the same input and
    model (a nightly run plans before it picks its shards and output): it is not made again,
    only its output is taken from ``cfg`` and its pools sized for this cluster.
    """
    import ray

    from pipeline.infer import InferWorker
    from pipeline.progress import Progress, StallError, Watchdog, stage_throughput
    from pipeline.sink import ParquetSink, evaluation, publish
    from pipeline.source import ShardDatasource
    from pipeline.storage import arrow_filesystem
    from pipeline.tokenize import TokenizeWorker, stage_tokenizer

    if not ray.is_initialized():
        ray.init()
    job = plan(cfg) if job is None else replace(job, cfg=cfg, pools=size_pools(cfg, *cluster_resources()))
    shards = replace(job.shards, files=files) if files is not None else job.shards
    started = time.time()
    out_fs, out_root = filesystem(cfg.output.path, cfg.storage)
    if cfg.output.mode == "overwrite" and out_fs.exists(out_root):
        out_fs.rm(out_root, recursive=True)
    out_fs.makedirs(out_root, exist_ok=True)
    shards, scan = scan_shards(job, shards)

    pools, execution = job.pools, cfg.execution
    progress = Progress.remote()
    # Ray 2.60 has no named parameter for these yet (it warns that ray_remote_args are deprecated).
    retries = {"max_restarts": execution.max_actor_restarts, "max_task_retries": execution.max_task_retries}
    ds = ray.data.read_datasource(ShardDatasource(shards, cfg.input, arrow_filesystem(shards.fs), job.passthrough_schema, scan.duplicates), num_cpus=READ_CPUS)
    ds = ds.map_batches(
        TokenizeWorker,
        fn_constructor_kwargs={"tokenizer": stage_tokenizer(job.model), "task": job.task, "progress": progress},
        batch_size=cfg.tokenize.batch_size,
        batch_format="pyarrow",
        num_cpus=pools.tokenize_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=pools.tokenize[0], max_size=pools.tokenize[1]),
        **retries,
    )
    ds = ds.map_batches(
        InferWorker,
        fn_constructor_kwargs={
            "model": job.model,
            "task": job.task,
            "inference": cfg.inference,
            "dtype": cfg.model.dtype,
            "num_threads": pools.threads,
            "progress": progress,
            "faults": cfg.faults,
        },
        batch_size=cfg.inference.batch_size,
        batch_format="pyarrow",
        num_cpus=pools.infer_cpus,
        num_gpus=pools.infer_gpus,
        compute=ray.data.ActorPoolStrategy(min_size=pools.infer[0], max_size=pools.infer[1]),
        **retries,
    )
    sink = ParquetSink(
        cfg.output.path,
        cfg.storage,
        job.output_schema(pa.schema([])),
        shards.passthrough,
        job.passthrough_schema,
        cfg.eval.label_column,
        job.task.evaluates,
        cfg.output.rows_per_file,
        progress,
    )
    watchdog = Watchdog(progress, execution.stall_timeout_s, pools.describe())
    try:
        with watchdog:
            ds.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS})
        stages = stage_throughput(ray.get(progress.snapshot.remote()))
    except BaseException as e:
        # Once the watchdog has fired (killing the stage actors and interrupting this thread),
        # whatever comes out of the run is the stall.
        if watchdog.diagnosis is None:
            cause = user_error(e)
            if cause is None:
                raise
            raise cause from None
        raise StallError(watchdog.diagnosis) from None
    finally:
        ray.kill(progress)
    wall = time.time() - started
    rows_in = scan.rows
    unreadable = quarantine(job, scan.unreadable)

    stats = sink.stats
    lost = sum(entry["rows_counted"] for entry in unreadable)
    rows_rejected = stats.rows_rejected + lost
    manifest = {
        "version": __version__,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "wall_s": round(wall, 3),
        "input_files": len(shards.files) + len(unreadable),
        "rows_in": rows_in,
        "rows_out": stats.rows_out,
        "rows_rejected": rows_rejected,
        "rejected_by_reason": {**stats.rejected_by_reason, **({str(S.Reason.UNREADABLE_SHARD): lost} if unreadable else {})},
        "partial": bool(unreadable),
        "shards_unreadable": unreadable,
        "rows_truncated": stats.rows_truncated,
        "real_tokens": stats.real_tokens,
        "padded_tokens": stats.padded_tokens,
        "padding_efficiency": round(stats.real_tokens / stats.padded_tokens, 4) if stats.padded_tokens else None,
        "rows_per_s": round((rows_in - lost) / wall, 2),  # rows read: not those of unreadable shards
        "tokens_per_s": round(stats.real_tokens / wall, 1),
        "files": sorted(stats.files),
        "rows_by_node": dict(stats.rows_by_node),
        "rows_by_actor_process": dict(stats.rows_by_actor),
        "stages": stages,
        "model": job.metadata(),
        "pools": pools.describe(),
        "config": cfg.public_dict(),
    }
    if cfg.eval.label_column:
        manifest["eval"] = evaluation(stats.confusion)
    if rows_in != stats.rows_out + rows_rejected:
        raise RowCountError(
            f"rows_in={rows_in} but rows_out={stats.rows_out} + rows_rejected={rows_rejected}: "
            f"the run is not published (no {S.SUCCESS})"
        )
    publish(cfg.output.path, cfg.storage, manifest)
    return manifest
