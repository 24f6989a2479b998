"""The task seam: everything that makes one task differ from another, declared in one place.

A task is a frozen dataclass, configured for one job on the driver (``from_job``) and shipped
to the tokenize and model actors, in the spirit of ray.data.llm's stage specs. Its class
declares what the stages need from it; its instance computes its head and output fields:

- ``inputs``: the input columns it reads (``input.text_column`` always; ``input.text_pair_column``
  forbidden, optional or required). Config validation enforces it;
- ``tokenization``: what the tokenize stage does beyond truncated input ids (a prompt, lowercasing,
  offsets and text);
- ``auto_model``, ``head_suffix``, ``optional_weights``: the ``transformers`` Auto class the model
  actors load, the architecture suffix a checkpoint needs to have the trained head (checked
  before anything starts), and the weights it may lack without running random layers;
- ``head``: model outputs of one micro-batch -> output columns, reduced on the device so only
  the columns leave it (``pipeline.infer`` calls it under ``torch.inference_mode()``);
- ``fields`` and ``metadata``: its output columns (Arrow types; ``pipeline.schema`` assembles
  the file schema from them) and its entries in the file-level metadata; ``describe``: its lines
  in ``--dry-run``'s plan;
- ``calibration``, ``calibrated`` and ``calibrated_like``: constants the head needs from the data as a
  whole (int8 ranges), measured on a sample before the distributed run so that every actor applies
  the same, or taken from an earlier run into the same output;
- ``evaluates``: the output column compared with ``eval.label_column``, if the task has one.

Task modules import no torch at module level (heads use tensor methods): configs, read and
write tasks import the registry, and must stay light.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    import numpy as np
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


@dataclass(frozen=True)
class Tokenization:
    """What the tokenize stage produces for a task besides (truncated, unpadded) input ids."""

    prompt: str = ""  # prepended to every text before tokenizing, so truncation keeps it; counted in num_tokens
    lowercase: bool = False  # lowercase in front of the tokenizer's own normalizer (sentence-transformers' do_lower_case)
    # Each token's (start, end) character span in the text, (-1, -1) for special tokens, and the
    # text itself, so the head can return spans of the original text (ModelBatch.offsets/texts).
    # Spans index the text as tokenized: not with a prompt.
    offsets: bool = False


@dataclass(frozen=True)
class ModelBatch:
    """One micro-batch as the model and the head see it, padded to its own longest row."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask (and token_type_ids for pairs), on the device
    offsets: list[np.ndarray] | None = None  # with Tokenization.offsets: per row, flattened (start, end) spans
    texts: list[str] | None = None  # with Tokenization.offsets: per row, the text those spans index

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

    @property
    def needs_hidden_states(self) -> bool:
        """Whether the head reads ``outputs.hidden_states`` (the forward pass then returns them)."""
        return False

    @abstractmethod
    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        """Output columns for the rows of ``batch`` from the model's ``outputs``.

        Runs in the model actor under ``torch.inference_mode()``, on the model's device: reduce
        there (softmax, argmax, pooling) and move only the results to the CPU."""

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
