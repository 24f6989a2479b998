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
from conftest import MAX_LENGTH, forward, sentence
from transformers import AutoModel

from pipeline import schema as S
from pipeline import tasks
from pipeline.config import ConfigError, load_config
from pipeline.run import plan, run_job
from pipeline.tasks import Inputs, ModelBatch, Task, Tokenization

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
    """What a task declares (fields, metadata) is what lands in Parquet, and nothing else."""
    if name not in tiny_models:
        pytest.fail(f"add a tiny checkpoint for {name!r} to conftest.tiny_models")
    rng = random.Random(5)
    pq.write_table(pa.table({"text": [sentence(rng) for _ in range(12)]}), tmp_path / "in.parquet")
    cfg = load_config(
        raw={
            "input": {"path": str(tmp_path / "in.parquet")},
            "model": {"path": str(tiny_models[name]), "task": name},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    job = plan(cfg)
    manifest = run_job(cfg, job=job)
    task = job.task
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    expected = S.output_schema([pa.field(S.GENERATED_ID, pa.string())], task.fields())
    assert schema.remove_metadata().equals(expected), f"{schema}\n!=\n{expected}"
    metadata = json.loads(schema.metadata[S.METADATA_KEY])
    assert metadata["task"] == name and metadata.items() >= task.metadata().items()
    assert manifest["rows_out"] == pq.read_table(tmp_path / "out").num_rows == 12


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


def test_the_tokenize_stage_encodes_as_the_hugging_face_tokenizer(tiny_models):
    """The Rust tokenizer the driver ships to the tokenize actors gives what ``tokenizer(..., truncation=True,
    max_length=...)`` gives: ids, token type ids of pairs, offsets, special tokens and truncation."""
    from conftest import WORDS
    from transformers import AutoTokenizer

    from pipeline.checkpoint import resolve
    from pipeline.config import ModelConfig, StorageConfig
    from pipeline.tokenize import stage_tokenizer

    path = tiny_models["token-classification"]
    model = resolve(ModelConfig(path=str(path), task="token-classification"), StorageConfig())
    assert model.max_length == MAX_LENGTH
    rust, hf = stage_tokenizer(model), AutoTokenizer.from_pretrained(path)
    texts = [" ".join(WORDS[i : i + n]) for i, n in [(0, 3), (5, 90), (40, 1), (2, 30)]]
    pairs = [" ".join(WORDS[i : i + n]) for i, n in [(9, 50), (1, 2), (3, 70), (7, 7)]]
    for fast, full in zip(rust.encode_batch_fast(texts), rust.encode_batch(texts)):
        assert fast.ids == full.ids and bool(fast.overflowing) == bool(full.overflowing)
    single = hf(texts, truncation=True, max_length=MAX_LENGTH, return_offsets_mapping=True, return_special_tokens_mask=True)
    encodings = rust.encode_batch(texts)
    assert [e.ids for e in encodings] == single["input_ids"]
    assert [e.offsets for e in encodings] == [list(map(tuple, o)) for o in single["offset_mapping"]]
    assert [e.special_tokens_mask for e in encodings] == single["special_tokens_mask"]
    untruncated = [len(ids) > MAX_LENGTH for ids in hf(texts)["input_ids"]]
    assert [bool(e.overflowing) for e in encodings] == untruncated == [False, True, False, False]
    both = hf(texts, pairs, truncation=True, max_length=MAX_LENGTH)
    encodings = rust.encode_batch_fast(list(zip(texts, pairs)))
    assert [e.ids for e in encodings] == both["input_ids"]
    assert [e.type_ids for e in encodings] == both["token_type_ids"]
