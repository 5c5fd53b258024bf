"""rmt-fairseq: the Recurrent Memory Transformer for fairseq (``--user-dir rmt_plugin``)."""

from . import criterion, memory_tasks, model, task  # noqa: F401  (registers them with fairseq)
