"""jobs.submit: its builders (fast), and real submissions through the Jobs API of a 2-node cluster."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import LocalCluster
from ray.job_submission import JobInfo, JobStatus

from jobs.submit import build_entrypoint, build_runtime_env, main, outcome, parse_args, shown_entrypoint

REPO = Path(__file__).resolve().parents[1]


def test_entrypoint_runs_the_module_with_config_overrides_and_args_quoted() -> None:
    overrides = ["model.dtype=bfloat16", "input.path=s3://b/x y/"]
    entrypoint = build_entrypoint("configs/my job.yaml", overrides, "jobs.nightly", ["--date", "2026-01-01"])
    assert shlex.split(entrypoint) == [
        "python", "-m", "jobs.nightly", "--config", "configs/my job.yaml",
        "--set", "model.dtype=bfloat16", "--set", "input.path=s3://b/x y/", "--date", "2026-01-01",
    ]  # fmt: skip


def test_the_printed_entrypoint_masks_secrets(monkeypatch) -> None:
    monkeypatch.setenv("MY_API_TOKEN", "tok-PLANTED-1234")
    args = parse_args(
        ["--address", "http://h:8265", "--config", "c.yaml", "--set", "storage.secret=s3cr3t-PLANTED",
         "--set", "storage.key=AKIA-PLANTED", "--set", "output.path=s3://b/tok-PLANTED-1234/out"]
    )  # fmt: skip
    shown = shown_entrypoint(args)
    assert "PLANTED" not in shown
    assert "storage.secret=***" in shown and "storage.key=***" in shown and "output.path=s3://b/***/out" in shown
    assert "s3cr3t-PLANTED" in build_entrypoint(args.config, args.overrides)  # the job itself gets the value


def test_a_malformed_set_fails_before_submitting(capsys) -> None:
    # Nothing listens on port 9: the submission would fail with "could not submit", not this.
    assert main(["--address", "http://127.0.0.1:9", "--config", "c.yaml", "--set", "storage.secret=[s3cr3t-PLANTED"]) == 2
    err = capsys.readouterr().err
    assert "--set storage.secret: the value is not valid YAML" in err and "PLANTED" not in err


def test_runtime_env_holds_only_the_fields_given() -> None:
    assert build_runtime_env() == {}
    env = build_runtime_env(working_dir=".", pip=["faiss-cpu>=1.8"], env_vars={"HF_HUB_OFFLINE": "1"})
    assert env["working_dir"] == "."
    assert env["pip"]["packages"] == ["faiss-cpu>=1.8"]
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1"}
    assert build_runtime_env(image="ghcr.io/encoder-batch/encoder-batch:0.1.0") == {
        "image_uri": "ghcr.io/encoder-batch/encoder-batch:0.1.0"
    }


def test_runtime_env_rejects_what_ray_rejects() -> None:
    with pytest.raises(ValueError, match="image_uri"):
        build_runtime_env(pip=["x"], image="ghcr.io/encoder-batch/encoder-batch:0.1.0")


def test_cli_parses_env_pairs_and_module_args() -> None:
    args = parse_args(
        ["--address", "http://h:8265", "--config", "c.yaml", "--env", "A=x=y", "--entrypoint-module", "jobs.nightly",
         "--", "--date", "2026-01-01"]
    )  # fmt: skip
    assert args.env == [("A", "x=y")]
    assert args.module_args == ["--date", "2026-01-01"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--address", "http://h:8265"],  # neither --config nor --entrypoint
        ["--address", "http://h:8265", "--config", "c.yaml", "--entrypoint", "true"],
        ["--address", "http://h:8265", "--entrypoint", "true", "--set", "a=1"],
        ["--address", "http://h:8265", "--config", "c.yaml", "--env", "NOVALUE"],
    ],
)
def test_cli_rejects_inconsistent_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("info", "line"),
    [
        (JobInfo(JobStatus.SUCCEEDED, "e", driver_exit_code=0), "job j SUCCEEDED"),
        (JobInfo(JobStatus.FAILED, "e", message="...logs...", driver_exit_code=1),
         "job j FAILED: the driver exited with code 1"),
        (JobInfo(JobStatus.FAILED, "e", message="...logs...", driver_exit_code=3),
         "job j PARTIAL: it published, but quarantined input shards it could not read (driver exit code 3)"),
        (JobInfo(JobStatus.FAILED, "e", message="runtime env setup failed"), "job j FAILED: runtime env setup failed"),
        (JobInfo(JobStatus.STOPPED, "e", message="Job was intentionally stopped."),
         "job j STOPPED: Job was intentionally stopped."),
    ],
)  # fmt: skip
def test_outcome_names_the_status_and_why(info: JobInfo, line: str) -> None:
    assert outcome("j", info) == line


# ---- against a real cluster ---------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import os, sys
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init()

    @ray.remote(num_cpus=1)
    def node_id():
        return ray.get_runtime_context().get_node_id()

    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    pinned = [node_id.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
              for n in alive]
    print("nodes that ran a task:", len(set(ray.get(pinned))))
    print("greeting:", os.environ["GREETING"])
    print("driver python:", sys.executable)
    """
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(num_workers=1) as c:
        yield c


def submit(cluster: LocalCluster, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--address", cluster.dashboard_url, *args],
        env=cluster.env if env is None else env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.cluster
def test_job_succeeds_across_both_nodes_with_its_runtime_env(cluster: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    result = submit(cluster, "--entrypoint", "python probe.py", "--working-dir", str(tmp_path), "--env", "GREETING=hi")

    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"^submitted (raysubmit_\w+): python probe.py$", result.stdout, re.M).group(1)
    assert "nodes that ran a task: 2" in result.stdout  # logs are streamed back
    assert "greeting: hi" in result.stdout
    assert f"driver python: {Path(sys.executable).parent}" in result.stdout  # the head's PATH picks the venv
    assert result.stdout.rstrip().endswith(f"job {job_id} SUCCEEDED")


@pytest.mark.cluster
def test_failing_job_exits_nonzero_with_its_logs_and_status(cluster: LocalCluster) -> None:
    result = submit(cluster, "--entrypoint", "python -c 'import sys; print(\"about to fail\"); sys.exit(5)'")

    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^submitted raysubmit_\w+", result.stdout, re.M)
    assert "about to fail" in result.stdout
    assert re.search(r"^job raysubmit_\w+ FAILED: the driver exited with code 5$", result.stdout, re.M)


@pytest.mark.cluster
def test_submission_without_the_token_is_refused(cluster: LocalCluster) -> None:
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH_")}
    result = submit(cluster, "--entrypoint", "true", env=env)

    assert result.returncode == 2
    assert "Authentication required" in result.stderr
    assert "submitted" not in result.stdout
