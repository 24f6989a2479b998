"""encoder-batch: batch inference for Hugging Face encoder models on Ray Data.

Reading order follows the data: config -> source -> tokenize -> infer (tasks) -> sink,
with ``run`` wiring the stages together.
"""

__version__ = "0.1.0"
