"""Data parallel on the CPU through fairseq's own launcher and torchrun, with the default
--ddp-backend: 2 ranks of --batch-size 4 train exactly as 1 process of --batch-size 8 (rank r reads
streams 4r..4r+3 of the same 8), update by update.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fairseq import checkpoint_utils

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(launcher, data_bin, save_dir, batch_size, *extra):
    # SGD: Adam's normalisation would turn float summation-order noise in near-zero gradient
    # components into visible weight differences
    proc = subprocess.run([*launcher, str(data_bin), "--user-dir", "rmt_plugin", "--task", "rmt_lm",
                           "--criterion", "rmt_lm", "--arch", "rmt_tiny", "--num-mem-tokens", "4", "--bptt-depth", "1",
                           "--segments-per-sample", "2", "--tokens-per-sample", "16", "--batch-size", str(batch_size),
                           "--max-update", "10", "--optimizer", "sgd", "--lr", "0.1", "--save-dir", str(save_dir),
                           "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--log-format", "json",
                           "--log-interval", "1", "--seed", "1", *extra],
                          capture_output=True, text=True, env=ENV, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    losses = [json.loads(line[line.index("{"):])["loss"] for line in log.splitlines() if "| train_inner |" in line]
    assert len(losses) == 10, log[-3000:]
    return losses, checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))["model"]


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# How far 10 updates of float noise carry the weights apart. chunk: measured 1.2e-7 (summation
# order). prefix (the default): 3.4e-5, from update 4 on; one process with OMP_NUM_THREADS 1 and 2
# differs by exactly as much from the same update (prefix's 3 forwards per backward evaluate more
# ReLUs, and one whose input is ~1e-7 from zero flips), so the bound is that noise's, not a rank's.
@pytest.mark.parametrize("mode, tolerance", [("chunk", 1e-6), ("prefix", 1e-4)])
def test_two_ranks_equal_one_process_with_twice_the_batch(tiny_data_bin, tmp_path, mode, tolerance):
    flags = ("--bptt-mode", mode)
    single = train([BIN / "fairseq-train"], tiny_data_bin, tmp_path / "single", 8, *flags)
    launcher = train([BIN / "fairseq-train"], tiny_data_bin, tmp_path / "launcher", 4, "--distributed-world-size", "2",
                     *flags)
    torchrun = train([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", "29517", BIN / "fairseq-train"],
                     tiny_data_bin, tmp_path / "torchrun", 4, *flags)
    assert launcher[0] == single[0] == torchrun[0]
    assert max_difference(launcher[1], single[1]) <= tolerance
    assert max_difference(torchrun[1], launcher[1]) == 0
