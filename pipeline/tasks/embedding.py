"""``embedding``: one vector per row from any encoder (``AutoModel``), pooled on the device.

The one home of the embedding chain: the job's model actors and ``pipeline.search``'s query
embedder both run ``Embedding.head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from pipeline import schema as S
from pipeline.tasks.base import Columns, Inputs, ModelBatch, Task

if TYPE_CHECKING:
    import torch

    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """CLS or attention-masked mean pooling (as sentence-transformers), optionally L2-normalised, in fp32."""
    hidden = hidden.float()
    if pooling == "cls":
        vectors = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if not normalize:
        return vectors
    # torch.nn.functional.normalize(vectors, p=2, dim=1), without importing torch here
    return vectors / vectors.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class Embedding(Task):
    hidden_size: int
    pooling: Literal["cls", "mean"]
    normalize: bool
    dtype: Literal["float32", "float16"]  # stored precision of the vectors

    name = "embedding"
    auto_model = "AutoModel"
    optional_weights = ("pooler",)  # sentence-transformers checkpoints drop BERT's unused pooler
    # One text per row: search embeds queries the same way, so pair vectors could not be searched.
    inputs = Inputs(pair="forbidden")

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> Embedding:
        out = cfg.output.embedding
        return cls(hidden_size=model.hidden_size, pooling=out.pooling, normalize=out.normalize, dtype=out.dtype)

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        vectors = pool(outputs.last_hidden_state, batch.attention_mask, self.pooling, self.normalize)
        return {S.EMBEDDING: vectors.cpu().numpy()}

    def fields(self) -> list[pa.Field]:
        return [pa.field(S.EMBEDDING, S.vector(self.hidden_size, pa.from_numpy_dtype(self.dtype)))]

    def metadata(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "normalize": self.normalize, "embedding_dtype": self.dtype}
