"""Memory tasks (rmt_plugin/memory_tasks.py): generators, layout, errors, the extension API, and
a tiny RMT that learns a 2-segment copy that the same model without memory cannot."""

import importlib.util
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq.data import Dictionary

from rmt_plugin import memory_tasks
from rmt_plugin.memory_tasks import (
    MEMORY_TASKS,
    SEPARATOR,
    MemoryTask,
    MemoryTaskConfig,
    RMTMemoryTask,
    register_memory_task,
)
from rmt_plugin.model import RMTConfig, RMTDecoder

REPO = Path(__file__).resolve().parents[1]
FAIRSEQ_TRAIN = str(Path(sys.executable).with_name("fairseq-train"))
SMALL_SPLITS = dict(train_size=300, valid_size=40, test_size=40, valid_subset="valid")


def make_task(**overrides):
    return RMTMemoryTask.setup_task(MemoryTaskConfig(**{**SMALL_SPLITS, **overrides}))


def load(task, split):
    task.load_dataset(split)
    return task.datasets[split]


def sources(dataset):
    """The set of sources of a split, read back from the model inputs."""
    found = set()
    for i in range(len(dataset)):
        item = dataset[i]
        source_len = int(item["target"].ne(dataset.pad).nonzero()[0, 0])
        found.add(tuple(item["source"][:source_len].tolist()))
    return found


# ----------------------------------------------------------------------------- generators
def test_generation_is_deterministic_per_seed():
    first = load(make_task(data_seed=7), "train")
    again = load(make_task(data_seed=7), "train")
    other = load(make_task(data_seed=8), "train")
    assert np.array_equal(first.inputs, again.inputs) and np.array_equal(first.targets, again.targets)
    assert not np.array_equal(first.inputs, other.inputs)


def test_splits_do_not_overlap():
    # 4 symbols ** 4 tokens = 256 sources: 2000 training draws cover most of them, so splits
    # drawn independently would share sources.
    task = make_task(source_len=4, num_symbols=4, train_size=2000, valid_size=300, test_size=300)
    train, valid, test = (sources(load(task, split)) for split in ("train", "valid", "test"))
    assert len(train) > 150 and valid and test
    assert not train & valid and not train & test and not valid & test


@pytest.mark.parametrize("name", ["copy", "reverse", "associative_retrieval"])
def test_builtin_targets_follow_from_sources(name):
    task = make_task(memory_task=name, source_len=5, copy_repeats=2, num_pairs=4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        source, target = task.memory_task.draw(rng)
        if name == "copy":
            assert list(target) == list(source) * 2
        elif name == "reverse":
            assert list(target) == list(source)[::-1]
        else:
            keys, values, asked = source[0:8:2], source[1:8:2], source[8]
            assert len(set(keys)) == 4 and asked in keys
            assert list(target) == [values[list(keys).index(asked)]]


def test_paper_setups_span_9_and_6_segments_of_8_tokens():
    copy = load(make_task(memory_task="copy", tokens_per_sample=8), "valid")
    reverse = load(make_task(memory_task="reverse", tokens_per_sample=8), "valid")
    assert copy.collater([copy[0]])["net_input"]["src_tokens"].shape == (1, 9 * 8)
    assert reverse.collater([reverse[0]])["net_input"]["src_tokens"].shape == (1, 6 * 8)


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("source_len, segments", [(3, 1), (8, 2), (12, 3)])
def test_layout_for_sources_shorter_equal_and_longer_than_T(source_len, segments):
    T = 8
    task = make_task(memory_task="reverse", source_len=source_len, tokens_per_sample=T)
    dataset = load(task, "valid")
    batch = dataset.collater([dataset[0], dataset[1]])
    tokens, target = batch["net_input"]["src_tokens"], batch["target"]
    pad, sep = task.dictionary.pad(), task.dictionary.index(SEPARATOR)
    assert tokens.shape == target.shape == (2, segments * T)
    for row_tokens, row_target in zip(tokens.tolist(), target.tolist()):
        source = row_tokens[:source_len]
        assert row_tokens[source_len] == sep
        assert row_target[:source_len] == [pad] * source_len  # no loss on the source
        assert row_target[source_len : 2 * source_len] == source[::-1]  # the reversed source
        assert row_tokens[source_len + 1 : 2 * source_len] == row_target[source_len : 2 * source_len - 1]
        assert row_tokens[2 * source_len :] == row_target[2 * source_len :] == [pad] * (segments * T - 2 * source_len)
    assert batch["ntokens"] == 2 * source_len
    assert batch["net_input"]["src_lengths"].tolist() == [2 * source_len] * 2


def test_each_example_is_one_row_starting_a_stream():
    """Examples are never packed together: every row begins with its own source."""
    task = make_task(memory_task="copy", source_len=4, copy_repeats=1, tokens_per_sample=3)
    dataset = load(task, "train")
    batch = dataset.collater([dataset[i] for i in range(5)])
    assert (batch["net_input"]["src_tokens"][:, 4] == task.dictionary.index(SEPARATOR)).all()
    assert batch["id"].tolist() == list(range(5))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(memory_task="nope"), "--memory-task 'nope' is unknown; registered: associative_retrieval, copy"),
        (dict(tokens_per_sample=0), "--tokens-per-sample must be positive, got 0"),
        (dict(max_segments=0), "--max-segments must be positive, got 0"),
        (dict(source_len=-1), "--source-len must be positive, got -1"),
        (dict(valid_size=0), "--valid-size must be positive, got 0"),
        (dict(source_len=24, copy_repeats=2, tokens_per_sample=8, max_segments=4),
         "span 9 segments of --tokens-per-sample 8, more than --max-segments 4"),
        (dict(memory_task="associative_retrieval", num_pairs=11, num_symbols=10),
         "--num-pairs 11 needs as many distinct keys, but --num-symbols is 10"),
    ],
)
def test_bad_options_give_one_line_errors(overrides, message):
    with pytest.raises(ValueError) as error:
        make_task(**overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_split_that_cannot_be_filled_is_an_error():
    task = make_task(source_len=1, num_symbols=2)  # 2 sources for 3 splits
    with pytest.raises(ValueError, match="sources are too few to split"):
        task.load_dataset("test")


def test_unknown_split_names_the_flag():
    with pytest.raises(ValueError, match="--valid-subset"):
        make_task().load_dataset("valid1")


def test_bad_option_on_the_command_line_ends_in_one_line(tmp_path):
    run = subprocess.run(
        [FAIRSEQ_TRAIN, "--user-dir", "rmt_plugin", "--task", "rmt_memory", "--memory-task", "nope",
         "--arch", "rmt_tiny", "--criterion", "rmt_lm", "--batch-size", "2", "--cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].startswith("ValueError: --memory-task 'nope' is unknown")


# ----------------------------------------------------------------------------- extension API
@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(memory_tasks, "MEMORY_TASKS", dict(MEMORY_TASKS))
    return memory_tasks.MEMORY_TASKS


def test_a_registered_task_becomes_a_memory_task_option(scratch_registry):
    @register_memory_task("first_token")
    class FirstToken(MemoryTask):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.symbols = ["a", "b", "c"]

        def draw(self, rng):
            source = rng.integers(3, size=self.cfg.source_len)
            return source, source[:1]

    task = make_task(memory_task="first_token", source_len=6)
    assert [task.dictionary[i] for i in range(len(task.dictionary))][-4:] == [SEPARATOR, "a", "b", "c"]
    dataset = load(task, "valid")
    row = dataset[0]
    assert row["target"][6] == row["source"][0]  # the answer follows <sep>


def test_registry_rejects_duplicates_and_non_tasks(scratch_registry):
    with pytest.raises(ValueError, match="'copy' is already registered"):
        register_memory_task("copy")(type("Again", (MemoryTask,), {}))
    with pytest.raises(TypeError, match="needs a MemoryTask subclass"):
        register_memory_task("function")(lambda rng: None)


def test_draw_that_breaks_the_contract_is_named(scratch_registry):
    @register_memory_task("broken")
    class Broken(MemoryTask):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.symbols = ["a"]

        def draw(self, rng):
            return [0, 1], [0]

    with pytest.raises(ValueError, match="'broken': draw\\(\\) returned a token outside its 1 symbols"):
        make_task(memory_task="broken")


def test_example_plugin_needle_hides_the_answer_in_the_source(scratch_registry):
    path = REPO / "examples" / "memory_task_plugin" / "__init__.py"
    spec = importlib.util.spec_from_file_location("memory_task_plugin_under_test", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    task = make_task(memory_task="needle", source_len=20, num_symbols=5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        source, target = task.memory_task.draw(rng)
        at = list(source).index(10)  # the marker, after 5 hay and 5 value symbols
        assert list(target) == [source[at + 1]] and 5 <= source[at + 1] < 10


def test_the_documented_example_task_works(scratch_registry):
    doc = (REPO / "docs" / "memory_tasks.md").read_text()
    code = doc.split("```python\n")[1].split("```")[0]
    exec(compile(code, "docs/memory_tasks.md", "exec"), {})
    task = make_task(memory_task="count", source_len=10, tokens_per_sample=4)
    dataset = load(task, "valid")
    for row in (dataset[i] for i in range(len(dataset))):
        source = [task.dictionary[i] for i in row["source"][:10].tolist()]
        answer = [task.dictionary[i] for i in row["target"].tolist() if i != dataset.pad]
        assert answer == ["one"] * source.count("a") + ["end"]


def test_example_plugin_trains_through_its_own_user_dir(tmp_path):
    """One --user-dir (the example) is enough: it brings rmt_plugin along. fairseq also picks
    the best checkpoint by the task's exact match (a KeyError if it were not logged)."""
    run = subprocess.run(
        [FAIRSEQ_TRAIN, "--user-dir", str(REPO / "examples" / "memory_task_plugin"), "--task", "rmt_memory",
         "--memory-task", "needle", "--source-len", "12", "--tokens-per-sample", "8", "--train-size", "64",
         "--valid-size", "16", "--arch", "rmt_tiny", "--criterion", "rmt_lm", "--optimizer", "adam",
         "--batch-size", "16", "--max-update", "2", "--cpu", "--no-save", "--num-workers", "0",
         "--save-dir", str(tmp_path), "--log-format", "json",
         "--best-checkpoint-metric", "exact_match", "--maximize-best-checkpoint-metric"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"valid_exact_match"' in run.stdout + run.stderr


# ----------------------------------------------------------------------------- with the model
def build(*flags):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["--user-dir", "rmt_plugin", "--cpu", "--batch-size", "4", *flags])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    return task, task.build_model(cfg.model).eval(), task.build_criterion(cfg.criterion)


@pytest.mark.parametrize("task, write_input", [
    ("rmt_memory", "memory"),  # examples of a few segments: the read memory hands the source on
    ("rmt_lm", "learned"),  # one long stream, where the read memory fed back collapses
])
def test_a_small_archs_write_input_is_the_tasks_and_the_checkpoint_keeps_it(tiny_data_bin, task, write_input):
    task_flags = ("--task", task) if task == "rmt_memory" else (str(tiny_data_bin), "--task", task)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["--user-dir", "rmt_plugin", "--cpu", "--batch-size", "4",
                                                *task_flags, "--arch", "rmt_tiny"])
    cfg = convert_namespace_to_omegaconf(args)
    assert cfg.model.memory_write_input == "auto"
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    assert model.decoder.cfg.memory_write_input == write_input
    assert cfg.model.memory_write_input == write_input  # what fairseq's checkpoint saves
    other = "learned" if write_input == "memory" else "memory"  # a flag still wins
    _, model, _ = build(*task_flags, "--arch", "rmt_tiny", "--criterion", "rmt_lm", "--memory-write-input", other)
    assert model.decoder.cfg.memory_write_input == other
    # no write block (MemTr): auto is the memory read, where learned would be an error
    _, model, _ = build(*task_flags, "--arch", "rmt_tiny", "--criterion", "rmt_lm", "--memory-layout", "memtr",
                        "--memory-write-input", "auto")
    assert model.decoder.cfg.memory_write_input == "memory"


def test_an_explicit_auto_on_the_dataclass_arch_is_resolved_in_the_saved_config():
    # fairseq copies the config of --arch rmt (a dataclass model) before the model's build_model sees it
    args = options.parse_args_and_arch(options.get_training_parser(), [
        "--user-dir", "rmt_plugin", "--cpu", "--batch-size", "4", "--task", "rmt_memory", "--criterion", "rmt_lm",
        "--arch", "rmt", "--num-mem-tokens", "2", "--memory-write-input", "auto"])
    cfg = convert_namespace_to_omegaconf(args)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    assert model.decoder.cfg.memory_write_input == cfg.model.memory_write_input == "memory"


def test_an_unresolved_auto_write_input_is_an_error():
    cfg = RMTConfig(n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32, num_mem_tokens=2, memory_write_input="auto")
    with pytest.raises(ValueError, match="--memory-write-input auto is the task's choice"):
        RMTDecoder(cfg, Dictionary())


def test_task_switches_on_exact_match_and_accuracy():
    _, _, criterion = build("--task", "rmt_memory", "--arch", "rmt_tiny", "--criterion", "rmt_lm")
    assert criterion.report_accuracy


def test_memory_only_loss_is_checked_against_the_arch_when_the_criterion_is_built():
    flags = ("--task", "rmt_memory", "--criterion", "rmt_lm", "--memory-only-loss-weight", "0.01")
    with pytest.raises(ValueError, match="--memory-only-loss-weight needs a Tr-XL"):
        build(*flags, "--arch", "rmt_tiny")  # no cache
    _, _, criterion = build(*flags, "--arch", "rmt_xl_tiny")  # memory and cache from the arch defaults
    assert criterion.memory_only_loss_weight == 0.01


def test_memory_resets_between_examples():
    task, model, criterion = build(
        "--task", "rmt_memory", "--memory-task", "copy", "--source-len", "6", "--copy-repeats", "1",
        "--tokens-per-sample", "4", "--train-size", "8", "--valid-size", "8", "--test-size", "8",
        "--arch", "rmt_tiny", "--num-mem-tokens", "4", "--init-std", "0.2", "--criterion", "rmt_lm",
    )
    dataset = load(task, "valid")
    a, b = dataset.collater([dataset[0]]), dataset.collater([dataset[1]])
    both = dataset.collater([dataset[0], dataset[1]])
    with torch.no_grad():
        loss_a = criterion(model, a)[0]
        loss_b = criterion(model, b)[0]
        criterion(model, b)  # a batch before must not leak into the next one
        assert torch.allclose(criterion(model, a)[0], loss_a)
        # rows of one batch are separate examples with their own memory
        assert torch.allclose(criterion(model, both)[0], loss_a + loss_b, rtol=1e-5)
        # and the memory does matter: a different source changes the target's loss
        changed = dict(a, net_input=dict(a["net_input"], src_tokens=a["net_input"]["src_tokens"].clone()))
        first_token, s0 = int(a["net_input"]["src_tokens"][0, 0]), task.dictionary.index("s0")
        changed["net_input"]["src_tokens"][0, 0] = s0 if first_token != s0 else s0 + 1
        assert not torch.allclose(criterion(model, changed)[0], loss_a)


def train_copy(tmp_path, name, *model_flags, source_len=6, segment=6, epochs=2):
    """Start fairseq-train on a copy of ``source_len`` tokens in segments of ``segment`` (default: 2
    segments, 6 tokens, T = 6); returns (process, log path)."""
    log_path = tmp_path / f"{name}.log"
    command = [
        FAIRSEQ_TRAIN, "--user-dir", "rmt_plugin", "--task", "rmt_memory", "--memory-task", "copy",
        "--source-len", str(source_len), "--copy-repeats", "1", "--tokens-per-sample", str(segment),
        "--num-symbols", "10", "--train-size", "8000", "--valid-size", "500", "--arch", "rmt_tiny",
        "--criterion", "rmt_lm", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "32",
        "--max-epoch", str(epochs), "--seed", "1", "--num-workers", "0", "--cpu", "--no-save",
        "--save-dir", str(tmp_path / name), "--log-format", "json", *model_flags,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with log_path.open("w") as log:
        return subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env), log_path


def final_valid_exact_match(process, log_path):
    assert process.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    stats = [json.loads(line[line.index("{"):]) for line in log_path.read_text().splitlines()
             if "| valid |" in line]
    return float(stats[-1]["valid_exact_match"])


def test_tiny_rmt_learns_2_segment_copy_that_no_memory_cannot(tmp_path):
    # both trainings run at once, one core each
    rmt = train_copy(tmp_path, "rmt", "--num-mem-tokens", "6", "--bptt-depth", "1")
    no_memory = train_copy(tmp_path, "no_memory", "--num-mem-tokens", "0", "--bptt-depth", "0")
    rmt_em, no_memory_em = final_valid_exact_match(*rmt), final_valid_exact_match(*no_memory)
    print(f"2-segment copy, validation exact match: RMT {rmt_em}, no memory {no_memory_em}")
    assert rmt_em >= 0.9
    assert no_memory_em <= 0.05


def test_tiny_rmt_with_no_write_input_flag_learns_a_copy_its_memory_must_hold_across_a_segment(tmp_path):
    # Copy 8 in segments of 4: a source token's target is 2 to 3 segments later, so the memory written
    # after the source's first half must survive the second. The default (auto: the paper's input for
    # memory tasks) learns it in 2 epochs; the learned start memory (the default before) sits at
    # chance for 6 epochs with this seed (docs/memory_tasks.md, "The write input").
    em = final_valid_exact_match(*train_copy(tmp_path, "rmt", source_len=8, segment=4, epochs=3))
    print(f"copy 8 in segments of 4, validation exact match: {em}")
    assert em >= 0.9



# ----------------------------------------------------------------------------- curriculum
class NoCriterion:
    @staticmethod
    def reduce_metrics(logging_outputs):
        pass


def source_lengths(dataset):
    return {int(dataset[i]["target"].ne(dataset.pad).nonzero()[0, 0]) for i in range(len(dataset))}


class CountingCriterion:
    """Stands in for rmt_lm in valid_step: reports the exact matches it is given per split."""

    def __init__(self, exact_by_split):
        self.exact_by_split = exact_by_split

    def forward_with_state(self, model, sample, state, backward=None, epoch=1):
        exact, rows = self.exact_by_split[sample["split"]]
        return torch.zeros(()), rows, {"n_exact": exact, "n_rows": rows, "ntokens": 1, "nsentences": rows}, None

    @staticmethod
    def reduce_metrics(logging_outputs):
        pass


def validate(task, exact, rows, test=(0, 40)):
    """What fairseq-train's validation does with --valid-subset valid,test: one pass over both
    splits with these exact matches (the test split's must not count)."""
    from fairseq import metrics

    criterion = CountingCriterion({"valid": (exact, rows), "test": test})
    task.begin_valid_epoch(1, None)
    for split in ("valid", "test"):
        sample = task.datasets[split].collater([task.datasets[split][0]])
        _, _, logging_output = task.valid_step(sample, torch.nn.Module(), criterion)
        with metrics.aggregate():
            task.reduce_metrics([logging_output], criterion)


def test_curriculum_moves_on_at_the_next_epoch_after_a_passing_validation_and_resumes_there():
    task = make_task(curriculum_source_len="2,4,6", curriculum_threshold=0.75)
    task.load_dataset("valid")
    task.load_dataset("test")
    task.load_dataset("train", epoch=1)
    assert source_lengths(task.datasets["train"]) == {2} and source_lengths(task.datasets["valid"]) == {2}
    assert source_lengths(task.datasets["test"]) == {6}  # the test split is the task's: the last length
    validate(task, exact=30, rows=40)  # 0.75 passes (with the test split's 0 / 40 it would not)
    resumed = make_task(curriculum_source_len="2,4,6", curriculum_threshold=0.75)
    resumed.load_state_dict(task.state_dict())  # a checkpoint saved after that validation
    resumed.load_dataset("valid")  # as fairseq-train loads it, before the checkpoint
    for t in (task, resumed):
        t.load_dataset("train", epoch=2)
        assert source_lengths(t.datasets["train"]) == {4} and source_lengths(t.datasets["valid"]) == {4}
    assert source_lengths(task.datasets["test"]) == {6}
    validate(task, exact=29, rows=40, test=(40, 40))  # fails, whatever the test split's: epoch 3 stays at 4
    task.load_dataset("train", epoch=2)  # a mid-epoch resume reloads the same epoch: no change
    assert source_lengths(task.datasets["train"]) == {4}
    task.load_dataset("train", epoch=3)
    assert source_lengths(task.datasets["train"]) == {4}


@pytest.mark.parametrize("spec, threshold, needle", [
    ("4,2", 0.9, "--curriculum-source-len must be positive and increasing"),
    ("4,x", 0.9, "--curriculum-source-len must be comma-separated integers"),
    ("2,4", 0.0, "--curriculum-threshold must be in (0, 1]"),
    ("2,400", 0.9, "more than --max-segments"),
    ("2,4", 0.9, "--valid-subset test does not validate it"),
])
def test_curriculum_bad_flags_are_one_line_errors(spec, threshold, needle):
    valid_subset = "test" if "valid-subset" in needle else "valid"
    with pytest.raises(ValueError, match=re.escape(needle)):
        make_task(curriculum_source_len=spec, curriculum_threshold=threshold, valid_subset=valid_subset)


def test_curriculum_through_fairseq_train(tmp_path):
    # a 2-symbol copy (one segment) is learned within the first epoch; then the length moves to 3
    run = subprocess.run(
        [FAIRSEQ_TRAIN, "--user-dir", "rmt_plugin", "--task", "rmt_memory", "--memory-task", "copy",
         "--copy-repeats", "1", "--curriculum-source-len", "2,3", "--curriculum-threshold", "0.5",
         "--tokens-per-sample", "8", "--train-size", "2000", "--valid-size", "64", "--test-size", "16",
         "--arch", "rmt_tiny", "--criterion", "rmt_lm", "--optimizer", "adam", "--lr", "3e-3",
         "--batch-size", "32", "--max-epoch", "3", "--cpu", "--no-save", "--num-workers", "0",
         "--valid-subset", "valid,test", "--save-dir", str(tmp_path), "--log-format", "json", "--seed", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    epochs = [json.loads(line[line.index("{"):]) for line in log.splitlines() if "| train |" in line]
    assert [float(e["train_curriculum_source_len"]) for e in epochs] == [2, 3, 3], log[-3000:]
    tests = [json.loads(line[line.index("{"):]) for line in log.splitlines() if "| test |" in line]
    assert [float(e["test_curriculum_source_len"]) for e in tests] == [3, 3, 3], log[-3000:]
    assert "curriculum: validation exact match" in log and "source length 2 -> 3 from epoch 2" in log


class BackwardOptimizer:
    """What train_step needs of fairseq's optimizer: ``backward`` (no loss scaling here)."""

    @staticmethod
    def backward(loss):
        loss.backward()


@pytest.mark.parametrize("depth", [2, 5])
def test_memory_replay_works_on_memory_tasks_as_on_lm_streams(depth):
    """rmt_memory trains through the criterion's entrance with per-chain backward, so --memory-replay
    gives the plain schedule's gradients (float64, dropout on) at a lower peak of saved activations
    (12 segments)."""
    from rmt_plugin.measure import saved_tensor_peak

    results = {}
    for replay in (False, True):
        flags = ["--task", "rmt_memory", "--memory-task", "copy", "--source-len", "24", "--copy-repeats", "1",
                 "--tokens-per-sample", "4", "--train-size", "8", "--valid-size", "8", "--test-size", "8",
                 "--arch", "rmt_tiny", "--dropout", "0.1", "--criterion", "rmt_lm", "--bptt-depth", str(depth),
                 "--seed", "1"] + (["--memory-replay"] if replay else [])
        torch.manual_seed(0)
        task, model, criterion = build(*flags)
        model = model.double()  # float64: the two orders of summation agree to rounding
        dataset = load(task, "train")
        sample = dataset.collater([dataset[i] for i in range(4)])
        torch.manual_seed(3)
        with saved_tensor_peak() as meter:
            loss, _, _ = task.train_step(sample, model, criterion, BackwardOptimizer(), update_num=0)
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[replay] = loss, grads, meter["peak"]
    (plain_loss, plain_grads, plain_peak), (replay_loss, replay_grads, replay_peak) = results[False], results[True]
    assert sample["net_input"]["src_tokens"].size(1) == 12 * 4  # 12 segments of 4
    torch.testing.assert_close(replay_loss, plain_loss)
    assert plain_grads.keys() == replay_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(replay_grads[name], grad, rtol=0, atol=1e-9, msg=name)
    assert replay_peak < 0.6 * plain_peak, (replay_peak, plain_peak)
