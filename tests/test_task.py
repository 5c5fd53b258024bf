"""Tests of the ``rmt_lm`` task: stream layout, memory bookkeeping, eval-lm hand-off, CLI run."""

import gc
import logging
import os
import re
import weakref

import pytest
import torch
from fairseq import utils
from fairseq.data import iterators
from omegaconf import OmegaConf

from conftest import distinct_lines, run_cli, write_corpus, write_split
from conftest import make_stream_task as make_task
from rmt_plugin.criterion import RMTLMCriterionConfig
from rmt_plugin.epoch_schedule import parse_schedule
from rmt_plugin.model import RMTConfig
from rmt_plugin.task import StreamHandle

def epoch_batches(task, split="train", batch_size=3, num_shards=1, shard_id=0, epoch_itr=None):
    if epoch_itr is None:
        epoch_itr = task.get_batch_iterator(task.dataset(split), max_sentences=batch_size,
                                            num_shards=num_shards, shard_id=shard_id)
    return list(epoch_itr.next_epoch_itr(shuffle=True))


def rows(batches, key):
    """Concatenate each batch row over the batches: one tensor per stream."""
    return list(torch.cat([b[key] if key == "target" else b["net_input"][key] for b in batches], dim=1))


# ---------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("segments", [1, 3])
def test_rows_continue_across_batches_and_targets_are_next_tokens(data, segments):
    data_dir, streams, d = data
    task = make_task(data_dir, tokens_per_sample=4, segments_per_sample=segments)
    batches = epoch_batches(task)
    full = streams["train"]
    stream_len = len(full) // 3  # 104 tokens: 3 streams of 34, 2 tail tokens dropped
    width = 4 * segments
    assert [b["target"].size(1) for b in batches[:-1]] == [width] * (len(batches) - 1)
    assert 0 < batches[-1]["target"].size(1) <= width
    sources = torch.cat([torch.tensor([d.eos()]), full[:-1]])
    for i, (target_row, source_row) in enumerate(zip(rows(batches, "target"), rows(batches, "src_tokens"))):
        assert torch.equal(target_row, full[i * stream_len:(i + 1) * stream_len])
        assert torch.equal(source_row, sources[i * stream_len:(i + 1) * stream_len])
    assert sum(b["ntokens"] for b in batches) == 3 * stream_len
    assert [b["stream"] for b in batches] == [
        {"split": "train", "index": t, "batches": len(batches), "width": width, "segment_length": 4}
        for t in range(len(batches))
    ]


def test_first_token_of_split_is_predicted_from_eos(data):
    data_dir, streams, d = data
    first = epoch_batches(make_task(data_dir))[0]
    assert first["net_input"]["src_tokens"][0, 0] == d.eos()
    assert first["target"][0, 0] == streams["train"][0]


def test_two_ranks_get_disjoint_streams_covering_the_split(data):
    data_dir, streams, _ = data
    task = make_task(data_dir)
    per_rank = [rows(epoch_batches(task, batch_size=2, num_shards=2, shard_id=r), "target") for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    full = streams["train"]
    stream_len = len(full) // 4
    assert torch.equal(torch.cat(per_rank[0] + per_rank[1]), full[:4 * stream_len])
    assert len(full) - 4 * stream_len < 4


def test_ranks_have_the_same_number_of_batches(data):
    # 104 tokens in 6 streams: streams of 17 or 18 tokens would give rank 0 two 17-wide batches
    # and rank 1 one, and data-parallel training would hang; equal streams keep ranks in step.
    task = make_task(data[0], tokens_per_sample=17)
    counts = [len(epoch_batches(task, batch_size=3, num_shards=2, shard_id=r)) for r in (0, 1)]
    assert counts == [1, 1]


def test_no_shuffling_across_epochs(data):
    data_dir, _, _ = data
    task = make_task(data_dir)
    epoch_itr = task.get_batch_iterator(task.dataset("train"), max_sentences=3, seed=7)
    first, second = epoch_batches(task, epoch_itr=epoch_itr), epoch_batches(task, epoch_itr=epoch_itr)
    assert epoch_itr.epoch == 2
    assert all(torch.equal(a["target"], b["target"]) for a, b in zip(first, second))
    assert [b["stream"]["index"] for b in second] == list(range(len(first)))


def test_colon_separated_data_dirs_are_read_one_per_epoch(data, tmp_path_factory):
    # fairseq's sharded data: DIR_A:DIR_B trains epoch 1 on A, 2 on B, 3 on A again; a curriculum
    # over corpora (e.g. memory streams of growing --gap, docs/memory_in_lm.md section 3)
    first, streams, d = data
    second = tmp_path_factory.mktemp("second")
    d.save(str(second / "dict.txt"))
    write_split(str(second), "train", distinct_lines(d, 40, first_word=200), d)
    task = make_task(f"{first}{os.pathsep}{second}", splits=())
    assert task.has_sharded_data("train")  # fairseq-train then reloads the train split every epoch
    for epoch, expected in [(1, streams["train"]), (2, torch.tensor(sum(distinct_lines(d, 40, 200), []))),
                            (3, streams["train"])]:
        task.load_dataset("train", epoch=epoch)
        batches = epoch_batches(task)
        tokens = torch.cat([row for row in rows(batches, "src_tokens")])
        assert set(tokens.tolist()) <= set(expected.tolist()) and len(set(tokens.tolist())) > 10, epoch


def test_segments_per_sample_schedule_sets_the_width_of_each_epochs_batches(data):
    # --segments-per-sample-schedule 1,3: epoch 1 unrolls 1 segment per row, epoch 2 on 3;
    # validation (fairseq passes epoch 1) the first value
    task = make_task(data[0], tokens_per_sample=4, schedule="1,3")
    widths = {epoch: epoch_batches(task, epoch_itr=task.get_batch_iterator(task.dataset("train"), max_sentences=3,
                                                                           epoch=epoch))[0]["target"].size(1)
              for epoch in (1, 2, 5)}
    assert widths == {1: 4, 2: 12, 5: 12}
    assert epoch_batches(task)[0]["target"].size(1) == 4


def test_a_schedule_value_repeats_for_n_epochs_with_x(data):
    task = make_task(data[0], tokens_per_sample=4, schedule="1x2,3")  # 1,1,3
    widths = [epoch_batches(task, epoch_itr=task.get_batch_iterator(task.dataset("train"), max_sentences=3,
                                                                    epoch=epoch))[0]["target"].size(1)
              for epoch in (1, 2, 3)]
    assert widths == [4, 4, 12]
    assert parse_schedule("1, 0x2 ,6", "--bptt-depth-schedule", 0) == [1, 0, 0, 6]


def test_tokens_per_sample_schedule_sets_the_segment_length_of_each_epoch(data):
    """--tokens-per-sample-schedule 8,2 with K=2: epoch 1 reads rows of 2 x 8 tokens, later epochs
    2 x 2; the segment length travels with the batch (the criterion splits by it); validation is
    read with the last T whatever the epoch."""
    task = make_task(data[0], tokens_per_sample=512, segments_per_sample=2, length_schedule="8,2",
                     splits=("train", "valid"))

    def first(split, epoch):
        return epoch_batches(task, split, epoch_itr=task.get_batch_iterator(task.dataset(split), max_sentences=3,
                                                                            epoch=epoch))[0]

    for epoch, length in ((1, 8), (2, 2), (7, 2)):
        batch = first("train", epoch)
        assert (batch["target"].size(1), batch["stream"]["segment_length"]) == (2 * length, length), epoch
        assert first("valid", epoch)["stream"]["segment_length"] == 2
    with pytest.raises(ValueError, match="--tokens-per-sample-schedule replaces --tokens-per-sample"):
        make_task(data[0], tokens_per_sample=16, length_schedule="8,2")


@pytest.mark.parametrize("schedule, segments, needle", [
    ("1,x", None, "--segments-per-sample-schedule must be comma-separated integers"),
    ("2,0", None, "--segments-per-sample-schedule values must be >= 1"),
    ("1x0,4", None, "--segments-per-sample-schedule must be comma-separated integers, one per epoch (VALUExEPOCHS"),
    ("x2,4", None, "--segments-per-sample-schedule must be comma-separated integers"),
    ("1,2", 2, "--segments-per-sample-schedule replaces --segments-per-sample"),
])
def test_segments_per_sample_schedule_errors(data, schedule, segments, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        make_task(data[0], segments_per_sample=segments, schedule=schedule)


def test_clear_errors(data):
    data_dir, _, _ = data
    with pytest.raises(ValueError, match="--batch-size"):
        make_task(data_dir, batch_size=None)
    with pytest.raises(ValueError, match="--segments-per-sample"):
        make_task(data_dir, segments_per_sample=0)
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        make_task(data_dir, splits=("test",))
    with pytest.raises(FileNotFoundError, match="dict.txt"):
        make_task(data_dir / "missing")
    task = make_task(data_dir)
    with pytest.raises(ValueError, match="fewer than the 120 streams"):
        task.get_batch_iterator(task.dataset("train"), max_sentences=120)


def test_non_memory_criterion_is_rejected(data):
    task = make_task(data[0])
    cfg = OmegaConf.create({"_name": "cross_entropy", "sentence_avg": False})
    with pytest.raises(ValueError, match="--criterion cross_entropy"):
        task.build_criterion(cfg)


# ---------------------------------------------------------------------------------- memory
class RecordingCriterion:
    """Records the state of every call; returns a fresh marker state (tensors) per batch."""

    def __init__(self):
        self.calls = []  # (split, index, received state, returned state)

    def forward_with_state(self, model, sample, state, backward=None, epoch=1):
        if state is not None and not model.training:
            # A criterion may update its memory in place: a validation pass must never be
            # handed the training memory.
            state["memory"].add_(1000)
        next_state = {"memory": sample["target"][:, -1:].float().clone()}
        info = sample["stream"]
        self.calls.append((info["split"], info["index"], state, next_state))
        loss = (model.weight * sample["target"].float().mean()).sum()
        if backward is not None:
            backward(loss)
        return loss.detach(), sample["ntokens"], {}, next_state


class TinyModel(torch.nn.Linear):
    def __init__(self):
        super().__init__(1, 1, bias=False)

    def set_num_updates(self, num_updates):
        self.num_updates = num_updates


class BackwardOptimizer:
    def backward(self, loss):
        loss.backward()


def train_on(task, criterion, model, samples, ignore_grad=False):
    for sample in samples:
        task.train_step(sample, model, criterion, BackwardOptimizer(), update_num=0, ignore_grad=ignore_grad)


def assert_carried(calls):
    """Each call got the state the previous call returned; the first got fresh memory."""
    assert calls[0][2] is None
    for previous, current in zip(calls, calls[1:]):
        assert current[2] is previous[3]


def test_train_state_carries_across_batches_and_resets_each_epoch(data):
    task, criterion, model = make_task(data[0]), RecordingCriterion(), TinyModel()
    epoch_itr = task.get_batch_iterator(task.dataset("train"), max_sentences=3)
    train_on(task, criterion, model, epoch_itr.next_epoch_itr())
    n = len(criterion.calls)
    assert n > 2
    assert_carried(criterion.calls)
    train_on(task, criterion, model, epoch_itr.next_epoch_itr())
    assert criterion.calls[n][1] == 0 and criterion.calls[n][2] is None
    assert_carried(criterion.calls[n:])


def test_update_freq_groups_carry_the_state(data):
    task, criterion, model = make_task(data[0]), RecordingCriterion(), TinyModel()
    epoch_itr = task.get_batch_iterator(task.dataset("train"), max_sentences=3)
    for group in iterators.GroupedIterator(epoch_itr.next_epoch_itr(), 2):
        train_on(task, criterion, model, group)
    assert len(criterion.calls) == len(epoch_itr)
    assert_carried(criterion.calls)


@pytest.mark.parametrize("valid_split", ["valid", "train"])
def test_validation_starts_fresh_and_leaves_training_state_untouched(data, valid_split):
    task = make_task(data[0], splits=("train", "valid"))
    criterion, model = RecordingCriterion(), TinyModel()
    train = epoch_batches(task, "train")
    train_on(task, criterion, model, train[:2])
    train_state = criterion.calls[-1][3]
    snapshot = train_state["memory"].clone()

    valid_itr = task.get_batch_iterator(task.dataset(valid_split), max_sentences=2)
    for _ in range(2):  # two passes: each starts fresh
        first_call = len(criterion.calls)
        for sample in valid_itr.next_epoch_itr(shuffle=False):
            task.valid_step(sample, model, criterion)
        assert len(criterion.calls) - first_call > 1
        assert_carried(criterion.calls[first_call:])

    train_on(task, criterion, model, train[2:3])
    assert criterion.calls[-1][2] is train_state
    assert torch.equal(train_state["memory"], snapshot)


@pytest.mark.parametrize("dummy_index", [0, 2])
def test_dummy_batch_neither_reads_nor_moves_the_state(data, dummy_index):
    task, criterion, model = make_task(data[0]), RecordingCriterion(), TinyModel()
    train = epoch_batches(task, "train")
    train_on(task, criterion, model, train[:2])
    carried = criterion.calls[-1][3]
    # fairseq's dummy batch is a copy of the iterator's first batch (index 0); even one that
    # looks like the expected next batch must run from fresh memory and leave the stream alone.
    model.zero_grad()
    train_on(task, criterion, model, [train[dummy_index]], ignore_grad=True)
    assert criterion.calls[-1][2] is None
    assert torch.equal(model.weight.grad, torch.zeros_like(model.weight))
    train_on(task, criterion, model, train[2:3])
    assert criterion.calls[-1][2] is carried


def test_resume_mid_epoch_starts_fresh_with_warning(data, caplog):
    first_run = make_task(data[0])
    epoch_itr = first_run.get_batch_iterator(first_run.dataset("train"), max_sentences=3)
    itr = epoch_itr.next_epoch_itr()
    next(itr), next(itr)
    saved = epoch_itr.state_dict()

    task, criterion, model = make_task(data[0]), RecordingCriterion(), TinyModel()
    resumed = task.get_batch_iterator(task.dataset("train"), max_sentences=3)
    resumed.load_state_dict(saved)
    with caplog.at_level(logging.WARNING):
        train_on(task, criterion, model, resumed.next_epoch_itr())
    assert criterion.calls[0][1] == 2 and criterion.calls[0][2] is None
    assert "fresh memory" in caplog.text
    assert_carried(criterion.calls)


def test_the_same_batch_again_runs_from_the_memory_it_started_with(data, caplog):
    # fairseq re-runs a batch whose gradients are NaN/inf under its NaN detector (and retries an
    # AMP overflow): that run must start from the memory the failing one had, and leave the
    # stream where the failing run left it
    task, criterion, model = make_task(data[0]), RecordingCriterion(), TinyModel()
    train = epoch_batches(task, "train")
    train_on(task, criterion, model, train[:3])
    with caplog.at_level(logging.WARNING):
        train_on(task, criterion, model, [train[2]])
    assert criterion.calls[-1][2] is criterion.calls[-2][2] is not None
    assert "fresh memory" not in caplog.text
    train_on(task, criterion, model, train[3:4])
    assert criterion.calls[-1][2] is criterion.calls[-2][3]


def test_memory_of_a_finished_pass_is_released(data):
    task = make_task(data[0], splits=("train", "valid"))
    criterion, model = RecordingCriterion(), TinyModel()
    train_on(task, criterion, model, epoch_batches(task, "train"))
    for sample in epoch_batches(task, "valid", batch_size=2):
        task.valid_step(sample, model, criterion)
    last_train = next(c for c in reversed(criterion.calls) if c[0] == "train")[3]["memory"]
    last_valid = criterion.calls[-1][3]["memory"]
    held = [weakref.ref(last_train), weakref.ref(last_valid)]
    criterion.calls.clear()
    del last_train, last_valid
    gc.collect()
    assert [ref() for ref in held] == [None, None]


# ---------------------------------------------------------------------------------- eval-lm
def test_eval_lm_batches_share_one_handle_in_stream_order(data):
    data_dir, streams, _ = data
    task = make_task(data_dir, tokens_per_sample=4, segments_per_sample=3)
    # eval-lm passes --num-workers (default 1): the handle must still be one object.
    batches = list(task.eval_lm_dataloader(task.dataset("train"), batch_size=2, num_workers=1))
    handle = batches[0]["net_input"]["stream"]
    assert isinstance(handle, StreamHandle) and handle.state is None
    assert all(b["net_input"]["stream"] is handle for b in batches)
    assert all(b["target"].size(1) == 4 for b in batches[:-1])  # one segment per batch
    stream_len = len(streams["train"]) // 2
    for i, row in enumerate(rows(batches, "target")):
        assert torch.equal(row, streams["train"][i * stream_len:(i + 1) * stream_len])
    # fairseq's eval-lm moves every sample to the device; the handle must survive that.
    assert utils.move_to_cpu(batches[0])["net_input"]["stream"] is handle
    assert utils.apply_to_sample(lambda t: t.clone(), batches[0])["net_input"]["stream"] is handle


def test_each_eval_lm_pass_gets_a_fresh_handle(data):
    task = make_task(data[0])
    first = next(iter(task.eval_lm_dataloader(task.dataset("train"), batch_size=2)))
    first["net_input"]["stream"].state = "memory of the first pass"
    second = next(iter(task.eval_lm_dataloader(task.dataset("train"), batch_size=2)))
    assert second["net_input"]["stream"].state is None


def test_eval_lm_rejects_context_window(data):
    task = make_task(data[0])
    with pytest.raises(ValueError, match="--context-window"):
        task.eval_lm_dataloader(task.dataset("train"), batch_size=2, context_window=1)


# ---------------------------------------------------------------------------------- CLI
def test_train_and_eval_lm_through_the_cli(tmp_path):
    for split, n_lines, seed in [("train", 200, 0), ("valid", 20, 1), ("test", 21, 2)]:
        write_corpus(tmp_path / f"{split}.txt", n_lines, seed)
    run_cli("fairseq_cli.preprocess", "--only-source", "--trainpref", "train.txt",
            "--validpref", "valid.txt", "--testpref", "test.txt", "--destdir", "bin",
            "--workers", "1", cwd=tmp_path)
    train_log = run_cli("fairseq_cli.train", "bin", "--user-dir", "rmt_plugin", "--task", "rmt_lm",
            "--arch", "rmt_tiny", "--criterion", "rmt_lm", "--num-mem-tokens", 4,
            "--bptt-depth", 1, "--segments-per-sample", 2, "--tokens-per-sample", 16,
            "--batch-size", 4, "--max-update", 20, "--optimizer", "adam", "--lr", 1e-3,
            "--save-dir", "ckpt", "--no-epoch-checkpoints", "--cpu", "--num-workers", 0,
            "--log-format", "simple", "--seed", 1, cwd=tmp_path)
    assert "valid on 'valid' subset" in train_log
    assert "fresh memory" not in train_log  # the memory was carried through every batch
    out = run_cli("fairseq_cli.eval_lm", "bin", "--user-dir", "rmt_plugin", "--task", "rmt_lm",
                  "--path", "ckpt/checkpoint_last.pt", "--gen-subset", "test", "--batch-size", 2,
                  "--tokens-per-sample", 8, "--model-overrides", "{'mem_len': 16}", "--cpu",
                  cwd=tmp_path)
    assert "Loss (base 2)" in out and "Perplexity" in out
    test_tokens = sum(len(line.split()) + 1 for line in open(tmp_path / "test.txt"))
    evaluated = int(re.search(r"Evaluated ([\d,]+) tokens", out).group(1).replace(",", ""))
    assert evaluated == 2 * (test_tokens // 2)


@pytest.mark.parametrize("num_mem_tokens, mem_len, fits", [(2, 4, True), (2, 0, False), (0, 4, False)])
def test_memory_only_loss_is_checked_against_the_model_before_any_batch(data, num_mem_tokens, mem_len, fits):
    # fairseq-train builds the model, then the criterion; a failure in the first training step
    # would already leave a crash.pt checkpoint behind
    task = make_task(data[0])
    model_cfg = OmegaConf.structured(RMTConfig(n_layer=1, d_model=8, n_head=2, d_head=4, d_inner=16,
                                               num_mem_tokens=num_mem_tokens, mem_len=mem_len))
    model_cfg._name = "rmt"
    task.build_model(model_cfg)
    criterion_cfg = OmegaConf.structured(RMTLMCriterionConfig(memory_only_loss_weight=0.01))
    criterion_cfg._name = "rmt_lm"
    if fits:
        assert task.build_criterion(criterion_cfg).memory_only_loss_weight == 0.01
    else:
        with pytest.raises(ValueError, match="--memory-only-loss-weight needs a Tr-XL"):
            task.build_criterion(criterion_cfg)


@pytest.mark.parametrize("num_mem_tokens, target_token, fits", [(2, True, True), (2, False, False), (0, True, False)])
def test_memory_token_loss_is_checked_against_the_model_before_any_batch(data, num_mem_tokens, target_token, fits):
    task = make_task(data[0])
    model_cfg = OmegaConf.structured(RMTConfig(n_layer=1, d_model=8, n_head=2, d_head=4, d_inner=16,
                                               num_mem_tokens=num_mem_tokens, memory_target_token=target_token))
    model_cfg._name = "rmt"
    task.build_model(model_cfg)
    criterion_cfg = OmegaConf.structured(RMTLMCriterionConfig(memory_token_loss_weight=0.01))
    criterion_cfg._name = "rmt_lm"
    if fits:
        assert task.build_criterion(criterion_cfg).memory_token_loss_weight == 0.01
    else:
        with pytest.raises(ValueError, match="--memory-token-loss-weight needs memory tokens"):
            task.build_criterion(criterion_cfg)
