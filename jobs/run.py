"""Run one batch-inference job: ``python -m jobs.run --config configs/<job>.yaml``.

Runs on a local Ray instance when RAY_ADDRESS is unset, on that cluster otherwise, and
works unchanged as a ``ray job submit`` entrypoint. When stdout is not a terminal (a log
file, CI, a submitted job), progress is one line of rows per stage every 30 s instead of
Ray Data's progress bars.

Exit status: 0 done; 1 a stage stalled (``execution.stall_timeout_s``: one line on stderr with
the diagnosis, nothing published) or the run failed otherwise (a traceback); 2 the config, input,
checkpoint or output cannot run (one line on stderr names the key or file and the fix; nothing
started, or nothing published); 3 PARTIAL: the run published, but quarantined shards it could not
read (listed in the summary and the manifest's ``shards_unreadable``), so a scheduler can alert on it.

    python -m jobs.run --config configs/bbc_embed.yaml
    python -m jobs.run --config configs/bbc_embed.yaml --set model.dtype=bfloat16
    python -m jobs.run --config configs/bbc_embed.yaml --dry-run
"""

from __future__ import annotations

import argparse
import sys

from jobs import argument_parser, log_to_stdout
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, JobConfig, config_reference, load_config
from pipeline.progress import StallError
from pipeline.run import plan, run_job
from pipeline.source import InputError
from pipeline.storage import StorageError

USER_ERRORS = (ConfigError, CheckpointError, InputError, StorageError)
USER_ERROR = 2
RUN_FAILURES = (StallError,)  # not the user's mistake, but a diagnosis, not a traceback
RUN_FAILED = 1
PARTIAL = 3


def report(error: Exception, cfg: JobConfig | None = None) -> int:
    """Print a user error or a run failure as one line on stderr, secrets masked; the exit status for it."""
    message = cfg.redact(str(error)) if cfg is not None else str(error)
    print(f"error: {message}", file=sys.stderr)
    return RUN_FAILED if isinstance(error, RUN_FAILURES) else USER_ERROR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser("python -m jobs.run", __doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="YAML job config (required; see README: Config reference)")
    what.add_argument("--config-reference", action="store_true", help="print every config key as Markdown, and exit")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.dtype=bfloat16 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    return parser.parse_args(argv)


def reference_table() -> str:
    """The README's config reference, from the pydantic field descriptions."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | `{default}` | {text} |" for key, default, text in config_reference()]
    return "\n".join(lines)


def summary(manifest: dict) -> str:
    """The one-screen summary printed after a run."""
    unreadable = manifest.get("shards_unreadable", [])
    rows = [
        ("status", f"PARTIAL: {len(unreadable)} unreadable shard(s) quarantined whole" if unreadable else "complete"),
        *((f"  unreadable {u['file']}", u["error"]) for u in unreadable),
        ("rows in / out / rejected", f"{manifest['rows_in']} / {manifest['rows_out']} / {manifest['rows_rejected']}"),
        ("rows kept / scored", f"{manifest['rows_resumed']} kept from a killed run / {manifest['rows_scored']} scored"),
        ("rejected by reason", manifest["rejected_by_reason"] or "-"),
        ("rows truncated", manifest["rows_truncated"]),
        ("wall time", f"{manifest['wall_s']:.1f} s"),
        ("throughput", f"{manifest['rows_per_s']:.1f} rows/s, {manifest['tokens_per_s']:.0f} tokens/s"),
        ("padding efficiency", manifest["padding_efficiency"]),
        ("model", f"{manifest['model']['model_path']} @ {manifest['model']['model_revision']}"),
    ]
    if "eval" in manifest:
        rows.append(("accuracy", f"{manifest['eval']['accuracy']:.4f}"))
    rows.append(("output", manifest["config"]["output"]["path"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.config_reference:
        print(reference_table())
        return 0
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            job = plan(cfg)
            print(job.describe())
            if job.unreadable:
                print(f"dry run: {len(job.unreadable)} shard(s) cannot be read: the run would quarantine them and be PARTIAL")
                return PARTIAL
            print(
                "dry run: config, checkpoint, output and input (schema, footers, first lines of every shard) are valid; "
                "nothing was started. The run reads every shard whole before it starts its actors"
            )
            return 0
        manifest = run_job(cfg)
    except (*USER_ERRORS, *RUN_FAILURES) as e:
        return report(e, cfg)
    print("\n" + summary(manifest))
    return PARTIAL if manifest["partial"] else 0


if __name__ == "__main__":
    log_to_stdout()
    sys.exit(main())
