"""``embedding``: one vector per row from any encoder or decoder (``AutoModel``), as sentence-transformers.

The vectors come from the checkpoint's embedding chain (``pipeline.embedding``: its one home, shared with
``pipeline.search``'s query embedder): prompt, pooling, Dense and Normalize modules, Matryoshka truncation
and quantisation, each from the checkpoint unless ``output.embedding.*`` / ``input.prompt*`` say otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import embedding
from pipeline import schema as S
from pipeline.tasks.base import Columns, Inputs, ModelBatch, Task, Tokenization

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig


@dataclass(frozen=True)
class Embedding(Task):
    chain: embedding.EmbeddingChain

    name = "embedding"
    auto_model = "AutoModel"
    optional_weights = ("pooler",)  # sentence-transformers checkpoints drop BERT's unused pooler
    # One text per row: search embeds queries the same way, so pair vectors could not be searched.
    inputs = Inputs(pair="forbidden", prompt=True)

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> Embedding:
        return cls(embedding.resolve(cfg, model))

    @property
    def tokenization(self) -> Tokenization:
        return Tokenization(prompt=self.chain.prompt, lowercase=self.chain.lowercase)

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        vectors = self.chain.embed(outputs.last_hidden_state, batch.attention_mask)
        return {S.EMBEDDING: self.chain.encode(vectors.cpu().numpy())}

    def fields(self) -> list[pa.Field]:
        return [pa.field(S.EMBEDDING, self.chain.arrow_type)]

    def metadata(self) -> dict[str, Any]:
        return self.chain.metadata()

    def describe(self) -> list[str]:
        return self.chain.describe()

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
