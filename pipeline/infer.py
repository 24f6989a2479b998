"""Stage 3, infer: actors that each hold exactly one ``AutoModelFor*``.

Per call (``inference.batch_size`` rows) an actor takes the valid rows' model sequences (one per
row unless the task makes several: ``pipeline.tasks.base``), sorts them by length, cuts
them into micro-batches that fit ``inference.max_tokens_per_batch`` (rows x padded
length) and waste little padding (``inference.min_padding_efficiency``), pads each
only to its own longest row, runs the model under
``torch.inference_mode()``, turns outputs into the task's columns with its head (reduced on the
device), restores the original order and lets the task reduce each row's sequences to its output
rows (``Task.reduce``). Only output columns leave the actor, never hidden
states. On CUDA OOM a micro-batch is split in two and retried.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import schema as S
from pipeline.backends import OpenVINOModel
from pipeline.checkpoint import ResolvedModel, compute_dtype, load_model
from pipeline.config import FaultConfig, InferenceConfig
from pipeline.progress import register
from pipeline.tasks import Columns, ModelBatch, Task, Windows

CONSUMED = (S.INPUT_IDS, S.TOKEN_TYPE_IDS, S.OFFSETS, S.SPANS, S.TEXT, S.TEXT_PAIR)


def micro_batches(sorted_lengths: np.ndarray, max_tokens: int, min_efficiency: float) -> Iterator[slice]:
    """Slices of rows sorted by descending length, each padded only to its first (longest) row.

    A micro-batch grows while its padded size (rows x longest) fits ``max_tokens`` and
    its padding efficiency (real / padded tokens) stays >= ``min_efficiency``. A single
    row longer than the budget still forms its own micro-batch.
    """
    start, n = 0, len(sorted_lengths)
    while start < n:
        width = max(1, int(sorted_lengths[start]))
        window = sorted_lengths[start : min(n, start + max(1, max_tokens // width))]
        # Rows are sorted, so the running efficiency only falls: the micro-batch ends where it first drops.
        real = np.cumsum(window) + (width - window[0])
        fits = real >= min_efficiency * width * np.arange(1, len(window) + 1)
        stop = start + (len(window) if fits.all() else max(1, int(np.argmin(fits))))
        yield slice(start, stop)
        start = stop


# On CPU, bigger micro-batches stop paying off long before memory matters, and past 4096 tokens
# (25 MiB of FFN activations for MiniLM in fp32) their activations outgrow what glibc will keep
# mapped between batches (see keep_freed_memory): 16384 ran 10-15% slower here.
CPU_TOKEN_BUDGET = 4096


def token_budget(config, max_length: int, free_bytes: int | None, element_bytes: int) -> int:
    """Tokens per forward pass that fit in ``free_bytes`` (None: CPU default).

    Peak activation memory per token in one encoder layer, inference only: hidden states,
    Q/K/V/output projections and the FFN intermediate, plus one attention-score row per
    head; half the free memory is used, the rest is headroom for the allocator.
    """
    if free_bytes is None:
        return CPU_TOKEN_BUDGET
    per_token = (6 * config.hidden_size + config.intermediate_size + config.num_attention_heads * max_length) * element_bytes
    return int(min(1 << 20, max(max_length, free_bytes // 2 // per_token)))


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed activation memory instead of handing it back to the OS.

    A CPU forward pass allocates and frees its activations for every micro-batch. By default
    glibc unmaps blocks above a moving mmap threshold and trims the top of the heap, so the
    next micro-batch page-faults fresh zeroed pages in: 12% of CPU time went to the kernel
    here. A fixed 32 MiB mmap threshold (glibc's maximum; MiniLM's largest activation in a
    CPU_TOKEN_BUDGET micro-batch is 25 MiB) and a 1 GiB trim threshold keep those pages for
    reuse. Process-wide; returns False where the C library is not glibc (nothing changes).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def ragged_rows(array: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list array, so row ``i`` is ``flat[offsets[i]:offsets[i + 1]]``."""
    offsets = array.offsets.to_numpy()
    return array.values.to_numpy(zero_copy_only=False), offsets


def sequences(batch: pa.Table) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The model sequences of a call's rows (``Task.encode``): the row each belongs to, and each per-sequence
    column as ``ragged_rows``, indexed by sequence. Rejected rows have none."""
    per_row = pc.fill_null(pc.list_value_length(batch[S.INPUT_IDS]), 0).to_numpy()
    row_of = np.repeat(np.arange(batch.num_rows), per_row)
    names = (S.INPUT_IDS, S.TOKEN_TYPE_IDS, S.OFFSETS, S.SPANS)
    return row_of, {c: ragged_rows(batch[c].combine_chunks().flatten()) for c in names if c in batch.column_names}


def padded_positions(offsets: np.ndarray, picked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, index) for rows ``picked`` of a ragged column, right-padded to the longest of them: ``mask`` is
    (rows, longest), true at real tokens; ``index`` is, for each true entry in row-major order, the position of
    its value in the column's flat values. ``padded[mask] = flat[index]`` then pads in one vectorised step."""
    starts = offsets[picked]
    lengths = offsets[picked + 1] - starts
    mask = np.arange(lengths.max()) < lengths[:, None]
    before = np.cumsum(lengths) - lengths  # real tokens of the earlier picked rows
    return mask, np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))


class CallOutputs:
    """The head's columns for the sequences of one model call, filled micro-batch by micro-batch at the
    sequences' positions in the call (``columns``: what ``Task.reduce`` takes)."""

    def __init__(self, rows: int):
        self.rows, self.columns = rows, {}

    def put(self, picked: np.ndarray, columns: Columns) -> None:
        """The head's ``columns`` for the call's sequences ``picked`` (in that order)."""
        for name, values in columns.items():
            full = self.columns.get(name)
            if full is None:
                shape = (self.rows, *values.shape[1:]) if isinstance(values, np.ndarray) else None
                full = self.columns[name] = np.zeros(shape, values.dtype) if shape else [None] * self.rows
            if isinstance(full, np.ndarray):
                full[picked] = values
            else:
                for row, value in zip(picked.tolist(), values):
                    full[row] = value


def to_arrow(values, valid: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """Column for all rows of a call from values for its valid rows (nulls elsewhere)."""
    n, mask = len(valid), pa.array(~valid)
    if isinstance(dtype, pa.FixedSizeListType):
        full = np.zeros((n, dtype.list_size), dtype=dtype.value_type.to_pandas_dtype())
        full[valid] = values
        return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dtype.list_size, mask=mask)
    if isinstance(values, np.ndarray):
        full = np.zeros(n, dtype=values.dtype)
        full[valid] = values
        return pa.array(full, type=dtype, mask=~valid)
    full = [None] * n
    for i, v in zip(np.flatnonzero(valid), values):
        full[i] = v
    return pa.array(full, type=dtype)


class ConstantModel(torch.nn.Module):
    """``faults.constant_outputs``: stands in for ``model`` without running it. Every call returns what the model
    returned for the first position of a probe row, broadcast to each row and token of the micro-batch (views,
    no copies), with the model's output type: what is left of a model call is the pipeline's own work."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.config, self.dtype = model.config, model.dtype
        device = next(model.parameters()).device
        with torch.inference_mode():
            short, long = (model(input_ids=torch.zeros((1, n), dtype=torch.long, device=device), output_hidden_states=True) for n in (2, 3))
        self.output_type = type(long)
        # Per output: its first row and position, and which dimensions follow the sequence (they grew with it).
        self.constants = {key: [self._first(a, b) for a, b in zip(*map(_tensors, (long[key], short[key])))] for key in long.keys()}
        self.nested = {key for key in long.keys() if isinstance(long[key], tuple)}

    @staticmethod
    def _first(long: torch.Tensor, short: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        sequence = [d for d in range(1, long.dim()) if long.shape[d] != short.shape[d]]
        for d in sequence:
            long = long.narrow(d, 0, 1)
        return long, sequence

    def forward(self, input_ids: torch.Tensor, **_):
        rows, width = input_ids.shape

        def grow(first: torch.Tensor, sequence: list[int]) -> torch.Tensor:
            return first.expand([rows, *(width if d in sequence else n for d, n in enumerate(first.shape) if d)])

        out = {key: [grow(*c) for c in constants] for key, constants in self.constants.items()}
        return self.output_type(**{key: tuple(v) if key in self.nested else v[0] for key, v in out.items()})


def _tensors(value) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


class InferWorker:
    """``map_batches`` callable holding one model; see the module docstring for the contract."""

    def __init__(
        self,
        model: ResolvedModel,
        task: Task,
        inference: InferenceConfig,
        dtype: str,
        num_threads: int,
        progress,
        faults: FaultConfig,
        stage: str = "infer",
        backend: str = "torch",
    ):
        """``stage``: the ``Progress`` stage its rows count toward; ``backend``: model.backend (``pipeline.backends``)."""
        import ray

        torch.set_num_threads(num_threads)
        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        self.process = f"{context.get_actor_id()}:{os.getpid()}"
        self.progress, self.stage, self.faults, self.calls = progress, stage, faults, 0
        self.first_incarnation = register(progress, "model") == 1
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        if self.device == "cpu":
            keep_freed_memory()
        if backend == "openvino":  # converted from the float32 torch model, computing in dtype
            self.model = OpenVINOModel(load_model(model, task, self.device, "float32"), compute_dtype(dtype, "cpu"), num_threads)
        else:
            self.model = load_model(model, task, self.device, dtype)
        if faults.constant_outputs:
            self.model = ConstantModel(self.model)
        self.task = task
        free = torch.cuda.mem_get_info()[0] if self.device == "cuda" else None
        self.max_tokens = (
            inference.max_tokens_per_batch
            if inference.max_tokens_per_batch != "auto"
            else token_budget(self.model.config, model.max_length, free, self.model.dtype.itemsize)
        )
        self.min_efficiency = inference.min_padding_efficiency
        self.fields = task.fields()
        self.pad_id = self.model.config.pad_token_id or 0

    def _inject_faults(self) -> None:
        self.calls += 1
        if self.faults.exit_after_calls and self.first_incarnation and self.calls > self.faults.exit_after_calls:
            os._exit(1)  # a crash mid-call: Ray restarts the actor and retries this batch
        time.sleep(self.faults.delay_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._inject_faults()
        started = time.perf_counter()
        n = batch.num_rows
        valid = pc.is_null(batch[S.ERROR]).to_numpy(zero_copy_only=False)
        # The micro-batcher's rows are the valid rows' model sequences (one per row unless the task makes more).
        row_of, columns = sequences(batch)
        offsets = columns[S.INPUT_IDS][1]
        lengths = (offsets[1:] - offsets[:-1]).astype(np.int64)
        kept = next((c for c in (S.TEXT, S.TEXT_PAIR) if c in batch.column_names), None)  # Tokenization.span_text
        texts = batch[kept].to_pylist() if kept else None
        texts = [texts[r] for r in row_of] if kept else None
        order = np.argsort(-lengths, kind="stable")  # sequences, longest first
        parts = [order[part] for part in micro_batches(lengths[order], self.max_tokens, self.min_efficiency)]

        outputs = CallOutputs(len(lengths))
        padded = np.zeros(len(lengths), dtype=np.int64)
        for picked, columns_out in zip(parts, self._forward_all(columns, texts, parts)):
            outputs.put(picked, columns_out)
            padded[picked] = lengths[picked].max()

        spans = None
        if S.SPANS in columns:
            flat, bounds = columns[S.SPANS]
            spans = flat[bounds[0] : bounds[-1]].reshape(-1, 2)
        first, columns_out = self.task.reduce(outputs.columns, Windows(row_of, lengths, spans, texts)) if len(row_of) else ([], {})
        first = np.asarray(first, dtype=np.int64)
        # Each rejected row stays one row; each valid row becomes its output rows, in place.
        per_row = np.bincount(row_of[first], minlength=n)
        per_row[~valid] = 1
        taken = np.repeat(np.arange(n), per_row)
        valid = valid[taken]
        batch = batch.drop_columns([c for c in CONSUMED if c in batch.column_names]).take(pa.array(taken))
        for field in self.fields:
            if field.name in columns_out:
                batch = batch.append_column(field.name, to_arrow(columns_out[field.name], valid, field.type))
        for name, per_sequence in ((S.NUM_TOKENS, lengths), (S.PADDED_TOKENS, padded)):
            summed = np.add.reduceat(per_sequence, first) if len(first) else np.zeros(0, dtype=np.int64)
            batch = batch.append_column(name, to_arrow(summed.astype(np.int32), valid, pa.int32()))
        rows = batch.num_rows
        batch = batch.append_column(S.NODE, pa.repeat(pa.scalar(self.node, pa.string()), rows))
        self.progress.beat.remote(self.stage, n, time.perf_counter() - started)
        return batch.append_column(S.ACTOR, pa.repeat(pa.scalar(self.process, pa.string()), rows))

    def _forward_all(self, columns: dict, texts: list | None, parts: list[np.ndarray]) -> Iterator[Columns]:
        """Head outputs per micro-batch. While the device runs one micro-batch (CUDA kernels are
        asynchronous), the CPU pads and pins the next; the head's copy to the CPU syncs."""
        upcoming = self._inputs(columns, texts, parts[0]) if parts else None
        for i, picked in enumerate(parts):
            batch = upcoming
            following = parts[i + 1] if i + 1 < len(parts) else None
            try:
                with torch.inference_mode():
                    if self.faults.oom_above_rows and len(picked) > self.faults.oom_above_rows:
                        raise torch.cuda.OutOfMemoryError("injected by faults.oom_above_rows")
                    outputs = self.model(**batch.inputs, output_hidden_states=self.task.needs_hidden_states)
                    upcoming = self._inputs(columns, texts, following) if following is not None else None
                    result = self.task.head(outputs, batch)
            except torch.cuda.OutOfMemoryError:
                del batch
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                result = self._split(columns, texts, picked)
                upcoming = self._inputs(columns, texts, following) if following is not None else None
            yield result

    def _split(self, columns: dict, texts: list | None, picked: np.ndarray) -> Columns:
        """Forward ``picked`` in two halves (recursively) after a CUDA OOM."""
        if len(picked) == 1:
            raise torch.cuda.OutOfMemoryError("a single row does not fit in GPU memory; lower model.max_length")
        halves = [picked[: len(picked) // 2], picked[len(picked) // 2 :]]
        first, second = (next(self._forward_all(columns, texts, [half])) for half in halves)
        return {
            k: np.concatenate([first[k], second[k]]) if isinstance(first[k], np.ndarray) else first[k] + second[k]
            for k in first
        }

    def _inputs(self, columns: dict, texts: list | None, picked: np.ndarray) -> ModelBatch:
        """Rows ``picked`` as one micro-batch: tensors padded to its own longest row, on the device."""
        mask, index = padded_positions(columns[S.INPUT_IDS][1], picked)
        inputs = {"input_ids": np.full(mask.shape, self.pad_id, dtype=np.int64), "attention_mask": mask.astype(np.int64)}
        inputs["input_ids"][mask] = columns[S.INPUT_IDS][0][index]
        if S.TOKEN_TYPE_IDS in columns:
            inputs["token_type_ids"] = np.zeros(mask.shape, dtype=np.int64)
            inputs["token_type_ids"][mask] = columns[S.TOKEN_TYPE_IDS][0][index]
        pin = self.device == "cuda"
        tensors = {
            k: (torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v)).to(self.device, non_blocking=pin)
            for k, v in inputs.items()
        }
        if S.OFFSETS not in columns:
            return ModelBatch(tensors)
        flat, offsets = columns[S.OFFSETS]
        spans = [flat[offsets[i] : offsets[i + 1]] for i in picked]
        return ModelBatch(tensors, offsets=spans, texts=[texts[i] for i in picked])
