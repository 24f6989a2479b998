"""A real job on a real 2-node cluster with token auth, submitted the way users submit it.

``ray job submit --working-dir . -- python -m jobs.run --config JOB.yaml``, with the token from the
environment: the job succeeds, its output is complete and equals a direct forward pass, a model
actor on each node scored rows, and only the code was uploaded. ``jobs.submit``, which makes the same
Jobs API calls, is exercised against the same cluster at the end (one cluster start for both).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from cluster import RAY, LocalCluster
from conftest import forward, sentence
from transformers import AutoModelForSequenceClassification

from pipeline import read_output
from pipeline import schema as S

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
SHARDS, ROWS = 8, 20
NEVER_UPLOADED = {".venv", "data", "out"}  # .gitignore'd, so Ray leaves them out of --working-dir
MAX_UPLOAD_BYTES = 4 << 20
# Ray Data lets rows flow only once both model actors are up: the first to load cannot take them all.
RUNTIME_ENV = {"env_vars": {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "60"}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(num_workers=1) as c:
        yield c


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Parquet shards on local disk, which both nodes (on this machine) can read."""
    rng = random.Random(5)
    root = tmp_path_factory.mktemp("cluster-input")
    for shard in range(SHARDS):
        ids = [f"doc-{shard}-{row}" for row in range(ROWS)]
        table = pa.table({"doc_id": ids, "text": [sentence(rng) for _ in ids]})
        pq.write_table(table, root / f"part-{shard}.parquet")
    return root


def write_config(path: Path, shards: Path, model_dir: Path, out: Path) -> Path:
    """Two model actors of 0.6 CPU: no two fit on one 1-CPU node, so each node runs one.

    The tokenizer's 0.25 CPU fits beside either (the defaults, 0.62 and 0.5 CPU, do not: the second
    model actor would wait for the tokenizer to exit). One batch per shard, each held for a second,
    so that no actor can take them all (Ray Data gives an actor at most two at a time).
    """
    raw = {
        "input": {"path": str(shards), "id_columns": ["doc_id"]},
        "model": {"path": str(model_dir), "task": "sequence-classification"},
        "tokenize": {"batch_size": ROWS, "pool": {"num_cpus": 0.25}},
        "inference": {"batch_size": ROWS, "pool": {"size": 2, "num_cpus": 0.6}},
        "output": {"path": str(out)},
        "faults": {"delay_s": 1.0},
        "execution": {"stall_timeout_s": 60},  # a scheduling deadlock fails the job instead of hanging the test
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def check_upload(cluster: LocalCluster, package_uri: str) -> None:
    """The job's working directory, as each node unpacked it, holds the code and nothing ignored."""
    package = Path(package_uri).stem  # gcs://_ray_pkg_<hash>.zip
    copies = list(cluster.temp_dir.glob(f"**/session_latest/runtime_resources/working_dir_files/{package}"))
    assert copies, f"{package_uri} is unpacked on no node"
    for unpacked in copies:
        files = [path for path in unpacked.rglob("*") if path.is_file()]
        assert (unpacked / "jobs" / "run.py").is_file() and (unpacked / "pipeline" / "run.py").is_file()
        assert not {path.relative_to(unpacked).parts[0] for path in files} & NEVER_UPLOADED
        assert sum(path.stat().st_size for path in files) < MAX_UPLOAD_BYTES


def test_job_submitted_with_the_ray_cli_scores_every_row_on_both_nodes(
    cluster: LocalCluster, shards: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tiny_models["sequence-classification"]
    config = write_config(tmp_path / "job.yaml", shards, model_dir, tmp_path / "out")

    result = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".",
         "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", "python", "-m", "jobs.run", "--config", str(config)],
        env=cluster.env,
        cwd=REPO,  # as users submit: from the repository root
        capture_output=True,
        text=True,
        timeout=150,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    [job] = [job for job in cluster.get("/api/jobs/") if str(config) in job["entrypoint"]]
    assert job["status"] == "SUCCEEDED", job["message"]
    check_upload(cluster, job["runtime_env"]["working_dir"])

    out = tmp_path / "out"
    manifest = json.loads((out / S.MANIFEST).read_text())
    assert (out / S.SUCCESS).exists()
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"] == SHARDS * ROWS
    nodes = {node["node_id"] for node in cluster.get("/api/v0/nodes")["data"]["result"]["result"]}
    assert len(nodes) == 1 + cluster.num_workers
    assert set(manifest["rows_by_node"]) == nodes, manifest["rows_by_node"]

    table = read_output(str(out))
    assert table.num_rows == SHARDS * ROWS
    texts = {row["doc_id"]: row["text"] for row in pq.read_table(shards).to_pylist()}
    id2label = AutoModelForSequenceClassification.from_pretrained(model_dir).config.id2label
    for row in table.to_pylist():
        logits = forward(model_dir, AutoModelForSequenceClassification, texts[row["doc_id"]])[0].logits[0]
        np.testing.assert_allclose(row[S.LOGITS], logits.numpy(), atol=1e-4)
        assert row[S.LABEL_ID] == int(torch.argmax(logits)) and row[S.LABEL] == id2label[row[S.LABEL_ID]]


# ---- jobs.submit against the same cluster ---------------------------------------------------

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


def submit(cluster: LocalCluster, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--address", cluster.dashboard_url, *args],
        env=cluster.env if env is None else env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_job_succeeds_across_both_nodes_with_its_runtime_env(cluster: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    result = submit(cluster, "--entrypoint", "python probe.py", "--working-dir", str(tmp_path), "--env", "GREETING=hi")

    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"^submitted (raysubmit_\w+): python probe.py$", result.stdout, re.M).group(1)
    assert "nodes that ran a task: 2" in result.stdout  # logs are streamed back
    assert "greeting: hi" in result.stdout
    assert f"driver python: {Path(sys.executable).parent}" in result.stdout  # the head's PATH picks the venv
    assert result.stdout.rstrip().endswith(f"job {job_id} SUCCEEDED")


def test_failing_job_exits_nonzero_with_its_logs_and_status(cluster: LocalCluster) -> None:
    result = submit(cluster, "--entrypoint", "python -c 'import sys; print(\"about to fail\"); sys.exit(5)'")

    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^submitted raysubmit_\w+", result.stdout, re.M)
    assert "about to fail" in result.stdout
    assert re.search(r"^job raysubmit_\w+ FAILED: the driver exited with code 5$", result.stdout, re.M)


def test_submission_without_the_token_is_refused(cluster: LocalCluster) -> None:
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH_")}
    result = submit(cluster, "--entrypoint", "true", env=env)

    assert result.returncode == 2
    assert "Authentication required" in result.stderr
    assert "submitted" not in result.stdout
