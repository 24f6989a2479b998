"""A real S3 API on 127.0.0.1 for tests: moto's threaded server, as s3fs's own test suite runs it.

``s3_server`` (session) starts the server and points the AWS chain at dummy credentials for the session;
``s3_bucket`` (function) creates an empty bucket and removes it afterwards; ``s3_proxy`` (function) is a
:class:`FaultProxy` in front of the server that records requests and injects throttling, 5xx answers and
dropped connections over real HTTP, which moto itself cannot do.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Keep a developer's ~/.aws and the instance metadata service out of the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
UNSET_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def client(self, service: str = "s3", **kwargs: Any) -> Any:
        """A boto3 client for ``service`` on this server, with the dummy credentials unless ``kwargs`` differ."""
        import boto3

        kwargs.setdefault("aws_access_key_id", DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"])
        kwargs.setdefault("aws_secret_access_key", DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"])
        kwargs.setdefault("region_name", DUMMY_AWS_ENV["AWS_DEFAULT_REGION"])
        return boto3.client(service, endpoint_url=self.endpoint_url, **kwargs)

    @contextmanager
    def iam_enforced(self) -> Iterator[None]:
        """Inside the block the server checks signatures and IAM policies (moto's reset-auth endpoint)."""
        previous = self._reset_auth("0")
        try:
            yield
        finally:
            self._reset_auth(previous)

    def _reset_auth(self, initial_no_auth_action_count: str) -> str:
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=initial_no_auth_action_count.encode(),
            headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
        )
        with urllib.request.urlopen(request) as response:
            return json.load(response)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free port of 127.0.0.1, with dummy AWS credentials in the environment."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        for name, value in DUMMY_AWS_ENV.items():
            env.setenv(name, value)
        for name in UNSET_AWS_ENV:
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield S3Server(endpoint_url=f"http://{host}:{port}")
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket on ``s3_server``; deleted with its objects afterwards."""
    client = s3_server.client()
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        if page.get("Contents"):
            client.delete_objects(Bucket=name, Delete={"Objects": [{"Key": o["Key"]} for o in page["Contents"]]})
    client.delete_bucket(Bucket=name)


class Seen(NamedTuple):
    method: str
    path: str  # with the query string
    range: str | None


class Fault(NamedTuple):
    status: int | None  # None: close the connection without answering
    code: str = ""


SLOW_DOWN = Fault(503, "SlowDown")
INTERNAL_ERROR = Fault(500, "InternalError")
DROPPED_CONNECTION = Fault(None)


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of ``upstream``: records every request, answers injected faults.

    Use as a context manager; point clients at :attr:`endpoint_url`.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.seen: list[Seen] = []
        self._faults: collections.deque[Fault] = collections.deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def inject(self, fault: Fault, count: int = 1) -> None:
        """Answer the next ``count`` requests with ``fault`` instead of forwarding them."""
        with self._lock:
            self._faults.extend([fault] * count)

    @property
    def pending_faults(self) -> int:
        """Injected faults not yet answered."""
        return len(self._faults)

    def object_gets(self) -> list[str]:
        """Paths of the GetObject requests seen (``/bucket/key``; listings excluded)."""
        return [s.path for s in self.seen if s.method == "GET" and "?" not in s.path and s.path.count("/") > 1]

    def _admit(self, seen: Seen) -> Fault | None:
        """Record ``seen``; return the fault to inject, or None to forward it."""
        with self._lock:
            self.seen.append(seen)
            return self._faults.popleft() if self._faults else None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    _NOT_RELAYED = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}  # ours

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fault = proxy._admit(Seen(self.command, self.path, self.headers.get("Range")))
        if fault is None:
            upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
            upstream.request(self.command, self.path, body=body or None, headers=dict(self.headers))
            response = upstream.getresponse()
            status, headers, payload = response.status, response.getheaders(), response.read()
            upstream.close()
        elif fault.status is None:
            self.close_connection = True
            return
        else:
            status, headers = fault.status, [("Content-Type", "application/xml")]
            payload = f"<Error><Code>{fault.code}</Code><Message>injected by FaultProxy</Message></Error>".encode()
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in self._NOT_RELAYED:
                self.send_header(name, value)
        # HEAD answers announce the object's length but carry no body.
        length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines."""


@pytest.fixture
def s3_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``s3_server``, for request counts and injected failures."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy
