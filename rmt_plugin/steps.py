"""The one entrance of a batch into the criterion, for every task of the plugin.

fairseq's ``Trainer`` calls ``task.train_step`` / ``task.valid_step``; both tasks (``rmt_lm``,
``rmt_memory``) take them from :class:`CarriedMemorySteps`, which hands the criterion the state
the task carried (``carried_state``), the epoch, and in training the ``backward`` with which the
BPTT engine back-propagates chain by chain (so ``--memory-replay`` and the per-chain freeing of
activations work on every task), then gives the next state back to the task (``keep_state``).
A task whose batches are independent (the memory tasks) keeps the defaults: fresh memory, nothing
kept. One training batch::

    Trainer -> task.train_step -> criterion.forward_with_state(model, sample, state, backward, epoch)
            -> bptt.unroll(schedule, runner) -> criterion.step -> model    (backward per chain)
            <- (loss, sample_size, logging_output, next state) -> task.keep_state
"""

import torch
from fairseq.optim.amp_optimizer import AMPOptimizer

from .model import resolve_write_input


class CarriedMemorySteps:
    """Task mixin: ``train_step``/``valid_step`` through ``criterion.forward_with_state``."""

    carries_memory = True  # what the model checks of its task (model.check_task)
    # what a small architecture's --memory-write-input auto becomes (model.resolve_write_input)
    auto_memory_write_input = "learned"
    training_epoch = 1  # the training epoch running (set by the task's begin_epoch)

    def build_model(self, cfg, from_checkpoint=False):
        resolve_write_input(cfg, self)
        return super().build_model(cfg, from_checkpoint)

    def carried_state(self, role: str, sample):
        """The state to process ``sample`` with (``role``: train or valid); None: fresh memory."""
        return None

    def keep_state(self, role: str, sample, next_state, state=None):
        """What the criterion left after ``sample`` (``state``: what it started from)."""

    def begin_epoch(self, epoch, model):
        super().begin_epoch(epoch, model)
        self.training_epoch = epoch

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        model.train()
        model.set_num_updates(update_num)
        # A dummy batch (ignore_grad) only keeps a rank in step with the others: its forward
        # must not depend on the stream's memory, nor move it.
        state = None if ignore_grad else self.carried_state("train", sample)
        sample.setdefault("stream", {})["update"] = update_num  # for the criterion's messages

        def backward(objective):
            # several backwards per batch (one per chain); the gradients accumulate and legacy_ddp
            # reduces them after the step (rmt_compat)
            with torch.autograd.profiler.record_function("backward"), torch.autocast("cuda", enabled=False):
                optimizer.backward(objective * 0 if ignore_grad else objective)

        with torch.autograd.profiler.record_function("forward"):
            with torch.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                loss, sample_size, logging_output, next_state = criterion.forward_with_state(
                    model, sample, state, backward=backward, epoch=self.training_epoch
                )
        if ignore_grad:
            loss *= 0
        else:
            self.keep_state("train", sample, next_state, state)
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        model.eval()
        state = self.carried_state("valid", sample)
        with torch.no_grad():
            loss, sample_size, logging_output, next_state = criterion.forward_with_state(model, sample, state)
            logging_output.update(self.valid_diagnostics(sample, model, state))
        self.keep_state("valid", sample, next_state)
        return loss, sample_size, logging_output

    def valid_diagnostics(self, sample, model, state) -> dict:
        """Extra validation logs (``rmt_lm --memory-diagnostics``); none by default."""
        return {}
