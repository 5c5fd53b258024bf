#!/usr/bin/env python3
"""Make the tiny WikiText-2 corpus embedded in examples/data/tiny-wikitext2 (for the README demo).

Each of wiki.{train,valid,test}.tokens is the longest prefix of the real WikiText-2 file that ends
at a line boundary and is at most --train-bytes / --valid-bytes / --test-bytes long. The source
files may be plain or .xz compressed. Rerunning with identical outputs present changes nothing.

Example:
  python scripts/make_tiny_corpus.py --source ../shared/data/wikitext-2
"""

import os
from pathlib import Path

from rmt_data.common import SPLITS, UserError, atomic_write, log, make_parser, run_main
from rmt_data.wikitext import find_inputs, read_bytes

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RMT_SHARED_DATA", REPO.parent / "shared" / "data"))
NEWLINE = b"\n"
LIMITS = {"train": 250_000, "valid": 25_000, "test": 25_000}


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--source", type=Path, default=SHARED_DATA / "wikitext-2",
                   help="directory with the real wiki.*.tokens[.xz] (default: %(default)s, "
                        "from $RMT_SHARED_DATA if set)")
    p.add_argument("--dest", type=Path, default=REPO / "examples" / "data" / "tiny-wikitext2",
                   help="output directory (default: %(default)s)")
    for split, limit in LIMITS.items():
        p.add_argument(f"--{split}-bytes", type=int, default=limit, metavar="N",
                       help=f"at most N bytes of {split} (default: %(default)s)")
    return p.parse_args(argv)


def line_prefix(data, limit, name):
    """The longest prefix of ``data`` of at most ``limit`` bytes that ends with a newline."""
    cut = data.rfind(b"\n", 0, limit) + 1
    if cut == 0:
        raise UserError(f"{name}: no complete line within the first {limit:,} bytes")
    return data[:cut]


def main(argv=None):
    args = parse_args(argv)
    files = find_inputs(args.source, srcdict=None)
    for split in SPLITS:
        limit = getattr(args, f"{split}_bytes")
        tiny = line_prefix(read_bytes(files[split]), limit, files[split])
        dest = args.dest / f"wiki.{split}.tokens"
        what = f"{len(tiny):,} bytes, {tiny.count(NEWLINE):,} lines"
        if dest.is_file() and dest.read_bytes() == tiny:
            log(f"{dest}: up to date ({what})")
            continue
        atomic_write(dest, tiny)
        log(f"{dest}: wrote {what} of {files[split]}")


if __name__ == "__main__":
    run_main(main)
