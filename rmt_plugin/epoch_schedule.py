"""Curricula over segments for ``rmt_lm``: ``--segments-per-sample-schedule``, ``--bptt-depth-schedule``,
``--tokens-per-sample-schedule``.

The RMT follow-ups train memory on few segments first and more later. Here, as with fairseq's
``--update-freq``, a schedule is a comma-separated list with one value per epoch, the last value
holding from then on. It replaces the plain flag (``--segments-per-sample``, ``--bptt-depth``,
``--tokens-per-sample``). Example, ``--segments-per-sample-schedule 1,2,4 --bptt-depth-schedule
0,1,3``, T = 128::

    epoch 1:       rows of 1 x 128 tokens, memory a detached input          (K=1, depth 0)
    epoch 2:       rows of 2 x 128, loss reaches 1 previous segment's memory  (K=2, depth 1)
    epoch 3, 4...: rows of 4 x 128, depth 3                                   (K=4, depth 3)

A segment-length schedule changes what one segment holds: ``--tokens-per-sample-schedule 64,16``
reads epoch 1 in segments of 64 (most dependencies inside a segment, where attention learns them)
and every later epoch in segments of 16 (the same dependencies now across segments, through the
memory). The streams are laid out anew at each epoch start, as they always are. ``VALUExN``
repeats a value for N epochs: ``--tokens-per-sample-schedule 64x10,8`` is ten epochs of 64, then 8.

An epoch is fairseq's: one pass over the data, or over one directory of a colon-separated DATA,
so shards make the steps as short as wanted. Memory starts fresh at every epoch start, so a step
never changes the layout of a stream that is running. Values depend on the epoch alone, which
every checkpoint holds: a resumed run uses the values the uninterrupted run would. Validation
batches use the first K (without gradients, K changes the number of forward calls per batch,
not the losses) and the last T (T does change the losses: one T for every validation keeps them
comparable). The values are logged (``segments_per_sample``, ``tokens_per_sample``,
``bptt_depth``) while a schedule is set.
"""

from typing import List, Optional

from .flags import int_list


def parse_schedule(spec: Optional[str], flag: str, minimum: int) -> List[int]:
    """The values of a schedule flag ([] when unset), with a one-line error naming ``flag``.

    ``VALUExN`` stands for N epochs of VALUE: ``64x3,8`` is ``64,64,64,8``.
    """
    expanded = []
    for item in [] if spec is None else str(spec).split(","):
        value, repeat, times = item.strip().partition("x")
        valid_repeat = repeat and value and times.isdigit() and int(times) >= 1
        expanded += [value] * int(times) if valid_repeat else [item]  # anything else: int_list's error
    try:
        values = int_list(",".join(expanded), flag)
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, one per epoch (VALUExEPOCHS repeats one, "
                         f"e.g. 64x3), got {spec!r}") from None
    if values and min(values) < minimum:
        raise ValueError(f"{flag} values must be >= {minimum}, got {spec!r}")
    return values


def at_epoch(schedule: List[int], epoch: int) -> int:
    """The value for ``epoch`` (1-based): the epoch's own, or the last one after the list ends."""
    return schedule[min(max(epoch, 1), len(schedule)) - 1]
