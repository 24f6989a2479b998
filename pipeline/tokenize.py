"""Stage 2, tokenize: CPU actors, each holding the checkpoint's fast (Rust-backed) tokenizer.

Input: source blocks. Output: the same rows with the model sequences the task makes of each
(``Task.encode``; by default one, truncated to ``max_length``, the task's prompt in front):
``_input_ids`` (per row, a list of unpadded sequences), ``truncated``, for pairs ``_token_type_ids``,
``_offsets`` when the task's ``Tokenization`` asks for them and ``_spans`` when the task gives the
characters each sequence covers. Rejected rows pass through with null token columns. Text is dropped
here unless the task needs it in the model actor (``Tokenization.keeps_text``).

The driver loads the tokenizer once (``pipeline.checkpoint.actor_tokenizer``) and ships it to the actors, which therefore
do not each read the checkpoint's tokenizer files. ``Task.encode`` gets the Hugging Face tokenizer itself,
not its Rust core: windows, pairs, overflowing tokens and word ids are its API.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S
from pipeline.checkpoint import ResolvedModel
from pipeline.progress import register
from pipeline.tasks import Task


def ragged(sequences: list[list[int]], valid: np.ndarray, n: int, dtype=np.int32) -> pa.ListArray:
    """A list array of ``n`` rows: ``sequences`` fill the rows where ``valid`` is true, the rest are null."""
    lengths = np.zeros(n, dtype=np.int32)
    lengths[valid] = [len(s) for s in sequences]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((v for s in sequences for v in s), dtype=dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(~valid))


def nested(sequences, counts: np.ndarray, valid: np.ndarray, n: int, dtype=np.int32) -> pa.ListArray:
    """Per row, the list of its sequences' values: ``counts`` (per valid row) consecutive ``sequences``."""
    inner = ragged(list(sequences), np.ones(len(sequences), dtype=bool), len(sequences), dtype)
    lengths = np.zeros(n, dtype=np.int32)
    lengths[valid] = counts
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=pa.array(~valid))


class TokenizeWorker:
    """``map_batches`` callable: the task's model sequences (``Task.encode``) of valid rows, without padding."""

    def __init__(self, tokenizer, model: ResolvedModel, task: Task, progress, stage: str = "tokenize"):
        """``stage``: the ``Progress`` stage its rows count toward."""
        # One thread per actor, as Ray reserves CPUs per actor: scale tokenization with the pool's size.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tokenizer = tokenizer
        self.progress, self.stage = progress, stage
        register(progress, "tokenizer")
        self.max_length = model.max_length
        self.task = task
        self.keeps_text = task.tokenization.keeps_text
        self.span_text = S.TEXT_PAIR if task.tokenization.span_text == "pair" else S.TEXT

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        n = batch.num_rows
        valid = pc.is_null(batch[S.ERROR]).to_numpy(zero_copy_only=False)
        texts = batch[S.TEXT].filter(valid).to_pylist()
        pairs = batch[S.TEXT_PAIR].filter(valid).to_pylist() if S.TEXT_PAIR in batch.column_names else None
        sequences = self.task.encode(self.tokenizer, texts, pairs, self.max_length)
        counts = np.bincount(sequences.rows, minlength=len(texts))
        truncated = np.zeros(n, dtype=bool)
        truncated[valid] = sequences.truncated

        kept = {self.span_text} if self.keeps_text else set()  # the text the model actor needs, if any
        batch = batch.drop_columns([c for c in (S.TEXT, S.TEXT_PAIR) if c in batch.column_names and c not in kept])
        batch = batch.append_column(S.INPUT_IDS, nested(sequences.input_ids, counts, valid, n))
        if sequences.token_type_ids is not None:
            batch = batch.append_column(S.TOKEN_TYPE_IDS, nested(sequences.token_type_ids, counts, valid, n, np.int8))
        if sequences.offsets is not None:
            batch = batch.append_column(S.OFFSETS, nested(sequences.offsets, counts, valid, n))
        if sequences.spans is not None:
            batch = batch.append_column(S.SPANS, nested(sequences.spans, counts, valid, n))
        self.progress.beat.remote(self.stage, n, time.perf_counter() - started)
        return batch.append_column(S.TRUNCATED, pa.array(truncated))
