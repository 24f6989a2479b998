"""Task heads: turn one micro-batch of model outputs into output columns (on the CPU).

Each head maps ``(model outputs, attention mask, row context)`` to a dict of columns for
the micro-batch rows: 2-D float arrays for vectors, 1-D arrays for scalars, Python lists
for nested values. Column names and types are those of ``pipeline.schema.output_schema``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline import schema as S
from pipeline.checkpoint import ResolvedModel
from pipeline.config import OutputConfig


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """CLS or attention-masked mean pooling (as sentence-transformers), optionally L2-normalised, in fp32."""
    hidden = hidden.float()
    if pooling == "cls":
        vectors = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(vectors, p=2, dim=1) if normalize else vectors


@dataclass(frozen=True)
class SequenceClassificationHead:
    id2label: dict[int, str]
    multi_label: bool
    cls_embedding: bool

    @property
    def needs_hidden_states(self) -> bool:
        return self.cls_embedding

    def __call__(self, outputs: Any, attention_mask: torch.Tensor, context: dict) -> dict[str, Any]:
        logits = outputs.logits.float().cpu().numpy()
        # HF text-classification: sigmoid for multi-label (or a single logit), softmax otherwise.
        probs = sigmoid(logits) if self.multi_label or logits.shape[1] == 1 else softmax(logits)
        label_id = probs.argmax(axis=1).astype(np.int32)
        columns = {
            S.LOGITS: logits,
            S.LABEL_ID: label_id,
            S.LABEL: [self.id2label[i] for i in label_id.tolist()],
            S.SCORE: probs[np.arange(len(label_id)), label_id].astype(np.float32),
        }
        if self.cls_embedding:
            columns[S.CLS_EMBEDDING] = outputs.hidden_states[-1][:, 0].float().cpu().numpy()
        return columns


@dataclass(frozen=True)
class EmbeddingHead:
    pooling: str
    normalize: bool
    needs_hidden_states: bool = False

    def __call__(self, outputs: Any, attention_mask: torch.Tensor, context: dict) -> dict[str, Any]:
        vectors = pool(outputs.last_hidden_state, attention_mask, self.pooling, self.normalize)
        return {S.EMBEDDING: vectors.cpu().numpy()}


def _tag(label: str) -> tuple[str, str]:
    """('B'|'I', entity type) as HF's TokenClassificationPipeline.get_tag."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


@dataclass(frozen=True)
class TokenClassificationHead:
    """Per-token labels plus entities grouped like HF ``aggregation_strategy="simple"``."""

    id2label: dict[int, str]
    needs_hidden_states: bool = False
    ignore_labels: tuple[str, ...] = ("O",)

    def __call__(self, outputs: Any, attention_mask: torch.Tensor, context: dict) -> dict[str, Any]:
        probs = softmax(outputs.logits.float().cpu().numpy())
        token_labels, entities = [], []
        for row_probs, offsets, text in zip(probs, context["offsets"], context["texts"]):
            spans = offsets.reshape(-1, 2)
            tokens = [  # (label, score, start, end) per real token; special tokens have offset -1
                (self.id2label[int(p.argmax())], float(p.max()), int(start), int(end))
                for p, (start, end) in zip(row_probs, spans)
                if start >= 0
            ]
            token_labels.append([t[0] for t in tokens])
            entities.append(self._group(tokens, text))
        return {S.TOKEN_LABELS: token_labels, S.ENTITIES: entities}

    def _group(self, tokens: list[tuple[str, float, int, int]], text: str) -> list[dict]:
        groups: list[list[tuple[str, float, int, int]]] = []
        for token in tokens:
            bi, tag = _tag(token[0])
            if groups and bi != "B" and tag == _tag(groups[-1][-1][0])[1]:
                groups[-1].append(token)
            else:
                groups.append([token])
        entities = []
        for group in groups:
            label = group[0][0].split("-", 1)[-1]
            if label in self.ignore_labels:
                continue
            start, end = group[0][2], group[-1][3]
            score = float(np.mean([t[1] for t in group]))
            entities.append({"text": text[start:end], "label": label, "start": start, "end": end, "score": score})
        return entities


def make_head(model: ResolvedModel, output: OutputConfig):
    if model.task == "sequence-classification":
        return SequenceClassificationHead(model.id2label, model.multi_label, output.cls_embedding)
    if model.task == "embedding":
        return EmbeddingHead(output.embedding.pooling, output.embedding.normalize)
    return TokenClassificationHead(model.id2label)
