"""Prepare WikiText-103 / WikiText-2 for fairseq, at the word level or at the byte level.

Reads wiki.{train,valid,test}.tokens from --input DIR, or their .xz compressed versions (as in the
project's shared data), which are decompressed into the work dir.

--level word (default): the standard fairseq way, `fairseq-preprocess --only-source` with the
  dictionary built from train (one eos per line is part of the token counts).
--level byte: the enwik8 format (see rmt_data/byte_level.py): one token per byte, a newline is eos;
  the splits are the three files as they are. Every binarized split holds exactly as many tokens
  as the file has bytes (checked), so fairseq-eval-lm's "Loss (base 2)" is bits per character.

With --dataset the known figures are checked: the decompressed files' sizes and sha256 before any
binarization, and after it the token and line counts and the vocabulary size (word level):

  dataset        split   lines      tokens (incl. eos)
  wikitext-2     train   36,718      2,088,628   dict.txt 33,276 words
                 valid    3,760        217,646
                 test     4,358        245,569
  wikitext-103   train   1,801,350  103,227,021  dict.txt 267,733 words
                 valid    3,760        217,646
                 test     4,358        245,569
  (the published vocabularies, 33,278 and 267,735, also count <unk> and <eos>: fairseq specials)

A missing train file is allowed only with --srcdict (e.g. WikiText-103 valid/test with the
dictionary of an earlier run): valid and test are then binarized with that dictionary.

Outputs: --destdir (dict.txt, {split}.{bin,idx}, preprocess.log, prepare.json); rerunning with
valid outputs does nothing. What fairseq-preprocess reads besides the inputs (the decompressed .xz
files; at the byte level the token text, about 4 bytes per byte) is written to the work dir and
removed once the data-bin is checked; --keep-workdir keeps it there.

Examples:
  rmt-prepare-wikitext --input ../shared/data/wikitext-2 --dataset wikitext-2
  rmt-prepare-wikitext --input ../shared/data/wikitext-2 --level byte
  rmt-prepare-wikitext --input ../shared/data/wikitext-103 --dataset wikitext-103 \\
      --srcdict data-bin/wikitext-103-full/dict.txt
"""

import lzma
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import byte_level
from .common import (
    SPLITS, UserError, add_output_args, atomic_open, check_srcdict, count_binarized, fingerprint,
    log, make_parser, parse_output_args, print_table, publish, report_skip, require_file, run_main,
    run_preprocess, sha256_bytes, sha256_file, staging, up_to_date, work_area)

FORMAT = {"word": "wikitext-word/1", "byte": "wikitext-bytes/1"}  # bump when outputs change


@dataclass(frozen=True)
class Known:
    """Published / verified figures of one file; None where not known offline."""

    bytes: int = None
    sha256: str = None
    lines: int = None
    tokens: int = None  # incl. one eos per line


KNOWN = {
    "wikitext-2": {
        "train": Known(10_797_148,
                       "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
                       36_718, 2_088_628),
        "valid": Known(1_121_681,
                       "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                       3_760, 217_646),
        "test": Known(1_256_449,
                      "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                      4_358, 245_569),
    },
    "wikitext-103": {
        "train": Known(lines=1_801_350, tokens=103_227_021),
        "valid": Known(1_142_309,
                       "9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b",
                       3_760, 217_646),
        "test": Known(1_281_077,
                      "56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9",
                      4_358, 245_569),
    },
}
# Words in fairseq's dict.txt (without its "madeupwordNNNN" padding). The published vocabulary
# sizes, 33,278 and 267,735, also count <unk> and <eos>: fairseq specials, not dict.txt lines.
KNOWN_DICT_WORDS = {"wikitext-2": 33_276, "wikitext-103": 267_733}


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--input", type=Path, required=True, metavar="DIR",
                   help="directory holding wiki.{train,valid,test}.tokens (or .tokens.xz)")
    p.add_argument("--level", choices=("word", "byte"), default="word",
                   help="word tokens (default) or one token per byte (enwik8 format)")
    p.add_argument("--dataset", choices=sorted(KNOWN),
                   help="check the known sizes, checksums and token counts of this dataset")
    add_output_args(p, None, "output data-bin directory (default: data-bin/NAME for word level, "
                    "data-bin/NAME-bytes for byte level; NAME: the input directory's name)",
                    "directory for the decompressed files and byte-level text while preparing")
    return parse_output_args(p, argv, default_destdir)


def default_destdir(args):
    suffix = "-bytes" if args.level == "byte" else ""
    return Path("data-bin") / (args.input.resolve().name + suffix)


# ----------------------------------------------------------------------------- inputs


def find_inputs(input_dir, srcdict):
    """{split: path} of wiki.SPLIT.tokens, else of wiki.SPLIT.tokens.xz.

    Valid and test are required; train may only be missing when a dictionary is given.
    """
    if input_dir.is_file():
        raise UserError(f"--input {input_dir}: a file; give the directory holding wiki.{{train,valid,test}}.tokens "
                        "(or their .xz)")
    if not input_dir.is_dir():
        raise UserError(f"--input {input_dir}: no such directory")
    files = {}
    for split in SPLITS:
        plain = input_dir / f"wiki.{split}.tokens"
        xz = plain.with_name(plain.name + ".xz")
        path = plain if plain.is_file() else xz if xz.is_file() else None
        if path is not None:
            files[split] = path
        elif split != "train":
            raise UserError(f"{plain} (or {xz.name}): missing")
        elif srcdict is None:
            raise UserError(f"{plain} (or {xz.name}): missing; the dictionary is built from train "
                            "(pass --srcdict DICT to binarize valid and test only)")
    return files


def read_bytes(path):
    """The (decompressed) bytes of ``path``."""
    if path.suffix != ".xz":
        return path.read_bytes()
    try:
        return lzma.decompress(path.read_bytes())
    except (lzma.LZMAError, EOFError) as e:
        raise UserError(f"{path}: corrupt xz file ({e})") from None


def decompress_to(path, dest):
    """Decompresses ``path`` (.xz) to ``dest``, through a temporary name."""
    log(f"decompressing {path} to {dest} ...")
    try:
        with lzma.open(path) as src, atomic_open(dest) as out:
            shutil.copyfileobj(src, out, 1 << 22)
    except (lzma.LZMAError, EOFError) as e:
        raise UserError(f"{path}: corrupt xz file ({e})") from None
    return dest


def check_known(dataset, split, name, size, sha256):
    """Checks a file's size and sha256 (``sha256``: a function, called only when needed)."""
    known = KNOWN.get(dataset, {}).get(split)
    if known is None:
        return
    if known.bytes is not None and size != known.bytes:
        raise UserError(f"{name}: {size:,} bytes, {dataset} {split} has {known.bytes:,}")
    if known.sha256 is not None and sha256() != known.sha256:
        raise UserError(f"{name}: sha256 differs from the {dataset} release "
                        "(corrupt, or another file)")


def check_counts(dataset, counts, dict_words):
    """Checks binarized line/token counts (and dict.txt's word count if given) against KNOWN."""
    for split, row in counts.items():
        known = KNOWN.get(dataset, {}).get(split, Known())
        for what in ("lines", "tokens"):
            want = getattr(known, what)
            if want is not None and row[what] != want:
                raise UserError(f"{split}: {row[what]:,} {what} after binarization, "
                                f"{dataset} has {want:,}")
        row["checked"] = "yes" if known.tokens is not None else "-"
    want = KNOWN_DICT_WORDS.get(dataset)
    if dict_words is not None and want is not None and dict_words != want:
        raise UserError(f"dict.txt: {dict_words:,} words built from train, {dataset} has {want:,} "
                        "(+ <unk> and <eos>)")


def count_dict_words(dict_path):
    """Words in a fairseq dict.txt, without the "madeupwordNNNN" padding."""
    with open(dict_path, encoding="utf-8") as f:
        return sum(1 for line in f if not line.startswith("madeupword"))


# ----------------------------------------------------------------------------- levels


def prepare_words(args, files, staged, work):
    """Word level: decompress into ``work`` if needed, check, binarize; returns the report."""
    texts = {}
    for split, path in files.items():
        if path.suffix == ".xz":
            path = decompress_to(path, work / path.stem)
        check_known(args.dataset, split, path, path.stat().st_size, lambda p=path: sha256_file(p))
        texts[split] = path
    run_preprocess(texts, staged, srcdict=args.srcdict, workers=args.workers)
    log("counting tokens in the binarized data ...")
    counts = count_binarized(staged, list(files))
    dict_words = count_dict_words(Path(staged) / "dict.txt")
    check_counts(args.dataset, counts, None if args.srcdict else dict_words)
    return {"splits": counts, "dict_words": dict_words}


def prepare_bytes(args, files, staged, work):
    """Byte level: read, check, binarize in the enwik8 format (token text in ``work``); returns the
    report."""
    splits = {}
    for split, path in files.items():
        data = read_bytes(path)
        check_known(args.dataset, split, path, len(data), lambda d=data: sha256_bytes(d))
        splits[split] = data
    return byte_level.binarize_bytes(splits, work, staged, srcdict=args.srcdict, workers=args.workers)


def print_word_report(args, report):
    log(f"wrote {args.destdir} (word level, dict.txt: {report['dict_words']:,} words + fairseq's "
        "specials); tokens include one eos per line:")
    print_table(report["splits"])
    if args.dataset is None:
        log("no known counts checked (pass --dataset wikitext-2|wikitext-103 to check them)")


def main(argv=None):
    args = parse_args(argv)
    files = find_inputs(args.input, args.srcdict)
    if args.srcdict is not None:
        require_file(args.srcdict, "--srcdict")
    key = {"format": FORMAT[args.level], "dataset": args.dataset,
           "inputs": {s: fingerprint(p) for s, p in files.items()},
           "srcdict": fingerprint(args.srcdict)}
    stamp = up_to_date(args.destdir, key, force=args.force)
    if stamp is not None:
        return report_skip(args.destdir, stamp)
    if args.srcdict is not None:
        dictionary = check_srcdict(args.srcdict)
        if args.level == "byte":
            byte_level.check_byte_dictionary(dictionary, f"--srcdict {args.srcdict}")
    with staging(args.destdir) as staged, work_area(args.workdir, args.keep_workdir) as work:
        prepare = prepare_bytes if args.level == "byte" else prepare_words
        report = prepare(args, files, staged, work)
        publish(staged, args.destdir, key, report)
    if args.level == "byte":
        byte_level.print_report(args.destdir, report)
    else:
        print_word_report(args, report)


def cli():
    """The ``rmt-prepare-wikitext`` command."""
    run_main(main)


if __name__ == "__main__":
    cli()
