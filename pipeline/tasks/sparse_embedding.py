"""``sparse-embedding``: a SPLADE vector per row over ``AutoModelForMaskedLM``, as sentence-transformers'
``SparseEncoder.encode`` computes it (6.2 is the reference).

SPLADE pooling: ``log(1 + relu(logits))`` (``log1p_relu``: ``log1p`` twice) of every real token's MLM
logits, then the max (or sum) over the tokens: one weight per vocabulary entry. The pooling comes from
the checkpoint's ``SpladePooling`` module (a plain MaskedLM checkpoint gets sentence-transformers'
default: max, relu). ``output.sparse_top_k`` (else the checkpoint's ``max_active_dims``) keeps each
vector's k largest weights, as ``encode(max_active_dims=k)``.

Stored as ``list<struct<index: int32, value: float32>>``: the non-zero weights in vocabulary order,
with the vocabulary size in the file metadata (``vocab_size``), so a row converts to a
``torch.sparse_coo_tensor`` or ``scipy.sparse`` row as is. Only those pairs leave the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from pipeline import schema as S
from pipeline.sequences import LongText
from pipeline.tasks.base import Columns, Inputs, ModelBatch, Task

if TYPE_CHECKING:
    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig

SPARSE_TYPE = pa.list_(pa.struct([("index", pa.int32()), ("value", pa.float32())]))


@dataclass(frozen=True)
class SparseChain:
    """What ``SparseEncoder(dir)`` does after the MaskedLM: its SpladePooling and its ``max_active_dims``."""

    pooling: Literal["max", "sum"] = "max"
    activation: Literal["relu", "log1p_relu"] = "relu"
    max_active_dims: int | None = None


def read_sparse_checkpoint(directory: Path, name: str) -> SparseChain:
    """The SPLADE chain of a checkpoint: its ``modules.json`` (a Transformer, then a SpladePooling), else
    sentence-transformers' default for a bare MaskedLM. ``CheckpointError`` for what the job cannot reproduce."""
    from pipeline.checkpoint import CheckpointError
    from pipeline.embedding import _module_kind, _optional_json, _read_json

    model = _optional_json(directory / "config_sentence_transformers.json", name)
    if model.get("model_type", "SparseEncoder") != "SparseEncoder":
        raise CheckpointError(f"{name} is a sentence-transformers {model['model_type']}, not a SparseEncoder")
    prompts = model.get("prompts") or {}
    if any(prompts.values()) or (model.get("default_prompt_name") and prompts.get(model["default_prompt_name"])):
        raise CheckpointError(f"{name}: its SparseEncoder sets prompts {prompts}, which sparse-embedding does not apply")
    if not (directory / "modules.json").is_file():
        return SparseChain()
    entries = _read_json(directory / "modules.json", name)
    kinds = [_module_kind(e) for e in entries] if isinstance(entries, list) and all(isinstance(e, dict) for e in entries) else []
    if kinds[:1] not in (["Transformer"], ["MLMTransformer"]) or kinds[1:] != ["SpladePooling"] or entries[0].get("path", "") not in ("", "."):
        raise CheckpointError(
            f"{name}: modules.json lists {kinds or entries!r}; sparse-embedding runs a SPLADE SparseEncoder: a "
            "MaskedLM Transformer at the checkpoint's root, then SpladePooling (not SparseStaticEmbedding or SparseAutoEncoder)"
        )
    config = _optional_json(directory / "sentence_bert_config.json", name)
    if config.get("transformer_task", "fill-mask") != "fill-mask":
        raise CheckpointError(f"{name}: its Transformer runs {config['transformer_task']!r}, not fill-mask")
    if config.get("do_lower_case") or _transformer_extras(config):
        raise CheckpointError(f"{name}: its sentence-transformers Transformer sets options sparse-embedding does not reproduce")
    pooling = _optional_json(directory / str(entries[1].get("path", "")) / "config.json", name)
    strategy, activation = pooling.get("pooling_strategy", "max"), pooling.get("activation_function", "relu")
    if strategy not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise CheckpointError(f"{name}: SpladePooling {strategy!r}/{activation!r} is not one sentence-transformers 6.2 has")
    return SparseChain(strategy, activation, model.get("max_active_dims"))


def _transformer_extras(config: dict) -> bool:
    """Whether the Transformer config asks for more than a plain forward pass returning the MLM logits."""
    modality = config.get("modality_config") or {"text": {"method": "forward", "method_output_name": "logits"}}
    plain = modality == {"text": {"method": "forward", "method_output_name": "logits"}}
    extras = any(config.get(k) for k in ("processing_kwargs", "query_length", "document_length", "query_expansion"))
    return not plain or extras or config.get("module_output_name", "token_embeddings") != "token_embeddings"


@dataclass(frozen=True)
class SparseEmbedding(Task):
    chain: SparseChain
    vocab_size: int
    top_k: int | None  # keep the k largest weights of each vector; None: every non-zero one

    name = "sparse-embedding"
    auto_model = "AutoModelForMaskedLM"
    head_suffix = "ForMaskedLM"
    inputs = Inputs(pair="forbidden")

    @classmethod
    def from_job(cls, cfg: JobConfig, model: ResolvedModel) -> SparseEmbedding:
        LongText.from_job(cfg, model, cls.name, ("truncate",))  # refuses chunk and aggregate
        chain = read_sparse_checkpoint(Path(model.local_dir), model.source)
        config = json.loads((Path(model.local_dir) / "config.json").read_text())
        return cls(chain, int(config["vocab_size"]), cfg.output.sparse_top_k or chain.max_active_dims)

    def head(self, outputs: Any, batch: ModelBatch) -> Columns:
        import torch

        # SpladePooling.forward (eval mode): padding positions are zeroed before relu, so they never win a max.
        weights = (outputs.logits.float() * batch.attention_mask.unsqueeze(-1)).relu().log1p()
        if self.chain.activation == "log1p_relu":
            weights = weights.log1p()
        pooled = weights.amax(dim=1) if self.chain.pooling == "max" else weights.sum(dim=1)
        if self.top_k is not None:  # select_max_active_dims: the k largest by absolute value
            kept = torch.topk(pooled.abs(), k=min(self.top_k, pooled.shape[-1]), dim=-1).indices
            pooled = torch.zeros_like(pooled).scatter(-1, kept, pooled.gather(-1, kept))
        rows, indices = pooled.nonzero(as_tuple=True)  # row-major: each row's indices ascending
        values = pooled[rows, indices].cpu().numpy()
        rows, indices = rows.cpu().numpy(), indices.int().cpu().numpy()
        vectors: list[list[dict]] = [[] for _ in range(pooled.shape[0])]
        for row, index, value in zip(rows.tolist(), indices.tolist(), values.tolist()):
            vectors[row].append({"index": index, "value": value})
        return {S.SPARSE_EMBEDDING: vectors}

    def fields(self) -> list[pa.Field]:
        return [pa.field(S.SPARSE_EMBEDDING, SPARSE_TYPE)]

    def metadata(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "sparse_pooling": self.chain.pooling,
            "sparse_activation": self.chain.activation,
            "sparse_top_k": self.top_k,
        }
