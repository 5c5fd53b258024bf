"""``--criterion rmt_lm``: the losses of a batch's segments, unrolled with carried memory.

One batch: the criterion cuts the sample's rows into K segments of T tokens, and the BPTT engine
(:mod:`rmt_plugin.bptt`, which explains the schedules ``--bptt-mode`` names and the runners)
runs them from the state the task carried over from the previous batch, calling back
:meth:`RMTLMCriterion.step` for each segment; this module turns a segment's forward into its
losses, sums the objective, logs, and checks its flags against the model. In training the engine
back-propagates each chain as soon as it has run (``--memory-replay``: segment by segment); in
validation (eval mode, no autograd) it carries the memory plainly from segment to segment, as the
paper's evaluation does: no schedule re-runs anything there.

K, T and k can change over training, per epoch: ``--segments-per-sample-schedule`` and
``--tokens-per-sample-schedule`` (task; a batch carries its T) and ``--bptt-depth-schedule``
(here), see :mod:`rmt_plugin.epoch_schedule`. In chunk mode make K a multiple of k+1, so that no
chunk is cut short by the batch end (a warning says so otherwise).

Memory-only loss (``--memory-only-loss-weight w``, Tr-XL + RMT only; ours, not the paper's).
With a cache, the model can predict a segment from the cache alone and leave the memory tokens
unused. This loss is the LM loss of the same segment run a second time from the same memory but
with the cache hidden, so only the memory carries the past; the optimised loss is
``lm + w * memory_only``. It back-propagates through the memory under the same BPTT schedule as
the LM loss and costs one more forward and backward per segment that has a cache.

Memory-token loss (``--memory-token-loss-weight w``; the paper uses 0.01 for Tr-XL + RMT). The
paper's auxiliary loss (its appendix; its released code does not contain it): a new special token
is added to the vocabulary, and the memory tokens must predict it. Which outputs: those at the
*write* positions (``[read; segment; write]``; for MemTr the memory positions), i.e. exactly the
vectors the model hands on as the next segment's memory, through the LM head (the tied output
embedding and bias, or the adaptive softmax). The read positions' outputs are discarded by the
model, so a loss on them would train outputs nobody uses. The target is the model's extra output
symbol ``<mem>`` (``--memory-target-token``, see ``rmt_plugin/model.py``): it is appended after the
task dictionary by the model, so every token id of a data-bin keeps its meaning. Per segment the
loss is the mean cross-entropy over its B x m memory outputs, times the segment's target count,
so that after fairseq divides by the tokens the optimised loss is ``lm_mean + w * memory_mean``,
as in the paper. Example, m=2, one segment of 3 targets, memory outputs giving p(<mem>) = 0.5
and 0.25: memory_token = 3 * (ln 2 + ln 4) / 2. Its gradient reaches the segment that wrote the
memory and, through that segment's read memory, the previous segments allowed by the BPTT depth.

``loss``, ``ppl`` and checkpoint selection stay on the LM loss alone; ``memory_only_loss`` and
``memory_token_loss`` are logged beside them, in base 2 per target token.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from torch import Tensor

from . import bptt, diagnostics
from .bptt import CarriedState  # noqa: F401  (the state the task carries between batches)
from .epoch_schedule import at_epoch, parse_schedule
from .model import RMTState

logger = logging.getLogger(__name__)

BPTT_MODES = ChoiceEnum(list(bptt.SCHEDULES))


@dataclass
class RMTLMCriterionConfig(FairseqDataclass):
    bptt_depth: int = field(
        default=3,
        metadata={"help": "gradient flows through the memory of at most this many previous segments "
                          "(0: memory is a detached input; prefix mode: at least this many)"},
    )
    bptt_depth_schedule: Optional[str] = field(
        default=None,
        metadata={"help": "--task rmt_lm: --bptt-depth per epoch, comma-separated like --update-freq, the last "
                          "value from then on, VALUExN for N epochs (e.g. 0,1,3 or 0x10,6; replaces --bptt-depth; see epoch_schedule.py)"},
    )
    bptt_mode: BPTT_MODES = field(
        default="prefix",
        metadata={"help": "(default prefix: it learned sparse dependencies that chunk did not, and more of "
                          "Transformer-XL's improvement, docs/memory_in_lm.md section 4) "
                          "chunk: detach every bptt_depth+1 segments, one forward per segment; sliding: "
                          "re-run the previous bptt_depth segments for every segment (bptt_depth+1 forwards); "
                          "prefix: re-run the previous batch's last bptt_depth segments once per batch, then "
                          "back-propagate through the whole row (every loss reaches >= bptt_depth segments "
                          "back, across batch borders; (K+bptt_depth)/K forwards per segment); authors: as the "
                          "paper's code, sliding with the re-run starting from the newest memory (see "
                          "rmt_plugin/bptt.py)"},
    )
    memory_replay: bool = field(
        default=False,
        metadata={"help": "memory-replay backprop (Memformer): run each chain of segments without a graph, "
                          "then recompute and back-propagate it segment by segment in reverse; the same "
                          "gradients, peak activations of one segment whatever the depth, k more forwards "
                          "per chain of k+1 segments"},
    )
    report_accuracy: bool = field(
        default=False, metadata={"help": "log per-token accuracy and exact match (whole row correct)"}
    )
    memory_only_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Tr-XL + RMT: add this weight times the LM loss of each segment re-run from "
                          "the memory alone, without the cache (ours, not the paper's; 0: off)"},
    )
    memory_token_loss_weight: float = field(
        default=0.0,
        metadata={"help": "the paper's auxiliary loss (0.01 for Tr-XL + RMT): the memory outputs must "
                          "predict the special token <mem> (needs --memory-target-token; 0: off)"},
    )


class SegmentResult(NamedTuple):
    net_output: tuple
    target: Tensor
    memory_only_output: Optional[tuple] = None  # the memory-only run: same memory, no cache


class SegmentTerms(NamedTuple):
    """A scored segment's losses (summed over its targets, nats) and what is logged about it."""

    lm: Tensor
    memory_only: Optional[Tensor]
    memory_token: Optional[Tensor]
    memory_after: Tensor  # the memory it wrote (a 0-d zero without memory), checked to be finite
    accuracy: Optional[Tuple[Tensor, Tensor]] = None  # --report-accuracy: (correct targets, wrong per row)

    def detach(self) -> "SegmentTerms":
        return SegmentTerms(*(None if t is None else tuple(x.detach() for x in t) if isinstance(t, tuple)
                              else t.detach() for t in self))


@register_criterion("rmt_lm", dataclass=RMTLMCriterionConfig)
class RMTLMCriterion(FairseqCriterion):
    # the CLI's defaults (RMTLMCriterionConfig) also for a criterion built in Python
    def __init__(self, task, bptt_depth=RMTLMCriterionConfig.bptt_depth, bptt_depth_schedule=None,
                 bptt_mode=RMTLMCriterionConfig.bptt_mode, memory_replay=False,
                 report_accuracy=False, memory_only_loss_weight=0.0, memory_token_loss_weight=0.0):
        super().__init__(task)
        if getattr(getattr(task, "cfg", None), "tokens_per_sample", None) is None:  # no segments to unroll
            raise ValueError(f"--criterion rmt_lm unrolls segments with carried memory and needs --task rmt_lm or "
                             f"rmt_memory, not --task {type(task).__name__}")
        if bptt_depth < 0:
            raise ValueError(f"--bptt-depth must be >= 0, got {bptt_depth}")
        for flag, weight in (("--memory-only-loss-weight", memory_only_loss_weight),
                             ("--memory-token-loss-weight", memory_token_loss_weight)):
            if not weight >= 0:  # also rejects NaN
                raise ValueError(f"{flag} must be >= 0, got {weight}")
        self.memory_only_loss_weight = memory_only_loss_weight
        self.memory_token_loss_weight = memory_token_loss_weight
        self.depths = parse_schedule(bptt_depth_schedule, "--bptt-depth-schedule", 0) or [bptt_depth]
        self.bptt_mode = bptt_mode
        self.memory_replay = memory_replay
        self.report_accuracy = report_accuracy
        self.segment_length = task.cfg.tokens_per_sample
        segments = getattr(task, "segment_schedule", None)  # rmt_lm's K per epoch
        # log what each training batch used when either schedule is set
        self.log_schedule = (bptt_depth_schedule is not None
                             or getattr(task.cfg, "segments_per_sample_schedule", None) is not None
                             or getattr(task.cfg, "tokens_per_sample_schedule", None) is not None)
        if bptt_depth_schedule is not None and segments is None:
            raise ValueError(f"--bptt-depth-schedule sets the depth per epoch of --task rmt_lm, not --task "
                             f"{type(task).__name__}; use --bptt-depth")
        self.warn_if_chunks_straddle_batches(segments or [])

    def warn_if_chunks_straddle_batches(self, segments):
        """Chunk mode: warn (once) at the first epoch whose K is not a multiple of depth + 1."""
        if self.bptt_mode != "chunk":
            return
        for epoch in range(1, max(len(segments), len(self.depths)) + 1):
            k, depth = at_epoch(segments, epoch) if segments else None, at_epoch(self.depths, epoch)
            if depth > 0 and k and k % (depth + 1):
                logger.warning(
                    f"--bptt-mode chunk detaches memory every --bptt-depth+1 = {depth + 1} segments and at "
                    f"every batch start, but --segments-per-sample is {k}"
                    f"{f' in epoch {epoch}' if len(segments) > 1 or len(self.depths) > 1 else ''}: some chunks "
                    "are cut short; use a multiple of bptt_depth+1 or --bptt-mode sliding"
                )
                return

    def forward(self, model, sample, reduce=True):
        """Fresh memory for this batch (each batch row starts a new stream)."""
        loss, sample_size, logging_output, _ = self.forward_with_state(model, sample, None)
        return loss, sample_size, logging_output

    def forward_with_state(self, model, sample, carried: Optional[CarriedState], backward=None, epoch=1):
        """Unroll the batch's segments from ``carried``; returns fairseq's triple + the next state.

        ``backward=None``: the loss keeps its graph (the caller back-propagates it); in validation
        (eval mode under ``torch.no_grad()``) the memory is carried plainly (no schedule). Training passes
        ``backward`` (``optimizer.backward``, so fp16/AMP loss scaling applies): the engine
        back-propagates every chain as soon as it has run and the loss comes back detached, for
        logging only. ``epoch`` selects the BPTT depth of ``--bptt-depth-schedule``."""
        self.check_model(model.decoder.num_mem_tokens, model.decoder.mem_len,
                         model.decoder.memory_target is not None, model.decoder.adaptive_softmax is not None)
        tokens = sample["net_input"]["src_tokens"]
        length = sample.get("stream", {}).get("segment_length", self.segment_length)  # this epoch's T
        segments = [(t.contiguous(), y.contiguous()) for t, y in zip(
            tokens.split(length, dim=1), sample["target"].split(length, dim=1))]
        carried = carried or CarriedState(None)
        if backward is None:
            # validation (eval mode, no autograd) back-propagates nothing: carry the memory plainly
            validation = not model.training and not torch.is_grad_enabled()
            mode, depth = ("chunk", 0) if validation else (self.bptt_mode, self.depth(model, epoch))
            results, carried = bptt.unroll(segments, carried, mode, depth, bptt.PlainRunner(self.step(model, False)))
            terms = [self.segment_terms(model, r) for r in results]
        else:
            runner = bptt.ReplayRunner if self.memory_replay else bptt.BackwardRunner
            terms, carried = bptt.unroll(segments, carried, self.bptt_mode, self.depth(model, epoch),
                                         runner(self.step(model, True), self.objective, backward))
        self.warn_if_not_finite(terms, sample)
        totals = self.totals(terms)
        loss = self.weighted(totals)
        sample_size = sample["target"].ne(self.padding_idx).sum().item()
        logging_output = {
            "loss": totals.lm.data,
            "ntokens": sample_size,
            "nsentences": tokens.size(0),
            "sample_size": sample_size,
        }
        if self.memory_only_loss_weight > 0:
            logging_output["memory_only_loss"] = totals.memory_only.data
        if self.memory_token_loss_weight > 0:
            logging_output["memory_token_loss"] = totals.memory_token.data
        memory = carried.model_state.memory if carried.model_state is not None else None
        if memory is not None:
            logging_output["mem_norm"] = memory.float().norm(dim=-1).mean().item()
            logging_output["mem_batches"] = 1
        if backward is not None and self.log_schedule:
            # the epoch's K (from the width: its last batch may hold fewer segments) and depth
            logging_output.update(segments_per_sample=sample["stream"]["width"] // length, tokens_per_sample=length,
                                  bptt_depth=at_epoch(self.depths, epoch), schedule_batches=1)
        if self.report_accuracy:
            wrong_per_row = sum(t.accuracy[1] for t in terms)
            logging_output.update(n_correct=int(sum(t.accuracy[0] for t in terms)),
                                  n_exact=int((wrong_per_row == 0).sum()), n_rows=len(wrong_per_row))
        return loss, sample_size, logging_output, carried

    def warn_if_not_finite(self, terms, sample):
        """Name the first segment whose loss or next memory is NaN/inf. fairseq itself only sees
        the gradients afterwards ("gradients are Nan/Inf") and re-runs the batch under its NaN
        detector, from the same memory (see RMTLMTask.carried_state). One device sync per batch.
        Example: ``non-finite memory at update 7, train batch 3, segment 2 of 3``."""
        finite = [torch.isfinite(t.lm) & torch.isfinite(t.memory_after).all() for t in terms]
        if bool(torch.stack(finite).all()):
            return
        j = next(j for j, ok in enumerate(finite) if not ok)
        what = "loss" if not torch.isfinite(terms[j].lm) else "memory"
        stream = sample.get("stream", {})
        logger.warning(f"non-finite {what} at update {stream.get('update')}, {stream.get('split')} batch "
                       f"{stream.get('index')}, segment {j + 1} of {len(terms)}")

    def check_model(self, num_mem_tokens: int, mem_len: int, memory_target_token: bool, adaptive_softmax: bool):
        """One-line error for flags that do not fit the model (see :mod:`rmt_plugin.checks`)."""
        if self.report_accuracy and adaptive_softmax:
            raise ValueError("--report-accuracy needs a full softmax (drop --adaptive-softmax-cutoff)")
        if self.memory_only_loss_weight > 0 and not (num_mem_tokens > 0 and mem_len > 0):
            raise ValueError(
                "--memory-only-loss-weight needs a Tr-XL + RMT model (--num-mem-tokens > 0 and --mem-len > 0), "
                f"got --num-mem-tokens {num_mem_tokens} --mem-len {mem_len}"
            )
        if self.memory_token_loss_weight > 0 and not (num_mem_tokens > 0 and memory_target_token):
            raise ValueError(
                "--memory-token-loss-weight needs memory tokens and their target symbol (--num-mem-tokens > 0 "
                f"and --memory-target-token), got --num-mem-tokens {num_mem_tokens}"
                f"{' --memory-target-token' if memory_target_token else ' without --memory-target-token'}"
            )

    # ------------------------------------------------------------------ the engine's step
    def depth(self, model, epoch=1) -> int:
        """This epoch's BPTT depth; a model without memory has nothing to back-propagate through."""
        return at_epoch(self.depths, epoch) if model.decoder.num_mem_tokens > 0 else 0

    def step(self, model, terms: bool):
        """The engine's ``step`` for ``model``: one segment's forward; for a scored segment its
        :class:`SegmentResult`, or its :class:`SegmentTerms` when ``terms`` (training)."""

        def step(state, tokens, target):
            if target is None:  # re-run only, for the memory it writes
                return None, model(tokens, state=state)[1]["state"]
            result = self.run_segment(model, tokens, target, state)
            return (self.segment_terms(model, result) if terms else result), result.net_output[1]["state"]

        return step

    def unroll(self, model, segments, carried: CarriedState, epoch=1):
        """Run ``segments`` [(tokens, target), ...] under ``--bptt-mode``, keeping every graph;
        returns the scored segments' results and the state to carry (the tests that read
        gradients per segment use it)."""
        return bptt.unroll(segments, carried, self.bptt_mode, self.depth(model, epoch),
                           bptt.PlainRunner(self.step(model, False)))

    def run_segment(self, model, tokens, target, state: Optional[RMTState]) -> SegmentResult:
        """The segment's forward, plus the memory-only run when --memory-only-loss-weight is on."""
        net_output = model(tokens, state=state)
        if self.memory_only_loss_weight <= 0:
            return SegmentResult(net_output, target)
        if state is None or not state.cache:  # nothing to hide: the run itself is memory-only
            return SegmentResult(net_output, target, net_output)
        return SegmentResult(net_output, target, model(tokens, state=RMTState(state.memory, None)))

    # ------------------------------------------------------------------ losses and metrics
    def segment_loss(self, model, net_output, target: Tensor) -> Tensor:
        """Summed cross-entropy (nats) over the segment's non-pad targets."""
        if getattr(model.decoder, "adaptive_softmax", None) is not None:
            log_prob = model.decoder.target_log_prob(net_output[0], target)
            return -log_prob.masked_fill(target.eq(self.padding_idx), 0.0).sum()
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        return F.nll_loss(lprobs.view(-1, lprobs.size(-1)), target.reshape(-1),
                          ignore_index=self.padding_idx, reduction="sum")

    def memory_token_loss(self, model, net_output, target: Tensor) -> Tensor:
        """The paper's auxiliary loss for one segment (module docstring): mean cross-entropy of the
        write outputs against ``<mem>``, scaled to the segment's target count."""
        memory = net_output[1]["state"].memory  # [B, m, d]: the write positions' final outputs
        memory_target = memory.new_full(memory.shape[:2], model.decoder.memory_target, dtype=target.dtype)
        mean = self.segment_loss(model, (model.decoder.output_layer(memory), None), memory_target) / memory_target.numel()
        return mean * target.ne(self.padding_idx).sum()

    def segment_terms(self, model, result: SegmentResult) -> SegmentTerms:
        """The losses of one scored segment (with their graphs) and what is logged about it."""
        memory = result.net_output[1]["state"].memory
        accuracy = None
        if self.report_accuracy:
            mask = result.target.ne(self.padding_idx)
            correct = result.net_output[0].argmax(-1).eq(result.target) & mask
            accuracy = correct.sum(), (mask & ~correct).sum(dim=1)
        return SegmentTerms(
            lm=self.segment_loss(model, result.net_output, result.target),
            memory_only=(self.segment_loss(model, result.memory_only_output, result.target)
                         if self.memory_only_loss_weight > 0 else None),
            memory_token=(self.memory_token_loss(model, result.net_output, result.target)
                          if self.memory_token_loss_weight > 0 else None),
            memory_after=memory if memory is not None else result.net_output[0].new_zeros(()),
            accuracy=accuracy,
        )

    def totals(self, terms) -> SegmentTerms:
        """The scored segments' losses summed, term by term (absent terms stay None)."""
        def total(name):
            values = [getattr(t, name) for t in terms]
            return None if not values or values[0] is None else sum(values)

        return SegmentTerms(lm=total("lm"), memory_only=total("memory_only"), memory_token=total("memory_token"),
                            memory_after=None)

    def weighted(self, totals: SegmentTerms) -> Tensor:
        """What training minimises: ``lm + w * memory_only + w' * memory_token``."""
        objective = totals.lm
        if totals.memory_only is not None:
            objective = objective + self.memory_only_loss_weight * totals.memory_only
        if totals.memory_token is not None:
            objective = objective + self.memory_token_loss_weight * totals.memory_token
        return objective

    def objective(self, terms) -> Tensor:
        """The engine's ``objective``: the weighted sum over a chain's scored segments (0 for none)."""
        return self.weighted(self.totals(terms)) if terms else 0

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        loss_sum, sample_size = total("loss"), total("sample_size")
        metrics.log_scalar("loss", loss_sum / max(sample_size, 1) / math.log(2), sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))
        for extra_loss in ("memory_only_loss", "memory_token_loss"):
            if any(extra_loss in log for log in logging_outputs):
                metrics.log_scalar(extra_loss, total(extra_loss) / max(sample_size, 1) / math.log(2), sample_size,
                                   round=3)
        if total("schedule_batches") > 0:
            for key in ("segments_per_sample", "tokens_per_sample", "bptt_depth"):
                metrics.log_scalar(key, total(key) / total("schedule_batches"), total("schedule_batches"), round=2)
        if total("mem_batches") > 0:
            metrics.log_scalar("mem_norm", total("mem_norm") / total("mem_batches"), total("mem_batches"),
                               round=3)
        if total("n_rows") > 0:
            metrics.log_scalar("accuracy", total("n_correct") / max(sample_size, 1), sample_size, round=4)
            metrics.log_scalar("exact_match", total("n_exact") / total("n_rows"), total("n_rows"), round=4)
        diagnostics.reduce_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
