"""Nightly scoring of a date partition, exactly once: ``python -m jobs.nightly --config ... --date YYYY-MM-DD``.

``${DATE}`` in the config (e.g. ``input.path: s3://bucket/events/dt=${DATE}/``) is the
date being scored. Rerunning a finished date is a no-op; new shards of a date are scored
alone; a killed run is finished or redone by the next one (see ``pipeline.nightly``).

    python -m jobs.nightly --config configs/nightly_s3.yaml --date 2026-11-20
    python -m jobs.nightly --config configs/nightly_s3.yaml --backfill 2026-11-01 2026-11-20
"""

from __future__ import annotations

import argparse
import sys

from jobs import argument_parser, log_to_stdout
from jobs.run import USER_ERRORS
from pipeline.config import load_config
from pipeline.nightly import date_range, parse_date, score_date


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser("python -m jobs.nightly", __doc__)
    parser.add_argument("--config", required=True, help="YAML job config; ${DATE} is the date scored")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--date", help="the date to score, YYYY-MM-DD")
    when.add_argument("--backfill", nargs=2, metavar=("START", "END"), help="score every date in [START, END]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dates = date_range(*args.backfill) if args.backfill else [parse_date(args.date)]
        for date in dates:
            score_date(load_config(args.config, args.overrides, variables={"DATE": date}), date)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    log_to_stdout()
    sys.exit(main())
