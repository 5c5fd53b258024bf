"""Exact resume: the training streams' memory travels in the checkpoint with the stream position.

The carried state. The task owns one :class:`StreamCursors`: per (train|valid, split) the index of
the batch expected next and the state the criterion left after the batch before (memory,
Transformer-XL cache, a schedule's history: :class:`~rmt_plugin.bptt.CarriedState`), and the
state that batch started from, to run it again. Example, batches 0..2 of split train::

    get(train, 0) -> None (fresh); put(train, 0, S1)    get(train, 1) -> S1; put(train, 1, S2, S1)
    get(train, 1) again (a NaN-detector re-run) -> S1    get(train, 2) -> S2

What is saved. ``fairseq-train`` stores the data position (the epoch iterator's state) in every
checkpoint; :class:`~rmt_plugin.task.RMTLMTask` adds, through ``task.state_dict()``, every
rank's training cursors, plus the stream layout they belong to. Validation memory is never saved
(each validation pass starts fresh).

How it gets there and back. fairseq 0.12.2 writes ``task_state`` but ``Trainer.load_checkpoint``
never restores it, and only rank 0 builds the checkpoint. The compat layer (``rmt_compat``, part
5) closes both gaps: every rank builds the state at each save, so :func:`gather_ranks` can
collect all ranks' cursors onto rank 0; on resume every rank receives the checkpoint and the task
takes back its own entry (``ranks[r]``), unless ``--reset-dataloader`` starts the data over.

The saved cursors are plain dicts, lists and tensors on the CPU (checkpoints are read with
``torch.load(weights_only=True)``). Example, one rank, RMT in chunk mode, batch 7 expected next::

    {"layout": {"tokens_per_sample": 16, "segments_per_sample": 2, "batch_size": 4,
                "world_size": 1, "split_tokens": {"train": 1402}},
     "ranks": [{"train": {"next_index": 7,
                          "state": {"model_state": {"memory": <4x2x32>, "cache": None},
                                    "history": []}}}]}

Changed stream flags. The streams of a split depend on ``--tokens-per-sample``,
``--segments-per-sample``, ``--batch-size``, the data-parallel world size and the split's token
count. A checkpoint saved mid-epoch under other values cannot continue the same streams, so
:func:`check_layout` refuses it when the training iterator is built, before any update; a
checkpoint saved at an epoch end carries no cursor and resumes under any flags.
"""

import logging
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from fairseq.distributed import utils as distributed_utils

from .bptt import CarriedState
from .model import RMTState

logger = logging.getLogger(__name__)

LAYOUT_FLAGS = {
    "tokens_per_sample": "--tokens-per-sample",
    "segments_per_sample": "--segments-per-sample",
    "batch_size": "--batch-size",
    "world_size": "data-parallel world size",
}


def data_parallel_rank_and_size():
    """(rank, world size) of this process in the data-parallel group; (0, 1) without one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return distributed_utils.get_data_parallel_rank(), distributed_utils.get_data_parallel_world_size()


def gather_ranks(local: Any) -> List[Any]:
    """Every data-parallel rank's ``local`` (picklable, CPU tensors), in rank order, on every rank."""
    _, world_size = data_parallel_rank_and_size()
    if world_size == 1:
        return [local]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, local, group=distributed_utils.get_data_parallel_group())
    return gathered


def carried_to_plain(carried: Optional[CarriedState]) -> Optional[dict]:
    """A criterion state as dicts/lists of CPU tensors, loadable with ``weights_only=True``."""
    if carried is None:
        return None
    return {
        "model_state": _model_state_to_plain(carried.model_state),
        "history": [[_compact(tokens), _model_state_to_plain(state)] for tokens, state in carried.history],
    }


def _compact(tensor):
    """A contiguous CPU copy of its own: the memory is a slice of the last hidden states, and a view
    would save their whole storage and be garbled by fairseq's broadcast to the other ranks."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def carried_from_plain(plain: Optional[dict], device) -> Optional[CarriedState]:
    """Inverse of :func:`carried_to_plain`, with the tensors moved to ``device``."""
    if plain is None:
        return None
    history = tuple((tokens.to(device), _model_state_from_plain(state, device)) for tokens, state in plain["history"])
    return CarriedState(_model_state_from_plain(plain["model_state"], device), history)


def _model_state_to_plain(state: Optional[RMTState]) -> Optional[dict]:
    if state is None:
        return None
    return {
        "memory": None if state.memory is None else _compact(state.memory),
        "cache": None if state.cache is None else [_compact(h) for h in state.cache],
    }


def _model_state_from_plain(plain: Optional[dict], device) -> Optional[RMTState]:
    if plain is None:
        return None
    memory = None if plain["memory"] is None else plain["memory"].to(device)
    cache = None if plain["cache"] is None else [h.to(device) for h in plain["cache"]]
    return RMTState(memory, cache)


def check_layout(saved: Dict[str, Any], current: Dict[str, Any], split: str):
    """One-line error when the saved streams of ``split`` cannot be continued under ``current``."""
    changed = [f"{LAYOUT_FLAGS[key]} {current[key]} (checkpoint: {saved[key]})"
               for key in LAYOUT_FLAGS if saved[key] != current[key]]
    saved_tokens = saved["split_tokens"].get(split)
    if saved_tokens is not None and saved_tokens != current["split_tokens"][split]:
        changed.append(f"split '{split}' has {current['split_tokens'][split]} tokens (checkpoint: {saved_tokens})")
    if changed:
        raise ValueError(
            f"--task rmt_lm: the checkpoint was saved mid-epoch on other streams: {', '.join(changed)}; "
            "resume with the checkpoint's values, or pass --reset-dataloader to start the epoch over"
        )


class _Cursor(NamedTuple):
    next_index: int
    state: Any
    previous: Any = None  # the state batch next_index - 1 started from, to re-run it


class _Saved(NamedTuple):
    """A cursor's state as read from a checkpoint; made a criterion state on the device at first use."""

    plain: Any


class StreamCursors:
    """The carried state of every stream of the task (module docstring)."""

    def __init__(self):
        self._cursors: Dict[Tuple[str, str], _Cursor] = {}
        self._saved_layout: Optional[Dict[str, Any]] = None  # of the cursors a checkpoint restored

    def get(self, role: str, split: str, index: int, device) -> Any:
        """The state to process batch ``index`` of ``split`` with; None means fresh memory."""
        if index == 0:
            return None
        cursor = self._cursors.get((role, split))
        expected = cursor.next_index if cursor is not None else 0
        if cursor is not None and index == expected - 1 and cursor.previous is not None:
            # the same batch again: fairseq's NaN-detector re-run or an AMP overflow retry
            logger.info(f"{role} batch {index} of split '{split}' again: from the memory it started with")
            return cursor.previous
        if index != expected:
            logger.warning(f"{role} batch {index} of split '{split}' arrived where batch "
                           f"{expected} was expected: starting from fresh memory")
            return None
        if isinstance(cursor.state, _Saved):
            return carried_from_plain(cursor.state.plain, device)
        return cursor.state

    def put(self, role: str, split: str, index: int, batches: int, next_state: Any, state: Any = None):
        """What batch ``index`` of ``batches`` left (``state``: what it started from)."""
        if index + 1 < batches:
            self._cursors[role, split] = _Cursor(index + 1, next_state, state)
        else:
            # Nothing follows the last batch: free its memory (a Transformer-XL cache can be
            # large) instead of holding it through validation or the next epoch.
            self._cursors.pop((role, split), None)

    def state_dict(self, layout: Dict[str, Any]) -> Dict[str, Any]:
        """Every rank's training cursors and their stream ``layout``. Called on every data-parallel
        rank at each checkpoint save; the result is the same on all."""
        local = {split: {"next_index": cursor.next_index, "state": _plain(cursor.state)}
                 for (role, split), cursor in self._cursors.items() if role == "train"}
        return {"layout": layout, "ranks": gather_ranks(local)}

    def load_state_dict(self, state_dict: Dict[str, Any]):
        """Take back this rank's training cursors from a checkpoint's :meth:`state_dict`."""
        if not state_dict.get("ranks"):
            return
        rank, _ = data_parallel_rank_and_size()
        own = state_dict["ranks"][rank] if rank < len(state_dict["ranks"]) else {}
        for split, cursor in own.items():
            self._cursors["train", split] = _Cursor(cursor["next_index"], _Saved(cursor["state"]))
        self._saved_layout = state_dict["layout"]

    def check_layout(self, split: str, current: Dict[str, Any]):
        """Refuse restored cursors of ``split`` that belong to other streams (checked once, when
        fairseq builds the training iterator right after loading the checkpoint)."""
        saved, self._saved_layout = self._saved_layout, None
        if saved is not None and ("train", split) in self._cursors:
            check_layout(saved, current, split)


def _plain(state):
    return state.plain if isinstance(state, _Saved) else carried_to_plain(state)
