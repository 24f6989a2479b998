"""jobs.submit: its builders. Real submissions through the Jobs API are in test_cluster_job.py, on its cluster."""

from __future__ import annotations

import shlex

import pytest
from ray.job_submission import JobInfo, JobStatus

from jobs.submit import build_entrypoint, build_runtime_env, main, outcome, parse_args, shown_entrypoint



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
