"""Memory measurement shared by the tests and ``scripts/benchmark.py``.

:func:`saved_tensor_peak` counts the bytes autograd holds for backward (every save counted, a
parameter saved by two layers twice): deterministic, unlike the process's RSS, and proportional to
how many segments' graphs are alive at once, which is what the backward schedules change.
Example::

    with saved_tensor_peak() as meter:
        loss = (x * w).sum()          # saves x and w
        loss.backward()               # frees them
    meter["peak"]                     # x.nbytes + w.nbytes; meter["live"] is back to 0
"""

from contextlib import contextmanager

import torch


@contextmanager
def saved_tensor_peak():
    """Yields ``{"live": bytes, "peak": bytes}`` of the tensors saved for backward in the block."""
    meter = {"live": 0, "peak": 0}

    class Saved:
        def __init__(self, tensor):
            self.tensor, self.nbytes = tensor, tensor.numel() * tensor.element_size()
            meter["live"] += self.nbytes
            meter["peak"] = max(meter["peak"], meter["live"])

        def __del__(self):
            meter["live"] -= self.nbytes

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        yield meter
