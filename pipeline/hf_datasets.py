"""Hugging Face datasets as input: a Hub dataset repo or a ``save_to_disk`` directory, resolved to shards.

A dataset input resolves once, on the driver, like a checkpoint (``pipeline.checkpoint``), to ordinary
:class:`~pipeline.source.Shards`: the dataset's own data files, which the source stage streams record
batch by record batch like any Parquet, JSONL or Arrow shard (nothing is loaded whole; neither
``datasets.load_dataset`` nor ``ray.data.from_huggingface`` is involved), plus a :class:`DatasetRef`
saying what it resolved to. ``--dry-run`` prints it, every output records it in its metadata, it is
part of a run's identity (a killed run is resumed only at the same revision), and its revision is part
of a nightly version's name (a new revision is new input, never mixed with the old).

**Hub datasets**, ``input.path: hf://datasets/<org>/<name>[/<path in the repo>]``:

* ``input.revision`` (a branch, tag or commit; default ``main``) is resolved to one commit sha, and every
  file is read at that commit.
* Online, the sha comes from the Hub API, and the read tasks read the files through ``huggingface_hub``'s
  ``HfFileSystem`` in range requests (a Parquet footer, then the projected columns), on whichever node
  they run, with that node's token from the standard chain (``HF_TOKEN``, ``hf auth login``). This
  module never handles the token, so it is neither shown nor written.
* With ``HF_HUB_OFFLINE=1`` everything comes from the Hub cache (``$HF_HUB_CACHE``), exactly as for
  checkpoints: ``refs/<revision>`` names the commit, ``snapshots/<sha>/`` holds the files, and
  ``snapshot_download(local_files_only=True)`` refuses a snapshot that its cached file listing shows
  incomplete. The read tasks read the cache path the driver resolved, so on a cluster every node needs
  the cache there (or a shared one), as for checkpoints.
* Which files: a config and split as the ``datasets`` library defines them, with its own pattern
  resolver: the README's YAML ``configs`` (``data_files`` per split, or a ``data_dir``), else the
  standard split file names (``data/train-00000-of-00002.parquet``, ``train/``, ...) of one ``default``
  config. On the ``refs/convert/parquet`` branch (by that name, or its commit), the Hub's Parquet
  conversion: ``<config>/<split>/*.parquet`` (``<config>/partial-<split>/`` for a partial conversion).
  Without ``input.config`` the default config (the one marked ``default``, or the only one) is read;
  without ``input.split``, the only split. Anything else is refused, naming what exists. With a path in
  the repo, the files under it are read like a directory input, and config and split do not apply.
* Generated ids are ``<file relative to the repo root>:<row>`` (with a path in the repo too): the same on every
  machine and in every run, online or offline.

**save_to_disk directories** (local or ``s3://``): ``state.json`` lists the Arrow files of a ``Dataset``,
in the IPC stream format; a ``DatasetDict`` (``dataset_dict.json``) holds one such directory per split,
chosen by ``input.split``. Their revision is the dataset's fingerprint (``state.json``), which
``datasets`` renews whenever the dataset is rebuilt. Generated ids are relative to the directory named.
"""

from __future__ import annotations

import glob
import importlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import fsspec
import yaml
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import InputConfig
from pipeline.source import InputError, Shards, discover, infer_format, shards_of
from pipeline.storage import join

HUB_PREFIX = "hf://datasets/"
CONVERT_BRANCH = "refs/convert/parquet"
CARD = "README.md"
STATE, INFO, DICT = "state.json", "dataset_info.json", "dataset_dict.json"


@dataclass(frozen=True)
class DatasetRef:
    """What a dataset input resolved to (``to_json`` is what outputs record)."""

    kind: str  # "hub" or "save_to_disk"
    name: str  # the Hub repo id (org/name), or the directory as configured
    revision: str  # the Hub commit sha; a save_to_disk dataset's fingerprint
    config: str | None = None
    split: str | None = None
    requested: str | None = None  # Hub: input.revision as configured (default main)
    layout: str | None = None  # Hub: how the files were chosen

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def describe(self) -> str:
        if self.kind == "save_to_disk":
            split = f", split {self.split}" if self.split else ""
            return f"save_to_disk dataset {self.name}{split}, fingerprint {self.revision}"
        pinned = "" if self.requested == self.revision else f" ({self.requested})"
        selected = f", config {self.config}, split {self.split}" if self.split else ""
        return f"Hub dataset {self.name} @ {self.revision}{pinned}{selected} [{self.layout}]"


# ---- Hub datasets --------------------------------------------------------------------------------------


def is_hub(path: str) -> bool:
    return path.startswith("hf://")


def parse_hub_path(path: str) -> tuple[str, str]:
    """``(repo id, path in the repo)`` of ``hf://datasets/<org>/<name>[/<path in the repo>]``."""
    if not path.startswith(HUB_PREFIX):
        raise InputError(f"input.path {path}: hf:// reads Hub datasets only, as hf://datasets/<org>/<name>[/<path>]")
    parts = path[len(HUB_PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise InputError(f"input.path {path}: name the dataset with its organisation, hf://datasets/<org>/<name>")
    if "@" in parts[1]:
        raise InputError(f"input.path {path}: give the revision as input.revision, not with @ in the path")
    return "/".join(parts[:2]), "/".join(parts[2:])


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set, as ``huggingface_hub`` read it."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


@dataclass(frozen=True)
class Snapshot:
    """One commit of a Hub dataset repo, where this process reads it: the Hub cache or ``HfFileSystem``."""

    repo_id: str
    commit: str
    fs: fsspec.AbstractFileSystem
    root: str  # the commit's root in ``fs``: <cache>/snapshots/<sha>, or datasets/<org>/<name>@<sha>
    card: dict  # the README's YAML metadata
    convert: bool  # the commit is the refs/convert/parquet branch's

    @property
    def url(self) -> str:
        """The root as ``datasets``' resolver takes it: a local path or an ``hf://`` URL."""
        return self.root if isinstance(self.fs, LocalFileSystem) else f"hf://{self.root}"

    def path(self, url: str) -> str:
        """The path in ``fs`` of a file ``datasets``' resolver returned."""
        return url.removeprefix("hf://")


def hub_shards(cfg: InputConfig, passthrough: list[str]) -> Shards:
    """The shards of a Hub dataset: its config and split at one commit (see the module docstring)."""
    repo_id, inside = parse_hub_path(cfg.path)
    requested, cached = cfg.revision or "main", offline()
    snapshot = cached_snapshot(repo_id, requested) if cached else hub_snapshot(repo_id, requested)
    ref = DatasetRef("hub", repo_id, snapshot.commit, requested=requested)
    if inside:
        if cfg.config is not None or cfg.split is not None:
            raise InputError(
                f"input.path {cfg.path} names files inside the repo, so input.config and input.split do not apply: "
                "remove them, or drop the path to read a config and split"
            )
        if cached:
            _check_cached(snapshot, [inside, f"{inside}/*"])
        try:
            shards = discover(cfg, snapshot.fs, f"{snapshot.root}/{inside}", passthrough)
        except InputError as e:
            raise InputError(f"{e} (at commit {snapshot.commit}{_in_cache(snapshot)})") from None
        # Ids and skipped files are named from the repo root, whatever part of it the path selects.
        prefix = shards.root[len(snapshot.root) :].strip("/")
        skipped = tuple(posixpath.join(prefix, name) for name in shards.skipped)
        return replace(shards, root=snapshot.root, skipped=skipped, dataset=replace(ref, layout="path in the repo"))

    layout, configs = _configs(snapshot)
    config = _choose("config", cfg.config, configs, cfg.path, default=_default_config(snapshot, configs))
    data_dir, patterns = _split_patterns(snapshot, config, cfg.path)
    split = _choose("split", cfg.split, list(patterns), f"{cfg.path} config {config}")
    where = f"{cfg.path} (config {config}, split {split} at commit {snapshot.commit})"
    files = _resolve(patterns[split], join(snapshot.url, data_dir) if data_dir else snapshot.url, where, snapshot)
    if cached:
        _check_cached(snapshot, [posixpath.join(data_dir, p) for p in patterns[split]])
    if not any(infer_format(f) for f in files):
        kinds = sorted({posixpath.basename(f).partition(".")[2] or posixpath.basename(f) for f in files})
        raise InputError(
            f"{where} holds {len(files)} file(s) of kind {kinds}, none of them Parquet, JSONL or Arrow: read the "
            f"Hub's Parquet conversion of the dataset instead, with input.revision: {CONVERT_BRANCH}"
        )
    with ThreadPoolExecutor(16) as pool:
        sizes = dict(zip(files, pool.map(lambda f: snapshot.fs.info(f)["size"], files)))
    ref = replace(ref, config=config, split=split, layout=layout)
    return shards_of(cfg, snapshot.fs, snapshot.root, sizes, passthrough, where=where, dataset=ref)


def cached_snapshot(repo_id: str, revision: str) -> Snapshot:
    """``revision`` of ``repo_id`` from the Hub cache (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, repo_type="dataset", revision=revision, allow_patterns=[CARD], local_files_only=True
        )
    except IncompleteSnapshotError as e:
        raise InputError(f"hf://datasets/{repo_id} (revision {revision}): {_first_line(e)}") from None
    except LocalEntryNotFoundError:
        raise InputError(
            f"hf://datasets/{repo_id}: revision {revision} is not in the Hub cache ({_cache_holds(repo_id)}), and "
            f"HF_HUB_OFFLINE=1 forbids downloading it. Download it first (hf download {repo_id} "
            f"--repo-type dataset --revision {revision}), pin a cached revision, or unset HF_HUB_OFFLINE"
        ) from None
    folder = Path(folder)
    commit = folder.name
    convert_ref = _storage(repo_id) / "refs" / CONVERT_BRANCH
    convert = revision == CONVERT_BRANCH or (convert_ref.is_file() and convert_ref.read_text().strip() == commit)
    card = _read_card(folder / CARD, repo_id) if (folder / CARD).is_file() else {}
    return Snapshot(repo_id, commit, LocalFileSystem(), str(folder), card, convert)


def hub_snapshot(repo_id: str, revision: str) -> Snapshot:
    """``revision`` of ``repo_id`` on the Hub, read through ``HfFileSystem`` (online)."""
    from huggingface_hub import HfApi, HfFileSystem, constants, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    try:
        info = api.dataset_info(repo_id, revision=revision)
        converts = api.list_repo_refs(repo_id, repo_type="dataset").converts
        has_card = any(sibling.rfilename == CARD for sibling in info.siblings or [])
        card = _read_card(hf_hub_download(repo_id, CARD, repo_type="dataset", revision=info.sha), repo_id) if has_card else {}
    except GatedRepoError:
        raise InputError(
            f"hf://datasets/{repo_id} is gated: accept its conditions on the Hub, and give this machine a token "
            "(HF_TOKEN, or hf auth login) of an account that did"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"hf://datasets/{repo_id} has no revision {revision!r}: check input.revision") from None
    except RepositoryNotFoundError:
        raise InputError(
            f"hf://datasets/{repo_id} does not exist on the Hub, or is private and this machine's token (HF_TOKEN, or "
            "hf auth login) cannot read it: check input.path and the token"
        ) from None
    except (OSError, *_network_errors()) as e:
        raise InputError(
            f"cannot reach the Hub ({constants.ENDPOINT}) for hf://datasets/{repo_id}: {_first_line(e)}. Check the "
            f"network, or set HF_HUB_OFFLINE=1 to read the dataset from the Hub cache ({_cache_holds(repo_id)})"
        ) from None
    convert = revision == CONVERT_BRANCH or any(ref.target_commit == info.sha for ref in converts)
    return Snapshot(repo_id, info.sha, HfFileSystem(), f"datasets/{repo_id}@{info.sha}", card, convert)


def _configs(snapshot: Snapshot) -> tuple[str, list[str]]:
    """(how the configs are defined, their names in the dataset's order)."""
    if snapshot.convert:
        names = [posixpath.basename(p) for p in snapshot.fs.ls(snapshot.root, detail=False) if snapshot.fs.isdir(p)]
        return "Parquet conversion", sorted(n for n in names if not n.startswith("."))
    configs = _metadata_configs(snapshot)
    if configs:
        return "README configs", list(configs)
    return "standard split file names", ["default"]


def _metadata_configs(snapshot: Snapshot):
    """The README's YAML ``configs``, parsed by ``datasets``."""
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    try:
        return MetadataConfigs.from_dataset_card_data(DatasetCardData(**snapshot.card))
    except (ValueError, TypeError) as e:
        raise InputError(f"hf://datasets/{snapshot.repo_id}: the configs in its {CARD} are invalid: {_first_line(e)}") from None


def _default_config(snapshot: Snapshot, names: list[str]) -> str | None:
    """The config read without ``input.config``: the only one, else ``default``, else the one marked default."""
    if len(names) == 1:
        return names[0]
    if snapshot.convert or not snapshot.card:
        return "default" if "default" in names else None
    try:
        return _metadata_configs(snapshot).get_default_config_name()
    except ValueError:  # several marked default
        return None


def _choose(kind: str, wanted: str | None, names: list[str], where: str, default: str | None = None) -> str:
    """``wanted`` if it exists, else the default (or the only name); ``InputError`` naming them otherwise."""
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"{where} has no {kind} {wanted!r}; its {kind}s are {names}: fix input.{kind}")
        return wanted
    if default is None and len(names) == 1:
        default = names[0]
    if default is None:
        raise InputError(f"{where} has {len(names)} {kind}s, {names}, and no default: choose one with input.{kind}")
    return default


def _split_patterns(snapshot: Snapshot, config: str, where: str) -> tuple[str, dict[str, list[str]]]:
    """(the config's data_dir in the repo, "" for none; split -> file patterns relative to it), in the
    dataset's split order."""
    from datasets.data_files import EmptyDatasetError, get_data_patterns, sanitize_patterns

    if snapshot.convert:
        directories = snapshot.fs.ls(f"{snapshot.root}/{config}", detail=False)
        splits = sorted(posixpath.basename(d) for d in directories if snapshot.fs.isdir(d))
        return "", {s.removeprefix("partial-"): [f"{config}/{s}/*.parquet"] for s in splits}
    settings = _metadata_configs(snapshot).get(config, {}) if snapshot.card else {}
    data_dir = (settings.get("data_dir") or "").strip("/")
    if ".." in data_dir.split("/"):
        raise InputError(f"{where}: the data_dir of config {config} in its {CARD} leaves the repo ({data_dir!r})")
    try:
        if settings.get("data_files") is not None:
            return data_dir, sanitize_patterns(settings["data_files"])
        return data_dir, get_data_patterns(join(snapshot.url, data_dir) if data_dir else snapshot.url)
    except EmptyDatasetError:
        raise InputError(f"{where} config {config} holds no data files{_in_cache(snapshot)}") from None
    except ValueError as e:
        raise InputError(f"{where}: the data_files of config {config} in its {CARD} are invalid: {_first_line(e)}") from None


def _resolve(patterns: list[str], base: str, where: str, snapshot: Snapshot) -> list[str]:
    """The files (paths in the snapshot's filesystem) ``patterns`` match, by ``datasets``' resolver."""
    from datasets.data_files import resolve_pattern

    files: dict[str, None] = {}
    for pattern in patterns:
        try:
            files.update(dict.fromkeys(resolve_pattern(pattern, base_path=base)))
        except FileNotFoundError:
            if not glob.has_magic(pattern):  # as in datasets: a wildcard may match nothing, a named file must exist
                raise InputError(f"{where}: its data file {pattern!r} does not exist{_in_cache(snapshot)}") from None
    if not files:
        raise InputError(f"{where}: no file matches its data_files patterns {patterns}{_in_cache(snapshot)}")
    return [snapshot.path(f) for f in files]


def _check_cached(snapshot: Snapshot, patterns: list[str]) -> None:
    """Refuse a cached snapshot whose cached file listing names files matching ``patterns`` that were never
    downloaded (an interrupted or partial download), as ``snapshot_download`` does for checkpoints."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    try:
        snapshot_download(
            snapshot.repo_id, repo_type="dataset", revision=snapshot.commit, allow_patterns=patterns, local_files_only=True
        )
    except IncompleteSnapshotError as e:
        raise InputError(f"hf://datasets/{snapshot.repo_id} at commit {snapshot.commit}: {_first_line(e)}") from None


def _in_cache(snapshot: Snapshot) -> str:
    if isinstance(snapshot.fs, LocalFileSystem):
        return f" in its cached snapshot {snapshot.root} (HF_HUB_OFFLINE=1 reads only the files downloaded)"
    return ""


def _storage(repo_id: str) -> Path:
    """The dataset's folder in the Hub cache."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset")


def _cache_holds(repo_id: str) -> str:
    """Where the Hub cache is and which commits of the dataset it holds, each with its refs: ``<sha> (main)``."""
    from huggingface_hub import constants

    storage = _storage(repo_id)
    if not (storage / "snapshots").is_dir():
        return f"{constants.HF_HUB_CACHE}; it holds no revision of this dataset"
    refs: dict[str, list[str]] = {}
    for ref in sorted(p for p in (storage / "refs").rglob("*") if p.is_file()):
        refs.setdefault(ref.read_text().strip(), []).append(ref.relative_to(storage / "refs").as_posix())
    commits = sorted(p.name for p in (storage / "snapshots").iterdir() if p.is_dir())
    return f"{constants.HF_HUB_CACHE}; it holds " + ", ".join(f"{c} ({', '.join(refs[c])})" if c in refs else c for c in commits)


def _network_errors() -> tuple[type[Exception], ...]:
    """The transport errors of the HTTP client ``huggingface_hub`` uses: ``httpx2`` or ``httpx`` (releases
    built on ``requests`` raise ``OSError`` subclasses)."""
    errors = []
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).HTTPError)
        except ImportError:
            pass
    return tuple(errors)


def _read_card(path: str | Path, repo_id: str) -> dict:
    """The YAML metadata of a dataset card."""
    from huggingface_hub import metadata_load

    try:
        return metadata_load(path) or {}
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"hf://datasets/{repo_id}: the metadata of its {CARD} does not parse: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n", 1)[0].split()) or type(e).__name__


# ---- save_to_disk directories --------------------------------------------------------------------------


def is_saved(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return fs.isfile(join(path, STATE)) or fs.isfile(join(path, DICT))


def saved_shards(cfg: InputConfig, fs: fsspec.AbstractFileSystem, path: str, passthrough: list[str]) -> Shards:
    """The Arrow files of a ``save_to_disk`` directory (of ``input.split`` for a ``DatasetDict``), as listed by
    its ``state.json``; other files in it are skipped and listed, ``_`` and ``.`` names ignored."""
    root = path.rstrip("/")
    directory, split = root, cfg.split
    if fs.isfile(join(root, DICT)):
        splits = [str(s) for s in _read_json(fs, join(root, DICT), cfg.path).get("splits", [])]
        split = _choose("split", cfg.split, splits, f"save_to_disk DatasetDict {cfg.path}")
        directory = join(root, split)
    state = _read_json(fs, join(directory, STATE), cfg.path)
    if fs.isfile(join(root, STATE)) and cfg.split is not None and cfg.split != state.get("_split"):
        named = f" (of split {state['_split']})" if state.get("_split") else ""
        raise InputError(f"{cfg.path} is a save_to_disk Dataset{named}, not a DatasetDict of splits: remove input.split")
    try:
        files = [join(directory, entry["filename"]) for entry in state["_data_files"]]
    except (KeyError, TypeError):
        raise InputError(f"{join(directory, STATE)} lists no _data_files: is it a save_to_disk directory?") from None
    listing = {name: info for name, info in fs.find(directory, detail=True).items() if info["type"] == "file"}
    missing = [posixpath.relpath(f, root) for f in files if f not in listing]
    if missing:
        raise InputError(
            f"{cfg.path}: {STATE} lists {missing[:5]}, which {'is' if len(missing) == 1 else 'are'} missing: the "
            "save_to_disk directory is incomplete; save the dataset again"
        )
    own = {*files, join(directory, STATE), join(directory, INFO)}
    skipped = sorted(
        posixpath.relpath(name, root)
        for name in listing
        if name not in own and not any(p[:1] in "_." for p in posixpath.relpath(name, root).split("/"))
    )
    ref = DatasetRef("save_to_disk", cfg.path, str(state.get("_fingerprint")), split=split)
    sizes = {f: listing[f]["size"] for f in files}
    shards = shards_of(cfg, fs, root, sizes, passthrough, where=f"input.path {cfg.path}", forced="arrow", dataset=ref)
    return replace(shards, skipped=tuple(skipped))


def _read_json(fs: fsspec.AbstractFileSystem, path: str, where: str) -> dict:
    try:
        value = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise InputError(f"{where}: {path} is missing: is it a save_to_disk directory?") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: {path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{where}: {path} holds a JSON {type(value).__name__}, not an object")
    return value
