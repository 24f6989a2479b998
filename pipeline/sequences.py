"""How rows become model sequences in the tokenize actor: the building blocks of ``Task.encode``.

- ``truncated``: one sequence per row, cut at ``max_length`` (``input.long_text: truncate``). Only a
  bounded prefix of a long text is handed to the tokenizer (``pretruncate``), with a per-row proof that
  it yields the same tokens as the whole text, else the whole text is tokenized.
- ``word_windows``: a long text as consecutive chunks of whole words, overlapping by about ``overlap``
  tokens, each re-tokenized as its own text (prompt and special tokens included), so a chunk's sequence
  is exactly what a tokenizer makes of the chunk's text (``input.long_text: chunk | aggregate``).
- ``strided``: the windows of ``tokenizer(..., stride=..., return_overflowing_tokens=True)``, as the HF
  token-classification pipeline makes them; with pairs, the second text is windowed (``only_second``)
  and offsets are into it (question-answering's (question, context-window) sequences).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from pipeline.tasks.base import Sequences, Tokenization

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig

# A prefix of PRETRUNCATE_CHARS_PER_TOKEN * max_length characters is handed to the tokenizer first. No
# tokenizer we know needs more than a few characters per token on prose (BBC: 4.6 for MiniLM); the proof in
# ``pretruncate`` catches the rows where the prefix was not enough (one huge word, no whitespace at all).
PRETRUNCATE_CHARS_PER_TOKEN = 16


def splits_on_whitespace(tokenizer) -> bool:
    """Whether the tokenizer's pre-tokenizer cuts text at whitespace, so that what follows a whitespace run
    never changes the tokens before it (the premise of ``pretruncate``'s proof)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = backend.pre_tokenizer if backend is not None else None
    if pre is None:
        return False
    pieces = pre.pre_tokenize_str("ab cd")
    return len(pieces) >= 2 and pieces[0][1][1] <= 2 and pieces[-1][1][0] >= 3


def _whole_words_before(text: str) -> int:
    """End of the last whitespace-separated word of ``text`` that is followed by whitespace and a word:
    tokens ending there are unchanged by anything appended to ``text``."""
    j = len(text)
    while j and not text[j - 1].isspace():  # the word the cut runs through
        j -= 1
    while j and text[j - 1].isspace():  # the whitespace run before it: some tokenizers attach it to the word
        j -= 1
    return j


def pretruncate(tokenizer, texts: list[str], max_length: int, **kwargs):
    """``tokenizer(texts, truncation=True, max_length=max_length, **kwargs)`` for single texts, handing the
    tokenizer at most ``PRETRUNCATE_CHARS_PER_TOKEN * max_length`` characters of each.

    Proof, per cut row: the prefix still overflowed ``max_length``, and every kept token ends before the
    whitespace run in front of the word the cut runs through. With a pre-tokenizer that splits at whitespace
    (``splits_on_whitespace``) and a normalizer that acts on characters locally (every HF tokenizer's), those
    tokens come from pre-tokens the cut does not touch: the full text has the same first tokens, so it is
    truncated to the same ids. Rows without that proof are tokenized whole, in a second call."""
    limit = PRETRUNCATE_CHARS_PER_TOKEN * max_length
    cut = [i for i, t in enumerate(texts) if len(t) > limit]
    if not cut or not splits_on_whitespace(tokenizer):
        return tokenizer(texts, truncation=True, max_length=max_length, **kwargs)
    prefixes = list(texts)
    for i in cut:
        prefixes[i] = texts[i][:limit]
    encoded = tokenizer(prefixes, truncation=True, max_length=max_length, **kwargs)
    unproven = []
    for i in cut:
        e = encoded.encodings[i]
        end = max((stop for (_, stop), special in zip(e.offsets, e.special_tokens_mask) if not special), default=0)
        if not e.overflowing or end > _whole_words_before(prefixes[i]):
            unproven.append(i)
    if unproven:
        whole = tokenizer([texts[i] for i in unproven], truncation=True, max_length=max_length, **kwargs)
        for k, i in enumerate(unproven):
            encoded.encodings[i] = whole.encodings[k]
            for key in encoded.keys():
                encoded[key][i] = whole[key][k]
    return encoded


def _flat_offsets(encoding, sequence: int | None = None) -> list[int]:
    """A sequence's flattened (start, end) per token: (-1, -1) for special tokens and, with ``sequence``,
    for tokens of the other text of a pair."""
    ids = encoding.sequence_ids if sequence is not None else None
    flat = []
    for k, ((start, end), special) in enumerate(zip(encoding.offsets, encoding.special_tokens_mask)):
        keep = not special and (ids is None or ids[k] == sequence)
        flat += (start, end) if keep else (-1, -1)
    return flat


def truncated(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, tokenization: Tokenization) -> Sequences:
    """One sequence per row: the prompt and text (and pair), truncated to ``max_length`` tokens."""
    if tokenization.prompt:
        texts = [tokenization.prompt + text for text in texts]
    options = dict(return_attention_mask=False, return_token_type_ids=pairs is not None)
    if pairs is None:
        encoded = pretruncate(tokenizer, texts, max_length, **options)
    else:
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, **options)
    return Sequences(
        input_ids=encoded["input_ids"],
        rows=np.arange(len(texts), dtype=np.int64),
        truncated=np.array([bool(e.overflowing) for e in encoded.encodings], dtype=bool),
        token_type_ids=encoded["token_type_ids"] if pairs is not None else None,
        offsets=[_flat_offsets(e) for e in encoded.encodings] if tokenization.offsets else None,
    )


def _word_starts(encoding) -> list[int]:
    words = encoding.word_ids
    return [k for k in range(len(words)) if k == 0 or words[k] != words[k - 1]]


def windows(starts: list[int], n: int, body: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows ``[s, e)`` covering ``n`` tokens, at most ``body`` long, cut only where a word starts
    (``starts``) unless one word alone is longer than ``body``; each next window starts at the first word
    start at least ``overlap`` tokens before the previous end (so overlaps are about ``overlap`` tokens)."""
    if n == 0:
        return [(0, 0)]
    bounds = [*starts, n]
    out, s = [], 0
    while True:
        limit = s + body
        if limit >= n:
            e = n
        else:
            k = bisect.bisect_right(bounds, limit) - 1
            e = bounds[k] if bounds[k] > s else limit  # a word longer than a window is cut inside
        out.append((s, e))
        if e >= n:
            return out
        k = bisect.bisect_left(bounds, e - overlap)
        following = bounds[k] if bounds[k] > s else bounds[bisect.bisect_right(bounds, s)]
        s = following if following <= e else max(s + 1, e - overlap)  # inside a long word: cut by tokens


def word_windows(
    tokenizer, texts: list[str], max_length: int, size: int, overlap: int, prompt: str = ""
) -> Sequences:
    """Each text as chunks of whole words (``windows``) of at most ``size`` tokens with the prompt and
    special tokens, overlapping by about ``overlap`` tokens. A chunk's sequence is ``prompt + chunk text``
    tokenized afresh (truncated to ``max_length``, the model's limit, as any encoder of that text would);
    its span is the characters of the text from its first token's start to its last token's end."""
    body = size - tokenizer.num_special_tokens_to_add(pair=False) - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    whole = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    rows, spans = [], []
    for row, (text, e) in enumerate(zip(texts, whole.encodings)):
        offsets = e.offsets
        for s, stop in windows(_word_starts(e), len(e.ids), body, overlap):
            rows.append(row)
            spans.append((offsets[s][0], offsets[stop - 1][1]) if stop > s else (0, len(text)))
    chunks = tokenizer(
        [prompt + texts[row][a:b] for row, (a, b) in zip(rows, spans)],
        truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False,
    )  # fmt: skip
    rows = np.asarray(rows, dtype=np.int64)
    cut = np.zeros(len(texts), dtype=bool)
    cut[rows[[bool(e.overflowing) for e in chunks.encodings]]] = True
    return Sequences(chunks["input_ids"], rows, cut, spans=np.asarray(spans, dtype=np.int32).reshape(-1, 2))


def strided(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, stride: int) -> Sequences:
    """The overflowing windows of ``max_length`` tokens, consecutive ones sharing ``stride`` tokens, that
    ``tokenizer(..., truncation=True, stride=stride, return_overflowing_tokens=True)`` makes (with pairs:
    windows of the second text, ``truncation="only_second"``, the first text in every window). Offsets and
    spans are into the windowed text."""
    encoded = tokenizer(
        texts, pairs, truncation="only_second" if pairs is not None else True, max_length=max_length, stride=stride,
        return_overflowing_tokens=True, return_special_tokens_mask=True, return_attention_mask=False,
        return_token_type_ids=pairs is not None,
    )  # fmt: skip
    sequence = 1 if pairs is not None else None
    offsets = [_flat_offsets(e, sequence) for e in encoded.encodings]
    spans = []
    for flat in offsets:
        starts, ends = flat[0::2], flat[1::2]
        real = [k for k, start in enumerate(starts) if start >= 0]
        spans.append((starts[real[0]], ends[real[-1]]) if real else (0, 0))
    return Sequences(
        input_ids=encoded["input_ids"],
        rows=np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64),
        truncated=np.zeros(len(texts), dtype=bool),
        token_type_ids=encoded["token_type_ids"] if pairs is not None else None,
        offsets=offsets,
        spans=np.asarray(spans, dtype=np.int32).reshape(-1, 2),
    )


@dataclass(frozen=True)
class LongText:
    """``input.long_text`` and its chunk settings, resolved for one job and checkpoint."""

    mode: Literal["truncate", "chunk", "aggregate"]
    size: int  # tokens per chunk or window, special tokens and prompt included
    overlap: int  # tokens consecutive chunks or windows share
    text: bool  # output.chunk_text

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel, task: str, serves: tuple[str, ...], prompt: str = "") -> LongText:
        """Raises ``ConfigError`` (so ``--dry-run`` reports it) for a mode ``task`` does not serve, a chunk size
        over the model's limit, or an overlap that leaves a chunk no room to advance."""
        from pipeline.checkpoint import actor_tokenizer
        from pipeline.config import ConfigError

        mode, size, overlap = cfg.input.long_text, cfg.model.chunk_size or model.max_length, cfg.model.chunk_overlap
        if mode not in serves:
            raise ConfigError(f"input.long_text: {mode} is not something {task} can do; it takes {' or '.join(serves)}")
        if cfg.output.chunk_text and mode != "chunk":
            raise ConfigError("output.chunk_text writes each chunk's text: it needs input.long_text: chunk")
        if mode == "truncate":
            return cls(mode, model.max_length, 0, False)
        if cfg.input.text_pair_column:
            raise ConfigError(f"input.long_text: {mode} chunks one text; remove input.text_pair_column or use truncate")
        if size > model.max_length:
            raise ConfigError(f"model.chunk_size={size} is more than the model's limit of {model.max_length} tokens")
        tokenizer = actor_tokenizer(model)
        fixed = tokenizer.num_special_tokens_to_add(pair=False) + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if overlap >= size - fixed:
            raise ConfigError(
                f"model.chunk_overlap={overlap} must be less than the {size - fixed} text tokens of a chunk "
                f"(model.chunk_size {size} minus {fixed} special and prompt tokens): chunks would not advance"
            )
        return cls(mode, size, overlap, cfg.output.chunk_text)

    def metadata(self) -> dict:
        if self.mode == "truncate":
            return {"long_text": self.mode}
        return {"long_text": self.mode, "chunk_size": self.size, "chunk_overlap": self.overlap}
