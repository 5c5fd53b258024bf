"""Example plugin: a new memory task in one file, used with ``--user-dir`` and no plugin change.

fairseq takes a single ``--user-dir``, so this package imports ``rmt_plugin`` itself: pointing
``--user-dir`` here brings the RMT model, criterion and ``rmt_memory`` task along with the new
``--memory-task needle``.
"""

import rmt_plugin  # noqa: F401  (registers the rmt model, rmt_lm criterion and rmt_memory task)
from rmt_plugin.memory_tasks import MemoryTask, register_memory_task


@register_memory_task("needle")
class NeedleInAHaystack(MemoryTask):
    """--source-len random hay symbols hide one needle (a marker, then a value); answer the value."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.source_len < 2:
            raise ValueError(f"--source-len must be >= 2 for needle (marker + value), got {cfg.source_len}")
        n = cfg.num_symbols
        self.symbols = [f"hay{i}" for i in range(n)] + [f"val{i}" for i in range(n)] + ["needle"]

    def draw(self, rng):
        n, length = self.cfg.num_symbols, self.cfg.source_len
        source = rng.integers(n, size=length)
        at, value = rng.integers(length - 1), n + rng.integers(n)
        source[at : at + 2] = [2 * n, value]
        return source, [value]
