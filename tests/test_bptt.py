"""The BPTT engine on its own, without fairseq or the model: a toy state and step record which
segments each chain runs, from which state, and which are scored, for every schedule, and the
runners' contracts (outputs in order, detached where promised, the start states)."""

from typing import NamedTuple, Optional

import pytest
import torch

from rmt_plugin import bptt


class Toy(NamedTuple):
    """A state with a memory (the sum of the segment ids it has seen) and a cache (the last id)."""

    memory: torch.Tensor
    cache: Optional[int] = None

    def detach(self):
        return Toy(self.memory.detach(), self.cache)


def recording_step(log):
    """step(state, tokens, target): the memory adds the segment's id; logs (id, memory, cache, scored)."""

    def step(state, tokens, target):
        memory = torch.zeros(()) if state is None else state.memory
        log.append((int(tokens), float(memory), None if state is None else state.cache, target is not None))
        out = memory + tokens
        return (out * 1.0 if target is not None else None), Toy(out, int(tokens))

    return step


def segments(*ids):
    return [(torch.tensor(float(i)), torch.tensor(0.0)) for i in ids]


def run(mode, depth, batches):
    log, outputs = [], []
    carried = bptt.CarriedState(None)
    runner = bptt.PlainRunner(recording_step(log))
    for batch in batches:
        out, carried = bptt.unroll(segments(*batch), carried, mode, depth, runner)
        outputs.append([float(o) for o in out])
    return log, outputs, carried


def test_chunk_cuts_chains_of_depth_plus_one_and_scores_every_segment():
    log, outputs, carried = run("chunk", 2, [[1, 2, 3, 4, 5, 6]])
    assert [(i, m, scored) for i, m, _, scored in log] == [
        (1, 0, True), (2, 1, True), (3, 3, True), (4, 6, True), (5, 10, True), (6, 15, True)]
    assert outputs == [[1, 3, 6, 10, 15, 21]] and float(carried.model_state.memory) == 21


def test_sliding_reruns_the_previous_segments_from_the_memory_the_oldest_started_with():
    log, outputs, _ = run("sliding", 2, [[1, 2], [3]])
    # segment 3 (next batch): re-run 1 and 2 from the memory 1 started with (0), then 3
    assert log[-3:] == [(1, 0, None, False), (2, 1, 1, False), (3, 3, 2, True)]
    assert outputs == [[1, 3], [6]]


def test_prefix_reruns_the_previous_batch_tail_once_then_the_whole_batch():
    log, outputs, _ = run("prefix", 1, [[1, 2], [3, 4]])
    assert log[2:] == [(2, 1, 1, False), (3, 3, 2, True), (4, 6, 3, True)]
    assert outputs == [[1, 3], [6, 10]]


def test_authors_reruns_from_the_newest_memory_each_segment_with_its_own_cache():
    log, outputs, _ = run("authors", 2, [[1, 2], [3]])
    # segment 2: re-run 1 from the newest memory (1), with the cache 1 started with (none); 2 then
    # reads the cache that re-run wrote
    assert log[1:3] == [(1, 1, None, False), (2, 2, 1, True)]
    # segment 3: the newest memory is 4 (2's output); 1 re-run with its cache (none), 2 with its own (1)
    assert log[3:] == [(1, 4, None, False), (2, 5, 1, False), (3, 7, 2, True)]
    assert outputs == [[1, 4], [10]]


@pytest.mark.parametrize("mode", list(bptt.SCHEDULES))
def test_depth_0_is_one_chain_per_segment_whatever_the_mode(mode):
    log, outputs, _ = run(mode, 0, [[1, 2], [3]])
    assert [(i, m, scored) for i, m, _, scored in log] == [(1, 0, True), (2, 1, True), (3, 3, True)]


def test_backward_runner_backpropagates_each_chain_and_returns_detached_outputs():
    weight = torch.ones((), requires_grad=True)
    chains = []

    def step(state, tokens, target):
        memory = weight * 0 if state is None else state.memory
        out = memory + weight * tokens
        return (out if target is not None else None), Toy(out)

    runner = bptt.BackwardRunner(step, objective=lambda outs: sum(outs), backward=lambda o: (chains.append(1),
                                                                                          o.backward()))
    outputs, carried = bptt.unroll(segments(1, 2, 3, 4), bptt.CarriedState(None), "chunk", 1, runner)
    assert len(chains) == 2 and all(not o.requires_grad for o in outputs)
    assert not carried.model_state.memory.requires_grad
    # d/dw of (1w) + (1w + 2w) and, from a detached 3w, (3w + 3w) + (3w + 3w + 4w)
    assert float(weight.grad) == 1 + 3 + 3 + 7


def test_the_engine_imports_neither_fairseq_nor_the_rest_of_the_plugin():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(bptt.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] if node.level == 0 else "." for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= {"typing", "torch"}, imported
