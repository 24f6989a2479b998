"""Shared fixtures: one Ray session for the whole run, tiny random checkpoints per head.

Tiny checkpoints follow the Hugging Face testing convention: a real architecture with
random weights, built by ``save_pretrained`` so loading goes through the real code path.
"""

from __future__ import annotations

import functools
import os
import random
import string
import tempfile
from pathlib import Path

import pytest
from s3_server import DUMMY_AWS_ENV, s3_bucket, s3_proxy, s3_server  # noqa: F401

# Set before Ray starts so every worker inherits them: no network, a Hub cache tests control.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="hf-hub-cache-")
os.environ.update(DUMMY_AWS_ENV)  # Ray workers read S3 through the standard AWS chain
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one you "
    "were all we when there can been has more if no out do so what up who about into than them only some time "
    "new first could over after also made many then any people like these two may way should game film market "
    "company government minister election music band phone software growth shares win match player season "
    "club cup goal team bank economy sales profit labour party tory vote album star award award net mobile"
).split()


def build_vocab() -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(string.ascii_lowercase) + list(string.digits) + list(".,;:!?'\"()-&%$£")
    tokens += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    tokens += [w for w in dict.fromkeys(WORDS) if w not in tokens]
    return {t: i for i, t in enumerate(tokens)}


def make_tokenizer():
    from transformers import BertTokenizerFast

    # transformers 5 ignores vocab_file= silently (every token becomes [UNK]); pass vocab=.
    return BertTokenizerFast(vocab=build_vocab(), do_lower_case=True, model_max_length=64)


def tiny_bert_config(**kwargs):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(build_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        **kwargs,
    )


REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 64  # the tiny checkpoints' limit; many test rows are longer and get truncated


def sentence(rng: random.Random) -> str:
    """Mixed lengths: 1 to 120 words, so some rows exceed MAX_LENGTH tokens."""
    return " ".join(rng.choices(WORDS, k=rng.choice([rng.randint(1, 12), rng.randint(10, 40), rng.randint(60, 120)])))


@functools.cache
def _load(model_dir: Path, auto):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), auto.from_pretrained(model_dir).eval()


def forward(model_dir: Path, auto, text: str, pair: str | None = None):
    """Reference output: the model on one row at a time, no padding, no batching."""
    import torch

    tokenizer, model = _load(model_dir, auto)
    inputs = tokenizer(text, pair, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs, output_hidden_states=True), inputs


def text_shards(root: Path, shards: int, rows: int, empty_row: int, seed: int) -> Path:
    """``shards`` Parquet shards of ``rows`` mixed-length ``text`` rows (``sentence``) with a ``doc_id``
    '<shard>-<row>'; row ``empty_row`` of each is empty, so a run rejects it (``empty_text``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    for shard in range(shards):
        texts = [sentence(rng) for _ in range(rows)]
        texts[empty_row] = ""
        pq.write_table(pa.table({"doc_id": [f"{shard}-{i}" for i in range(rows)], "text": texts}), root / f"{shard}.parquet")
    return root


TOPICS = ["business", "entertainment", "politics", "sport", "tech"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
NLI_LABELS = ["contradiction", "neutral", "entailment"]  # the order of MNLI checkpoints (roberta-large-mnli)


def save_tiny(directory: Path, task: str, *, safe: bool = True, **config_kwargs) -> Path:
    """Build a tiny random BERT for ``task`` and ``save_pretrained`` it with its tokenizer."""
    import torch
    from transformers import (
        BertForMaskedLM,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertModel,
    )

    torch.manual_seed(0)
    if task == "sequence-classification":
        labels = TOPICS
        config = tiny_bert_config(id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)}, **config_kwargs)
        model = BertForSequenceClassification(config)
    elif task == "token-classification":
        config = tiny_bert_config(
            id2label=dict(enumerate(NER_LABELS)), label2id={l: i for i, l in enumerate(NER_LABELS)}, **config_kwargs
        )
        model = BertForTokenClassification(config)
    elif task == "zero-shot-classification":  # an NLI classifier
        # Weights spread wide: at the default 0.02 a random model scores every label within 1e-7 of the others,
        # so their order would be float noise; here scores differ by 1e-4 and more.
        config_kwargs.setdefault("initializer_range", 0.5)
        config = tiny_bert_config(
            id2label=dict(enumerate(NLI_LABELS)), label2id={l: i for i, l in enumerate(NLI_LABELS)}, **config_kwargs
        )
        model = BertForSequenceClassification(config)
    elif task == "question-answering":  # spread wide, like the NLI model: span scores differ far beyond float noise
        model = BertForQuestionAnswering(tiny_bert_config(**{"initializer_range": 0.5, **config_kwargs}))
    elif task == "rerank":  # a cross-encoder: one relevance logit
        model = BertForSequenceClassification(tiny_bert_config(num_labels=1, **config_kwargs))
    elif task == "sparse-embedding":  # SPLADE runs the MLM head
        model = BertForMaskedLM(tiny_bert_config(**config_kwargs))
    else:
        model = BertModel(tiny_bert_config(**config_kwargs))
    model.eval()
    model.save_pretrained(directory)
    if not safe:  # transformers 5 always saves safetensors; write the legacy pickle layout by hand
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    make_tokenizer().save_pretrained(directory)
    return directory


def copy_checkpoint(source: Path, target: Path, **files: str) -> Path:
    """A copy of the checkpoint ``source`` at ``target`` with ``files`` (name -> text) written into it."""
    import shutil

    shutil.copytree(source, target)
    for name, text in files.items():
        (target / name).write_text(text)
    return target


# One committed output per task, written this session by that task's own end-to-end test: test_tasks checks
# every registered task's declared fields on it instead of running the task once more (run alone, it runs one).
WRITTEN_OUTPUTS: dict[str, tuple[object, Path]] = {}


def record_output(cfg, output: Path | str) -> None:
    """Keep ``output``, committed by a run of ``cfg`` (a ``JobConfig``), as its task's example output."""
    WRITTEN_OUTPUTS.setdefault(cfg.model.task, (cfg, Path(output)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_tasks' check of every task's declared fields runs after the tasks' own modules have written outputs."""
    last = [item for item in items if getattr(item, "originalname", "") == "test_every_registered_task_writes_the_fields_it_declares"]
    items[:] = [item for item in items if item not in last] + last


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per task: {'sequence-classification': dir, 'token-classification': dir, ...}."""
    root = tmp_path_factory.mktemp("models")
    names = (
        "sequence-classification", "token-classification", "embedding", "rerank", "sparse-embedding",
        "zero-shot-classification", "question-answering",
    )  # fmt: skip
    return {task: save_tiny(root / task, task) for task in names}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs it (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class BbcEmbeddings:
    """all-MiniLM-L6-v2 over a stratified BBC subset with ``configs/bbc_embed.yaml``: one run per model.dtype,
    made when a test first asks for it (test_real_model compares them; test_search searches the bfloat16 one).

    ``articles``: 30 per topic, its 20 longest (truncated at 256 tokens) and its 10 shortest, all valid UTF-8;
    the shard ends with the corpus's one article that is not (``bad_article``), which every run quarantines
    (test_quarantine)."""

    def __init__(self, root: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from jobs.bbc import load_articles

        by_label: dict[str, list] = {}
        for article in load_articles():
            try:
                article.raw.decode("utf-8")
            except UnicodeDecodeError:
                self.bad_article = article
                continue
            by_label.setdefault(article.label, []).append(article)
        self.articles = []
        for group in by_label.values():
            group.sort(key=lambda a: len(a.raw), reverse=True)
            self.articles += group[:20] + group[-10:]
        self.root, self.shard = root, root / "bbc.parquet"
        rows = [*self.articles, self.bad_article]
        pq.write_table(
            pa.table({"doc_id": [a.doc_id for a in rows], "topic": [a.label for a in rows],
                      "text": pa.array([a.raw for a in rows], pa.binary())}),
            self.shard,
        )  # fmt: skip
        self.runs: dict[str, tuple[dict, Path]] = {}

    def run(self, dtype: str) -> tuple[dict, Path]:
        """(manifest, output directory) of the run in ``dtype``; a bfloat16 run's fidelity gate scores 64 rows."""
        if dtype not in self.runs:
            from pipeline.config import load_config
            from pipeline.run import run_job

            out = self.root / dtype
            overrides = [f"input.path={self.shard}", f"output.path={out}", f"model.dtype={dtype}", "model.fidelity_rows=64"]
            self.runs[dtype] = run_job(load_config(REPO / "configs" / "bbc_embed.yaml", overrides)), out
        return self.runs[dtype]


@pytest.fixture(scope="session")
def bbc_embeddings(tmp_path_factory, ray_session) -> BbcEmbeddings:
    return BbcEmbeddings(tmp_path_factory.mktemp("bbc-minilm"))


@pytest.fixture(scope="session")
def bbc_classifier(tmp_path_factory) -> Path:
    """The real topic classifier (MiniLM + a head trained on BBC News), built once per session."""
    from jobs import make_classifier

    return make_classifier.build_classifier(tmp_path_factory.mktemp("bbc") / "bbc-topic-minilm")
