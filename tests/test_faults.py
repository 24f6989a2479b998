"""Faults: a crashing model actor, a corrupt checkpoint, a stalled stage. Real Ray, real processes."""

from __future__ import annotations

import re
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import WORDS
from drivers import write_config

from jobs.run import RUN_FAILED, main
from pipeline import read_output
from pipeline.config import load_config
from pipeline.progress import StallError
from pipeline.run import run_job


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-input")
    for k in range(4):
        texts = [" ".join(WORDS[i % 50 : i % 50 + 1 + i % 30]) for i in range(100)]
        pq.write_table(pa.table({"doc_id": [f"{k}-{i}" for i in range(100)], "text": texts}), root / f"{k}.parquet")
    return root


def config(shards, model, out, **sections):
    return load_config(raw=raw_config(shards, model, out, **sections))


def raw_config(shards, model, out, **sections) -> dict:
    return {
        "input": {"path": str(shards), "id_columns": ["doc_id"]},
        "model": {"path": str(model), "task": "sequence-classification"},
        "tokenize": {"batch_size": 50},  # many small blocks: many model-actor tasks
        "inference": {"batch_size": 50},
        "output": {"path": str(out)},
        **sections,
    }


def test_a_crashed_model_actor_is_restarted_and_its_batch_retried(ray_session, tiny_models, shards, tmp_path):
    model = tiny_models["sequence-classification"]
    manifest = run_job(config(shards, model, tmp_path / "out", faults={"exit_after_calls": 2}))
    table = read_output(str(tmp_path / "out"))
    assert manifest["rows_in"] == manifest["rows_out"] == table.num_rows == 400
    assert len(table["doc_id"].unique()) == 400  # complete, no duplicates
    processes = manifest["rows_by_actor_process"]
    actors = {p.split(":")[0] for p in processes}
    assert len(actors) == 1 and len(processes) == 2, processes  # one actor, two incarnations (pids)

    with pytest.raises(Exception, match=r"model actor crashed 1 time, one more than execution.max_actor_restarts=0"):
        run_job(
            config(
                shards, model, tmp_path / "out2", faults={"exit_after_calls": 2}, execution={"max_actor_restarts": 0}
            )
        )


def test_a_corrupt_checkpoint_fails_fast_with_the_actors_error(ray_session, tiny_models, shards, tmp_path):
    model = tmp_path / "corrupt"
    shutil.copytree(tiny_models["sequence-classification"], model)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    started = time.time()
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ"):
        run_job(config(shards, model, tmp_path / "out"))
    assert time.time() - started < 120


@pytest.mark.parametrize("interrupt", ["delivered", "deferred"])
def test_a_stalled_stage_fails_with_a_diagnosis(ray_session, tiny_models, shards, tmp_path, monkeypatch, capsys, interrupt):
    """Delivered, through the CLI as users run it: the diagnosis is one line on stderr, no traceback, exit 1."""
    if interrupt == "deferred":  # as when Ray defers SIGINT: killing the stuck actors alone must end the run
        monkeypatch.setattr("pipeline.progress._thread.interrupt_main", lambda: None)
    started = time.time()
    raw = raw_config(
        shards,
        tiny_models["sequence-classification"],
        tmp_path / "out",
        faults={"delay_s": 3600},
        execution={"stall_timeout_s": 6},
    )
    diagnosis = r"no stage made progress for 6s.*tokenize: \d+ rows.*model actors"
    if interrupt == "delivered":
        assert main(["--config", write_config(tmp_path / "job.yaml", raw)]) == RUN_FAILED
        err = capsys.readouterr().err
        [line] = [line for line in err.splitlines() if line.startswith("error:")]
        assert re.match("error: " + diagnosis, line) and "Traceback" not in err, err
    else:
        with pytest.raises(StallError, match=diagnosis):
            run_job(load_config(raw=raw))
    assert time.time() - started < 120
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    deadline = time.time() + 30  # the stuck model actor was killed: its CPUs are free again
    while ray_session.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources().get("CPU", 0) == 2
