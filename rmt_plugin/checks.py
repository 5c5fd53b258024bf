"""Checks of a task against its criterion and model, made when fairseq builds them: before any
batch runs (an error inside a training step leaves a crash.pt behind), with one line naming the
flag. Example: ``--criterion rmt_lm --report-accuracy`` with ``--adaptive-softmax-cutoff`` stops
at start-up instead of at the first batch."""

from .criterion import RMTLMCriterion


class ChecksCriterionAgainstModel:
    """Task mixin: fairseq builds the model, then the criterion; check that they fit together."""

    def build_model(self, cfg, from_checkpoint=False):
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
