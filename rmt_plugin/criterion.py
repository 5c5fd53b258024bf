"""``--criterion rmt_lm``: unrolls the segments of a batch, carrying memory, with truncated BPTT.

BPTT schedule. A batch row holds K consecutive segments s0..s(K-1) of T tokens. With depth k,
the loss of segment j back-propagates through the memory of at most k previous segments; the
memory older than that is detached. Two ways to get there:

``chunk`` (default): one forward per segment; the memory is detached at the start of every
chunk of k+1 segments (and at every batch start: a backward pass cannot reach into the previous
batch). Example, K=6, k=2 (``|`` = detach)::

    | s0 -> s1 -> s2 | s3 -> s4 -> s5 |      loss(s2) reaches s0, loss(s1) only s0..s1

Within a chunk a segment's loss reaches 0..k segments back; the last of each chunk reaches k.
Make K a multiple of k+1 so that no chunk is cut short by the batch end.

``sliding`` (the paper's code semantics): every segment reaches exactly k segments back.
For segment j, segments j-k..j-1 are re-run from the (detached) memory that segment j-k
started with, then segment j is run and only its loss is taken. K=3, k=2::

    s0: run s0                     (from the carried memory)
    s1: re-run s0, run s1          (from the memory s0 started with)
    s2: re-run s0, s1, run s2

That costs k+1 forwards (and backwards) per segment instead of one. The last k segments and the
memory each started with are carried between batches, so the depth holds across batch borders.
This is BPTT as the method describes it. The paper's code differs: its re-run starts from the
newest memory, the one segment j would read (``mem_tokens.values = ...`` sets an attribute and
leaves the tensor as it is), so in training the memory passes through segments j-k..j-1 a second
time before segment j reads it, unlike in evaluation; the gradient still reaches k segments back.
The paper's BPTT numbers come from that code (not offered here yet; docs/authors_model.md).

``prefix``: BPTT across batch borders at (K+k)/K forwards per segment. One chain per batch: the
previous batch's last k segments are re-run (not scored) from the memory the oldest of them started
with, then all K segments of this batch. Every segment's loss reaches at least k segments back
whatever its place in the row (segment j of the batch: j+k), including the first ones, which
chunk mode cuts off at the batch start. K=3, k=2, the previous batch ended with a, b::

    batch 1:  a' b' | s0 -> s1 -> s2        a', b' re-run from the memory a started with
              loss(s0) reaches a, b; loss(s2) reaches a, b, s0, s1

The chain is K+k segments long, so its activations are K+k segments' (one segment's with
``--memory-replay``). Like sliding mode it carries the last k segments and the memory each started
with between batches.

K and k can grow over training, per epoch: ``--segments-per-sample-schedule`` (task) and
``--bptt-depth-schedule`` (here), see :mod:`rmt_plugin.epoch_schedule`.

Backward, chain by chain. The schedules are sequences of *chains*: a chunk, or a segment with the
k segments it re-runs. A chain starts from a detached memory, so chains are independent for the
backward: in training the criterion back-propagates each chain as soon as it has run (through
``optimizer.backward``, so fp16/AMP loss scaling applies) and frees its graph; the gradients are
those of one backward of the summed loss, and the activations alive at once are one chain's
(k+1 segments), not the batch's K. The per-batch gradients then accumulate as fairseq's do, over
``--update-freq`` and, with data parallel, until legacy_ddp reduces them after the step.

Memory replay (``--memory-replay``; Memformer's memory-replay backpropagation): each chain is first
run without a graph, keeping only the state every segment starts from, then recomputed segment by
segment in reverse, each back-propagating its loss plus the gradient that reached the memory it
wrote (see :meth:`RMTLMCriterion.replay_chain`). The RNG state is restored per segment, so dropout
draws the same masks and the gradients equal the plain schedule's (tested in float64); activations
alive at once are one segment's whatever the depth, for k more forwards per chain of k+1 segments
(chunk: k/(k+1) per segment; sliding: k per segment). Chains of one segment (depth 0) run plainly.

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

from . import diagnostics
from .epoch_schedule import at_epoch, parse_schedule
from .model import RMTState

logger = logging.getLogger(__name__)

BPTT_MODES = ChoiceEnum(["chunk", "sliding", "prefix"])


@dataclass
class RMTLMCriterionConfig(FairseqDataclass):
    bptt_depth: int = field(
        default=1,
        metadata={"help": "gradient flows through the memory of at most this many previous segments "
                          "(0: memory is a detached input)"},
    )
    bptt_depth_schedule: Optional[str] = field(
        default=None,
        metadata={"help": "--task rmt_lm: --bptt-depth per epoch, comma-separated like --update-freq, the last "
                          "value from then on (e.g. 0,1,3; replaces --bptt-depth; see epoch_schedule.py)"},
    )
    bptt_mode: BPTT_MODES = field(
        default="chunk",
        metadata={"help": "chunk: detach every bptt_depth+1 segments, one forward per segment; sliding: "
                          "re-run the previous bptt_depth segments for every segment (bptt_depth+1 forwards); "
                          "prefix: re-run the previous batch's last bptt_depth segments once per batch, then "
                          "back-propagate through the whole row (every loss reaches >= bptt_depth segments "
                          "back, across batch borders; (K+bptt_depth)/K forwards per segment)"},
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


class CarriedState(NamedTuple):
    """What the criterion hands from one batch to the next (opaque to the task)."""

    model_state: Optional[RMTState]
    history: Tuple[Tuple[Tensor, Optional[RMTState]], ...] = ()  # sliding, prefix: (tokens, state at start)


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


def chunk_schedule(segments, carried: CarriedState, depth: int, run_chain) -> CarriedState:
    """``chunk``: chains of depth+1 segments, all scored, the memory detached at every chain start.
    ``run_chain(start, chain, scored_from)`` runs a chain and returns its end state. K=4, k=1::

        M2 = run_chain(M0, [s0, s1], 0); M4 = run_chain(M2.detach(), [s2, s3], 0); carry M4.detach()
    """
    state = carried.model_state
    for first in range(0, len(segments), depth + 1):
        state = run_chain(state.detach() if state is not None else None, segments[first:first + depth + 1], 0)
    return CarriedState(state.detach())


def sliding_schedule(segments, carried: CarriedState, depth: int, run_chain) -> CarriedState:
    """``sliding``: one chain per segment, its previous ``depth`` segments re-run (not scored) from
    the memory the oldest of them started with, then the segment itself. k=2, history (a, Ma), (b, Mb)
    carried from the previous batch, memory Mc, segments c, d::

        Md = run_chain(Ma, [a, b, c], 2).detach(); Me = run_chain(Mb, [b, c, d], 2).detach()
        carry Me and the history (c, Mc), (d, Md)
    """
    history, state = list(carried.history), carried.model_state
    for tokens, target in segments:
        window = history[-depth:]
        start = window[0][1] if window else state
        end = run_chain(start, [(past, None) for past, _ in window] + [(tokens, target)], len(window))
        history = (history + [(tokens, state)])[-depth:]
        state = end.detach()
    return CarriedState(state, tuple(history))


def prefix_schedule(segments, carried: CarriedState, depth: int, run_chain) -> CarriedState:
    """``prefix``: one chain per batch, the previous batch's last ``depth`` segments re-run (not
    scored) from the memory the oldest of them started with, then every segment of the batch.
    ``run_chain(..., starts)`` fills ``starts`` with the (detached) state each segment started
    with. k=2, history (a, Ma), (b, Mb) carried, segments c, d, e starting from Mc, Md, Me::

        Mf = run_chain(Ma, [a, b, c, d, e], 2, starts); carry Mf.detach() and (d, Md), (e, Me)
    """
    history = list(carried.history[-depth:])
    start = history[0][1] if history else carried.model_state
    starts = []
    end = run_chain(start, [(past, None) for past, _ in history] + list(segments), len(history), starts)
    history += [(tokens, state) for (tokens, _), state in zip(segments, starts[len(history):])]
    return CarriedState(end.detach(), tuple(history[-depth:]))


class _MemoryGradient(torch.autograd.Function):
    """A zero whose backward hands ``grad`` to ``memory``: memory replay's link between segments.
    ``grad`` was read from the next segment's backward, so it already carries the loss scale of
    fp16/AMP (``optimizer.backward`` scales every objective): the incoming scale is ignored."""

    @staticmethod
    def forward(ctx, memory, grad):
        ctx.save_for_backward(grad)
        return memory.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        (grad,) = ctx.saved_tensors
        return grad, None


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(rng, device):
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)


class ChecksCriterionAgainstModel:
    """Task mixin: fairseq builds the model, then the criterion; check that they fit together
    there, before any batch runs (an error inside a training step leaves a crash.pt behind)."""

    def build_model(self, cfg, from_checkpoint=False):
        self._model_cfg = cfg
        return super().build_model(cfg, from_checkpoint)

    def build_criterion(self, cfg):
        criterion = super().build_criterion(cfg)
        model_cfg = getattr(self, "_model_cfg", None)
        if model_cfg is not None and isinstance(criterion, RMTLMCriterion):
            criterion.check_model(getattr(model_cfg, "num_mem_tokens", 0), getattr(model_cfg, "mem_len", 0),
                                  getattr(model_cfg, "memory_target_token", False))
        return criterion


@register_criterion("rmt_lm", dataclass=RMTLMCriterionConfig)
class RMTLMCriterion(FairseqCriterion):
    def __init__(self, task, bptt_depth=1, bptt_depth_schedule=None, bptt_mode="chunk", memory_replay=False,
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
                             or getattr(task.cfg, "segments_per_sample_schedule", None) is not None)
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

    def forward_with_state(self, model, sample, carried: Optional[CarriedState], backward=None):
        """Unroll the batch's segments from ``carried``; returns fairseq's triple + the next state.

        ``backward=None``: the loss keeps its graph (validation; the caller back-propagates it).
        Training passes ``backward`` (``optimizer.backward``, so fp16/AMP loss scaling applies): the
        criterion back-propagates every chain itself as soon as it has run (see
        :meth:`unroll_with_backward`) and returns the loss detached, for logging only."""
        self.check_model(model.decoder.num_mem_tokens, model.decoder.mem_len,
                         model.decoder.memory_target is not None)
        tokens = sample["net_input"]["src_tokens"]
        segments = [(t.contiguous(), y.contiguous()) for t, y in zip(
            tokens.split(self.segment_length, dim=1), sample["target"].split(self.segment_length, dim=1))]
        epoch = sample.get("stream", {}).get("epoch", 1)
        if backward is None:
            results, carried = self.unroll(model, segments, carried or CarriedState(None), epoch)
            terms = [self.segment_terms(model, r) for r in results]
        else:
            terms, carried = self.unroll_with_backward(model, segments, carried or CarriedState(None), backward,
                                                       epoch)
        self.warn_if_not_finite(terms, sample)
        loss = sum(t.lm for t in terms)
        sample_size = sample["target"].ne(self.padding_idx).sum().item()
        logging_output = {
            "loss": loss.data,
            "ntokens": sample_size,
            "nsentences": tokens.size(0),
            "sample_size": sample_size,
        }
        if self.memory_only_loss_weight > 0:
            memory_only_loss = sum(t.memory_only for t in terms)
            logging_output["memory_only_loss"] = memory_only_loss.data
            loss = loss + self.memory_only_loss_weight * memory_only_loss
        if self.memory_token_loss_weight > 0:
            memory_token_loss = sum(t.memory_token for t in terms)
            logging_output["memory_token_loss"] = memory_token_loss.data
            loss = loss + self.memory_token_loss_weight * memory_token_loss
        memory = carried.model_state.memory if carried.model_state is not None else None
        if memory is not None:
            logging_output["mem_norm"] = memory.float().norm(dim=-1).mean().item()
            logging_output["mem_batches"] = 1
        if backward is not None and self.log_schedule:
            # the epoch's K (from the width: its last batch may hold fewer segments) and depth
            logging_output.update(segments_per_sample=sample["stream"]["width"] // self.segment_length,
                                  bptt_depth=at_epoch(self.depths, epoch),
                                  schedule_batches=1)
        if self.report_accuracy:
            wrong_per_row = sum(t.accuracy[1] for t in terms)
            logging_output.update(n_correct=int(sum(t.accuracy[0] for t in terms)),
                                  n_exact=int((wrong_per_row == 0).sum()), n_rows=len(wrong_per_row))
        return loss, sample_size, logging_output, carried

    def warn_if_not_finite(self, terms, sample):
        """Name the first segment whose loss or next memory is NaN/inf. fairseq itself only sees
        the gradients afterwards ("gradients are Nan/Inf") and re-runs the batch under its NaN
        detector, from the same memory (see RMTLMTask._resume). One device sync per batch.
        Example: ``non-finite memory at update 7, train batch 3, segment 2 of 3``."""
        finite = [torch.isfinite(t.lm) & torch.isfinite(t.memory_after).all() for t in terms]
        if bool(torch.stack(finite).all()):
            return
        j = next(j for j, ok in enumerate(finite) if not ok)
        what = "loss" if not torch.isfinite(terms[j].lm) else "memory"
        stream = sample.get("stream", {})
        logger.warning(f"non-finite {what} at update {stream.get('update')}, {stream.get('split')} batch "
                       f"{stream.get('index')}, segment {j + 1} of {len(terms)}")

    def check_model(self, num_mem_tokens: int, mem_len: int, memory_target_token: bool):
        """One-line error for flags that do not fit the model."""
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

    # ------------------------------------------------------------------ the BPTT schedule
    def schedule(self, model, epoch=1):
        """The schedule function for this model in this epoch (module docstring); no memory means depth 0."""
        depth = at_epoch(self.depths, epoch) if model.decoder.num_mem_tokens > 0 else 0
        if self.bptt_mode == "sliding" and depth > 0:
            return lambda segments, carried, run_chain: sliding_schedule(segments, carried, depth, run_chain)
        if self.bptt_mode == "prefix" and depth > 0:
            return lambda segments, carried, run_chain: prefix_schedule(segments, carried, depth, run_chain)
        return lambda segments, carried, run_chain: chunk_schedule(segments, carried, depth, run_chain)

    def unroll(self, model, segments, carried: CarriedState, epoch=1):
        """Run ``segments`` [(tokens, target), ...] keeping every graph; returns the scored segments'
        results and the state to carry (validation, and the tests that read gradients per segment)."""
        results = []

        def run_chain(start, chain, scored_from, starts=None):
            end, chain_results = self.run_chain(model, start, chain, scored_from, starts=starts)
            results.extend(chain_results)
            return end

        return results, self.schedule(model, epoch)(segments, carried, run_chain)

    def unroll_with_backward(self, model, segments, carried: CarriedState, backward, epoch=1):
        """Training: like :meth:`unroll`, but every chain is back-propagated (``backward(objective)``)
        as soon as it has run and its graph freed, so only one chain's activations are alive at a
        time (one segment's with ``--memory-replay``). Returns the detached terms of the scored
        segments and the state to carry."""
        terms = []

        def run_chain(start, chain, scored_from, starts=None):
            if self.memory_replay and len(chain) > 1:
                return self.replay_chain(model, start, chain, scored_from, backward, terms, starts)
            end, results = self.run_chain(model, start, chain, scored_from, starts=starts)
            chain_terms = [self.segment_terms(model, r) for r in results]
            backward(sum(self.objective(t) for t in chain_terms))
            terms.extend(t.detach() for t in chain_terms)
            return end

        return terms, self.schedule(model, epoch)(segments, carried, run_chain)

    def run_chain(self, model, state, chain, scored_from, boundaries=None, starts=None):
        """Run ``chain`` [(tokens, target), ...] from ``state``; ``chain[scored_from:]`` are scored
        (``run_segment``), the others only re-run for their memory. Returns the end state and the
        scored results; ``boundaries`` (a list) gets the state and RNG state before each segment,
        ``starts`` (a list) the state before each segment, detached."""
        results = []
        for i, (tokens, target) in enumerate(chain):
            if boundaries is not None:
                boundaries.append((state, _rng_state(tokens.device)))
            if starts is not None:
                starts.append(state.detach() if state is not None else None)
            if i >= scored_from:
                results.append(self.run_segment(model, tokens, target, state))
                state = results[-1].net_output[1]["state"]
            else:
                state = model(tokens, state=state)[1]["state"]
        return state, results

    def replay_chain(self, model, start, chain, scored_from, backward, terms, starts=None):
        """Memory-replay backprop of one chain (Memformer; ``--memory-replay``): run it without a
        graph, keeping only the state (and RNG state) each segment starts from, then recompute the
        segments in reverse, one graph at a time. Segment i back-propagates its own objective plus,
        through the memory it wrote, the gradient that segment i+1 left on its input memory. With
        the RNG state restored, dropout draws the same masks, so the gradients equal the plain
        chain's. Example, a chain s0 s1 s2 from a detached memory M0::

            no graph: M0 -> s0 -> M1 -> s1 -> M2                  keep (M0, rng0), (M1, rng1), (M2, rng2)
            s2 from leaf M2: backward loss(s2)                     -> g2 = dM2, and M3 to carry on
            s1 from leaf M1: backward loss(s1) + <M2', g2>         -> g1 = dM1
            s0 from M0 (detached): backward loss(s0) + <M1', g1>

        Returns the end state (detached); appends the scored segments' detached terms to ``terms``
        and, if given, the state each segment started with to ``starts``.
        """
        device = chain[0][0].device
        boundaries = []
        with torch.no_grad():  # the last segment needs no run here: it is recomputed first
            last_start, _ = self.run_chain(model, start, chain[:-1], scored_from, boundaries)
        boundaries.append((last_start, _rng_state(device)))
        if starts is not None:
            starts.extend(state.detach() if state is not None else None for state, _ in boundaries)
        chain_terms, memory_grad = [], None
        for i in reversed(range(len(chain))):
            state, rng = boundaries[i]
            _set_rng_state(rng, device)
            memory = state.memory if state is not None else None
            if i > 0 and memory is not None:
                memory = memory.detach().requires_grad_()
                state = RMTState(memory, state.cache)
            out, results = self.run_chain(model, state, chain[i:i + 1], 0 if i >= scored_from else 1)
            if i == len(chain) - 1:  # what the plain chain ends with: its state and RNG state
                end, rng_after = out.detach(), _rng_state(device)
            segment_terms = [self.segment_terms(model, r) for r in results]
            objective = sum(self.objective(t) for t in segment_terms)
            if memory_grad is not None:
                objective = objective + _MemoryGradient.apply(out.memory, memory_grad)
            backward(objective)
            memory_grad = memory.grad if i > 0 and memory is not None else None
            chain_terms[:0] = [t.detach() for t in segment_terms]
        terms.extend(chain_terms)
        _set_rng_state(rng_after, device)
        return end

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
            if getattr(model.decoder, "adaptive_softmax", None) is not None:
                raise ValueError("--report-accuracy needs a full softmax (drop --adaptive-softmax-cutoff)")
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

    def objective(self, terms: SegmentTerms) -> Tensor:
        """What training minimises for one segment: ``lm + w * memory_only + w' * memory_token``."""
        objective = terms.lm
        if terms.memory_only is not None:
            objective = objective + self.memory_only_loss_weight * terms.memory_only
        if terms.memory_token is not None:
            objective = objective + self.memory_token_loss_weight * terms.memory_token
        return objective

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
            for key in ("segments_per_sample", "bptt_depth"):
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
