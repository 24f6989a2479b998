"""Search an embedding output: ``python -m jobs.search --embeddings out/bbc_embed --query "..." [-k 10] [--exact]
[--rerank-model CROSS_ENCODER]``.

Embeds the query with the checkpoint and embedding chain recorded in the output's metadata and the
checkpoint's query prompt (``--prompt`` / ``--prompt-name`` override it), searches its ``_index/``
(``python -m jobs.index``), or every row when there is none or with ``--exact``, and prints the top k rows:
rank, cosine score, id columns and a snippet of the text from the job's input. Binary outputs are searched
by Hamming distance, then the best ``k x --rescore-multiplier`` are rescored with the float query.
A sparse-embedding output is searched by the dot product of SPLADE vectors, exactly. ``--rerank-model`` scores
the top k hits again with a cross-encoder, as a ``rerank`` job would, and orders them by that score.
"""

from __future__ import annotations

import argparse
import sys

import pyarrow as pa

from jobs import argument_parser
from jobs.run import USER_ERRORS, report
from pipeline import schema as S
from pipeline.index import RESCORE_MULTIPLIER, SearchError
from pipeline.search import RERANK_SCORE, Searcher, check_query

SNIPPET_CHARS = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser("python -m jobs.search", __doc__)
    parser.add_argument("--embeddings", required=True, help="output.path of a finished embedding or sparse-embedding job")
    parser.add_argument("--query", required=True, help="text to search for")
    parser.add_argument("-k", type=int, default=10, help="number of hits (default: 10; at most every row)")
    parser.add_argument("--exact", action="store_true", help="score every row instead of using the index")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="literal prompt for the query (default: the checkpoint's query prompt)")
    prompt.add_argument("--prompt-name", help="one of the checkpoint's named prompts for the query")
    parser.add_argument("--rescore-multiplier", type=int, default=RESCORE_MULTIPLIER,
                        help=f"binary outputs: Hamming candidates per hit rescored with the float query "
                        f"(default: {RESCORE_MULTIPLIER}; 0: Hamming order only)")
    parser.add_argument("--rerank-model", help="a cross-encoder checkpoint (as model.path of a rerank job) that "
                        "reranks the top k hits; they are printed with its rerank_score")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("-k must be at least 1")
    if args.rescore_multiplier < 0:
        parser.error("--rescore-multiplier must be 0 or more")
    return args


def snippet(text: str | None) -> str:
    if text is None:
        return "(not found in the input)"
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def render(hits: pa.Table, text_column: str) -> str:
    """One aligned line per hit: rank, score, id columns, a snippet of the text."""
    scores = [c for c in (S.SCORE, RERANK_SCORE) if c in hits.column_names]
    ids = [c for c in hits.column_names if c not in (*scores, text_column)]
    header = ["#", *scores, *ids, text_column]
    rows = [
        [str(rank), *("-" if hit[c] is None else f"{hit[c]:.4f}" for c in scores), *(str(hit[c]) for c in ids),
         snippet(hit[text_column])]
        for rank, hit in enumerate(hits.to_pylist(), start=1)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(v.ljust(w) for v, w in zip(row, widths)), row[-1]]) for row in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_query(args.query)
        searcher = Searcher(args.embeddings, prompt=args.prompt, prompt_name=args.prompt_name, rerank_model=args.rerank_model)
        hits = searcher.search(args.query, args.k, exact=args.exact, rescore_multiplier=args.rescore_multiplier)
    except (*USER_ERRORS, SearchError) as e:
        return report(e)
    index = None if args.exact else searcher.index_info
    how = (
        "exact sparse dot product" if searcher.sparse
        else f"{index.kind} index ({index.rows} rows)" if index
        else "exact search" + ("" if args.exact else " (no index)")
    ) + (f", reranked by {args.rerank_model}" if args.rerank_model else "")
    print(f"top {hits.num_rows} for {args.query!r}, {how}:\n{render(hits, searcher.job.input.text_column)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
