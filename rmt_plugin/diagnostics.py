"""Memory diagnostics: how much loss the memory and the cache save, and where in the stream.

``--memory-diagnostics`` (task ``rmt_lm``) scores every segment of validation and of
``fairseq-eval-lm`` several ways from the same incoming state: as the model runs it (memory and
cache carried); with the memory reset to its learned start value (cache kept), or the cache
emptied (memory kept); and with the memory, or the cache, of *another stream* of the batch
(rows rolled by one: row i gets row i+1's). Then, in bits per token,

    memory gain       = loss(memory reset at every segment)        - loss(carried)
    memory swap gain  = loss(another stream's memory every segment) - loss(carried)
    cache gain, cache swap gain: the same for the cache

A near-zero gain means the model predicts as well without the state. A positive *reset* gain
alone does not show that the state carries the stream's content: a model trained on carried
memory also loses when it gets a start memory it rarely saw (MemTr, whose memory cannot see its
segment, has a reset gain as large as RMT's on WikiText-2). The *swap* gain keeps a memory of the
kind the model always sees, only from the wrong stream, so it measures the content; it needs a
batch of at least 2 streams (not logged with ``--batch-size 1``). The carried loss is also reported by segment index since the
stream start, in buckets ``0, 1, 2-3, 4-7, ...``: with useful memory the loss falls over the
first segments and then stays flat. Example, 2 segments, one token each, RMT without a cache::

    segment index        0      1
    carried nll          3.0    2.0     (segment 1 reads the memory segment 0 wrote)
    memory reset nll     3.0    2.6     (segment 0 starts fresh either way)
    memory gain = ((3.0 + 2.6) - (3.0 + 2.0)) / 2 tokens = 0.3 nats = 0.43 bits

The counts travel in fairseq logging outputs (summable, so data parallel adds them up) and
become the metrics ``memory_gain``, ``memory_swap_gain``, ``cache_gain``, ``cache_swap_gain`` and
``loss_seg_<bucket>``. In
``fairseq-eval-lm`` the stream's :class:`StreamDiagnostics` logs them at the end of the pass
and, with ``--memory-diagnostics-file``, writes them (and the loss by position within the
segment) as JSON for ``scripts/plot_memory_diagnostics.py``.
"""

import json
import logging
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .model import RMTState

logger = logging.getLogger(__name__)

PREFIX = "diag_"
# scored variant -> the gain it gives (its loss minus the carried loss)
GAINS = {"memory_reset": "memory_gain", "memory_swap": "memory_swap_gain",
         "cache_reset": "cache_gain", "cache_swap": "cache_swap_gain"}


def bucket_label(segment_index: int) -> str:
    """``0``, ``1``, ``2-3``, ``4-7``, ...: segment indices since the stream start, log-spaced."""
    if segment_index < 2:
        return str(segment_index)
    low = 1 << (segment_index.bit_length() - 1)
    return f"{low}-{2 * low - 1}"


def bucket_start(label: str) -> int:
    return int(label.split("-")[0])


def token_nll(model, net_output, target: Tensor) -> Tensor:
    """Per-token negative log-likelihood [B, T] in nats (full or adaptive softmax)."""
    return -getattr(model, "decoder", model).target_log_prob(net_output[0], target)


def reset_states(model, state: Optional[RMTState], batch_size: int) -> Dict[str, Optional[RMTState]]:
    """The incoming state with the memory, or the cache, replaced by a fresh one or by another
    stream's (row i gets row i+1's; only with 2 or more rows).

    A part the model does not have is left out; a fresh stream (``state is None``) resets to
    itself, so those tokens count with zero gain.
    """
    decoder = getattr(model, "decoder", model)  # eval-lm hands over the decoder itself
    swap = batch_size > 1
    variants = {}
    if decoder.num_mem_tokens > 0:
        variants["memory_reset"] = None if state is None else RMTState(None, state.cache)
        if swap:
            variants["memory_swap"] = None if state is None else RMTState(_other_stream(state.memory), state.cache)
    if decoder.mem_len > 0:
        variants["cache_reset"] = None if state is None else RMTState(state.memory, None)
        if swap:
            variants["cache_swap"] = None if state is None else RMTState(
                state.memory, None if state.cache is None else [_other_stream(c) for c in state.cache])
    return variants


def _other_stream(rows: Optional[Tensor]) -> Optional[Tensor]:
    return None if rows is None else rows.roll(-1, dims=0)


def score_segment(model, tokens: Tensor, target: Tensor, state: Optional[RMTState],
                  carried_output) -> Dict[str, Tensor]:
    """Per-token nll [B, T] of one segment: carried (from ``carried_output``) and each reset."""
    scores = {"carried": token_nll(model, carried_output, target)}
    for name, variant_state in reset_states(model, state, tokens.size(0)).items():
        scores[name] = scores["carried"] if variant_state is state else token_nll(
            model, model(tokens, state=variant_state), target)
    return scores


def segment_counts(scores: Dict[str, Tensor], segment_index: int) -> Dict[str, float]:
    """Summable logging counts of one segment's scores (``diag_<variant>@<bucket>``)."""
    label = bucket_label(segment_index)
    counts = {f"{PREFIX}ntokens@{label}": scores["carried"].numel()}
    for name, nll in scores.items():
        counts[f"{PREFIX}{name}@{label}"] = nll.sum().item()
    return counts


def add_counts(total: Dict[str, float], counts: Dict[str, float]) -> Dict[str, float]:
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value
    return total


@torch.no_grad()
def diagnose_batch(model, sample, state: Optional[RMTState], segment_length: int,
                   segments_per_sample: int) -> Dict[str, float]:
    """Counts for every segment of a validation batch, run in order from ``state``."""
    tokens, target = sample["net_input"]["src_tokens"], sample["target"]
    first = sample["stream"]["index"] * segments_per_sample  # only the last batch is narrower
    total: Dict[str, float] = {}
    for j, (seg_tokens, seg_target) in enumerate(zip(tokens.split(segment_length, dim=1),
                                                     target.split(segment_length, dim=1))):
        seg_tokens, seg_target = seg_tokens.contiguous(), seg_target.contiguous()
        output = model(seg_tokens, state=state)
        add_counts(total, segment_counts(score_segment(model, seg_tokens, seg_target, state, output), first + j))
        state = output[1]["state"]
    return total


def summarize(counts: Dict[str, float]) -> Dict[str, object]:
    """Bits per token: the loss, each gain, and the carried loss by segment-index bucket."""
    per_bucket: Dict[str, Dict[str, float]] = {}
    for key, value in counts.items():
        if key.startswith(PREFIX) and "@" in key:
            name, label = key[len(PREFIX):].split("@")
            per_bucket.setdefault(label, {})[name] = value
    if not per_bucket:
        return {}
    n = sum(b["ntokens"] for b in per_bucket.values())
    bits = 1.0 / math.log(2)
    carried = sum(b["carried"] for b in per_bucket.values())
    summary: Dict[str, object] = {"ntokens": n, "loss": carried / n * bits}
    for variant, gain in GAINS.items():
        if all(variant in b for b in per_bucket.values()):
            summary[gain] = (sum(b[variant] for b in per_bucket.values()) - carried) / n * bits
    summary["loss_by_segment"] = {
        label: b["carried"] / b["ntokens"] * bits
        for label, b in sorted(per_bucket.items(), key=lambda item: bucket_start(item[0]))
    }
    return summary


def reduce_metrics(logging_outputs: List[dict]) -> None:
    """fairseq metrics ``memory_gain``, ``cache_gain``, their swap gains and ``loss_seg_<bucket>``
    (bits per token)."""
    from fairseq import metrics

    counts: Dict[str, float] = {}
    for log in logging_outputs:
        add_counts(counts, {k: v for k, v in log.items() if k.startswith(PREFIX)})
    summary = summarize(counts)
    if not summary:
        return
    weight = summary["ntokens"]
    for gain in GAINS.values():
        if gain in summary:
            metrics.log_scalar(gain, summary[gain], weight, round=4)
    for label, loss in summary["loss_by_segment"].items():
        metrics.log_scalar(f"loss_seg_{label}", loss, weight, round=3)


class StreamDiagnostics:
    """Diagnostics of one ``fairseq-eval-lm`` pass: fed every segment, reports after the last."""

    def __init__(self, split: str, num_batches: int, out_file: Optional[str] = None):
        self.split = split
        self.num_batches = num_batches
        self.out_file = out_file
        self.seen = 0
        self.counts: Dict[str, float] = {}
        self.position_nll: Dict[str, Tensor] = {}
        self.position_tokens: Optional[Tensor] = None

    @torch.no_grad()
    def observe(self, model, tokens: Tensor, target: Tensor, state: Optional[RMTState], output) -> None:
        scores = score_segment(model, tokens, target, state, output)
        add_counts(self.counts, segment_counts(scores, self.seen))
        self._add_positions(scores)
        self.seen += 1
        if self.seen == self.num_batches:
            self.report()

    def _add_positions(self, scores: Dict[str, Tensor]) -> None:
        width = scores["carried"].size(1)
        if self.position_tokens is None or self.position_tokens.numel() < width:
            grow = width - (0 if self.position_tokens is None else self.position_tokens.numel())
            pad = torch.zeros(grow, dtype=torch.float64)
            self.position_tokens = pad if self.position_tokens is None else torch.cat([self.position_tokens, pad])
            for name in scores:
                old = self.position_nll.get(name, torch.zeros(0, dtype=torch.float64))
                self.position_nll[name] = torch.cat([old, torch.zeros(grow, dtype=torch.float64)])
        self.position_tokens[:width] += scores["carried"].size(0)
        for name, nll in scores.items():
            self.position_nll[name][:width] += nll.double().sum(0).cpu()

    def summary(self) -> Dict[str, object]:
        summary = summarize(self.counts)
        bits = 1.0 / math.log(2)
        summary["loss_by_position"] = {
            name: (nll / self.position_tokens * bits).tolist() for name, nll in self.position_nll.items()
        }
        return summary

    def report(self) -> None:
        summary = self.summary()
        gains = ", ".join(f"{g.replace('_', ' ')} {summary[g]:+.4f}" for g in GAINS.values()
                          if g in summary)
        by_segment = ", ".join(f"{k}: {v:.4f}" for k, v in summary["loss_by_segment"].items())
        logger.info(f"memory diagnostics on {self.split} (bits/token): loss {summary['loss']:.4f}"
                    f"{', ' + gains if gains else ''}; loss by segment index since the stream start: {by_segment}")
        if self.out_file:
            with open(self.out_file, "w") as f:
                json.dump(dict(summary, split=self.split), f, indent=1)
            logger.info(f"memory diagnostics written to {self.out_file}")
