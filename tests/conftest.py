"""Shared pytest fixtures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
