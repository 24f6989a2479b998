"""``rerank``: a cross-encoder's relevance score per (query, document) row, as sentence-transformers'
``CrossEncoder.predict``, and with ``input.group_column`` each row's rank within its query's group, as
``CrossEncoder.rank`` orders the group's documents.

The score is the checkpoint's single logit through the activation ``CrossEncoder`` applies by default:
the one its config names (``sentence_transformers.activation_fn``, or the older
``sbert_ce_default_activation_function``), else sigmoid.

Ranks need every row of a group, which may be read by several read tasks and scored by several model
actors: they are computed after inference, when the run groups the scored rows by the group column
(``Task.group_by``: a Ray Data ``groupby().map_groups()``, see ``pipeline.run.model_stages``). Rank 1
is the best score; equal scores keep input order, (shard, row), as ``rank``'s stable sort keeps the
order of its ``documents``. Rows whose group value is null get a null rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S
from pipeline.sequences import LongText
from pipeline.tasks.base import Columns, Inputs, ModelBatch, Task

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig

DEFAULT_ACTIVATION = "torch.nn.modules.activation.Sigmoid"  # CrossEncoder's default for one label


def activation_path(checkpoint: Path, name: str) -> str:
    """The activation ``CrossEncoder(checkpoint).predict`` applies to its logit, as sentence-transformers 6.2
    finds it: ``activation_fn`` of ``config_sentence_transformers.json``, else of config.json's
    ``sentence_transformers`` entry (or the older ``sbert_ce_default_activation_function``), else sigmoid.

    ``CheckpointError`` for what the job would not reproduce: another sentence-transformers model type,
    modules after the Transformer, prompts, or an activation outside ``torch`` (which sentence-transformers
    only loads with ``trust_remote_code``)."""
    from pipeline.checkpoint import CheckpointError
    from pipeline.embedding import activation_module

    def read(file: str) -> dict:
        path = checkpoint / file
        return json.loads(path.read_text()) if path.is_file() else {}

    st, config = read("config_sentence_transformers.json"), read("config.json")
    if st.get("model_type", "CrossEncoder") != "CrossEncoder":
        raise CheckpointError(f"{name} is a sentence-transformers {st['model_type']}, not a CrossEncoder")
    if len(read("modules.json") or [None]) > 1:
        raise CheckpointError(f"{name}: its CrossEncoder has modules after the Transformer (modules.json), which this pipeline does not run")
    if any((st.get("prompts") or {}).values()) or st.get("default_prompt_name"):
        raise CheckpointError(f"{name}: its CrossEncoder sets prompts, which rerank does not apply")
    path = (
        st.get("activation_fn")
        or (config.get("sentence_transformers") or {}).get("activation_fn")
        or config.get("sbert_ce_default_activation_function")
        or DEFAULT_ACTIVATION
    )
    if not str(path).startswith("torch."):
        raise CheckpointError(f"{name}: its cross-encoder activation {path!r} is not a torch class; rerank runs torch.nn activations only")
    activation_module(path)  # refuses a path this torch cannot import, before anything starts
    return str(path)


@dataclass(frozen=True)
class Rerank(Task):
    activation: str  # import path of the torch.nn activation applied to the logit
    group_column: str | None  # input.group_column: rank rows within its groups

    name = "rerank"
    auto_model = "AutoModelForSequenceClassification"
    head_suffix = "ForSequenceClassification"
    inputs = Inputs(pair="required", pair_role="the document scored against the query (input.text_column)", group=True)

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> Rerank:
        LongText.from_job(cfg, model, cls.name, ("truncate",))  # refuses chunk and aggregate
        return replace(cls.for_checkpoint(model), group_column=cfg.input.group_column)

    @classmethod
    def for_checkpoint(cls, model: ResolvedModel) -> Rerank:
        """Scores of the cross-encoder ``model`` without ranks (also ``pipeline.search.Reranker``'s head)."""
        from pipeline.config import ConfigError

        if len(model.id2label) != 1:
            raise ConfigError(
                f"rerank needs a cross-encoder with one output (a relevance logit); {model.source} has "
                f"{len(model.id2label)} labels {list(model.id2label.values())}: use model.task: sequence-classification"
            )
        return cls(activation_path(Path(model.local_dir), model.source), None)

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        from pipeline.embedding import activation_module

        scores = activation_module(self.activation)(outputs.logits.float()).squeeze(-1)
        return {S.SCORE: scores.cpu().numpy()}

    @property
    def group_by(self) -> str | None:
        return self.group_column

    def finish_group(self, rows: pa.Table) -> pa.Table:
        """``rank`` (1 = best score) for the scored rows of one group; null for rejected rows and a null group."""
        ranked = pc.and_(pc.is_null(rows[S.ERROR]), pc.is_valid(rows[self.group_column])).to_numpy(zero_copy_only=False)
        rank = np.zeros(rows.num_rows, dtype=np.int32)
        if ranked.any():
            picked = np.flatnonzero(ranked)
            scores = rows[S.SCORE].to_numpy(zero_copy_only=False)[picked]
            files = rows[S.SOURCE_FILE].to_numpy(zero_copy_only=False)[picked]
            lines = rows[S.SOURCE_ROW].to_numpy(zero_copy_only=False)[picked]
            order = np.lexsort((lines, files, -scores))  # last key first: score descending, then input order
            rank[picked[order]] = np.arange(1, len(picked) + 1, dtype=np.int32)
        return rows.append_column(S.RANK, pa.array(rank, pa.int32(), mask=~ranked))

    def fields(self) -> list[pa.Field]:
        fields = [pa.field(S.SCORE, pa.float32())]
        if self.group_column:
            fields.append(pa.field(S.RANK, pa.int32()))
        return fields

    def metadata(self) -> dict[str, Any]:
        return {"activation": self.activation, "group_column": self.group_column}
