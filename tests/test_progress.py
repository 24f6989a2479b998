"""Progress reporting for output that is not a terminal: one line of rows per stage per interval."""

from __future__ import annotations

import logging
import time

from pipeline.progress import Progress, Watchdog, progress_line


def test_progress_line_shows_rows_per_stage_in_data_flow_order():
    snapshot = {"write": (0, 0.0, 0.0), "infer": (1024, 0.0, 0.0), "tokenize": (2225, 0.0, 0.0)}
    assert progress_line(snapshot, 2225, 90.5) == "[1:30] of 2225 rows: tokenized 2225, inferred 1024 (11.3/s), written 0"
    assert progress_line({}, 10, 0) == "[0:00] of 10 rows: tokenized 0, inferred 0 (0.0/s), written 0"
    gated = {"sample_tokenize": (256, 1.0, 1.0), "sample_infer": (512, 2.0, 5.0)}
    assert progress_line(gated, 300, 12) == (
        "[0:12] of 300 rows: tokenized 0, inferred 0 (0.0/s), written 0; sample (fidelity gate, calibration): 512 scored"
    )


def test_the_watchdog_logs_a_progress_line_per_interval(ray_session, caplog):
    progress = Progress.remote(3)
    progress.beat.remote("tokenize", 50, 0.1)
    watchdog = Watchdog(progress, 60, "-", poll_s=0.1, rows=100, log_every_s=0.5)
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.progress"), watchdog:
            time.sleep(2.2)
    finally:
        ray_session.kill(progress)
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    assert 2 <= len(lines) <= 5, lines
    assert all(" of 100 rows: tokenized 50, inferred 0 " in line for line in lines), lines


def test_an_actor_starts_once_per_process_however_many_workers_it_holds(ray_session):
    """``pipeline.run.SampleScorer`` holds a tokenize worker and a model worker per dtype in one process: they
    register once each but count as one start, so a limit of 0 restarts does not refuse the third; a new
    process for the same actor (a restart) is a second start."""
    progress = Progress.remote(0)
    try:
        first = [ray_session.get(progress.register.remote("actor-a", None, 101)) for _ in range(3)]
        restarted = ray_session.get(progress.register.remote("actor-a", None, 102))
        other = ray_session.get(progress.register.remote("actor-b", None, 101))
    finally:
        ray_session.kill(progress)
    assert first == [(1, 0)] * 3 and restarted == (2, 0) and other == (1, 0)
