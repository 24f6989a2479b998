"""``embedding``: one vector per row from any encoder or decoder (``AutoModel``), as sentence-transformers.

The vectors come from the checkpoint's embedding chain (``pipeline.embedding``: its one home, shared with
``pipeline.search``'s query embedder): prompt, pooling, Dense and Normalize modules, Matryoshka truncation
and quantisation, each from the checkpoint unless ``output.embedding.*`` / ``input.prompt*`` say otherwise.

Long texts (``input.long_text``): ``truncate`` embeds the first ``max_length`` tokens; ``chunk`` writes a row
per chunk of whole words (``pipeline.sequences.word_windows``), each vector that of the chunk's text alone,
with the chunk's place and character span; ``aggregate`` writes a row per text, the token-count-weighted mean
of its chunks' float vectors (weights: each chunk's tokens, special and prompt tokens included), normalised
again when the chain normalises, then quantised. Heads return float32 vectors; ``reduce`` quantises.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import embedding
from pipeline import schema as S
from pipeline.sequences import LongText, word_windows
from pipeline.tasks.base import Columns, Inputs, ModelBatch, Sequences, Task, Tokenization, Windows

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig


@dataclass(frozen=True)
class Embedding(Task):
    chain: embedding.EmbeddingChain
    long_text: LongText

    name = "embedding"
    auto_model = "AutoModel"
    optional_weights = ("pooler",)  # sentence-transformers checkpoints drop BERT's unused pooler
    # One text per row: search embeds queries the same way, so pair vectors could not be searched.
    inputs = Inputs(pair="forbidden", prompt=True)

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> Embedding:
        chain = embedding.resolve(cfg, model)
        return cls(chain, LongText.from_job(cfg, model, cls.name, ("truncate", "chunk", "aggregate"), chain.prompt))

    @property
    def tokenization(self) -> Tokenization:
        return Tokenization(prompt=self.chain.prompt, lowercase=self.chain.lowercase, text=self.long_text.text)

    @property
    def chunked(self) -> bool:
        return self.long_text.mode == "chunk"

    def encode(self, tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> Sequences:
        if self.long_text.mode == "truncate":
            return super().encode(tokenizer, texts, pairs, max_length)
        return word_windows(tokenizer, texts, max_length, self.long_text.size, self.long_text.overlap, self.chain.prompt)

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        return {S.EMBEDDING: self.chain.embed(outputs.last_hidden_state, batch.attention_mask).cpu().numpy()}

    def reduce(self, outputs: Columns, windows: Windows) -> tuple[np.ndarray, Columns]:
        vectors = outputs[S.EMBEDDING]
        if self.long_text.mode == "aggregate":
            first, weights = windows.starts, windows.lengths.astype(np.float32)[:, None]
            vectors = np.add.reduceat(vectors * weights, first) / np.add.reduceat(weights, first)
            if self.chain.normalize:
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # as F.normalize
            return first, {S.EMBEDDING: self.chain.encode(vectors.astype(np.float32))}
        columns = {S.EMBEDDING: self.chain.encode(vectors)}
        if self.long_text.mode == "chunk":
            index, count = windows.within()
            columns.update({
                S.CHUNK_INDEX: index.astype(np.int32), S.NUM_CHUNKS: count.astype(np.int32),
                S.CHAR_START: windows.spans[:, 0], S.CHAR_END: windows.spans[:, 1],
            })  # fmt: skip
            if self.long_text.text:
                columns[S.CHUNK_TEXT] = [text[a:b] for text, (a, b) in zip(windows.texts, windows.spans.tolist())]
        return np.arange(len(vectors)), columns

    def fields(self) -> list[pa.Field]:
        chunks = S.chunk_fields(self.long_text.text) if self.long_text.mode == "chunk" else []
        return [*chunks, pa.field(S.EMBEDDING, self.chain.arrow_type)]

    def metadata(self) -> dict[str, Any]:
        return {**self.chain.metadata(), **self.long_text.metadata(), **self._aggregation()}

    def _aggregation(self) -> dict[str, str]:
        if self.long_text.mode != "aggregate":
            return {}
        return {"aggregation": "token-count-weighted mean of chunk vectors" + (", normalised" if self.chain.normalize else "")}

    def describe(self) -> list[str]:
        return [*self.chain.describe(), *(f"{k} {v}" for k, v in {**self.long_text.metadata(), **self._aggregation()}.items())]

    def calibration(self) -> tuple[int, Task] | None:
        """int8/uint8 without ranges yet: the float32 chain on ``output.embedding.calibration_rows`` rows."""
        if not self.chain.needs_calibration:
            return None
        return self.chain.calibration_rows, replace(self, chain=replace(self.chain, precision="float32"))

    def calibrated(self, outputs: Columns) -> Embedding:
        return replace(self, chain=self.chain.calibrated(np.asarray(outputs[S.EMBEDDING], dtype=np.float32)))

    def calibrated_like(self, metadata: dict[str, Any]) -> Embedding:
        if not self.chain.needs_calibration or not metadata.get("quantization_ranges"):
            return self
        ranges = tuple(tuple(float(v) for v in row) for row in metadata["quantization_ranges"])
        return replace(self, chain=replace(self.chain, ranges=ranges, calibrated_on=metadata["calibrated_on"]))
