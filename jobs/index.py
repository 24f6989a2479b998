"""Build the nearest-neighbour index of an embedding output: ``python -m jobs.index --embeddings out/bbc_embed``.

Writes ``<embeddings>/_index/`` (replacing an older one) and prints what it built; ``python -m jobs.search``
then uses it. Local paths and ``s3://`` URIs (credentials from the standard AWS chain) both work.
"""

from __future__ import annotations

import argparse
import sys

from jobs import argument_parser
from jobs.run import USER_ERRORS, report
from pipeline.index import BINARY_METRIC, SearchError, build_index
from pipeline.schema import INDEX_DIR
from pipeline.storage import join


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser("python -m jobs.index", __doc__)
    parser.add_argument("--embeddings", required=True, help="output.path of a finished embedding job")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        info = build_index(args.embeddings)
    except (*USER_ERRORS, SearchError) as e:
        return report(e)
    params = ", ".join(f"{k}={v}" for k, v in sorted(info.params.items()))
    vectors = "sign bits" if info.metric == BINARY_METRIC else "L2-normalised vectors"
    print(
        f"built {join(args.embeddings, INDEX_DIR)}/ in {info.build_s:.1f} s\n"
        f"  {info.kind} index, {info.metric} on {vectors} ({params})\n"
        f"  {info.rows} vectors x {info.dim} dims from {len(info.parts)} part(s)\n"
        f"  embeddings of {info.embedding['model_path']} @ {info.embedding['model_revision']} "
        f"({info.embedding['pooling']} pooling, normalize={info.embedding['normalize']}, "
        f"{info.embedding.get('precision', 'float32')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
