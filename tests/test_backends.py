"""model.backend openvino: the torch model converted by OpenVINO computes what torch does, for every encoder
family and output layout; a run on it is gated against torch float32 and says so in its manifest; what it
cannot do is refused before anything starts. Real OpenVINO (the [openvino] extra), tiny random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers as T
from conftest import forward, text_shards
from drivers import write_config

import pipeline.run
from jobs.run import main
from pipeline import schema as S
from pipeline.backends import BackendError, OpenVINOModel
from pipeline.checkpoint import actor_tokenizer
from pipeline.config import ConfigError, load_config
from pipeline.run import plan, run_job

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=80)
# (family, config, AutoModelFor* class, takes token_type_ids): the position schemes, attention kinds and
# output layouts the converter has to follow (absolute, padding-offset, relative, rotary; one and two heads).
FAMILIES = [
    ("bert", lambda: T.BertConfig(**SMALL), T.BertModel, True),
    ("roberta", lambda: T.RobertaConfig(**SMALL, pad_token_id=1), T.RobertaForSequenceClassification, False),
    ("distilbert", lambda: T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64), T.DistilBertForTokenClassification, False),
    ("deberta-v2", lambda: T.DebertaV2Config(**SMALL, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"]), T.DebertaV2Model, True),
    ("electra", lambda: T.ElectraConfig(**SMALL, embedding_size=16), T.ElectraForMaskedLM, True),
    ("mpnet", lambda: T.MPNetConfig(**SMALL), T.MPNetForQuestionAnswering, False),
    ("modernbert", lambda: T.ModernBertConfig(**SMALL, pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3), T.ModernBertModel, False),
]  # fmt: skip


def padded_batch(pad_id: int, token_types: bool) -> dict[str, torch.Tensor]:
    """Five rows of 37 to 1 real tokens, right-padded, as the infer stage builds a micro-batch."""
    ids = torch.randint(4, 100, (5, 37), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(37) < torch.tensor([37, 30, 12, 5, 1])[:, None]).long()
    ids = torch.where(mask.bool(), ids, pad_id)
    return {"input_ids": ids, "attention_mask": mask, **({"token_type_ids": torch.zeros_like(ids)} if token_types else {})}


def real_positions(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token outputs at real tokens only (padded positions are never read), others whole."""
    return (got[mask.bool()], want[mask.bool()]) if want.dim() >= 2 and want.shape[:2] == mask.shape else (got, want)


@pytest.mark.parametrize("family, make_config, auto, token_types", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_openvino_computes_what_torch_does(family, make_config, auto, token_types):
    """float32: every output (hidden states included) within 1e-5 of torch's at the real tokens, with the
    model's own output type. (bfloat16: the run below.)"""
    torch.manual_seed(0)
    config = make_config()
    model = auto(config).eval()
    inputs = padded_batch(config.pad_token_id or 0, token_types)
    with torch.inference_mode():
        want = model(**inputs, output_hidden_states=True)
        got = OpenVINOModel(model, "float32", threads=1)(**inputs, output_hidden_states=True)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    for key in want.keys():
        pairs = zip(got[key], want[key]) if isinstance(want[key], tuple) else [(got[key], want[key])]
        for a, b in pairs:
            torch.testing.assert_close(*real_positions(a, b, inputs["attention_mask"]), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two Parquet shards of 20 mixed-length rows; row 2 of each is rejected (empty text)."""
    return text_shards(tmp_path_factory.mktemp("backend-input"), shards=2, rows=20, empty_row=2, seed=11)


def config(shards: Path, out: Path, model: Path, **model_keys) -> dict:
    return {
        "input": {"path": str(shards), "id_columns": ["doc_id"]},
        "model": {"path": str(model), "task": "embedding", "backend": "openvino", **model_keys},
        "output": {"path": str(out), "embedding": {"pooling": "mean", "normalize": True}},
    }


def test_an_openvino_run_is_gated_against_torch_float32_and_writes_torch_s_vectors(
    ray_session, tiny_models, shards, tmp_path, monkeypatch
):
    """A bfloat16 run on OpenVINO scores the gate's sample twice (torch float32, then itself: README: Fidelity
    gate); its manifest, file metadata and every vector say which backend computed them, and the vectors point
    where the model's own do: one row at a time through torch float32, no padding."""
    loaded = []  # the driver loads the tokenizer once for the gate's sample and the run's pipeline
    monkeypatch.setattr(pipeline.run, "actor_tokenizer", lambda *a: loaded.append(a) or actor_tokenizer(*a))
    out = tmp_path / "out"
    manifest = run_job(load_config(raw=config(shards, out, tiny_models["embedding"], dtype="bfloat16", fidelity_rows=16)))
    assert len(loaded) == 1
    gate = manifest["fidelity"]
    assert (gate["backend"], gate["dtype"], gate["reference"]) == ("openvino", "bfloat16", "torch float32")
    assert gate["passed"] is True and gate["rows"] == 16 and gate["cosine_min"] > 0.999
    assert gate["thresholds"] == {"cosine_min": 0.99, "recall_at_10": 0.98}
    assert manifest["model"]["backend"] == "openvino" and manifest["model"]["dtype"] == "bfloat16"
    assert manifest["rows_out"] == 38 and manifest["rows_rejected"] == 2
    # The sample's rows (once per variant) are the sample stages', not the run's: its infer stage is the run's alone.
    stages = manifest["stages"]
    assert stages["tokenize"]["rows"] == stages["infer"]["rows"] == 40
    assert stages["sample_tokenize"]["rows"] == 16 and stages["sample_infer"]["rows"] == 32
    table = pq.read_table(out)
    assert json.loads(table.schema.metadata[S.METADATA_KEY])["backend"] == "openvino"
    texts = {r["doc_id"]: r["text"] for shard in shards.glob("*.parquet") for r in pq.read_table(shard).to_pylist()}
    for row in table.filter(pa.compute.is_valid(table[S.EMBEDDING])).to_pylist():
        output, _ = forward(tiny_models["embedding"], T.AutoModel, texts[row["doc_id"]])
        mean = output.last_hidden_state[0].mean(0)
        assert float(np.dot(row[S.EMBEDDING], (mean / mean.norm()).numpy())) > 0.999, row["doc_id"]


def test_what_openvino_cannot_do_is_refused_before_the_run(tiny_models, shards, tmp_path, monkeypatch, capsys):
    """float16, GPUs asked for, OpenVINO not installed: one line each, exit 2, nothing started. On a cluster
    with GPUs the model actors of an OpenVINO run reserve none, and it computes in float32 unless told otherwise.
    The backend is part of the config hash (a resume never mixes backends), the default leaves it as it was."""
    raw = lambda **keys: config(shards, tmp_path / "out", tiny_models["embedding"], **keys)  # noqa: E731
    with pytest.raises(ValueError, match="model.backend openvino computes in float32 or bfloat16"):
        load_config(raw=raw(dtype="float16"))
    gpus = raw()
    gpus["inference"] = {"num_gpus": 1}
    with pytest.raises(ConfigError, match="model.backend openvino runs on CPUs: set inference.num_gpus to 0"):
        plan(load_config(raw=gpus), 4, 1)
    on_gpu_cluster = plan(load_config(raw=raw()), 4, 1)
    assert on_gpu_cluster.pools.infer_gpus == 0 and on_gpu_cluster.dtype == "float32"
    assert "dtype float32, backend openvino" in on_gpu_cluster.describe()

    torch_default = load_config(raw={**raw(), "model": {k: v for k, v in raw()["model"].items() if k != "backend"}})
    torch_explicit = load_config(raw={**raw(), "model": {**raw()["model"], "backend": "torch"}})
    assert torch_default.fingerprint() == torch_explicit.fingerprint() != load_config(raw=raw()).fingerprint()

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    with pytest.raises(BackendError):
        plan(load_config(raw=raw()), 2, 0)
    assert main(["--config", write_config(tmp_path / "job.yaml", raw()), "--dry-run"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == "error: model.backend openvino needs OpenVINO, which is not installed: pip install 'encoder-batch[openvino]'"


def test_a_cpu_without_bfloat16_refuses_a_bfloat16_run_in_one_line(monkeypatch):
    """This CPU has bf16 (avx512_bf16); one without it is stood in for by OpenVINO's capability list."""
    import openvino

    model = T.BertModel(T.BertConfig(**SMALL)).eval()
    monkeypatch.setattr(openvino.Core, "get_property", lambda self, device, name: ["FP32", "INT8", "EXPORT_IMPORT"])
    with pytest.raises(BackendError, match="^model.backend openvino: this CPU has no bfloat16 support; use model.dtype float32$"):
        OpenVINOModel(model, "bfloat16", threads=1)
    OpenVINOModel(model, "float32", threads=1)  # float32 asks for nothing more
