"""Checks of a task against its criterion, its model and fairseq, made when fairseq builds them:
before any batch runs (an error inside a training step leaves a crash.pt behind), with one line
naming the flag. Example: ``--criterion rmt_lm --report-accuracy`` with ``--adaptive-softmax-cutoff``
stops at start-up instead of at the first batch.

The plugin relies on fairseq behaviour that fairseq 0.12.2 lacks and ``rmt_compat`` (part 5)
supplies: the task state restored on resume (the carried memory of an exact resume) and
legacy_ddp for a model with several forwards per backward. Without it a run would silently lose
its memory on resume, or fail in torch's DDP: :func:`require_compat_fixes` stops first.
"""

import importlib

from .criterion import RMTLMCriterion


def require_compat_fixes():
    """One line naming what is missing if rmt_compat's fairseq fixes (part 5) are not active."""
    try:
        import rmt_compat
    except ImportError:
        raise RuntimeError("rmt_plugin needs the rmt_compat module installed with it (pip install rmt-fairseq)") from None
    missing = [name for name, (module, marker) in rmt_compat.RELIED_ON.items()
               if not getattr(importlib.import_module(module), marker, False)]
    if missing:
        raise RuntimeError(f"rmt_plugin needs fairseq fixed by rmt_compat ({'; '.join(missing)}), which is not "
                           f"active: unset {rmt_compat.ENV_SWITCH}=0, or reinstall rmt-fairseq so that "
                           "rmt_compat.pth is in site-packages")


class ChecksCriterionAgainstModel:
    """Task mixin: fairseq builds the model, then the criterion; check that they fit together."""

    def build_model(self, cfg, from_checkpoint=False):
        require_compat_fixes()
        self._model_cfg = cfg
        return super().build_model(cfg, from_checkpoint)

    def build_criterion(self, cfg):
        criterion = super().build_criterion(cfg)
        if not callable(getattr(criterion, "forward_with_state", None)):
            name = getattr(cfg, "_name", None) or type(criterion).__name__
            raise ValueError(f"--task {self.cfg._name} carries memory between segments and needs a "
                             f"criterion with forward_with_state (e.g. --criterion rmt_lm), "
                             f"not --criterion {name}")
        model_cfg = getattr(self, "_model_cfg", None)
        if model_cfg is not None and isinstance(criterion, RMTLMCriterion):
            criterion.check_model(getattr(model_cfg, "num_mem_tokens", 0), getattr(model_cfg, "mem_len", 0),
                                  getattr(model_cfg, "memory_target_token", False),
                                  bool(getattr(model_cfg, "adaptive_softmax_cutoff", None)))
        return criterion
