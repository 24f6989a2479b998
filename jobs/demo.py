"""The full demo on real data, offline: ``python -m jobs.demo``.

1. shard the BBC News corpus (2,225 articles, 5 topics) into Parquet under data/bbc;
2. build the topic classifier from all-MiniLM-L6-v2 (skipped when already built);
3. embed every article (configs/bbc_embed.yaml) and score it (configs/bbc_classify.yaml);
4. build the ANN index next to the embeddings and run one example search;
5. draw the confusion matrix and a 2-D projection of the embeddings by topic;
6. print a one-screen summary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from jobs import argument_parser, bbc, log_to_stdout, make_classifier
from jobs.search import render
from pipeline import read_output
from pipeline import schema as S
from pipeline.config import load_config
from pipeline.index import build_index
from pipeline.run import run_job
from pipeline.search import Searcher

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
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
    ax.set_title("all-MiniLM-L6-v2 embeddings of BBC News (PCA)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


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

    print("1/5 sharding the BBC News corpus into data/bbc ...")
    bbc.prepare(Path("data/bbc"))
    print("2/5 building the topic classifier (cached after the first run; 2-5 minutes to build on 2 cores) ...")
    classifier = make_classifier.build_classifier(make_classifier.default_out_dir())
    info = classifier / make_classifier.INFO_FILE
    held_out = json.loads(info.read_text())["accuracy"]
    print(f"    {classifier}: held-out accuracy {held_out:.3f} (how it was trained: {info})")
    print("3/5 embedding and scoring every article on Ray (a progress line every 30 s when not on a terminal) ...")
    print("    Ray logs a line marked E about actor arguments in the object store: Ray Data's, harmless (README: Quick start)")
    print("    embedding: configs/bbc_embed.yaml")
    embed = run_job(load_config("configs/bbc_embed.yaml", args.overrides))
    print("    scoring: configs/bbc_classify.yaml")
    classify = run_job(load_config("configs/bbc_classify.yaml", args.overrides))

    print("4/5 building the ANN index and searching ...")
    index = build_index(embed["config"]["output"]["path"])
    searcher = Searcher(embed["config"]["output"]["path"])
    hits = searcher.search(QUERY, k=5)

    print("5/5 drawing plots ...")
    confusion_png = Path(classify["config"]["output"]["path"]) / "_confusion_matrix.png"
    projection_png = Path(embed["config"]["output"]["path"]) / "_projection.png"
    plot_confusion(classify["eval"], confusion_png)
    plot_projection(read_output(embed["config"]["output"]["path"], columns=["topic", S.EMBEDDING]), projection_png)

    print("\n" + summary([("embed", embed), ("classify", classify)]))
    print(f"accuracy: over every scored article, the classifier's training articles included (held-out: {held_out:.3f})")
    print(f"\nrejected rows (kept in _rejected/): {embed['rejected_by_reason']}; truncated: {embed['rows_truncated']}")
    print(f"index: {index.kind}, {index.rows} vectors, {embed['config']['output']['path']}/_index")
    print(f'\nsearch "{QUERY}":\n{render(hits, searcher.job.input.text_column)}')
    print(f"plots: {confusion_png}, {projection_png}")
    return 0


if __name__ == "__main__":
    log_to_stdout()
    raise SystemExit(main())
