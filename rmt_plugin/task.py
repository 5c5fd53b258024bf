"""The ``rmt_lm`` task: language modelling over contiguous token streams with carried memory.

Data layout. A split (binarized by ``fairseq-preprocess``) is read as one token sequence, every
line followed by its eos. It is cut into ``S = batch size x data-parallel world size`` contiguous
streams of equal length ``L = N // S``; the last ``N mod S`` tokens (fewer than ``S``) are
dropped and logged, so every batch is full and every rank has the same number of batches
(``--batch-size 1`` in ``fairseq-eval-lm`` scores the whole split). Rank ``r`` owns streams
``r*B .. r*B+B-1``. Batch ``t`` holds, per stream, the next ``K*T`` tokens (``T =
--tokens-per-sample``, ``K = --segments-per-sample``, or per epoch ``--segments-per-sample-schedule``
(:mod:`rmt_plugin.epoch_schedule`); the final batch may be narrower), so row
``i`` of batch ``t+1`` continues row ``i`` of batch ``t``. Nothing is shuffled. Every kept token
is a target, predicted from the token before it in the split; the split's first token is
predicted from an eos, as if a previous line had just ended (fairseq's ``TokenBlockDataset``
convention). ``ntokens`` counts the targets; there is no padding.

Memory. Each collated sample carries ``sample["stream"] = {"split": name, "index": t,
"batches": n}``. The task keeps, per (train|valid, split), the batch index it expects next and
the memory state the criterion returned for the previous batch. Batch 0 starts from fresh
memory, so every epoch and every validation pass starts fresh, and training and validation
states never touch (even when validating on the training split). Checkpoints carry every rank's
training cursors, so a run resumed mid-epoch continues with the memory it had (see
:mod:`rmt_plugin.resume`). Any other unexpected index (a batch lost to an OOM) starts fresh, with
a warning. ``fairseq-eval-lm`` bypasses the task's steps and calls the model
directly, so its batches instead share one :class:`StreamHandle` in ``net_input["stream"]``
that the model reads and updates.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.data import Dictionary, FairseqDataset, data_utils, iterators
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from .checks import ChecksCriterionAgainstModel
from .diagnostics import StreamDiagnostics, diagnose_batch
from .epoch_schedule import at_epoch, parse_schedule
from .model import RMTLanguageModel
from .steps import CarriedMemorySteps
from .resume import StreamCursors, data_parallel_rank_and_size

logger = logging.getLogger(__name__)

TOKENS_PER_SAMPLE_DEFAULT = 512
# Four segments per row, back-propagated through together with the criterion's default prefix of
# 3 re-run segments (--bptt-mode prefix, --bptt-depth 3): with one segment per row and chunk BPTT,
# the defaults before, the memory got no BPTT at all (the measurements: docs/memory_in_lm.md, 4).
SEGMENTS_PER_SAMPLE_DEFAULT = 4


@dataclass
class RMTLMConfig(FairseqDataclass):
    data: str = field(
        default="???",
        metadata={"help": "data directory written by fairseq-preprocess (dict.txt + splits); "
                  "several directories separated by ':' are used one per epoch"},
    )
    tokens_per_sample: int = field(
        default=TOKENS_PER_SAMPLE_DEFAULT, metadata={"help": "segment length T: tokens the model reads per segment"}
    )
    segments_per_sample: int = field(
        default=SEGMENTS_PER_SAMPLE_DEFAULT,
        metadata={"help": "K consecutive segments per batch row (batches are B x K*T) for the "
                  "criterion to unroll; fairseq-eval-lm "
                  "always feeds one segment per batch"},
    )
    segments_per_sample_schedule: Optional[str] = field(
        default=None,
        metadata={"help": "--segments-per-sample per epoch, comma-separated like --update-freq, the last value "
                  "from then on, VALUExN for N epochs (e.g. 1,2,4 or 1x10,8; replaces --segments-per-sample; see epoch_schedule.py)"},
    )
    tokens_per_sample_schedule: Optional[str] = field(
        default=None,
        metadata={"help": "--tokens-per-sample (the segment length T) per epoch, comma-separated like "
                  "--update-freq, the last value from then on, VALUExN for N epochs (e.g. 64,16 or 64x10,8; replaces --tokens-per-sample; "
                  "validation uses the last value; see epoch_schedule.py)"},
    )
    memory_diagnostics: bool = field(
        default=False,
        metadata={"help": "validation and fairseq-eval-lm also score every segment with the memory "
                  "(the cache) reset and with another stream's, and log memory_gain / cache_gain, their "
                  "swap gains and the loss by segment index since the stream start (bits per token; see "
                  "diagnostics.py)"},
    )
    memory_diagnostics_file: Optional[str] = field(
        default=None,
        metadata={"help": "fairseq-eval-lm with --memory-diagnostics: also write them, with the loss "
                  "by position within the segment, to this JSON file"},
    )
    # Only read to fail early: the number of streams is the iterator's batch size.
    batch_size: Optional[int] = II("dataset.batch_size")
    batch_size_valid: Optional[int] = II("dataset.batch_size_valid")
    valid_subset: str = II("dataset.valid_subset")


class StreamHandle:
    """The memory of one ``fairseq-eval-lm`` pass, shared by all of its batches.

    The model reads ``state`` (None = fresh memory) and writes back its detached next state;
    with ``--memory-diagnostics`` it also hands every segment to ``diagnostics``.
    A plain object on purpose: fairseq's ``move_to_cuda`` passes it through unchanged, where
    dicts, lists and tuples would be copied.
    """

    def __init__(self, diagnostics: Optional[StreamDiagnostics] = None):
        self.state = None
        self.diagnostics = diagnostics


class TokenStream(FairseqDataset):
    """A split as one token sequence: its lines, each with its eos, back to back.

    ``len()`` is the number of tokens.
    """

    def __init__(self, lines, eos: int, split: str):
        self.lines = lines
        self.split = split
        self.sizes = np.asarray(lines.sizes, dtype=np.int64)
        self.ends = np.cumsum(self.sizes)
        self.eos = eos

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def tokens(self, start: int, stop: int) -> torch.Tensor:
        """Tokens ``[start, stop)`` of the stream."""
        pieces = []
        line = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            line_start = int(self.ends[line] - self.sizes[line])
            piece_stop = min(stop, int(self.ends[line]))
            pieces.append(self.lines[line][start - line_start : piece_stop - line_start].long())
            start = piece_stop
            line += 1
        return torch.cat(pieces)

    def sources_and_targets(self, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Targets ``[start, stop)`` and their sources, the token before each."""
        if start == 0:
            window = torch.cat([torch.tensor([self.eos]), self.tokens(0, stop)])
        else:
            window = self.tokens(start - 1, stop)
        return window[:-1], window[1:]


class StreamBatches(FairseqDataset):
    """Item ``t`` is batch ``t`` of one rank: the next ``width`` tokens of each of its streams."""

    def __init__(self, stream: TokenStream, batch_size: int, num_shards: int, shard_id: int,
                 width: int, segment_length: int, handle: Optional[StreamHandle] = None):
        split = stream.split
        n_streams = batch_size * num_shards
        _check_streams(stream, batch_size, num_shards)
        self.stream_len = len(stream) // n_streams
        logger.info(
            f"{split}: {n_streams} streams of {self.stream_len} tokens, {batch_size} on rank "
            f"{shard_id}; {len(stream) - n_streams * self.stream_len} tail tokens dropped"
        )
        first = shard_id * batch_size
        self.stream = stream
        self.width = width
        self.segment_length = segment_length
        self.handle = handle
        self.row_ids = torch.arange(first, first + batch_size)
        self.starts = [int(row) * self.stream_len for row in self.row_ids]

    def __len__(self):
        return math.ceil(self.stream_len / self.width)

    def __getitem__(self, index: int):
        offset = index * self.width
        stop = min(offset + self.width, self.stream_len)
        pairs = [self.stream.sources_and_targets(s + offset, s + stop) for s in self.starts]
        sources, targets = zip(*pairs)
        return index, torch.stack(sources), torch.stack(targets)

    def collater(self, items):
        # Every item is already a whole batch (see RMTLMTask._iterator).
        (index, sources, targets), = items
        net_input = {"src_tokens": sources}
        if self.handle is not None:
            net_input["stream"] = self.handle
            if self.handle.diagnostics is not None:
                net_input["target"] = targets  # the model scores the reset runs against it
        return {
            "id": self.row_ids.clone(),
            "nsentences": sources.size(0),
            "ntokens": targets.numel(),
            "net_input": net_input,
            "target": targets,
            "stream": {"split": self.stream.split, "index": index, "batches": len(self), "width": self.width,
                       "segment_length": self.segment_length},
        }


@register_task("rmt_lm", dataclass=RMTLMConfig)
class RMTLMTask(CarriedMemorySteps, ChecksCriterionAgainstModel, FairseqTask):
    def __init__(self, cfg: RMTLMConfig):
        super().__init__(cfg)
        _check_positive(cfg.tokens_per_sample, "--tokens-per-sample")
        _check_positive(cfg.segments_per_sample, "--segments-per-sample")
        if cfg.segments_per_sample_schedule is not None and cfg.segments_per_sample != SEGMENTS_PER_SAMPLE_DEFAULT:
            raise ValueError("--segments-per-sample-schedule replaces --segments-per-sample: give one of them")
        if cfg.tokens_per_sample_schedule is not None and cfg.tokens_per_sample != TOKENS_PER_SAMPLE_DEFAULT:
            raise ValueError("--tokens-per-sample-schedule replaces --tokens-per-sample: give one of them")
        # K and T per epoch (epoch_schedule.py); the criterion reads them too
        self.segment_schedule = (parse_schedule(cfg.segments_per_sample_schedule, "--segments-per-sample-schedule", 1)
                                 or [cfg.segments_per_sample])
        self.length_schedule = (parse_schedule(cfg.tokens_per_sample_schedule, "--tokens-per-sample-schedule", 1)
                                or [cfg.tokens_per_sample])
        _check_batch_size(cfg.batch_size)
        paths = utils.split_paths(cfg.data)
        dict_path = os.path.join(paths[0], "dict.txt")
        if not os.path.isfile(dict_path):
            raise FileNotFoundError(f"--task rmt_lm: no dictionary {dict_path} (DATA must be a "
                                    "fairseq-preprocess output directory)")
        self.dictionary = Dictionary.load(dict_path)
        logger.info(f"dictionary: {len(self.dictionary)} types")
        self.cursors = StreamCursors()  # the carried state of every stream (rmt_plugin/resume.py)

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        if os.path.isfile(split_path + ".bin") and os.path.getsize(split_path + ".bin") == 0:
            raise ValueError(f"--task rmt_lm: split '{split}' is empty ({split_path}.bin has no tokens)")
        lines = data_utils.load_indexed_dataset(split_path, self.dictionary, combine=combine)
        if lines is None:
            raise FileNotFoundError(f"--task rmt_lm: split '{split}' not found at {split_path}")
        self.datasets[split] = TokenStream(lines, self.dictionary.eos(), split)

    def build_model(self, cfg, from_checkpoint=False):
        from fairseq.models import ARCH_MODEL_REGISTRY

        model_class = ARCH_MODEL_REGISTRY.get(getattr(cfg, "arch", None) or getattr(cfg, "_name", None))
        if model_class is not None and not issubclass(model_class, RMTLanguageModel):
            raise ValueError(f"--task rmt_lm carries memory between segments and needs an rmt, rmt_* or "
                             f"transformer_xl_* --arch, not --arch {cfg._name}")
        return super().build_model(cfg, from_checkpoint)

    def get_batch_iterator(self, dataset, max_sentences=None, num_shards=1, shard_id=0,
                           num_workers=0, epoch=1, data_buffer_size=0,
                           skip_remainder_batch=False, **kwargs):
        """Batches of ``max_sentences`` streams, ``K*T`` tokens wide.

        Length filtering, token budgets and shuffling do not apply to streams, so the other
        arguments are ignored. fairseq passes the data-parallel world size and rank as
        ``num_shards``/``shard_id``, which is what gives every rank its own streams.
        """
        _check_batch_size(max_sentences)
        segments = at_epoch(self.segment_schedule, epoch)  # fairseq passes epoch 1 for validation
        length = self.segment_length(epoch, dataset.split)
        self._check_saved_layout(dataset, max_sentences, num_shards, length, segments)
        self._check_valid_splits(num_shards)
        batches = StreamBatches(dataset, max_sentences, num_shards, shard_id, width=length * segments,
                                segment_length=length)
        return self._iterator(batches, num_workers, epoch, data_buffer_size,
                              skip_remainder_batch)

    def eval_lm_dataloader(self, dataset, max_tokens=None, batch_size=None, max_positions=None,
                           num_shards=1, shard_id=0, num_workers=1, data_buffer_size=10,
                           context_window=0):
        """One segment per batch, all batches of the pass sharing one :class:`StreamHandle`."""
        if context_window > 0:
            raise ValueError("--context-window is not supported by --task rmt_lm: memory carries "
                             "the context; size it with --model-overrides (e.g. "
                             "\"{'mem_len': 512}\") instead")
        _check_batch_size(batch_size)
        handle = StreamHandle()
        batches = StreamBatches(
            dataset, batch_size, num_shards, shard_id, width=self.length_schedule[-1],
            segment_length=self.length_schedule[-1], handle=handle,
        )
        if self.cfg.memory_diagnostics:
            handle.diagnostics = StreamDiagnostics(dataset.split, len(batches), self.cfg.memory_diagnostics_file)
        # num_workers=0: a worker process would hand back a pickled copy of the handle with
        # every batch, and the memory would never get from one batch to the next.
        return self._iterator(batches, 0, 1, data_buffer_size).next_epoch_itr(shuffle=False)

    def valid_diagnostics(self, sample, model, state) -> dict:
        if not self.cfg.memory_diagnostics:
            return {}
        length = sample["stream"]["segment_length"]
        return diagnose_batch(model, sample, state.model_state if state is not None else None,
                              length, sample["stream"]["width"] // length)

    def carried_state(self, role: str, sample) -> Any:
        stream = sample["stream"]
        return self.cursors.get(role, stream["split"], stream["index"], sample["target"].device)

    def keep_state(self, role: str, sample, next_state: Any, state: Any = None):
        stream = sample["stream"]
        self.cursors.put(role, stream["split"], stream["index"], stream["batches"], next_state, state)

    def state_dict(self):
        """Every rank's training cursors, for an exact resume (see :mod:`rmt_plugin.resume`)."""
        epoch = self.training_epoch
        layout = self._layout(self.cfg.batch_size, data_parallel_rank_and_size()[1],
                              at_epoch(self.length_schedule, epoch), at_epoch(self.segment_schedule, epoch))
        return self.cursors.state_dict(layout)

    def load_state_dict(self, state_dict):
        self.cursors.load_state_dict(state_dict)

    def _check_valid_splits(self, num_shards):
        """fairseq loads the validation splits at start-up but batches them only at the first
        validation, after a whole epoch of training: check their streams with the training's."""
        batch_size = self.cfg.batch_size_valid if isinstance(self.cfg.batch_size_valid, int) else self.cfg.batch_size
        for split in str(self.cfg.valid_subset).split(","):
            if split in self.datasets:
                _check_streams(self.datasets[split], batch_size, num_shards, "--batch-size-valid")

    def segment_length(self, epoch: int, split: str) -> int:
        """T of ``epoch`` for training; a validation split is read with the schedule's last T, so
        that validation losses compare across the schedule (and the best checkpoint is chosen at
        the segment length training ends with)."""
        validation = split != "train" and split in str(self.cfg.valid_subset).split(",")
        return self.length_schedule[-1] if validation else at_epoch(self.length_schedule, epoch)

    def _layout(self, batch_size, world_size, length, segments):
        return {
            "tokens_per_sample": length,
            "segments_per_sample": segments,
            "batch_size": batch_size,
            "world_size": world_size,
            "split_tokens": {split: len(dataset) for split, dataset in self.datasets.items()},
        }

    def _check_saved_layout(self, dataset, batch_size, num_shards, length, segments):
        self.cursors.check_layout(dataset.split, self._layout(batch_size, num_shards, length, segments))

    @staticmethod
    def _iterator(batches, num_workers, epoch, data_buffer_size, skip_remainder_batch=False):
        return iterators.EpochBatchIterator(
            dataset=batches,
            collate_fn=batches.collater,
            batch_sampler=[[i] for i in range(len(batches))],
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            disable_shuffling=True,
            skip_remainder_batch=skip_remainder_batch,
        )


def _check_streams(stream: TokenStream, batch_size, num_shards, flag="--batch-size"):
    if len(stream) < batch_size * num_shards:
        raise ValueError(
            f"split '{stream.split}' has {len(stream)} tokens, fewer than the {batch_size * num_shards} streams "
            f"asked for ({flag} {batch_size} x {num_shards} shards: data-parallel ranks, or eval-lm's --num-shards)"
        )


def _check_positive(value, flag):
    if value is None or value < 1:
        raise ValueError(f"--task rmt_lm: {flag} must be a positive integer, got {value}")


def _check_batch_size(batch_size):
    if batch_size is None:
        raise ValueError("--task rmt_lm needs --batch-size (the number of parallel streams per "
                         "GPU); --max-tokens alone cannot lay out streams")
    _check_positive(batch_size, "--batch-size")
