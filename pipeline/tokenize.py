"""Stage 2, tokenize: CPU actors, each holding one fast tokenizer.

Input: source blocks. Output: the same rows with ``_input_ids`` (unpadded, truncated to
``max_length``; with the task's prompt in front, which truncation keeps), ``num_tokens``,
``truncated``, for pairs ``_token_type_ids``, and ``_offsets`` when the task's ``Tokenization``
asks for them. Rejected rows pass through with null token
columns. Text is dropped here unless the task's head needs it for spans (with the offsets).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S
from pipeline.checkpoint import ResolvedModel, actor_tokenizer
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


class TokenizeWorker:
    """``map_batches`` callable: tokenizes valid rows without padding."""

    def __init__(self, model: ResolvedModel, task: Task, progress):
        tokenization = task.tokenization
        self.tokenizer = actor_tokenizer(model, lowercase=tokenization.lowercase)
        self.progress = progress
        register(progress, "tokenizer")
        self.max_length = model.max_length
        self.prompt = tokenization.prompt
        self.offsets = tokenization.offsets

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        n = batch.num_rows
        valid = pc.is_null(batch[S.ERROR]).to_numpy(zero_copy_only=False)
        texts = batch[S.TEXT].filter(valid).to_pylist()
        pairs = batch[S.TEXT_PAIR].filter(valid).to_pylist() if S.TEXT_PAIR in batch.column_names else None
        encoded = self.tokenizer(
            [self.prompt + text for text in texts] if self.prompt else texts,
            pairs,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=pairs is not None,
            return_offsets_mapping=self.offsets,
            return_special_tokens_mask=self.offsets,
        )
        num_tokens = np.zeros(n, dtype=np.int32)
        num_tokens[valid] = [len(ids) for ids in encoded["input_ids"]]
        truncated = np.zeros(n, dtype=bool)
        truncated[valid] = [bool(e.overflowing) for e in encoded.encodings]

        batch = batch.drop_columns([c for c in (S.TEXT_PAIR,) if c in batch.column_names])
        if not self.offsets:
            batch = batch.drop_columns([S.TEXT])
        batch = batch.append_column(S.INPUT_IDS, ragged(encoded["input_ids"], valid, n))
        if pairs is not None:
            batch = batch.append_column(S.TOKEN_TYPE_IDS, ragged(encoded["token_type_ids"], valid, n, np.int8))
        if self.offsets:
            # Flattened (start, end) character spans; special tokens get (-1, -1).
            flat = [
                [v for (start, end), special in zip(spans, mask) for v in ((-1, -1) if special else (start, end))]
                for spans, mask in zip(encoded["offset_mapping"], encoded["special_tokens_mask"])
            ]
            batch = batch.append_column(S.OFFSETS, ragged(flat, valid, n))
        batch = batch.append_column(S.NUM_TOKENS, pa.array(num_tokens))
        self.progress.beat.remote("tokenize", n, time.perf_counter() - started)
        return batch.append_column(S.TRUNCATED, pa.array(truncated))
