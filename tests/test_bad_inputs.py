"""Every case of the bad-input corpus (``tests/bad_inputs``), through ``--dry-run`` and a real run.

Each case asserts its documented outcome: the exit code and what the command says, the rows it quarantined
and why, ``rows_in == rows_out + rows_rejected`` (for the run, and for the case's own rows within it), no
traceback, and no planted secret in stdout, stderr, the output files (manifest, Parquet metadata,
``_rejected/``) or the Ray session's logs. Grouped cases share a real run (see ``bad_inputs``): it runs as
``python -m jobs.run`` in its own process, on the tests' Ray cluster, as a scheduler would run it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from bad_inputs import BIG_GZIP_LINES, CASES, GROUPS, SECRET, STORAGE_KEY, STORAGE_SECRET, Case

from jobs.run import main
from pipeline import schema as S
from pipeline.commit import Receipt, Writer, committed_output
from pipeline.config import load_config
from pipeline.run import plan
from pipeline.source import ShardDatasource, coerce, discover, scan_input
from pipeline.storage import filesystem, relative_to

REPO = Path(__file__).resolve().parents[1]
SECRETS = (SECRET, STORAGE_SECRET, STORAGE_KEY)
SECRET_SETTINGS = {"AWS_SECRET_ACCESS_KEY": SECRET, "STORAGE_SECRET": STORAGE_SECRET, "STORAGE_KEY": STORAGE_KEY}


@dataclass(frozen=True)
class Corpus:
    root: Path
    out: Path  # outputs: <out>/<group or case>-<SECRET>/

    def case_dir(self, case: Case) -> Path:
        return self.root / (case.group or "alone") / case.name

    def input_dir(self, case: Case) -> Path:
        return self.case_dir(case) if case.group else self.case_dir(case) / "in"

    def config(self, case: Case) -> str:
        if case.group:
            return str(self.root / f"{case.group}.yaml")
        return case.config_path.format(dir=self.case_dir(case))


def base_config(model: Path, input_path: Path, output_path: str) -> dict:
    """The config every case starts from: the tiny classifier, secrets only through the environment."""
    return {
        "input": {"path": str(input_path)},
        "model": {"path": str(model), "task": "sequence-classification"},
        "output": {"path": output_path},
        "storage": {"key": "${STORAGE_KEY}", "secret": "${STORAGE_SECRET}"},
        "tokenize": {"batch_size": 64},
        "inference": {"batch_size": 64},
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_models) -> Corpus:
    """The corpus on disk: one directory per case, one per group (its cases' directories), and their configs."""
    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = Corpus(root, root / "out")
    tiny = tiny_models["sequence-classification"]
    for case in CASES:
        directory = corpus.case_dir(case)
        for name, data in case.files(case.name).items():
            (corpus.input_dir(case) / name).parent.mkdir(parents=True, exist_ok=True)
            (corpus.input_dir(case) / name).write_bytes(data)
        corpus.input_dir(case).mkdir(parents=True, exist_ok=True)
        if case.checkpoint:
            case.checkpoint(tiny, directory / "model")
        if case.group:
            continue
        output = f"{corpus.out}/{case.name}-${{AWS_SECRET_ACCESS_KEY}}"
        config = case.config or yaml.safe_dump(base_config(tiny, corpus.input_dir(case), output)).encode()
        (directory / "job.yaml").write_bytes(config)
    for group in GROUPS:
        output = f"{corpus.out}/{group}-${{AWS_SECRET_ACCESS_KEY}}"
        (root / f"{group}.yaml").write_text(yaml.safe_dump(base_config(tiny, root / group, output)))
    return corpus


def arguments(corpus: Corpus, case: Case) -> list[str]:
    overrides = [*GROUPS.get(case.group, ()), *(o.replace("{dir}", str(corpus.case_dir(case))) for o in case.overrides)]
    if case.group:  # the case alone, into an output of its own
        output = f"{corpus.out}/{case.name}-${{AWS_SECRET_ACCESS_KEY}}"
        overrides += [f"input.path={corpus.input_dir(case)}", f"output.path={output}"]
    return ["--config", corpus.config(case), *(a for o in overrides for a in ("--set", o))]


def assert_clean(printed: str) -> None:
    assert "Traceback" not in printed, printed[-3000:]
    for secret in SECRETS:
        assert secret not in printed, printed[-3000:]


@dataclass(frozen=True)
class GroupRun:
    """A group's real run: ``python -m jobs.run`` over every case of the group, in its own process."""

    code: int
    printed: str
    manifest: dict
    output: list[dict]
    rejected: list[dict]
    leaks: list[str]  # files (outputs, Ray logs) holding a secret


def session_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def files_with_secrets(*roots: Path) -> list[str]:
    leaks = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and any(s.encode() in path.read_bytes() for s in SECRETS):
                leaks.append(str(path))
    return leaks


@pytest.fixture(scope="module")
def group_runs(corpus, ray_session):
    """Each group's run, made when a case of the group first asks for it."""
    runs: dict[str, GroupRun] = {}

    def run(group: str) -> GroupRun:
        if group not in runs:
            env = {**os.environ, **SECRET_SETTINGS, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
            env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
            command = [sys.executable, "-m", "jobs.run", "--config", str(corpus.root / f"{group}.yaml")]
            command += [a for o in GROUPS[group] for a in ("--set", o)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
            output = corpus.out / f"{group}-{SECRET}"  # the secret was in play: ${AWS_SECRET_ACCESS_KEY} made this path
            assert output.is_dir() and any(session_logs().rglob("*.log")), done.stdout + done.stderr
            manifest = json.loads((output / S.MANIFEST).read_text()) if (output / S.MANIFEST).exists() else {}
            parts = sorted(output.glob("part-*.parquet"))
            runs[group] = GroupRun(
                done.returncode,
                done.stdout + done.stderr,
                manifest,
                [row for part in parts for row in pq.read_table(part).to_pylist()],
                pq.read_table(output / S.REJECTED_DIR).to_pylist() if (output / S.REJECTED_DIR).exists() else [],
                files_with_secrets(output, session_logs()),
            )
        return runs[group]

    return run


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input(case: Case, corpus: Corpus, group_runs, ray_session, monkeypatch, capsys) -> None:
    for name, value in SECRET_SETTINGS.items():
        monkeypatch.setenv(name, value)

    code = main([*arguments(corpus, case), "--dry-run"])
    printed = "".join(capsys.readouterr())
    assert (code, case.dry_run.says in printed) == (case.dry_run.code, True), printed
    assert_clean(printed)

    if case.group is None:  # refused before any actor starts: the real run says the same
        code = main(arguments(corpus, case))
        printed = "".join(capsys.readouterr())
        assert (code, case.run.says in printed) == (case.run.code, True), printed
        assert_clean(printed)
        assert not list(corpus.out.glob(f"{case.name}-*/{S.SUCCESS}"))
        return

    run = group_runs(case.group)
    assert (run.code, case.run.says in run.printed) == (case.run.code, True), run.printed[-3000:]
    assert_clean(run.printed)
    assert run.leaks == []
    manifest = run.manifest
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["partial"] == (case.run.code == 3)

    # This case's rows: scored, rejected with the expected reasons, or in a shard quarantined whole.
    mine = f"{case.name}/"
    rejected = [r for r in run.rejected if r["source_file"].startswith(mine)]
    rows_rejected = [r for r in rejected if r["reason"] != "unreadable_shard"]
    assert Counter(r["reason"] for r in rows_rejected) == Counter(case.rejected), rows_rejected
    if "case" in (run.output[0] if run.output else {}):
        scored = [r for r in run.output if r["case"] == case.name]
    else:
        scored = [r for r in run.output if r[S.GENERATED_ID].startswith(mine)]
    assert len(scored) + len(rows_rejected) == case.rows

    unreadable = {u["file"].removeprefix(mine): u for u in manifest["shards_unreadable"] if u["file"].startswith(mine)}
    assert sorted(unreadable) == sorted(case.quarantined)
    records = {r["source_file"].removeprefix(mine): r for r in rejected if r["reason"] == "unreadable_shard"}
    assert sorted(records) == sorted(case.quarantined)  # one record per shard, naming it
    for name, counted in case.quarantined.items():
        entry = unreadable[name]
        assert records[name]["source_row"] is None and entry["error"] in records[name]["detail"]
        if counted is None:  # a JSONL stream that broke off: the lines read before the error
            assert entry["rows"] is None and 0 < entry["rows_counted"] <= BIG_GZIP_LINES
        else:
            assert entry["rows_counted"] == counted
            assert entry["rows"] == (counted or None)  # Parquet: the footer's count; none without a footer


# ---- the parts the corpus exercises only in part ------------------------------------------------------------


@pytest.mark.parametrize(
    "declared, value, expected",
    [
        (pa.string(), "a", ("a", None)),
        (pa.string(), 7, ("7", None)),  # ints are written in decimal: lossless
        (pa.string(), 2**70, (str(2**70), None)),
        (pa.string(), 1.5, (None, "number 1.5 where the column holds string")),
        (pa.string(), True, (None, "boolean true where the column holds string")),
        (pa.int64(), 7, (7, None)),
        (pa.int64(), "7", (None, 'string "7" where the column holds int64')),  # "007" would lose its zeros
        (pa.int64(), 7.0, (None, "number 7.0 where the column holds int64")),
        (pa.int64(), False, (None, "boolean false where the column holds int64")),
        (pa.int64(), 2**63, (None, f"{2**63} does not fit in int64")),
        (pa.int32(), -(2**31), (-(2**31), None)),
        (pa.float64(), 3, (3.0, None)),
        (pa.float64(), 2**53 + 1, (None, f"integer {2**53 + 1} where the column holds double")),
        (pa.bool_(), True, (True, None)),
        (pa.bool_(), 1, (None, "integer 1 where the column holds bool")),
        (pa.timestamp("s"), "anything", ("anything", None)),  # Parquet types are the footer's: no conversion
    ],
)
def test_ids_convert_to_their_declared_type_only_losslessly(declared, value, expected):
    assert coerce(value, declared) == expected


def test_passthrough_values_that_do_not_convert_are_rejected_with_a_reason(ray_session, tmp_path):
    """Ids and gold labels of another type than their column's (declared by the first shard) are rejected."""
    (tmp_path / "a.jsonl").write_text("")
    cfg = load_config(raw={
        "input": {"path": str(tmp_path), "id_columns": ["doc_id"]},
        "model": {"path": "m", "task": "sequence-classification"},
        "output": {"path": "o"},
        "eval": {"label_column": "topic"},
    }).input
    fs, root = filesystem(cfg.path)
    shards = discover(cfg, fs, root, ["doc_id", "topic"])
    source = ShardDatasource(shards, cfg, None, pa.schema([("doc_id", pa.string()), ("topic", pa.int64())]), {})
    rows = [
        (1, {"doc_id": "a", "topic": 3, "text": "the cup"}, None),
        (2, {"doc_id": 5, "topic": "sport", "text": "the cup"}, None),
        (3, {"doc_id": None, "topic": 3, "text": "the cup"}, None),
        (4, {"doc_id": "\udcff", "topic": None, "text": "the cup"}, None),
    ]
    block = source._block("a.jsonl", rows).to_pylist()
    assert [(r["doc_id"], r["topic"], r[S.ERROR]) for r in block] == [
        ("a", 3, None),
        ("5", None, "bad_label"),
        (None, 3, "missing_id"),
        (None, None, "invalid_utf8"),
    ]


def test_a_shard_replaced_during_the_run_fails_it_in_one_line(ray_session, tiny_models, tmp_path, monkeypatch, capfd):
    """Every shard is read whole before the run; one that no longer reads afterwards ends the run, unpublished."""
    import pipeline.run

    shards = tmp_path / "in"
    shards.mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"text": [f"the match {i}" for i in range(20)]}), shards / f"{name}.parquet")

    def scan_then_replace(*args, **kwargs):
        scanned = scan_input(*args, **kwargs)
        (shards / "b.parquet").write_bytes(b"PAR1 replaced by something else")
        return scanned

    monkeypatch.setattr(pipeline.run, "scan_input", scan_then_replace)
    for name, value in SECRET_SETTINGS.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_models["embedding"], shards, str(tmp_path / "out"))))
    assert main(["--config", str(config), "--set", "model.task=embedding"]) == 2
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err
    [line] = [l for l in printed.err.splitlines() if l.startswith("error:")]
    assert line.startswith("error: input shard b.parquet became unreadable during the run (ArrowInvalid:"), line
    assert not (tmp_path / "out" / S.SUCCESS).exists()


def test_relative_paths_are_textual():
    assert relative_to("bucket/in/a/b.jsonl", "bucket/in") == "a/b.jsonl"
    assert relative_to("bucket/in/a.jsonl", "bucket/in/") == "a.jsonl"
    assert relative_to("bucket/a.jsonl", "") == "a.jsonl"
    assert relative_to("/data/x.parquet", "/data") == "x.parquet"
    with pytest.raises(ValueError, match="is not under"):
        relative_to("bucket/other/a.jsonl", "bucket/in")


def test_object_store_paths_do_not_depend_on_the_working_directory(tiny_models, s3_server, s3_bucket, tmp_path, monkeypatch):
    """A process whose working directory was deleted (as when Ray re-extracts a job's working_dir) still
    lists, names and commits object-store shards: their paths are handled as text, never via os.getcwd."""
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url})
    for name in ("a.jsonl", "sub/b.jsonl"):
        fs.pipe_file(f"{s3_bucket}/in/{name}", b'{"text": "the cup final"}\n{"text": "the vote"}\n')
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(FileNotFoundError):
        os.getcwd()

    cfg = load_config(raw={
        "input": {"path": f"s3://{s3_bucket}/in/"},
        "model": {"path": str(tiny_models["embedding"]), "task": "embedding"},
        "output": {"path": str(tmp_path / "out")},
        "storage": {"endpoint_url": s3_server.endpoint_url},
    })
    shards = plan(cfg, cpus=2, gpus=0).shards
    assert [shards.relative(f) for f in shards.files] == ["a.jsonl", "sub/b.jsonl"]

    uri = f"s3://{s3_bucket}/scores"
    with Writer(uri, cfg) as writer:
        writer.resume({"model_revision": "r"}, {"a.jsonl": 1})
        fs.pipe_file(f"{s3_bucket}/scores/{S.STAGING}/{writer.run_id}/part-{writer.run_id}-0.parquet", b"")
        receipt = Receipt(writer.run_id, f"part-{writer.run_id}-0.parquet", 2, 0, {"a.jsonl": [(0, 2)]}, {})
        writer.commit({"rows_in": 2}, [receipt], replace=True)
    assert committed_output(uri, cfg.storage).files == [f"part-{writer.run_id}-0.parquet"]


@pytest.mark.parametrize("entry", ["jobs.run", "jobs.nightly"])
def test_config_mistakes_get_one_line_from_every_entry_point(entry, tmp_path, capsys):
    module = importlib.import_module(entry)
    more = ["--date", "2026-01-01"] if entry == "jobs.nightly" else []
    (tmp_path / "bad.yaml").write_text("input:\n  path: x\n model: [\n")
    (tmp_path / "good.yaml").write_text("input: {path: x}\n")
    for argv, says in [
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml: No such file or directory"),
        (["--config", str(tmp_path / "bad.yaml")], "bad.yaml, line 3, column 2: malformed YAML"),
        (["--config", str(tmp_path / "good.yaml"), "--set", f"storage.secret=*{SECRET}"], "the value is not valid YAML"),
    ]:
        assert module.main([*argv, *more]) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and printed.err.count("\n") == 1 and says in printed.err, printed
        assert_clean(printed.err)


def test_parquet_blocks_are_built_column_wise_with_the_rejections_of_the_row_path(ray_session, tmp_path):
    """``_parquet_block`` (Parquet, column by column) returns the very table ``_block`` (row by row) does, on a
    batch with every per-row rejection a Parquet shard can hold, and falls back to ``_block`` on invalid UTF-8."""
    from pipeline.source import _parquet_records

    texts = ["the cup", None, "   ", "\u200b\u2060", "x" * 60, "caf\u00e9", "\u00e9t\u00e9", "\t\n", "ok", "again",
             "fine", "\u3000\u65e5"]  # fmt: skip
    pairs = ["a", "b", "c", "d", None, " ", "e", "f", "x" * 60, "g", "\u200b", "h"]
    ids = ["a", "b", None, "d", "e", "f", "g", "h", "i", "j", "k", "l"]
    batch = pa.RecordBatch.from_pydict(
        {"doc": ids, "text": texts, "pair": pairs, "topic": pa.array([1, None, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])}
    )
    (tmp_path / "a.parquet").write_bytes(b"")
    cfg = load_config(raw={
        "input": {"path": str(tmp_path), "id_columns": ["doc"], "text_pair_column": "pair", "max_text_bytes": 40},
        "model": {"path": "m", "task": "sequence-classification"},
        "output": {"path": "o"},
        "eval": {"label_column": "topic"},
    }).input  # fmt: skip
    shards = discover(cfg, *filesystem(cfg.path), ["doc", "topic"])
    types = pa.schema([("doc", pa.string()), ("topic", pa.int64())])
    source = ShardDatasource(shards, cfg, None, types, {"a.parquet": {5: "a.parquet:0", 9: "b.parquet:1"}})
    by_rows = source._block("a.parquet", list(_parquet_records(batch, 3)))
    by_columns = source._parquet_block("a.parquet", batch, np.arange(3, 15))
    assert by_columns.equals(by_rows)
    assert set(by_columns[S.ERROR].to_pylist()) == {
        None, "null_text", "missing_id", "empty_text", "text_too_large", "duplicate_id"
    }
    assert "text pair: text_too_large" not in by_columns[S.ERROR_DETAIL].to_pylist()  # details, not reasons
    assert any(d and d.startswith("text pair: ") for d in by_columns[S.ERROR_DETAIL].to_pylist())

    plain = load_config(raw={"input": {"path": str(tmp_path)}, "model": {"path": "m", "task": "embedding"}, "output": {"path": "o"}})
    generated = ShardDatasource(discover(plain.input, *filesystem(cfg.path), []), plain.input, None, pa.schema([]), {})
    binary = pa.RecordBatch.from_pydict({"text": pa.array([b"ok", b"\xff\xfe", None, b" "], pa.binary())})
    block = generated._parquet_block("a.parquet", binary, np.arange(7, 11))
    assert block.equals(generated._block("a.parquet", list(_parquet_records(binary, 7))))
    assert block[S.ERROR].to_pylist() == [None, "invalid_utf8", "null_text", "empty_text"]
    assert block[S.GENERATED_ID].to_pylist() == [f"a.parquet:{row}" for row in range(7, 11)]


def test_duplicate_ids_are_found_alike_in_parquet_and_jsonl_shards(tmp_path, ray_session):
    """The scan hashes a typed shard's ids column by column and a JSONL shard's row by row (after ``coerce``):
    one id is one id in either, and a Parquet id that is not UTF-8 is left to the row path, which rejects it."""
    from pipeline.source import check_schema, open_input

    pq.write_table(pa.table({"doc": ["5", "7", None, "5"], "text": ["a", "b", "c", "d"]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"doc": 7, "text": "x"}\n{"doc": "9", "text": "y"}\n')
    invalid = pa.array([b"\xff", b"9", b"10"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"doc": invalid, "text": ["e", "f", "g"]}), tmp_path / "c.parquet")
    cfg = load_config(raw={
        "input": {"path": str(tmp_path), "id_columns": ["doc"]},
        "model": {"path": "m", "task": "embedding"},
        "output": {"path": str(tmp_path / "out")},
    }).input  # fmt: skip
    shards = open_input(cfg, None, ["doc"])
    types, footer_rows, unreadable = check_schema(shards, cfg)
    assert types.field("doc").type == pa.string() and not unreadable
    scan = scan_input(shards, cfg, types, footer_rows, check_duplicates=True)
    assert scan.rows == 9
    assert scan.duplicates == {
        "a.parquet": {3: "a.parquet:0"},
        "b.jsonl": {1: "a.parquet:1"},  # JSONL rows are line numbers; 7 is "7" in the declared string column
        "c.parquet": {1: "b.jsonl:2"},
    }
