"""Everything ``--dry-run`` checks before Ray starts: config, checkpoint, input, pool sizing."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import save_tiny

from jobs.run import main
from pipeline.config import ConfigError, load_config
from pipeline.run import READ_CPUS, WRITE_CPUS, size_pools


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "in" / "a.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["hello world", "the match"], "n": [1, 2], "label": ["x", "y"]}), path)
    return path


def write_config(tmp_path, model_path, shard, task="sequence-classification", **extra) -> str:
    raw = {
        "input": {"path": str(shard), "id_columns": ["doc_id"]},
        "model": {"path": str(model_path), "task": task},
        "output": {"path": str(tmp_path / "out")},
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def dry_run(config: str, *overrides: str, capsys) -> tuple[int, str]:
    code = main(["--config", config, "--dry-run", *[a for o in overrides for a in ("--set", o)]])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_dry_run_prints_the_plan(tmp_path, tiny_models, shard, capsys):
    code, out = dry_run(write_config(tmp_path, tiny_models["sequence-classification"], shard), capsys=capsys)
    assert code == 0, out
    for expected in ("1 parquet file", "ForSequenceClassification", "max_length 64", "'business'", "model actors", "nothing was started"):
        assert expected in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.colour=blue", "model.colour: Extra inputs are not permitted"),
        ("model.backend=onnx", "model.backend: Input should be 'torch' or 'openvino'"),
        ("model.quantize=int8", "model.quantize is not offered"),
        ("model.task=summarise", "model.task: Input should be"),
        ("inference.batch_size=0", "inference.batch_size"),
        ("input.text_column=body", "missing text column 'body'"),
        ("input.text_column=n", "column 'n' is int64, expected string or binary"),
        ("input.id_columns=[nope]", "missing id/label column(s) ['nope']"),
        ("input.id_columns=[doc_id, label]", "['label'] would collide with output columns"),
        ("input.path=/does/not/exist", "cannot read /does/not/exist: nothing exists there"),
        ("model.path=/no/such/model", "does not exist"),
        ("model.path=some-org/not-cached", "HF_HUB_OFFLINE=1"),
        ("inference.pool.num_cpus=512", "would deadlock"),
    ],
)
def test_dry_run_rejects_bad_jobs(tmp_path, tiny_models, shard, capsys, override, message):
    code, out = dry_run(write_config(tmp_path, tiny_models["sequence-classification"], shard), override, capsys=capsys)
    assert code == 2 and message in out, out


def test_dry_run_rejects_a_model_without_the_head(tmp_path, tiny_models, shard, capsys):
    config = write_config(tmp_path, tiny_models["embedding"], shard, task="sequence-classification")
    code, out = dry_run(config, capsys=capsys)
    assert code == 2 and "BertModel: it has no sequence-classification head" in out and "model.task: embedding" in out
    code, out = dry_run(config, "model.task=token-classification", capsys=capsys)
    assert code == 2 and "no token-classification head" in out
    config = write_config(tmp_path, tiny_models["token-classification"], shard)
    code, out = dry_run(config, capsys=capsys)
    assert code == 2 and "Set model.task: token-classification" in out


def test_pickle_only_checkpoints_are_refused_unless_allowed(tmp_path, shard, capsys):
    model = save_tiny(tmp_path / "pickled", "sequence-classification", safe=False)
    assert not list(model.glob("*.safetensors")) and list(model.glob("*.bin"))
    config = write_config(tmp_path, model, shard)
    code, out = dry_run(config, capsys=capsys)
    assert code == 2 and "only has pickle weights" in out and "model.allow_pickle: true" in out
    code, out = dry_run(config, "model.allow_pickle=true", capsys=capsys)
    assert code == 0, out


def test_remote_code_checkpoints_are_refused(tmp_path, tiny_models, shard, capsys):
    import json
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(tiny_models["sequence-classification"], model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    code, out = dry_run(write_config(tmp_path, model, shard), capsys=capsys)
    assert code == 2 and "trust_remote_code" in out


def test_overrides_and_env_interpolation(monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_ROOT", "/data")
    raw = {"input": {"path": "${DATA_ROOT}/in/${DAY:-today}"}, "model": {"path": "m", "task": "embedding"}, "output": {"path": "o"}}
    cfg = load_config(raw=raw, overrides=["model.dtype=bfloat16", "inference.pool.size=2", "input.id_columns=[a, b]"])
    assert cfg.input.path == "/data/in/today" and cfg.model.dtype == "bfloat16"
    assert cfg.inference.pool.bounds == (2, 2) and cfg.input.id_columns == ["a", "b"]
    assert load_config(raw=raw, variables={"DAY": "2026-01-02"}).input.path == "/data/in/2026-01-02"
    with pytest.raises(ConfigError, match="MISSING_VAR is not set"):
        load_config(raw={**raw, "output": {"path": "${MISSING_VAR}"}})
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(raw=raw, overrides=["model.dtype"])


def test_pools_always_leave_a_cpu_share_for_reads():
    raw = {"input": {"path": "i"}, "model": {"path": "m", "task": "embedding"}, "output": {"path": "o"}}
    pools = size_pools(load_config(raw=raw), cpus=2, gpus=0)
    reserved = pools.tokenize[1] * pools.tokenize_cpus + pools.infer[1] * pools.infer_cpus
    assert reserved <= 2 - READ_CPUS - WRITE_CPUS and pools.threads == 2 and pools.infer_gpus == 0
    two = size_pools(load_config(raw=raw, overrides=["inference.pool.size=2"]), cpus=2, gpus=0)
    assert two.infer == (2, 2) and two.tokenize[1] * two.tokenize_cpus + 2 * two.infer_cpus <= 2 - READ_CPUS - WRITE_CPUS
    gpu = size_pools(load_config(raw=raw), cpus=16, gpus=4)
    assert gpu.infer == (1, 4) and gpu.infer_gpus == 1 and gpu.infer_cpus == 1
    with pytest.raises(ConfigError, match="would deadlock"):
        size_pools(load_config(raw=raw, overrides=["inference.pool.num_cpus=2"]), cpus=2, gpus=0)


def test_writes_never_leave_the_output_root():
    from pipeline.storage import join

    assert join("s3://bucket/out/", "dt=2026-01-01", "part-1.parquet") == "s3://bucket/out/dt=2026-01-01/part-1.parquet"
    for part in ("../escape", "a/../../b", "/etc/passwd"):
        with pytest.raises(ValueError, match="refusing to write outside"):
            join("/data/out", part)


def test_position_limits_count_the_padding_offset_of_roberta_like_models():
    from transformers import BertConfig, RobertaConfig, XLMRobertaConfig

    from pipeline.checkpoint import position_limit

    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
