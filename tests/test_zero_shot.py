"""``zero-shot-classification``: the job's labels and scores equal HF's ``pipeline("zero-shot-classification")``
on every row, single- and multi-label, with a tiny random NLI checkpoint; the row x label pairs are expanded
inside the actors (one row in, one row out) and a row without text is quarantined."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import record_output, sentence

from pipeline import read_output
from pipeline import schema as S
from pipeline.config import ConfigError, load_config
from pipeline.run import plan, run_job

LABELS = ["sport", "politics", "music", "the economy", "a film"]
TEMPLATE = "This text is about {}."


def write_rows(path: Path, rows: int = 20, seed: int = 7) -> dict[str, str | None]:
    rng = random.Random(seed)
    texts = [sentence(rng) for _ in range(rows)]
    texts[3] = None  # quarantined: no text
    ids = [f"r{i}" for i in range(rows)]
    pq.write_table(pa.table({"doc_id": ids, "text": pa.array(texts, pa.string())}), path)
    return dict(zip(ids, texts))


def config(inputs: Path, model: Path, out: Path, **model_keys) -> dict:
    return {
        "input": {"path": str(inputs), "id_columns": ["doc_id"]},
        "model": {"path": str(model), "task": "zero-shot-classification", "candidate_labels": LABELS, **model_keys},
        # Small calls: a row's label pairs are batched with other rows' pairs, split over micro-batches.
        "tokenize": {"batch_size": 6},
        "inference": {"batch_size": 6, "max_tokens_per_batch": 300},
        "output": {"path": str(out)},
    }


@pytest.mark.parametrize("multi_label", [False, True])
def test_labels_and_scores_equal_the_pipeline(ray_session, tiny_models, tmp_path, multi_label):
    from transformers import pipeline

    source = write_rows(tmp_path / "in.parquet")
    model = tiny_models["zero-shot-classification"]
    cfg = load_config(raw=config(tmp_path / "in.parquet", model, tmp_path / "out", hypothesis_template=TEMPLATE,
                                 multi_label=multi_label))  # fmt: skip
    manifest = run_job(cfg)
    record_output(cfg, tmp_path / "out")  # test_tasks checks the declared fields on it
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rejected_by_reason"]) == (20, 19, {"null_text": 1})
    assert read_output(str(tmp_path / "out"), rejected=True)["doc_id"].to_pylist() == ["r3"]
    table = read_output(str(tmp_path / "out"))
    assert table.schema.names == ["doc_id", S.NUM_TOKENS, S.TRUNCATED, S.LABELS, S.SCORES]
    assert table.schema.field(S.SCORES).type == pa.list_(pa.float32())
    rows = {row["doc_id"]: row for row in table.to_pylist()}
    assert sum(row[S.TRUNCATED] for row in rows.values()) > 0  # long rows: the text is cut, the hypothesis kept

    classifier = pipeline("zero-shot-classification", model=str(model), device="cpu")
    for i, row in rows.items():
        expected = classifier(source[i], candidate_labels=LABELS, hypothesis_template=TEMPLATE, multi_label=multi_label)
        assert row[S.LABELS] == expected["labels"], i
        assert row[S.SCORES] == pytest.approx(expected["scores"], abs=1e-4), i
    sums = [sum(row[S.SCORES]) for row in rows.values()]
    if multi_label:
        assert max(sums) > 1.01  # independent per label
    else:
        assert sums == pytest.approx([1.0] * len(sums), abs=1e-4)


def test_one_candidate_label_scores_it_alone(ray_session, tiny_models, tmp_path):
    """With one label the pipeline scores entailment against contradiction, even without multi_label."""
    from transformers import pipeline

    source = write_rows(tmp_path / "in.parquet", rows=6)
    model = tiny_models["zero-shot-classification"]
    run_job(load_config(raw=config(tmp_path / "in.parquet", model, tmp_path / "out", candidate_labels=["sport"])))
    classifier = pipeline("zero-shot-classification", model=str(model), device="cpu")
    for row in read_output(str(tmp_path / "out")).to_pylist():
        expected = classifier(source[row["doc_id"]], candidate_labels=["sport"])
        assert row[S.LABELS] == ["sport"] and row[S.SCORES] == pytest.approx(expected["scores"], abs=1e-4)


def test_zero_shot_refuses_what_it_cannot_score(tiny_models, tmp_path):
    write_rows(tmp_path / "in.parquet", rows=4)
    base = config(tmp_path / "in.parquet", tiny_models["zero-shot-classification"], tmp_path / "out")
    cases = [
        ({"candidate_labels": []}, "needs model.candidate_labels"),
        ({"candidate_labels": None}, "needs model.candidate_labels"),
        ({"hypothesis_template": "This example is about"}, "has no {} for the label"),
        ({"hypothesis_template": "{} is {topic}"}, "cannot be filled with a label: KeyError"),
        ({"hypothesis_template": "{} " + "the " * 80}, "leave no room for the text"),
        ({"path": str(tiny_models["sequence-classification"])}, "needs an NLI checkpoint with an entailment label"),
    ]
    for keys, message in cases:
        with pytest.raises(ConfigError, match=message):
            plan(load_config(raw={**base, "model": {**base["model"], **keys}}))
    with pytest.raises(ConfigError, match="zero-shot-classification takes a single text"):
        load_config(raw={**base, "input": {**base["input"], "text_pair_column": "text"}})
