"""``sequence-classification``: logits, label and score per row (or text pair), as HF's
``pipeline("text-classification")`` labels them; optionally the final layer's CLS vector.

With ``input.long_text: aggregate`` a long text is scored in chunks of whole words
(``pipeline.sequences.word_windows``); its logits (and CLS vector) are the token-count-weighted mean of its
chunks', and its label and score come from those logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.sequences import LongText, word_windows
from pipeline.tasks.base import Columns, ModelBatch, Sequences, Task, Windows

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig


@dataclass(frozen=True)
class SequenceClassification(Task):
    id2label: dict[int, str]
    multi_label: bool  # problem_type multi_label_classification: sigmoid scores
    cls_embedding: bool  # also write the final layer's CLS vector
    hidden_size: int
    long_text: LongText

    name = "sequence-classification"
    auto_model = "AutoModelForSequenceClassification"
    head_suffix = "ForSequenceClassification"
    evaluates = S.LABEL

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> SequenceClassification:
        long_text = LongText.from_job(cfg, model, cls.name, ("truncate", "aggregate"))
        return cls(model.id2label, model.multi_label, cfg.output.cls_embedding, model.hidden_size, long_text)

    def encode(self, tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> Sequences:
        if self.long_text.mode == "truncate":
            return super().encode(tokenizer, texts, pairs, max_length)
        return word_windows(tokenizer, texts, max_length, self.long_text.size, self.long_text.overlap)

    @property
    def needs_hidden_states(self) -> bool:
        return self.cls_embedding

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        columns = {S.LOGITS: outputs.logits.float().cpu().numpy()}
        if self.cls_embedding:
            columns[S.CLS_EMBEDDING] = outputs.hidden_states[-1][:, 0].float().cpu().numpy()
        return columns

    def reduce(self, outputs: Columns, windows: Windows) -> tuple[np.ndarray, Columns]:
        first = windows.starts
        if len(first) < len(windows.rows):  # aggregate: token-count-weighted means over each text's chunks
            weights = windows.lengths.astype(np.float32)[:, None]
            total = np.add.reduceat(weights, first)
            outputs = {k: np.add.reduceat(v * weights, first) / total for k, v in outputs.items()}
        logits = outputs[S.LOGITS]
        # HF text-classification: sigmoid for multi-label (or a single logit), softmax otherwise.
        if self.multi_label or logits.shape[1] == 1:
            probs = 1 / (1 + np.exp(-logits))
        else:
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = shifted / shifted.sum(axis=1, keepdims=True)
        label_id = probs.argmax(axis=1).astype(np.int32)
        return first, {
            **outputs,
            S.LABEL_ID: label_id,
            S.LABEL: [self.id2label[i] for i in label_id.tolist()],
            S.SCORE: probs[np.arange(len(probs)), label_id].astype(np.float32),
        }

    def metadata(self) -> dict[str, Any]:
        aggregation = {"aggregation": "token-count-weighted mean of chunk logits"} if self.long_text.mode == "aggregate" else {}
        return {**self.long_text.metadata(), **aggregation}

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
