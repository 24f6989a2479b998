"""Embeddings exactly as the checkpoint's authors intended: each sentence-transformers case through the real job.

Every case builds a tiny sentence-transformers checkpoint (``SentenceTransformer(modules=[...]).save(dir)``),
runs the Ray job on it with a config of only ``task: embedding`` and paths (plus the one setting a case is
about: a precision, an override), and compares the Parquet vectors with ``SentenceTransformer(dir)`` at the
same settings: cosine >= 0.9999, norms within 1e-4, the same dimension and dtype; binary bit for bit;
int8/uint8 within one bucket of sentence-transformers' own quantisation of the same rows. Each float case
also checks that the wrong chain (what the pipeline wrote before it read sentence-transformers configs)
would fail the bar, so no comparison passes by accident. Search is compared with a brute-force search over
sentence-transformers' vectors of the same documents and queries, prompts included.

Real runs are few (one per case of the issue's list; each costs seconds of actor start-up); every other
combination (each pooling mode with and without a prompt, Matryoshka, each precision) is checked in-process
through the same chain code (``test_every_combination_in_process``).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import MAX_LENGTH, WORDS, save_tiny
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from sentence_transformers.util.quantization import quantize_embeddings, semantic_search_faiss

from jobs import index as index_job
from jobs import run as run_cli
from jobs import search as search_job
from pipeline import read_output
from pipeline import schema as S
from pipeline.config import load_config
from pipeline.embedding import dequantize
from pipeline.run import run_job
from pipeline.search import Searcher

ROWS = 30
QUERIES = ["the team won the cup final match", "shares and profit of the bank", "music album award for the band"]
COSINE_BAR = 0.9999



# ---- checkpoints and data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Mixed lengths, a third longer than the checkpoints' 64 tokens (truncation keeps the prompt)."""
    rng = random.Random(12)
    return [" ".join(rng.choices(WORDS, k=rng.choice([rng.randint(1, 8), rng.randint(10, 40), rng.randint(60, 100)])))
            for _ in range(ROWS)]  # fmt: skip


@pytest.fixture(scope="module")
def shard(texts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fidelity") / "docs.parquet"
    pq.write_table(pa.table({"doc_id": [f"d{i:02d}" for i in range(ROWS)], "text": texts}), path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny BERT every encoder checkpoint wraps (random weights, its WordPiece tokenizer, 64 tokens)."""
    return save_tiny(tmp_path_factory.mktemp("bert") / "bert", "embedding")


def save_st(directory: Path, model_dir: Path, pooling, *after, **kwargs) -> Path:
    """``SentenceTransformer(modules=[Transformer, Pooling(pooling), *after], **kwargs).save(directory)``;
    ``after`` holds module factories taking the pooled width."""
    transformer = Transformer(str(model_dir))
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), **pooling)]
    width = modules[1].get_embedding_dimension()
    for make in after:
        modules.append(make(width))
        width = modules[-1].get_embedding_dimension() if isinstance(modules[-1], Dense) else width
    torch.manual_seed(1)  # Dense weights
    for module in modules[2:]:
        if isinstance(module, Dense):
            torch.nn.init.normal_(module.linear.weight, std=0.3)
    SentenceTransformer(modules=modules, device="cpu", **kwargs).save(str(directory))
    return directory


def normalize(width: int) -> Normalize:
    return Normalize()


@pytest.fixture(scope="module")
def checkpoints(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st")
    prompts = {"query": "query: ", "document": "passage: "}
    return {
        "cls": save_st(root / "cls", base, {"pooling_mode": "cls"}, normalize),
        "mean": save_st(root / "mean", base, {"pooling_mode": "mean"}),
        "max": save_st(root / "max", base, {"pooling_mode": "max"}),
        "dense": save_st(root / "dense", base, {"pooling_mode": "weightedmean"},
                         lambda w: Dense(w, 16, activation_function=torch.nn.GELU()), normalize),
        "prompts": save_st(root / "prompts", base, {"pooling_mode": "mean"}, normalize, prompts=prompts,
                           default_prompt_name="document"),
        # INSTRUCTOR-like prompts excluded from pooling, three modes concatenated, Matryoshka 72 of 96
        "instructor": save_st(root / "instructor", base,
                              {"pooling_mode": ("cls", "mean_sqrt_len_tokens", "lasttoken"), "include_prompt": False},
                              normalize, prompts={"query": "Represent the question: ", "document": "Represent the news article: "},
                              truncate_dim=72),
    }


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    """A tiny random Qwen3 with a byte-level BPE trained here, its post-processor appending the EOS token
    and padding on the left (the Qwen3-Embedding layout), wrapped with last-token pooling, Normalize and
    an instruction prompt for queries (an empty one for documents)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    root = tmp_path_factory.mktemp("qwen")
    rng = random.Random(0)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        [" ".join(rng.choices(WORDS, k=20)) for _ in range(300)],
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    eos = tokenizer.token_to_id("<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left", model_max_length=MAX_LENGTH)  # fmt: skip
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         eos_token_id=eos, pad_token_id=eos, architectures=["Qwen3ForCausalLM"])  # fmt: skip
    Qwen3Model(config).eval().save_pretrained(root / "qwen3")
    fast.save_pretrained(root / "qwen3")
    prompts = {"query": "Instruct: Given a news headline, find the article\nQuery:", "document": ""}
    return save_st(root / "st", root / "qwen3", {"pooling_mode": "lasttoken"}, normalize, prompts=prompts)


def job_config(shard: Path, model: Path, out: Path, **embedding) -> dict:
    """Paths and ``task: embedding``; ``embedding``: the output.embedding keys a case is about."""
    raw = {
        "input": {"path": str(shard), "id_columns": ["doc_id"]},
        "model": {"path": str(model), "task": "embedding"},
        "output": {"path": str(out)},
    }
    if embedding:
        raw["output"]["embedding"] = embedding
    return raw


def run(shard: Path, model: Path, out: Path, **embedding) -> tuple[np.ndarray, dict, pa.Schema]:
    """The job's vectors in input order, its manifest and its Parquet schema."""
    manifest = run_job(load_config(raw=job_config(shard, model, out, **embedding)))
    assert manifest["rows_out"] == ROWS and manifest["rows_truncated"] > 0
    table = read_output(str(out)).sort_by("doc_id")
    schema = pq.read_schema(out / next(iter(manifest["files"])))
    return np.stack(table[S.EMBEDDING].to_numpy(zero_copy_only=False)), manifest, schema


def reference(model: Path, texts: list[str], **kwargs) -> np.ndarray:
    """``SentenceTransformer(model).encode_document(texts, **kwargs)``."""
    return SentenceTransformer(str(model), device="cpu").encode_document(texts, batch_size=8, **kwargs)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_same_vectors(got: np.ndarray, want: np.ndarray, record_property=None, name: str = "") -> float:
    """The fidelity bar: same shape and dtype, cosine >= 0.9999, norms within 1e-4; the minimum cosine."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    cos = cosines(got, want)
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), np.linalg.norm(want.astype(np.float64), axis=1), rtol=1e-4)
    assert cos.min() >= COSINE_BAR, cos.min()
    if record_property:
        record_property(f"min_cosine_{name}", float(cos.min()))
    print(f"{name}: min cosine {cos.min():.7f} over {len(cos)} rows, {got.shape[1]} dims")
    return float(cos.min())


def assert_would_fail(wrong: np.ndarray, want: np.ndarray) -> None:
    """The comparison can fail: ``wrong`` (e.g. the chain the pipeline used to apply) misses the bar by
    its shape, a norm or a cosine."""
    if wrong.shape == want.shape:
        norms = np.abs(np.linalg.norm(wrong, axis=1) / np.linalg.norm(want, axis=1) - 1).max()
        assert cosines(wrong, want).min() < COSINE_BAR or norms > 1e-4


def mean_normalized(model: Path, texts: list[str], prompt: str = "") -> np.ndarray:
    """What the pipeline wrote for every checkpoint before: mean pooling, normalised, no prompt."""
    transformer = Transformer(str(model))
    plain = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()], device="cpu")
    return plain.encode([prompt + t for t in texts])


def top10(scores: np.ndarray, ids: list[str]) -> list[list[str]]:
    return [[ids[i] for i in np.argsort(-row, kind="stable")[:10]] for row in scores]


def searched(output: Path, queries: list[str], **kwargs) -> dict[bool, list[list[str]]]:
    """Top-10 doc ids per query from ``Searcher`` over the built index and exactly."""
    assert index_job.main(["--embeddings", str(output)]) == 0
    searcher = Searcher(str(output), **{k: v for k, v in kwargs.items() if k in ("prompt", "prompt_name")})
    return {
        exact: [searcher.search(q, k=10, exact=exact)["doc_id"].to_pylist() for q in queries] for exact in (False, True)
    }


# ---- the cases, each a real run ---------------------------------------------------------------------


def test_cls_pooling_with_normalize(checkpoints, shard, texts, tmp_path, ray_session, record_property):
    got, manifest, schema = run(shard, checkpoints["cls"], tmp_path / "out")
    want = reference(checkpoints["cls"], texts)
    assert_same_vectors(got, want, record_property, "cls+Normalize")
    assert_would_fail(mean_normalized(checkpoints["cls"], texts), want)
    assert schema.field(S.EMBEDDING).type == pa.list_(pa.float32(), 32)
    metadata = json.loads(schema.metadata[S.METADATA_KEY])
    assert (metadata["pooling"], metadata["normalize"], metadata["precision"]) == ("cls", True, "float32")
    assert "pooling cls (checkpoint 1_Pooling/config.json), include_prompt true (checkpoint 1_Pooling/config.json)" in metadata["embedding_chain"]
    assert manifest["model"]["embedding_chain"] == metadata["embedding_chain"]


def test_mean_pooling_without_normalize_keeps_the_norms(checkpoints, shard, texts, tmp_path, ray_session, record_property):
    got, _, schema = run(shard, checkpoints["mean"], tmp_path / "out")
    want = reference(checkpoints["mean"], texts)
    assert np.linalg.norm(want, axis=1).min() > 1.5  # not unit vectors: normalising would be wrong
    assert_same_vectors(got, want, record_property, "mean, no Normalize")
    assert_would_fail(mean_normalized(checkpoints["mean"], texts), want)
    assert json.loads(schema.metadata[S.METADATA_KEY])["normalize"] is False


def test_max_pooling_at_int8_with_ranges_fixed_before_the_run(checkpoints, shard, texts, tmp_path, ray_session, record_property):
    got, manifest, schema = run(shard, checkpoints["max"], tmp_path / "out", precision="int8")
    floats = reference(checkpoints["max"], texts)
    assert_would_fail(mean_normalized(checkpoints["max"], texts), floats)
    # calibration_rows (1000) >= the 30 rows: the ranges come from every row, as encode(precision="int8") computes them
    ranges = np.asarray(json.loads(schema.metadata[S.METADATA_KEY])["quantization_ranges"], dtype=np.float32)
    np.testing.assert_allclose(ranges, np.vstack([floats.min(axis=0), floats.max(axis=0)]), atol=1e-5)
    want = reference(checkpoints["max"], texts, precision="int8")
    assert got.dtype == want.dtype == np.int8 and got.shape == want.shape == (ROWS, 32)
    assert schema.field(S.EMBEDDING).type == pa.list_(pa.int8(), 32)
    assert np.abs(got.astype(int) - want).max() <= 1
    same = float((got == want).mean())
    assert same >= 0.99, same  # only values on a bucket edge may land one bucket over (float rounding)
    assert (got == quantize_embeddings(floats, "int8", ranges=ranges)).mean() >= 0.99
    record_property("int8_equal_fraction", same)
    print(f"int8: {same:.4f} of values equal to sentence-transformers', the rest one bucket away")
    assert manifest["model"]["quantization_ranges"] == json.loads(schema.metadata[S.METADATA_KEY])["quantization_ranges"]
    # search: cosine of the float query to the dequantised vectors, as a brute force over sentence-transformers' int8
    model = SentenceTransformer(str(checkpoints["max"]), device="cpu")
    brute = cosines_matrix(model.encode_query(QUERIES), dequantize(want, "int8", ranges))
    hits = searched(tmp_path / "out", QUERIES)
    assert hits[False] == hits[True] == top10(brute, [f"d{i:02d}" for i in range(ROWS)])


def cosines_matrix(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return queries @ (docs / np.linalg.norm(docs, axis=1, keepdims=True)).T


def test_weightedmean_dense_with_activation_and_normalize(checkpoints, shard, texts, tmp_path, ray_session, record_property):
    got, _, schema = run(shard, checkpoints["dense"], tmp_path / "out")
    want = reference(checkpoints["dense"], texts)
    assert_same_vectors(got, want, record_property, "weightedmean+Dense(GELU)+Normalize")
    assert got.shape[1] == 16 and schema.field(S.EMBEDDING).type.list_size == 16  # the old chain gave 32
    chain = json.loads(schema.metadata[S.METADATA_KEY])["embedding_chain"]
    assert "Dense 32 -> 16, GELU (checkpoint 2_Dense)" in chain and "normalize true (checkpoint 3_Normalize)" in chain


def test_document_prompt_by_default_and_query_prompt_in_search(checkpoints, shard, texts, tmp_path, ray_session, record_property, capsys):
    got, _, schema = run(shard, checkpoints["prompts"], tmp_path / "out")
    want = reference(checkpoints["prompts"], texts)  # encode_document: the "document" prompt
    assert_same_vectors(got, want, record_property, "prompts")
    assert_would_fail(mean_normalized(checkpoints["prompts"], texts), want)  # no prompt: cosine ~0.97
    metadata = json.loads(schema.metadata[S.METADATA_KEY])
    assert (metadata["prompt"], metadata["query_prompt"]) == ("passage: ", "query: ")

    model = SentenceTransformer(str(checkpoints["prompts"]), device="cpu")
    ids = [f"d{i:02d}" for i in range(ROWS)]
    hits = searched(tmp_path / "out", QUERIES)
    assert hits[False] == hits[True] == top10(cosines_matrix(model.encode_query(QUERIES), want), ids)
    assert hits[True] != top10(cosines_matrix(model.encode(QUERIES), want), ids)  # the query prompt matters
    # another named prompt of the checkpoint, from the CLI
    capsys.readouterr()
    assert search_job.main(["--embeddings", str(tmp_path / "out"), "--query", QUERIES[0], "--prompt-name", "document", "--exact"]) == 0
    printed = [line.split()[2] for line in capsys.readouterr().out.splitlines()[2:]]
    assert printed == top10(cosines_matrix(model.encode(QUERIES[:1], prompt_name="document"), want), ids)[0]
    assert search_job.main(["--embeddings", str(tmp_path / "out"), "--query", "x", "--prompt-name", "nope"]) == 2
    assert "'nope' is not one of" in capsys.readouterr().err


def test_prompt_excluded_from_concatenated_modes_matryoshka_at_float16(checkpoints, shard, texts, tmp_path, ray_session, record_property):
    """include_prompt false, as INSTRUCTOR: the prompt's tokens are attended to but not pooled (cls then
    takes the first token after the prompt); cls, mean_sqrt_len_tokens and lasttoken concatenated; the
    checkpoint's truncate_dim keeps 72 of the 96 dims, re-normalised (encode(..., normalize_embeddings=True))."""
    got, _, schema = run(shard, checkpoints["instructor"], tmp_path / "out", precision="float16")
    floats = reference(checkpoints["instructor"], texts, normalize_embeddings=True)
    want = floats.astype(np.float16)
    assert want.shape == (ROWS, 72)
    assert_same_vectors(got, want, record_property, "include_prompt false, cls+mean_sqrt_len_tokens+lasttoken, 72 of 96, float16")
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float32), axis=1), 1.0, rtol=1e-3)
    for part in (slice(0, 32), slice(32, 64), slice(64, 72)):  # each mode on its own
        assert cosines(got[:, part], want[:, part]).min() >= COSINE_BAR
    model = SentenceTransformer(str(checkpoints["instructor"]), device="cpu")
    model.set_pooling_include_prompt(True)
    assert_would_fail(model.encode_document(texts, normalize_embeddings=True)[:, :32], floats[:, :32])
    assert schema.field(S.EMBEDDING).type == pa.list_(pa.float16(), 72)
    chain = json.loads(schema.metadata[S.METADATA_KEY])["embedding_chain"]
    assert "include_prompt false (checkpoint 1_Pooling/config.json)" in chain[1]
    assert "dimensions 72 of 96 (checkpoint config_sentence_transformers.json truncate_dim), re-normalised" in chain


def test_decoder_with_last_token_pooling(decoder, shard, texts, tmp_path, ray_session, record_property):
    """Qwen3 layout: EOS appended by the tokenizer, padded on the left by sentence-transformers and on the
    right by the model actors (causal attention and rotary positions make both equal), instruction prompt
    for queries only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(decoder)
    assert tokenizer(texts[0])["input_ids"][-1] == tokenizer.eos_token_id and tokenizer.padding_side == "left"
    got, _, schema = run(shard, decoder, tmp_path / "out")
    want = reference(decoder, texts)  # batch_size 8: left-padded batches of mixed lengths
    assert_same_vectors(got, want, record_property, "Qwen3 decoder, lasttoken")
    assert_would_fail(mean_normalized(decoder, texts), want)
    model = SentenceTransformer(str(decoder), device="cpu")
    ids = [f"d{i:02d}" for i in range(ROWS)]
    hits = searched(tmp_path / "out", QUERIES)
    assert hits[False] == hits[True] == top10(cosines_matrix(model.encode_query(QUERIES), want), ids)
    metadata = json.loads(schema.metadata[S.METADATA_KEY])
    assert metadata["pooling"] == "lasttoken" and metadata["query_prompt"].startswith("Instruct:")


def run_packed(shard: Path, model: Path, out: Path, texts: list[str], precision: str) -> np.ndarray:
    """A binary / ubinary run: bit for bit sentence-transformers' vectors, in its dtype and shape."""
    got, _, schema = run(shard, model, out, precision=precision)
    want = reference(model, texts, precision=precision)
    dtype = np.int8 if precision == "binary" else np.uint8
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == (ROWS, 4)  # 32 bits, 8 per byte
    assert schema.field(S.EMBEDDING).type == pa.list_(pa.from_numpy_dtype(dtype), 4)
    np.testing.assert_array_equal(got, want)
    return want


def test_ubinary_bit_identical_and_hamming_search_with_rescoring(checkpoints, shard, texts, tmp_path, ray_session):
    want = run_packed(shard, checkpoints["cls"], tmp_path / "out", texts, "ubinary")
    # sentence-transformers' documented search: Hamming top k x 4 (here every row), rescored with the float query
    model = SentenceTransformer(str(checkpoints["cls"]), device="cpu")
    expected, _ = semantic_search_faiss(model.encode_query(QUERIES), corpus_embeddings=want, corpus_precision="ubinary",
                                        top_k=10, rescore_multiplier=4)  # fmt: skip
    hits = searched(tmp_path / "out", QUERIES)
    assert hits[False] == hits[True] == [[f"d{h['corpus_id']:02d}" for h in found] for found in expected]
    info = json.loads((tmp_path / "out" / S.INDEX_DIR / "index.json").read_text())
    assert (info["kind"], info["metric"], info["dim"]) == ("binary-flat", "hamming", 32)
    # without rescoring: the 10 nearest by Hamming distance (ties in any order), scored 1 - 2 x distance / bits
    query_bits = quantize_embeddings(model.encode_query(QUERIES), "ubinary")
    distances = np.unpackbits(query_bits[:, None, :] ^ want[None, :, :], axis=2).sum(axis=2)
    searcher = Searcher(str(tmp_path / "out"))
    for q, query in enumerate(QUERIES):
        for exact in (False, True):
            hits = searcher.search(query, k=10, exact=exact, rescore_multiplier=0)
            found = distances[q, [int(d[1:]) for d in hits["doc_id"].to_pylist()]]
            assert sorted(found) == sorted(distances[q])[:10]
            np.testing.assert_allclose(hits[S.SCORE].to_numpy(), 1 - 2 * found / 32, rtol=1e-6)


def test_binary_bit_identical(checkpoints, shard, texts, tmp_path, ray_session):
    run_packed(shard, checkpoints["mean"], tmp_path / "out", texts, "binary")


def test_explicit_pooling_overrides_the_checkpoint_at_uint8(checkpoints, base, shard, texts, tmp_path, ray_session, capsys):
    """A CLS checkpoint with output.embedding.pooling: mean gives mean vectors; dry-run says so."""
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(job_config(shard, checkpoints["cls"], tmp_path / "out", pooling="mean", precision="uint8")))
    assert run_cli.main(["--config", str(config), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "pooling mean (config), include_prompt true (checkpoint 1_Pooling/config.json)" in plan
    assert "normalize true (checkpoint 2_Normalize)" in plan and "precision uint8 (config)" in plan
    got, _, _ = run(shard, checkpoints["cls"], tmp_path / "out", pooling="mean", precision="uint8")
    floats = mean_normalized(checkpoints["cls"], texts)  # the same Transformer, mean pooling, Normalize
    want = quantize_embeddings(floats, "uint8")  # ranges from these rows, as the job's calibration
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.abs(got.astype(int) - want).max() <= 1 and (got == want).mean() >= 0.99
    assert_would_fail(reference(checkpoints["cls"], texts), floats)


# ---- every combination, in-process through the same chain code -----------------------------------------------


class InProcess:
    """The job's task for one checkpoint, its head applied to a forward pass as a model actor does it
    (right padding, one batch): the chain code of the real run, without Ray."""

    def __init__(self, model: Path):
        from pipeline.checkpoint import resolve

        self.path = model
        cfg = load_config(raw=job_config(Path("unused"), model, Path("unused")))
        self.resolved = resolve(cfg.model, cfg.storage)
        self.forwards: dict[tuple, tuple] = {}

    def __call__(self, texts: list[str], **embedding) -> np.ndarray:
        from pipeline.tasks import build

        task = build(load_config(raw=job_config(Path("unused"), self.path, Path("unused"), **embedding)), self.resolved)
        if task.calibration():
            _, probe = task.calibration()
            task = task.calibrated({S.EMBEDDING: self.head(probe, texts)})
        return self.head(task, texts)

    def head(self, task, texts: list[str]) -> np.ndarray:
        from pipeline.checkpoint import actor_tokenizer, load_model
        from pipeline.tasks import ModelBatch, Windows

        key = (task.tokenization, tuple(texts))
        if key not in self.forwards:
            tokenizer = actor_tokenizer(self.resolved, lowercase=task.tokenization.lowercase)
            tokenizer.padding_side = "right"
            encoded = tokenizer([task.tokenization.prompt + t for t in texts], truncation=True,
                                max_length=self.resolved.max_length, padding=True, return_tensors="pt")  # fmt: skip
            with torch.inference_mode():
                outputs = load_model(self.resolved, task, "cpu", "float32")(**dict(encoded))
            self.forwards[key] = outputs, ModelBatch(dict(encoded))
        outputs, batch = self.forwards[key]
        with torch.inference_mode():
            columns = task.head(outputs, batch)
        # One sequence per row: reduce stores the vectors in the chain's precision, as the model actor does.
        lengths = batch.attention_mask.sum(dim=1).numpy()
        return task.reduce(columns, Windows(np.arange(len(lengths)), lengths, None, None))[1][S.EMBEDDING]


def embed_in_process(model: Path, texts: list[str], **embedding) -> np.ndarray:
    return InProcess(model)(texts, **embedding)


MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", ("max", "cls", "weightedmean")]


@pytest.mark.parametrize("pooling", MODES, ids=lambda m: "+".join(m) if isinstance(m, tuple) else m)
def test_every_combination_in_process(pooling, base, texts, tmp_path):
    """Each pooling mode (and a concatenation) x include_prompt x normalize x Matryoshka x precision."""
    prompts = {"query": "find: ", "document": "a news article: "}
    for include_prompt in (True, False):
        model = save_st(tmp_path / f"m{include_prompt}", base, {"pooling_mode": pooling, "include_prompt": include_prompt},
                        prompts=prompts, default_prompt_name="document")  # fmt: skip
        st_model, ours = SentenceTransformer(str(model), device="cpu"), InProcess(model)
        assert_same_vectors(ours(texts), st_model.encode_document(texts))
        for normalize_, dims in ((True, None), (True, 8), (False, 8)):
            got = ours(texts, normalize=normalize_, dimensions=dims)
            assert_same_vectors(got, st_model.encode_document(texts, truncate_dim=dims, normalize_embeddings=normalize_))
        floats = st_model.encode_document(texts, truncate_dim=8, normalize_embeddings=True)
        for precision in ("int8", "uint8", "binary", "ubinary"):
            got = ours(texts, normalize=True, dimensions=8, precision=precision)
            expected = quantize_embeddings(floats, precision)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert np.abs(got.astype(int) - expected).max() <= (1 if precision.endswith("int8") else 0), precision


def test_legacy_pooling_flags_and_lowercasing(texts, tmp_path):
    """A sentence-transformers 2.x checkpoint: per-mode pooling flags, max_seq_length and do_lower_case in
    sentence_bert_config.json, old module type names; its tokenizer is cased, so only do_lower_case
    lowercases the upper-case texts."""
    from conftest import build_vocab
    from transformers import BertTokenizerFast

    cased = save_tiny(tmp_path / "cased", "embedding")
    BertTokenizerFast(vocab=build_vocab(), do_lower_case=False, model_max_length=MAX_LENGTH).save_pretrained(cased)
    model = save_st(tmp_path / "legacy", cased, {"pooling_mode": ("cls", "mean")}, normalize)
    (model / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))  # fmt: skip
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": True}))
    modules = json.loads((model / "modules.json").read_text())
    for module, name in zip(modules, ("Transformer", "Pooling", "Normalize")):
        module["type"] = f"sentence_transformers.models.{name}"
    (model / "modules.json").write_text(json.dumps(modules))
    upper = [t.upper() for t in texts]
    want = SentenceTransformer(str(model), device="cpu").encode(upper)
    assert_same_vectors(embed_in_process(model, upper), want)
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    assert_would_fail(embed_in_process(model, upper), want)


# ---- what cannot be reproduced is refused before anything starts ---------------------------------------------


TEXT_MODALITY = {"method": "forward", "method_output_name": "last_hidden_state"}
REFUSED = {
    "a Router": ("modules", "sentence_transformers.base.modules.router.Router", "Router"),
    "a StaticEmbedding": ("modules", "sentence_transformers.sentence_transformer.modules.StaticEmbedding", "StaticEmbedding"),
    "a CNN": ("modules", "sentence_transformers.models.CNN", "CNN"),
    "an LSTM": ("modules", "sentence_transformers.models.LSTM", "LSTM"),
    "WordWeights": ("modules", "sentence_transformers.models.WordWeights", "WordWeights"),
    "custom code": ("modules", "my_package.MyPooling", "my_package.MyPooling"),
    "a pooling option": ("pooling", {"embedding_dimension": 32, "pooling_mode": "mean", "pooling_mode_attention": True}, "pooling_mode_attention"),
    "a pooling mode": ("pooling", {"embedding_dimension": 32, "pooling_mode": "attention"}, "'attention'"),
    "a chat template": ("transformer", {"modality_config": {"text": TEXT_MODALITY, "message": TEXT_MODALITY}}, "chat template"),
    "query expansion": ("transformer", {"query_expansion": {"length": 32}}, "query_expansion"),
    "an untrusted activation": ("dense", {"activation_function": "my_package.Swish"}, "'my_package.Swish'"),
    "a sparse encoder": ("model", {"model_type": "SparseEncoder"}, "SparseEncoder"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_be_reproduced_is_refused_in_the_dry_run(case, checkpoints, shard, tmp_path, capsys):
    where, value, named = REFUSED[case]
    model = tmp_path / "model"
    shutil.copytree(checkpoints["dense"], model)
    if where == "modules":
        modules = json.loads((model / "modules.json").read_text())
        modules.insert(2, {"idx": 2, "name": "x", "path": "x", "type": value})
        for i, module in enumerate(modules):
            module["idx"] = i
        (model / "modules.json").write_text(json.dumps(modules))
    else:
        file = {"pooling": "1_Pooling/config.json", "transformer": "sentence_bert_config.json",
                "dense": "2_Dense/config.json", "model": "config_sentence_transformers.json"}[where]  # fmt: skip
        config = json.loads((model / file).read_text())
        (model / file).write_text(json.dumps(value if where == "pooling" else {**config, **value}))
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(job_config(shard, model, tmp_path / "out")))
    assert run_cli.main(["--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_settings_that_do_not_fit_the_chain_are_refused(checkpoints, shard, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    for embedding, message in [
        ({"pooling": ["cls", "mean"]}, "gives 64 dims, but the checkpoint's Dense 32 -> 16"),
        ({"dimensions": 17}, "dimensions 17 is more than the 16 dims"),
    ]:
        config.write_text(json.dumps(job_config(shard, checkpoints["dense"], tmp_path / "out", **embedding)))
        assert run_cli.main(["--config", str(config), "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    raw = job_config(shard, checkpoints["prompts"], tmp_path / "out")
    raw["input"]["prompt_name"] = "summary"
    config.write_text(json.dumps(raw))
    assert run_cli.main(["--config", str(config), "--dry-run"]) == 2
    assert "input.prompt_name 'summary' is not a prompt of" in capsys.readouterr().err
    raw["input"]["prompt"] = "x: "
    config.write_text(json.dumps(raw))
    assert run_cli.main(["--config", str(config), "--dry-run"]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_change_of_chain_changes_the_output_version(checkpoints, tmp_path):
    """The nightly version (model fingerprint + config hash) moves with the chain: the checkpoint's
    sentence-transformers files are part of its content hash, explicit settings part of the config's."""
    from pipeline.checkpoint import resolve

    raw = job_config(Path("in"), checkpoints["cls"], Path("out"))
    cfg = load_config(raw=raw)
    changed = tmp_path / "changed"
    shutil.copytree(checkpoints["cls"], changed)
    (changed / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "mean"}))
    assert resolve(cfg.model, cfg.storage).fingerprint != resolve(load_config(raw=job_config(Path("in"), changed, Path("out"))).model, cfg.storage).fingerprint
    fingerprints = {load_config(raw=job_config(Path("in"), checkpoints["cls"], Path("out"), **e)).fingerprint()
                    for e in ({}, {"pooling": "mean"}, {"precision": "int8"}, {"dimensions": 8})}  # fmt: skip
    raw["input"]["prompt"] = "x: "
    fingerprints.add(load_config(raw=raw).fingerprint())
    assert len(fingerprints) == 5 and cfg.fingerprint() in fingerprints
