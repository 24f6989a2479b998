"""encoder-batch: batch inference for Hugging Face encoder models on Ray Data.

Reading order follows the data: config -> source -> tokenize -> infer (tasks) -> sink,
with ``run`` wiring the stages together and ``commit`` publishing their output. Read an
output with ``read_output`` (pyarrow) or ``read_output_dataset`` (Ray Data).
"""

__version__ = "0.1.0"

from pipeline.commit import read_output, read_output_dataset  # noqa: E402

__all__ = ["__version__", "read_output", "read_output_dataset"]
