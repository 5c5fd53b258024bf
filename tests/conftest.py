"""Shared pytest fixtures and helpers: corpora and data-bins, a stand-in task for the engine and
the model (``make_task``, ``make_model``), an ``rmt_lm`` task over a small data dir
(``make_stream_task``, the ``data`` fixture), and running a fairseq command (``run_cli``)."""

import os
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary, indexed_dataset

from rmt_plugin.model import RMTConfig, RMTLanguageModel
from rmt_plugin.task import SEGMENTS_PER_SAMPLE_DEFAULT, RMTLMConfig, RMTLMTask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data():
    """The project's real corpora: $RMT_SHARED_DATA, else ../shared/data next to the repository.

    Tests on real data skip only on a developer machine without that directory; when $CI is set (or
    $RMT_SHARED_DATA names a missing directory) a missing directory is a failure, not a skip.
    """
    env = os.environ.get("RMT_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if path.is_dir():
        return path
    if env:
        pytest.fail(f"RMT_SHARED_DATA={env} is not a directory")
    if os.environ.get("CI"):
        pytest.fail(f"real corpora missing at {path} and CI is set: CI must test on real data")
    pytest.skip(f"real corpora not found at {path} (set RMT_SHARED_DATA to run these tests)")


def write_corpus(path, n_lines, seed):
    """Random lines of 3-11 words over a 20-word vocabulary."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n_lines):
            length = int(torch.randint(3, 12, (1,), generator=g))
            f.write(" ".join(f"w{int(k)}" for k in torch.randint(0, 20, (length,), generator=g)) + "\n")


@pytest.fixture(scope="session")
def tiny_data_bin(tmp_path_factory):
    """A fairseq-preprocess data-bin: train 1573 tokens, valid 181, test 193."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    for split, n_lines, seed in [("train", 200, 0), ("valid", 20, 1), ("test", 21, 2)]:
        write_corpus(root / f"{split}.txt", n_lines, seed)
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref", "train.txt",
                    "--validpref", "valid.txt", "--testpref", "test.txt", "--destdir", "bin", "--workers", "1"],
                   cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    return root / "bin"


# --------------------------------------------------------------------------- model and engine
SEG_LEN = 3


def make_task(vocab_size=40):
    dictionary = Dictionary()
    for i in range(vocab_size - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    return SimpleNamespace(
        source_dictionary=dictionary, target_dictionary=dictionary,
        cfg=SimpleNamespace(tokens_per_sample=SEG_LEN),
    )


def make_model(task, num_mem_tokens=2, mem_len=0, layout="rmt", tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = RMTConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0,
                    num_mem_tokens=num_mem_tokens, mem_len=mem_len, memory_layout=layout,
                    tie_weights=tie)
    return RMTLanguageModel.build_model(cfg, task).eval()



# --------------------------------------------------------------------------- rmt_lm over a data dir
VOCAB = 300


def make_dictionary():
    d = Dictionary()
    for k in range(VOCAB):
        d.add_symbol(f"w{k}")
    return d


def write_split(data_dir, split, lines, dictionary):
    """Binarize ``lines`` (lists of token ids) the way fairseq-preprocess does (mmap)."""
    prefix = os.path.join(data_dir, split)
    builder = indexed_dataset.make_builder(prefix + ".bin", "mmap", vocab_size=len(dictionary))
    for line in lines:
        builder.add_item(torch.IntTensor(line))
    builder.finalize(prefix + ".idx")


def distinct_lines(dictionary, n_tokens, first_word=0):
    """Lines of uneven length whose words are all distinct, each ending with eos."""
    words = [dictionary.index(f"w{k}") for k in range(first_word, first_word + n_tokens)]
    lines, pos, length = [], 0, 1
    while pos < len(words):
        lines.append(words[pos:pos + length] + [dictionary.eos()])
        pos += length
        length = length % 6 + 1
    return lines


@pytest.fixture
def data(tmp_path):
    """A data dir with splits 'train' and 'valid'; also returns their token streams."""
    d = make_dictionary()
    d.save(str(tmp_path / "dict.txt"))
    splits = {"train": distinct_lines(d, 80), "valid": distinct_lines(d, 30, first_word=100)}
    for split, lines in splits.items():
        write_split(str(tmp_path), split, lines, d)
    streams = {split: torch.tensor(sum(lines, [])) for split, lines in splits.items()}
    return tmp_path, streams, d


def make_stream_task(data_dir, tokens_per_sample=4, segments_per_sample=None, batch_size=3, splits=("train",), schedule=None,
                     length_schedule=None, valid_subset="valid"):
    cfg = RMTLMConfig(data=str(data_dir), tokens_per_sample=tokens_per_sample,
                      # K = 1 unless given; a schedule replaces K, which then keeps its default
                      segments_per_sample=(segments_per_sample if segments_per_sample is not None
                                           else 1 if schedule is None else SEGMENTS_PER_SAMPLE_DEFAULT),
                      batch_size=batch_size,
                      segments_per_sample_schedule=schedule, tokens_per_sample_schedule=length_schedule,
                      valid_subset=valid_subset)
    task = RMTLMTask.setup_task(cfg)
    for split in splits:
        task.load_dataset(split)
    return task



def run_cli(module, *args, cwd):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr
