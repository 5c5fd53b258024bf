"""The catalogue of bad input: each is caught before any training, with one line naming the flag,
split or file, and nothing already written is lost.

Read the table: a case's command line (after the common flags) → the error's last line.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["--user-dir", "rmt_plugin", "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--num-workers", "0",
         "--tokens-per-sample", "16", "--batch-size", "4", "--max-update", "10", "--log-format", "json",
         "--log-interval", "1", "--seed", "1"]
RMT = ["--task", "rmt_lm", "--arch", "rmt_tiny", "--num-mem-tokens", "4", "--criterion", "rmt_lm"]

# case: (data-bin variant, program, its arguments, expected last line)
CATALOGUE = {
    "valid split smaller than its streams": (
        "tiny", "fairseq-train", [*RMT, "--batch-size", "200"],
        "ValueError: split 'valid' has 181 tokens, fewer than the 200 streams asked for "
        "(--batch-size-valid 200 x 1 shards: data-parallel ranks, or eval-lm's --num-shards)"),
    "empty split": (
        "empty valid", "fairseq-train", RMT,
        "ValueError: --task rmt_lm: split 'valid' is empty ({data}/valid.bin has no tokens)"),
    "typo in eval-lm's --model-overrides": (
        "tiny", "fairseq-eval-lm", ["--task", "rmt_lm", "--path", "{trained}/checkpoint_last.pt",
                                    "--model-overrides", "{'mem_lne': 16}"],
        "ValueError: --model-overrides: 'mem_lne' not in the checkpoint's configuration (a typo?)"),
    "resume with another --batch-size": (
        "tiny", "fairseq-train", [*RMT, "--save-dir", "{trained}", "--batch-size", "2"],
        "ValueError: --task rmt_lm: the checkpoint was saved mid-epoch on other streams: --batch-size 2 "
        "(checkpoint: 4); resume with the checkpoint's values, or pass --reset-dataloader to start the epoch over"),
    "resume with another --tokens-per-sample": (
        "tiny", "fairseq-train", [*RMT, "--save-dir", "{trained}", "--tokens-per-sample", "8"],
        "ValueError: --task rmt_lm: the checkpoint was saved mid-epoch on other streams: --tokens-per-sample 8 "
        "(checkpoint: 16); resume with the checkpoint's values, or pass --reset-dataloader to start the epoch over"),
    "an RMT arch without the rmt_lm task": (
        "tiny", "fairseq-train", ["--task", "language_modeling", "--arch", "rmt_tiny", "--criterion", "rmt_lm"],
        "ValueError: --arch rmt_tiny carries memory from segment to segment and needs --task rmt_lm (or "
        "rmt_memory), not --task language_modeling, which would start every segment from fresh memory"),
    "eval-lm of an RMT checkpoint without --task rmt_lm (fairseq's default task: a memory-less score)": (
        "tiny", "fairseq-eval-lm", ["--path", "{trained}/checkpoint_last.pt"],
        "ValueError: --arch rmt_tiny carries memory from segment to segment and needs --task rmt_lm (or "
        "rmt_memory), not --task language_modeling, which would start every segment from fresh memory"),
    "an arch interpolating what rmt_lm lacks": (
        "tiny", "fairseq-train", ["--task", "rmt_lm", "--arch", "transformer_lm", "--criterion", "rmt_lm"],
        "ValueError: --arch transformer_lm reads 'task.max_target_positions', which --task rmt_lm does not "
        "have: pick an architecture made for that task"),
    "an arch that is not an RMT": (
        "tiny", "fairseq-train", ["--task", "rmt_lm", "--arch", "lstm_lm", "--criterion", "rmt_lm"],
        "ValueError: --task rmt_lm carries memory between segments and needs an rmt, rmt_* or transformer_xl_* "
        "--arch, not --arch lstm_lm"),
    "--report-accuracy with an adaptive softmax": (
        "tiny", "fairseq-train", [*RMT, "--report-accuracy", "--adaptive-softmax-cutoff", "10"],
        "ValueError: --report-accuracy needs a full softmax (drop --adaptive-softmax-cutoff)"),
    "--bf16 on the CPU": (
        "tiny", "fairseq-train", [*RMT, "--bf16"],
        "ValueError: --bf16 needs a GPU; on the CPU train in fp32 (drop --bf16)"),
}


@pytest.fixture(scope="module")
def data_bins(tiny_data_bin, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty_valid") / "bin"
    shutil.copytree(tiny_data_bin, empty)
    (empty / "valid.bin").write_bytes(b"")
    return {"tiny": tiny_data_bin, "empty valid": empty}


@pytest.fixture(scope="module")
def trained(tiny_data_bin, tmp_path_factory):
    """A run stopped at update 5 of 13 in its first epoch (its checkpoint carries the memory)."""
    save_dir = tmp_path_factory.mktemp("trained")
    subprocess.run([str(BIN / "fairseq-train"), str(tiny_data_bin), *TRAIN, *RMT, "--max-update", "5",
                    "--save-dir", str(save_dir), "--no-epoch-checkpoints"],
                   env=ENV, check=True, capture_output=True, timeout=300)
    return save_dir


def fingerprint(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_stops_before_training_with_one_line(case, data_bins, trained, tmp_path):
    data, program, args, expected = CATALOGUE[case]
    fill = {"data": data_bins[data], "trained": trained}
    args = [a.format(**fill) if a.startswith("{") and "}" in a[:10] else a for a in args]
    before = fingerprint(trained)
    common = TRAIN if program == "fairseq-train" else ["--user-dir", "rmt_plugin", "--cpu", "--batch-size", "2",
                                                        "--tokens-per-sample", "8", "--gen-subset", "valid"]
    save_dir = [] if "--save-dir" in args or program != "fairseq-train" else ["--save-dir", str(tmp_path / "ckpt")]
    proc = subprocess.run([str(BIN / program), str(data_bins[data]), *common, *save_dir, *args],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == expected.format(**fill)
    assert "train_inner" not in proc.stdout + proc.stderr  # not a single update
    assert fingerprint(trained) == before  # nothing already written is lost
    assert not list(tmp_path.glob("ckpt/*"))  # no checkpoint, no crash.pt
