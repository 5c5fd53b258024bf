"""Prepare enwik8 for fairseq at the byte level (one token per byte), the Transformer-XL way.

Reads enwik8.zip (a zip holding a member named "enwik8") or the raw enwik8 file given with
--input; only without --input it downloads the zip from the standard URL into the work dir. The raw
file is checked against its known size and sha256 (100,000,000 bytes). The bytes are split as
Transformer-XL's prep_enwik8.py does: the first 90M bytes train, the next 5M valid, the last 5M
test (for another size: the same 90/5/5 proportions, or --split-sizes).

Each byte becomes one token: its decimal value ("32" for a space). Newline bytes (--newline):

- drop (default): as the RMT paper's and Transformer-XL's pipeline (prep_enwik8.py, then their
  corpus reader without an end-of-line symbol), newline bytes are not in the stream: 204 symbols
  for enwik8, counted over all three splits, and every bpc (the paper's, Dai et al.'s 1.06) is over
  the characters other than newline. The recipes use this.
- eos: a newline byte ends the line and becomes fairseq's eos, a token like any other byte; the
  dictionary is built from train. Its bpc counts the newlines too, so it is not the papers'.

Every split is binarized by stock fairseq-preprocess and checked to hold exactly one token per
kept byte (also by decoding it back), so fairseq-eval-lm's "Loss (base 2)" is bits per character.
See rmt_data/byte_level.py for the format.

Outputs: --destdir (dict.txt, {train,valid,test}.{bin,idx}, preprocess.log, prepare.json). The
token text that fairseq-preprocess reads (about 4 bytes per byte: ~0.4 GB for enwik8) is written to
the work dir and removed once the data-bin is checked; --keep-workdir keeps it there, with the raw
splits ({split}.txt, {split}.raw). A downloaded enwik8.zip stays in the work dir. Rerunning with
valid outputs does nothing.

Example:
  rmt-prepare-enwik8 --input ~/Downloads/enwik8.zip
  rmt-prepare-enwik8 --input enwik8 --destdir data-bin/enwik8 --workers 8
"""

import http.client
import urllib.request
import zipfile
import zlib
from pathlib import Path

from . import byte_level
from .common import (
    UserError, add_output_args, atomic_open, check_srcdict, fingerprint, log, make_parser,
    parse_output_args, publish, report_skip, require_file, run_main, sha256_bytes, staging,
    up_to_date, work_area)

URL = "http://mattmahoney.net/dc/enwik8.zip"
MEMBER = "enwik8"
SIZE = 100_000_000
SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
FORMAT = "enwik8-bytes/2"  # bump when the output format changes


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--input", type=Path, metavar="PATH",
                   help="enwik8.zip (with a member 'enwik8') or the raw enwik8 file; "
                        f"if omitted, {URL} is downloaded into the work dir")
    add_output_args(p, Path("data-bin/enwik8"), "output data-bin directory (default: %(default)s)",
                    "directory for the downloaded zip and, while preparing, the token text")
    p.add_argument("--split-sizes", metavar="TRAIN,VALID,TEST",
                   help="split sizes in bytes, summing to the file's size "
                        "(default: 90%%/5%%/5%%, i.e. 90M/5M/5M for enwik8)")
    p.add_argument("--expected-size", type=int, default=SIZE, metavar="BYTES",
                   help="required size of the raw file (default: %(default)s)")
    p.add_argument("--expected-sha256", default=SHA256, metavar="HEX",
                   help="required sha256 of the raw file (default: enwik8's)")
    p.add_argument("--newline", choices=["drop", "eos"], default="drop",
                   help="drop: newline bytes are not tokens, the papers' enwik8 (default); eos: a newline "
                        "byte is fairseq's end-of-line token (bpc then counts newlines)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the size and sha256 checks (for small stand-ins of enwik8)")
    return parse_output_args(p, argv)


# ----------------------------------------------------------------------------- input


def download(url, dest):
    """Downloads ``url`` to ``dest`` (through a temporary name); errors name the URL."""
    log(f"downloading {url} to {dest} ...")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_open(dest) as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        raise UserError(f"could not download {url}: {e}") from None
    return dest


def is_zip(path):
    if path.suffix == ".zip":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def raw_size(path):
    """Size of the raw enwik8 bytes in ``path`` (zip member or plain file), without reading them."""
    if not is_zip(path):
        return path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.getinfo(MEMBER).file_size
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not a valid zip archive ({e})") from None
    except KeyError:
        raise UserError(f"{path}: the zip archive has no member named '{MEMBER}'") from None


def read_raw(path):
    """The raw enwik8 bytes of ``path``; a damaged zip member is reported as such."""
    if not is_zip(path):
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.read(MEMBER)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise UserError(f"{path}: corrupt zip archive ({e})") from None


def check_size(path, size, args):
    if not args.no_verify and size != args.expected_size:
        raise UserError(f"{path}: enwik8 has {size:,} bytes, expected {args.expected_size:,} "
                        "(pass --no-verify for a stand-in)")


def check_sha256(path, data, args):
    if args.no_verify:
        return
    digest = sha256_bytes(data)
    if digest != args.expected_sha256.lower():
        raise UserError(f"{path}: sha256 {digest} does not match the expected "
                        f"{args.expected_sha256} (corrupt or not enwik8)")


def split_sizes(total, spec):
    """(train, valid, test) sizes: from ``spec`` "T,V,E" or 90/5/5 percent of ``total``."""
    if spec is None:
        valid = test = total // 20
        sizes = (total - valid - test, valid, test)
    else:
        try:
            sizes = tuple(int(x) for x in spec.split(","))
        except ValueError:
            sizes = ()
        if len(sizes) != 3:
            raise UserError(f"--split-sizes {spec}: expected three byte counts TRAIN,VALID,TEST")
        if sum(sizes) != total:
            raise UserError(f"--split-sizes {spec}: sums to {sum(sizes):,}, "
                            f"the input has {total:,} bytes")
    if min(sizes) <= 0:
        raise UserError(f"split sizes {sizes} for {total:,} bytes: "
                        "every split needs at least one byte")
    return sizes


def split_bytes(data, sizes):
    train, valid, _ = sizes
    return {"train": data[:train], "valid": data[train:train + valid], "test": data[train + valid:]}


# ----------------------------------------------------------------------------- main


def resolve_input(args):
    if args.input is not None:
        return require_file(args.input, "--input")
    dest = args.workdir / "enwik8.zip"
    return dest if dest.is_file() else download(URL, dest)


def main(argv=None):
    args = parse_args(argv)
    path = resolve_input(args)
    total = raw_size(path)
    check_size(path, total, args)
    sizes = split_sizes(total, args.split_sizes)
    if args.srcdict is not None:
        require_file(args.srcdict, "--srcdict")
    key = {"format": FORMAT, "input": fingerprint(path), "split_sizes": sizes,
           "verify": None if args.no_verify else [args.expected_size, args.expected_sha256.lower()],
           "srcdict": fingerprint(args.srcdict), "newline": args.newline}
    stamp = up_to_date(args.destdir, key, force=args.force)
    if stamp is not None:
        return report_skip(args.destdir, stamp)
    if args.srcdict is not None:
        byte_level.check_byte_dictionary(check_srcdict(args.srcdict), f"--srcdict {args.srcdict}")

    log(f"reading {path} ...")
    data = read_raw(path)
    if len(data) != total:
        raise UserError(f"{path}: read {len(data):,} bytes, its header says {total:,}")
    check_sha256(path, data, args)
    splits = split_bytes(data, sizes)
    del data
    with staging(args.destdir) as staged, work_area(args.workdir, args.keep_workdir) as work:
        report = byte_level.binarize_bytes(
            splits, work, staged, srcdict=args.srcdict, workers=args.workers, newline=args.newline)
        publish(staged, args.destdir, key, report)
    byte_level.print_report(args.destdir, report)


def cli():
    """The ``rmt-prepare-enwik8`` command."""
    run_main(main)


if __name__ == "__main__":
    cli()
