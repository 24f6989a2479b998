"""``token-classification``: a label per token and entities with character spans, grouped exactly
like HF's ``pipeline("token-classification", aggregation_strategy="simple")``.

With ``input.long_text: chunk`` or ``aggregate`` a long text is read whole, in windows of ``model.chunk_size``
tokens that share ``model.chunk_overlap`` tokens, made and merged exactly as the pipeline does with
``stride=chunk_overlap``: entities found per window, then overlapping ones resolved (the longer wins, then
the higher score; ``aggregate_overlapping_entities``). Offsets are into the whole text; ``token_labels``
lists every token once, a token two windows share taken from the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.sequences import LongText, strided
from pipeline.tasks.base import Columns, Inputs, ModelBatch, Sequences, Task, Tokenization, Windows

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig

ENTITY_TYPE = pa.struct(
    [
        ("text", pa.string()),
        ("label", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("score", pa.float32()),
    ]
)

Token = tuple[str, float, int, int]  # (label, score, start, end) of one real token


def _tag(label: str) -> tuple[str, str]:
    """('B'|'I', entity type) as HF's TokenClassificationPipeline.get_tag."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


@dataclass(frozen=True)
class TokenClassification(Task):
    id2label: dict[int, str]
    long_text: LongText
    ignore_labels: tuple[str, ...] = ("O",)  # as the HF pipeline's default

    name = "token-classification"
    auto_model = "AutoModelForTokenClassification"
    head_suffix = "ForTokenClassification"
    inputs = Inputs(pair="forbidden")
    tokenization = Tokenization(offsets=True)

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> TokenClassification:
        return cls(model.id2label, LongText.from_job(cfg, model, cls.name, ("truncate", "chunk", "aggregate")))

    def encode(self, tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> Sequences:
        if self.long_text.mode == "truncate":
            return super().encode(tokenizer, texts, pairs, max_length)
        return strided(tokenizer, texts, None, self.long_text.size, self.long_text.overlap)

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        # Only each token's best label and its probability leave the device.
        scores, label_ids = outputs.logits.float().softmax(dim=-1).max(dim=-1)
        scores, label_ids = scores.cpu().numpy(), label_ids.cpu().numpy()
        token_labels, entities = [], []
        for row_scores, row_ids, offsets, text in zip(scores, label_ids, batch.offsets, batch.texts):
            spans = offsets.reshape(-1, 2)
            tokens = [  # special tokens have offset -1
                (self.id2label[int(i)], float(s), int(start), int(end))
                for i, s, (start, end) in zip(row_ids, row_scores, spans)
                if start >= 0
            ]
            token_labels.append([t[0] for t in tokens])
            entities.append(self._group(tokens, text))
        return {S.TOKEN_LABELS: token_labels, S.ENTITIES: entities}

    def _group(self, tokens: list[Token], text: str) -> list[dict]:
        groups: list[list[Token]] = []
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

    def reduce(self, outputs: Columns, windows: Windows) -> tuple[np.ndarray, Columns]:
        first = windows.starts
        if len(first) == len(windows.rows):  # one window per row
            return first, outputs
        bounds = [*first.tolist(), len(windows.rows)]
        labels, entities = [], []
        for start, stop in zip(bounds, bounds[1:]):
            # Consecutive windows share `overlap` tokens: each window after the first starts with them.
            labels.append([l for w in range(start, stop) for l in outputs[S.TOKEN_LABELS][w][(w > start) * self.long_text.overlap :]])
            found = [e for w in range(start, stop) for e in outputs[S.ENTITIES][w]]
            entities.append(_resolve_overlaps(found) if stop - start > 1 else found)
        return first, {S.TOKEN_LABELS: labels, S.ENTITIES: entities}

    def metadata(self) -> dict[str, Any]:
        return self.long_text.metadata()

    def fields(self) -> list[pa.Field]:
        return [pa.field(S.TOKEN_LABELS, pa.list_(pa.string())), pa.field(S.ENTITIES, pa.list_(ENTITY_TYPE))]


def _resolve_overlaps(entities: list[dict]) -> list[dict]:
    """Entities of overlapping windows, one per place: HF's ``aggregate_overlapping_entities`` (sorted by start,
    of entities that overlap the longer wins, then the higher score; ties keep the earlier)."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    kept, previous = [], entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
            if length > previous_length or length == previous_length and entity["score"] > previous["score"]:
                previous = entity
        else:
            kept.append(previous)
            previous = entity
    kept.append(previous)
    return kept
