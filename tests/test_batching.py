"""Micro-batching and device sizing: pure functions, plus the OOM split-and-retry path end to end."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import BertConfig

from pipeline import schema as S
from pipeline.config import load_config
from pipeline.infer import CPU_TOKEN_BUDGET, micro_batches, token_budget
from pipeline.run import run_job


def test_micro_batches_respect_the_token_budget_and_padding_floor():
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(1, 512, size=2000))[::-1]
    parts = list(micro_batches(lengths, max_tokens=4096, min_efficiency=0.9))
    assert sum(p.stop - p.start for p in parts) == 2000 and parts[0].start == 0
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    for p in parts:
        rows, width = lengths[p], lengths[p.start]
        assert len(rows) * width <= 4096 or len(rows) == 1
        assert rows.sum() / (len(rows) * width) >= 0.9
    # Without the padding floor the budget alone decides.
    assert len(list(micro_batches(np.full(100, 64), 4096, 0.0))) == 2
    # A row longer than the budget still runs, alone.
    assert [(p.start, p.stop) for p in micro_batches(np.array([9000, 10]), 4096, 0.9)] == [(0, 1), (1, 2)]


FAULTS = """
import resource, sys
import numpy as np
from pipeline.infer import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def call():  # like one model call: a few large activations for the long rows, then smaller ones
    for mib in (24, 16, 8, 4, 2, 1):
        live = [np.ones(mib << 18, dtype=np.float32) for _ in range(3)]
        del live
call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    call()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_activation_memory_is_reused_without_page_faults():
    """Each case in a fresh process: mallopt settings are process-wide."""
    import subprocess
    import sys

    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", FAULTS, mode], check=True, capture_output=True, text=True).stdout)

    default, kept = faults("default"), faults("keep")
    assert default > 10_000  # glibc hands the large blocks back and faults them in again, every call
    assert kept < default / 100


def test_token_budget_scales_with_free_gpu_memory():
    config = BertConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    assert token_budget(config, 512, None, 4) == CPU_TOKEN_BUDGET
    small, large = token_budget(config, 512, 2 << 30, 2), token_budget(config, 512, 40 << 30, 2)
    assert 512 <= small < large and large / small == pytest.approx(20, rel=0.01)
    per_token = (6 * 768 + 3072 + 12 * 512) * 2
    assert small == (2 << 30) // 2 // per_token


def test_cuda_oom_splits_the_micro_batch_and_gives_identical_results(ray_session, tiny_models, tmp_path):
    import pyarrow as pa
    from conftest import WORDS

    texts = [" ".join(WORDS[i % 30 : i % 30 + 1 + i % 20]) for i in range(200)]
    pq.write_table(pa.table({"doc_id": [str(i) for i in range(200)], "text": texts}), tmp_path / "in.parquet")

    def run(name: str, **faults) -> pa.Table:
        raw = {
            "input": {"path": str(tmp_path / "in.parquet"), "id_columns": ["doc_id"]},
            "model": {"path": str(tiny_models["embedding"]), "task": "embedding"},
            "output": {"path": str(tmp_path / name)},
            "faults": faults,
        }
        run_job(load_config(raw=raw))
        return pq.read_table(tmp_path / name).sort_by("doc_id")

    normal, split = run("normal"), run("split", oom_above_rows=3)  # every micro-batch > 3 rows "OOMs"
    assert split.num_rows == normal.num_rows == 200
    np.testing.assert_allclose(
        np.stack(split[S.EMBEDDING].to_numpy(zero_copy_only=False)),
        np.stack(normal[S.EMBEDDING].to_numpy(zero_copy_only=False)),
        atol=1e-5,
    )


@pytest.mark.parametrize("task", ["embedding", "sequence-classification", "token-classification"])
def test_constant_outputs_skip_the_forward_pass_with_the_models_output_shapes(tiny_models, task):
    """faults.constant_outputs (jobs.benchmark --dataplane): every row gets the same output, shaped as the model's."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from pipeline.infer import ConstantModel

    auto = {"embedding": AutoModel, "sequence-classification": AutoModelForSequenceClassification}.get(
        task, AutoModelForTokenClassification
    )
    model = auto.from_pretrained(tiny_models[task]).eval()
    constant = ConstantModel(model)
    ids = torch.randint(5, 50, (3, 7))
    with torch.inference_mode():
        real = model(input_ids=ids, output_hidden_states=True)
    model.forward = None  # from here on, a forward pass would fail
    fake = constant(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert type(fake) is type(real) and fake.keys() == real.keys()
    for key in real.keys():
        for r, f in zip(*(v if isinstance(v, tuple) else (v,) for v in (real[key], fake[key]))):
            assert f.shape == r.shape and f.dtype == r.dtype, key
            assert (f == f[:1, ...]).all(), key  # the same for every row
