"""The task seam (``pipeline.tasks``): a task is one module and a registry entry, nothing else.

A task defined only in this test and registered only in ``REGISTRY`` runs end to end through the
real pipeline (config validation, checkpoint resolution, tokenize and model actors, sink), and
every registered task writes exactly the fields it declares. Each task's fidelity to its
reference lives in its own tests (``test_pipeline.py`` for the first three).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
from conftest import MAX_LENGTH, WRITTEN_OUTPUTS, forward, sentence
from transformers import AutoModel

from pipeline import schema as S
from pipeline import tasks
from pipeline.config import ConfigError, load_config
from pipeline.run import plan, run_job
from pipeline.tasks import Inputs, ModelBatch, Task, Tokenization

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
MODEL_OPTIONS = {"zero-shot-classification": {"candidate_labels": ["sport", "politics"]}}  # keys a task requires


def pair_probe() -> type[Task]:
    """A test-only task: pairs required, offsets on; its head reads the padded inputs, the hidden
    states, the token spans and the texts, so every part of the seam carries real data.

    Built in a function so that Ray pickles the class by value: actors never import this module.
    """

    @dataclass(frozen=True)
    class PairProbe(Task):
        hidden_size: int

        name = "pair-probe"
        auto_model = "AutoModel"
        optional_weights = ("pooler",)
        inputs = Inputs(pair="required", pair_role="the probe text")
        tokenization = Tokenization(offsets=True)

        @classmethod
        def from_job(cls, cfg, model) -> PairProbe:
            return cls(model.hidden_size)

        def head(self, outputs: Any, batch: ModelBatch) -> dict[str, Any]:
            first_spans = [offsets.reshape(-1, 2)[1] for offsets in batch.offsets]  # after [CLS]
            return {
                "pair_tokens": (batch.inputs["token_type_ids"] * batch.attention_mask).sum(dim=1).int().cpu().numpy(),
                "first_token": [text[start:end] for (start, end), text in zip(first_spans, batch.texts)],
                "cls_vector": outputs.last_hidden_state[:, 0].float().cpu().numpy(),
            }

        def fields(self) -> list[pa.Field]:
            return [
                pa.field("pair_tokens", pa.int32()),
                pa.field("first_token", pa.string()),
                pa.field("cls_vector", S.vector(self.hidden_size)),
            ]

        def metadata(self) -> dict[str, Any]:
            return {"probe": "pairs"}

    return PairProbe


def test_a_task_registered_only_in_the_registry_runs_end_to_end(ray_session, tiny_models, tmp_path, monkeypatch):
    probe = pair_probe()
    monkeypatch.setitem(tasks.REGISTRY, probe.name, probe)
    rng = random.Random(4)
    texts = [sentence(rng) for _ in range(40)]
    pairs = [sentence(rng) for _ in range(40)]
    pairs[5] = None  # a row missing its second text is quarantined, not dropped
    ids = [f"d{i}" for i in range(40)]
    pq.write_table(pa.table({"doc_id": ids, "text": texts, "probe": pairs}), tmp_path / "in.parquet")
    raw = {
        "input": {"path": str(tmp_path / "in.parquet"), "id_columns": ["doc_id"]},
        "model": {"path": str(tiny_models["embedding"]), "task": probe.name},
        "inference": {"batch_size": 16, "max_tokens_per_batch": 256},
        "output": {"path": str(tmp_path / "out")},
    }
    with pytest.raises(ConfigError, match="pair-probe needs input.text_pair_column: the column holding the probe text"):
        load_config(raw=raw)
    raw["input"]["text_pair_column"] = "probe"
    manifest = run_job(load_config(raw=raw))

    assert (manifest["rows_in"], manifest["rows_out"], manifest["rejected_by_reason"]) == (40, 39, {"null_text": 1})
    assert manifest["model"]["task"] == "pair-probe" and manifest["model"]["probe"] == "pairs"
    assert pq.read_table(tmp_path / "out" / S.REJECTED_DIR)["doc_id"].to_pylist() == ["d5"]
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert schema.names == ["doc_id", S.NUM_TOKENS, S.TRUNCATED, "pair_tokens", "first_token", "cls_vector"]
    assert json.loads(schema.metadata[S.METADATA_KEY])["probe"] == "pairs"

    source = dict(zip(ids, zip(texts, pairs)))
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 39 and sum(table[S.TRUNCATED].to_pylist()) > 0
    for row in table.to_pylist():
        text, pair = source[row["doc_id"]]
        out, inputs = forward(tiny_models["embedding"], AutoModel, text, pair)
        assert row[S.NUM_TOKENS] == inputs["input_ids"].shape[1] <= MAX_LENGTH
        assert row["pair_tokens"] == int(inputs["token_type_ids"].sum()) > 0
        assert row["first_token"] == text.split()[0]  # every test word is one token of the tiny vocabulary
        np.testing.assert_allclose(row["cls_vector"], out.last_hidden_state[0, 0].numpy(), atol=1e-4)


@pytest.mark.parametrize("name", list(tasks.REGISTRY))
def test_every_registered_task_writes_the_fields_it_declares(ray_session, tiny_models, tmp_path, name):
    """What a task declares (fields, metadata) is what lands in Parquet, and nothing else. Checked on the output
    its own test module committed earlier in the session (``conftest.record_output``; conftest orders this test
    last), whatever its config; a task no test has run (this test run alone) runs once here, on 12 rows."""
    if name not in tiny_models:
        pytest.fail(f"add a tiny checkpoint for {name!r} to conftest.tiny_models")
    if name in WRITTEN_OUTPUTS:
        cfg, output = WRITTEN_OUTPUTS[name]
    else:
        rng = random.Random(5)
        columns = {"text": [sentence(rng) for _ in range(12)], "pair": [sentence(rng) for _ in range(12)]}
        pq.write_table(pa.table(columns), tmp_path / "in.parquet")
        pair = {"text_pair_column": "pair"} if tasks.REGISTRY[name].inputs.pair == "required" else {}
        cfg = load_config(
            raw={
                "input": {"path": str(tmp_path / "in.parquet"), **pair},
                "model": {"path": str(tiny_models[name]), "task": name, **MODEL_OPTIONS.get(name, {})},
                "output": {"path": str(tmp_path / "out")},
            }
        )
        output = tmp_path / "out"
        manifest = run_job(cfg)
        assert manifest["rows_out"] == pq.read_table(output).num_rows == 12
    job = plan(cfg, 2, 0, table=False)  # the task and passthrough columns the run had; its output is not inspected
    schema = pq.read_schema(next(output.glob("part-*.parquet")))
    expected = job.output_schema(pa.schema(job.id_fields()))
    assert schema.remove_metadata().equals(expected.remove_metadata()), f"{schema}\n!=\n{expected}"
    metadata = json.loads(schema.metadata[S.METADATA_KEY])
    assert metadata["task"] == name and metadata.items() >= job.task.metadata().items()


@pytest.mark.parametrize("name", list(tasks.REGISTRY))
def test_registered_tasks_are_complete(name):
    task = tasks.REGISTRY[name]
    assert task.name == name
    assert hasattr(transformers, task.auto_model), f"{name}: transformers has no {task.auto_model}"
    assert task.inputs.pair in ("forbidden", "optional", "required")
    assert f"| `{name}` |" in README, f"{name}: add its row to the README's Tasks table"


def test_config_refuses_inputs_a_task_forbids():
    raw = {"input": {"path": "i", "text_pair_column": "p"}, "output": {"path": "o"}}
    for name, task in tasks.REGISTRY.items():
        if task.inputs.pair == "forbidden":
            with pytest.raises(ConfigError, match=f"{name} takes a single text; remove input.text_pair_column"):
                load_config(raw={**raw, "model": {"path": "m", "task": name}})
    evaluating = [name for name, task in tasks.REGISTRY.items() if task.evaluates]
    assert evaluating == ["sequence-classification"]
    with pytest.raises(ConfigError, match="eval.label_column needs model.task: sequence-classification"):
        load_config(raw={"input": {"path": "i"}, "model": {"path": "m", "task": "embedding"}, "output": {"path": "o"},
                         "eval": {"label_column": "topic"}})


def test_configs_and_the_registry_import_without_torch():
    """Read and write tasks import the config (and so the registry): they must not pay for torch."""
    code = "import sys, pipeline.config, pipeline.source, pipeline.sink; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def window_probe() -> type[Task]:
    """A test-only task with several model sequences per row (``Task.encode`` / ``reduce``): (text,
    pair-window) sequences, the pair cut into windows sharing ``STRIDE`` tokens as question-answering cuts
    its context, and one output row per window (``chunked``), so both the micro-batcher's view of
    sequences and the row expansion after it carry real data."""
    from pipeline.sequences import strided

    @dataclass(frozen=True)
    class WindowProbe(Task):
        hidden_size: int

        name = "window-probe"
        auto_model = "AutoModel"
        optional_weights = ("pooler",)
        inputs = Inputs(pair="required", pair_role="the windowed text")
        tokenization = Tokenization(offsets=True, span_text="pair")

        @classmethod
        def from_job(cls, cfg, model) -> WindowProbe:
            return cls(model.hidden_size)

        @property
        def chunked(self) -> bool:
            return True

        def encode(self, tokenizer, texts, pairs, max_length):
            return strided(tokenizer, texts, pairs, max_length, STRIDE)

        def head(self, outputs: Any, batch: ModelBatch) -> dict[str, Any]:
            first = []
            for offsets, text in zip(batch.offsets, batch.texts):
                start, end = next((s, e) for s, e in offsets.reshape(-1, 2) if s >= 0)
                first.append(text[start:end])
            return {
                "pair_tokens": (batch.inputs["token_type_ids"] * batch.attention_mask).sum(dim=1).int().cpu().numpy(),
                "first_pair_token": first,
                "cls_vector": outputs.last_hidden_state[:, 0].float().cpu().numpy(),
            }

        def reduce(self, outputs, windows):
            index, count = windows.within()
            spans = windows.spans
            return np.arange(len(windows.rows)), {
                **outputs,
                "window": index.astype(np.int32), "windows": count.astype(np.int32),
                "span_start": spans[:, 0], "span_end": spans[:, 1],
            }  # fmt: skip

        def fields(self) -> list[pa.Field]:
            return [
                pa.field("window", pa.int32()),
                pa.field("windows", pa.int32()),
                pa.field("span_start", pa.int32()),
                pa.field("span_end", pa.int32()),
                pa.field("pair_tokens", pa.int32()),
                pa.field("first_pair_token", pa.string()),
                pa.field("cls_vector", S.vector(self.hidden_size)),
            ]

    return WindowProbe


STRIDE = 8


def test_a_row_may_become_several_model_sequences(ray_session, tiny_models, tmp_path, monkeypatch):
    """Multi-sequence rows end to end: a row's (text, window of its pair) sequences are batched like rows,
    each equals the model on that window alone, and a row writing one output row per window keeps
    rows_in == rows_out + rows_rejected (rows_out counting input rows) with chunks_out the rows written."""
    from transformers import AutoTokenizer

    probe = window_probe()
    monkeypatch.setitem(tasks.REGISTRY, probe.name, probe)
    rng = random.Random(6)
    texts = [" ".join(rng.choices(sentence(rng).split(), k=3)) for _ in range(12)]
    pairs = [sentence(rng) for _ in range(12)]
    pairs[3] = None  # quarantined: no second text
    pairs[4] = "short"
    ids = [f"d{i}" for i in range(12)]
    pq.write_table(pa.table({"doc_id": ids, "text": texts, "context": pairs}), tmp_path / "in.parquet")
    cfg = load_config(raw={
        "input": {"path": str(tmp_path / "in.parquet"), "id_columns": ["doc_id"], "text_pair_column": "context"},
        "model": {"path": str(tiny_models["embedding"]), "task": probe.name},
        "inference": {"batch_size": 5, "max_tokens_per_batch": 256},
        "output": {"path": str(tmp_path / "out"), "rows_per_file": 1000},
    })  # fmt: skip
    manifest = run_job(cfg)

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["embedding"])
    model = AutoModel.from_pretrained(tiny_models["embedding"]).eval()
    expected = {}
    for doc, text, pair in zip(ids, texts, pairs):
        if pair is None:
            continue
        enc = tokenizer(text, pair, truncation="only_second", max_length=MAX_LENGTH, stride=STRIDE,
                        return_overflowing_tokens=True, return_offsets_mapping=True)  # fmt: skip
        for w in range(len(enc["input_ids"])):
            expected[(doc, w)] = (enc, w, len(enc["input_ids"]))
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert len(out) == len(expected) > 11 and {(r["doc_id"], r["window"]) for r in out} == set(expected)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (12, 11, 1)
    assert (manifest["documents_out"], manifest["chunks_out"]) == (11, len(out))
    import torch

    for row in out:
        enc, w, count = expected[(row["doc_id"], row["window"])]
        ids_w = enc["input_ids"][w]
        inputs = {k: torch.tensor([enc[k][w]]) for k in ("input_ids", "token_type_ids", "attention_mask")}
        with torch.inference_mode():
            cls = model(**inputs).last_hidden_state[0, 0].numpy()
        np.testing.assert_allclose(row["cls_vector"], cls, atol=1e-4)
        context = [k for k, s in enumerate(enc.sequence_ids(w)) if s == 1]
        spans = [enc["offset_mapping"][w][k] for k in context]
        pair = pairs[ids.index(row["doc_id"])]
        assert row["num_tokens"] == len(ids_w) and row["windows"] == count and row["pair_tokens"] == len(context) + 1
        assert (row["span_start"], row["span_end"]) == (spans[0][0], spans[-1][1])
        assert row["first_pair_token"] == pair[spans[0][0] : spans[0][1]]
