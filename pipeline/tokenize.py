"""Stage 2, tokenize: CPU actors, each holding one Rust (``tokenizers``) tokenizer.

Input: source blocks. Output: the same rows with ``_input_ids`` (unpadded, truncated to
``max_length``; with the task's prompt in front, which truncation keeps), ``num_tokens``,
``truncated``, for pairs ``_token_type_ids``, and ``_offsets`` when the task's ``Tokenization``
asks for them. Rejected rows pass through with null token
columns. Text is dropped here unless the task's head needs it for spans (with the offsets).

The driver builds the tokenizer (``stage_tokenizer``) from the checkpoint's Hugging Face tokenizer
and ships it to the actors, which therefore import neither ``transformers`` nor torch.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from pipeline import schema as S
from pipeline.checkpoint import CheckpointError, ResolvedModel, actor_tokenizer
from pipeline.progress import register
from pipeline.tasks import Task


def stage_tokenizer(model: ResolvedModel, lowercase: bool = False) -> Tokenizer:
    """The checkpoint's Rust tokenizer (``actor_tokenizer``: with ``lowercase``, lowercasing first), set up as
    its Hugging Face tokenizer sets it up for ``tokenizer(texts, pairs, truncation=True,
    max_length=model.max_length)``: truncation longest-first on the tokenizer's side, no padding. Runs on the
    driver; ``CheckpointError`` for a tokenizer class that encodes in Python (its ``__call__`` would not be
    what the Rust tokenizer does)."""
    from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tokenizer = actor_tokenizer(model, lowercase)
    if type(tokenizer)._encode_plus is not TokenizersBackend._encode_plus:
        raise CheckpointError(
            f"{type(tokenizer).__name__} encodes text in Python on top of its Rust tokenizer; the pipeline runs "
            "Rust tokenizers only. Set tokenize.path to a standard tokenizer for this model"
        )
    tokenizer.set_truncation_and_padding(
        PaddingStrategy.DO_NOT_PAD, TruncationStrategy.LONGEST_FIRST, model.max_length, 0, None, None
    )
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = tokenizer.split_special_tokens
    return backend


def ragged(values: Iterable[int], lengths: np.ndarray, valid: np.ndarray, dtype=np.int32) -> pa.ListArray:
    """A list array with a row per entry of ``valid``: the valid rows take ``lengths[i]`` of ``values`` in turn
    (``lengths`` of the valid rows only), the others are null."""
    sizes = np.zeros(len(valid), dtype=np.int32)
    sizes[valid] = lengths
    offsets = np.zeros(len(valid) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.fromiter(values, dtype=dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(~valid))


class TokenizeWorker:
    """``map_batches`` callable: tokenizes valid rows without padding."""

    def __init__(self, tokenizer: Tokenizer, task: Task, progress):
        # One thread per actor, as Ray reserves CPUs per actor: scale tokenization with the pool's size.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tokenizer = tokenizer
        self.progress = progress
        register(progress, "tokenizer")
        self.prompt = task.tokenization.prompt
        self.offsets = task.tokenization.offsets
        # Character offsets cost time to track; only tasks that return spans need them.
        self.encode = tokenizer.encode_batch if self.offsets else tokenizer.encode_batch_fast

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        n = batch.num_rows
        valid = pc.is_null(batch[S.ERROR]).to_numpy(zero_copy_only=False)
        texts = batch[S.TEXT].filter(valid).to_pylist()
        pairs = batch[S.TEXT_PAIR].filter(valid).to_pylist() if S.TEXT_PAIR in batch.column_names else None
        if self.prompt:
            texts = [self.prompt + text for text in texts]
        encodings = self.encode(texts if pairs is None else list(zip(texts, pairs)))
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        num_tokens = np.zeros(n, dtype=np.int32)
        num_tokens[valid] = lengths
        truncated = np.zeros(n, dtype=bool)
        truncated[valid] = [bool(e.overflowing) for e in encodings]

        batch = batch.drop_columns([c for c in (S.TEXT_PAIR,) if c in batch.column_names])
        if not self.offsets:
            batch = batch.drop_columns([S.TEXT])
        batch = batch.append_column(S.INPUT_IDS, ragged(itertools.chain.from_iterable(ids), lengths, valid))
        if pairs is not None:
            type_ids = itertools.chain.from_iterable(e.type_ids for e in encodings)
            batch = batch.append_column(S.TOKEN_TYPE_IDS, ragged(type_ids, lengths, valid, np.int8))
        if self.offsets:
            # Flattened (start, end) character spans; special tokens get (-1, -1).
            spans = np.array(list(itertools.chain.from_iterable(e.offsets for e in encodings)), np.int32).reshape(-1, 2)
            special = np.fromiter(itertools.chain.from_iterable(e.special_tokens_mask for e in encodings), bool, len(spans))
            spans[special] = -1
            batch = batch.append_column(S.OFFSETS, ragged(spans.reshape(-1), 2 * lengths, valid))
        batch = batch.append_column(S.NUM_TOKENS, pa.array(num_tokens))
        self.progress.beat.remote("tokenize", n, time.perf_counter() - started)
        return batch.append_column(S.TRUNCATED, pa.array(truncated))
