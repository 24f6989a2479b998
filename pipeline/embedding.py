"""The embedding chain: token states -> the vectors a checkpoint's authors intended, as sentence-transformers.

One home for the job's model actors (``pipeline.tasks.embedding``) and ``pipeline.search``'s query embedder.
It reproduces ``SentenceTransformer.encode`` (sentence-transformers 6.2) for the modules it knows::

    prompt + text -> tokenizer (truncation keeps the prompt) -> Transformer (AutoModel)
      -> Pooling (cls, max, mean, mean_sqrt_len_tokens, weightedmean, lasttoken, or several concatenated;
                  include_prompt) -> Dense / Normalize modules in checkpoint order
      -> Matryoshka truncation (dimensions) -> L2 re-normalisation when normalising
      -> quantisation (precision), exactly as ``quantize_embeddings``

``read_checkpoint`` reads a checkpoint's sentence-transformers files on the driver (``modules.json``,
``sentence_bert_config.json``, each module's config and Dense weights, ``config_sentence_transformers.json``)
and refuses, naming it, any module or option it cannot reproduce. ``resolve`` lays the explicit
``output.embedding.*`` and ``input.prompt*`` settings over it, each part tagged with where it came from:
that ``EmbeddingChain`` is what ``--dry-run`` prints, what the Parquet metadata records and what the actors
and the query embedder apply. ``embed`` runs on the device in float32 with sentence-transformers' formulas
(its masked reductions, its prompt exclusion); ``encode`` quantises on the CPU with its numpy code.

No torch at module level: the config loads the task registry, which imports this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import torch

    from pipeline.checkpoint import ResolvedModel
    from pipeline.config import JobConfig

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")  # precisions whose value ranges come from the data
PACKED = ("binary", "ubinary")  # one bit per dimension, 8 per byte
# sentence-transformers < 5 saved one flag per mode; it concatenates the modes set in this order.
LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # what encode_document looks for, in its order
TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                       "sentence_camembert_config.json", "sentence_albert_config.json",
                       "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")  # fmt: skip
TEXT_MODALITY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
# sentence_bert_config.json keys that change nothing the pipeline computes (loading and speed options).
HARMLESS_TRANSFORMER_KEYS = {"max_seq_length", "do_lower_case", "unpad_inputs", "transformer_task", "modality_config",
                             "module_output_name", "model_args", "model_kwargs", "tokenizer_args", "processor_kwargs",
                             "config_args", "config_kwargs", "processing_kwargs", "query_length", "document_length",
                             "query_expansion", "backend"}  # fmt: skip
HARMLESS_LOAD_KWARGS = {"torch_dtype", "dtype", "attn_implementation", "trust_remote_code", "revision", "use_fast",
                        "low_cpu_mem_usage", "device_map", "add_pooling_layer", "model_max_length", "padding_side",
                        "cache_dir", "token", "local_files_only", "subfolder"}  # fmt: skip


def _refuse(message: str) -> Exception:
    from pipeline.checkpoint import CheckpointError

    return CheckpointError(message)


def _config_error(message: str) -> Exception:
    from pipeline.config import ConfigError

    return ConfigError(message)


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(f"{name}: {path.name} is not readable JSON ({e})") from None


def _optional_json(path: Path, name: str) -> dict[str, Any]:
    """A module's JSON object config, {} when the file is absent (sentence-transformers' defaults)."""
    config = _read_json(path, name) if path.is_file() else {}
    if not isinstance(config, dict):
        raise _refuse(f"{name}: {path.name} is not a JSON object")
    return config


# ---- what a checkpoint's sentence-transformers files say (driver) -----------------------------------


@dataclass(frozen=True, eq=False)
class Dense:
    """A ``Dense`` module: ``activation(x @ weight.T + bias)``, plus ``x`` (or ``x @ residual.T``) with
    ``use_residual``. Weights travel as numpy arrays; each device keeps its own tensors."""

    in_features: int
    out_features: int
    activation: str  # import path of a torch.nn.Module class, e.g. torch.nn.modules.activation.Tanh
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(repr=False)
    use_residual: bool
    residual: np.ndarray | None = field(repr=False)  # the residual projection when in_features != out_features
    source: str
    _on_device: dict = field(default_factory=dict, repr=False)  # device -> (linear, activation, residual)

    def describe(self) -> str:
        activation = self.activation.rsplit(".", 1)[-1]
        residual = ", residual" if self.use_residual else ""
        return f"Dense {self.in_features} -> {self.out_features}, {activation}{residual} ({self.source})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        key = str(x.device)
        if key not in self._on_device:
            linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(self.weight))
                if self.bias is not None:
                    linear.bias.copy_(torch.from_numpy(self.bias))
            residual = None
            if self.residual is not None:
                residual = torch.nn.Linear(self.in_features, self.out_features, bias=False)
                with torch.no_grad():
                    residual.weight.copy_(torch.from_numpy(self.residual))
                residual = residual.to(x.device).eval()
            activation = activation_module(self.activation).to(x.device)
            self._on_device[key] = (linear.to(x.device).eval(), activation, residual)
        linear, activation, residual = self._on_device[key]
        out = activation(linear(x))
        if self.use_residual:
            out = out + (x if residual is None else residual(x))
        return out


@dataclass(frozen=True)
class Normalize:
    """A ``Normalize`` module: L2 normalisation."""

    source: str

    def describe(self) -> str:
        return f"Normalize ({self.source})"


@dataclass(frozen=True)
class SentenceTransformersConfig:
    """A checkpoint's sentence-transformers chain, as ``SentenceTransformer(dir)`` would load it."""

    pooling: tuple[str, ...]
    include_prompt: bool
    pooling_path: str  # e.g. 1_Pooling
    steps: tuple[Dense | Normalize, ...]  # the modules after Pooling, in order (Dropout, a no-op, left out)
    prompts: dict[str, str]
    default_prompt_name: str | None
    truncate_dim: int | None
    lowercase: bool  # Transformer do_lower_case: a Lowercase normalizer in front of the tokenizer's own
    similarity_fn_name: str | None


def activation_module(path: str):
    """An instance of the ``torch.nn`` module class at import ``path`` (what Dense configs name)."""
    import importlib

    import torch

    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise _refuse(f"Dense activation {path!r} cannot be imported from this torch") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise _refuse(f"Dense activation {path!r} is not a torch.nn.Module class")
    return cls()


def _module_kind(entry: dict) -> str:
    """``Pooling`` for ``sentence_transformers.models.Pooling`` and its newer homes; the full type otherwise."""
    kind = str(entry.get("type", ""))
    return kind.rsplit(".", 1)[-1] if kind.startswith("sentence_transformers.") else kind


def transformer_config(directory: Path) -> dict[str, Any]:
    """The Transformer module's ``sentence_bert_config.json`` (or a legacy name), {} when there is none."""
    for name in TRANSFORMER_CONFIGS:
        if (directory / name).is_file():
            config = _read_json(directory / name, str(directory))
            return config if isinstance(config, dict) else {}
    return {}


def max_seq_length(directory: Path) -> int | None:
    """The truncation length sentence-transformers uses when its config sets one: the tokenizer kwargs'
    ``model_max_length``, else ``max_seq_length`` (newer saves leave it to the tokenizer's own config)."""
    config = transformer_config(directory)
    tokenizer_kwargs = config.get("processor_kwargs") or config.get("tokenizer_args") or {}
    length = tokenizer_kwargs.get("model_max_length") or config.get("max_seq_length")
    return int(length) if length else None


def read_checkpoint(
    directory: Path, name: str, hidden_size: int, allow_pickle: bool
) -> SentenceTransformersConfig | None:
    """The sentence-transformers chain of the checkpoint in ``directory`` (``name`` in messages); None when
    it has no ``modules.json``. ``CheckpointError`` names any module or option the pipeline cannot reproduce."""
    if not (directory / "modules.json").is_file():
        return None
    entries = _read_json(directory / "modules.json", name)
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise _refuse(f"{name}: modules.json is not a list of modules")
    kinds = [_module_kind(e) for e in entries]
    supported = "Transformer, Pooling, Dense, Normalize and Dropout (a no-op at inference)"
    for entry, kind in zip(entries, kinds):
        if kind not in ("Transformer", "Pooling", "Dense", "Normalize", "Dropout"):
            raise _refuse(
                f"{name}: sentence-transformers module {entry.get('idx', '?')} is a {entry.get('type')!r}, which this "
                f"pipeline cannot reproduce (it runs {supported}); embed with sentence-transformers instead"
            )
    if kinds[0] != "Transformer" or entries[0].get("path", "") not in ("", "."):
        raise _refuse(
            f"{name}: modules.json must start with a Transformer saved at the checkpoint's root, not "
            f"{kinds[0]} at {entries[0].get('path')!r}"
        )
    if kinds[1:2] != ["Pooling"] or "Pooling" in kinds[2:] or "Transformer" in kinds[1:]:
        raise _refuse(f"{name}: modules.json lists {kinds}; the pipeline reproduces one Transformer, then one Pooling, "
                      "then Dense and Normalize modules")
    lowercase = _check_transformer(directory, name)
    pooling, include_prompt = _pooling(directory / entries[1]["path"], name, hidden_size)
    width = len(pooling) * hidden_size
    steps: list[Dense | Normalize] = []
    for entry, kind in zip(entries[2:], kinds[2:]):
        path = str(entry.get("path", ""))
        if kind == "Dense":
            dense = _dense(directory / path, f"{name}/{path}", f"checkpoint {path}", allow_pickle)
            if dense.in_features != width:
                raise _refuse(f"{name}: {path} takes {dense.in_features} dims, but the modules before it give {width}")
            width = dense.out_features
            steps.append(dense)
        elif kind == "Normalize":
            config = _optional_json(directory / path / "config.json", name)
            if {config.get("module_input_name"), config.get("module_output_name")} - {None, "sentence_embedding"}:
                raise _refuse(f"{name}: {path} normalises {config}, not the sentence embedding; not reproducible here")
            steps.append(Normalize(f"checkpoint {path}"))
    model = _optional_json(directory / "config_sentence_transformers.json", name)
    if model.get("model_type", "SentenceTransformer") != "SentenceTransformer":
        raise _refuse(f"{name} is a sentence-transformers {model['model_type']}, not a SentenceTransformer: it does "
                      "not produce one dense vector per text")
    prompts = {str(k): str(v) for k, v in (model.get("prompts") or {}).items()}
    default = model.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise _refuse(f"{name}: default_prompt_name {default!r} is not one of its prompts {sorted(prompts)}")
    truncate_dim = model.get("truncate_dim")
    return SentenceTransformersConfig(
        pooling=pooling,
        include_prompt=include_prompt,
        pooling_path=str(entries[1]["path"]),
        steps=tuple(steps),
        prompts=prompts,
        default_prompt_name=default,
        truncate_dim=int(truncate_dim) if truncate_dim else None,
        lowercase=lowercase,
        similarity_fn_name=model.get("similarity_fn_name"),
    )


def _check_transformer(directory: Path, name: str) -> bool:
    """Refuse Transformer options that change tokenization or outputs in ways the pipeline does not
    reproduce (chat templates, other tasks or outputs, per-call processor kwargs); its ``do_lower_case``."""
    config = transformer_config(directory)
    unknown = sorted(set(config) - HARMLESS_TRANSFORMER_KEYS)
    problems = [f"unknown option(s) {unknown}"] if unknown else []
    if config.get("transformer_task", "feature-extraction") != "feature-extraction":
        problems.append(f"transformer_task {config['transformer_task']!r}")
    modality = config.get("modality_config")
    if modality is not None and {k: {"method": v.get("method"), "method_output_name": v.get("method_output_name")}
                                 for k, v in modality.items() if isinstance(v, dict)} != TEXT_MODALITY:
        detail = " (text goes through the tokenizer's chat template)" if "message" in modality else ""
        problems.append(f"modality_config {sorted(modality)}{detail}")
    if config.get("module_output_name", "token_embeddings") != "token_embeddings":
        problems.append(f"module_output_name {config['module_output_name']!r}")
    for key in ("processing_kwargs", "query_length", "document_length", "query_expansion"):
        if config.get(key):
            problems.append(f"{key} {config[key]!r}")
    for key in ("model_args", "model_kwargs", "tokenizer_args", "processor_kwargs", "config_args", "config_kwargs"):
        odd = sorted(set(config.get(key) or {}) - HARMLESS_LOAD_KWARGS)
        if odd:
            problems.append(f"{key} {odd}")
    if problems:
        raise _refuse(f"{name}: its sentence-transformers Transformer sets {'; '.join(problems)}, which this pipeline "
                      "does not reproduce; embed with sentence-transformers instead")
    return bool(config.get("do_lower_case", False))


def _pooling(directory: Path, name: str, hidden_size: int) -> tuple[tuple[str, ...], bool]:
    """(modes, include_prompt) from a Pooling module's config, legacy per-mode flags included."""
    config = _optional_json(directory / "config.json", name)
    legacy = [key for key in LEGACY_POOLING_FLAGS if key in config]
    if "pooling_mode" in config:
        mode = config.pop("pooling_mode")
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in LEGACY_POOLING_FLAGS.items() if config.get(key)) or ("mean",)
    for key in legacy:
        config.pop(key)
    include_prompt = config.pop("include_prompt", True)
    dimension = config.pop("embedding_dimension", config.pop("word_embedding_dimension", hidden_size))
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes or config:
        what = f"pooling mode(s) {unknown}" if unknown or not modes else f"option(s) {sorted(config)}"
        raise _refuse(f"{name}: {directory.name}/config.json sets {what}, which this pipeline does not reproduce "
                      f"(it pools with {', '.join(POOLING_MODES)} and include_prompt)")
    if int(dimension) != hidden_size:
        raise _refuse(
            f"{name}: {directory.name} pools {dimension}-dimensional token embeddings, but the model's are {hidden_size}"
        )
    return modes, bool(include_prompt)


def _dense(directory: Path, name: str, source: str, allow_pickle: bool) -> Dense:
    config = _optional_json(directory / "config.json", name)
    if {config.pop("module_input_name", None), config.pop("module_output_name", None)} - {None, "sentence_embedding"}:
        raise _refuse(f"{name}: the Dense module reads or writes another feature than the sentence embedding")
    activation = config.pop("activation_function", "torch.nn.modules.activation.Tanh")
    if not activation.startswith("torch."):
        raise _refuse(f"{name}: activation {activation!r} is not a torch.nn module: sentence-transformers replaces it "
                      "with Tanh unless trusted with remote code, and this pipeline runs neither")
    activation_module(activation)
    try:
        in_features, out_features = int(config.pop("in_features")), int(config.pop("out_features"))
    except (KeyError, TypeError, ValueError):
        raise _refuse(f"{name}: the Dense config does not give in_features and out_features") from None
    bias, use_residual = bool(config.pop("bias", True)), bool(config.pop("use_residual", False))
    if config:
        raise _refuse(f"{name}: Dense option(s) {sorted(config)} are not reproduced by this pipeline")
    weights = _dense_weights(directory, name, allow_pickle)
    expected = {"linear.weight": (out_features, in_features)}
    if bias:
        expected["linear.bias"] = (out_features,)
    if use_residual and in_features != out_features:
        expected["residual.weight"] = (out_features, in_features)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes != expected:
        raise _refuse(f"{name}: Dense weights {shapes} do not match its config {expected}")
    return Dense(in_features, out_features, activation, weights["linear.weight"], weights.get("linear.bias"),
                 use_residual, weights.get("residual.weight"), source)  # fmt: skip


def _dense_weights(directory: Path, name: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """A Dense module's weights as float32 arrays: ``model.safetensors``, or pickled ``pytorch_model.bin``
    only with ``model.allow_pickle`` (the checkpoint rules of ``pipeline.checkpoint``)."""
    if (directory / "model.safetensors").is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(directory / "model.safetensors", "np") as f:
                return {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise _refuse(f"{name}/model.safetensors is not a readable safetensors file ({e})") from None
    if (directory / "pytorch_model.bin").is_file():
        if not allow_pickle:
            raise _refuse(f"{name} only has pickle weights (pytorch_model.bin); convert them to safetensors or set "
                          "model.allow_pickle: true if you trust the checkpoint")
        import torch

        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise _refuse(f"{name} has no weights (model.safetensors)")


# ---- the effective chain -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingChain:
    """What turns a micro-batch's token states into stored vectors; see the module docstring.

    ``sources`` says where each setting came from: ``config`` (an explicit key), ``checkpoint <file>``,
    or ``default``. ``ranges`` (int8/uint8) are fixed before the run (``calibrated``)."""

    hidden_size: int
    pooling: tuple[str, ...]
    include_prompt: bool
    steps: tuple[Dense | Normalize, ...]  # after pooling, before the final normalisation
    normalize: bool
    dimensions: int | None  # Matryoshka truncation
    precision: str
    prompt: str  # prepended to every document text
    prompt_length: int  # its tokens as sentence-transformers counts them (a trailing special token excluded)
    query_prompt: str  # what jobs.search prepends to queries by default
    query_prompt_length: int
    prompts: dict[str, str]  # the checkpoint's named prompts (jobs.search --prompt-name)
    lowercase: bool
    similarity: str | None  # the checkpoint's similarity_fn_name (jobs.search ranks by cosine)
    sources: dict[str, str]
    calibration_rows: int = 0  # int8/uint8: rows sampled to fix the ranges
    ranges: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # int8/uint8: per-dimension (min, max)
    calibrated_on: int = 0  # rows the ranges were computed from

    @property
    def full_dimensions(self) -> int:
        """Width after pooling and the Dense modules, before truncation."""
        widths = [s.out_features for s in self.steps if isinstance(s, Dense)]
        return widths[-1] if widths else len(self.pooling) * self.hidden_size

    @property
    def output_dimensions(self) -> int:
        return self.dimensions or self.full_dimensions

    @property
    def arrow_type(self) -> pa.DataType:
        """``fixed_size_list<value>[n]``: the dtype and shape ``encode`` returns, as sentence-transformers'."""
        value = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "uint8": pa.uint8(),
                 "binary": pa.int8(), "ubinary": pa.uint8()}[self.precision]  # fmt: skip
        width = math.ceil(self.output_dimensions / 8) if self.precision in PACKED else self.output_dimensions
        return pa.list_(value, width)

    @property
    def needs_calibration(self) -> bool:
        return self.precision in CALIBRATED and self.ranges is None

    def for_queries(self, prompt: str | None = None, prompt_length: int | None = None) -> EmbeddingChain:
        """The chain ``jobs.search`` embeds queries with: the query prompt (or ``prompt``), float32 vectors."""
        if prompt is None:
            prompt, prompt_length = self.query_prompt, self.query_prompt_length
        return replace(self, prompt=prompt, prompt_length=prompt_length or 0, precision="float32", ranges=None)

    def calibrated(self, vectors: np.ndarray) -> EmbeddingChain:
        """This chain with int8/uint8 ranges from float ``vectors`` of a sample (as ``quantize_embeddings``
        computes them from calibration embeddings: per-dimension min and max)."""
        if len(vectors) < 2:
            raise _config_error(
                f"output.embedding.precision {self.precision} needs value ranges from at least 2 embedded rows, "
                f"but the calibration sample had {len(vectors)}"
            )
        ranges = np.vstack((vectors.min(axis=0), vectors.max(axis=0))).astype(np.float32)
        return replace(self, ranges=tuple(tuple(float(v) for v in row) for row in ranges), calibrated_on=len(vectors))

    # -- on the device ---------------------------------------------------------------------------------

    def embed(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """float32 vectors from a micro-batch's last hidden states, before quantisation."""
        import torch.nn.functional as F

        exclude = 0 if self.include_prompt else self.prompt_length
        x = pool(hidden.float(), attention_mask, self.pooling, exclude)
        for step in self.steps:
            x = F.normalize(x, p=2, dim=-1) if isinstance(step, Normalize) else step(x)
        if self.normalize:
            x = F.normalize(x, p=2, dim=-1)
        if self.dimensions:
            x = x[..., : self.dimensions]
            if self.normalize:
                x = F.normalize(x, p=2, dim=1)
        return x

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """The stored vectors: ``vectors`` (float32, on the CPU) in ``precision``."""
        if self.precision == "float16":
            return vectors.astype(np.float16)
        if self.needs_calibration:
            raise RuntimeError(f"{self.precision} vectors need ranges, and this chain was not calibrated")
        ranges = np.asarray(self.ranges, dtype=np.float32) if self.ranges is not None else None
        return quantize(vectors, self.precision, ranges)

    # -- what it says about itself -----------------------------------------------------------------------

    def describe(self) -> list[str]:
        """The chain, one part per line with where it came from (``--dry-run``, Parquet metadata)."""
        s = self.sources
        prompt = f"{self.prompt!r} ({self.prompt_length} tokens; {s['prompt']})" if self.prompt else f"none ({s['prompt']})"
        include = str(self.include_prompt).lower()
        lines = [f"prompt {prompt}",
                 f"pooling {'+'.join(self.pooling)} ({s['pooling']}), include_prompt {include} ({s['include_prompt']})"]
        lines += [step.describe() for step in self.steps]
        lines.append(f"normalize {str(self.normalize).lower()} ({s['normalize']})")
        if self.dimensions:
            lines.append(f"dimensions {self.dimensions} of {self.full_dimensions} ({s['dimensions']})"
                         + (", re-normalised" if self.normalize else ""))
        precision = f"precision {self.precision} ({s['precision']})"
        if self.precision in CALIBRATED:
            precision += (f", ranges from {self.calibrated_on} rows" if self.ranges else
                          f", ranges computed on up to {self.calibration_rows} input rows before the run")
        lines.append(f"{precision} -> {self.arrow_type}")
        lines.append(f"queries: prompt {self.query_prompt!r} ({s['query_prompt']})" if self.query_prompt else
                     f"queries: no prompt ({s['query_prompt']})")
        if self.similarity not in (None, "cosine"):
            lines.append(f"similarity {self.similarity} (checkpoint config_sentence_transformers.json): "
                         "jobs.search ranks by cosine")
        return lines

    def metadata(self) -> dict[str, Any]:
        return {
            "embedding_chain": self.describe(),
            "pooling": "+".join(self.pooling),
            "include_prompt": self.include_prompt,
            "normalize": self.normalize,
            "dimensions": self.output_dimensions,
            "precision": self.precision,
            "prompt": self.prompt,
            "query_prompt": self.query_prompt,
            "quantization_ranges": [list(row) for row in self.ranges] if self.ranges else None,
            "calibrated_on": self.calibrated_on,
        }


def resolve(cfg: JobConfig, model: ResolvedModel) -> EmbeddingChain:
    """The effective chain of ``model`` for job ``cfg``: its sentence-transformers chain (or, without one,
    sentence-transformers' own fallback: mean pooling, lasttoken for ``*ForCausalLM``) overridden by the
    explicit ``output.embedding.*`` and ``input.prompt*`` settings. Runs on the driver."""
    settings, source = cfg.output.embedding, "config"
    st = read_checkpoint(Path(model.local_dir), model.source, model.hidden_size, model.allow_pickle)
    sources: dict[str, str] = {}

    def pick(name: str, explicit: Any, checkpoint: Any, where: str, default: Any) -> Any:
        if explicit is not None:
            sources[name] = source
            return explicit
        if st is not None and checkpoint is not None:
            sources[name] = f"checkpoint {where}"
            return checkpoint
        sources[name] = "default" if st is not None else "default: no sentence-transformers config"
        return default

    causal = model.architecture.endswith("ForCausalLM")
    requested = (settings.pooling,) if isinstance(settings.pooling, str) else settings.pooling
    pooling = pick("pooling", tuple(requested) if requested else None, st and st.pooling,
                   f"{st and st.pooling_path}/config.json", ("lasttoken",) if causal else ("mean",))
    include_prompt = pick("include_prompt", settings.include_prompt, st and st.include_prompt,
                          f"{st and st.pooling_path}/config.json", True)
    steps = list(st.steps) if st else []
    trailing = steps.pop() if steps and isinstance(steps[-1], Normalize) else None
    normalize = pick("normalize", settings.normalize, bool(trailing) if st else None,
                     trailing.source.removeprefix("checkpoint ") if trailing else "(no Normalize module)", True)
    width = len(pooling) * model.hidden_size
    dense = [s for s in steps if isinstance(s, Dense)]
    if dense and dense[0].in_features != width:
        raise _config_error(f"output.embedding.pooling {'+'.join(pooling)} gives {width} dims, but the checkpoint's "
                            f"{dense[0].describe()} takes {dense[0].in_features}: choose a pooling of that width")
    full = dense[-1].out_features if dense else width
    dimensions = pick("dimensions", settings.dimensions, st and st.truncate_dim,
                      "config_sentence_transformers.json truncate_dim", None)
    if dimensions is not None and dimensions > full:
        raise _config_error(f"output.embedding.dimensions {dimensions} is more than the {full} dims the chain gives")
    if not dimensions:
        sources["dimensions"] = "full width"
    sources["precision"] = source if "precision" in settings.model_fields_set else "default"
    prompts = dict(st.prompts) if st else {}
    prompt = _document_prompt(cfg, prompts, st, sources)
    query_prompt = prompts.get("query", "")
    sources["query_prompt"] = "checkpoint prompts['query']" if query_prompt else "the checkpoint has no query prompt"
    lowercase = bool(st and st.lowercase)
    chain = EmbeddingChain(
        hidden_size=model.hidden_size,
        pooling=pooling,
        include_prompt=include_prompt,
        steps=tuple(steps),
        normalize=normalize,
        dimensions=dimensions,
        precision=settings.precision,
        prompt=prompt,
        prompt_length=0,
        query_prompt=query_prompt,
        query_prompt_length=0,
        prompts=prompts,
        lowercase=lowercase,
        similarity=st.similarity_fn_name if st else None,
        sources=sources,
        calibration_rows=settings.calibration_rows,
    )
    if prompt or query_prompt:
        from pipeline.checkpoint import actor_tokenizer

        tokenizer = actor_tokenizer(model, lowercase=lowercase)
        chain = replace(chain, prompt_length=prompt_length(tokenizer, prompt, model.max_length),
                        query_prompt_length=prompt_length(tokenizer, query_prompt, model.max_length))
    return chain


def _document_prompt(cfg: JobConfig, prompts: dict[str, str], st: SentenceTransformersConfig | None,
                     sources: dict[str, str]) -> str:
    """The prompt for the job's texts: ``input.prompt``, ``input.prompt_name``, else as ``encode_document``
    (the first non-empty of the checkpoint's document, passage, corpus prompts), else its
    ``default_prompt_name``, else none."""
    given = cfg.input
    if given.prompt is not None:
        sources["prompt"] = "config input.prompt"
        return given.prompt
    if given.prompt_name is not None:
        if given.prompt_name not in prompts:
            raise _config_error(f"input.prompt_name {given.prompt_name!r} is not a prompt of {cfg.model.path}: it has "
                                f"{sorted(prompts) or 'no prompts (config_sentence_transformers.json)'}")
        sources["prompt"] = f"config input.prompt_name, checkpoint prompts[{given.prompt_name!r}]"
        return prompts[given.prompt_name]
    for name in DOCUMENT_PROMPTS:
        if prompts.get(name):
            sources["prompt"] = f"checkpoint prompts[{name!r}]"
            return prompts[name]
    if st is not None and st.default_prompt_name and prompts.get(st.default_prompt_name):
        sources["prompt"] = f"checkpoint default_prompt_name {st.default_prompt_name!r}"
        return prompts[st.default_prompt_name]
    sources["prompt"] = "the checkpoint sets no document prompt" if st else "default: no sentence-transformers config"
    return ""


def prompt_length(tokenizer, prompt: str, max_length: int) -> int:
    """Tokens of ``prompt`` tokenized alone, a trailing special token (EOS, SEP) excluded: what
    sentence-transformers excludes from pooling with ``include_prompt: false``."""
    if not prompt:
        return 0
    ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
    return len(ids) - (1 if ids and ids[-1] in tokenizer.all_special_ids else 0)


# ---- sentence-transformers' numerics ---------------------------------------------------------------------


def exclude_prompt(attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """``attention_mask`` with the first ``prompt_length`` real tokens of each row masked out (a copy)."""
    import torch

    mask = attention_mask.clone()
    pad_lengths = mask.to(torch.int32).argmax(dim=1)
    if pad_lengths.sum() == 0:
        mask[:, :prompt_length] = 0
    else:  # left padding: the prompt starts after each row's pads
        positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)
        mask[positions < (pad_lengths + prompt_length).unsqueeze(1)] = 0
    return mask


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...] | str, exclude: int = 0
) -> torch.Tensor:
    """sentence-transformers' ``Pooling`` over padded token states: each mode in turn, concatenated.
    ``exclude``: prompt tokens left out (``include_prompt: false``)."""
    import torch

    modes = (modes,) if isinstance(modes, str) else modes
    original = attention_mask
    mask = exclude_prompt(attention_mask, exclude) if exclude else attention_mask
    rows, length, width = hidden.shape
    pooled = []
    for mode in modes:
        if mode == "cls":  # the first token the mask keeps
            first = mask.to(torch.int).argmax(dim=1)
            pooled.append(torch.gather(hidden, 1, first.view(-1, 1, 1).expand(-1, 1, width)).squeeze(1))
        elif mode == "max":
            keep = mask.unsqueeze(-1).expand_as(hidden).to(hidden.dtype)
            pooled.append(hidden.masked_fill(keep == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            keep = mask.unsqueeze(-1).to(hidden.dtype)
            total = (hidden * keep).sum(dim=1)
            count = torch.clamp(keep.sum(dim=1), min=1e-9)
            pooled.append(total / (count if mode == "mean" else torch.sqrt(count)))
        elif mode == "weightedmean":  # position weights 1, 2, ... from the first real token
            keep = mask.unsqueeze(-1).to(hidden.dtype)
            weights = torch.arange(1, length + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
            weights = weights - original.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
            weighted = keep * weights
            pooled.append((hidden * weighted).sum(dim=1) / torch.clamp(weighted.sum(dim=1), min=1e-9))
        elif mode == "lasttoken":  # the last token the mask keeps
            values, indices = mask.flip(1).max(1)
            indices = torch.where(values == 0, length - 1, indices)
            last = (length - indices - 1).view(-1, 1, 1).expand(-1, 1, width)
            keep = mask.unsqueeze(-1).expand_as(hidden).to(hidden.dtype)
            pooled.append(torch.gather(hidden * keep, 1, last).squeeze(1))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(pooled, dim=-1)


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """``quantize_embeddings(vectors, precision, ranges)``: float32 vectors to ``precision``, bit for bit."""
    if precision == "float32":
        return vectors.astype(np.float32)
    if precision in CALIBRATED:
        ranges = ranges.astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
    if precision == "binary":
        return (np.packbits(vectors > 0, axis=-1) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(vectors > 0, axis=-1)
    raise ValueError(f"unknown precision {precision!r}")


def dequantize(values: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    """int8/uint8 values back to float32 bucket starts, as sentence-transformers rescoring does."""
    ranges = np.asarray(ranges, dtype=np.float32)
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    values = values.astype(np.float64) + (128 if precision == "int8" else 0)
    return (values * steps + ranges[0]).astype(np.float32)


def unsigned_bits(values: np.ndarray, precision: str) -> np.ndarray:
    """Packed ``binary`` (int8, offset by 128) or ``ubinary`` (uint8) vectors as ``ubinary`` bytes."""
    return values.view(np.uint8) ^ np.uint8(0x80) if precision == "binary" else values.astype(np.uint8, copy=False)
