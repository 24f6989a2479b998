"""``zero-shot-classification``: an NLI model scores each row against ``model.candidate_labels``, as HF's
``pipeline("zero-shot-classification")`` does (transformers 4.57 and 5 share its math).

Each row becomes one (text, hypothesis) pair per candidate label, the hypothesis being
``model.hypothesis_template.format(label)``, tokenized ``truncation="only_first"`` so only the text is
cut (``encode``); the pairs are ordinary model sequences of the row, batched with any others. ``reduce``
folds a row's pairs back into one output row:

- single-label (``model.multi_label: false`` and more than one label): softmax over the labels of the
  entailment logits, so a row's scores sum to 1;
- multi-label (or a single candidate label, as the pipeline): per label, softmax of its
  [contradiction, entailment] logits, the entailment probability.

``labels`` and ``scores`` list every candidate label, best first, ordered exactly as the pipeline
orders them (``reversed(scores.argsort())``). The entailment label is the first ``label2id`` entry
whose name starts with "entail" (case-insensitive), as the pipeline finds it; the contradiction logit
is label 0, or the last one when entailment is 0. A checkpoint without an entailment label is refused
(the pipeline would only warn and return meaningless scores). Only the two logits the scores need
leave the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import fidelity
from pipeline import schema as S
from pipeline.sequences import LongText
from pipeline.tasks.base import Columns, Inputs, ModelBatch, Sequences, Task, Windows

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig

NLI_LOGITS = "_nli_logits"  # per sequence: its (contradiction, entailment) logits; reduced away


@dataclass(frozen=True)
class ZeroShotClassification(Task):
    candidate_labels: tuple[str, ...]
    hypotheses: tuple[str, ...]  # hypothesis_template.format(label), per label
    multi_label: bool  # per-label entailment vs contradiction (also with one label)
    entailment_id: int
    contradiction_id: int

    name = "zero-shot-classification"
    auto_model = "AutoModelForSequenceClassification"
    head_suffix = "ForSequenceClassification"
    inputs = Inputs(pair="forbidden")

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> ZeroShotClassification:
        from pipeline.checkpoint import actor_tokenizer
        from pipeline.config import ConfigError

        LongText.from_job(cfg, model, cls.name, ("truncate",))
        labels, template = tuple(cfg.model.candidate_labels or ()), cfg.model.hypothesis_template
        if not labels:
            raise ConfigError("zero-shot-classification needs model.candidate_labels: the labels to score each row against")
        try:  # str.format, as the pipeline fills it
            hypotheses = tuple(template.format(label) for label in labels)
        except (IndexError, KeyError, ValueError) as e:
            raise ConfigError(f"model.hypothesis_template {template!r} cannot be filled with a label: {e!r}") from None
        if hypotheses[0] == template:
            raise ConfigError(f"model.hypothesis_template {template!r} has no {{}} for the label (e.g. 'This example is {{}}.')")
        entailment = next((i for i, label in model.id2label.items() if label.lower().startswith("entail")), None)
        if entailment is None:
            raise ConfigError(
                f"zero-shot-classification needs an NLI checkpoint with an entailment label; {model.source} has labels "
                f"{list(model.id2label.values())} (none starts with 'entail')"
            )
        # truncation="only_first" cuts the text alone: each hypothesis must fit next to at least one text token.
        tokenizer = actor_tokenizer(model)
        room = model.max_length - tokenizer.num_special_tokens_to_add(pair=True) - 1
        too_long = [h for h in hypotheses if len(tokenizer(h, add_special_tokens=False)["input_ids"]) > room]
        if too_long:
            raise ConfigError(f"hypotheses {too_long} leave no room for the text in model.max_length={model.max_length} tokens")
        return cls(
            labels,
            hypotheses,
            cfg.model.multi_label or len(labels) == 1,
            entailment,
            -1 if entailment == 0 else 0,
        )

    def encode(self, tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> Sequences:
        n = len(self.hypotheses)
        encoded = tokenizer(
            [text for text in texts for _ in range(n)], list(self.hypotheses) * len(texts), truncation="only_first",
            max_length=max_length, return_attention_mask=False, return_token_type_ids=True,
        )  # fmt: skip
        cut = np.array([bool(e.overflowing) for e in encoded.encodings], dtype=bool).reshape(len(texts), n)
        return Sequences(
            input_ids=encoded["input_ids"],
            rows=np.repeat(np.arange(len(texts), dtype=np.int64), n),
            truncated=cut.any(axis=1),
            token_type_ids=encoded["token_type_ids"],
        )

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        return {NLI_LOGITS: outputs.logits[:, [self.contradiction_id, self.entailment_id]].float().cpu().numpy()}

    def reduce(self, outputs: Columns, windows: Windows) -> tuple[np.ndarray, Columns]:
        logits = outputs[NLI_LOGITS].reshape(-1, len(self.candidate_labels), 2)  # (rows, labels, [contr, entail])
        if self.multi_label:
            scores = _softmax(logits, axis=-1)[..., 1]
        else:
            scores = _softmax(logits[..., 1], axis=-1)
        labels, ordered = [], []
        for row in scores:
            top = list(reversed(row.argsort()))  # the pipeline's order, ties included
            labels.append([self.candidate_labels[i] for i in top])
            ordered.append(row[top].tolist())
        return windows.starts, {S.LABELS: labels, S.SCORES: ordered}

    def fidelity(self, outputs: Columns, reference: Columns) -> dict[str, float | None]:
        """Share of rows whose best label is float32's (gated as label_agreement), and the largest score difference."""
        top = [[labels[0] for labels in columns[S.LABELS]] for columns in (outputs, reference)]
        scores = [{label: score for label, score in zip(*row)} for row in zip(outputs[S.LABELS], outputs[S.SCORES])]
        expected = [{label: score for label, score in zip(*row)} for row in zip(reference[S.LABELS], reference[S.SCORES])]
        diff = max((abs(a[label] - b[label]) for a, b in zip(scores, expected) for label in b), default=0.0)
        return {"label_agreement": fidelity.agreement(*top), "max_score_diff": float(diff)}

    def fields(self) -> list[pa.Field]:
        return [pa.field(S.LABELS, pa.list_(pa.string())), pa.field(S.SCORES, pa.list_(pa.float32()))]

    def metadata(self) -> dict[str, Any]:
        return {
            "candidate_labels": list(self.candidate_labels),
            "hypotheses": list(self.hypotheses),
            "multi_label": self.multi_label,
        }


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)
