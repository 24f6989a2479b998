"""A real multi-node Ray cluster on this machine, started with ``ray start`` (for ``-m cluster`` tests).

Unlike the in-process ``ray.init`` session, this exercises what a deployment does: GCS over
TCP, a dashboard serving the Jobs API, token authentication, and job drivers launched by the
job supervisor with the ``python`` found on the head node's ``PATH``.

    with LocalCluster() as cluster:
        subprocess.run([sys.executable, "-m", "jobs.submit", "--address", cluster.dashboard_url, ...],
                       env=cluster.env, check=True)

Every node is a ``ray start --block`` process in its own process group, under a private
``--temp-dir``. Teardown signals only those processes — never ``ray stop``, which kills
every Ray process on the machine, including other test sessions.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path
from types import TracebackType

import requests

RAY = str(Path(sys.executable).with_name("ray"))
HOST = "127.0.0.1"
# SIGTERM shuts a node down at once instead of draining it for up to 30 s first.
NODE_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (held together so none repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


class LocalCluster:
    """A head node plus ``num_workers`` worker nodes, each with ``cpus_per_node`` CPUs and no GPU.

    Construction allocates ports, a temp dir and a fresh auth token shared by every node;
    ``with`` starts the nodes and tears everything down on exit, also when startup fails.

    Attributes:
        address: GCS address (``127.0.0.1:PORT``), for ``ray.init`` / ``RAY_ADDRESS``.
        dashboard_url: ``http://127.0.0.1:PORT``, for the Jobs API (``jobs.submit --address``).
        env: environment for client subprocesses: this cluster's auth token
            (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``) and the venv's ``bin`` first on ``PATH``.
    """

    def __init__(self, num_workers: int = 1, cpus_per_node: int = 1, timeout_s: float = 120) -> None:
        self.num_workers = num_workers
        self.cpus_per_node = cpus_per_node
        self.timeout_s = timeout_s
        self._procs: list[subprocess.Popen] = []
        # Private (0700) and short: Ray puts AF_UNIX sockets (107-byte paths at most) under it.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))
        token = secrets.token_hex(32)
        token_path = self.temp_dir / "auth_token"
        token_path.write_text(token)
        self._auth_header = {"Authorization": f"Bearer {token}"}
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        gcs_port, dashboard_port, client_port = free_ports(3)
        self.address = f"{HOST}:{gcs_port}"
        self.dashboard_url = f"http://{HOST}:{dashboard_port}"
        self._head_args = [
            "--head",
            f"--port={gcs_port}",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={client_port}",
            "--disable-usage-stats",
        ]

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the head, wait for the Jobs API, start the workers, wait until every node is alive."""
        self._start_node("head", self._head_args)
        self._wait("the Jobs API to answer", lambda: self.get("/api/version") is not None)
        for i in range(self.num_workers):
            self._start_node(f"worker{i}", [f"--address={self.address}"])
        expected = 1 + self.num_workers
        self._wait(f"{expected} alive nodes", lambda: self.alive_nodes() == expected)

    def alive_nodes(self) -> int:
        """Number of nodes the GCS reports ALIVE (0 while the dashboard cannot tell)."""
        body = self.get("/api/v0/nodes")
        if body is None:
            return 0
        return sum(node["state"] == "ALIVE" for node in body["data"]["result"]["result"])

    def stop(self, grace_s: float = 15) -> None:
        """Shut every node down (idempotent) and delete the temp dir.

        SIGTERM goes to each ``ray start --block`` process, which stops its node's processes itself;
        then whatever is left of the node's process group (or all of it, after ``grace_s``) is killed.
        """
        for proc in reversed(self._procs):  # workers first, the head last
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in reversed(self._procs):
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._procs.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _start_node(self, name: str, args: list[str]) -> None:
        """Start ``ray start --block ARGS`` in its own process group, logging to ``<temp_dir>/<name>.log``."""
        cmd = [
            RAY,
            "start",
            "--block",
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir / name}",  # one per node, as on separate machines
            # Ports every node on this host would otherwise share: let each pick free ones.
            f"--dashboard-agent-listen-port={free_ports(1)[0]}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            *args,
        ]
        with open(self.temp_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                cmd,
                env={**self.env, **NODE_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)

    def get(self, path: str) -> dict | None:
        """GET a dashboard endpoint with this cluster's token; None while it does not answer 200."""
        try:
            response = requests.get(self.dashboard_url + path, headers=self._auth_header, timeout=5)
        except (requests.ConnectionError, requests.Timeout):
            return None
        return response.json() if response.ok else None

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not ready():
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"`{' '.join(proc.args)}` exited with {proc.returncode}\n{self._logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {self.timeout_s:.0f}s waiting for {what}\n{self._logs()}")
            time.sleep(0.5)

    def _logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.temp_dir.glob("*.log"))

