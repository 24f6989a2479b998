"""Progress reporting for output that is not a terminal: one line of rows per stage per interval."""

from __future__ import annotations

import logging
import time

from pipeline.progress import Progress, ProgressLog, progress_line


def test_progress_line_shows_rows_per_stage_in_data_flow_order():
    snapshot = {"write": (0, 0.0, 0.0), "infer": (1024, 0.0, 0.0), "tokenize": (2225, 0.0, 0.0)}
    assert progress_line(snapshot, 2225, 90.5) == "[1:30] of 2225 rows: tokenized 2225, inferred 1024 (11.3/s), written 0"
    assert progress_line({}, 10, 0) == "[0:00] of 10 rows: tokenized 0, inferred 0 (0.0/s), written 0"


def test_progress_log_logs_a_line_per_interval_from_the_progress_actor(ray_session, caplog):
    progress = Progress.remote(3)
    progress.beat.remote("tokenize", 50, 0.1)
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.progress"), ProgressLog(progress, 100, interval_s=0.5):
            time.sleep(2.2)
    finally:
        ray_session.kill(progress)
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    assert 2 <= len(lines) <= 5, lines
    assert all(" of 100 rows: tokenized 50, inferred 0 " in line for line in lines), lines
