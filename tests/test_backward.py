"""Training back-propagates chain by chain (``bptt.BackwardRunner``) and, with ``--memory-replay``,
segment by segment from recomputation: the same gradients as one backward of the summed loss
(float64, dropout on), and peak saved activations that do not grow with K nor with the depth."""

from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary

from rmt_plugin.criterion import CarriedState, RMTLMCriterion
from rmt_plugin.measure import saved_tensor_peak
from rmt_plugin.model import RMTConfig, RMTLanguageModel

SEG_LEN = 4
VARIANTS = {
    "rmt": dict(model=dict(num_mem_tokens=2), criterion={}),
    # Tr-XL + RMT with both extra losses: the cache is carried, the memory-only run re-run
    "rmt_xl_extra_losses": dict(model=dict(num_mem_tokens=2, mem_len=SEG_LEN, memory_target_token=True),
                                criterion=dict(memory_only_loss_weight=0.5, memory_token_loss_weight=0.3)),
    "adaptive_softmax": dict(model=dict(num_mem_tokens=2, adaptive_softmax_cutoff="10,20"), criterion={}),
}


def make_task(segments_per_sample=1):
    dictionary = Dictionary()
    for i in range(36 - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    return SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary,
                           cfg=SimpleNamespace(tokens_per_sample=SEG_LEN, segments_per_sample=segments_per_sample))


def make_model(task, d_model=16, dropout=0.1, **overrides):
    torch.manual_seed(0)
    cfg = RMTConfig(n_layer=2, d_model=d_model, n_head=2, d_head=d_model // 2, d_inner=2 * d_model,
                    dropout=dropout, dropatt=dropout, **overrides)
    return RMTLanguageModel.build_model(cfg, task).double().train()


def sample_of(num_segments, bsz=2, seed=1):
    tokens = torch.randint(4, 36, (bsz, num_segments * SEG_LEN), generator=torch.Generator().manual_seed(seed))
    return {"net_input": {"src_tokens": tokens}, "target": tokens.roll(-1, dims=1)}


def gradients(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def train_batch(criterion, model, sample, carried, per_chain):
    """One training batch from ``carried``: per-chain backwards, or one backward of the summed loss."""
    torch.manual_seed(2)  # the same dropout masks for every schedule
    if per_chain:
        loss, _, log, next_carried = criterion.forward_with_state(model, sample, carried,
                                                                  backward=lambda objective: objective.backward())
    else:
        loss, _, log, next_carried = criterion.forward_with_state(model, sample, carried)
        loss.backward()
    return loss.detach(), log, next_carried, gradients(model), torch.get_rng_state()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["chunk", "sliding", "prefix", "authors"])
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("replay", [False, True])
def test_gradients_equal_one_backward_of_the_summed_loss(variant, mode, depth, replay):
    spec = VARIANTS[variant]
    task = make_task()
    model = make_model(task, **spec["model"])
    criterion = RMTLMCriterion(task, bptt_depth=depth, bptt_mode=mode, memory_replay=replay, **spec["criterion"])
    with torch.no_grad():  # a previous batch: carried memory, cache and sliding history
        _, _, _, carried = criterion.forward_with_state(model, sample_of(depth + 1, seed=0), None)
    sample = sample_of(4)
    reference = train_batch(criterion, model, sample, carried, per_chain=False)
    trained = train_batch(criterion, model, sample, carried, per_chain=True)
    assert not trained[0].requires_grad
    torch.testing.assert_close(trained[0], reference[0], rtol=0, atol=1e-9)
    assert trained[1].keys() == reference[1].keys()
    assert trained[3].keys() == reference[3].keys()
    for name, grad in reference[3].items():
        torch.testing.assert_close(trained[3][name], grad, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(trained[2].model_state.memory, reference[2].model_state.memory, rtol=0, atol=1e-9)
    assert torch.equal(trained[4], reference[4])  # the next batch draws the same dropout masks


def peak_saved_bytes(segments, depth, replay, mode="chunk"):
    """Peak bytes saved for backward over one training batch of ``segments`` segments."""
    task = make_task(segments)
    model = make_model(task, d_model=32, dropout=0.0, num_mem_tokens=4)
    criterion = RMTLMCriterion(task, bptt_depth=depth, bptt_mode=mode, memory_replay=replay)
    with saved_tensor_peak() as meter:
        criterion.forward_with_state(model, sample_of(segments, bsz=4), None, backward=lambda o: o.backward())
    assert meter["live"] == 0
    return meter["peak"]


def test_peak_activations_follow_the_chain_not_the_batch():
    # chunk mode back-propagates every chain of depth+1 segments before the next one runs
    assert peak_saved_bytes(6, depth=1, replay=False) == peak_saved_bytes(2, depth=1, replay=False)


@pytest.mark.parametrize("mode", ["chunk", "sliding", "prefix", "authors"])
def test_memory_replay_peak_does_not_grow_with_depth(mode):
    plain = peak_saved_bytes(5, depth=4, replay=False, mode=mode)
    replay = peak_saved_bytes(5, depth=4, replay=True, mode=mode)
    depth_0 = peak_saved_bytes(5, depth=0, replay=True, mode=mode)
    assert replay <= 1.3 * depth_0  # the goal
    assert plain >= 4 * depth_0  # what replay saves: without it the depth-4 chain is alive at once


def test_memory_replay_peak_does_not_grow_with_segments_per_sample():
    assert peak_saved_bytes(5, depth=0, replay=True) <= 1.2 * peak_saved_bytes(1, depth=0, replay=True)


@pytest.mark.parametrize("mode", ["chunk", "sliding", "prefix"])
def test_memory_replay_gradients_scale_with_the_loss_scale_once(mode):
    # fp16/AMP's optimizer.backward multiplies every objective by the loss scale; the gradient handed
    # from segment to segment already carries it and must not be scaled again
    task = make_task()
    model = make_model(task, num_mem_tokens=2)
    criterion = RMTLMCriterion(task, bptt_depth=2, bptt_mode=mode, memory_replay=True)
    sample = sample_of(3)
    reference = train_batch(criterion, model, sample, None, per_chain=True)[3]
    torch.manual_seed(2)
    criterion.forward_with_state(model, sample, None, backward=lambda objective: (objective * 1024).backward())
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, 1024 * reference[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("mode, forwards", [("chunk", 4 + 3), ("sliding", 4 * 4 + 4 * 3), ("prefix", 7 + 6)])
def test_memory_replay_costs_depth_more_forwards_per_chain(mode, forwards):
    # K=4, depth 3: chunk is one chain of 4 segments; sliding, 4 chains of 4 (segment + 3 re-runs);
    # prefix, one chain of 3 re-run + 4 segments
    task = make_task()
    model = make_model(task, num_mem_tokens=2)
    calls = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    criterion = RMTLMCriterion(task, bptt_depth=3, bptt_mode=mode, memory_replay=True)
    _, _, _, carried = criterion.forward_with_state(model, sample_of(4, seed=0), None, backward=lambda o: o.backward())
    calls.clear()  # the second batch: the sliding windows are full
    criterion.forward_with_state(model, sample_of(4), carried, backward=lambda o: o.backward())
    assert len(calls) == forwards
