"""The BPTT engine: how a batch's segments run, carrying memory, and how their losses back-propagate.

Free of fairseq: it runs a ``step`` the criterion hands it and knows of the model's state only
that it has a ``memory`` (and a ``cache``), a ``detach()`` and ``_replace`` (``RMTState``).

Words. A batch row holds K consecutive segments s0..s(K-1) of T tokens. A *chain* is a run of
segments from a start state, the memory flowing from one to the next with its graph; a chain
starts from a detached memory, so chains are independent for the backward. Some segments of a
chain are only *re-run* for the memory they write (their loss is not taken): the chain's segments
from ``scored_from`` on are scored. A *schedule* cuts a batch into chains (``SCHEDULES``, below:
one function each); a *runner* runs one chain (plain, back-propagating, or memory replay). With
BPTT depth k a scored segment's loss reaches the memory of at most k previous segments.

One batch, K=4, chunk schedule, k=1, back-propagating runner::

    unroll: chunk_schedule cuts [s0 s1 s2 s3] into chains [s0 s1], [s2 s3]
            BackwardRunner: M2 = run [s0 s1] from M0; backward(loss s0 + loss s1); free the graph
                            M4 = run [s2 s3] from M2.detach(); backward(...)
            -> the detached outputs of s0..s3 and CarriedState(M4.detach()) for the next batch

``step(state, tokens, target) -> (output, next_state)`` is the criterion's: the model's forward
on one segment, and for a scored segment (``target`` not None) what the criterion makes of it
(``output``; None for a re-run segment). ``objective(outputs)`` is what training minimises for a
chain's scored outputs, ``backward(objective)`` back-propagates it (fairseq's
``optimizer.backward``, so fp16/AMP loss scaling applies). Gradients of several chains
accumulate, as fairseq's do over ``--update-freq``.
"""

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

Step = Callable[[Any, Tensor, Optional[Tensor]], Tuple[Any, Any]]


class CarriedState(NamedTuple):
    """What one batch hands to the next: the model's state (memory, cache) after its last segment,
    and for the schedules that re-run segments of the previous batch the last ones with the state
    each started from."""

    model_state: Any
    history: Tuple[Tuple[Tensor, Any], ...] = ()  # sliding, prefix, authors: (tokens, state at start)


class Link(NamedTuple):
    """One segment of a chain. ``target`` None: re-run only. ``cache``: where a re-run segment
    reads a cache of its own instead of the one the chain carries (the authors' schedule)."""

    tokens: Tensor
    target: Optional[Tensor] = None
    own_cache: bool = False
    cache: Any = None


class ChainResult(NamedTuple):
    end: Any  # the state after the chain's last segment (with its graph, for the plain runner)
    outputs: List[Any]  # the scored segments' outputs, in order
    starts: List[Any]  # the state each segment started from, detached


def detached(state):
    return None if state is None else state.detach()


def _enter(state, link: Link):
    """The state ``link`` starts from: the chain's, or with the link's own cache. (A chain starts
    from no state only at a stream's start, where there is nothing to re-run.)"""
    return state if not link.own_cache or state is None else state._replace(cache=link.cache)


# ----------------------------------------------------------------------------------- schedules
def chunk_schedule(segments, carried: CarriedState, depth: int, run) -> CarriedState:
    """``chunk``: chains of depth+1 segments, all scored, the memory detached at every chain start
    (and at every batch start: a backward cannot reach into the previous batch). K=6, k=2::

        | s0 -> s1 -> s2 | s3 -> s4 -> s5 |      loss(s2) reaches s0, loss(s1) only s0..s1
    """
    state = carried.model_state
    for first in range(0, len(segments), depth + 1):
        chain = [Link(tokens, target) for tokens, target in segments[first:first + depth + 1]]
        state = run(detached(state), chain, 0).end
    return CarriedState(detached(state))


def sliding_schedule(segments, carried: CarriedState, depth: int, run) -> CarriedState:
    """``sliding``: one chain per segment, its previous ``depth`` segments re-run (not scored) from
    the memory the oldest of them started with, then the segment itself: every segment reaches
    exactly k back, across batch borders, for k+1 forwards per segment. k=2, history (a, Ma),
    (b, Mb) carried from the previous batch, memory Mc, segments c, d::

        Md = run(Ma, [a, b, c], 2).end.detach(); Me = run(Mb, [b, c, d], 2).end.detach()
        carry Me and the history (c, Mc), (d, Md)
    """
    history, state = list(carried.history), carried.model_state
    for tokens, target in segments:
        window = history[-depth:]
        start = window[0][1] if window else state
        chain = [Link(past) for past, _ in window] + [Link(tokens, target)]
        end = run(start, chain, len(window)).end
        history = (history + [(tokens, state)])[-depth:]
        state = detached(end)
    return CarriedState(state, tuple(history))


def prefix_schedule(segments, carried: CarriedState, depth: int, run) -> CarriedState:
    """``prefix``: one chain per batch, the previous batch's last ``depth`` segments re-run (not
    scored) from the memory the oldest of them started with, then every segment of the batch:
    every loss reaches at least k back, the batch's first segments included, for (K+k)/K forwards
    per segment. k=2, history (a, Ma), (b, Mb) carried, segments c, d, e starting from Mc, Md, Me::

        Mf = run(Ma, [a, b, c, d, e], 2).end; carry Mf.detach() and (d, Md), (e, Me)
    """
    history = list(carried.history[-depth:])
    start = history[0][1] if history else carried.model_state
    chain = [Link(past) for past, _ in history] + [Link(tokens, target) for tokens, target in segments]
    result = run(start, chain, len(history))
    history += [(tokens, state) for (tokens, _), state in zip(segments, result.starts[len(history):])]
    return CarriedState(detached(result.end), tuple(history[-depth:]))


def authors_schedule(segments, carried: CarriedState, depth: int, run) -> CarriedState:
    """``authors``: BPTT as the paper's code (LM-RMT's training loop) runs it. Like ``sliding``, one
    chain per segment with its previous ``depth`` segments re-run, but the re-run starts from the
    *newest* memory, the one the segment itself would read, so that memory passes through the
    previous k segments a second time before the segment reads it (evaluation reads it once). Each
    re-run segment reads the cache it first ran with; the segment then reads the cache its
    predecessor's re-run wrote. k=2, history (a, (Ma, Ca)), (b, (Mb, Cb)), state (Mc, Cc)::

        Md = run(Mc, [a with Ca, b with Cb, c], 2).end.detach()    (c reads b's re-run cache)
        carry Md and the history (b, (Mb, Cb)), (c, (Mc, Cc))
    """
    history, state = list(carried.history), carried.model_state
    for tokens, target in segments:
        window = history[-depth:]
        chain = [Link(past, own_cache=True, cache=None if past_state is None else past_state.cache)
                 for past, past_state in window] + [Link(tokens, target)]
        end = run(state, chain, len(window)).end
        history = (history + [(tokens, state)])[-depth:]
        state = detached(end)
    return CarriedState(state, tuple(history))


# The --bptt-mode choices; depth 0 (or no memory) is always the chunk schedule: nothing to re-run.
SCHEDULES = {"chunk": chunk_schedule, "sliding": sliding_schedule, "prefix": prefix_schedule,
             "authors": authors_schedule}


def unroll(segments: Sequence[Tuple[Tensor, Tensor]], carried: CarriedState, mode: str, depth: int,
           runner) -> Tuple[List[Any], CarriedState]:
    """Run ``segments`` [(tokens, target), ...] under the schedule ``mode`` with BPTT depth ``depth``;
    returns the scored segments' outputs (in order) and the state to carry to the next batch."""
    schedule = SCHEDULES[mode] if depth > 0 else chunk_schedule
    outputs = []

    def run(start, chain, scored_from):
        result = runner(start, chain, scored_from)
        outputs.extend(result.outputs)
        return result

    return outputs, schedule(segments, carried, depth, run)


# ----------------------------------------------------------------------------------- runners
class PlainRunner:
    """Runs a chain keeping every graph (validation, and tests that read gradients per segment)."""

    def __init__(self, step: Step):
        self.step = step

    def __call__(self, start, chain: List[Link], scored_from: int) -> ChainResult:
        state, outputs, starts = start, [], []
        for i, link in enumerate(chain):
            state = _enter(state, link)
            starts.append(detached(state))
            output, state = self.step(state, link.tokens, link.target if i >= scored_from else None)
            if i >= scored_from:
                outputs.append(output)
        return ChainResult(state, outputs, starts)


class BackwardRunner(PlainRunner):
    """Training: back-propagates each chain's objective as soon as the chain has run and frees its
    graph, so the activations alive at once are one chain's (k+1 segments), not the batch's K.
    The gradients are those of one backward of the summed objective. Outputs come back detached."""

    def __init__(self, step: Step, objective, backward):
        super().__init__(step)
        self.objective, self.backward = objective, backward

    def __call__(self, start, chain, scored_from) -> ChainResult:
        result = super().__call__(start, chain, scored_from)
        self.backward(self.objective(result.outputs))
        return result._replace(outputs=[output.detach() for output in result.outputs])


class ReplayRunner(BackwardRunner):
    """Memory-replay backprop (Memformer; ``--memory-replay``): each chain is run without a graph,
    keeping only the state (and RNG state) each segment starts from, then recomputed segment by
    segment in reverse, one graph at a time. Segment i back-propagates its own objective plus,
    through the memory it wrote, the gradient that segment i+1 left on its input memory. With the
    RNG state restored, dropout draws the same masks, so the gradients equal the plain chain's;
    the activations alive at once are one segment's whatever the depth, for k more forwards per
    chain of k+1 segments. Example, a chain s0 s1 s2 from a detached memory M0::

        no graph: M0 -> s0 -> M1 -> s1 -> M2                  keep (M0, rng0), (M1, rng1), (M2, rng2)
        s2 from leaf M2: backward loss(s2)                     -> g2 = dM2, and M3 to carry on
        s1 from leaf M1: backward loss(s1) + <M2', g2>         -> g1 = dM1
        s0 from M0 (detached): backward loss(s0) + <M1', g1>

    Chains of one segment run as the back-propagating runner does.
    """

    def __call__(self, start, chain, scored_from) -> ChainResult:
        if len(chain) == 1:
            return super().__call__(start, chain, scored_from)
        device = chain[0].tokens.device
        boundaries = []  # (state, RNG state) before each segment
        state = start
        with torch.no_grad():  # the last segment needs no run here: it is recomputed first
            for i, link in enumerate(chain[:-1]):
                state = _enter(state, link)
                boundaries.append((state, _rng_state(device)))
                _, state = self.step(state, link.tokens, link.target if i >= scored_from else None)
        boundaries.append((_enter(state, chain[-1]), _rng_state(device)))
        outputs, memory_grad = [], None
        for i in reversed(range(len(chain))):
            state, rng = boundaries[i]
            _set_rng_state(rng, device)
            memory = state.memory if state is not None else None
            if i > 0 and memory is not None:
                memory = memory.detach().requires_grad_()
                state = state._replace(memory=memory)
            scored = i >= scored_from
            output, out = self.step(state, chain[i].tokens, chain[i].target if scored else None)
            if i == len(chain) - 1:  # what the plain chain ends with: its state and RNG state
                end, rng_after = detached(out), _rng_state(device)
            objective = self.objective([output] if scored else [])
            if memory_grad is not None:
                objective = objective + _MemoryGradient.apply(out.memory, memory_grad)
            self.backward(objective)
            memory_grad = memory.grad if i > 0 and memory is not None else None
            if scored:
                outputs.insert(0, output.detach())
        _set_rng_state(rng_after, device)
        return ChainResult(end, outputs, [detached(s) for s, _ in boundaries])


class _MemoryGradient(torch.autograd.Function):
    """A zero whose backward hands ``grad`` to ``memory``: memory replay's link between segments.
    ``grad`` was read from the next segment's backward, so it already carries the loss scale of
    fp16/AMP (``backward`` scales every objective): the incoming scale is ignored."""

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
