"""Task registry: ``model.task`` -> the task module that implements it (see ``pipeline.tasks.base``).

Adding a task is one module here, one test module, an entry in ``REGISTRY`` and a README row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.tasks.base import Columns, Inputs, ModelBatch, Sequences, Task, Tokenization, Windows
from pipeline.tasks.embedding import Embedding
from pipeline.tasks.rerank import Rerank
from pipeline.tasks.sequence_classification import SequenceClassification
from pipeline.tasks.sparse_embedding import SparseEmbedding
from pipeline.tasks.token_classification import TokenClassification

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig

REGISTRY: dict[str, type[Task]] = {
    task.name: task for task in (SequenceClassification, TokenClassification, Embedding, Rerank, SparseEmbedding)
}


def build(cfg: JobConfig, model: ResolvedModel) -> Task:
    """The task ``cfg.model.task`` configured for this job and checkpoint."""
    return REGISTRY[cfg.model.task].from_job(cfg, model)


__all__ = ["REGISTRY", "Columns", "Inputs", "ModelBatch", "Sequences", "Task", "Tokenization", "Windows", "build"]
