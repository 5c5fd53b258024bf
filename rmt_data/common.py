"""Plumbing shared by the data preparation commands (rmt-prepare-enwik8, rmt-prepare-wikitext).

- User errors: raise ``UserError("one line naming the file or flag")``; ``run_main`` turns it into
  ``error: ...`` on stderr and exit status 1, without a traceback.
- Idempotence: every output directory gets a stamp ``prepare.json`` holding a *key* (the inputs'
  fingerprints and the options that change the output) and the size of every file written. A rerun
  with the same key whose files are all present with those sizes skips the work.
- No partial outputs: the binarized data and its stamp are built in a hidden staging directory
  next to ``--destdir`` and renamed into place only after every check passed; on any failure the
  staging directory is removed.
- No leftovers: intermediate files (decompressed inputs, byte-level token text: for enwik8 about
  five times its size) are written to a hidden directory in the work dir and removed once the
  data-bin is published, or on failure (``work_area``); ``--keep-workdir`` keeps them in the work
  dir itself. Inputs there (a downloaded enwik8.zip) stay. The stamp guards the data-bin only, so
  the skip above does not need them. Files there are written to a temporary name and renamed, so
  a file under its final name is always complete.
- fairseq: binarization is stock ``fairseq-preprocess --only-source`` run in a subprocess; counts
  are read back with ``fairseq.data.data_utils.load_indexed_dataset``. fairseq is imported lazily,
  so ``--help`` and the "up to date" path stay fast.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

SPLITS = ("train", "valid", "test")
STAMP_NAME = "prepare.json"
DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))
UMASK = os.umask(0o022)
os.umask(UMASK)
# fairseq logs INFO lines on import and on every dataset load; our own summary says it better.
logging.getLogger("fairseq").setLevel(logging.WARNING)


class UserError(Exception):
    """A problem with the user's input or flags: reported as one line, no traceback."""


def run_main(main, argv=None):
    """Runs ``main(argv)``; a UserError or OSError becomes ``error: ...`` and exit status 1."""
    try:
        main(argv)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. an unwritable --destdir / --workdir; the message names the path
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted (no outputs were published)")


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- command line


def make_parser(doc):
    """A parser whose --help shows ``doc``: its first paragraph, then the rest as the epilog."""
    summary, _, details = doc.partition("\n\n")
    return argparse.ArgumentParser(description=summary, epilog=details,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_args(p, destdir_default, destdir_help, workdir_help):
    """The options every preparation script has: outputs, dictionary reuse, workers, --force."""
    p.add_argument("--destdir", type=Path, default=destdir_default, help=destdir_help)
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help=workdir_help + " (default: DESTDIR-raw)")
    p.add_argument("--srcdict", type=Path, metavar="DICT",
                   help="reuse this fairseq dictionary instead of building one from train")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the intermediate files (decompressed inputs, token text) in the work dir; "
                        "by default they are removed once the data-bin is written and checked")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="fairseq-preprocess workers (default: the CPU count, at most 8; "
                        "here %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if the outputs are up to date, "
                        "replacing --destdir whatever it holds")


def parse_output_args(p, argv, default_destdir=None):
    """Parses ``argv``; fills in --destdir (``default_destdir(args)`` if unset) and --workdir."""
    args = p.parse_args(argv)
    if args.destdir is None:
        args.destdir = default_destdir(args)
    if args.workdir is None:
        args.workdir = args.destdir.with_name(args.destdir.name + "-raw")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


# ----------------------------------------------------------------------------- inputs


def require_file(path, what):
    """Checks that ``path`` is a readable regular file; ``what`` names it in the error."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path}: no such file")
    if not path.is_file():
        raise UserError(f"{what} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {path}: not readable")
    return path


def fingerprint(path):
    """Cheap identity of an input file for the stamp key (no hashing of large files)."""
    if path is None:
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_srcdict(path):
    """Loads a fairseq dictionary given with --srcdict; returns it (errors name the file)."""
    require_file(path, "--srcdict")
    from fairseq.data import Dictionary

    try:
        return Dictionary.load(str(path))
    except Exception as e:  # fairseq raises ValueError/RuntimeError/Exception for bad files
        raise UserError(f"--srcdict {path}: not a fairseq dictionary ({first_line(e)})") from None


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- outputs


@contextmanager
def atomic_open(path):
    """Opens ``path`` for binary writing through a temporary file renamed into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path, data):
    with atomic_open(path) as f:
        f.write(data)


def read_stamp(destdir):
    try:
        return json.loads((Path(destdir) / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _files_intact(destdir, files):
    """Whether the stamp's files in ``destdir`` are there with their sizes. Stamps written before the
    work dir was cleaned up also list work-dir files: those may since have been deleted."""
    for name, size in files.items():
        p = Path(name)
        if p.parent == destdir.resolve() and (not p.is_file() or p.stat().st_size != size):
            return False
    return True


def up_to_date(destdir, key, force=False):
    """Decides what to do with an existing ``destdir``.

    Returns the stamp when the outputs are present and valid for ``key`` (skip the work), None
    when they must be (re)built (always with ``force``). Raises UserError when ``destdir`` holds
    something else (another input, other options, or foreign files) and ``force`` is not set.
    """
    destdir = Path(destdir)
    key = json.loads(json.dumps(key))  # as the stamp stores it (tuples become lists)
    if not destdir.exists():
        return None
    if not destdir.is_dir():
        raise UserError(f"--destdir {destdir}: exists and is not a directory")
    if force:
        return None
    stamp = read_stamp(destdir)
    if stamp is not None and stamp.get("key") == key:
        if _files_intact(destdir, stamp.get("files", {})):
            return stamp
        log(f"{destdir}: outputs incomplete or modified since they were made; rebuilding")
        return None
    if not any(destdir.iterdir()):
        return None
    why = "was made from other inputs or options" if stamp else "holds files not made here"
    raise UserError(f"--destdir {destdir} {why}; pass --force to replace it, "
                    "or choose another --destdir")


@contextmanager
def staging(destdir):
    """Yields a hidden empty directory next to ``destdir``; removed on exit unless published."""
    destdir = Path(destdir).resolve()
    destdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destdir.name}.staging-", dir=destdir.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def work_area(workdir, keep=False):
    """Yields the directory for intermediate files, which only fairseq-preprocess reads.

    With ``keep`` it is ``workdir`` itself and they stay there (to inspect them). Otherwise it is a
    hidden directory in ``workdir``, removed on exit, whether the preparation succeeded or not, and
    ``workdir`` with it if this made it and nothing else is in it.
    """
    workdir = Path(workdir)
    made = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    if keep:
        yield workdir
        return
    tmp = Path(tempfile.mkdtemp(prefix=".intermediate-", dir=workdir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made and not any(workdir.iterdir()):
            workdir.rmdir()


def publish(staged, destdir, key, report):
    """Moves the staged outputs to ``destdir`` (replacing it), stamp included.

    The stamp is written into the staging directory first, so ``destdir`` appears complete with
    its stamp in one rename.
    """
    destdir = Path(destdir).resolve()
    files = {str(destdir / p.name): p.stat().st_size for p in sorted(Path(staged).iterdir())}
    stamp = {"key": key, "files": files, "report": report}
    atomic_write(Path(staged) / STAMP_NAME, json.dumps(stamp, indent=1).encode())
    os.chmod(staged, 0o777 & ~UMASK)  # mkdtemp makes it private
    old = None
    if destdir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destdir.name}.old-", dir=destdir.parent))
        os.replace(destdir, old / "d")
    os.replace(staged, destdir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def report_skip(destdir, stamp):
    log(f"{destdir}: up to date (outputs present and valid for these inputs); nothing to do")
    print_table(stamp.get("report", {}).get("splits", {}))


def print_table(rows):
    """Prints ``{split: {column: value}}`` as an aligned table."""
    if not rows:
        return
    cols = list(next(iter(rows.values())))
    lines = [["split"] + cols] + [[s] + [f"{v[c]:,}" if isinstance(v[c], int) else str(v[c])
                                         for c in cols] for s, v in rows.items()]
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    for r in lines:
        log("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))))


# ----------------------------------------------------------------------------- fairseq


def run_preprocess(texts, destdir, srcdict=None, workers=DEFAULT_WORKERS):
    """Binarizes ``texts`` ({split: text file}) into ``destdir`` with stock fairseq-preprocess.

    The dictionary is built from the train text (``--only-source``), or taken from ``srcdict``.
    fairseq's log goes to ``destdir/preprocess.log``; on failure its tail is shown.
    """
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
           "--destdir", str(destdir), "--workers", str(workers)]
    for split, flag in (("train", "--trainpref"), ("valid", "--validpref"), ("test", "--testpref")):
        if texts.get(split) is not None:
            cmd += [flag, str(texts[split])]
    if srcdict is not None:
        cmd += ["--srcdict", str(srcdict)]
    log(f"binarizing with fairseq-preprocess (--workers {workers}) ...")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise UserError(f"fairseq-preprocess failed (exit status {proc.returncode}); "
                        "its output is above")


def load_dictionary(destdir):
    from fairseq.data import Dictionary

    return Dictionary.load(str(Path(destdir) / "dict.txt"))


def load_binarized(destdir, split):
    """Returns (dictionary, dataset) for ``destdir/split`` via fairseq's own loaders.

    Keep the dataset referenced while using ``dataset.sizes``: it is a view of a memory map that
    the dataset's ``__del__`` closes (reading it afterwards crashes the interpreter).
    """
    from fairseq.data import data_utils

    dictionary = load_dictionary(destdir)
    dataset = data_utils.load_indexed_dataset(str(Path(destdir) / split), dictionary)
    if dataset is None:
        raise UserError(f"{destdir}/{split}.bin/.idx: missing or unreadable after binarization")
    return dictionary, dataset


def count_binarized(destdir, splits):
    """{split: {"lines": sequences, "tokens": tokens incl. eos}}, read back from binarized data."""
    counts = {}
    for split in splits:
        _, dataset = load_binarized(destdir, split)
        counts[split] = {"lines": int(len(dataset)), "tokens": int(dataset.sizes.sum())}
        del dataset
    return counts
