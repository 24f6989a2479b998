"""Model runtimes other than torch for the infer stage's forward pass (``model.backend``).

``openvino`` (CPU only): the task's ``AutoModelFor*``, loaded in float32 as for torch, converted by
``openvino.convert_model`` (traced from torch; no ONNX file) when the actor first calls it, and compiled
for the CPU in ``f32`` or ``bf16`` inference precision (``model.dtype`` float32 or bfloat16). Only the
forward pass changes: it takes and returns torch tensors with the model's own output type, so tasks'
heads are the same. Measured against torch on this machine in README: CPU backends. A run on it is
always gated against torch float32 (``pipeline.run.fidelity_gate``), as a conversion may drift.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from pipeline.config import ConfigError

PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16"}  # model.dtype -> OpenVINO INFERENCE_PRECISION_HINT


class BackendError(ConfigError):
    """This machine cannot run the configured backend (not installed, no bfloat16 support, a failed conversion)."""


def require(backend: str) -> None:
    """Raise ``BackendError`` unless ``backend``'s runtime is installed here."""
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        raise BackendError("model.backend openvino needs OpenVINO, which is not installed: pip install 'encoder-batch[openvino]'")


class _Flat(torch.nn.Module):
    """``model`` with positional tensor inputs named by ``keys`` and its outputs flattened to a tuple of tensors
    (nested tuples, such as ``hidden_states``, in order): what ``openvino.convert_model`` traces."""

    def __init__(self, model: torch.nn.Module, keys: tuple[str, ...], hidden_states: bool):
        super().__init__()
        self.model, self.keys, self.hidden_states = model, keys, hidden_states

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.keys, tensors)), output_hidden_states=self.hidden_states)
        return tuple(t for value in outputs.values() for t in (value if isinstance(value, tuple) else (value,)))


class OpenVINOModel(torch.nn.Module):
    """``model`` (float32, eval mode, on the CPU) computed by OpenVINO in ``dtype``, with ``threads`` threads.

    Called like the model with tensor keyword arguments and ``output_hidden_states``; returns the model's
    output type. Each set of input names and ``output_hidden_states`` is converted once, on first use,
    by tracing ``model`` on a padded example batch (the attention mask is an input, not a traced constant).
    Raises ``BackendError`` if OpenVINO is missing, the CPU lacks bf16, or the conversion fails.
    """

    def __init__(self, model: torch.nn.Module, dtype: str, threads: int):
        super().__init__()
        require("openvino")
        import openvino as ov

        self.core, self.convert_model = ov.Core(), ov.convert_model
        hint = PRECISION_HINTS[dtype]
        if hint == "bf16" and "BF16" not in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendError("model.backend openvino: this CPU has no bfloat16 support; use model.dtype float32")
        self.model, self.config, self.dtype = model, model.config, torch.float32
        self.settings = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled: dict[tuple[tuple[str, ...], bool], tuple] = {}  # (keys, hidden_states) -> (compiled, type, layout)

    def convert(self, keys: tuple[str, ...], hidden_states: bool) -> tuple:
        """(OpenVINO model with inputs ``keys`` in order, the torch model's output type, [(output name, tensors in
        it, or None for one)]), traced on a padded example batch. Trace warnings (shape-dependent Python
        branches in the modelling code) are silenced: the parity tests and the fidelity gate check the numbers."""
        mask = torch.ones((2, 8), dtype=torch.long)
        mask[1, 5:] = 0  # one padded row
        ids = torch.where(mask.bool(), 5, self.config.pad_token_id or 0)
        example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        with torch.inference_mode():
            reference = self.model(**{k: example[k] for k in keys}, output_hidden_states=hidden_states)
        layout = [(name, len(value) if isinstance(value, tuple) else None) for name, value in reference.items()]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = self.convert_model(_Flat(self.model, keys, hidden_states), example_input=tuple(example[k] for k in keys))
        except Exception as e:  # the converter's own errors have no common type
            raise BackendError(
                f"model.backend openvino cannot convert {type(self.model).__name__}: {str(e).splitlines()[0][:300]}; "
                "use model.backend torch"
            ) from None
        return converted, type(reference), layout

    def forward(self, output_hidden_states: bool = False, **inputs: torch.Tensor):
        keys = tuple(inputs)
        key = (keys, output_hidden_states)
        if key not in self.compiled:
            converted, output_type, layout = self.convert(*key)
            self.compiled[key] = self.core.compile_model(converted, "CPU", self.settings), output_type, layout
        compiled, output_type, layout = self.compiled[key]
        results = compiled([inputs[k].numpy() for k in keys])
        tensors = iter(torch.from_numpy(results[i]) for i in range(len(compiled.outputs)))
        return output_type(**{name: next(tensors) if n is None else tuple(next(tensors) for _ in range(n)) for name, n in layout})
