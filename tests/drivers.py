"""Real driver processes for tests: ``python -m jobs.<name>`` on the tests' Ray cluster, as on a real one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml


def write_config(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def start(module: str, config: str, *args: str, overrides: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python -m <module> --config <config> [args] [--set overrides]`` as its own process group, connected
    to the tests' Ray session through RAY_ADDRESS."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", module, "--config", config, *args]
    for override in overrides:
        command += ["--set", override]
    return subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_until(condition: Callable[[], bool], driver: subprocess.Popen, timeout: float = 240) -> None:
    """Poll ``condition`` while ``driver`` runs; fail with its output if it exits or time runs out first."""
    deadline = time.time() + timeout
    while not condition():
        if driver.poll() is not None or time.time() > deadline:
            driver.kill()
            output = driver.stdout.read()[-4000:]
            raise AssertionError(f"driver exited with {driver.poll()} before the condition held:\n{output}")
        time.sleep(0.1)


def finish(driver: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """(exit code, output) of ``driver``."""
    out, _ = driver.communicate(timeout=timeout)
    return driver.returncode, out


def kill(driver: subprocess.Popen) -> None:
    """SIGKILL the driver: no clean-up, no lease release, like a lost node."""
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()


@contextmanager
def holding(module: str, config: str, *args: str, held: Callable[[], bool]) -> Iterator[subprocess.Popen]:
    """A driver that holds its lease: started, then SIGSTOPped once ``held`` says it took the lease, so that it
    stays the fresh holder and cannot finish while the block runs; SIGCONTed after it."""
    driver = start(module, config, *args)
    wait_until(held, driver)
    os.kill(driver.pid, signal.SIGSTOP)
    try:
        yield driver
    finally:
        os.kill(driver.pid, signal.SIGCONT)


def receipted_rows(staging: Path) -> int:
    """Rows in the receipts under ``staging`` (``_staging/``): what a killed run leaves resumable."""
    return sum(
        receipt["data_rows"] + receipt["rejected_rows"]
        for receipt in (json.loads(p.read_text()) for p in staging.glob("*/_receipts/*.json"))
    )
