"""Smoke test of the benchmark's figures and in-process contenders on tiny random BERTs (no Ray)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from jobs import benchmark as B

# Lengths differ a lot, as in the mixed set, so padding strategies differ too.
TEXTS = [
    "the game",
    "the company had more sales and profit in the new season , the bank said the market was up",
    "a film",
    "the band won an award for the album and the star of the music video was the first to vote",
    "growth",
    "the minister of the government and the labour party had a vote on the election",
    "the club won the cup",
    "shares",
    "the player had a goal in the match",
    "a mobile phone",
]
MAX_LENGTH = 32  # the tiny models have 64 positions


def workload(spec: B.Spec) -> B.Workload:
    return B.Workload.tokenized("mixed", TEXTS, B.load_tokenizer(spec), spec.max_length)


@pytest.mark.parametrize("task, keys", [("embedding", "bcde"), ("sequence-classification", "bcd")])
def test_in_process_contenders_agree_and_count_padding(tiny_models, task, keys):
    spec = B.Spec(task, str(tiny_models[task]), "float32", threads=1, max_length=MAX_LENGTH)
    w = workload(spec)
    results = {k: B.InProcess.load(k, spec, B.IN_PROCESS[k])(w) for k in keys}

    for r in results.values():
        assert r.rows == len(TEXTS) and r.outputs.shape[0] == len(TEXTS) and r.wall_s > 0
        assert r.real_tokens == w.lengths.sum() and r.flops > 0
        assert r.fidelity == {}
        figures = r.figures(peak_flops=1e12)
        assert 0 < figures["padding_efficiency"] <= 1 and 0 < figures["mfu"] < 1
        fid = B.fidelity(task, r.outputs, results["d"].outputs)
        if task == "embedding":
            assert fid["cos_min"] > 0.999, r.contender
        else:
            assert fid["label_agreement"] == 1.0, r.contender

    assert results["c"].padded_tokens == len(TEXTS) * MAX_LENGTH
    assert results["d"].padded_tokens < results["c"].padded_tokens
    assert results["d"].figures(1e12)["padding_efficiency"] > results["c"].figures(1e12)["padding_efficiency"]


def test_model_flops_on_minilm_config():
    minilm = SimpleNamespace(hidden_size=384, num_hidden_layers=6, intermediate_size=1536)
    params = 6 * (4 * 384**2 + 2 * 384 * 1536)
    assert params == 10_616_832
    # one row of 100 tokens, one of 10: n * (2P + 4 * layers * n * h)
    expected = 100 * (2 * params + 4 * 6 * 100 * 384) + 10 * (2 * params + 4 * 6 * 10 * 384)
    assert B.model_flops(minilm, np.array([100, 10])) == pytest.approx(expected)
    assert B.model_flops(minilm, np.array([100])) == pytest.approx(2_215_526_400)


def result(contender: str, set_: str, rows: int, wall_s: float) -> B.Result:
    return B.Result(contender, set_, "float32", rows, wall_s, 0.0, 10 * rows, 20 * rows, 1e9, np.zeros((rows, 2)))


def test_ratios_against_baseline():
    results = [result("a", "long", 100, 10.0), result("d", "long", 100, 2.0), result("d", "short", 100, 1.0)]
    assert B.ratios(results, "a") == {("a", "long"): 1.0, ("d", "long"): pytest.approx(5.0)}
    figures = results[1].figures(peak_flops=1e9)
    assert figures["rows_per_s"] == 50 and figures["padding_efficiency"] == 0.5 and figures["mfu"] == 0.5


def test_fidelity():
    x = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    assert B.fidelity("embedding", x, x * 3) == {"cos_min": pytest.approx(1.0), "cos_mean": pytest.approx(1.0)}
    flipped = B.fidelity("embedding", x, np.array([[1.0, 0.0], [2.0, 0.0]]))
    assert flipped["cos_min"] == pytest.approx(0.0) and flipped["cos_mean"] == pytest.approx(0.5)
    assert B.fidelity("sequence-classification", x, x[::-1]) == {"label_agreement": 0.0}


def test_sample_is_deterministic_and_cycles():
    rows = B.sample(["x", "y", "z"], 7)
    assert rows == B.sample(["x", "y", "z"], 7)
    assert rows[:3] == rows[3:6] and sorted(rows[:3]) == ["x", "y", "z"]


def test_actor_cpus_leave_room_for_reads_and_tokenizer():
    assert B.actor_cpus(threads=2, pool_size=1, cpus=2) == 1.25
    assert B.actor_cpus(threads=1, pool_size=1, cpus=2) == 1.0
    assert B.actor_cpus(threads=1, pool_size=2, cpus=2) == 0.62
    with pytest.raises(ValueError, match="do not fit"):
        B.actor_cpus(threads=2, pool_size=2, cpus=2)


def test_report_table_and_chart(tmp_path):
    results = [result("a", "long", 100, 10.0), result("d", "long", 100, 2.0)]
    vs = B.ratios(results, "a")
    rows = [r.figures(1e10) | {"vs": vs[(r.contender, r.set)]} for r in results]
    table = B.format_table(rows, "a").splitlines()
    assert len(table) == 3 and len({len(line) for line in table}) == 1  # aligned
    assert "5.00x" in table[2] and "sorted, token budget" in table[2]
    B.plot(rows, tmp_path / "chart.png", "test")
    assert (tmp_path / "chart.png").stat().st_size > 0


def test_process_usage_attributes_cpu_and_memory_to_the_tree():
    import subprocess
    import sys

    # Burns 0.6 CPU seconds, then idles for four sampling intervals, so the sampler sees all of it.
    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(1.0)"
    # As Ray retitles an actor's process once the actor is gone: its CPU seconds stay the stage's.
    retitled = burn.replace("import time", "import time, ray._raylet").replace("time.sleep", "ray._raylet.setproctitle('ray::IDLE'); time.sleep")
    hold = "import time\nblock = bytearray(300 << 20)\nblock[::4096] = b'x' * len(block[::4096])\ntime.sleep(1.5)"
    with B.ProcessUsage(interval_s=0.25) as usage:
        # argv[1] puts "InferWorker" in the cmdline, as Ray's process title does for a model actor.
        subprocess.run([sys.executable, "-c", burn, "InferWorker"], check=True)
        subprocess.run([sys.executable, "-c", retitled, "TokenizeWorker"], check=True)
        subprocess.run([sys.executable, "-c", burn], check=True)
        subprocess.run([sys.executable, "-c", hold], check=True)
    seconds = usage.seconds()
    assert seconds["model actors"] >= 0.5  # its whole life fell inside the block
    assert seconds["other processes"] >= 0.5
    assert seconds["tokenizer actors"] >= 0.5
    assert seconds["driver"] < 0.5  # this process mostly waited
    memory = usage.memory()
    assert memory["peak_rss_mib"] >= 300 + 20  # the child's 300 MiB on top of this process
    assert 300 <= memory["peak_anon_mib"] <= memory["peak_rss_mib"]


def test_rerank_contenders_the_job_against_cross_encoder(ray_session, tiny_models, tmp_path):
    """(a) and (f) on (query, text) pairs: the same scores, and a ratio to print."""
    spec = B.Spec("rerank", str(tiny_models["rerank"]), "float32", threads=1, max_length=MAX_LENGTH)
    w = B.Workload.tokenized("mixed", TEXTS, B.load_tokenizer(spec), spec.max_length, pairs=True)
    assert len(w.queries) == len(TEXTS) and w.lengths.max() > max(len(t.split()) for t in w.queries)
    f = B.InProcess.load("f", spec, B.IN_PROCESS["f"])(w)
    a = B.RayJob("a", spec, tmp_path)(w)
    assert a.outputs.shape == f.outputs.shape == (len(TEXTS), 1)
    assert B.fidelity("rerank", a.outputs, f.outputs)["score_max_abs_diff"] < 1e-4
    ratio = B.ratios([a, f], "a")[("f", "mixed")]
    assert ratio > 0 and "x" in B.table_cells(f.figures(1e12) | {"vs": ratio})[-2]

def test_backends_measure_what_is_installed_and_say_why_not_the_rest(tiny_models, tmp_path):
    """--backends on a tiny model: torch and sentence-transformers run and are compared with torch fp32;
    a runtime that is not installed (or cannot load) is a row that says so, not a failure."""
    import importlib.util

    spec = B.Spec("embedding", str(tiny_models["embedding"]), "float32", threads=1, max_length=MAX_LENGTH)
    rows = {r["backend"]: r for r in B.backends(spec, workload(spec), tmp_path, repeats=1)}
    assert list(rows) == [*B.BACKENDS, *B.ST_BACKENDS]
    fp32, bf16, st = rows["torch fp32"], rows["torch bf16"], rows["st torch fp32"]
    assert fp32["vs_torch_fp32"] == pytest.approx(1.0) and fp32["cosine_min"] == pytest.approx(1.0) and fp32["recall_at_10"] == 1.0
    assert 0.99 < bf16["cosine_min"] < 1.0 and bf16["rows_per_s"] > 0
    assert st["cosine_min"] == pytest.approx(1.0, abs=1e-5)  # encode's mean pooling = d's loop in fp32
    for name in ("openvino fp32", "onnxruntime static int8"):
        module = B.BACKENDS[name][0]
        if importlib.util.find_spec(module) is None:
            assert rows[name] == {"backend": name, "skipped": f"{module} is not installed"}
    table = B.format_backends(list(rows.values()))
    assert "| torch fp32 | " in table and table.count("\n") == len(rows) + 1


def test_pretruncation_compares_the_tokenize_stage_off_and_on(tiny_models):
    """Both modes run the task's encode and give the same ids (the benchmark fails otherwise); the switch is
    restored after each mode, and the 1 MB set holds rows of ~1 MB."""
    from pipeline import sequences

    bound = sequences.PRETRUNCATE_CHARS_PER_TOKEN
    long = [" ".join(TEXTS) * 40, " ".join(reversed(TEXTS)) * 60, *TEXTS]  # 3,000+ characters: cut at 64 x 16
    [row] = B.pretruncation_cost(str(tiny_models["embedding"]), {"long": long}, repeats=1)
    assert sequences.PRETRUNCATE_CHARS_PER_TOKEN == bound
    assert row["set"] == "long" and row["rows"] == len(long) and row["max_chars"] > bound * 64
    assert row["off_us_per_row"] > 0 and row["on_us_per_row"] > 0 and row["speedup"] > 0
    table = B.format_pretruncation([row]).splitlines()
    assert len(table) == 2 and len({len(line) for line in table}) == 1

    sets = B.pretruncation_sets(huge_rows=1)
    assert len(sets["articles"]) == 2225 and len(sets["1mb"]) == 1 and len(sets["1mb"][0]) >= B.HUGE_ROW_CHARS



def test_in_process_contenders_run_in_bfloat16(tiny_models):
    """``--dtype bfloat16``: every in-process contender returns float32 outputs close to (d) in float32."""
    spec = B.Spec("embedding", str(tiny_models["embedding"]), "bfloat16", threads=1, max_length=MAX_LENGTH)
    w = workload(spec)
    reference = B.InProcess.load("d", replace(spec, dtype="float32"), B.IN_PROCESS["d"])(w).outputs
    for key in "bcde":
        outputs = B.InProcess.load(key, spec, B.IN_PROCESS[key])(w).outputs
        assert outputs.dtype == np.float32 and B.fidelity("embedding", outputs, reference)["cos_min"] > 0.99, key
