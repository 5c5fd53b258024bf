"""Memory and FLOP measurement shared by the tests and ``scripts/benchmark.py``.

:func:`saved_tensor_peak` counts the bytes autograd holds for backward (every save counted, a
parameter saved by two layers twice): deterministic, unlike the process's RSS, and proportional to
how many segments' graphs are alive at once, which is what the backward schedules change.
Example::

    with saved_tensor_peak() as meter:
        loss = (x * w).sum()          # saves x and w
        loss.backward()               # frees them
    meter["peak"]                     # x.nbytes + w.nbytes; meter["live"] is back to 0

:func:`flop_counter` is torch's ``FlopCounterMode`` (matrix products and fused attention, forward
and backward), which also counts the CPU's fused attention kernel: torch has no formula for it, so
an evaluation step through SDPA on the CPU would count none of its attention. Example::

    with flop_counter() as counter:
        torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    counter.get_total_flops()         # 2 * (2 * 3 * 4) = 48: a multiply and an add per term
"""

from contextlib import contextmanager

import torch
from torch.utils import flop_counter as torch_flop_counter


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


def _count_cpu_flash_attention():
    """Registers torch's own SDPA formulas for the CPU flash kernel (forward and backward)."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in torch_flop_counter.flop_registry:
        return
    torch_flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(
        torch_flop_counter.sdpa_flop)
    torch_flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)(
        torch_flop_counter.sdpa_backward_flop)


def flop_counter():
    """A ``FlopCounterMode`` (no printout) that also counts the CPU's fused attention."""
    _count_cpu_flash_attention()
    return torch_flop_counter.FlopCounterMode(display=False)
