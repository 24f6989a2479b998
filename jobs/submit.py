"""Submit a job to a running Ray cluster through the Ray Jobs API and follow it to the end.

    python -m jobs.submit --address http://HEAD:8265 --config configs/bbc_classify.yaml \\
        --set inference.pool.max_size=8 --working-dir . --env HF_HUB_OFFLINE=1
    python -m jobs.submit --address http://HEAD:8265 --config configs/nightly_s3.yaml \\
        --entrypoint-module jobs.nightly -- --date 2026-01-01

Runs ``python -m jobs.run --config ... --set ...`` as the job's driver on the head node,
prints the submission id at once, streams the driver's logs and exits 0 only if the job
SUCCEEDED (3 if its driver exited 3, a PARTIAL run: see ``jobs.run``; 1 if it failed otherwise
or was stopped; 2 if it could not be submitted, e.g. for a malformed ``--set``). Ctrl-C stops
following; the job keeps running (``ray job stop ID`` stops it). The printed entrypoint masks
secrets: ``--set`` values of secret keys (``storage.key``, ``storage.secret``) and values of
secret-looking environment variables (``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``, ``*_KEY``).

Token authentication is left to Ray's client: with RAY_AUTH_MODE=token it sends the token
from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Like ``ray job submit``, it
sends no token unless RAY_AUTH_MODE=token is set.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from ray.exceptions import AuthenticationError
from ray.job_submission import JobInfo, JobStatus, JobSubmissionClient
from ray.runtime_env import RuntimeEnv

from jobs import argument_parser
from pipeline.config import ConfigError, apply_overrides, environment_secrets, redact, redact_override

DEFAULT_MODULE = "jobs.run"
PARTIAL = 3  # jobs.run / jobs.nightly: published, with unreadable shards quarantined


def key_value(item: str) -> tuple[str, str]:
    """Parse ``KEY=VALUE`` (the value may contain ``=``)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser("python -m jobs.submit", __doc__)
    parser.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://HEAD:8265")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="job config, as a path on the cluster (relative to --working-dir if given)")
    what.add_argument("--entrypoint", help="run this shell command instead of `python -m MODULE --config ...`")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed on to the job (repeatable)")
    parser.add_argument("--entrypoint-module", default=DEFAULT_MODULE, metavar="MODULE",
                        help=f"module run with --config, e.g. jobs.nightly (default: {DEFAULT_MODULE})")
    parser.add_argument("--working-dir", help="local directory uploaded as the job's working directory "
                        "(.gitignore'd files are skipped); omit when the cluster's image has the code")
    parser.add_argument("--pip", nargs="+", default=[], metavar="REQUIREMENT",
                        help="extra pip requirements installed for the job")
    parser.add_argument("--image", help="container image to run the job's workers in (runtime_env image_uri; "
                        "cannot be combined with --working-dir or --pip)")
    parser.add_argument("--env", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job's processes (repeatable)")
    parser.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    parser.add_argument("module_args", nargs="*", metavar="-- ARG",
                        help="further arguments for the module, e.g. -- --date 2026-01-01 for jobs.nightly")
    args = parser.parse_args(argv)
    if args.entrypoint and (args.overrides or args.module_args):
        parser.error("--set and module arguments go with --config, not --entrypoint")
    return args


def build_entrypoint(
    config: str, overrides: Sequence[str] = (), module: str = DEFAULT_MODULE, module_args: Sequence[str] = ()
) -> str:
    """The job's shell command, safely quoted: ``python -m MODULE --config CONFIG [--set K=V ...] [ARG ...]``."""
    argv = ["python", "-m", module, "--config", config]
    for override in overrides:
        argv += ["--set", override]
    return shlex.join([*argv, *module_args])


def shown_entrypoint(args: argparse.Namespace) -> str:
    """The entrypoint as printed: values of secret ``--set`` keys and of secret-looking environment variables masked."""
    shown = args.entrypoint or build_entrypoint(
        args.config, [redact_override(o) for o in args.overrides], args.entrypoint_module, args.module_args
    )
    return redact(shown, environment_secrets())


def build_runtime_env(
    working_dir: str | None = None,
    pip: Sequence[str] = (),
    image: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The job's runtime_env with only the fields given; Ray's validation applies.

    Raises:
        ValueError: for combinations Ray rejects (e.g. ``image`` with ``pip``).
    """
    fields = {"working_dir": working_dir, "pip": list(pip) or None, "image_uri": image, "env_vars": env_vars or None}
    return dict(RuntimeEnv(**{k: v for k, v in fields.items() if v is not None}))


async def stream_logs(client: JobSubmissionClient, job_id: str) -> None:
    """Print the job's logs as they arrive, until the job ends."""
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def wait_until_done(client: JobSubmissionClient, job_id: str, poll_s: float = 1.0) -> JobInfo:
    """The job's info once it is SUCCEEDED, FAILED or STOPPED (the log stream may close a moment earlier)."""
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        time.sleep(poll_s)
    return info


def outcome(job_id: str, info: JobInfo) -> str:
    """One line on how the job ended; a failed driver's logs were streamed already, so just its exit code."""
    if info.status == JobStatus.SUCCEEDED:
        return f"job {job_id} SUCCEEDED"
    if info.driver_exit_code == PARTIAL:
        return f"job {job_id} PARTIAL: it published, but quarantined input shards it could not read (driver exit code 3)"
    if info.driver_exit_code:
        return f"job {job_id} {info.status.value}: the driver exited with code {info.driver_exit_code}"
    return f"job {job_id} {info.status.value}: {info.message}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entrypoint = args.entrypoint or build_entrypoint(
        args.config, args.overrides, args.entrypoint_module, args.module_args
    )
    try:
        apply_overrides({}, args.overrides)  # a malformed --set fails here, not on the cluster
        runtime_env = build_runtime_env(args.working_dir, args.pip, args.image, dict(args.env))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        client = JobSubmissionClient(args.address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except (AuthenticationError, ConnectionError, RuntimeError) as e:
        print(f"error: could not submit to {args.address}: {e}", file=sys.stderr)
        return 2
    print(f"submitted {job_id}: {shown_entrypoint(args)}", flush=True)
    if args.no_wait:
        return 0

    try:
        asyncio.run(stream_logs(client, job_id))
        info = wait_until_done(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following {job_id}; it keeps running (stop it with: ray job stop {job_id})", file=sys.stderr)
        return 130
    print(outcome(job_id, info))
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return PARTIAL if info.driver_exit_code == PARTIAL else 1


if __name__ == "__main__":
    sys.exit(main())
