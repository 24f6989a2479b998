"""Progress heartbeats, restart accounting, the stall watchdog and the non-interactive progress log.

Stage workers report rows done to one tiny ``Progress`` actor (0 CPUs, fire-and-forget
calls). Each stage actor also registers there when it starts, which is how a restarted
actor knows it is one and how ``execution.max_actor_restarts`` is enforced: Ray Data
restarts a crashed stage actor and retries its unfinished batches on it without limit
(its default, ``max_restarts=-1``), so past the limit the restarted actor refuses to
start and the job fails with ``RestartLimitError``.

A driver thread watches the actor; when no stage has moved for
``execution.stall_timeout_s`` it kills the stage actors (a stuck call would otherwise keep
its actor, and its CPUs, alive) and interrupts the run, which raises ``StallError`` naming
the last progress of each stage and the resources the cluster has left. When stdout is not
a terminal, the watchdog also logs one line of rows per stage every interval instead of
Ray Data's progress bars.
"""

from __future__ import annotations

import _thread
import logging
import os
import threading
import time

import ray

log = logging.getLogger(__name__)


class StallError(RuntimeError):
    """No stage made progress for ``execution.stall_timeout_s``."""


class RestartLimitError(RuntimeError):
    """A stage actor crashed more often than ``execution.max_actor_restarts`` allows."""


@ray.remote(num_cpus=0, max_restarts=-1)
class Progress:
    """Per stage: rows done, time of the last beat, and seconds workers spent busy; per stage
    actor: its handle and the processes it has started in (one per start)."""

    def __init__(self, max_restarts: int):
        self.max_restarts = max_restarts
        self.stages: dict[str, tuple[int, float, float]] = {}
        self.workers: dict[str, tuple[object, set[int]]] = {}

    def register(self, actor_id: str, worker, pid: int) -> tuple[int, int]:
        """A stage actor announces itself (so a stalled run can kill it instead of leaking it);
        returns (how many times this actor has started, ``max_restarts``). Workers that one actor
        process holds (``pipeline.run.SampleScorer``) register once each, and count as one start."""
        _, pids = self.workers.get(actor_id, (worker, set()))
        self.workers[actor_id] = (worker, pids | {pid})
        return len(pids | {pid}), self.max_restarts

    def registered(self) -> list:
        return [worker for worker, _ in self.workers.values()]

    def beat(self, stage: str, rows: int, busy_s: float = 0.0) -> None:
        done, _, busy = self.stages.get(stage, (0, 0.0, 0.0))
        self.stages[stage] = (done + rows, time.time(), busy + busy_s)

    def snapshot(self) -> dict[str, tuple[int, float, float]]:
        return dict(self.stages)


def register(progress, stage: str) -> int:
    """Register the calling stage actor with ``progress``; return its start count (1: first start).

    Raises ``RestartLimitError`` in a restarted actor that has used up ``execution.max_actor_restarts``:
    the actor then stays dead and Ray Data fails the job with this error.
    """
    context = ray.get_runtime_context()
    starts, max_restarts = ray.get(progress.register.remote(context.get_actor_id(), context.current_actor, os.getpid()))
    if starts > max_restarts + 1:
        crashes = starts - 1
        raise RestartLimitError(
            f"the {stage} actor crashed {crashes} time{'s' if crashes > 1 else ''}, one more than "
            f"execution.max_actor_restarts={max_restarts} allows; each crash's cause is in that actor's log "
            "(`ray logs`, or logs/ in the Ray session directory)"
        )
    return starts


def stage_throughput(snapshot: dict[str, tuple[int, float, float]]) -> dict[str, dict]:
    """Rows per busy second of one worker, per stage: what sizing a cluster needs (README: cluster shape)."""
    return {
        stage: {"rows": rows, "busy_s": round(busy, 3), "rows_per_worker_s": round(rows / busy, 1) if busy else None}
        for stage, (rows, _, busy) in sorted(snapshot.items())
    }


STAGES = ("tokenize", "infer", "write")  # the run's stages that beat, in data-flow order
# The stages of the sample that the fidelity gate and calibration score before the run (``pipeline.run.score_sample``):
# apart from the run's, so that the infer stage's rows per busy second are the run's dtype alone.
SAMPLE_STAGES = ("sample_tokenize", "sample_infer")


def progress_line(snapshot: dict[str, tuple[int, float, float]], rows: int, elapsed_s: float) -> str:
    """Rows done per stage out of ``rows``, e.g. ``[1:30] of 2225 rows: tokenized 2225, inferred 1024 (11.4/s), written 0``,
    then the rows the sample scorer has scored, if it has (each sample row once per backend and dtype it scores).

    Parts are written once they hold ``output.rows_per_file`` rows, so "written" moves in steps.
    """
    done = {stage: snapshot.get(stage, (0, 0.0, 0.0))[0] for stage in (*STAGES, *SAMPLE_STAGES)}
    minutes, seconds = divmod(int(elapsed_s), 60)
    sample = f"; sample (fidelity gate, calibration): {done['sample_infer']} scored" if done["sample_infer"] else ""
    return (
        f"[{minutes}:{seconds:02d}] of {rows} rows: tokenized {done['tokenize']}, "
        f"inferred {done['infer']} ({done['infer'] / max(elapsed_s, 1e-9):.1f}/s), written {done['write']}{sample}"
    )


class Watchdog:
    """Context manager: interrupts the main thread when no stage beats for ``timeout_s``.

    With ``log_every_s`` it also logs ``progress_line`` (out of ``rows``) that often: for output that
    is not a terminal (a CI log, a file, ``ray job submit``), where the run turns Ray Data's progress
    bars off, one line per interval instead of a block of bars.
    """

    def __init__(
        self,
        progress,
        timeout_s: float,
        expected: str,
        poll_s: float = 1.0,
        rows: int = 0,
        log_every_s: float | None = None,
    ):
        self.progress, self.timeout_s, self.expected, self.poll_s = progress, timeout_s, expected, poll_s
        self.rows, self.log_every_s = rows, log_every_s
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
        logged = self._started
        while not self._stop.wait(self.poll_s):
            try:  # the watchdog itself must never block or die: a silent progress actor is no progress
                stages = ray.get(self.progress.snapshot.remote(), timeout=self.timeout_s)
            except Exception:  # noqa: BLE001
                pass
            if self.log_every_s and time.time() - logged >= self.log_every_s:
                logged = time.time()
                log.info(progress_line(stages, self.rows, logged - self._started))
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
