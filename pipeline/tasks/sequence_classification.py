"""``sequence-classification``: logits, label and score per row (or text pair), as HF's
``pipeline("text-classification")`` labels them; optionally the final layer's CLS vector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import fidelity
from pipeline import schema as S
from pipeline.tasks.base import Columns, ModelBatch, Task

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig


@dataclass(frozen=True)
class SequenceClassification(Task):
    id2label: dict[int, str]
    multi_label: bool  # problem_type multi_label_classification: sigmoid scores
    cls_embedding: bool  # also write the final layer's CLS vector
    hidden_size: int

    name = "sequence-classification"
    auto_model = "AutoModelForSequenceClassification"
    head_suffix = "ForSequenceClassification"
    evaluates = S.LABEL

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> SequenceClassification:
        return cls(model.id2label, model.multi_label, cfg.output.cls_embedding, model.hidden_size)

    @property
    def needs_hidden_states(self) -> bool:
        return self.cls_embedding

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        logits = outputs.logits.float()
        # HF text-classification: sigmoid for multi-label (or a single logit), softmax otherwise.
        probs = logits.sigmoid() if self.multi_label or logits.shape[1] == 1 else logits.softmax(dim=-1)
        score, label_id = probs.max(dim=-1)
        label_id = label_id.int().cpu().numpy()
        columns = {
            S.LOGITS: logits.cpu().numpy(),
            S.LABEL_ID: label_id,
            S.LABEL: [self.id2label[i] for i in label_id.tolist()],
            S.SCORE: score.cpu().numpy(),
        }
        if self.cls_embedding:
            columns[S.CLS_EMBEDDING] = outputs.hidden_states[-1][:, 0].float().cpu().numpy()
        return columns

    def fidelity(self, outputs: Columns, reference: Columns) -> dict[str, float | None]:
        """Label agreement (gated) and the largest difference of any logit."""
        return {
            "label_agreement": fidelity.agreement(outputs[S.LABEL_ID], reference[S.LABEL_ID]),
            "max_logit_diff": float(np.abs(np.asarray(outputs[S.LOGITS]) - reference[S.LOGITS]).max(initial=0.0)),
        }

    def fields(self) -> list[pa.Field]:
        fields = [
            pa.field(S.LOGITS, S.vector(len(self.id2label))),
            pa.field(S.LABEL, pa.string()),
            pa.field(S.LABEL_ID, pa.int32()),
            pa.field(S.SCORE, pa.float32()),
        ]
        if self.cls_embedding:
            fields.append(pa.field(S.CLS_EMBEDDING, S.vector(self.hidden_size)))
        return fields
