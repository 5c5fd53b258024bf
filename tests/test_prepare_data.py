"""Tests of the data preparation commands (rmt-prepare-enwik8, rmt-prepare-wikitext, installed with
the package from rmt_data/), their checkout wrappers scripts/prepare_*.py, and
scripts/make_tiny_corpus.py.

The commands run as the user runs them, in a subprocess of this venv (its python, or the installed
console script);
their outputs are read back with fairseq's own loaders and decoded here, independently of the
scripts' code. enwik8 itself is not available offline: a small stand-in in the real format (a zip
holding a member named "enwik8") is built here. WikiText-2 tests use the project's real corpora
(fixture ``shared_data``).
"""

import hashlib
import json
import lzma
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BIN = Path(sys.executable).parent
TINY = REPO / "examples" / "data" / "tiny-wikitext2"
SPLITS = ("train", "valid", "test")
WORKERS = "2"


def run(script, *args, cwd=None):
    """Runs ``scripts/<script>.py`` or the installed command ``<script>``; returns the
    CompletedProcess (stdout, stderr as text)."""
    if script.endswith(".py"):
        cmd = [sys.executable, str(SCRIPTS / script), *map(str, args)]
    else:
        cmd = [str(BIN / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or REPO)


def run_ok(script, *args):
    proc = run(script, *args)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def load(destdir, split):
    """(dictionary, dataset) of a binarized split, via fairseq's loaders."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(Path(destdir) / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(Path(destdir) / split), dictionary)
    assert dataset is not None, f"{destdir}/{split} missing"
    return dictionary, dataset


def n_tokens(destdir, split):
    _, dataset = load(destdir, split)  # keep it alive: .sizes views a memory map __del__ closes
    return int(dataset.sizes.sum())


def decode_bytes(destdir, split):
    """The bytes a byte-level split stands for: symbol "N" is byte N, eos is a newline."""
    dictionary, dataset = load(destdir, split)
    table = np.full(len(dictionary), -1, np.int64)
    for i in range(dictionary.nspecial, len(dictionary)):
        if dictionary[i].isdigit():
            table[i] = int(dictionary[i])
    table[dictionary.eos()] = 10
    tokens = np.concatenate([dataset[i].numpy() for i in range(len(dataset))])
    values = table[tokens]
    assert (values >= 0).all(), "binarized data holds non-byte symbols"
    return values.astype(np.uint8).tobytes()


def dict_symbols(destdir):
    lines = (Path(destdir) / "dict.txt").read_text(encoding="utf-8").splitlines()
    return [line.rsplit(" ", 1)[0] for line in lines]


def snapshot(*dirs):
    """{path: mtime_ns} of every file below ``dirs``."""
    return {str(p): p.stat().st_mtime_ns for d in dirs for p in Path(d).rglob("*") if p.is_file()}


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: "), proc.stderr
    for needle in needles:
        assert str(needle) in err, f"{needle!r} not in {err!r}"


# ----------------------------------------------------------------------------- enwik8 stand-in

N_STANDIN = 40_000  # 90/5/5 -> 36,000 / 2,000 / 2,000 bytes


def standin_bytes():
    """enwik8-like bytes: all 256 byte values in train, newlines (also runs of them, and \\r),
    UTF-8 and other non-ASCII bytes; train and test do not end with a newline, valid starts and
    ends with one."""
    rng = random.Random(1234)
    alphabet = b"the quick brown fox <page> &amp; \xc3\xa9\xe2\x80\x94\r\t\x00\xff" + b"\n" * 6
    data = bytearray(bytes(range(256)) * 2)
    while len(data) < N_STANDIN:
        data += bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
    data = data[:N_STANDIN]
    data[35_999] = ord("x")    # train ends inside a line
    data[36_000] = 10          # valid starts with a newline ...
    data[36_001] = 10          # ... and an empty line
    data[37_999] = 10          # valid ends with a newline
    data[39_999] = 0xE9        # test ends inside a line, with a non-ASCII byte
    return bytes(data)


STANDIN_SPLITS = {"train": slice(0, 36_000), "valid": slice(36_000, 38_000),
                  "test": slice(38_000, None)}


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("enwik8-standin")
    data = standin_bytes()
    (root / "enwik8").write_bytes(data)
    with zipfile.ZipFile(root / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", data)
    return {"dir": root, "zip": root / "enwik8.zip", "raw": root / "enwik8", "data": data,
            "sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture(scope="module")
def enwik8_built(standin, tmp_path_factory):
    """The stand-in zip prepared with the size and sha256 checks on (set to the stand-in's), by the
    installed command (the rerun test below runs the checkout wrapper on the same outputs), keeping
    the intermediate files."""
    out = tmp_path_factory.mktemp("enwik8-out")
    destdir, workdir = out / "data-bin", out / "work"
    proc = run_ok("rmt-prepare-enwik8", "--input", standin["zip"], "--destdir", destdir,
                  "--workdir", workdir, "--keep-workdir", "--expected-size", N_STANDIN,
                  "--expected-sha256", standin["sha256"], "--workers", WORKERS, "--newline", "eos")
    return {"destdir": destdir, "workdir": workdir, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def enwik8_authors(standin, tmp_path_factory):
    """The stand-in prepared with the default, the papers' enwik8 (newline bytes dropped)."""
    out = tmp_path_factory.mktemp("enwik8-authors")
    destdir = out / "data-bin"
    proc = run_ok("rmt-prepare-enwik8", "--input", standin["zip"], "--destdir", destdir,
                  "--workdir", out / "work", "--no-verify", "--workers", WORKERS)
    return {"destdir": destdir, "workdir": out / "work", "stdout": proc.stdout}


def authors_stream(part):
    """What the papers' pipeline makes of a split, written here from its description: each byte
    as its number with a newline byte as a line break, read back without an end-of-line symbol,
    so the stream is the bytes other than newline, in order."""
    return [b for b in part if b != 10]


def test_enwik8_default_is_the_papers_stream_without_newlines(standin, enwik8_authors):
    for split, part in STANDIN_SPLITS.items():
        assert list(decode_bytes(enwik8_authors["destdir"], split)) == authors_stream(standin["data"][part])
        assert n_tokens(enwik8_authors["destdir"], split) == len(authors_stream(standin["data"][part]))
    assert "newline bytes dropped" in enwik8_authors["stdout"]


def test_enwik8_default_vocabulary_is_every_symbol_of_every_split(standin, enwik8_authors):
    """The papers' reader counts train, valid and test; newline is no symbol (a byte seen only in
    test: the next test)."""
    from fairseq.data import Dictionary

    symbols = {int(s) for s in dict_symbols(enwik8_authors["destdir"]) if not s.startswith("madeupword")}
    assert symbols == set(standin["data"]) - {10}
    dictionary = Dictionary.load(str(enwik8_authors["destdir"] / "dict.txt"))
    assert dictionary.eos_word == "</s>" and "10" not in dictionary.indices


def test_enwik8_test_only_byte_is_in_the_vocabulary(tmp_path):
    data = (b"abc\nabd\n" * 2400)[:19_000] + b"ab\x01\n" + b"abc\n" * 249  # byte 1 only in test
    assert len(data) == 20_000
    (tmp_path / "enwik8").write_bytes(data)
    destdir = tmp_path / "bin"
    run_ok("prepare_enwik8.py", "--input", tmp_path / "enwik8", "--destdir", destdir, "--no-verify",
           "--split-sizes", "18000,1000,1000", "--workers", WORKERS)
    assert 1 not in data[:18_000] and 1 in data[19_000:]
    assert "1" in dict_symbols(destdir)
    assert list(decode_bytes(destdir, "test")) == authors_stream(data[19_000:])


@pytest.mark.parametrize("command", ["rmt-prepare-enwik8", "rmt-prepare-wikitext"])
def test_preparation_is_installed_as_a_command_that_runs_outside_a_checkout(command, tmp_path):
    proc = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {command} ")


def test_enwik8_tokens_equal_bytes(standin, enwik8_built):
    for split, part in STANDIN_SPLITS.items():
        assert n_tokens(enwik8_built["destdir"], split) == len(standin["data"][part])
    assert "tokens == bytes" in enwik8_built["stdout"]


def test_enwik8_dictionary_has_one_symbol_per_byte(standin, enwik8_built):
    from fairseq.data import Dictionary

    symbols = [s for s in dict_symbols(enwik8_built["destdir"]) if not s.startswith("madeupword")]
    train_bytes = set(standin["data"][STANDIN_SPLITS["train"]])
    assert sorted(symbols, key=int) == [str(b) for b in sorted(train_bytes - {10})]
    dictionary = Dictionary.load(str(enwik8_built["destdir"] / "dict.txt"))
    assert len(dictionary) == 4 + 255 + 5  # specials + byte symbols + padding to a multiple of 8


def test_enwik8_decodes_to_the_original_bytes(standin, enwik8_built):
    for split, part in STANDIN_SPLITS.items():
        original = standin["data"][part]
        assert decode_bytes(enwik8_built["destdir"], split) == original
        assert (enwik8_built["workdir"] / f"{split}.raw").read_bytes() == original  # --keep-workdir
        assert (enwik8_built["workdir"] / f"{split}.txt").stat().st_size > len(original)


def test_enwik8_work_dir_keeps_no_intermediates_and_a_rerun_does_nothing(standin, enwik8_authors):
    """The token text (~0.4 GB for enwik8) is removed once the data-bin is written; the work dir,
    made for it, goes too. A rerun still finds the outputs up to date."""
    assert not enwik8_authors["workdir"].exists()
    before = snapshot(enwik8_authors["destdir"])
    proc = run_ok("rmt-prepare-enwik8", "--input", standin["zip"], "--destdir", enwik8_authors["destdir"],
                  "--workdir", enwik8_authors["workdir"], "--no-verify", "--workers", WORKERS)
    assert "up to date" in proc.stdout
    assert snapshot(enwik8_authors["destdir"]) == before and not enwik8_authors["workdir"].exists()


def test_enwik8_downloaded_zip_stays_in_the_work_dir(standin, tmp_path):
    """Without --input the zip is downloaded into the work dir (here: already there, as after a
    download): an input, not an intermediate, so it stays; nothing else does."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "enwik8.zip").write_bytes(standin["zip"].read_bytes())
    run_ok("rmt-prepare-enwik8", "--destdir", tmp_path / "bin", "--workdir", workdir, "--no-verify",
           "--workers", WORKERS)
    assert sorted(p.name for p in workdir.iterdir()) == ["enwik8.zip"]
    assert n_tokens(tmp_path / "bin", "test") == len(authors_stream(standin["data"][STANDIN_SPLITS["test"]]))


def test_enwik8_rerun_is_idempotent(standin, enwik8_built):
    before = snapshot(enwik8_built["destdir"], enwik8_built["workdir"])
    proc = run_ok("prepare_enwik8.py", "--input", standin["zip"],
                  "--destdir", enwik8_built["destdir"],
                  "--workdir", enwik8_built["workdir"], "--expected-size", N_STANDIN,
                  "--expected-sha256", standin["sha256"], "--workers", WORKERS, "--newline", "eos")
    assert "up to date" in proc.stdout
    assert snapshot(enwik8_built["destdir"], enwik8_built["workdir"]) == before


def test_enwik8_raw_file_and_given_split_sizes(standin, tmp_path):
    destdir = tmp_path / "bin"
    run_ok("prepare_enwik8.py", "--input", standin["raw"], "--destdir", destdir, "--no-verify",
           "--split-sizes", "30000,6000,4000", "--workers", WORKERS, "--newline", "eos")
    data = standin["data"]
    expected = {"train": data[:30_000], "valid": data[30_000:36_000], "test": data[36_000:]}
    for split, part in expected.items():
        assert n_tokens(destdir, split) == len(part)
    assert decode_bytes(destdir, "valid") == expected["valid"]


def test_damaged_or_foreign_outputs_are_not_taken_for_valid(enwik8_built, tmp_path):
    """The stamp check behind the "up to date" skip (rmt_data/common.py), without a rebuild."""
    from rmt_data.common import STAMP_NAME, UserError, read_stamp, up_to_date

    stamp = read_stamp(enwik8_built["destdir"])
    key = stamp["key"]
    assert up_to_date(enwik8_built["destdir"], key) == stamp
    assert up_to_date(enwik8_built["destdir"], key, force=True) is None
    copy = tmp_path / "copy"  # a stamped directory whose files have the recorded sizes
    copy.mkdir()
    files = {}
    for name, size in stamp["files"].items():
        path = copy / Path(name).name
        path.write_bytes(bytes(size))
        files[str(path)] = size
    (copy / STAMP_NAME).write_text(json.dumps({**stamp, "files": files}))
    assert up_to_date(copy, key) is not None
    # stamps written before the work dir was cleaned up also list its files: deleting them is fine
    (copy / STAMP_NAME).write_text(json.dumps({**stamp, "files": {**files, str(tmp_path / "work" / "train.txt"): 9}}))
    assert up_to_date(copy, key) is not None
    (copy / "train.bin").write_bytes(bytes(10))  # damaged: rebuild
    assert up_to_date(copy, key) is None
    with pytest.raises(UserError, match="other inputs or options"):
        up_to_date(copy, {**key, "split_sizes": [1, 2, 3]})


def corrupt_member_zip(standin, path):
    """The stand-in zip with bytes in the middle of its compressed data flipped."""
    blob = bytearray(standin["zip"].read_bytes())
    for i in range(200, 260):
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))


def no_member_zip(standin, path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("enwik9", standin["data"])


def truncated_zip(standin, path):
    path.write_bytes(standin["zip"].read_bytes()[:1000])


@pytest.mark.parametrize("case, make, flags, needles", [
    ("missing", None, [], ["no such file"]),
    ("truncated zip", truncated_zip, ["--no-verify"], ["not a valid zip"]),
    ("corrupt member", corrupt_member_zip, ["--no-verify"], ["corrupt zip"]),
    ("no enwik8 member", no_member_zip, ["--no-verify"], ["no member named 'enwik8'"]),
    ("wrong size", None, [], ["100,000,000", "--no-verify"]),
    ("wrong sha256", None, ["--expected-size", N_STANDIN, "--expected-sha256", "0" * 64],
     ["sha256"]),
    ("bad split sizes", None, ["--no-verify", "--split-sizes", "1,2,3"], ["--split-sizes"]),
])
def test_enwik8_bad_input_one_line_error_no_outputs(standin, tmp_path, case, make, flags, needles):
    path = tmp_path / "enwik8.zip"
    if make is not None:
        make(standin, path)
    elif case != "missing":
        path = standin["zip"]
    proc = run("prepare_enwik8.py", "--input", path, "--destdir", tmp_path / "bin",
               "--workers", WORKERS, *flags)
    assert_one_line_error(proc, *(needles if case == "bad split sizes" else [path, *needles]))
    assert sorted(p.name for p in tmp_path.iterdir()) == (["enwik8.zip"] if make else [])


def test_enwik8_failure_midway_leaves_no_outputs(standin, tmp_path):
    (tmp_path / "work").write_text("a file where the work dir should go")
    proc = run("prepare_enwik8.py", "--input", standin["zip"], "--destdir", tmp_path / "bin",
               "--workdir", tmp_path / "work", "--no-verify", "--workers", WORKERS)
    assert_one_line_error(proc, "work")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_enwik8_refuses_a_destdir_with_other_data(standin, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "notes.txt").write_text("mine")
    proc = run("prepare_enwik8.py", "--input", standin["zip"], "--destdir", tmp_path / "bin",
               "--no-verify")
    assert_one_line_error(proc, "--destdir", "--force")
    assert (tmp_path / "bin" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("script",
                         ["prepare_enwik8.py", "prepare_wikitext.py", "make_tiny_corpus.py"])
def test_help(script):
    proc = run_ok(script, "--help")
    assert "usage:" in proc.stdout and "Example" in proc.stdout


# ----------------------------------------------------------------------------- WikiText-2 (real)

WT2 = {"train": (36_718, 2_088_628), "valid": (3_760, 217_646), "test": (4_358, 245_569)}


def real_wt2_bytes(shared_data, split):
    return lzma.decompress((shared_data / "wikitext-2" / f"wiki.{split}.tokens.xz").read_bytes())


@pytest.fixture(scope="module")
def wt2_word(shared_data, tmp_path_factory):
    destdir = tmp_path_factory.mktemp("wt2") / "word"
    run_ok("prepare_wikitext.py", "--input", shared_data / "wikitext-2", "--dataset", "wikitext-2",
           "--destdir", destdir, "--workers", WORKERS)
    return destdir


def test_wikitext2_word_level_counts(wt2_word):
    from fairseq.data import Dictionary

    for split, (lines, tokens) in WT2.items():
        _, dataset = load(wt2_word, split)
        assert (len(dataset), int(dataset.sizes.sum())) == (lines, tokens)
    # published vocabulary 33,278 = 33,276 dict.txt words + <unk> + <eos> (fairseq specials)
    assert len(dict_symbols(wt2_word)) == 33_276
    assert len(Dictionary.load(str(wt2_word / "dict.txt"))) == 33_276 + 4  # already a multiple of 8


def test_wikitext_wrong_dataset_is_caught_before_binarizing(shared_data, tmp_path):
    proc = run("prepare_wikitext.py", "--input", shared_data / "wikitext-2", "--dataset",
               "wikitext-103", "--destdir", tmp_path / "bin", "--workdir", tmp_path / "work")
    assert_one_line_error(proc, "wiki.", "wikitext-103")
    assert not (tmp_path / "bin").exists()


def test_wikitext2_byte_level_tokens_equal_bytes(shared_data, tmp_path_factory):
    destdir = tmp_path_factory.mktemp("wt2") / "bytes"
    run_ok("prepare_wikitext.py", "--input", shared_data / "wikitext-2", "--level", "byte",
           "--dataset", "wikitext-2", "--destdir", destdir, "--workers", WORKERS)
    for split in SPLITS:
        original = real_wt2_bytes(shared_data, split)
        assert n_tokens(destdir, split) == len(original)
        if split != "train":  # train: the script itself decodes it back; that is enough
            assert decode_bytes(destdir, split) == original


# ----------------------------------------------------------------------------- tiny corpus

TINY_LIMITS = {"train": 250_000, "valid": 25_000, "test": 25_000}
TINY_COUNTS = {"train": (881, 47_757), "valid": (85, 4_790), "test": (105, 5_017)}


def test_tiny_corpus_files():
    total = 0
    for split, limit in TINY_LIMITS.items():
        data = (TINY / f"wiki.{split}.tokens").read_bytes()
        assert 0 < len(data) <= limit and data.endswith(b"\n")
        total += len(data)
    readme = (TINY / "README.md").read_text(encoding="utf-8")
    assert total + len(readme) < 350_000
    for needle in ("WikiText-2", "Merity", "CC BY-SA 3.0", "Wikipedia", "make_tiny_corpus.py"):
        assert needle in readme


def test_tiny_corpus_is_line_prefix_of_wikitext2(shared_data, tmp_path):
    for split, limit in TINY_LIMITS.items():
        tiny = (TINY / f"wiki.{split}.tokens").read_bytes()
        real = real_wt2_bytes(shared_data, split)
        assert real.startswith(tiny) and tiny.endswith(b"\n")
        next_line_end = real.index(b"\n", len(tiny)) + 1
        assert next_line_end > limit  # the longest such prefix
    run_ok("make_tiny_corpus.py", "--source", shared_data / "wikitext-2", "--dest", tmp_path)
    for split in SPLITS:
        name = f"wiki.{split}.tokens"
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes()


@pytest.fixture(scope="module")
def tiny_word(tmp_path_factory):
    destdir = tmp_path_factory.mktemp("tiny") / "word"
    run_ok("prepare_wikitext.py", "--input", TINY, "--destdir", destdir, "--workers", WORKERS)
    return destdir


def test_tiny_corpus_word_level(tiny_word):
    for split, (lines, tokens) in TINY_COUNTS.items():
        _, dataset = load(tiny_word, split)
        assert (len(dataset), int(dataset.sizes.sum())) == (lines, tokens)


@pytest.mark.parametrize("level", ["word", "byte"])
def test_wikitext_corrupt_xz_one_line_error(tmp_path, level):
    indir = tmp_path / "in"
    indir.mkdir()
    for split in SPLITS:
        data = lzma.compress((TINY / f"wiki.{split}.tokens").read_bytes())
        (indir / f"wiki.{split}.tokens.xz").write_bytes(data[:-40] if split == "valid" else data)
    proc = run("prepare_wikitext.py", "--input", indir, "--level", level,
               "--destdir", tmp_path / "bin", "--workdir", tmp_path / "work")
    assert_one_line_error(proc, indir / "wiki.valid.tokens.xz", "corrupt xz")
    assert not (tmp_path / "bin").exists()
    assert not list(tmp_path.glob(".bin*"))  # no staging directory left
    work = sorted(p.name for p in (tmp_path / "work").glob("*")) if level == "word" else []
    assert "wiki.valid.tokens" not in work and not [n for n in work if n.startswith(".")]


@pytest.mark.parametrize("level", ["word", "byte"])
def test_wikitext_work_dir_keeps_no_intermediates_and_a_rerun_does_nothing(tmp_path, level):
    """From .xz inputs: neither the decompressed files nor the byte-level token text stay."""
    indir = tmp_path / "in"
    indir.mkdir()
    for split in SPLITS:
        (indir / f"wiki.{split}.tokens.xz").write_bytes(lzma.compress((TINY / f"wiki.{split}.tokens").read_bytes()))
    args = ["--input", indir, "--level", level, "--destdir", tmp_path / "bin", "--workdir", tmp_path / "work",
            "--workers", WORKERS]
    run_ok("prepare_wikitext.py", *args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "in"]
    assert n_tokens(tmp_path / "bin", "valid") == (TINY_COUNTS["valid"][1] if level == "word"
                                                   else len((TINY / "wiki.valid.tokens").read_bytes()))
    before = snapshot(tmp_path / "bin")
    assert "up to date" in run_ok("prepare_wikitext.py", *args).stdout
    assert snapshot(tmp_path / "bin") == before and not (tmp_path / "work").exists()


def test_wikitext_missing_train_needs_srcdict(tiny_word, tmp_path):
    indir = tmp_path / "valid-test-only"
    indir.mkdir()
    for split in ("valid", "test"):
        os.symlink(TINY / f"wiki.{split}.tokens", indir / f"wiki.{split}.tokens")
    proc = run("prepare_wikitext.py", "--input", indir, "--destdir", tmp_path / "bin")
    assert_one_line_error(proc, "wiki.train.tokens", "--srcdict")
    assert not (tmp_path / "bin").exists()
    run_ok("prepare_wikitext.py", "--input", indir, "--destdir", tmp_path / "bin",
           "--srcdict", tiny_word / "dict.txt", "--workers", WORKERS)
    assert not (tmp_path / "bin" / "train.bin").exists()
    assert (tmp_path / "bin" / "dict.txt").read_bytes() == (tiny_word / "dict.txt").read_bytes()
    for split in ("valid", "test"):
        assert n_tokens(tmp_path / "bin", split) == TINY_COUNTS[split][1]


def test_wikitext_input_given_a_file_says_so(tmp_path):
    afile = tmp_path / "wiki.train.tokens"
    afile.write_text("a b\n")
    proc = run("prepare_wikitext.py", "--input", afile, "--destdir", tmp_path / "bin")
    assert_one_line_error(proc, afile, "a file; give the directory holding wiki.{train,valid,test}.tokens")
