"""The driver takes no heavy work: a 1,000-shard job lists its input once and never stats a shard.

A counting filesystem stands in for the input's (``pipeline.source.open_input``). Not being a
``LocalFileSystem``, it reaches Ray Data through ``FSSpecHandler`` exactly as S3 does, so
Ray Data's calls on the driver are recorded too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

import pipeline.source
from pipeline.config import JobConfig, load_config
from pipeline.run import cluster_resources, plan, run_job, size_pools

SHARDS, ROWS = 1000, 2
RUN_SHARDS = 200
LISTINGS = ("ls", "find", "glob", "walk", "du")
LOOKUPS = ("info", "exists", "isfile", "isdir", "size", "created", "modified", "open")


class CountingFileSystem(DirFileSystem):
    """This machine's files, recording every listing, lookup and open as ``(method, path)``.

    Each method hands the call straight to the wrapped filesystem, so one call is one record.
    Workers unpickle a plain ``LocalFileSystem``: only the driver's calls are recorded.
    """

    cachable = False  # a fresh record per instance, not fsspec's shared one

    def __init__(self) -> None:
        super().__init__(path="/", fs=LocalFileSystem(auto_mkdir=True))
        self.calls: list[tuple[str, str]] = []

    def __reduce__(self) -> tuple[type, tuple]:
        return LocalFileSystem, ()

    def listings(self) -> list[tuple[str, str]]:
        return [call for call in self.calls if call[0] in LISTINGS]

    def calls_on(self, paths: list[str]) -> Counter:
        """How often each method was called on any of ``paths``."""
        wanted = set(paths)
        return Counter(method for method, path in self.calls if path in wanted)


def _recorded(name: str) -> Callable:
    def method(self: CountingFileSystem, path: str, *args: object, **kwargs: object) -> object:
        self.calls.append((name, path))
        return getattr(DirFileSystem, name)(self, path, *args, **kwargs)

    method.__name__ = name
    return method


for _name in LISTINGS + LOOKUPS:
    setattr(CountingFileSystem, _name, _recorded(_name))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 Parquet shards of ``ROWS`` rows each."""
    root = tmp_path_factory.mktemp("many-shards")
    for shard in range(SHARDS):
        ids = [f"doc-{shard}-{row}" for row in range(ROWS)]
        table = pa.table({"doc_id": ids, "text": ["the match"] * ROWS})
        pq.write_table(table, root / f"part-{shard:04d}.parquet")
    return root


@pytest.fixture
def fs(monkeypatch: pytest.MonkeyPatch) -> CountingFileSystem:
    """The filesystem the plan reads the input through (``pipeline.source.open_input``) during the test."""
    counting = CountingFileSystem()
    real = pipeline.source.filesystem
    monkeypatch.setattr(pipeline.source, "filesystem", lambda path, storage=None: (counting, real(path, storage)[1]))
    return counting


def config(shards: Path, model_dir: Path, out: Path) -> JobConfig:
    return load_config(
        raw={
            "input": {"path": str(shards), "id_columns": ["doc_id"]},
            "model": {"path": str(model_dir), "task": "sequence-classification"},
            "output": {"path": str(out)},
        }
    )


def test_plan_lists_the_input_once_and_stats_no_shard(
    shards: Path, tiny_models: dict[str, Path], tmp_path: Path, fs: CountingFileSystem
) -> None:
    job = plan(config(shards, tiny_models["sequence-classification"], tmp_path / "out"), cpus=2.0, gpus=0.0)

    assert len(job.shards.files) == SHARDS
    assert fs.listings() == [("find", str(shards))]
    # Each shard is opened once, for the schema check of its footer, and never listed or stat'ed.
    assert fs.calls_on(job.shards.files) == {"open": SHARDS}


def test_a_run_lists_nothing_again_on_the_driver_and_keeps_every_row(
    ray_session: ModuleType, shards: Path, tiny_models: dict[str, Path], tmp_path: Path, fs: CountingFileSystem
) -> None:
    cfg = config(shards, tiny_models["sequence-classification"], tmp_path / "out")
    files = sorted(str(path) for path in shards.glob("*.parquet"))
    job = plan(cfg, cpus=64.0, gpus=0.0)  # as a nightly run plans before it picks shards; sized for a bigger machine
    manifest = run_job(cfg, files=files[:RUN_SHARDS], job=job)

    # Still the plan's one listing and one footer read per shard: the run did not plan again,
    # Ray Data took the listing instead of making its own, and shards were read on workers only.
    assert fs.listings() == [("find", str(shards))]
    assert fs.calls_on(files) == {"open": SHARDS}
    # The plan's pools were sized again for the cluster the run found (64 CPUs would never schedule).
    assert manifest["pools"] == size_pools(cfg, *cluster_resources()).describe() != job.pools.describe()
    assert manifest["input_files"] == RUN_SHARDS
    assert manifest["rows_in"] == manifest["rows_out"] == RUN_SHARDS * ROWS
    assert manifest["rows_rejected"] == 0
    ids = pq.read_table(tmp_path / "out", columns=["doc_id"])["doc_id"].to_pylist()
    assert sorted(ids) == sorted(f"doc-{shard}-{row}" for shard in range(RUN_SHARDS) for row in range(ROWS))
