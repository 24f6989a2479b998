"""Plan and run a job: source -> tokenize -> infer -> sink, on whichever Ray cluster is current.

``plan`` does everything that can be checked before Ray starts (config, shards and their
schema, checkpoint and head, output location and what a run would do there, pool sizing)
and is what ``--dry-run`` prints. ``run_job`` takes the output's lease, executes the plan
with Ray Data (resuming what a killed run left) and commits it (``pipeline.commit``);
``execute`` is the part ``jobs.nightly`` shares.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import pyarrow as pa

from pipeline import __version__
from pipeline import schema as S
from pipeline.backends import require
from pipeline.checkpoint import ResolvedModel, actor_tokenizer, compute_dtype, resolve
from pipeline.commit import OutputError, Receipt, Resume, Writer, check_location, inspect_output
from pipeline.config import ConfigError, InputConfig, JobConfig
from pipeline.source import (
    InputError,
    InputScan,
    Shards,
    Unreadable,
    check_schema,
    check_text,
    open_input,
    open_shard,
    read_records,
    scan_input,
)
from pipeline.storage import check_access
from pipeline.tasks import Columns, Task, build

logger = logging.getLogger(__name__)

# Measured with MiniLM, 32 x 128 tokens, 2 threads (README: Fidelity gate): float32 0.54 s, bfloat16 0.16 s, float16 1.94 s.
CPU_FLOAT16 = "float16 has no fast CPU kernels (MiniLM: 3.6x slower than float32, 12x slower than bfloat16 here); use bfloat16 on CPUs"

READ_CPUS = 0.25  # read and write tasks are I/O bound; a small share keeps them schedulable beside the actors
WRITE_CPUS = 0.25
TOKENIZE_CPUS = 0.25  # a fast (Rust) tokenizer keeps up with a model actor on a fraction of a core


class RowCountError(RuntimeError):
    """Rows in != rows out + rows rejected: something was lost, so the run is not published."""


class FidelityError(ConfigError):
    """A reduced-precision run kept less of float32's outputs on its sample than ``model.min_fidelity`` asks."""


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
    on_cpus = cfg.model.backend != "torch"  # pipeline.backends: CPU runtimes
    if on_cpus and inference.num_gpus:
        raise ConfigError(f"model.backend {cfg.model.backend} runs on CPUs: set inference.num_gpus to 0, or use model.backend torch")
    num_gpus = inference.num_gpus if inference.num_gpus is not None else (1.0 if gpus and not on_cpus else 0.0)
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
    output: tuple[str, ...] = ()  # what a run would do at output.path (``commit.inspect_output``)
    fidelity: dict | None = None  # what the fidelity gate measured (``fidelity_gate``), for the manifest
    # Loaded on the driver once per plan, and kept by ``replace``: lowercase -> tokenizer (``tokenizer``).
    tokenizers: dict = field(default_factory=dict, repr=False, compare=False)

    def tokenizer(self, lowercase: bool):
        """What the tokenize workers get (``actor_tokenizer``): loaded once, shipped to the run's tokenize actors
        and to the fidelity gate's and the calibration's ``SampleScorer``."""
        if lowercase not in self.tokenizers:
            self.tokenizers[lowercase] = actor_tokenizer(self.model, lowercase)
        return self.tokenizers[lowercase]

    @property
    def dtype(self) -> str:
        """The dtype the model actors compute in: model.dtype, with auto resolved for this cluster."""
        return compute_dtype(self.cfg.model.dtype, "cuda" if self.pools.infer_gpus else "cpu")

    @property
    def variant(self) -> tuple[str, str]:
        """(model.backend, dtype) the model actors compute in: what the fidelity gate compares with ``REFERENCE``."""
        return self.cfg.model.backend, self.dtype

    def identity(self) -> dict:
        """What a resumed run must share with the killed one it resumes (``pipeline.commit``); the dtype
        too, as ``auto`` computes in float16 on a GPU cluster and in float32 on a CPU one."""
        identity = {
            "model_revision": self.model.fingerprint,
            "config_hash": self.cfg.fingerprint(),
            "input_path": self.cfg.input.path,
            "dtype": self.dtype,
        }
        if self.shards.dataset:  # a dataset's revision, config and split: the same path may hold other rows
            identity["input_dataset"] = self.shards.dataset.to_json()
        return identity

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
            "dtype": self.dtype,
            "backend": cfg.model.backend,
            "text_column": cfg.input.text_column,
            **({"input_dataset": self.shards.dataset.to_json()} if self.shards.dataset else {}),
            **self.task.metadata(),
        })

    def id_fields(self) -> list[pa.Field]:
        """The columns every output and rejected row leads with: a generated ``id`` when input.id_columns is
        unset, then the id, label and group columns passed through (the sink builds the same)."""
        generated = [] if self.cfg.input.id_columns else [pa.field(S.GENERATED_ID, pa.string())]
        return [*generated, *self.passthrough_schema]

    def output_schema(self, passthrough: pa.Schema) -> pa.Schema:
        return S.output_schema(list(passthrough), self.task.fields(), self.metadata())

    @property
    def dtype_warning(self) -> str | None:
        """Why the model actors' dtype will be slow on this cluster, if it will."""
        return CPU_FLOAT16 if self.dtype == "float16" and not self.pools.infer_gpus else None

    def describe(self) -> str:
        files, skipped = self.shards.files, self.shards.skipped
        lines = [
            f"input    {self.cfg.input.path}: {self.shards.describe()}"
            + ("" if self.shards.dataset else f" ({files[0]} ... {files[-1]})" if len(files) > 1 else f" ({files[0]})")
            + (f"; skipped, not shards: {list(skipped[:10])}{' ...' if len(skipped) > 10 else ''}" if skipped else ""),
            *self._dataset_lines(),
            f"columns  text={self.cfg.input.text_column!r}"
            + (f" pair={self.cfg.input.text_pair_column!r}" if self.cfg.input.text_pair_column else "")
            + f" passthrough={[*([] if self.cfg.input.id_columns else [S.GENERATED_ID + ' (generated)']), *self.shards.passthrough]}"
            + (f" schema={self.passthrough_schema}" if self.passthrough_schema else ""),
            f"model    {self.model.source} @ {self.model.fingerprint} ({self.model.architecture}, "
            f"max_length {self.model.max_length}, dtype {self.dtype}, backend {self.cfg.model.backend})",
            *([f"         WARNING {self.dtype_warning}"] if self.dtype_warning else []),
            f"task     {self.task.name} ({self.task.auto_model})",
            *(f"         {line}" for line in self.task.describe()),
        ]
        if self.model.id2label:
            lines.append(f"labels   {self.model.id2label}")
        lines += [
            f"output   {self.cfg.output.path} (mode {self.cfg.output.mode}), columns {self.output_schema(pa.schema(self.id_fields())).names}",
            *(f"         {line}" for line in self.output),
            f"pools    {self.pools.describe()}",
        ]
        lines += [
            f"UNREADABLE {self.shards.relative(path)}: {problem.error} (quarantined whole; the run will be partial)"
            for path, problem in self.unreadable.items()
        ]
        return self.cfg.redact("\n".join(lines))

    def _dataset_lines(self, shown: int = 20) -> list[str]:
        """What a dataset input resolved to, and its files (relative to its root, which generated ids use)."""
        dataset, files = self.shards.dataset, self.shards.files
        if dataset is None:
            return []
        names = [self.shards.relative(f) for f in files[:shown]]
        more = f" and {len(files) - shown} more" if len(files) > shown else ""
        return [f"dataset  {dataset.describe()}", f"files    {', '.join(names)}{more}"]


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


def plan(
    cfg: JobConfig,
    cpus: float | None = None,
    gpus: float | None = None,
    node_cpus: float | None = None,
    *,
    table: bool = True,
) -> Plan:
    """Validate everything that can be checked without running inference; see the module docstring.

    Pools are sized for the given resources, else for ``cluster_resources()``. ``table``: output.path
    is one output (jobs.run), whose contents are inspected; jobs.nightly checks its versions itself.
    """
    if cpus is None:
        cpus, gpus, node_cpus = cluster_resources()
    check_location(cfg.output.path, cfg.input.path)
    check_access(cfg.output.path, cfg.storage, write=True)
    passthrough = list(dict.fromkeys([*cfg.input.id_columns, *filter(None, [cfg.eval.label_column, cfg.input.group_column])]))
    shards = open_input(cfg.input, cfg.storage, passthrough)
    passthrough_schema, footer_rows, unreadable = check_schema(shards, cfg.input)
    require(cfg.model.backend)
    model = resolve(cfg.model, cfg.storage, cfg.tokenize.path)
    budget = cfg.inference.max_tokens_per_batch
    if budget != "auto" and budget < model.max_length:
        raise ConfigError(
            f"inference.max_tokens_per_batch={budget} is less than the max length of {model.max_length} tokens: "
            f"one full-length row would not fit in a forward pass. Set it to at least {model.max_length}, or auto"
        )
    pools = size_pools(cfg, cpus, gpus or 0.0, node_cpus)
    job = Plan(cfg, shards, passthrough_schema, footer_rows, model, build(cfg, model), pools, unreadable)
    clashes = set(passthrough) & set(job.output_schema(pa.schema([])).names)
    if clashes:
        raise ConfigError(
            f"input column(s) {sorted(clashes)} would collide with output columns of the same name; "
            "rename them in the input (e.g. a gold `label` column to `topic`)"
        )
    if not table:
        return job
    output = inspect_output(cfg.output.path, cfg.storage, identity=job.identity(), mode=cfg.output.mode)
    return replace(job, output=tuple(output))


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


def quarantine(job: Plan, writer: Writer, unreadable: dict[str, Unreadable]) -> tuple[list[dict], list[Receipt]]:
    """One ``_rejected/`` record (reason ``unreadable_shard``) per unreadable shard, staged for this run's
    commit; returns their manifest entries and the receipt of that file (none without unreadable shards).

    The receipt counts each shard's ``rows_counted`` as rejected rows and names no input rows, so a
    resumed run never skips such a shard; it is not written to the staging, so a killed run's
    quarantine is redone, not kept.
    """
    from pipeline.sink import WriteStats, write_rejected

    entries = [
        {"file": job.shards.relative(path), "error": job.cfg.redact(problem.error), "rows": problem.rows,
         "rows_counted": problem.rows_counted}
        for path, problem in unreadable.items()
    ]  # fmt: skip
    if not entries:
        return [], []
    ids = job.id_fields()
    records = []
    for e in entries:
        held = f"{e['rows']} rows by its footer" if e["rows"] is not None else f"{e['rows_counted']} rows read before it"
        records.append({"source_file": e["file"], "reason": str(S.Reason.UNREADABLE_SHARD), "detail": f"{e['error']}; {held}"})
    part = f"part-{writer.run_id}-quarantined.parquet"
    write_rejected(writer.staging_uri, job.cfg.storage, part, S.rejected_schema(ids), records)
    lost = sum(e["rows_counted"] for e in entries)
    stats = WriteStats(rows_rejected=lost, rejected_by_reason=Counter({str(S.Reason.UNREADABLE_SHARD): lost}))
    receipt = Receipt(run=writer.run_id, part=part, data_rows=0, rejected_rows=len(records), rows={}, stats=stats.to_json())
    return entries, [receipt]


def run_job(cfg: JobConfig, files: list[str] | None = None, job: Plan | None = None) -> dict:
    """Run the job on the current Ray cluster (started locally if none) and commit it; return the manifest.

    Holds the lease of ``output.path`` throughout, resumes what a killed run with the same model,
    config and input staged there, and replaces the committed output (``output.mode: overwrite``)
    only once this run has committed. ``files`` restricts the input to these shards (as listed by
    ``plan``). ``job`` is a plan already made for the same input and model: it is not made again,
    only its pools are sized for this cluster.
    """
    import ray

    if not ray.is_initialized():
        ray.init()
    job = plan(cfg) if job is None else replace(job, cfg=cfg, pools=size_pools(cfg, *cluster_resources()))
    shards = replace(job.shards, files=files) if files is not None else job.shards
    with Writer(cfg.output.path, cfg) as writer:
        if cfg.output.mode == "error" and writer.manifest is not None:  # committed since the plan looked
            raise OutputError(f"output.path {cfg.output.path} already holds run {writer.manifest['run']}: set output.mode: overwrite")
        sizes = {shards.relative(f): shards.sizes[f] for f in shards.files}
        resume = writer.resume(job.identity(), sizes, keep=job.task.group_by is None)
        manifest, receipts = execute(job, shards, writer, resume)
        return writer.commit(manifest, receipts, replace=True)


def execute(job: Plan, shards: Shards, writer: Writer, resume: Resume) -> tuple[dict, list[Receipt]]:
    """Score ``shards`` into the writer's staging, skipping the rows ``resume`` kept; return the run's
    manifest (statistics over kept and new parts) and every part's receipt, ready to commit.

    Parts kept from a killed run fix the task's calibration (``Task.calibrated_like``), so that old and
    new parts agree. Raises ``RowCountError`` unless rows in == rows out + rows rejected.
    """
    from pipeline.sink import WriteStats, evaluation

    cfg = job.cfg
    if job.dtype_warning:
        logger.warning("model.dtype: %s", job.dtype_warning)
    started = time.time()
    shards, scan = scan_shards(job, shards)
    kept_part = next((r for r in resume.receipts if r.data_rows), None)
    if kept_part is not None:
        job = replace(job, task=job.task.calibrated_like(writer.part_metadata(kept_part)))
    # Parquet shards whose every row is in a kept part are not read at all; others skip row by row.
    todo = [f for f in shards.files if resume.skip.get(shards.relative(f)) != [(0, job.footer_rows.get(f, -1))]]
    receipts, stages = [], {}
    if todo:
        job, receipts, stages = _stream(job, replace(shards, files=todo), writer, scan, resume)
    wall = time.time() - started
    unreadable, quarantined = quarantine(job, writer, scan.unreadable)

    kept = [*resume.receipts, *receipts, *quarantined]
    stats, scored = WriteStats.total(kept), WriteStats.total(receipts)
    rows_scored = scored.rows_out + scored.rows_rejected
    manifest = {
        "version": __version__,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "wall_s": round(wall, 3),
        "input_files": len(shards.files) + len(unreadable),
        "files_skipped": list(shards.skipped),
        "rows_in": scan.rows,
        "rows_out": stats.rows_out,
        "rows_rejected": stats.rows_rejected,
        **({"documents_out": stats.rows_out, "chunks_out": stats.chunks_out} if job.task.chunked else {}),
        "rows_resumed": resume.rows,
        "rows_scored": rows_scored,
        "rejected_by_reason": dict(stats.rejected_by_reason),
        "partial": bool(unreadable),
        "shards_unreadable": unreadable,
        "rows_truncated": stats.rows_truncated,
        "real_tokens": stats.real_tokens,
        "padded_tokens": stats.padded_tokens,
        "padding_efficiency": round(stats.real_tokens / stats.padded_tokens, 4) if stats.padded_tokens else None,
        "rows_per_s": round(rows_scored / wall, 2),  # this run's own rows: resumed ones cost it nothing
        "tokens_per_s": round(scored.real_tokens / wall, 1),
        "rows_by_node": dict(stats.rows_by_node),
        "rows_by_actor_process": dict(stats.rows_by_actor),
        "stages": stages,
        "model": job.metadata(),
        "fidelity": job.fidelity
        or {"backend": cfg.model.backend, "dtype": job.dtype, "skipped": "every row was kept from a killed run"},
        "pools": job.pools.describe(),
        "config": cfg.public_dict(),
    }
    if cfg.eval.label_column:
        manifest["eval"] = evaluation(stats.confusion)
    if scan.rows != stats.rows_out + stats.rows_rejected:
        raise RowCountError(
            f"rows_in={scan.rows} but rows_out={stats.rows_out} + rows_rejected={stats.rows_rejected}: "
            f"the run is not committed (no {S.MANIFEST})"
        )
    return manifest, kept


def _stream(job: Plan, shards: Shards, writer: Writer, scan: InputScan, resume: Resume) -> tuple[Plan, list[Receipt], dict]:
    """The Ray Data pipeline over ``shards``, calibrating the task first if it needs it: (the job as it
    ran, the receipts of the parts it wrote, per-stage throughput)."""
    import ray

    from pipeline.progress import Progress, StallError, Watchdog, stage_throughput
    from pipeline.sink import ParquetSink
    from pipeline.source import READ_BATCH_ROWS, ShardDatasource
    from pipeline.storage import arrow_filesystem

    cfg, pools, execution = job.cfg, job.pools, job.cfg.execution
    # Stage actors keep Ray Data's fault tolerance (restart, retry the batch); Progress bounds the restarts.
    progress = Progress.remote(execution.max_actor_restarts)
    interactive = sys.stdout.isatty()
    rows = scan.rows - resume.rows - sum(u.rows_counted for u in scan.unreadable.values())  # what this stream reads
    watchdog = Watchdog(
        progress, execution.stall_timeout_s, pools.describe(), rows=rows, log_every_s=None if interactive else 30
    )
    try:
        with watchdog:
            job = fidelity_gate(job, shards, progress)
            job = calibrate(job, shards, progress)
            # Blocks no larger than a part: a part (and so what a killed run leaves to redo) holds about rows_per_file rows.
            block_rows = min(READ_BATCH_ROWS, cfg.output.rows_per_file)
            fs = arrow_filesystem(shards.fs)
            source = ShardDatasource(shards, cfg.input, fs, job.passthrough_schema, scan.duplicates, resume.skip, block_rows)
            ds = ray.data.read_datasource(source, num_cpus=READ_CPUS)
            if not interactive:  # a log gets the watchdog's progress lines, not a block of progress bars every 10 s
                ds.context.enable_progress_bars = False
            sink = ParquetSink(
                writer.staging_uri,
                writer.run_id,
                cfg.storage,
                job.output_schema(pa.schema([])),
                shards.passthrough,
                job.passthrough_schema,
                cfg.eval.label_column,
                job.task.evaluates,
                cfg.output.rows_per_file,
                progress,
            )
            model_stages(ds, job, progress).write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS})
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
    return job, sink.receipts, stages


def model_stages(ds, job: Plan, progress):
    """``ds`` (source rows) through the tokenize and model actor pools of ``job``: the task's columns."""
    import ray

    from pipeline.infer import InferWorker
    from pipeline.tokenize import TokenizeWorker

    cfg, pools = job.cfg, job.pools
    ds = ds.map_batches(
        TokenizeWorker,
        fn_constructor_kwargs={
            "tokenizer": job.tokenizer(job.task.tokenization.lowercase),
            "model": job.model,
            "task": job.task,
            "progress": progress,
        },
        batch_size=cfg.tokenize.batch_size,
        batch_format="pyarrow",
        num_cpus=pools.tokenize_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=pools.tokenize[0], max_size=pools.tokenize[1]),
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
            "backend": cfg.model.backend,
        },
        batch_size=cfg.inference.batch_size,
        batch_format="pyarrow",
        num_cpus=pools.infer_cpus,
        num_gpus=pools.infer_gpus,
        compute=ray.data.ActorPoolStrategy(min_size=pools.infer[0], max_size=pools.infer[1]),
    )
    if job.task.group_by is None:
        return ds
    # Columns over whole groups (a rank): every scored row of a group in one call, wherever it was scored.
    return ds.groupby(job.task.group_by).map_groups(job.task.finish_group, batch_format="pyarrow", num_cpus=READ_CPUS)


CALIBRATION_SHARDS = 16  # a calibration sample takes the first rows of this many shards, spread over the input


def sample_rows(shards: Shards, cfg: InputConfig, rows: int) -> pa.Table:
    """Up to ``rows`` valid rows of the input (text, and text pair if configured), read on the driver, the
    same on every run: the first ones of ``CALIBRATION_SHARDS`` shards spread evenly over the listing, then
    of the others while it is short."""
    step = max(1, math.ceil(len(shards.files) / CALIBRATION_SHARDS))
    spread = shards.files[::step]
    quota = math.ceil(rows / len(spread))
    columns = [c for c in (cfg.text_column, cfg.text_pair_column) if c]
    texts: list[list[str]] = []
    for path in [*spread, *(f for f in shards.files if f not in spread)]:
        taken = 0
        with open_shard(shards, path) as f:
            for _, record, problem in read_records(f, shards.format_of(path), columns):
                checked = [check_text((record or {}).get(c), cfg.max_text_bytes) for c in columns]
                if problem is None and all(reason is None for _, reason, _ in checked):
                    texts.append([text for text, _, _ in checked])
                    taken += 1
                if taken == quota or len(texts) == rows:
                    break
        if len(texts) == rows:
            break
    table = {S.TEXT: pa.array([t[0] for t in texts], pa.string())}
    if cfg.text_pair_column:
        table[S.TEXT_PAIR] = pa.array([t[1] for t in texts], pa.string())
    return pa.table({**table, S.ERROR: pa.nulls(len(texts), pa.string())})


REFERENCE = ("torch", "float32")  # the fidelity gate's (backend, dtype)


def score_sample(job: Plan, sample: pa.Table, progress, task: Task, variants: tuple[tuple[str, str], ...]) -> list[Columns]:
    """``task``'s columns for the rows of ``sample``, in its order, once per (backend, dtype) of ``variants``,
    scored by the stages' own code in one ``SampleScorer`` actor on the model actors' resources (their GPU, if
    they have one): one process, not a pipeline per variant. ``task`` must not group rows (``Task.group_by``).
    The actor is killed after it, so no idle process keeps the model's memory or a CUDA context while the run
    starts."""
    import ray

    pools = job.pools
    scorer = ray.remote(num_cpus=pools.infer_cpus, num_gpus=pools.infer_gpus, max_restarts=-1, max_task_retries=-1)
    actor = scorer(SampleScorer).remote()
    tokenizer = job.tokenizer(task.tokenization.lowercase)
    try:
        return ray.get(
            actor.score.remote(sample, tokenizer, job.model, task, job.cfg.inference, job.cfg.faults, variants, pools.threads, progress)
        )
    finally:
        ray.kill(actor)


class SampleScorer:
    """``score_sample``'s actor. Like the run's stage actors, it registers with ``Progress`` (so the watchdog
    can kill it, and ``execution.max_actor_restarts`` bounds its restarts)."""

    def score(self, sample: pa.Table, tokenizer, model: ResolvedModel, task: Task, inference, faults, variants, threads: int, progress) -> list[Columns]:
        """``TokenizeWorker`` over ``sample``, then an ``InferWorker`` per (backend, dtype), each freed before the next loads."""
        from pipeline.infer import InferWorker
        from pipeline.progress import SAMPLE_STAGES
        from pipeline.tokenize import TokenizeWorker

        tokenize, infer = SAMPLE_STAGES
        tokenized = TokenizeWorker(tokenizer, model, task, progress, tokenize)(sample)
        scored = (
            InferWorker(model, task, inference, dtype, threads, progress, faults, infer, backend)(tokenized)
            for backend, dtype in variants
        )
        return [_columns(task, table) for table in scored]


def _columns(task: Task, table: pa.Table) -> Columns:
    """The task's fields of a scored table: fixed-size lists as (rows, size) arrays, the rest as lists."""
    outputs = {}
    for f in task.fields():
        column = table[f.name].combine_chunks()
        if isinstance(f.type, pa.FixedSizeListType):
            outputs[f.name] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, f.type.list_size)
        else:
            outputs[f.name] = column.to_pylist()
    return outputs


def calibrate(job: Plan, shards: Shards, progress) -> Plan:
    """``job`` with its task calibrated (``Task.calibration``) on a sample of the input (``score_sample``);
    ``job`` itself when the task needs no calibration."""
    calibration = job.task.calibration()
    if calibration is None:
        return job
    rows, probe = calibration
    sample = sample_rows(shards, job.cfg.input, rows)
    if not sample.num_rows:  # not one valid row: nothing will be scored, so nothing needs calibrating
        return job
    (scored,) = score_sample(job, sample, progress, probe, (job.variant,))
    return replace(job, task=job.task.calibrated(scored))


def fidelity_gate(job: Plan, shards: Shards, progress) -> Plan:
    """``job`` with the fidelity gate's record (README: Fidelity gate): unless the run computes in torch float32,
    ``model.fidelity_rows`` rows of its input scored in torch float32 and in its own backend and dtype
    (``score_sample``), compared by the task (``Task.fidelity``). Raises ``FidelityError``, before anything is
    written, for a figure below its ``model.min_fidelity`` threshold."""
    model, variant = job.cfg.model, job.variant
    record = {"backend": variant[0], "dtype": variant[1], "reference": " ".join(REFERENCE)}
    if variant == REFERENCE:
        return replace(job, fidelity={**record, "skipped": "torch float32 is the reference"})
    if not model.fidelity_rows:
        return replace(job, fidelity={**record, "skipped": "model.fidelity_rows is 0"})
    sample = sample_rows(shards, job.cfg.input, model.fidelity_rows)
    if not sample.num_rows:  # not one valid row: nothing will be scored
        return replace(job, fidelity={**record, "skipped": "no valid input row"})
    probe = job.task.fidelity_probe()
    reference, scored = score_sample(job, sample, progress, probe, (REFERENCE, variant))
    figures = probe.fidelity(scored, reference)
    limits = model.min_fidelity.model_dump()
    gated = {name: limits[name] for name, value in figures.items() if name in limits and value is not None}
    for name, limit in gated.items():
        if figures[name] < limit:
            raise FidelityError(
                f"fidelity gate: {' '.join(variant)} reached {name}={figures[name]:.6g} against {record['reference']} "
                f"on {sample.num_rows} rows of the input, below model.min_fidelity.{name}={limit:g}; nothing was "
                f"written. Run in float32 (model.dtype) on torch (model.backend), or accept the loss: "
                f"--set model.min_fidelity.{name}=<lower>"
            )
    return replace(job, fidelity={**record, "rows": sample.num_rows, **figures, "thresholds": gated, "passed": True})
