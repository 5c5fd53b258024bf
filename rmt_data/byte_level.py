"""The byte-level ("enwik8") format of rmt-prepare-enwik8 and rmt-prepare-wikitext --level byte.

One token per byte, so that fairseq-eval-lm's "Loss (base 2)" is bits per character:

- every byte except the newline is a token written as its decimal value ("32" for a space, "195"
  "169" for a UTF-8 "é"), separated by spaces;
- a newline byte (10) ends the text line, and fairseq-preprocess appends eos (</s>) to every line,
  so eos *is* the newline token: a line of n bytes plus its newline gives n + 1 tokens.

So tokens == bytes for a split that ends with a newline. A split that does not (enwik8's 90M/5M/5M
cuts fall inside lines) gets one eos too many, because fairseq-preprocess appends eos to the final
line as well. ``drop_final_eos`` removes it from the binarized data, with fairseq's own
``MMapIndexedDataset.Index`` reader and writer: the .bin loses its last element and the last
sequence's size shrinks by one. That sequence then ends without eos, exactly like the bytes, and
decoding the binarized split gives back the split's bytes.

``newline="drop"`` (rmt-prepare-enwik8's default) is the RMT and Transformer-XL papers' enwik8:
their preparation writes each byte as its number and a newline byte as a line break, and their
corpus reader adds no end-of-line symbol, so newline bytes are not in the stream and every bpc is
over the other characters; the vocabulary is every symbol of train, valid and test (204 for
enwik8). Here the token text keeps the line breaks (fairseq-preprocess reads it line by line),
``drop_eos`` then removes every eos from the binarized data, and the dictionary is counted over
all splits. Example: b"ab\n\ncd" -> tokens 97 98 99 100 (4 tokens for 6 bytes).

The token text that fairseq-preprocess reads, ``{split}.txt`` (about 4 bytes per byte), and
``{split}.raw`` (the split's bytes, to compare it with) are written to the work area that
``common.work_area`` gives: removed once the data-bin is published, unless ``--keep-workdir``.
"""

import os
from pathlib import Path

import numpy as np

from .common import (DEFAULT_WORKERS, UserError, atomic_open, load_binarized, load_dictionary,
                         log, print_table, run_preprocess)

NEWLINE = 10
CHUNK_BYTES = 1 << 24  # conversion works on ~16 MB of bytes at a time


def _token_table():
    """(256, 4) table of each byte's token text, with a mask of the characters in use."""
    table = np.zeros((256, 4), np.uint8)
    used = np.zeros((256, 4), bool)
    for b in range(256):
        token = b"\n" if b == NEWLINE else b"%d " % b
        table[b, : len(token)] = np.frombuffer(token, np.uint8)
        used[b, : len(token)] = True
    return table, used


_TABLE, _USED = _token_table()


def _line_aligned_chunks(data, size):
    """Slices of ``data`` of about ``size`` bytes, each but the last ending with a newline."""
    view = memoryview(data)
    start = 0
    while start < len(data):
        end = data.find(b"\n", start + size)
        end = len(data) if end < 0 else end + 1
        yield view[start:end]
        start = end


def iter_token_text(data):
    """Yields the token text of ``data`` in pieces, e.g. b"60 109\\n32 32" for b"<m\\n  "."""
    pending = b""
    for piece in _line_aligned_chunks(data, CHUNK_BYTES):
        if pending:
            yield pending
        arr = np.frombuffer(piece, np.uint8)
        pending = _TABLE[arr][_USED[arr]].tobytes().replace(b" \n", b"\n")
    yield pending[:-1] if pending.endswith(b" ") else pending


def write_split_files(splits, workdir):
    """Writes ``{split}.raw`` and ``{split}.txt`` into ``workdir``; returns {split: token text path}."""
    texts = {}
    for split, data in splits.items():
        raw, txt = Path(workdir) / f"{split}.raw", Path(workdir) / f"{split}.txt"
        with atomic_open(raw) as f:
            f.write(data)
        with atomic_open(txt) as f:
            for piece in iter_token_text(data):
                f.write(piece)
        texts[split] = txt
    return texts


def drop_final_eos(prefix, dictionary):
    """Removes the eos fairseq-preprocess appended to the last line of ``prefix``.{bin,idx}."""
    from fairseq.data import indexed_dataset as ixd

    idx_path, bin_path = ixd.index_file_path(str(prefix)), ixd.data_file_path(str(prefix))
    index = ixd.MMapIndexedDataset.Index(idx_path)
    dtype, sizes = index.dtype, np.array(index.sizes, dtype=np.int64)
    del index  # closes its memory map before the files change
    itemsize = np.dtype(dtype).itemsize
    with open(bin_path, "r+b") as f:
        f.seek(-itemsize, os.SEEK_END)
        last = int(np.frombuffer(f.read(itemsize), dtype)[0])
        if last != dictionary.eos() or sizes[-1] < 2:
            raise UserError(f"{bin_path}: the last line does not end in the eos that "
                            "fairseq-preprocess appends")
        f.truncate(f.tell() - itemsize)
    sizes[-1] -= 1
    with ixd.MMapIndexedDataset.Index.writer(idx_path, dtype) as writer:
        writer.write(sizes)


def drop_eos(prefix, dictionary):
    """Removes every eos from ``prefix``.{bin,idx}: each line loses its end-of-line symbol, and a
    line that held nothing else (a blank line) disappears."""
    from fairseq.data import indexed_dataset as ixd

    idx_path, bin_path = ixd.index_file_path(str(prefix)), ixd.data_file_path(str(prefix))
    index = ixd.MMapIndexedDataset.Index(idx_path)
    dtype, sizes = index.dtype, np.array(index.sizes, dtype=np.int64)
    del index
    tokens = np.fromfile(bin_path, dtype=dtype)
    is_eos = tokens == dictionary.eos()
    line_of = np.repeat(np.arange(len(sizes)), sizes)
    sizes -= np.bincount(line_of[is_eos], minlength=len(sizes))
    with atomic_open(bin_path) as f:
        f.write(tokens[~is_eos].tobytes())
    with ixd.MMapIndexedDataset.Index.writer(idx_path, dtype) as writer:
        writer.write(sizes[sizes > 0])


def write_dictionary(splits, path):
    """A fairseq dict.txt of the byte symbols in any of ``splits`` (newline excluded), most frequent
    first and padded as fairseq-preprocess pads, so that no split has an <unk>."""
    from fairseq.data import Dictionary

    counts = sum(np.bincount(np.frombuffer(data, np.uint8), minlength=256) for data in splits.values())
    counts[NEWLINE] = 0
    dictionary = Dictionary()
    for b in np.flatnonzero(counts):
        dictionary.add_symbol(str(b), n=int(counts[b]))
    dictionary.finalize(padding_factor=8)
    dictionary.save(str(path))
    return path


def byte_values(dictionary):
    """Array mapping each dictionary index to its byte value (eos -> newline), -1 for others."""
    values = np.full(len(dictionary), -1, np.int16)
    for i in range(dictionary.nspecial, len(dictionary)):
        sym = dictionary[i]
        if sym.isdigit() and 0 <= int(sym) <= 255 and str(int(sym)) == sym:
            values[i] = int(sym)
    values[dictionary.eos()] = NEWLINE
    return values


def check_byte_dictionary(dictionary, name):
    """Rejects a dictionary (e.g. a word-level --srcdict) whose symbols are not byte values."""
    values = byte_values(dictionary)
    for i in range(dictionary.nspecial, len(dictionary)):
        sym = dictionary[i]
        if values[i] < 0 and not sym.startswith("madeupword"):
            raise UserError(f"{name}: not a byte-level dictionary "
                            f"(symbol {sym!r} is not a byte 0-255)")


def read_tokens(destdir, split):
    """(dictionary, all token ids of ``split`` in order, number of sequences), via fairseq."""
    from fairseq.data import indexed_dataset as ixd

    dictionary, dataset = load_binarized(destdir, split)
    n_seq, n_tok = len(dataset), int(dataset.sizes.sum())
    dtype = ixd.best_fitting_int_dtype(len(dictionary))  # what fairseq-preprocess wrote
    del dataset
    # fairseq's builder writes the sequences back to back, so the .bin is all tokens in order
    tokens = np.fromfile(ixd.data_file_path(str(Path(destdir) / split)), dtype=dtype)
    if len(tokens) != n_tok:
        raise UserError(f"{destdir}/{split}.bin: {len(tokens):,} tokens, its .idx says {n_tok:,}")
    return dictionary, tokens, n_seq


def decode(dictionary, tokens):
    """Bytes of a token sequence; <unk> (a byte missing from the dictionary) decodes as -1."""
    return byte_values(dictionary)[tokens]


def verify_split(destdir, split, data):
    """Checks tokens == bytes and that decoding gives back ``data``; returns the split's counts."""
    dictionary, tokens, n_seq = read_tokens(destdir, split)
    if len(tokens) != len(data):
        raise UserError(f"{split}: {len(tokens):,} tokens after binarization != "
                        f"{len(data):,} bytes")
    is_unk = tokens == dictionary.unk()
    decoded = decode(dictionary, tokens)
    original = np.frombuffer(data, np.uint8)
    bad = np.flatnonzero((decoded != original) & ~is_unk)
    if len(bad):
        raise UserError(f"{split}: binarized data does not decode to the input "
                        f"(first difference at byte {bad[0]:,})")
    return {"bytes": len(data), "tokens": len(tokens), "lines": n_seq, "unk": int(is_unk.sum())}


def binarize_bytes(splits, workdir, staged, srcdict=None, workers=DEFAULT_WORKERS, newline="eos"):
    """Byte-level binarization of ``splits`` ({split: bytes}) into ``staged``, verified.
    ``newline``: "eos" (a newline byte is fairseq's eos) or "drop" (newline bytes are not tokens).

    ``workdir`` holds the intermediate files. Returns the report: per-split counts and the dictionary
    size.
    """
    for split, data in splits.items():
        if not data:
            raise UserError(f"{split} split is empty")
    log(f"writing byte-token text to {workdir} ...")
    texts = write_split_files(splits, workdir)
    if newline == "drop" and srcdict is None:
        srcdict = write_dictionary(splits, Path(workdir) / "dict.txt")
    run_preprocess(texts, staged, srcdict=srcdict, workers=workers)
    dictionary = load_dictionary(staged)
    for split, data in splits.items():
        if newline == "drop":
            drop_eos(Path(staged) / split, dictionary)
        elif data[-1] != NEWLINE:
            drop_final_eos(Path(staged) / split, dictionary)
    kept = {split: data.replace(b"\n", b"") if newline == "drop" else data for split, data in splits.items()}
    log("checking tokens == bytes and decoding the binarized data back ...")
    rows = {split: verify_split(staged, split, data) for split, data in kept.items()}
    n_bytes = int((byte_values(dictionary) >= 0).sum()) - 1  # minus eos, counted as the newline
    report = {"splits": rows, "dictionary": {"byte_symbols": n_bytes, "size": len(dictionary)},
              "newline": newline}
    return report


def print_report(destdir, report):
    """Prints the per-split counts of a byte-level report, warning about bytes mapped to <unk>."""
    d = report["dictionary"]
    if report.get("newline") == "drop":
        log(f"wrote {destdir} (dictionary: {d['byte_symbols']} byte symbols, newline bytes dropped as in the "
            f"papers' enwik8, {d['size']} entries with fairseq's specials); tokens == bytes other than "
            "newline in every split:")
    else:
        log(f"wrote {destdir} (dictionary: {d['byte_symbols']} byte symbols + newline as eos, "
            f"{d['size']} entries with fairseq's specials); tokens == bytes in every split:")
    print_table(report["splits"])
    for split, row in report["splits"].items():
        if row["unk"]:
            log(f"warning: {row['unk']:,} bytes of {split} are not in the dictionary "
                "and became <unk>")
