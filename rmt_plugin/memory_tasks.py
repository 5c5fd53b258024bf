"""Memory tasks: synthetic problems that need memory carried across segments.

An example is a *source* followed by a *target*. The model reads ``source <sep> target`` in
segments of ``--tokens-per-sample`` (T) tokens, one after the other, carrying its memory across
the segments of one example and starting with fresh memory for the next; it is trained and
scored on the target tokens only. With the paper's T = 8, copy (24 -> 48 tokens) spans 9
segments and reverse (24 -> 24) spans 6.

Curriculum (``--curriculum-source-len 4,8,16,24``): training starts at the first source length
and moves to the next at the start of an epoch when the last validation before it reached
``--curriculum-threshold`` exact match on the ``valid`` split, which follows the training
length. The ``test`` split is always made at the last length, so its exact match is the task's
(and never steers the curriculum). Example, threshold 0.9, validation every epoch::

    epoch 1: source 4   valid exact 0.95 -> epoch 2: source 8   valid 0.60 -> epoch 3: source 8 ...
    (test: source 24 throughout)

The current length is logged as ``curriculum_source_len``; it travels in the checkpoint (the
task state), so a resumed run trains every epoch at the length the uninterrupted run would.

A memory task is a :class:`MemoryTask` subclass registered with :func:`register_memory_task`:
it names its vocabulary and draws one (source, target) from a numpy random generator. The
fairseq task ``rmt_memory`` (``--task rmt_memory --memory-task NAME``) turns it into data.
"""

import copy
import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from fairseq import metrics
from fairseq.data import Dictionary, FairseqDataset, data_utils
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, DictConfig, open_dict

from .checks import ChecksCriterionAgainstModel
from .flags import int_list
from .steps import CarriedMemorySteps

logger = logging.getLogger(__name__)

MEMORY_TASKS = {}
SEPARATOR = "<sep>"

# Splits are disjoint by construction: a keyed hash of the source picks one of NUM_BUCKETS
# buckets, and each split keeps only the draws that land in its own buckets.
NUM_BUCKETS = 16
SPLIT_BUCKETS = {"train": range(0, 14), "valid": range(14, 15), "test": range(15, 16)}
SPLITS = tuple(SPLIT_BUCKETS)
# A split gives up (with an error) after this many draws per wanted example: the task's
# source space is then too small to fill it from the split's buckets.
MAX_DRAWS_PER_EXAMPLE = 200


def register_memory_task(name):
    """Class decorator: make a :class:`MemoryTask` subclass available as ``--memory-task NAME``."""

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, MemoryTask)):
            raise TypeError(f"@register_memory_task({name!r}) needs a MemoryTask subclass, got {cls!r}")
        if name in MEMORY_TASKS:
            raise ValueError(f"memory task {name!r} is already registered ({MEMORY_TASKS[name].__name__})")
        MEMORY_TASKS[name] = cls
        return cls

    return register


class MemoryTask:
    """One memory task: its vocabulary and a way to draw an example.

    ``__init__`` receives the ``rmt_memory`` task config (``cfg.source_len``, ``cfg.num_symbols``,
    ...), sets ``self.symbols`` (distinct token names) and may reject options by raising
    ``ValueError`` with a one-line message naming the flag. ``draw(rng)`` returns (source,
    target): non-empty integer sequences of indices into ``self.symbols``.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.symbols = []

    def draw(self, rng: np.random.Generator):
        raise NotImplementedError


@register_memory_task("copy")
class Copy(MemoryTask):
    """A random sequence of --source-len symbols, written out --copy-repeats times (paper: 2)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.symbols = [f"s{i}" for i in range(cfg.num_symbols)]

    def draw(self, rng):
        source = rng.integers(self.cfg.num_symbols, size=self.cfg.source_len)
        return source, np.tile(source, self.cfg.copy_repeats)


@register_memory_task("reverse")
class Reverse(Copy):
    """A random sequence of --source-len symbols, written out backwards."""

    def draw(self, rng):
        source = rng.integers(self.cfg.num_symbols, size=self.cfg.source_len)
        return source, source[::-1]


@register_memory_task("associative_retrieval")
class AssociativeRetrieval(MemoryTask):
    """--num-pairs (key, value) pairs with distinct keys, then one of the keys; answer its value."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.num_pairs > cfg.num_symbols:
            raise ValueError(
                f"--num-pairs {cfg.num_pairs} needs as many distinct keys, but --num-symbols is {cfg.num_symbols}"
            )
        keys = [f"k{i}" for i in range(cfg.num_symbols)]
        self.symbols = keys + [f"v{i}" for i in range(cfg.num_symbols)]

    def draw(self, rng):
        n, pairs = self.cfg.num_symbols, self.cfg.num_pairs
        keys = rng.choice(n, size=pairs, replace=False)
        values = n + rng.integers(n, size=pairs)
        asked = rng.integers(pairs)
        source = np.append(np.stack([keys, values], axis=1).ravel(), keys[asked])
        return source, values[asked : asked + 1]


@dataclass
class MemoryTaskConfig(FairseqDataclass):
    memory_task: str = field(
        default="copy",
        metadata={"help": "the memory task: copy, reverse, associative_retrieval, or any name "
                  "registered with @register_memory_task"},
    )
    tokens_per_sample: int = field(
        default=8, metadata={"help": "segment length T: tokens the model reads at a time (paper: 8)"}
    )
    source_len: int = field(
        default=24, metadata={"help": "source length in tokens: copy, reverse, and tasks that read it (paper: 24)"}
    )
    copy_repeats: int = field(
        default=2, metadata={"help": "copy: times the target writes the source out (paper: 2)"}
    )
    num_pairs: int = field(
        default=4, metadata={"help": "associative_retrieval: key-value pairs per example (paper: 4)"}
    )
    num_symbols: int = field(
        default=10, metadata={"help": "distinct symbols a source is drawn from (associative_retrieval: as "
                  "many keys and as many values)"}
    )
    max_segments: int = field(
        default=64, metadata={"help": "most segments an example may span; longer ones are an error"}
    )
    train_size: int = field(default=100_000, metadata={"help": "training examples"})
    valid_size: int = field(default=5_000, metadata={"help": "validation examples"})
    test_size: int = field(default=10_000, metadata={"help": "test examples"})
    data_seed: int = field(
        default=1,
        metadata={"help": "seed of the example generators; separate from --seed so that runs "
                  "with different training seeds see the same examples"},
    )
    curriculum_source_len: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated, increasing source lengths to train through, e.g. 4,8,16,24 "
                  "(replaces --source-len): the next one from the epoch after a validation reaching "
                  "--curriculum-threshold exact match (see the module docstring)"},
    )
    curriculum_threshold: float = field(
        default=0.9, metadata={"help": "exact match on the valid split that moves --curriculum-source-len on"}
    )
    # Only read to fail early: the curriculum needs the valid split validated.
    valid_subset: str = II("dataset.valid_subset")


def check_sizes(cfg):
    """One-line errors for sizes that are not positive, before anything is generated."""
    for name in ("tokens_per_sample", "source_len", "copy_repeats", "num_pairs", "num_symbols",
                 "max_segments", "train_size", "valid_size", "test_size"):
        value = getattr(cfg, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def parse_curriculum(cfg) -> List[int]:
    """The source lengths of ``--curriculum-source-len`` ([] without one), with one-line errors."""
    lengths = int_list(cfg.curriculum_source_len, "--curriculum-source-len")
    if not lengths:
        return []
    if lengths[0] < 1 or any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"--curriculum-source-len must be positive and increasing, got {cfg.curriculum_source_len!r}")
    if not 0 < cfg.curriculum_threshold <= 1:
        raise ValueError(f"--curriculum-threshold must be in (0, 1], got {cfg.curriculum_threshold}")
    if "valid" not in str(cfg.valid_subset).split(","):
        raise ValueError(f"--curriculum-source-len moves on by the valid split's exact match, but --valid-subset "
                         f"{cfg.valid_subset} does not validate it")
    return lengths


def with_source_len(cfg, source_len):
    """A copy of the task config with another ``source_len``."""
    if isinstance(cfg, DictConfig):
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.source_len = source_len
        return cfg
    return dataclasses.replace(cfg, source_len=source_len)


def build_memory_task(cfg):
    if cfg.memory_task not in MEMORY_TASKS:
        raise ValueError(
            f"--memory-task {cfg.memory_task!r} is unknown; registered: {', '.join(sorted(MEMORY_TASKS))}"
        )
    return MEMORY_TASKS[cfg.memory_task](cfg)


def build_dictionary(memory_task):
    """fairseq's specials, the separator, then the task's symbols in order (so symbol i has
    index ``first_symbol_index(dictionary) + i``)."""
    dictionary = Dictionary()
    for symbol in [SEPARATOR] + list(memory_task.symbols):
        if symbol in dictionary.indices:
            raise ValueError(f"--memory-task {memory_task.cfg.memory_task!r}: symbol {symbol!r} is taken twice")
        dictionary.add_symbol(symbol)
    return dictionary


def first_symbol_index(dictionary):
    return dictionary.index(SEPARATOR) + 1


def num_segments(source_len, target_len, tokens_per_sample):
    """Segments the model reads for one example: it sees ``source <sep> target[:-1]``."""
    return math.ceil((source_len + target_len) / tokens_per_sample)


def layout(source, target, sep, pad):
    """(inputs, targets) rows of one example: the model reads ``source sep target[:-1]`` and at
    each position predicts the next token; only positions that predict a target token count."""
    stream = np.concatenate([source, [sep], target])
    inputs = stream[:-1]
    targets = np.full_like(inputs, pad)
    targets[len(source):] = target
    return inputs, targets


def split_bucket(source, seed):
    digest = hashlib.blake2b(source.tobytes(), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") % NUM_BUCKETS


def draw_checked(memory_task, rng):
    """One draw as int64 arrays, with a one-line error if the task broke its contract."""
    source, target = (np.asarray(part, dtype=np.int64) for part in memory_task.draw(rng))
    name = memory_task.cfg.memory_task
    if source.ndim != 1 or target.ndim != 1 or not len(source) or not len(target):
        raise ValueError(f"--memory-task {name!r}: draw() must return two non-empty 1-d sequences")
    if min(source.min(), target.min()) < 0 or max(source.max(), target.max()) >= len(memory_task.symbols):
        raise ValueError(
            f"--memory-task {name!r}: draw() returned a token outside its {len(memory_task.symbols)} symbols"
        )
    return source, target


def check_segments(memory_task, source, target):
    cfg = memory_task.cfg
    needed = num_segments(len(source), len(target), cfg.tokens_per_sample)
    if needed > cfg.max_segments:
        raise ValueError(
            f"--memory-task {cfg.memory_task!r}: source ({len(source)}) + target ({len(target)}) tokens "
            f"span {needed} segments of --tokens-per-sample {cfg.tokens_per_sample}, "
            f"more than --max-segments {cfg.max_segments}"
        )


def generate_split(memory_task, split, size, seed):
    """``size`` (source, target) pairs of ``split``: the same for the same seed, and never a
    source that another split can hold."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    buckets, examples = SPLIT_BUCKETS[split], []
    for _ in range(MAX_DRAWS_PER_EXAMPLE * size):
        source, target = draw_checked(memory_task, rng)
        if split_bucket(source, seed) in buckets:
            check_segments(memory_task, source, target)
            examples.append((source, target))
            if len(examples) == size:
                return examples
    raise ValueError(
        f"--memory-task {memory_task.cfg.memory_task!r}: found only {len(examples)} of {size} {split} "
        f"examples in {MAX_DRAWS_PER_EXAMPLE * size} draws; its sources are too few to split "
        "(raise --source-len or --num-symbols)"
    )


class MemoryTaskDataset(FairseqDataset):
    """Examples of one split, one per row; batches are padded to a multiple of T columns."""

    def __init__(self, examples, dictionary, tokens_per_sample, split):
        self.split = split
        offset, sep = first_symbol_index(dictionary), dictionary.index(SEPARATOR)
        self.pad, self.tokens_per_sample = dictionary.pad(), tokens_per_sample
        rows = [layout(source + offset, target + offset, sep, self.pad) for source, target in examples]
        # one flat array instead of 100k small ones keeps the default train split at ~30 MB
        self.inputs = np.concatenate([inputs for inputs, _ in rows]).astype(np.int32)
        self.targets = np.concatenate([targets for _, targets in rows]).astype(np.int32)
        lengths = np.array([len(inputs) for inputs, _ in rows], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.sizes = -(-lengths // tokens_per_sample) * tokens_per_sample

    def __getitem__(self, index):
        start, end = self.offsets[index], self.offsets[index + 1]
        return {
            "id": index,
            "source": torch.from_numpy(self.inputs[start:end].astype(np.int64)),
            "target": torch.from_numpy(self.targets[start:end].astype(np.int64)),
        }

    def __len__(self):
        return len(self.sizes)

    def num_tokens(self, index):
        return self.sizes[index]

    def size(self, index):
        return self.sizes[index]

    def collater(self, samples):
        if not samples:
            return {}
        pad_to = self.tokens_per_sample
        src_tokens = data_utils.collate_tokens([s["source"] for s in samples], self.pad, pad_to_multiple=pad_to)
        target = data_utils.collate_tokens([s["target"] for s in samples], self.pad, pad_to_multiple=pad_to)
        return {
            "id": torch.LongTensor([s["id"] for s in samples]),
            "nsentences": len(samples),
            "ntokens": int(target.ne(self.pad).sum()),
            "net_input": {
                "src_tokens": src_tokens,
                "src_lengths": torch.LongTensor([len(s["source"]) for s in samples]),
            },
            "target": target,
            "split": self.split,
        }


@register_task("rmt_memory", dataclass=MemoryTaskConfig)
class RMTMemoryTask(CarriedMemorySteps, ChecksCriterionAgainstModel, FairseqTask):
    """Generated memory-task examples (see the module docstring), read segment by segment."""

    # An example spans a few segments: the memory read fed back into the write block hands the
    # source on (the learned start memory left copy 16 -> 16 at chance: docs/memory_tasks.md).
    auto_memory_write_input = "memory"

    def __init__(self, cfg, memory_task, dictionary):
        super().__init__(cfg)
        self.memory_task = memory_task
        self.dictionary = dictionary
        self.curriculum = parse_curriculum(cfg)
        if self.curriculum:
            # level: index into the curriculum; epoch: the last epoch whose training data was made;
            # last_valid: (exact, rows) of the last validation pass, which decides the next level
            self.state.merge_state_dict({"curriculum_level": 0, "curriculum_epoch": 0,
                                         "curriculum_last_valid": [0, 0]})
        self._valid_counts = None  # (exact, rows) of the validation pass running, if one is
        self._split_levels = {}  # split -> the curriculum level its examples were made at
        self._curriculum_datasets = {}  # (split, level) -> dataset

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        check_sizes(cfg)
        for source_len in parse_curriculum(cfg) or [cfg.source_len]:
            memory_task = build_memory_task(with_source_len(cfg, source_len))
            # fixed-length tasks fail here, before the model is built; others when generated
            check_segments(memory_task, *draw_checked(memory_task, np.random.default_rng(cfg.data_seed)))
        memory_task = build_memory_task(cfg)
        return cls(cfg, memory_task, build_dictionary(memory_task))

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        if split not in SPLITS:
            raise ValueError(
                f"rmt_memory generates the splits {', '.join(SPLITS)}, not {split!r} "
                "(see --train-subset, --valid-subset)"
            )
        if not self.curriculum:
            self.datasets[split] = self._generate(self.memory_task, split)
            return
        if split == "train" and epoch > self.state.curriculum_epoch:
            self._next_level(epoch)
        # test: always the last length (see the module docstring)
        level = len(self.curriculum) - 1 if split == "test" else self.state.curriculum_level
        if (split, level) not in self._curriculum_datasets:  # the same examples every epoch: made once
            memory_task = build_memory_task(with_source_len(self.cfg, self.curriculum[level]))
            self._curriculum_datasets[split, level] = self._generate(memory_task, split)
        self.datasets[split] = self._curriculum_datasets[split, level]
        self._split_levels[split] = level
        if split == "train" and self._split_levels.get("valid", level) != level:  # valid follows
            self.load_dataset("valid")

    def _generate(self, memory_task, split):
        examples = generate_split(memory_task, split, getattr(self.cfg, f"{split}_size"), self.cfg.data_seed)
        return MemoryTaskDataset(examples, self.dictionary, self.cfg.tokens_per_sample, split)

    # ------------------------------------------------------------------ curriculum
    def has_sharded_data(self, split):
        # fairseq-train then calls load_dataset("train", epoch) at every epoch start
        return bool(self.curriculum) or super().has_sharded_data(split)

    def _next_level(self, epoch):
        """At the start of a new training epoch: one level up if the last validation passed."""
        exact, rows = self.state.curriculum_last_valid
        level = self.state.curriculum_level
        if rows and exact / rows >= self.cfg.curriculum_threshold and level + 1 < len(self.curriculum):
            logger.info(f"curriculum: validation exact match {exact / rows:.3f} >= --curriculum-threshold "
                        f"{self.cfg.curriculum_threshold}: source length {self.curriculum[level]} -> "
                        f"{self.curriculum[level + 1]} from epoch {epoch}")
            level += 1
        self.state.merge_state_dict({"curriculum_level": level, "curriculum_epoch": epoch})

    def begin_valid_epoch(self, epoch, model):
        super().begin_valid_epoch(epoch, model)
        self._valid_counts = [0, 0] if self.curriculum else None

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if not self.curriculum:
            return
        if self._valid_counts is not None:  # validation: count the valid split's exact matches
            self._valid_counts[0] += sum(log.get("curriculum_exact", 0) for log in logging_outputs)
            self._valid_counts[1] += sum(log.get("curriculum_rows", 0) for log in logging_outputs)
            self.state.merge_state_dict({"curriculum_last_valid": list(self._valid_counts)})
        rows = sum(log.get("nsentences", 0) for log in logging_outputs)
        if rows:
            length = sum(log.get("curriculum_source_len_x_rows", 0) for log in logging_outputs) / rows
            metrics.log_scalar("curriculum_source_len", length, rows, round=0)

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.curriculum and sample.get("split") == "valid":
            # under their own names, so that the counts of all ranks reach reduce_metrics
            logging_output.update(curriculum_exact=logging_output["n_exact"],
                                  curriculum_rows=logging_output["n_rows"])
        return loss, sample_size, self._log_source_len(sample, logging_output)

    def train_step(self, sample, *args, **kwargs):
        self._valid_counts = None  # the validation pass is over
        loss, sample_size, logging_output = super().train_step(sample, *args, **kwargs)
        return loss, sample_size, self._log_source_len(sample, logging_output)

    def _log_source_len(self, sample, logging_output):
        """The batch's source length, times its rows: summable over batches and ranks like the rest."""
        if self.curriculum and sample.get("split") in self._split_levels:
            source_len = self.curriculum[self._split_levels[sample["split"]]]
            logging_output["curriculum_source_len_x_rows"] = source_len * logging_output.get("nsentences", 0)
        return logging_output

    def build_criterion(self, cfg):
        # exact match is what these tasks are judged by: always log it (and per-token accuracy)
        if "report_accuracy" in cfg:
            with open_dict(cfg):
                cfg.report_accuracy = True
        return super().build_criterion(cfg)

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary
