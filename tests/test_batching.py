"""Micro-batching and device sizing: pure functions, plus the OOM split-and-retry path end to end."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import BertConfig

from pipeline import read_output
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
    """Every micro-batch of more than 3 rows "OOMs" and is split down to 3 rows or fewer; every vector equals
    the model's on its row alone (mean pooling, normalised), as an unsplit run's does (test_pipeline)."""
    import pyarrow as pa
    import torch
    from conftest import WORDS, forward
    from transformers import AutoModel

    from pipeline.embedding import pool

    texts = [" ".join(WORDS[i % 30 : i % 30 + 1 + i % 20]) for i in range(200)]
    pq.write_table(pa.table({"doc_id": [str(i) for i in range(200)], "text": texts}), tmp_path / "in.parquet")
    raw = {
        "input": {"path": str(tmp_path / "in.parquet"), "id_columns": ["doc_id"]},
        "model": {"path": str(tiny_models["embedding"]), "task": "embedding"},
        "output": {"path": str(tmp_path / "split"), "embedding": {"pooling": "mean", "normalize": True}},
        "faults": {"oom_above_rows": 3},
    }
    run_job(load_config(raw=raw))
    split = read_output(str(tmp_path / "split"))
    assert sorted(split["doc_id"].to_pylist(), key=int) == [str(i) for i in range(200)]
    for row in split.to_pylist():
        out, inputs = forward(tiny_models["embedding"], AutoModel, texts[int(row["doc_id"])])
        expected = torch.nn.functional.normalize(pool(out.last_hidden_state, inputs["attention_mask"], "mean"), dim=-1)
        np.testing.assert_allclose(row[S.EMBEDDING], expected[0].numpy(), atol=1e-5)


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


def reference_micro_batches(lengths: np.ndarray, max_tokens: int, min_efficiency: float) -> list[tuple[int, int]]:
    """micro_batches as a plain loop over rows (its first implementation)."""
    parts, start = [], 0
    while start < len(lengths):
        width = max(1, int(lengths[start]))
        limit = min(len(lengths), start + max(1, max_tokens // width))
        stop, real = start + 1, width
        while stop < limit and real + lengths[stop] >= min_efficiency * width * (stop - start + 1):
            real += int(lengths[stop])
            stop += 1
        parts.append((start, stop))
        start = stop
    return parts


@pytest.mark.parametrize("seed", range(6))
def test_micro_batches_match_the_row_by_row_loop(seed):
    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(0 if seed % 2 else 1, [8, 64, 300, 600, 2, 5000][seed], size=700))[::-1]
    for budget, floor in [(4096, 0.9), (512, 0.5), (100_000, 0.0), (64, 1.0)]:
        fast = [(p.start, p.stop) for p in micro_batches(lengths, budget, floor)]
        assert fast == reference_micro_batches(lengths, budget, floor), (budget, floor)


def test_padding_from_arrow_offsets_matches_row_by_row_padding():
    import pyarrow as pa

    from pipeline.infer import padded_positions, ragged_rows

    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 1000, size=n).tolist() for n in rng.integers(1, 40, size=50)]
    column = pa.chunked_array([pa.array(rows[:20], pa.list_(pa.int32())), pa.array(rows[20:], pa.list_(pa.int32()))])
    flat, offsets = ragged_rows(column.slice(5).combine_chunks())  # a sliced, chunked column, as Ray Data hands batches over
    picked = np.array([40, 3, 17, 0, 22])
    mask, index = padded_positions(offsets, picked)
    padded = np.full(mask.shape, -1)
    padded[mask] = flat[index]
    for r, i in enumerate(picked):
        row = rows[5 + i]
        assert padded[r, : len(row)].tolist() == row and (padded[r, len(row) :] == -1).all()
        assert mask[r].sum() == len(row)
    assert mask.shape == (5, max(len(rows[5 + i]) for i in picked))


def test_call_outputs_are_scattered_to_their_sequences_then_rows_get_nulls_for_rejected_ones():
    import pyarrow as pa

    from pipeline.infer import CallOutputs, to_arrow

    outputs = CallOutputs(3)
    outputs.put(np.array([2, 0]), {"v": np.array([[3.0, 3.5], [0.0, 0.5]], np.float32), "s": np.array([3, 0]), "l": ["c", "a"]})
    outputs.put(np.array([1]), {"v": np.array([[2.0, 2.5]], np.float32), "s": np.array([2]), "l": ["b"]})
    columns = outputs.columns
    assert columns["v"].tolist() == [[0.0, 0.5], [2.0, 2.5], [3.0, 3.5]] and columns["l"] == ["a", "b", "c"]
    valid = np.array([True, False, True, True, False])
    vector = to_arrow(columns["v"], valid, pa.list_(pa.float16(), 2))
    assert vector.type == pa.list_(pa.float16(), 2)
    assert vector.to_pylist() == [[0.0, 0.5], None, [2.0, 2.5], [3.0, 3.5], None]
    assert to_arrow(columns["s"], valid, pa.int32()).to_pylist() == [0, None, 2, 3, None]
    assert to_arrow(columns["l"], valid, pa.string()).to_pylist() == ["a", None, "b", "c", None]
    assert to_arrow(np.zeros((0, 2)), np.zeros(2, bool), pa.list_(pa.float32(), 2)).to_pylist() == [None, None]
