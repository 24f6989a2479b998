"""Nightly scoring of a date partition, exactly once: ``python -m jobs.nightly --config ... --date YYYY-MM-DD``.

``${DATE}`` in the config (e.g. ``input.path: s3://bucket/events/dt=${DATE}/``) is the
date being scored. Rerunning a finished date is a no-op; new shards of a date are scored
alone; a killed run is finished or resumed by the next one; one driver per date at a time
(see ``pipeline.nightly``). Exit status as ``jobs.run``: 2 for a config or input that cannot run,
3 when a date's run quarantined unreadable shards (they are not marked scored, so the next run
tries them again).

    python -m jobs.nightly --config configs/nightly_s3.yaml --date 2026-11-20
    python -m jobs.nightly --config configs/nightly_s3.yaml --backfill 2026-11-01 2026-11-20
    python -m jobs.nightly --config configs/nightly_s3.yaml --date 2026-11-20 --dry-run
"""

from __future__ import annotations

import argparse
import sys

from jobs import argument_parser, log_to_stdout
from jobs.run import PARTIAL, RUN_FAILURES, USER_ERRORS, report
from pipeline.config import load_config
from pipeline.nightly import date_range, describe_date, parse_date, score_date


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser("python -m jobs.nightly", __doc__)
    parser.add_argument("--config", required=True, help="YAML job config; ${DATE} is the date scored")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--date", help="the date to score, YYYY-MM-DD")
    when.add_argument("--backfill", nargs=2, metavar=("START", "END"), help="score every date in [START, END]")
    parser.add_argument("--dry-run", action="store_true", help="print what each date's run would do; start nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, partial = None, []
    try:
        dates = date_range(*args.backfill) if args.backfill else [parse_date(args.date)]
        for date in dates:
            cfg = load_config(args.config, args.overrides, variables={"DATE": date})
            if args.dry_run:
                print(describe_date(cfg, date))
            elif score_date(cfg, date)["status"] == "partial":
                partial.append(date)
    except (*USER_ERRORS, *RUN_FAILURES) as e:
        return report(e, cfg)
    if partial:
        print(f"PARTIAL: unreadable shards were quarantined on {', '.join(partial)}; they stay pending", file=sys.stderr)
        return PARTIAL
    return 0


if __name__ == "__main__":
    log_to_stdout()
    sys.exit(main())
