"""``question-answering``: the job's answers equal transformers 4.57's ``pipeline("question-answering")`` on
every row, with a tiny random ``BertForQuestionAnswering`` and contexts of several windows (48 tokens,
``doc_stride`` 16); a row missing its context is quarantined.

The pipeline was removed from transformers 5: ``qa_pipeline`` below is a faithful port of its fast-tokenizer
``preprocess`` / ``_forward`` / ``postprocess`` (transformers v4.57.1, src/transformers/pipelines/
question_answering.py, Apache-2.0), one row and one window at a time, without batching or padding. Its span
selection is ``select_starts_ends`` as transformers 5 still ships it (unchanged since 4.57 but for a crash
4.57 had when exactly ``top_k`` candidates existed).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import WORDS, record_output

from pipeline import read_output
from pipeline import schema as S
from pipeline.config import ConfigError, load_config
from pipeline.run import plan, run_job

WINDOW, STRIDE = 48, 16


def qa_pipeline(model_dir: Path, question: str, context: str, *, top_k: int = 1, doc_stride: int = STRIDE,
                max_seq_len: int = WINDOW, max_answer_len: int = 15, handle_impossible_answer: bool = False):  # fmt: skip
    """``QuestionAnsweringPipeline(question=..., context=..., **kwargs)`` of transformers 4.57.1 (fast tokenizer)."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from transformers.pipelines.document_question_answering import select_starts_ends

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    # preprocess
    question_first = tokenizer.padding_side == "right"
    assert question_first
    encoded = tokenizer(
        text=question, text_pair=context, padding="do_not_pad", truncation="only_second", max_length=max_seq_len,
        stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True, return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )  # fmt: skip
    num_spans = len(encoded["input_ids"])
    p_mask = [[tok != 1 for tok in encoded.sequence_ids(span_id)] for span_id in range(num_spans)]
    # postprocess, fed by _forward one window at a time
    min_null_score = 1000000
    answers = []
    for span_idx in range(num_spans):
        ids = encoded["input_ids"][span_idx]
        for cls_index in np.nonzero(np.array(ids) == tokenizer.cls_token_id)[0]:
            p_mask[span_idx][cls_index] = 0
        inputs = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.tensor([encoded["attention_mask"][span_idx]]),
            "token_type_ids": torch.tensor([encoded["token_type_ids"][span_idx]]),
        }
        with torch.inference_mode():
            output = model(**inputs)
        starts, ends, scores, min_null_score = select_starts_ends(
            output.start_logits.numpy(), output.end_logits.numpy(), p_mask[span_idx], inputs["attention_mask"].numpy(),
            min_null_score, top_k * 2 + 10, handle_impossible_answer, max_answer_len,
        )  # fmt: skip
        enc = encoded[span_idx]
        for s, e, score in zip(starts, ends, scores):
            try:  # get_indices(align_to_words=True)
                start_index = enc.word_to_chars(enc.token_to_word(s), sequence_index=1)[0]
                end_index = enc.word_to_chars(enc.token_to_word(e), sequence_index=1)[1]
            except Exception:
                start_index, end_index = enc.offsets[s][0], enc.offsets[e][1]
            target = context[start_index:end_index]
            answer = next((a for a in answers if a["answer"].lower() == target.lower()), None)  # get_answer
            if answer:
                answer["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": start_index, "end": end_index, "answer": target})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    if len(answers) == 1:
        return answers[0]
    return answers


def write_rows(path: Path, rows: int = 14, seed: int = 5) -> dict[str, tuple]:
    """(question, context) rows: contexts of 5 to 150 words, so most need several windows of 48 tokens."""
    rng = random.Random(seed)
    words = WORDS + ["U.S.", "co-op", "£40m", "(BBC)", "don't", "twenty-two"]  # punctuation inside words
    questions = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) + "?" for _ in range(rows)]
    contexts = [" ".join(rng.choices(words, k=rng.choice([rng.randint(5, 20), rng.randint(60, 150)]))) for _ in range(rows)]
    contexts[2] = None  # quarantined: no context
    questions[4] = " ".join(["what"] * 40)  # too long to leave a window room: cut, and marked truncated
    ids = [f"q{i}" for i in range(rows)]
    pq.write_table(pa.table({"qid": ids, "question": questions, "context": pa.array(contexts, pa.string())}), path)
    return dict(zip(ids, zip(questions, contexts)))


def config(inputs: Path, model: Path, out: Path, **model_keys) -> dict:
    return {
        "input": {"path": str(inputs), "id_columns": ["qid"], "text_column": "question", "text_pair_column": "context"},
        "model": {"path": str(model), "task": "question-answering", "max_length": WINDOW, "doc_stride": STRIDE,
                  **model_keys},  # fmt: skip
        # Small calls: one row's windows are batched with other rows' windows.
        "tokenize": {"batch_size": 5},
        "inference": {"batch_size": 5, "max_tokens_per_batch": 200},
        "output": {"path": str(out)},
    }


def test_answers_equal_the_pipeline(ray_session, tiny_models, tmp_path):
    model = tiny_models["question-answering"]
    source = write_rows(tmp_path / "in.parquet")
    cfg = load_config(raw=config(tmp_path / "in.parquet", model, tmp_path / "out"))
    manifest = run_job(cfg)
    record_output(cfg, tmp_path / "out")  # test_tasks checks the declared fields on it
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rejected_by_reason"]) == (14, 13, {"null_text": 1})
    assert read_output(str(tmp_path / "out"), rejected=True)["qid"].to_pylist() == ["q2"]
    table = read_output(str(tmp_path / "out"))
    assert table.schema.names == ["qid", S.NUM_TOKENS, S.TRUNCATED, S.ANSWER, S.ANSWER_START, S.ANSWER_END, S.SCORE]
    assert [table.schema.field(c).type for c in (S.ANSWER_START, S.SCORE)] == [pa.int32(), pa.float32()]
    rows = {row["qid"]: row for row in table.to_pylist()}
    assert [i for i, row in rows.items() if row[S.TRUNCATED]] == ["q4"]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    windows = 0
    for i, row in rows.items():
        question, context = source[i]
        if i == "q4":  # the pipeline raises on it (no room for the context); the job answers the cut question
            question = tokenizer.decode(tokenizer(question, add_special_tokens=False)["input_ids"][: WINDOW - 3 - STRIDE - 1])
        windows += len(tokenizer(question, context, truncation="only_second", max_length=WINDOW, stride=STRIDE,
                                 return_overflowing_tokens=True)["input_ids"])  # fmt: skip
        expected = qa_pipeline(model, question, context)
        assert (row[S.ANSWER], row[S.ANSWER_START], row[S.ANSWER_END]) == (expected["answer"], expected["start"], expected["end"]), i
        assert row[S.ANSWER] == context[row[S.ANSWER_START] : row[S.ANSWER_END]]
        assert row[S.SCORE] == pytest.approx(expected["score"], abs=1e-4), i
    assert windows >= 3 * len(rows)  # long contexts: several windows per row


def test_top_k_answers_and_the_impossible_answer_equal_the_pipeline(ray_session, tiny_models, tmp_path):
    model = tiny_models["question-answering"]
    source = write_rows(tmp_path / "in.parquet", rows=8, seed=9)
    keys = {"top_k": 4, "max_answer_len": 4, "handle_impossible_answer": True}
    run_job(load_config(raw=config(tmp_path / "in.parquet", model, tmp_path / "out", **keys)))
    table = read_output(str(tmp_path / "out"))
    assert table.schema.field(S.ANSWER).type == pa.list_(pa.string())
    assert table.schema.field(S.SCORE).type == pa.list_(pa.float32())
    several = 0
    for row in table.to_pylist():
        question, context = source[row["qid"]]
        if row[S.TRUNCATED]:
            continue  # the cut question: covered above
        expected = qa_pipeline(model, question, context, **keys)
        expected = expected if isinstance(expected, list) else [expected]
        assert row[S.ANSWER] == [a["answer"] for a in expected], row["qid"]
        assert row[S.ANSWER_START] == [a["start"] for a in expected] and row[S.ANSWER_END] == [a["end"] for a in expected]
        assert row[S.SCORE] == pytest.approx([a["score"] for a in expected], abs=1e-4), row["qid"]
        several += len(expected) > 1
    assert several > 0


def test_question_answering_refuses_what_it_cannot_answer(tiny_models, tmp_path):
    write_rows(tmp_path / "in.parquet", rows=6)
    base = config(tmp_path / "in.parquet", tiny_models["question-answering"], tmp_path / "out")
    with pytest.raises(ConfigError, match="question-answering needs input.text_pair_column: the column holding the context"):
        load_config(raw={**base, "input": {k: v for k, v in base["input"].items() if k != "text_pair_column"}})
    with pytest.raises(ConfigError, match="model.doc_stride=44 leaves no room for a question"):
        plan(load_config(raw={**base, "model": {**base["model"], "doc_stride": 44}}))
    with pytest.raises(ConfigError, match="input.long_text: chunk is not something question-answering can do"):
        plan(load_config(raw={**base, "input": {**base["input"], "long_text": "chunk"}}))
