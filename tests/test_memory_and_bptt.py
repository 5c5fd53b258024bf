"""Memory layout, memory flow between segments and the BPTT schedule, shown with gradients."""

import math

import pytest
import torch
from fairseq import metrics

from conftest import SEG_LEN, make_model, make_task
from rmt_plugin.criterion import CarriedState, RMTLMCriterion
from rmt_plugin.model import (RMTConfig, RMTLanguageModel, RMTState, allowed_attention, build_attention_plan,
                              last_layer_first_row, relative_scores, sinusoid)

def make_criterion(task, depth, mode):
    return RMTLMCriterion(task, bptt_depth=depth, bptt_mode=mode)


def distinct_segments(num_segments, bsz=2, first_id=4):
    """Segment i uses only its own token ids, so embedding-gradient rows tell segments apart."""
    segments = []
    for i in range(num_segments):
        ids = torch.arange(first_id + i * SEG_LEN, first_id + (i + 1) * SEG_LEN)
        tokens = ids.repeat(bsz, 1)
        segments.append((tokens, tokens.roll(-1, dims=1)))
    return segments


def segment_ids(i, first_id=4):
    return list(range(first_id + i * SEG_LEN, first_id + (i + 1) * SEG_LEN))


# --------------------------------------------------------------------------- attention mask
def test_rmt_attention_mask_written_out_by_hand():
    # rows: queries r0 r1 x0 x1 x2 w0 w1; columns: keys in the same order (no cache)
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    got = allowed_attention(3, 0, 2, "rmt", mem_attend_cache=False, same_length=False, mem_len=0)
    assert torch.equal(got, expected)


def test_memtr_mask_and_cache_visibility_by_hand():
    # MemTr: [M0 M1 | x0 x1], memory sees only memory
    memtr = torch.tensor([
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed_attention(2, 0, 2, "memtr", False, False, 0), memtr)
    # RMT with a 2-position cache c0 c1 and m=1: keys [c0 c1 | r0 | x0 x1 | w0]
    no_cache_for_memory = torch.tensor([
        [0, 0, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed_attention(2, 2, 1, "rmt", False, False, 2), no_cache_for_memory)
    with_cache = no_cache_for_memory.clone()
    with_cache[0, :2] = with_cache[3, :2] = True
    assert torch.equal(allowed_attention(2, 2, 1, "rmt", True, False, 2), with_cache)


def test_same_length_gives_every_segment_token_mem_len_keys():
    # Transformer-XL: cache c0 c1 c2, segment x0 x1 x2, mem_len 3; each token sees exactly 3 keys
    expected = torch.tensor([
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed_attention(3, 3, 0, "rmt", False, True, 3), expected)


@pytest.mark.parametrize("seg_len, cache_len, m, layout, mem_attend_cache, same_length, clamp_len, cache_shift", [
    (3, 0, 2, "rmt", False, False, -1, 0), (3, 4, 2, "rmt", True, False, -1, 0), (3, 4, 0, "rmt", False, True, -1, 0),
    (3, 2, 2, "memtr", False, False, 2, 0), (3, 4, 2, "rmt", False, True, 3, 0),
    # --cache-distance stream: cached keys 2 (= m) positions later, as if the read block were not there
    (3, 4, 2, "rmt", True, False, -1, 2), (3, 4, 2, "rmt", False, True, 3, 2), (3, 2, 2, "memtr", False, False, -1, 2),
    # eval-lm's short last segment under a long cache: no allowed pair is as far as the last layer's first row
    (1, 6, 2, "rmt", False, False, -1, 2),
    (5, 3, 4, "rmt", False, False, -1, 4),
])
def test_relative_scores_are_those_of_each_allowed_pairs_distance(seg_len, cache_len, m, layout, mem_attend_cache,
                                                                   same_length, clamp_len, cache_shift):
    mem_len = max(cache_len, 1)
    plan = build_attention_plan(seg_len, cache_len, m, layout, mem_attend_cache, same_length, mem_len, clamp_len,
                                8, "cpu", cache_shift=cache_shift)
    allowed = plan.bias == 0
    q_len, k_len = allowed.shape
    torch.manual_seed(0)
    q_r, r_net = torch.randn(2, 3, q_len, 4, dtype=torch.float64), torch.randn(8, 3 * 4, dtype=torch.float64)
    r_k = (plan.pos_emb.double() @ r_net).view(-1, 3, 4).transpose(0, 1)
    scores = relative_scores(q_r, r_k, k_len, plan.max_distance, cache_len, plan.cache_shift)
    key_position = torch.tensor([j + cache_shift if j < cache_len else j for j in range(k_len)])
    distance = torch.arange(q_len)[:, None] + (k_len - q_len) - key_position[None, :]
    clamped = distance.clamp(-clamp_len, clamp_len) if clamp_len > 0 else distance
    r_pair = (sinusoid(clamped.flatten(), 8).double() @ r_net).view(q_len, k_len, 3, 4)
    by_pair = torch.einsum("bhid,ijhd->bhij", q_r, r_pair)
    torch.testing.assert_close(scores[..., allowed], by_pair[..., allowed])
    # the last layer's queries: the rows from last_layer_first_row on (the last of the keys)
    first = last_layer_first_row(m, layout)
    last_rows = relative_scores(q_r[:, :, first:], r_k, k_len, plan.max_distance, cache_len, plan.cache_shift)
    torch.testing.assert_close(last_rows[..., allowed[first:]], by_pair[:, :, first:][..., allowed[first:]])
    # only the distances allowed pairs have (and one more without memory, for a view that never overlaps)
    used = distance[allowed]
    needed = int(used.max() - used.min()) + 1
    assert len(plan.pos_emb) == max(needed, k_len + 1)


@pytest.mark.parametrize("cache_distance", ["sequence", "stream"])
def test_stream_distance_scores_the_cache_as_transformer_xl_does(monkeypatch, cache_distance):
    # Tr-XL + RMT (m=2) and Transformer-XL with the same weights: in layer 0 of the second segment the
    # segment tokens' queries and the cache (the first segment's embeddings) are the same in both, so
    # the position scores of segment rows x cached keys are equal if and only if the distances are
    import rmt_plugin.model as model_module

    task = make_task()
    scored = []
    monkeypatch.setattr(model_module, "relative_scores",
                        lambda *args: scored.append(relative_scores(*args)) or scored[-1])
    models = {}
    for m in (0, 2):
        cfg = RMTConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, num_mem_tokens=m,
                        mem_len=SEG_LEN, cache_distance=cache_distance)
        models[m] = RMTLanguageModel.build_model(cfg, task).eval()
    models[2].load_state_dict(models[0].state_dict(), strict=False)  # all but the memory embedding
    first, second = torch.randint(4, 40, (2, SEG_LEN)), torch.randint(4, 40, (2, SEG_LEN))
    to_cache = {}
    for m, model in models.items():
        state = model(first)[1]["state"]
        scored.clear()
        model(second, state=state)
        to_cache[m] = scored[0][:, :, m:m + SEG_LEN, :SEG_LEN]  # layer 0: segment rows, cached keys
    assert torch.allclose(to_cache[0], to_cache[2]) == (cache_distance == "stream")


def test_rmt_and_transformer_xl_compute_far_fewer_distances_than_the_score_matrix_spans():
    # the sizes: T=128 with m=16 (K=Q=160: 319 distances spanned), Transformer-XL mem 128 (383)
    assert len(build_attention_plan(128, 0, 16, "rmt", False, False, 0, -1, 8, "cpu").pos_emb) == 175
    assert len(build_attention_plan(128, 128, 0, "rmt", False, False, 128, -1, 8, "cpu").pos_emb) == 257


# --------------------------------------------------------------------------- information flow
def _next_segment_logits(model, first, second):
    state = model(first)[1]["state"]
    return model(second, state=state)[0]


@pytest.mark.parametrize("num_mem_tokens,mem_len,layout,flows", [
    (2, 0, "rmt", True),      # RMT: memory carries the segment forward
    (0, 0, "rmt", False),     # baseline: segments are independent
    (0, 3, "rmt", True),      # Transformer-XL: the cache carries it
    (2, 0, "memtr", False),   # MemTr in a decoder: memory cannot read the causal segment
])
def test_perturbing_a_token_reaches_the_next_segment_only_through_memory(num_mem_tokens, mem_len, layout, flows):
    task = make_task()
    model = make_model(task, num_mem_tokens, mem_len, layout)
    first = torch.tensor([[5, 6, 7]])
    perturbed = torch.tensor([[5, 9, 7]])
    second = torch.tensor([[10, 11, 12]])
    with torch.no_grad():
        changed = not torch.allclose(_next_segment_logits(model, first, second),
                                     _next_segment_logits(model, perturbed, second))
    assert changed == flows


def test_first_segment_reads_the_learned_memory_and_later_ones_the_written_memory():
    task = make_task()
    model = make_model(task, num_mem_tokens=2)
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    _, extra = model(tokens)
    memory = extra["state"].memory
    assert memory.shape == (2, 2, 16)
    assert memory.requires_grad  # the write outputs keep their graph until the criterion detaches
    fresh = model.decoder._read_memory(None, 2)
    assert torch.equal(fresh[0], fresh[1])
    assert not torch.allclose(memory[0], memory[1])  # each stream wrote its own memory


# --------------------------------------------------------------------------- BPTT depth
def segment_loss(criterion, model, result):
    return criterion.segment_loss(model, result.net_output, result.target)


def _embedding_grad_rows(model, loss):
    (grad,) = torch.autograd.grad(loss, model.decoder.embed_tokens.weight, allow_unused=True)
    return grad


@pytest.mark.parametrize("mode", ["chunk", "sliding"])
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_loss_reaches_exactly_depth_segments_back(mode, depth):
    task = make_task(vocab_size=4 + 8 * SEG_LEN)
    model = make_model(task, num_mem_tokens=2)
    criterion = make_criterion(task, depth, mode)
    segments = distinct_segments(2 * (depth + 1))
    results, _ = criterion.unroll(model, segments, CarriedState(None))
    j = len(segments) - 1  # last of its chunk in chunk mode
    grad = _embedding_grad_rows(model, segment_loss(criterion, model, results[j]))
    for i in range(j - depth, j + 1):
        assert grad[segment_ids(i)].abs().sum() > 0, f"segment {i} should receive gradient from {j}"
    for i in range(0, j - depth):
        assert torch.count_nonzero(grad[segment_ids(i)]) == 0, f"segment {i} is beyond depth {depth}"


def test_chunk_mode_restarts_the_depth_at_each_chunk():
    task = make_task(vocab_size=4 + 4 * SEG_LEN)
    model = make_model(task)
    criterion = make_criterion(task, 1, "chunk")
    results, _ = criterion.unroll(model, distinct_segments(4), CarriedState(None))
    grad = _embedding_grad_rows(model, segment_loss(criterion, model, results[2]))  # first of chunk 2
    assert grad[segment_ids(2)].abs().sum() > 0
    assert torch.count_nonzero(grad[segment_ids(1)]) == 0


def test_sliding_depth_holds_across_batch_borders():
    task = make_task(vocab_size=4 + 5 * SEG_LEN)
    model = make_model(task)
    criterion = make_criterion(task, 2, "sliding")
    carried = CarriedState(None)
    for tokens, target in distinct_segments(4):  # one segment per batch, like Transformer-XL
        sample = {"net_input": {"src_tokens": tokens}, "target": target}
        loss, _, _, carried = criterion.forward_with_state(model, sample, carried)
    grad = _embedding_grad_rows(model, loss)  # loss of segment 3
    assert grad[segment_ids(1)].abs().sum() > 0
    assert torch.count_nonzero(grad[segment_ids(0)]) == 0


def unroll_batches(criterion, model, batches):
    """Unroll consecutive batches of segments, carrying the state; the last batch's results."""
    carried = CarriedState(None)
    for segments in batches:
        results, carried = criterion.unroll(model, segments, carried)
    return results


def test_prefix_mode_reaches_at_least_depth_segments_back_across_the_batch_border():
    # K=3, k=2: batch 1 holds segments 0-2, batch 2 segments 3-5, re-running 1 and 2 as its prefix
    task = make_task(vocab_size=4 + 6 * SEG_LEN)
    model = make_model(task)
    segments = distinct_segments(6)
    results = unroll_batches(make_criterion(task, 2, "prefix"), model, [segments[:3], segments[3:]])
    assert len(results) == 3  # the prefix is not scored
    criterion = make_criterion(task, 2, "prefix")
    for j, reached in [(0, [1, 2, 3]), (2, [1, 2, 3, 4, 5])]:  # batch 2's first and last segment
        (grad,) = torch.autograd.grad(segment_loss(criterion, model, results[j]), model.decoder.embed_tokens.weight,
                                      retain_graph=True)
        for i in range(6):
            assert bool(grad[segment_ids(i)].abs().sum() > 0) == (i in reached), (j, i)


def test_chunk_mode_stops_at_the_batch_border_where_prefix_mode_does_not():
    task = make_task(vocab_size=4 + 6 * SEG_LEN)
    model = make_model(task)
    segments = distinct_segments(6)
    results = unroll_batches(make_criterion(task, 2, "chunk"), model, [segments[:3], segments[3:]])
    grad = _embedding_grad_rows(model, segment_loss(make_criterion(task, 2, "chunk"), model, results[0]))
    assert grad[segment_ids(3)].abs().sum() > 0
    assert torch.count_nonzero(grad[segment_ids(2)]) == 0


@pytest.mark.parametrize("mode", ["sliding", "prefix"])
def test_replay_starts_from_the_memory_of_k_segments_back(mode):
    # Re-running s(j-k)..s(j-1) from the memory s(j-k) started with, across the batch border too,
    # must reproduce the plain sequential run exactly (no dropout); restarting from the newest
    # memory (the paper code's slip in sliding mode) would not.
    task = make_task(vocab_size=4 + 6 * SEG_LEN)
    model = make_model(task)
    segments = distinct_segments(6)
    with torch.no_grad():
        plain, _ = make_criterion(task, 0, "chunk").unroll(model, segments, CarriedState(None))
        second_batch = unroll_batches(make_criterion(task, 2, mode), model, [segments[:3], segments[3:]])
    for a, b in zip(plain[3:], second_batch):
        torch.testing.assert_close(a.net_output[0], b.net_output[0])


def test_carried_state_is_detached_between_batches():
    task = make_task()
    model = make_model(task, num_mem_tokens=2, mem_len=3)
    criterion = make_criterion(task, 3, "chunk")
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    sample = {"net_input": {"src_tokens": tokens}, "target": tokens.roll(-1, 1)}
    _, _, log, carried = criterion.forward_with_state(model, sample, None)
    assert not carried.model_state.memory.requires_grad
    assert all(not c.requires_grad for c in carried.model_state.cache)
    assert log["sample_size"] == 6 and log["mem_norm"] > 0


def test_chunk_mode_warns_when_chunks_straddle_batches(caplog):
    task = make_task()
    task.segment_schedule = [3]  # rmt_lm's K per epoch
    make_criterion(task, 2, "chunk")
    assert not caplog.records
    make_criterion(task, 1, "chunk")
    assert "--segments-per-sample is 3" in caplog.text
    caplog.clear()
    task.segment_schedule = [2, 4, 8]
    RMTLMCriterion(task, bptt_mode="chunk", bptt_depth_schedule="1,3")  # chunks of 2, 4, 4
    assert not caplog.records
    RMTLMCriterion(task, bptt_mode="chunk", bptt_depth_schedule="1,2")  # epoch 2: 4 segments in chunks of 3
    assert "--segments-per-sample is 4 in epoch 2" in caplog.text


def test_depth_schedule_sets_the_depth_of_each_epoch():
    # --bptt-depth-schedule 0,3, 4 segments per row, chunk mode: epoch 1 back-propagates 4 chains
    # of one segment, epoch 2 on one chain whose loss reaches all 4 segments
    task = make_task(vocab_size=4 + 4 * SEG_LEN)
    task.segment_schedule = [4]
    model = make_model(task)
    criterion = RMTLMCriterion(task, bptt_mode="chunk", bptt_depth_schedule="0,3")
    sample = one_sample(4)
    for epoch, chains in [(1, [[0], [1], [2], [3]]), (2, [[0, 1, 2, 3]]), (7, [[0, 1, 2, 3]])]:
        reached = []

        def backward(objective):
            grad = _embedding_grad_rows(model, objective)
            reached.append([i for i in range(4) if grad[segment_ids(i)].abs().sum() > 0])

        sample["stream"] = {"width": 4 * SEG_LEN}
        _, _, log, _ = criterion.forward_with_state(model, sample, None, backward=backward, epoch=epoch)
        assert reached == chains, epoch
        assert (log["bptt_depth"], log["segments_per_sample"]) == ((0, 4) if epoch == 1 else (3, 4))


def test_depth_schedule_needs_the_epochs_of_rmt_lm():
    with pytest.raises(ValueError, match="--bptt-depth-schedule sets the depth per epoch of --task rmt_lm"):
        RMTLMCriterion(make_task(), bptt_mode="chunk", bptt_depth_schedule="0,1")


# --------------------------------------------------------------------------- memory-only loss (ours)
def one_sample(num_segments, first_id=4):
    tokens = torch.cat([t for t, _ in distinct_segments(num_segments, first_id=first_id)], dim=1)
    return {"net_input": {"src_tokens": tokens}, "target": tokens.roll(-1, dims=1)}


def memory_only_losses_by_hand(model, criterion, sample, carried_state):
    """Run the segments in order; score each from its incoming memory with the cache hidden."""
    state, losses = carried_state, []
    for tokens, target in zip(sample["net_input"]["src_tokens"].split(SEG_LEN, dim=1),
                              sample["target"].split(SEG_LEN, dim=1)):
        memory_only = None if state is None else RMTState(state.memory, None)
        losses.append(criterion.segment_loss(model, model(tokens, state=memory_only), target))
        state = model(tokens, state=state)[1]["state"]
    return losses


def test_memory_only_loss_is_the_memory_only_run_added_with_its_weight():
    task = make_task(vocab_size=4 + 6 * SEG_LEN)
    model = make_model(task, num_mem_tokens=2, mem_len=SEG_LEN)
    plain = RMTLMCriterion(task, bptt_mode="chunk", bptt_depth=2)
    aux = RMTLMCriterion(task, bptt_mode="chunk", bptt_depth=2, memory_only_loss_weight=0.5)
    _, _, _, carried = plain.forward_with_state(model, one_sample(3), None)
    sample = one_sample(3, first_id=4 + 3 * SEG_LEN)

    loss0, _, log0, _ = plain.forward_with_state(model, sample, carried)
    loss, _, log, _ = aux.forward_with_state(model, sample, carried)
    assert "memory_only_loss" not in log0
    assert torch.equal(log["loss"], log0["loss"])  # the logged LM loss is not changed by the aux term
    assert torch.allclose(loss, loss0 + 0.5 * log["memory_only_loss"])
    by_hand = memory_only_losses_by_hand(model, plain, sample, carried.model_state)
    assert torch.allclose(log["memory_only_loss"], sum(by_hand), atol=1e-5)
    assert abs(log["memory_only_loss"] - log["loss"]) > 1e-4  # hiding the cache changes the prediction


def test_memory_only_loss_ignores_the_cache_and_follows_the_memory():
    task = make_task(vocab_size=4 + 6 * SEG_LEN)
    model = make_model(task, num_mem_tokens=2, mem_len=SEG_LEN)
    criterion = RMTLMCriterion(task, bptt_mode="chunk", bptt_depth=1, memory_only_loss_weight=0.01)
    _, _, _, carried = criterion.forward_with_state(model, one_sample(2), None)
    sample = one_sample(1, first_id=4 + 2 * SEG_LEN)  # one segment: its inputs are the carried state
    state = carried.model_state

    def logged(memory, cache):
        return criterion.forward_with_state(model, sample, CarriedState(RMTState(memory, cache)))[2]

    base = logged(state.memory, state.cache)
    other_cache = logged(state.memory, [c + torch.randn_like(c) for c in state.cache])
    other_memory = logged(state.memory + torch.randn_like(state.memory), state.cache)
    assert not torch.allclose(other_cache["loss"], base["loss"])
    assert torch.equal(other_cache["memory_only_loss"], base["memory_only_loss"])
    assert not torch.allclose(other_memory["memory_only_loss"], base["memory_only_loss"])


@pytest.mark.parametrize("mode", ["chunk", "sliding"])
@pytest.mark.parametrize("depth", [1, 2])
def test_memory_only_loss_reaches_exactly_depth_segments_back(mode, depth):
    task = make_task(vocab_size=4 + 8 * SEG_LEN)
    model = make_model(task, num_mem_tokens=2, mem_len=SEG_LEN)
    criterion = RMTLMCriterion(task, bptt_depth=depth, bptt_mode=mode, memory_only_loss_weight=0.01)
    segments = distinct_segments(2 * (depth + 1))
    results, _ = criterion.unroll(model, segments, CarriedState(None))
    j = len(segments) - 1
    assert results[j].memory_only_output is not results[j].net_output  # a separate cache-free run
    aux_loss = criterion.segment_loss(model, results[j].memory_only_output, results[j].target)
    grad = _embedding_grad_rows(model, aux_loss)
    for i in range(j - depth, j + 1):
        assert grad[segment_ids(i)].abs().sum() > 0, f"segment {i} should receive gradient from {j}"
    for i in range(0, j - depth):
        assert torch.count_nonzero(grad[segment_ids(i)]) == 0, f"segment {i} is beyond depth {depth}"


@pytest.mark.parametrize("weight", [-0.1, float("nan")])
def test_memory_only_loss_weight_must_be_non_negative(weight):
    with pytest.raises(ValueError, match="--memory-only-loss-weight must be >= 0"):
        RMTLMCriterion(make_task(), memory_only_loss_weight=weight)


@pytest.mark.parametrize("num_mem_tokens, mem_len", [(2, 0), (0, SEG_LEN)])
def test_memory_only_loss_needs_memory_and_cache(num_mem_tokens, mem_len):
    task = make_task()
    model = make_model(task, num_mem_tokens=num_mem_tokens, mem_len=mem_len)
    criterion = RMTLMCriterion(task, bptt_depth=1, bptt_mode="chunk", memory_only_loss_weight=0.01)
    with pytest.raises(ValueError, match=r"needs a Tr-XL \+ RMT model .*--mem-len"):
        criterion.forward_with_state(model, one_sample(1), None)


def test_memory_only_loss_is_logged_separately_in_bits():
    logs = [{"loss": torch.tensor(6.0), "memory_only_loss": torch.tensor(9.0), "sample_size": 3},
            {"loss": torch.tensor(2.0), "memory_only_loss": torch.tensor(3.0), "sample_size": 1}]
    with metrics.aggregate() as agg:
        RMTLMCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(round(8.0 / 4 / math.log(2), 3))
    assert values["memory_only_loss"] == pytest.approx(round(12.0 / 4 / math.log(2), 3))
    with metrics.aggregate() as agg:
        RMTLMCriterion.reduce_metrics([{"loss": torch.tensor(6.0), "sample_size": 3}])
    assert "memory_only_loss" not in agg.get_smoothed_values()


def test_memory_only_loss_costs_one_extra_forward_per_segment_with_a_cache():
    task = make_task(vocab_size=4 + 6 * SEG_LEN)
    model = make_model(task, num_mem_tokens=2, mem_len=SEG_LEN)
    calls = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))

    def forwards(weight, carried):
        calls.clear()
        RMTLMCriterion(task, bptt_mode="chunk", bptt_depth=2, memory_only_loss_weight=weight).forward_with_state(
            model, one_sample(3), carried)
        return len(calls)

    _, _, _, carried = RMTLMCriterion(task, bptt_depth=1, bptt_mode="chunk").forward_with_state(model, one_sample(3), None)
    assert (forwards(0.0, carried), forwards(0.01, carried)) == (3, 6)
    assert forwards(0.01, None) == 5  # a stream's first segment has no cache to hide


# --------------------------------------------------------------------------- memory-token loss (the paper's)
def make_target_model(task, num_mem_tokens=2, mem_len=SEG_LEN, tie=False, layout="rmt"):
    torch.manual_seed(0)
    cfg = RMTConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, num_mem_tokens=num_mem_tokens,
                    mem_len=mem_len, memory_layout=layout, tie_weights=tie, memory_target_token=True)
    return RMTLanguageModel.build_model(cfg, task).eval()


def test_memory_target_is_a_model_symbol_after_the_dictionary():
    task = make_task()
    model = make_target_model(task)
    vocab = len(task.target_dictionary)
    assert model.decoder.memory_target == vocab  # no data-bin id changes meaning
    logits, _ = model(torch.tensor([[5, 6, 7]]))
    assert logits.shape[-1] == vocab + 1
    assert make_model(task).decoder.memory_target is None


@pytest.mark.parametrize("tie, layout", [(True, "rmt"), (False, "rmt"), (True, "memtr")])
def test_memory_token_loss_written_out_by_hand(tie, layout):
    """Per segment: -mean log p(<mem>) over the B x m memory outputs, times the segment's targets,
    through the LM head written out here (output weight, bias, log-softmax)."""
    task = make_task(vocab_size=4 + 6 * SEG_LEN)
    model = make_target_model(task, tie=tie, layout=layout)
    weight = 0.01
    plain = RMTLMCriterion(task, bptt_mode="chunk", bptt_depth=1)
    criterion = RMTLMCriterion(task, bptt_mode="chunk", bptt_depth=1, memory_token_loss_weight=weight)
    sample = one_sample(2)
    loss0, _, log0, _ = plain.forward_with_state(model, sample, None)
    loss, _, log, _ = criterion.forward_with_state(model, sample, None)

    decoder = model.decoder
    out_weight = decoder.embed_tokens.weight if tie else decoder.out_weight
    state, by_hand = None, torch.tensor(0.0)
    for tokens in sample["net_input"]["src_tokens"].split(SEG_LEN, dim=1):
        state = model(tokens, state=state)[1]["state"]
        memory = state.memory  # [B=2, m=2, d]: the outputs at the write (memtr: memory) positions
        logits = memory @ out_weight.t() + decoder.out_bias
        mean_nll = -torch.log_softmax(logits, dim=-1)[..., len(task.target_dictionary)].mean()
        by_hand = by_hand + mean_nll * tokens.numel()
    assert "memory_token_loss" not in log0
    assert torch.equal(log["loss"], log0["loss"])  # the logged LM loss is the LM loss alone
    assert torch.allclose(log["memory_token_loss"], by_hand, atol=1e-5)
    assert torch.allclose(loss, loss0 + weight * by_hand, atol=1e-6)


@pytest.mark.parametrize("mode", ["chunk", "sliding"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_memory_token_loss_reaches_exactly_depth_segments_back(mode, depth):
    """The loss on segment j's memory outputs trains segment j (whose tokens the write positions read)
    and, through its read memory, the depth segments before it; nothing older."""
    task = make_task(vocab_size=4 + 8 * SEG_LEN)
    model = make_target_model(task, mem_len=0)  # untied: embedding rows get gradient only as inputs
    criterion = RMTLMCriterion(task, bptt_depth=depth, bptt_mode=mode, memory_token_loss_weight=0.01)
    segments = distinct_segments(2 * (depth + 1))
    results, _ = criterion.unroll(model, segments, CarriedState(None))
    j = len(segments) - 1
    grad = _embedding_grad_rows(model, criterion.memory_token_loss(model, results[j].net_output, results[j].target))
    for i in range(j - depth, j + 1):
        assert grad[segment_ids(i)].abs().sum() > 0, f"segment {i} should receive gradient from {j}"
    for i in range(0, j - depth):
        assert torch.count_nonzero(grad[segment_ids(i)]) == 0, f"segment {i} is beyond depth {depth}"
    # the learned initial memory: read by segment 0, so within reach of segment `depth` only
    def mem_init_grad(i):
        loss = criterion.memory_token_loss(model, results[i].net_output, results[i].target)
        return torch.autograd.grad(loss, model.decoder.mem_init, allow_unused=True)[0]

    assert mem_init_grad(depth).abs().sum() > 0
    assert mem_init_grad(depth + 1) is None


@pytest.mark.parametrize("weight", [-0.1, float("nan")])
def test_memory_token_loss_weight_must_be_non_negative(weight):
    with pytest.raises(ValueError, match="--memory-token-loss-weight must be >= 0"):
        RMTLMCriterion(make_task(), memory_token_loss_weight=weight)


@pytest.mark.parametrize("num_mem_tokens, target_token", [(2, False), (0, True)])
def test_memory_token_loss_needs_memory_and_its_target_symbol(num_mem_tokens, target_token):
    task = make_task()
    torch.manual_seed(0)
    cfg = RMTConfig(n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32, num_mem_tokens=num_mem_tokens,
                    memory_target_token=target_token)
    model = RMTLanguageModel.build_model(cfg, task)
    criterion = RMTLMCriterion(task, bptt_depth=1, bptt_mode="chunk", memory_token_loss_weight=0.01)
    with pytest.raises(ValueError, match=r"--memory-token-loss-weight needs memory tokens and their target symbol"):
        criterion.forward_with_state(model, one_sample(1), None)


def test_memory_token_loss_is_logged_separately_in_bits():
    logs = [{"loss": torch.tensor(6.0), "memory_token_loss": torch.tensor(1.0), "sample_size": 3},
            {"loss": torch.tensor(2.0), "memory_token_loss": torch.tensor(3.0), "sample_size": 1}]
    with metrics.aggregate() as agg:
        RMTLMCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(round(8.0 / 4 / math.log(2), 3))
    assert values["memory_token_loss"] == pytest.approx(round(4.0 / 4 / math.log(2), 3))
    assert "memory_only_loss" not in values


# --------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("mem_len", [0, 3])
def test_memory_stays_finite_and_close_to_fp32_under_bf16_autocast(mem_len):
    # The memory is read from the last hidden states after a LayerNorm, which autocast runs in
    # fp32: it is carried in fp32 from segment to segment, and bf16 rounding inside the layers
    # does not accumulate over 500 segments (measured: 0.3% relative difference).
    task = make_task()
    model = make_model(task, num_mem_tokens=4, mem_len=mem_len)
    g = torch.Generator().manual_seed(0)
    segments = [torch.randint(4, 40, (2, SEG_LEN), generator=g) for _ in range(500)]

    def last_memory(bf16):
        state = None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for tokens in segments:
                state = model(tokens, state=state)[1]["state"]
        return state.memory

    fp32, bf16 = last_memory(False), last_memory(True)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).norm() / fp32.norm() < 0.02


# --------------------------------------------------------------------------- non-finite values
def test_non_finite_loss_names_the_update_and_the_segment(caplog):
    task = make_task()
    model = make_model(task, num_mem_tokens=2)
    segments = distinct_segments(3)
    with torch.no_grad():  # a token that only segment 2 holds
        model.decoder.embed_tokens.weight[segment_ids(1)[0]] = float("nan")
    sample = {"net_input": {"src_tokens": torch.cat([t for t, _ in segments], dim=1)},
              "target": torch.cat([y for _, y in segments], dim=1),
              "stream": {"split": "train", "index": 3, "batches": 9, "update": 7}}
    with caplog.at_level("WARNING"):
        make_criterion(task, depth=1, mode="chunk").forward_with_state(model, sample, None)
    assert "non-finite loss at update 7, train batch 3, segment 2 of 3" in caplog.text


@pytest.mark.parametrize("write_input", ["memory", "learned"])
def test_write_block_is_fed_the_memory_read_or_the_learned_start_memory(write_input):
    task = make_task()
    torch.manual_seed(0)
    cfg = RMTConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, num_mem_tokens=2,
                    memory_write_input=write_input)
    model = RMTLanguageModel.build_model(cfg, task).eval()
    layer_inputs = []
    model.decoder.layers[0].register_forward_pre_hook(lambda module, args: layer_inputs.append(args[0]))
    memory = torch.randn(3, 2, 16)
    model(torch.randint(4, 40, (3, SEG_LEN)), state=RMTState(memory, None))
    read_block, write_block = layer_inputs[0][:, :2], layer_inputs[0][:, -2:]
    assert torch.equal(read_block, memory)
    start_memory = (model.decoder.mem_init * model.decoder.embed_scale).expand(3, -1, -1)
    assert torch.equal(write_block, memory if write_input == "memory" else start_memory)


@pytest.mark.parametrize("flags", [dict(num_mem_tokens=0), dict(num_mem_tokens=2, memory_layout="memtr")])
def test_a_learned_write_input_needs_a_write_block(flags):
    cfg = RMTConfig(n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32, memory_write_input="learned", **flags)
    with pytest.raises(ValueError, match="--memory-write-input learned needs the write block"):
        RMTLanguageModel.build_model(cfg, make_task())


# what a checkpoint saved before the field existed did; cache_distance's default changed since
@pytest.mark.parametrize("field, behaviour_then", [("memory_write_input", "memory"), ("cache_distance", "sequence")])
def test_a_checkpoint_saved_before_a_field_existed_loads_with_the_old_behaviour(field, behaviour_then):
    from dataclasses import asdict

    from omegaconf import OmegaConf

    old = asdict(RMTConfig(n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32, num_mem_tokens=2, mem_len=4))
    del old[field]  # what a checkpoint saved before --memory-write-input / --cache-distance holds
    cfg = OmegaConf.create(old)
    OmegaConf.set_struct(cfg, True)  # fairseq loads checkpoint configs in struct mode
    model = RMTLanguageModel.build_model(cfg, make_task())
    assert getattr(model.decoder.cfg, field) == behaviour_then


@pytest.mark.parametrize("pre_lnorm", [False, True])
@pytest.mark.parametrize("num_mem_tokens, mem_len, layout, rows", [
    (2, 0, "rmt", SEG_LEN + 2), (2, 3, "rmt", SEG_LEN + 2), (2, 0, "memtr", SEG_LEN + 2), (0, 3, "rmt", SEG_LEN),
])
def test_last_layer_skips_the_read_block_and_changes_no_output_or_gradient(monkeypatch, num_mem_tokens, mem_len,
                                                                             layout, rows, pre_lnorm):
    """The last layer computes only the rows something reads (segment and write block; every row
    with memtr, whose memory rows are the next memory), and the outputs, the next memory, the
    cache and the gradients are those of computing every row (float64)."""
    import rmt_plugin.model as model_module

    task = make_task()
    torch.manual_seed(0)
    cfg = RMTConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, num_mem_tokens=num_mem_tokens,
                    mem_len=mem_len, memory_layout=layout, pre_lnorm=pre_lnorm)
    model = RMTLanguageModel.build_model(cfg, task).double()
    tokens = torch.randint(4, 40, (3, SEG_LEN))
    state = RMTState(torch.randn(3, num_mem_tokens, 16, dtype=torch.double) if num_mem_tokens else None,
                     [torch.randn(3, mem_len, 16, dtype=torch.double)] * 2 if mem_len else None)

    def run():
        model.zero_grad()
        query_rows = []
        hook = model.decoder.layers[-1].attn.register_forward_hook(lambda mod, args, out: query_rows.append(out.size(1)))
        logits, extra = model(tokens, state=state)
        hook.remove()
        next_state = extra["state"]
        loss = logits.sum() + (next_state.memory.square().sum() if num_mem_tokens else 0)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return logits, next_state, grads, query_rows

    logits, next_state, grads, query_rows = run()
    assert query_rows == [rows]
    model.decoder._plans.clear()
    monkeypatch.setattr(model_module, "last_layer_first_row", lambda m, layout: 0)
    every_logits, every_state, every_grads, every_rows = run()
    assert every_rows == [SEG_LEN + (2 * num_mem_tokens if layout == "rmt" else num_mem_tokens)]
    torch.testing.assert_close(logits, every_logits, rtol=1e-12, atol=1e-12)
    if num_mem_tokens:
        torch.testing.assert_close(next_state.memory, every_state.memory, rtol=1e-12, atol=1e-12)
    for cached, every_cached in zip(next_state.cache or [], every_state.cache or []):
        torch.testing.assert_close(cached, every_cached, rtol=0, atol=0)
    assert grads.keys() == every_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], every_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_the_criterion_cuts_segments_of_the_batchs_own_length():
    """--tokens-per-sample-schedule: a batch carries its epoch's segment length, which the criterion
    unrolls (a criterion built for T = 3 reads a 6-token batch of T = 2 as 3 segments)."""
    task = make_task()
    model = make_model(task)
    criterion = make_criterion(task, 1, "chunk")
    lengths = []
    hook = model.decoder.register_forward_hook(lambda mod, args, out: lengths.append(args[0].size(1)))
    tokens = torch.randint(4, 40, (2, 6))
    sample = {"net_input": {"src_tokens": tokens}, "target": tokens, "stream": {"segment_length": 2}}
    criterion.forward_with_state(model, sample, None)
    del sample["stream"]
    criterion.forward_with_state(model, sample, None)
    hook.remove()
    assert lengths == [2, 2, 2, 3, 3]


def test_a_criterion_built_in_python_has_the_command_lines_defaults():
    from rmt_plugin.criterion import RMTLMCriterionConfig

    task = make_task()  # fairseq builds the criterion from its config, as below
    from_cli, in_python = RMTLMCriterion.build_criterion(RMTLMCriterionConfig(), task), RMTLMCriterion(task)
    assert (in_python.bptt_mode, in_python.depths) == (from_cli.bptt_mode, from_cli.depths)
