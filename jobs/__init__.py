"""Entry points, each run as ``python -m jobs.<name>``."""

from __future__ import annotations

import argparse
import logging
import sys


def log_to_stdout() -> None:
    """Print this project's INFO logs (a job's progress lines, the classifier's training) as plain lines
    on stdout. Only the ``pipeline`` and ``jobs`` loggers: other libraries keep their own settings."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("pipeline", "jobs"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # no second copy through a root handler
        if not logger.handlers:
            logger.addHandler(handler)


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of an entry point: its module docstring as the help text, as plain text (without
    reStructuredText's double backticks) and with the examples' layout kept."""
    return argparse.ArgumentParser(
        prog=prog, description=doc.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter
    )
