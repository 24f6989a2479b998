"""No deprecation warning comes from our code, or from what it calls, in the driver or in Ray's workers.

This is ``-W error::DeprecationWarning`` scoped to ``pipeline/`` and ``jobs/``, made to work where
``-W`` cannot: a deprecated Ray API attributes its warning to Ray's own file (one frame above the
caller), and most of our code runs in Ray worker processes, whose warnings only reach their logs.
So a fresh driver process installs a hook in itself and, through Ray's
``worker_process_setup_hook``, in every worker; the hook shows every deprecation (Python hides most
by default) and records each one whose call stack passes through our modules. The driver then runs
what the demo runs: a job (``python -m jobs.run``'s ``main``), the index and a search.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import WORDS

REPO = Path(__file__).resolve().parents[1]

# Ray's own, allowed by exact message: DataContext's dataclass __init__ assigns its deprecated fields
# and DataContext.__setattr__ (ray/data/context.py) warns about each, at the first
# DataContext.get_current() of a process, whoever calls it. Plain DeprecationWarnings: never shown.
RAY_INTERNAL = re.compile(
    r"/ray/data/context\.py:\d+: DeprecationWarning: `(use_push_based_shuffle|use_polars|use_arrow_tensor_v2)` is deprecated"
)

HOOK = r'''
import json, os, traceback, warnings

CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def record_deprecations():
    """Show every deprecation; append the ones raised with pipeline/ or jobs/ on the stack to $EB_DEPRECATIONS."""
    ours = tuple(os.path.join(os.environ["EB_REPO"], package) + os.sep for package in ("pipeline", "jobs"))
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CATEGORIES):
            stack = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]]
            if any(frame.startswith(ours) for frame in stack):
                record = {"warning": f"{filename}:{lineno}: {category.__name__}: {message}", "stack": stack}
                with open(os.environ["EB_DEPRECATIONS"], "a") as out:
                    out.write(json.dumps(record) + "\n")
        show(message, category, filename, lineno, file, line)

    for category in CATEGORIES:
        warnings.simplefilter("always", category)
    warnings.showwarning = showwarning
    with open(os.environ["EB_HOOKED"], "a") as out:
        out.write(f"{os.getpid()}\n")
'''

DRIVER = HOOK + r'''
import sys

import ray

record_deprecations()
# The tests' Ray cluster (RAY_ADDRESS): this driver's job gets worker processes of its own, each hooked at start.
settings = {name: os.environ[name] for name in ("EB_REPO", "EB_DEPRECATIONS", "EB_HOOKED")}
ray.init(runtime_env={"worker_process_setup_hook": record_deprecations, "env_vars": settings})

from jobs import index, run, search

config, output = sys.argv[1:]
codes = [
    run.main(["--config", config]),
    index.main(["--embeddings", output]),
    search.main(["--embeddings", output, "--query", "the match and the cup final", "-k", "3"]),
]
sys.exit(max(codes))
'''


def test_a_job_index_and_search_raise_no_deprecation_warning_and_print_no_progress_bars(ray_session, tiny_models, tmp_path):
    shards, output = tmp_path / "in", tmp_path / "out"
    shards.mkdir()
    for k in range(2):
        texts = [" ".join(WORDS[i % 60 : i % 60 + 3 + i % 25]) for i in range(40)]
        pq.write_table(pa.table({"doc_id": [f"{k}-{i}" for i in range(40)], "text": texts}), shards / f"{k}.parquet")
    config = tmp_path / "job.yaml"
    config.write_text(
        json.dumps(
            {
                "input": {"path": str(shards), "id_columns": ["doc_id"]},
                "model": {"path": str(tiny_models["embedding"]), "task": "embedding"},
                "output": {"path": str(output)},
            }
        )
    )
    records, hooked = tmp_path / "deprecations.jsonl", tmp_path / "hooked-pids"
    env = {**os.environ, "EB_REPO": str(REPO), "EB_DEPRECATIONS": str(records), "EB_HOOKED": str(hooked),
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}  # fmt: skip
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)  # the job decides on bars
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(config), str(output)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    # Its output is a pipe, not a terminal: no block of Ray Data progress bars (logged at once, then every 10 s).
    assert "Running Dataset" not in run.stdout + run.stderr

    # The hook ran in the driver and in the processes that ran the model: the check covered them.
    manifest = json.loads((output / "_manifest.json").read_text())
    model_pids = {process.rsplit(":", 1)[1] for process in manifest["rows_by_actor_process"]}
    assert model_pids and model_pids <= set(hooked.read_text().split()), (model_pids, hooked.read_text())
    found = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    found = [record for record in found if not RAY_INTERNAL.search(record["warning"])]
    assert found == [], "\n".join(f"{r['warning']}\n  via {[f for f in r['stack'] if '/site-packages/' not in f]}" for r in found)


def test_the_hook_records_a_deprecation_raised_with_our_code_on_the_stack(tmp_path, monkeypatch):
    """The hook itself: a warning from a frame in pipeline/ is recorded, one from elsewhere is not."""
    records, hooked = tmp_path / "deprecations.jsonl", tmp_path / "hooked-pids"
    for name, value in {"EB_REPO": str(REPO), "EB_DEPRECATIONS": str(records), "EB_HOOKED": str(hooked)}.items():
        monkeypatch.setenv(name, value)
    namespace: dict = {}
    exec(HOOK, namespace)
    with warnings.catch_warnings():
        warnings.showwarning = lambda *args, **kwargs: None  # the hook passes warnings on to this: keep the test quiet
        namespace["record_deprecations"]()
        warn = "import warnings\nwarnings.warn('old API', DeprecationWarning)\n"
        exec(compile(warn, str(REPO / "pipeline" / "run.py"), "exec"), {})
        exec(compile(warn, str(tmp_path / "elsewhere.py"), "exec"), {})
    [record] = [json.loads(line) for line in records.read_text().splitlines()]
    assert "DeprecationWarning: old API" in record["warning"] and str(os.getpid()) in hooked.read_text()
