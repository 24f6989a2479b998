"""Job configuration: one YAML file, validated by pydantic, overridable with ``--set``.

Every key is documented by its ``Field(description=...)``; the README's config
reference is generated from the same descriptions (``config_reference``, printed by
``python -m jobs.run --config-reference``). Unknown keys are rejected with the key named.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline import tasks


def _registered_task(name: str) -> str:
    """A ``pipeline.tasks`` registry name (checked at validation time, so the registry is the one list)."""
    if name not in tasks.REGISTRY:
        *rest, last = [repr(t) for t in tasks.REGISTRY]
        expected = f"{', '.join(rest)} or {last}" if rest else last
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return name


TaskName = Annotated[str, AfterValidator(_registered_task)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Strict):
    path: str = Field(
        description="File, directory or glob of input shards, local or s3://bucket/prefix; a `datasets` save_to_disk "
        "directory (local or s3://); or a Hub dataset, hf://datasets/<org>/<name>[/<path in the repo>] "
        "(see README: Input)."
    )
    format: Literal["parquet", "jsonl", "arrow"] | None = Field(
        None,
        description="Shard format. Omitted: each file is read by its own extension (.parquet/.pq, .jsonl/.json/"
        ".ndjson, optionally .gz, .arrow: Arrow IPC stream or file), so a directory may mix them. Set: files of "
        "another format are an error. Files with other extensions (README, .csv) are skipped and listed in the plan "
        "and manifest (files_skipped).",
    )
    revision: str | None = Field(
        None,
        description="hf:// datasets: the branch, tag or commit to read (default: main), resolved to a commit sha once "
        "on the driver; `refs/convert/parquet` reads the Hub's Parquet conversion. A new commit is new input.",
    )
    config: str | None = Field(
        None,
        description="hf:// datasets: the config (subset) to read. Default: the dataset's default config, or its only one.",
    )
    split: str | None = Field(
        None,
        description="hf:// datasets and save_to_disk DatasetDicts: the split to read. Default: the only split.",
    )
    text_column: str = Field("text", description="Column holding the text to encode (string, or binary holding UTF-8).")
    text_pair_column: str | None = Field(None, description="Optional second text for pair inputs (e.g. NLI, reranking).")
    group_column: str | None = Field(
        None,
        description="rerank: column naming each row's query (its group); adds `rank`, 1 = best score within the "
        "group, computed after inference over every row of the group. Copied to the output like an id column.",
    )
    id_columns: list[str] = Field(
        default_factory=list,
        description="Columns copied unchanged to the output. When empty, a deterministic `id` "
        "('<file relative to input root>:<row>'; a Hub dataset's root is its repo's) is generated.",
    )
    reject_duplicate_ids: bool = Field(
        True,
        description="With id_columns: a pre-pass over the ids rejects every repeat of an id (`duplicate_id`), "
        "keeping the first in (shard, row) order.",
    )
    max_text_bytes: int = Field(
        1_000_000, gt=0, description="Rows whose text exceeds this many UTF-8 bytes are rejected (`text_too_large`)."
    )
    prompt_name: str | None = Field(
        None,
        description="embedding: the checkpoint's prompt (config_sentence_transformers.json `prompts`) prepended to every "
        "text. Default: as sentence-transformers' encode_document: its first non-empty `document`, `passage` or "
        "`corpus` prompt, else its `default_prompt_name`, else none.",
    )
    prompt: str | None = Field(
        None, description="embedding: a literal prompt prepended to every text, instead of prompt_name."
    )
    long_text: Literal["truncate", "chunk", "aggregate"] = Field(
        "truncate",
        description="Texts longer than model.chunk_size tokens. truncate: cut at model.max_length (`truncated` "
        "says so). chunk (embedding): one output row per chunk of whole words, overlapping by model.chunk_overlap "
        "tokens, with chunk_index, num_chunks, char_start, char_end. aggregate (embedding, sequence-classification): "
        "one row per text, the token-count-weighted mean of its chunks' vectors or logits. token-classification "
        "with chunk or aggregate: entities over the whole text from windows overlapping by model.chunk_overlap, "
        "merged as the HF pipeline's stride does (README: Long documents).",
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> InputConfig:
        if self.prompt is not None and self.prompt_name is not None:
            raise ValueError("set input.prompt (a literal) or input.prompt_name (one of the checkpoint's), not both")
        return self

    @model_validator(mode="after")
    def _check_hub_keys(self) -> InputConfig:
        for key in ("revision", "config"):
            if getattr(self, key) is not None and not self.path.startswith("hf://"):
                raise ValueError(f"input.{key} applies to Hub datasets (input.path: hf://datasets/<org>/<name>) only")
        return self


class FidelityThresholds(_Strict):
    """The least a reduced-precision run must keep of the float32 reference on the calibration sample
    (``pipeline.fidelity``); the task decides which of these its outputs are measured by."""

    label_agreement: float = Field(
        0.995,
        ge=0,
        le=1,
        description="sequence-classification, zero-shot-classification: share of sample rows whose (best) label "
        "matches float32's; token-classification: share of tokens whose label does; question-answering: share of "
        "rows whose answer spans do.",
    )
    cosine_min: float = Field(
        0.99,
        ge=-1,
        le=1,
        description="embedding, sparse-embedding: lowest cosine between a sample row's vector and float32's.",
    )
    recall_at_10: float = Field(
        0.98,
        ge=0,
        le=1,
        description="embedding, sparse-embedding: mean overlap of each sample row's 10 nearest neighbours in the "
        "sample with float32's.",
    )
    order_agreement: float = Field(
        0.99,
        ge=0,
        le=1,
        description="rerank: share of sample row pairs whose scores the run orders as float32 does.",
    )


class ModelConfig(_Strict):
    path: str = Field(
        description="Hub id (org/name), local save_pretrained directory, s3:// prefix, or pkg://<python package>/<dir> "
        "for a checkpoint shipped inside an installed package."
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit to pin; resolved to a commit sha.")
    task: TaskName = Field(
        description=f"Which task to run: {', '.join(tasks.REGISTRY)} (see README: Tasks and outputs)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights/compute dtype. auto = float16 on GPU, float32 on CPU. On a CPU bfloat16 is the fast one; "
        "float16 is slower there than float32 (the plan and the run warn).",
    )
    backend: Literal["torch", "openvino"] = Field(
        "torch",
        description="What computes the forward pass. openvino (CPUs only; pip install 'encoder-batch[openvino]'): "
        "the torch model converted with openvino.convert_model when each model actor starts, computing in "
        "model.dtype float32 or bfloat16; on a CPU with bfloat16 support it is the fastest (README: CPU backends). "
        "The fidelity gate checks every run on it against torch float32, float32 included.",
    )
    min_fidelity: FidelityThresholds = Field(
        default_factory=FidelityThresholds,
        description="Fidelity gate: a run that does not compute in torch float32 first scores model.fidelity_rows "
        "rows of its input in torch float32 and in its own backend and dtype, records the agreement in the manifest (`fidelity`) and "
        "fails, before it writes anything, if a figure is below its threshold (see README: Fidelity gate).",
    )
    fidelity_rows: int = Field(
        256,
        ge=0,
        description="Rows of the input (the first valid ones, spread over up to 16 shards) the fidelity gate "
        "scores twice. 0 turns the gate off (recorded in the manifest).",
    )
    max_length: int | None = Field(
        None,
        gt=0,
        description="Truncation length in tokens. Default: the model's limit (sentence-transformers' max_seq_length "
        "when the checkpoint ships one, else the tokenizer/position-embedding limit).",
    )
    chunk_size: int | None = Field(
        None, gt=0, description="input.long_text chunk/aggregate: tokens per chunk or window, special tokens and "
        "prompt included. Default: max_length. At most max_length."
    )
    chunk_overlap: int = Field(
        32, ge=0, description="input.long_text chunk/aggregate: tokens consecutive chunks or windows share; less "
        "than chunk_size minus the special tokens and prompt."
    )
    candidate_labels: list[str] | None = Field(
        None, description="zero-shot-classification: the labels each row is scored against (required)."
    )
    hypothesis_template: str = Field(
        "This example is {}.", description="zero-shot-classification: the NLI hypothesis per label; {} is the label."
    )
    multi_label: bool = Field(
        False, description="zero-shot-classification: score labels independently (entailment vs contradiction per "
        "label) instead of a softmax over the labels."
    )
    doc_stride: int | None = Field(
        None, gt=0, description="question-answering: tokens consecutive windows of a long context share. Default: "
        "the pipeline's min(window / 2, 128)."
    )
    max_answer_len: int = Field(15, gt=0, description="question-answering: longest answer, in tokens.")
    top_k: int = Field(
        1, gt=0, description="question-answering: answers per row, best first (above 1 the answer columns are lists)."
    )
    handle_impossible_answer: bool = Field(
        False, description="question-answering: allow the empty answer (the [CLS] span) when it scores best."
    )
    allow_pickle: bool = Field(False, description="Allow loading pickle (.bin) weights. Off: only safetensors load.")
    trust_remote_code: bool = Field(False, description="Allow checkpoints that execute their own modelling code.")

    @model_validator(mode="before")
    @classmethod
    def _not_offered(cls, data: Any) -> Any:
        """``quantize`` (as sentence-transformers and Optimum spell it) is refused with the reason."""
        if isinstance(data, dict) and "quantize" in data:
            raise ValueError(
                "model.quantize is not offered: no int8 variant (ONNX Runtime dynamic or static, OpenVINO with NNCF) "
                "kept MiniLM within the fidelity gate (README: CPU backends); on a CPU use model.dtype bfloat16 "
                "with model.backend openvino"
            )
        return data

    @model_validator(mode="after")
    def _backend_dtype(self) -> ModelConfig:
        if self.backend == "openvino" and self.dtype == "float16":
            raise ValueError("model.backend openvino computes in float32 or bfloat16 (model.dtype), not float16")
        return self


class PoolConfig(_Strict):
    size: int | None = Field(None, gt=0, description="Fixed pool size; overrides min_size/max_size.")
    min_size: int = Field(1, gt=0, description="Autoscaling lower bound on actors.")
    max_size: int | None = Field(None, gt=0, description="Autoscaling upper bound; default = min_size.")
    num_cpus: float | None = Field(
        None, gt=0, description="CPUs reserved per actor. Default: sized so reads always keep a CPU (see README)."
    )

    @property
    def bounds(self) -> tuple[int, int]:
        if self.size is not None:
            return self.size, self.size
        return self.min_size, max(self.min_size, self.max_size or self.min_size)


class TokenizeConfig(_Strict):
    path: str | None = Field(None, description="Tokenizer location when it differs from model.path.")
    batch_size: int = Field(1024, gt=0, description="Rows per tokenizer call.")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="Tokenizer actor pool (CPU).")


class InferenceConfig(_Strict):
    batch_size: int = Field(
        512, gt=0, description="Rows per model-actor call; rows are sorted by length within each call."
    )
    max_tokens_per_batch: int | Literal["auto"] = Field(
        "auto",
        description="Token budget per forward pass (rows x padded length of each micro-batch), at least the max "
        "length. auto: sized from free GPU memory on CUDA, 4096 on CPU (larger ones spend CPU time on page faults).",
    )
    min_padding_efficiency: float = Field(
        0.9,
        ge=0,
        le=1,
        description="A micro-batch stops growing before its real/padded token ratio drops below this. "
        "Lower it on GPUs, where bigger batches matter more than padding.",
    )
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per model actor. Default: 1 when the cluster has GPUs, else 0."
    )
    pool: PoolConfig = Field(default_factory=PoolConfig, description="Model actor pool.")

    @field_validator("max_tokens_per_batch")
    @classmethod
    def _positive_budget(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be auto or a number of tokens, at least model.max_length")
        return value


PoolingMode = Literal["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]


class EmbeddingOutputConfig(_Strict):
    """Each key left unset comes from the checkpoint's sentence-transformers chain (see README: Embeddings)."""

    pooling: PoolingMode | Annotated[list[PoolingMode], Field(min_length=1)] | None = Field(
        None,
        description="cls, max, mean, mean_sqrt_len_tokens, weightedmean or lasttoken, or a list (concatenated in "
        "order). Default: the checkpoint's Pooling module; without one, mean (lasttoken for *ForCausalLM).",
    )
    include_prompt: bool | None = Field(
        None, description="Pool over the prompt's tokens too. Default: the checkpoint's Pooling module, else true."
    )
    normalize: bool | None = Field(
        None,
        description="L2-normalise the vectors (cosine = dot product). Default: whether the checkpoint's chain ends "
        "with a Normalize module; true without a sentence-transformers config.",
    )
    dimensions: int | None = Field(
        None,
        gt=0,
        description="Matryoshka: keep the first N dimensions (re-normalised when normalising). Default: the "
        "checkpoint's truncate_dim, else all.",
    )
    precision: Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"] = Field(
        "float32",
        description="Stored vectors, as sentence-transformers' quantize_embeddings: int8/uint8 buckets between "
        "per-dimension ranges fixed before the run; binary/ubinary one sign bit per dimension, 8 per byte.",
    )
    calibration_rows: int = Field(
        1000,
        ge=2,
        description="int8/uint8: input rows embedded first, before the distributed run, to fix the ranges "
        "(recorded in the Parquet metadata).",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dtype" in data:
            raise ValueError("output.embedding.dtype is now output.embedding.precision (float32, float16, int8, ...)")
        return data


class OutputConfig(_Strict):
    path: str = Field(
        description="Output directory, local or s3://: Parquet parts, _rejected/, _manifest.json, _SUCCESS. Must be "
        "new, empty or an earlier output of this pipeline, and must not overlap the input."
    )
    mode: Literal["error", "overwrite"] = Field(
        "error",
        description="When the output already holds a committed run: error = refuse; overwrite = replace exactly the "
        "files its manifest lists, once the new run has committed.",
    )
    cls_embedding: bool = Field(False, description="sequence-classification: also write the final layer's CLS vector.")
    embedding: EmbeddingOutputConfig = Field(default_factory=EmbeddingOutputConfig, description="Embedding task output.")
    sparse_top_k: int | None = Field(
        None,
        gt=0,
        description="sparse-embedding: keep each vector's k largest weights (sentence-transformers' "
        "max_active_dims). Default: the checkpoint's max_active_dims, else every non-zero weight.",
    )
    chunk_text: bool = Field(False, description="input.long_text chunk: also write each chunk's text (`chunk_text`).")
    rows_per_file: int = Field(
        100_000,
        gt=0,
        description="Rows per Parquet part: each write task gathers this many rows before writing "
        "(the last part takes the rest). Smaller values publish parts sooner, hold less in the object store "
        "and leave less to redo after a crash: a rerun keeps every finished part.",
    )


class StorageConfig(_Strict):
    endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, Ceph, R2). Default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL "
        "as seen by the driver (actors get the resolved value), else AWS.",
        json_schema_extra={"documented_default": "$AWS_ENDPOINT_URL"},
    )
    region: str | None = Field(None, description="S3 region. Default: the AWS chain's.")
    anon: bool = Field(False, description="Anonymous access to public buckets.")
    key: SecretStr | None = Field(None, description="Access key id; prefer the AWS credential chain.")
    secret: SecretStr | None = Field(None, description="Secret access key; prefer the AWS credential chain.")


class ExecutionConfig(_Strict):
    stall_timeout_s: float = Field(
        900, gt=0, description="Fail with a diagnosis when no stage makes progress for this long (instead of hanging)."
    )
    max_actor_restarts: int = Field(
        3,
        ge=0,
        description="Restarts of each crashed tokenizer or model actor; the batches it had not finished are retried "
        "on the restarted actor (results are not duplicated). One more crash fails the job.",
    )
    lease_ttl_s: float = Field(
        60,
        gt=0,
        description="A driver holds a lease on its output (jobs.nightly: on its date) and renews it every quarter "
        "of this; a lease not renewed for this long (a killed driver on another host) can be taken over. On the "
        "same host a lease whose process is gone is taken over at once.",
    )


class FaultConfig(_Strict):
    """Fault injection, for tests only: proves restarts, retries and the stall watchdog work."""

    exit_after_calls: int | None = Field(
        None, gt=0, description="A model actor's first incarnation calls os._exit after this many batches."
    )
    delay_s: float = Field(0, ge=0, description="Sleep this long in every model-actor call.")
    oom_above_rows: int | None = Field(
        None, gt=0, description="Raise CUDA OOM for micro-batches of more rows (exercises split-and-retry on CPU)."
    )
    crash_at: Literal["moved", "committed"] | None = Field(
        None,
        description="The driver exits (code 17) at this step of its commit: `moved` (parts at their final names, "
        "manifest not written) or `committed` (manifest written; clean-up and _SUCCESS not).",
    )
    constant_outputs: bool = Field(
        False,
        description="Model actors skip the forward pass and return one constant output for every row and token "
        "(measures the pipeline without its model: jobs.benchmark --dataplane).",
    )


class EvalConfig(_Strict):
    label_column: str | None = Field(
        None, description="Gold label column; adds accuracy and a confusion matrix to the manifest."
    )


class JobConfig(_Strict):
    input: InputConfig
    model: ModelConfig
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    output: OutputConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    _secrets: frozenset[str] = PrivateAttr(default=frozenset())  # see `redact`

    @model_validator(mode="after")
    def _check_task_inputs(self) -> JobConfig:
        """The inputs and evaluation the task declares (``pipeline.tasks.base``)."""
        task = tasks.REGISTRY[self.model.task]
        if task.inputs.pair == "forbidden" and self.input.text_pair_column:
            raise ValueError(f"{task.name} takes a single text; remove input.text_pair_column")
        if task.inputs.pair == "required" and not self.input.text_pair_column:
            raise ValueError(f"{task.name} needs input.text_pair_column: the column holding {task.inputs.pair_role}")
        if self.input.group_column and not task.inputs.group:
            grouped = " or ".join(t.name for t in tasks.REGISTRY.values() if t.inputs.group)
            raise ValueError(f"input.group_column is for model.task: {grouped}")
        if (self.input.prompt is not None or self.input.prompt_name is not None) and not task.inputs.prompt:
            prompted = " or ".join(t.name for t in tasks.REGISTRY.values() if t.inputs.prompt)
            raise ValueError(f"input.prompt and input.prompt_name are for model.task: {prompted}")
        if self.eval.label_column and task.evaluates is None:
            evaluated = " or ".join(t.name for t in tasks.REGISTRY.values() if t.evaluates)
            raise ValueError(f"eval.label_column needs model.task: {evaluated}")
        return self

    def public_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-able data, secrets masked (what manifests and logs show)."""
        return redact(self.model_dump(mode="json"), self.secrets)

    @property
    def secrets(self) -> frozenset[str]:
        """Values never to echo: ``storage.key``/``secret`` and what came from secret-looking variables."""
        fields = (self.storage.key, self.storage.secret)
        return self._secrets | {f.get_secret_value() for f in fields if f is not None}

    def redact(self, value: Any) -> Any:
        """``value`` (a message, or JSON-able data) with every secret masked; see ``redact``."""
        return redact(value, self.secrets)

    def fingerprint(self) -> str:
        """Hash of everything that changes output values: not paths, pool sizes, batching or storage.

        Like ``input.path``, the keys that select a dataset's rows (revision, config, split) are not in it:
        what they resolve to is part of a run's identity (``pipeline.run.Plan.identity``).
        """
        relevant = self.model_dump(
            mode="json",
            include={"input", "model", "output", "eval"},
            exclude={
                "input": {"path", "revision", "config", "split"},
                "model": {"min_fidelity", "fidelity_rows"},
                "output": {"path", "mode", "rows_per_file"},
            },
        )
        if relevant["model"]["backend"] == "torch":  # the default: hashes from before model.backend existed hold
            del relevant["model"]["backend"]
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def config_reference(model: type[BaseModel] = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every config key, sections flattened to dotted keys."""
    rows = []
    for name, field in (model or JobConfig).model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += config_reference(annotation, f"{key}.")
            continue
        documented = (field.json_schema_extra or {}).get("documented_default")
        if field.is_required():
            default = "required"
        else:
            default = documented or json.dumps(field.get_default(call_default_factory=True), default=str)
        rows.append((key, default, field.description or ""))
    return rows


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


# --- secrets -------------------------------------------------------------------------------------------

SECRET_VARIABLE = re.compile(r"SECRET|TOKEN|PASSWORD|_KEY$", re.IGNORECASE)
"""Environment variables whose values ``${...}`` interpolation treats as secrets: ``*SECRET*``,
``*TOKEN*``, ``*PASSWORD*``, ``*_KEY``."""
MASK = "***"
MIN_SECRET_CHARS = 4  # shorter values are not secrets, and masking them would garble every message


def redact(value: Any, secrets: frozenset[str] | set[str]) -> Any:
    """``value`` with every occurrence of each secret replaced by ``***``: a string, or JSON-able data
    (dicts and lists are copied, other values returned as they are)."""
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if not isinstance(value, str):
        return value
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_SECRET_CHARS:
            value = value.replace(secret, MASK)
    return value


def environment_secrets() -> set[str]:
    """Values of this process's secret-looking environment variables (``SECRET_VARIABLE``)."""
    return {value for name, value in os.environ.items() if SECRET_VARIABLE.search(name)}


def secret_keys(model: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """Dotted config keys whose values are secrets (``SecretStr`` fields), e.g. ``storage.secret``."""
    keys = set()
    for name, field in (model or JobConfig).model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= secret_keys(annotation, f"{prefix}{name}.")
        elif SecretStr in getattr(annotation, "__args__", (annotation,)):
            keys.add(f"{prefix}{name}")
    return keys


def redact_override(item: str) -> str:
    """A ``--set key=value`` as it may be shown: the value masked when the key is a secret."""
    key, sep, value = item.partition("=")
    return f"{key}={MASK}" if sep and key in secret_keys() else redact(item, environment_secrets())


# --- loading -------------------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, variables: dict[str, str] | None = None, secrets: set[str] | None = None) -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in strings with ``variables[NAME]``, else ``$NAME``, else the default.

    Values substituted for secret-looking names (``SECRET_VARIABLE``) are added to ``secrets``.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, variables, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables, secrets) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if variables and name in variables:
            found = variables[name]
        elif name in os.environ:
            found = os.environ[name]
        elif default is None:
            raise ConfigError(f"${{{name}}} is used in the config but the environment variable {name} is not set")
        else:
            return default
        if secrets is not None and SECRET_VARIABLE.search(name):
            secrets.add(found)
        return found

    return _ENV.sub(sub, value)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as ``safe_load`` reads it, except that dates stay strings (``--set input.path=2026-01-01``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The config file at ``path`` as a mapping; ``ConfigError`` naming the file (and line) otherwise.

    Messages quote no more than a character of the file, so a literal secret in it is never echoed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        problem = re.sub(r"'(?!<)[^']{4,}'", "'…'", str(getattr(e, "problem", None) or type(e).__name__))
        raise ConfigError(f"config {path}, {_where(e)}: malformed YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} holds a YAML {type(raw).__name__}, not a mapping (input:, model:, ...)")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; values are parsed as YAML scalars (``true``, ``3``, ``[a, b]``).

    Errors name the key, never the value (it may be a secret).
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {f'{key!r} with no =' if key else 'a value with no key'}")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        try:
            node[leaf] = yaml.load(value, Loader=_Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(
                f"--set {key}: the value is not valid YAML (at character {mark.column + 1 if mark else '?'}); "
                "values are read as YAML, so quote a string that starts with [ { ' \" * & ! % @ ` or holds ': ', "
                f"e.g. --set \"{key}='...'\""
            ) from None
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    variables: dict[str, str] | None = None,
    raw: dict[str, Any] | None = None,
) -> JobConfig:
    """Read YAML (or take ``raw``), apply overrides, interpolate ``${VARS}``, validate.

    Values from secret-looking variables are remembered (``JobConfig.secrets``) and masked
    wherever the config, or a message about it, is shown.
    """
    raw = read_yaml(path) if raw is None else raw
    raw = apply_overrides(json.loads(json.dumps(raw, default=str)), list(overrides))
    secrets: set[str] = set()
    try:
        cfg = JobConfig.model_validate(interpolate(raw, variables, secrets))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors(include_url=False)
        )
        raise ConfigError(redact(f"invalid config{f' {path}' if path else ''}: {problems}", secrets)) from None
    cfg._secrets = frozenset(secrets)
    return cfg
