"""The full demo on real data, offline: ``python -m jobs.demo``.

1. shard the BBC News corpus (2,225 articles, 5 topics) into Parquet under data/bbc, and save it as a
   Hugging Face ``datasets`` dataset under data/bbc_dataset (what configs/bbc_embed_dataset.yaml embeds);
2. build the topic classifier from all-MiniLM-L6-v2 (skipped when already built);
3. embed every article whole, in chunks of at most 256 tokens (configs/bbc_embed_chunks.yaml: one row per
   chunk, with its character span), and score it (configs/bbc_classify.yaml);
4. build the ANN index over the chunk rows and run one example search: each article once, quoting its best chunk;
5. draw the confusion matrix and a 2-D projection of the embeddings by topic;
6. print a one-screen summary.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from jobs import argument_parser, bbc, log_to_stdout, make_classifier
from jobs.search import render
from pipeline import read_output
from pipeline import schema as S
from pipeline.config import load_config
from pipeline.index import IndexInfo, build_index
from pipeline.run import run_job
from pipeline.search import Searcher

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
EMBED_CONFIG = "configs/bbc_embed_chunks.yaml"  # every article whole, one row per chunk
QUERY = "striker scores twice as the team wins the cup final"


def plot_confusion(evaluation: dict, path: Path) -> Figure:
    """Gold topic against predicted topic over every scored article. The classifier's head was trained on
    80% of them, so the accuracy in the title is not a held-out figure (that one is in training_info.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix, labels = np.array(evaluation["confusion_matrix"]), evaluation["labels"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(
        f"BBC topics: accuracy {evaluation['accuracy']:.3f} on all {int(matrix.sum())} articles\n"
        "(the classifier's training articles included)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_projection(table: pa.Table, path: Path) -> Figure:
    """First two principal components of the ``embedding`` column of ``table``, coloured by its gold ``topic``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vectors = np.stack(table[S.EMBEDDING].to_numpy(zero_copy_only=False))
    centred = vectors - vectors.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    explained = singular**2 / np.sum(singular**2)
    xy = centred @ components[:2].T
    labels = np.array(table["topic"].to_pylist())
    fig, ax = plt.subplots(figsize=(6, 5))
    for label in sorted(set(labels)):
        ax.scatter(*xy[labels == label].T, s=6, label=label, alpha=0.7)
    ax.legend(markerscale=3)
    ax.set_xlabel(f"PC1 ({explained[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.1%} of variance)")
    ax.set_title(f"all-MiniLM-L6-v2 embeddings of BBC News{' chunks' if S.CHUNK_INDEX in table.column_names else ''} (PCA)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def index_and_search(output_path: str, query: str = QUERY, k: int = 5) -> tuple[IndexInfo, Searcher, pa.Table]:
    """Build the ANN index of an embedding output, then search it as ``jobs.search`` does: the ``k`` best hits."""
    index = build_index(output_path)
    searcher = Searcher(output_path)
    return index, searcher, searcher.search(query, k=k)


def quote(hit: dict, width: int = 100) -> str:
    """The best hit of a search over chunk rows: its document, which chunk, the chunk's characters, and the
    chunk itself, quoted from the article (wrapped to ``width``)."""
    head = (
        f"best hit: {hit['doc_id']} ({hit['topic']}), score {hit[S.SCORE]:.4f}, chunk {hit[S.CHUNK_INDEX] + 1} of "
        f"{hit[S.NUM_CHUNKS]}, characters {hit[S.CHAR_START]}-{hit[S.CHAR_END]} of the article:"
    )
    body = textwrap.fill(" ".join(hit[S.CHUNK].split()), width, initial_indent='    "', subsequent_indent="     ",
                         break_long_words=False, break_on_hyphens=False)
    return f'{head}\n{body}"'


def summary(rows: list[tuple[str, dict]]) -> str:
    header = f"{'job':<14}{'rows in':>8}{'out':>7}{'rej':>5}{'rows/s':>9}{'tokens/s':>10}{'pad eff':>9}{'accuracy':>10}  output"
    lines = [header, "-" * len(header)]
    for name, m in rows:
        accuracy = f"{m['eval']['accuracy']:.4f}" if "eval" in m else "-"
        lines.append(
            f"{name:<14}{m['rows_in']:>8}{m['rows_out']:>7}{m['rows_rejected']:>5}{m['rows_per_s']:>9.1f}"
            f"{m['tokens_per_s']:>10.0f}{m['padding_efficiency']:>9.3f}{accuracy:>10}  {m['config']['output']['path']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("python -m jobs.demo", __doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of both jobs, e.g. --set model.dtype=bfloat16")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the shipped configs use paths relative to the repository

    print("1/5 sharding the BBC News corpus into data/bbc (and a datasets dataset, data/bbc_dataset) ...")
    bbc.prepare(Path("data/bbc"))
    bbc.prepare_dataset(Path("data/bbc_dataset"))
    print("2/5 building the topic classifier (cached after the first run; 2-5 minutes to build on 2 cores) ...")
    classifier = make_classifier.build_classifier(make_classifier.default_out_dir())
    info = classifier / make_classifier.INFO_FILE
    held_out = json.loads(info.read_text())["accuracy"]
    print(f"    {classifier}: held-out accuracy {held_out:.3f} (how it was trained: {info})")
    print("3/5 embedding and scoring every article on Ray (a progress line every 30 s when not on a terminal) ...")
    print("    Ray logs a line marked E about actor arguments in the object store: Ray Data's, harmless (README: Quick start)")
    print(f"    embedding every article in chunks: {EMBED_CONFIG}")
    embed = run_job(load_config(EMBED_CONFIG, args.overrides))
    print("    scoring: configs/bbc_classify.yaml")
    classify = run_job(load_config("configs/bbc_classify.yaml", args.overrides))

    print("4/5 building the ANN index over the chunks and searching ...")
    index, searcher, hits = index_and_search(embed["config"]["output"]["path"])

    print("5/5 drawing plots ...")
    confusion_png = Path(classify["config"]["output"]["path"]) / "_confusion_matrix.png"
    projection_png = Path(embed["config"]["output"]["path"]) / "_projection.png"
    plot_confusion(classify["eval"], confusion_png)
    plot_projection(read_output(embed["config"]["output"]["path"], columns=["topic", S.CHUNK_INDEX, S.EMBEDDING]),
                    projection_png)

    print("\n" + summary([("embed", embed), ("classify", classify)]))
    print(f"accuracy: over every scored article, the classifier's training articles included (held-out: {held_out:.3f})")
    print(f"\nrejected rows (kept in _rejected/): {embed['rejected_by_reason']}; "
          f"truncated: {classify['rows_truncated']} scored, {embed['rows_truncated']} embedded")
    print(f"chunks: {embed['chunks_out']} for {embed['documents_out']} articles, each at most 256 tokens")
    print(f"index: {index.kind}, {index.rows} chunk vectors, {embed['config']['output']['path']}/_index")
    print(f'\nsearch "{QUERY}" (each article once, with its best chunk):\n{render(hits, searcher.job.input.text_column)}')
    print(quote(hits.to_pylist()[0]))
    print(f"plots: {confusion_png}, {projection_png}")
    return 0


if __name__ == "__main__":
    log_to_stdout()
    raise SystemExit(main())
