"""The one parser of the plugin's comma-separated integer flags (``--adaptive-softmax-cutoff``,
``--bptt-depth-schedule``, ``--segments-per-sample-schedule``, ``--curriculum-source-len``), with a
one-line error naming the flag. Example: ``int_list("1,2,4", "--bptt-depth-schedule")`` is
``[1, 2, 4]``; ``int_list("1,x", ...)`` says ``--bptt-depth-schedule must be comma-separated
integers, got '1,x'``; an unset flag (None or "") is ``[]``."""

from typing import List, Optional


def int_list(spec: Optional[str], flag: str, what: str = "") -> List[int]:
    """The integers of ``spec`` ([] when unset); ``what`` ends the error's description."""
    if spec is None or str(spec).strip() == "":
        return []
    try:
        return [int(item) for item in str(spec).split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers{what}, got {spec!r}") from None
