"""Progress heartbeats and the stall watchdog: a job that stops moving fails with a diagnosis.

Stage workers report rows done to one tiny ``Progress`` actor (0 CPUs, fire-and-forget
calls). A driver thread watches it; when no stage has moved for
``execution.stall_timeout_s`` it kills the stage actors (a stuck call would otherwise keep
its actor, and its CPUs, alive) and interrupts the run, which raises ``StallError`` naming
the last progress of each stage and the resources the cluster has left.
"""

from __future__ import annotations

import _thread
import threading
import time

import ray


class StallError(RuntimeError):
    """No stage made progress for ``execution.stall_timeout_s``."""


@ray.remote(num_cpus=0, max_restarts=-1)
class Progress:
    """Per stage: rows done, time of the last beat, and seconds workers spent busy."""

    def __init__(self):
        self.stages: dict[str, tuple[int, float, float]] = {}
        self.workers: list = []

    def register(self, worker) -> None:
        """Stage actors announce themselves, so a stalled run can kill them instead of leaking them."""
        self.workers.append(worker)

    def registered(self) -> list:
        return list(self.workers)

    def beat(self, stage: str, rows: int, busy_s: float = 0.0) -> None:
        done, _, busy = self.stages.get(stage, (0, 0.0, 0.0))
        self.stages[stage] = (done + rows, time.time(), busy + busy_s)

    def snapshot(self) -> dict[str, tuple[int, float, float]]:
        return dict(self.stages)


def stage_throughput(snapshot: dict[str, tuple[int, float, float]]) -> dict[str, dict]:
    """Rows per busy second of one worker, per stage: what sizing a cluster needs (README: cluster shape)."""
    return {
        stage: {"rows": rows, "busy_s": round(busy, 3), "rows_per_worker_s": round(rows / busy, 1) if busy else None}
        for stage, (rows, _, busy) in sorted(snapshot.items())
    }


class Watchdog:
    """Context manager: interrupts the main thread when no stage beats for ``timeout_s``."""

    def __init__(self, progress, timeout_s: float, expected: str, poll_s: float = 1.0):
        self.progress, self.timeout_s, self.expected, self.poll_s = progress, timeout_s, expected, poll_s
        self.diagnosis: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="stall-watchdog")

    def __enter__(self) -> Watchdog:
        self._started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        stages: dict[str, tuple[int, float, float]] = {}
        while not self._stop.wait(self.poll_s):
            try:  # the watchdog itself must never block or die: a silent progress actor is no progress
                stages = ray.get(self.progress.snapshot.remote(), timeout=self.timeout_s)
            except Exception:  # noqa: BLE001
                pass
            last = max([t for _, t, _ in stages.values()] + [self._started])
            if time.time() - last > self.timeout_s:
                self.diagnosis = self._diagnose(stages)
                # Killing the stage actors frees their CPUs and fails the run even where the
                # interrupt is deferred (Ray defers SIGINT inside some calls).
                try:
                    for worker in ray.get(self.progress.registered.remote(), timeout=self.timeout_s):
                        ray.kill(worker, no_restart=True)
                finally:
                    _thread.interrupt_main()
                return

    def _diagnose(self, stages: dict[str, tuple[int, float, float]]) -> str:
        now = time.time()
        seen = ", ".join(f"{s}: {rows} rows, last {now - t:.0f}s ago" for s, (rows, t, _) in sorted(stages.items()))
        return (
            f"no stage made progress for {self.timeout_s:g}s (execution.stall_timeout_s). "
            f"Progress so far: {seen or 'none'}. Cluster resources free: {ray.available_resources()}. "
            f"Pools need: {self.expected}. Check that every pool can be scheduled and that actors are not stuck"
        )
