"""The task seam: everything that makes one task differ from another, declared in one place.

A task is a frozen dataclass, configured for one job on the driver (``from_job``) and shipped
to the tokenize and model actors, in the spirit of ray.data.llm's stage specs. Its class
declares what the stages need from it; its instance computes its head and output fields:

- ``inputs``: the input columns it reads (``input.text_column`` always; ``input.text_pair_column``
  forbidden, optional or required). Config validation enforces it;
- ``tokenization``: what the tokenize stage does beyond truncated input ids (a prompt, lowercasing,
  offsets and text);
- ``encode`` and ``reduce``: how a row becomes model sequences and their outputs an output row (see
  "Multi-sequence rows" below). By default one truncated sequence per row, one output row per row;
- ``auto_model``, ``head_suffix``, ``optional_weights``: the ``transformers`` Auto class the model
  actors load, the architecture suffix a checkpoint needs to have the trained head (checked
  before anything starts), and the weights it may lack without running random layers;
- ``group_by`` and ``finish_group``: columns computed over a group of rows after inference (a rank
  within a query's group), wherever the group's rows were scored;
- ``head``: model outputs of one micro-batch -> output columns, reduced on the device so only
  the columns leave it (``pipeline.infer`` calls it under ``torch.inference_mode()``);
- ``fields`` and ``metadata``: its output columns (Arrow types; ``pipeline.schema`` assembles
  the file schema from them) and its entries in the file-level metadata; ``describe``: its lines
  in ``--dry-run``'s plan;
- ``calibration``, ``calibrated`` and ``calibrated_like``: constants the head needs from the data as a
  whole (int8 ranges), measured on a sample before the distributed run so that every actor applies
  the same, or taken from an earlier run into the same output;
- ``evaluates``: the output column compared with ``eval.label_column``, if the task has one.

Multi-sequence rows. A row may become several model sequences: windows of a long text, (question,
context-window) pairs, (text, hypothesis) pairs. ``encode`` runs in the tokenize actor and returns a
``Sequences`` for a batch's valid rows: each sequence's ids (and token types, token offsets), the row
it came from and the characters of that row's text it covers. The sequences travel with their row
(one row's sequences never straddle two model calls) and, in the model actor, are ordinary rows of the
token-budget micro-batcher: sorted by length, padded per micro-batch. ``head`` sees micro-batches of
sequences and returns per-sequence columns; ``reduce`` then gets every sequence's columns in order with
their ``Windows`` and returns the output rows: each made of a run of consecutive sequences of one row
(one row per document: aggregate, NER, QA, zero-shot; one row per sequence: chunks). ``num_tokens``
and the padded tokens of an output row are summed over its sequences.

Task modules import no torch at module level (heads use tensor methods): configs, read and
write tasks import the registry, and must stay light.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig

Columns = dict[str, Any]
"""A head's result for the rows of one micro-batch, keyed by output column: 2-D float arrays for
fixed-size vectors, 1-D arrays for scalars, Python lists for nested values (lists, structs)."""


@dataclass(frozen=True)
class Inputs:
    """The input columns a task reads from each row besides ``input.text_column``."""

    pair: Literal["forbidden", "optional", "required"] = "optional"  # input.text_pair_column
    pair_role: str = "the second text"  # what the pair is to this task, for messages (e.g. "the document")
    prompt: bool = False  # takes input.prompt / input.prompt_name
    group: bool = False  # takes input.group_column (see Task.group_by)


@dataclass(frozen=True)
class Tokenization:
    """What the tokenize stage produces for a task besides (truncated, unpadded) input ids."""

    prompt: str = ""  # prepended to every text before tokenizing, so truncation keeps it; counted in num_tokens
    lowercase: bool = False  # lowercase in front of the tokenizer's own normalizer (sentence-transformers' do_lower_case)
    # Each token's (start, end) character span in the text, (-1, -1) for special tokens, and the
    # text itself, so the head can return spans of the original text (ModelBatch.offsets/texts).
    # Spans index the text as tokenized: not with a prompt.
    offsets: bool = False
    text: bool = False  # the row's text reaches the model actor without offsets (Windows.texts), e.g. to quote chunks
    # Which text offsets, spans and the texts the model actor sees are of: "pair" for tasks that window the
    # second text (question-answering's context; ``pipeline.sequences.strided`` with pairs).
    span_text: Literal["text", "pair"] = "text"

    @property
    def keeps_text(self) -> bool:
        return self.offsets or self.text


@dataclass(frozen=True)
class Sequences:
    """The model sequences ``Task.encode`` makes of a batch's valid rows, in row order.

    Sequence ``j`` belongs to row ``rows[j]`` (an index into the valid rows handed to ``encode``): ``rows``
    is non-decreasing and every row has at least one sequence."""

    input_ids: list[list[int]]  # per sequence, with special tokens (and the prompt): what the model reads
    rows: np.ndarray  # int64, per sequence: its row
    truncated: np.ndarray  # bool, per row: some of its text is in no sequence
    token_type_ids: list[list[int]] | None = None  # per sequence, for pairs
    # Per sequence, each token's flattened (start, end) character span in its row's text (for pairs: in the
    # windowed text, the second), (-1, -1) for special tokens and tokens of the other text.
    offsets: list[list[int]] | None = None
    spans: np.ndarray | None = None  # int32 (sequences, 2): the characters of the row's text each covers


@dataclass(frozen=True)
class Windows:
    """How the sequences of one model call map to its rows, for ``Task.reduce`` (all arrays per sequence)."""

    rows: np.ndarray  # int64: the row of the call each sequence belongs to, non-decreasing
    lengths: np.ndarray  # int64: its tokens (the model's real tokens)
    spans: np.ndarray | None  # int32 (sequences, 2): ``Sequences.spans``, None when encode gave none
    texts: list[str] | None  # with ``Tokenization.keeps_text``: per sequence, its row's text (``span_text``)

    @property
    def starts(self) -> np.ndarray:
        """Index of the first sequence of each row that has sequences."""
        return np.flatnonzero(np.r_[True, self.rows[1:] != self.rows[:-1]]) if len(self.rows) else self.rows

    def within(self) -> tuple[np.ndarray, np.ndarray]:
        """(index of each sequence within its row, sequences of its row), per sequence."""
        starts = self.starts
        counts = np.diff(np.r_[starts, len(self.rows)])
        index = np.arange(len(self.rows)) - np.repeat(starts, counts)
        return index, np.repeat(counts, counts)


@dataclass(frozen=True)
class ModelBatch:
    """One micro-batch as the model and the head see it, padded to its own longest row."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask (and token_type_ids for pairs), on the device
    offsets: list[np.ndarray] | None = None  # with Tokenization.offsets: per row, flattened (start, end) spans
    texts: list[str] | None = None  # with Tokenization.offsets: per row, the text those spans index (span_text)

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]


@dataclass(frozen=True)
class Task(ABC):
    """A task configured for one job; see the module docstring. Subclasses are frozen dataclasses
    whose fields are what the head and the output schema need (label map, pooling, sizes...)."""

    name: ClassVar[str]  # the model.task literal
    auto_model: ClassVar[str]  # transformers Auto class the model actors load, e.g. "AutoModelForTokenClassification"
    head_suffix: ClassVar[str | None] = None  # architecture suffix a checkpoint must have; None: any encoder
    optional_weights: ClassVar[tuple[str, ...]] = ()  # weight names it may lack (position_ids always may)
    inputs: ClassVar[Inputs] = Inputs()
    tokenization: ClassVar[Tokenization] = Tokenization()  # override with a property if it depends on config
    evaluates: ClassVar[str | None] = None  # output column compared with eval.label_column

    @classmethod
    @abstractmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> Task:
        """This task for one job: its config and the resolved checkpoint (runs on the driver).

        Raise ``pipeline.config.ConfigError`` for settings the task cannot serve: it runs in the
        plan, so ``--dry-run`` reports it before anything starts."""

    def encode(self, tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> Sequences:
        """The model sequences of a batch's valid ``texts`` (and ``pairs``), in the tokenize actor.

        Default: one sequence per row, truncated to ``max_length`` tokens, with the prompt in front and
        the offsets ``tokenization`` asks for (``pipeline.sequences.truncated``)."""
        from pipeline.sequences import truncated

        return truncated(tokenizer, texts, pairs, max_length, self.tokenization)

    def reduce(self, outputs: Columns, windows: Windows) -> tuple[np.ndarray, Columns]:
        """Output rows from the per-sequence ``outputs`` of one model call, in sequence order.

        Returns ``(first, columns)``: ``first[k]`` is the first sequence of output row ``k`` (increasing,
        starting at 0; output row ``k`` holds sequences ``first[k]:first[k + 1]``, all of one row, and every
        row with sequences has at least one output row) and ``columns`` the output rows' values, keyed by
        ``fields()``. Default: one sequence per row, its outputs as they are."""
        if len(windows.starts) != len(windows.rows):
            raise RuntimeError(f"{self.name} made several sequences of one row but has no reduce")
        return np.arange(len(windows.rows)), outputs

    @property
    def chunked(self) -> bool:
        """Whether ``reduce`` writes a row per sequence (chunks): conservation still counts input rows
        (``rows_out``, ``documents_out``), and manifests add ``chunks_out``, the rows written."""
        return False

    @property
    def needs_hidden_states(self) -> bool:
        """Whether the head reads ``outputs.hidden_states`` (the forward pass then returns them)."""
        return False

    @abstractmethod
    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        """Output columns for the rows of ``batch`` from the model's ``outputs``.

        Runs in the model actor under ``torch.inference_mode()``, on the model's device: reduce
        there (softmax, argmax, pooling) and move only the results to the CPU."""

    @property
    def group_by(self) -> str | None:
        """An input column whose groups the task finishes together after inference (``finish_group``),
        wherever their rows were read and scored; None (the default): every row stands alone."""
        return None

    def finish_group(self, rows: pa.Table) -> pa.Table:
        """``rows`` (every row of one ``group_by`` group, scored, rejected ones included) with the
        columns that depend on the whole group added (e.g. a rank)."""
        raise NotImplementedError(f"{self.name} does not group rows")

    @abstractmethod
    def fields(self) -> list[pa.Field]:
        """The task's output columns, in order, with their Arrow types (the head's keys)."""

    def metadata(self) -> dict[str, Any]:
        """Entries this task adds to the output's file-level metadata (JSON values)."""
        return {}

    def describe(self) -> list[str]:
        """Lines ``--dry-run`` prints under the task's name: by default its metadata entries."""
        return [f"{key} {value}" for key, value in self.metadata().items()]

    def calibration(self) -> tuple[int, Task] | None:
        """``(rows, probe)`` when the head needs constants measured on the data (e.g. int8 ranges): before
        the distributed run, the run scores up to ``rows`` rows of the input with ``probe`` and passes
        the probe's columns to ``calibrated``. None (the default): nothing to measure."""
        return None

    def calibrated(self, outputs: Columns) -> Task:
        """This task with the constants measured on ``outputs``, the probe's columns for the sample rows."""
        raise NotImplementedError(f"{self.name} has no calibration")

    def calibrated_like(self, metadata: dict[str, Any]) -> Task:
        """This task with the constants an earlier run recorded in its ``metadata``, so that every run
        writing into one output applies the same (a nightly date scored in several runs). Default: itself."""
        return self
