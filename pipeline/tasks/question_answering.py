"""``question-answering``: an answer span per (question, context) row over ``AutoModelForQuestionAnswering``,
as transformers 4.57's ``pipeline("question-answering")`` (fast tokenizers) answered it; the pipeline was
removed from transformers 5, its span selection ``select_starts_ends`` still ships there and is used here.

``encode`` (the pipeline's ``preprocess``): ``tokenizer(question, context, truncation="only_second",
max_length=window, stride=doc_stride, return_overflowing_tokens=True)``: a long context becomes several
(question, context-window) sequences of its row, consecutive windows sharing ``doc_stride`` tokens. The
window is ``model.max_length`` when set, else the pipeline's ``min(model limit, 384)``; ``model.doc_stride``
defaults to the pipeline's ``min(window // 2, 128)``. A question so long that no context token would
fit beside it (where the pipeline raises) is cut to fit, and the row marked ``truncated``; the pipeline's
``max_question_len`` only applies to slow tokenizers and is not used.

``head``, per window (the pipeline's ``postprocess``): ``select_starts_ends`` over the context tokens and
[CLS] (``p_mask``), taking ``top_k * 2 + 10`` candidates; each candidate's start and end token snapped to
their whole words' characters (``token_to_word`` / ``word_to_chars``, else the tokens' offsets).
``reduce``, per row over its windows in order: candidates with the same answer text (case-insensitive)
have their scores summed, the empty answer (score: the lowest [CLS] span probability of the windows) is
added with ``model.handle_impossible_answer``, and the ``model.top_k`` best are kept (a stable sort, as
the pipeline's ``sorted``).

Output: ``answer`` (``context[answer_start:answer_end]``), ``answer_start`` and ``answer_end`` (int32
character offsets into the context) and ``score`` (float32). With ``model.top_k`` above 1 each column is a
list, best first, of up to ``top_k`` answers (fewer when the context has fewer candidates), where the
pipeline returns a list of dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import fidelity
from pipeline import schema as S
from pipeline.sequences import LongText
from pipeline.tasks.base import Columns, Inputs, ModelBatch, Sequences, Task, Tokenization, Windows

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig

PIPELINE_MAX_SEQ_LEN = 384  # the pipeline's default window, when the model allows it
CANDIDATES = "_qa_candidates"  # per window: [(start char, end char, score), ...] in select_starts_ends' order
NULL_SCORE = "_qa_null_score"  # per window: probability of the [CLS] span
NO_NULL = 1000000.0  # the pipeline's initial min_null_score


@dataclass(frozen=True)
class QuestionAnswering(Task):
    window: int  # tokens per (question, context-window) sequence
    doc_stride: int
    max_answer_len: int
    top_k: int
    handle_impossible_answer: bool
    cls_token_id: int | None

    name = "question-answering"
    auto_model = "AutoModelForQuestionAnswering"
    head_suffix = "ForQuestionAnswering"
    inputs = Inputs(pair="required", pair_role="the context the answer is taken from")
    # Per token of a context window: (word start, word end, token start, token end) characters in the context;
    # (-1, -1, ...) for a token in no word, (-2, -2, 0, 0) for question and special tokens.
    tokenization = Tokenization(offsets=True, span_text="pair")

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> QuestionAnswering:
        from pipeline.checkpoint import actor_tokenizer
        from pipeline.config import ConfigError

        LongText.from_job(cfg, model, cls.name, ("truncate",))  # windows are this task's own
        window = cfg.model.max_length or min(model.max_length, PIPELINE_MAX_SEQ_LEN)
        stride = cfg.model.doc_stride if cfg.model.doc_stride is not None else min(window // 2, 128)
        tokenizer = actor_tokenizer(model)
        if tokenizer.padding_side != "right":
            raise ConfigError(f"question-answering needs a tokenizer that pads on the right; {model.source}'s pads left")
        if window - tokenizer.num_special_tokens_to_add(pair=True) - stride < 2:
            raise ConfigError(
                f"model.doc_stride={stride} leaves no room for a question in windows of {window} tokens: "
                "lower model.doc_stride or raise model.max_length"
            )
        return cls(
            window, stride, cfg.model.max_answer_len, cfg.model.top_k, cfg.model.handle_impossible_answer,
            tokenizer.cls_token_id,
        )  # fmt: skip

    def _question_limit(self, tokenizer: Any) -> int:
        """The most question tokens that leave a context window more than ``doc_stride`` tokens."""
        return self.window - tokenizer.num_special_tokens_to_add(pair=True) - self.doc_stride - 1

    def encode(self, tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> Sequences:
        limit = self._question_limit(tokenizer)
        questions = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
        cut = np.array([len(e.ids) > limit for e in questions.encodings], dtype=bool)
        texts = [t[: e.offsets[limit - 1][1]] if c else t for t, e, c in zip(texts, questions.encodings, cut)]
        encoded = tokenizer(
            texts, pairs, truncation="only_second", max_length=self.window, stride=self.doc_stride,
            return_overflowing_tokens=True, return_attention_mask=False, return_token_type_ids=True,
        )  # fmt: skip
        offsets = []
        for e in encoded.encodings:
            sequence, words = e.sequence_ids, e.word_ids
            flat = []
            for k, (start, end) in enumerate(e.offsets):
                if sequence[k] != 1:
                    flat += (-2, -2, 0, 0)  # not context (p_mask); the pipeline's fallback reads (0, 0) for [CLS]
                    continue
                try:  # the pipeline's get_indices: the whole word, else the token
                    word = e.word_to_chars(words[k], sequence_index=1)
                except Exception:
                    word = (-1, -1)
                flat += (*word, start, end)
            offsets.append(flat)
        return Sequences(
            input_ids=encoded["input_ids"],
            rows=np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64),
            truncated=cut,
            token_type_ids=encoded["token_type_ids"],
            offsets=offsets,
        )

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        from transformers.pipelines.document_question_answering import select_starts_ends

        starts_all, ends_all = outputs.start_logits.float().cpu().numpy(), outputs.end_logits.float().cpu().numpy()
        input_ids = batch.inputs["input_ids"].cpu().numpy()
        candidates, null_scores = [], np.zeros(len(starts_all), dtype=np.float64)
        for i, flat in enumerate(batch.offsets):
            spans = flat.reshape(-1, 4)
            n = len(spans)  # the window's real tokens: padding never enters
            p_mask = (spans[:, 0] == -2) & ~self._is_cls(input_ids[i, :n])  # context tokens and [CLS] may answer
            starts, ends, scores, null = select_starts_ends(
                starts_all[i, None, :n], ends_all[i, None, :n], p_mask.astype(np.int64), np.ones((1, n), np.int64), NO_NULL,
                self.top_k * 2 + 10, self.handle_impossible_answer, self.max_answer_len,
            )  # fmt: skip
            null_scores[i] = null
            found = []
            for s, e, score in zip(starts, ends, scores):
                if spans[s, 0] >= 0 and spans[e, 0] >= 0:  # both tokens in words: snap to them
                    found.append((int(spans[s, 0]), int(spans[e, 1]), float(score)))
                else:
                    found.append((int(spans[s, 2]), int(spans[e, 3]), float(score)))
            candidates.append(found)
        return {CANDIDATES: candidates, NULL_SCORE: null_scores}

    def _is_cls(self, ids: np.ndarray) -> np.ndarray:
        return ids == self.cls_token_id if self.cls_token_id is not None else np.zeros(len(ids), dtype=bool)

    def reduce(self, outputs: Columns, windows: Windows) -> tuple[np.ndarray, Columns]:
        first = windows.starts
        bounds = [*first.tolist(), len(windows.rows)]
        columns: dict[str, list] = {S.ANSWER: [], S.ANSWER_START: [], S.ANSWER_END: [], S.SCORE: []}
        for begin, stop in zip(bounds, bounds[1:]):
            context = windows.texts[begin]
            answers: list[dict] = []
            for w in range(begin, stop):
                for start, end, score in outputs[CANDIDATES][w]:
                    text = context[start:end]
                    same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                    if same:
                        same["score"] += score
                    else:
                        answers.append({"score": score, "start": start, "end": end, "answer": text})
            if self.handle_impossible_answer:
                null = min(NO_NULL, *outputs[NULL_SCORE][begin:stop].tolist())
                answers.append({"score": null, "start": 0, "end": 0, "answer": ""})
            answers = sorted(answers, key=lambda a: a["score"], reverse=True)[: self.top_k]
            for column, key in ((S.ANSWER, "answer"), (S.ANSWER_START, "start"), (S.ANSWER_END, "end"), (S.SCORE, "score")):
                values = [a[key] for a in answers]
                columns[column].append(values if self.top_k > 1 else (values[0] if values else None))
        return first, columns

    def fidelity(self, outputs: Columns, reference: Columns) -> dict[str, float | None]:
        """Share of rows whose answer spans (all ``top_k``) are float32's, gated as label_agreement."""
        spans = [list(zip(columns[S.ANSWER_START], columns[S.ANSWER_END])) for columns in (outputs, reference)]
        return {"label_agreement": fidelity.agreement([str(s) for s in spans[0]], [str(s) for s in spans[1]])}

    def fields(self) -> list[pa.Field]:
        types = [(S.ANSWER, pa.string()), (S.ANSWER_START, pa.int32()), (S.ANSWER_END, pa.int32()), (S.SCORE, pa.float32())]
        return [pa.field(name, pa.list_(t) if self.top_k > 1 else t) for name, t in types]

    def metadata(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "doc_stride": self.doc_stride,
            "max_answer_len": self.max_answer_len,
            "top_k": self.top_k,
            "handle_impossible_answer": self.handle_impossible_answer,
        }
