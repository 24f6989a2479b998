"""pipeline.storage against a real S3 API: moto's server on 127.0.0.1, behind a fault-injecting proxy where
a test counts requests or needs throttling, 5xx answers and dropped connections."""

from __future__ import annotations

import json
import pickle
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import json as pa_json
from s3_server import DROPPED_CONNECTION, INTERNAL_ERROR, SLOW_DOWN, Fault, FaultProxy, S3Server

from pipeline.config import StorageConfig
from pipeline.storage import StorageError, arrow_filesystem, check_access, fetch_checkpoint, filesystem, join


def at(endpoint_url: str, **kwargs: object) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint_url, **kwargs)


def test_parquet_and_jsonl_round_trip(s3_server: S3Server, s3_bucket: str) -> None:
    fs, root = filesystem(f"s3://{s3_bucket}/data/", at(s3_server.endpoint_url))
    table = pa.table({"id": [1, 2], "text": ["first", "second"]})
    pq.write_table(table, join(root, "part-0.parquet"), filesystem=arrow_filesystem(fs))
    with fs.open(join(root, "part-1.jsonl"), "w") as f:
        f.write('{"id": 3, "text": "third"}\n')

    assert sorted(fs.ls(root)) == [join(root, "part-0.parquet"), join(root, "part-1.jsonl")]
    assert pq.read_table(join(root, "part-0.parquet"), filesystem=arrow_filesystem(fs)).equals(table)
    with arrow_filesystem(fs).open_input_stream(join(root, "part-1.jsonl")) as stream:
        assert pa_json.read_json(stream).to_pylist() == [{"id": 3, "text": "third"}]


def test_endpoint_from_environment_travels_with_the_pickled_filesystem(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="a.txt", Body=b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    fs, root = filesystem(f"s3://{s3_bucket}/a.txt")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # as on a Ray worker that does not share the driver's environment

    assert pickle.loads(pickle.dumps(fs)).cat(root) == b"x"


def test_arrow_filesystem_streams_ranges(s3_proxy: FaultProxy, s3_bucket: str) -> None:
    fs, root = filesystem(f"s3://{s3_bucket}/big.bin", at(s3_proxy.endpoint_url))
    fs.pipe(root, bytes(4 * 2**20))
    fs.default_block_size = 2**20  # 50 MiB by default; shrunk so that a small object shows the ranges

    with arrow_filesystem(fs).open_input_stream(root) as stream:
        assert stream.read(100) == bytes(100)

    ranges = [s.range for s in s3_proxy.seen if s.method == "GET"]
    assert ranges and all(ranges)
    fetched = sum(end - start + 1 for start, end in (map(int, r.removeprefix("bytes=").split("-")) for r in ranges))
    assert fetched <= 2**20 + 100


@pytest.mark.parametrize("fault", [SLOW_DOWN, INTERNAL_ERROR, DROPPED_CONNECTION], ids=lambda f: f.code or "drop")
def test_transient_failures_are_retried(s3_proxy: FaultProxy, s3_bucket: str, fault: Fault) -> None:
    fs, root = filesystem(f"s3://{s3_bucket}/a.txt", at(s3_proxy.endpoint_url))
    fs.pipe(root, b"payload")
    s3_proxy.inject(fault, count=2)

    assert fs.cat(root) == b"payload"
    assert s3_proxy.pending_faults == 0


def test_retries_stop_after_max_attempts(
    s3_proxy: FaultProxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3_proxy.inject(INTERNAL_ERROR, count=3)

    with pytest.raises(StorageError, match=rf"cannot read s3://{s3_bucket}/in: .*\(InternalError\)"):
        check_access(f"s3://{s3_bucket}/in", at(s3_proxy.endpoint_url))
    assert len(s3_proxy.seen) == 2


def test_check_access_s3(s3_server: S3Server, s3_bucket: str) -> None:
    storage = at(s3_server.endpoint_url)
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/part-0.parquet", Body=b"x")

    check_access(f"s3://{s3_bucket}/in/", storage)
    check_access(f"s3://{s3_bucket}/in/*.parquet", storage)
    check_access(f"s3://{s3_bucket}/out", storage, write=True)
    with pytest.raises(StorageError, match=rf"cannot read s3://{s3_bucket}/missing: no objects under it"):
        check_access(f"s3://{s3_bucket}/missing", storage)
    fs, _ = filesystem(f"s3://{s3_bucket}", storage)
    assert fs.find(s3_bucket) == [f"{s3_bucket}/in/part-0.parquet"]  # the write probe is gone


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_check_access_missing_bucket_fails_fast(s3_proxy: FaultProxy, write: bool) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError, match=rf"s3://{bucket}/in: bucket '{bucket}' does not exist .*\(NoSuchBucket\)"):
        check_access(f"s3://{bucket}/in", at(s3_proxy.endpoint_url), write=write)
    assert len(s3_proxy.seen) == 1  # permanent: not retried


@pytest.mark.usefixtures("s3_server")  # for its credentials
def test_check_access_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"

    with pytest.raises(StorageError, match=rf"cannot read s3://bucket/in: cannot reach {endpoint}; .*endpoint_url"):
        check_access("s3://bucket/in", at(endpoint))


@pytest.fixture
def reader(s3_server: S3Server) -> tuple[str, str]:
    """Access key id and secret of an IAM user that may list and read objects but not write them."""
    iam = s3_server.client("iam")
    name = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name)
    allow_read = {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": "*"}
    policy = {"Version": "2012-10-17", "Statement": [allow_read]}
    iam.put_user_policy(UserName=name, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_check_access_with_iam(s3_server: S3Server, s3_bucket: str, reader: tuple[str, str]) -> None:
    key, secret = reader
    uri = f"s3://{s3_bucket}/data"
    s3_server.client().put_object(Bucket=s3_bucket, Key="data/part-0.parquet", Body=b"x")

    as_reader = at(s3_server.endpoint_url, key=key, secret=secret)

    with s3_server.iam_enforced():
        check_access(uri, as_reader)
        denied = rf"cannot write {uri}: access denied; grant .*s3:PutObject.* \(AccessDenied\)"
        with pytest.raises(StorageError, match=denied):
            check_access(uri, as_reader, write=True)
        with pytest.raises(StorageError, match=r"access key id is not known .*storage\.key \(InvalidAccessKeyId\)"):
            check_access(uri, at(s3_server.endpoint_url, key="AKIAUNKNOWNUNKNOWN00", secret=secret))
        with pytest.raises(StorageError, match=r"secret key does not match .*\(SignatureDoesNotMatch\)"):
            check_access(uri, at(s3_server.endpoint_url, key=key, secret="wrong"))


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")


@pytest.mark.usefixtures("no_credentials")
def test_check_access_without_credentials(s3_server: S3Server, s3_bucket: str) -> None:
    with pytest.raises(StorageError, match=r"no AWS credentials found; .*storage\.anon: true"):
        check_access(f"s3://{s3_bucket}", at(s3_server.endpoint_url))


@pytest.mark.usefixtures("no_credentials")
def test_anonymous_access(s3_server: S3Server, s3_bucket: str) -> None:
    owner = s3_server.client()
    owner.put_object(Bucket=s3_bucket, Key="private.txt", Body=b"x")
    owner.put_object(Bucket=s3_bucket, Key="public.txt", Body=b"x", ACL="public-read")

    check_access(f"s3://{s3_bucket}/public.txt", at(s3_server.endpoint_url, anon=True))
    with pytest.raises(StorageError, match=r"private\.txt: access denied"):
        check_access(f"s3://{s3_bucket}/private.txt", at(s3_server.endpoint_url, anon=True))


def test_check_access_local(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("{}\n")

    check_access(str(tmp_path / "in"))
    check_access(f"file://{tmp_path}/in/*.jsonl")
    check_access(str(tmp_path / "out" / "run-1"), write=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(StorageError, match="nothing exists there"):
        check_access(str(tmp_path / "in" / "*.parquet"))
    with pytest.raises(StorageError, match="is not a writable directory"):
        check_access(str(tmp_path / "in" / "a.jsonl" / "out"), write=True)


@pytest.fixture
def checkpoint_uri(s3_server: S3Server, s3_bucket: str, tiny_models: dict[str, Path]) -> str:
    """The tiny embedding checkpoint (BertModel + tokenizer) uploaded under ``s3://<bucket>/models/tiny``."""
    client = s3_server.client()
    for file in tiny_models["embedding"].iterdir():
        client.upload_file(str(file), s3_bucket, f"models/tiny/{file.name}")
    return f"s3://{s3_bucket}/models/tiny"


def test_fetch_checkpoint_downloads_once(
    s3_proxy: FaultProxy, checkpoint_uri: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    storage = at(s3_proxy.endpoint_url)
    files = sorted(p.name for p in tiny_models["embedding"].iterdir())

    local = fetch_checkpoint(checkpoint_uri, storage, cache_root=tmp_path)
    assert sorted(p.name for p in local.iterdir()) == files
    assert len(s3_proxy.object_gets()) == len(files)
    assert fetch_checkpoint(checkpoint_uri, storage, cache_root=tmp_path) == local
    assert len(s3_proxy.object_gets()) == len(files)  # the second call only listed
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [local.name]

    fetched, original = AutoModel.from_pretrained(local), AutoModel.from_pretrained(tiny_models["embedding"])
    assert all(torch.equal(a, b) for a, b in zip(fetched.state_dict().values(), original.state_dict().values()))
    assert AutoTokenizer.from_pretrained(local)("the game").input_ids == AutoTokenizer.from_pretrained(
        tiny_models["embedding"]
    )("the game").input_ids


def test_fetch_checkpoint_concurrent_callers_share_one_download(
    s3_proxy: FaultProxy, checkpoint_uri: str, tmp_path: Path
) -> None:
    storage = at(s3_proxy.endpoint_url)
    with ThreadPoolExecutor(4) as pool:
        dirs = set(pool.map(lambda _: fetch_checkpoint(checkpoint_uri, storage, cache_root=tmp_path), range(4)))

    assert len(dirs) == 1
    assert len(s3_proxy.object_gets()) == len(list(dirs.pop().iterdir()))


def test_fetch_checkpoint_refetches_a_changed_checkpoint(
    s3_server: S3Server, s3_bucket: str, checkpoint_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENCODER_BATCH_CACHE", str(tmp_path))
    storage = at(s3_server.endpoint_url)
    first = fetch_checkpoint(checkpoint_uri, storage)
    config = json.loads((first / "config.json").read_text())
    s3_server.client().put_object(
        Bucket=s3_bucket, Key="models/tiny/config.json", Body=json.dumps({**config, "classifier_dropout": 0.5})
    )

    second = fetch_checkpoint(checkpoint_uri, storage)
    assert first.parent == second.parent == tmp_path / "checkpoints"
    assert second != first
    assert json.loads((second / "config.json").read_text())["classifier_dropout"] == 0.5
    assert json.loads((first / "config.json").read_text()) == config


def test_fetch_checkpoint_errors(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    storage = at(s3_server.endpoint_url)
    with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/models/none: no checkpoint files under it"):
        fetch_checkpoint(f"s3://{s3_bucket}/models/none", storage, cache_root=tmp_path)
    with pytest.raises(StorageError, match=r"bucket 'missing-bucket' does not exist .*\(NoSuchBucket\)"):
        fetch_checkpoint("s3://missing-bucket/models/tiny", storage, cache_root=tmp_path)


def test_fetch_checkpoint_local_path_is_used_in_place(tiny_models: dict[str, Path]) -> None:
    assert fetch_checkpoint(str(tiny_models["embedding"])) == tiny_models["embedding"]
