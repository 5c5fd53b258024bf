"""Long runs that survive a kill: exact resume with the memory, checkpoints a kill cannot corrupt.

Through the stock ``fairseq-train`` on a tiny corpus: a run SIGKILLed mid-epoch after its
checkpoint at update 5 and rerun with the same command must log the same per-update losses as an
uninterrupted run and end with bit-identical weights, for every kind of carried state and for 2
data-parallel ranks; kills during saves must never leave an unreadable ``checkpoint_last.pt``.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

VARIANTS = {  # every kind of state the criterion carries between batches
    "rmt_chunk": ["--arch", "rmt_tiny", "--num-mem-tokens", "4", "--bptt-depth", "1"],
    "rmt_sliding": ["--arch", "rmt_tiny", "--num-mem-tokens", "4", "--bptt-depth", "1", "--bptt-mode", "sliding"],
    "transformer_xl": ["--arch", "transformer_xl_tiny", "--mem-len", "16"],
    "rmt_xl": ["--arch", "rmt_xl_tiny", "--num-mem-tokens", "4", "--mem-len", "16", "--bptt-depth", "1"],
    # the authors' BPTT carries each re-run segment's own cache; here the paper's cache of memory rows
    "rmt_xl_authors": ["--arch", "rmt_xl_tiny", "--num-mem-tokens", "4", "--mem-len", "16", "--bptt-depth", "1",
                       "--bptt-mode", "authors", "--cache-content", "sequence", "--cache-distance", "sequence",
                       "--memory-positions", "rel_shift"],
    "rmt_chunk_2_ranks": ["--arch", "rmt_tiny", "--num-mem-tokens", "4", "--bptt-depth", "1",
                          "--distributed-world-size", "2"],
    # memory replay (its RNG restores, with dropout on) with --update-freq, and on 2 ranks in sliding mode
    "rmt_replay_update_freq": ["--arch", "rmt_tiny", "--num-mem-tokens", "4", "--bptt-depth", "1",
                               "--memory-replay", "--dropout", "0.1", "--update-freq", "2"],
    "rmt_sliding_replay_2_ranks": ["--arch", "rmt_tiny", "--num-mem-tokens", "4", "--bptt-depth", "1",
                                   "--bptt-mode", "sliding", "--memory-replay", "--dropout", "0.1",
                                   "--distributed-world-size", "2"],
    # BPTT across batch borders: the carried prefix, with replay and --update-freq, and on 2 ranks
    "rmt_prefix_replay_update_freq": ["--arch", "rmt_tiny", "--num-mem-tokens", "4", "--bptt-depth", "1",
                                      "--bptt-mode", "prefix", "--memory-replay", "--dropout", "0.1",
                                      "--update-freq", "2"],
    "rmt_prefix_2_ranks": ["--arch", "rmt_tiny", "--num-mem-tokens", "4", "--bptt-depth", "1",
                           "--bptt-mode", "prefix", "--distributed-world-size", "2"],
}


def train_command(data_bin, save_dir, *extra):
    # 1573 tokens: 4 streams (8 with 2 ranks), 13 (7) batches per epoch, so update 5 is mid-epoch
    return [str(BIN / "fairseq-train"), str(data_bin), "--user-dir", "rmt_plugin", "--task", "rmt_lm",
            "--criterion", "rmt_lm", "--segments-per-sample", "2", "--tokens-per-sample", "16",
            "--batch-size", "4", "--max-update", "20", "--optimizer", "adam", "--lr", "1e-3",
            "--save-dir", str(save_dir), "--save-interval-updates", "5", "--no-epoch-checkpoints", "--cpu",
            "--num-workers", "0", "--log-format", "json", "--log-interval", "1", "--seed", "1", *extra]


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def run_and_kill(cmd, when, delay=0.0):
    """Run ``cmd`` in its own process group and SIGKILL the group ``delay`` seconds after the first
    output line for which ``when(line)`` holds; returns the output up to there."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if when(line):
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    return "".join(lines)


def per_update_losses(log):
    records = [json.loads(line[line.index("{"):]) for line in log.splitlines() if "| train_inner |" in line]
    return {int(r["num_updates"]): r["loss"] for r in records}


def final_weights(save_dir):
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")["model"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_killed_run_resumes_exactly(tiny_data_bin, tmp_path, variant):
    extra = VARIANTS[variant]
    reference = per_update_losses(run(train_command(tiny_data_bin, tmp_path / "reference", *extra)))
    assert sorted(reference) == list(range(1, 21))

    interrupted = train_command(tiny_data_bin, tmp_path / "interrupted", *extra)
    run_and_kill(interrupted, lambda line: "Saved checkpoint" in line and "@ 5 updates" in line)
    resumed_log = run(interrupted)
    assert "Loaded checkpoint" in resumed_log and "(epoch 1 @ 5 updates)" in resumed_log
    assert "fresh memory" not in resumed_log
    resumed = per_update_losses(resumed_log)
    assert sorted(resumed) == list(range(6, 21))
    assert resumed == {k: reference[k] for k in resumed}
    reference_weights, resumed_weights = final_weights(tmp_path / "reference"), final_weights(tmp_path / "interrupted")
    assert all(torch.equal(reference_weights[k], resumed_weights[k]) for k in reference_weights)


SCHEDULE_STEPS = {
    # --segments-per-sample-schedule 2,4 --bptt-depth-schedule 1,3: epoch 1 is 13 updates of K=2
    # (depth 1), epoch 2 has K=4 (depth 3)
    "K and depth": (["--segments-per-sample-schedule", "2,4", "--bptt-depth-schedule", "1,3", "--bptt-mode", "prefix"],
                    "--segments-per-sample", ("segments_per_sample", "bptt_depth"), ((2, 1), (4, 3))),
    # --tokens-per-sample-schedule 16,8: epoch 1 is 13 updates of segments of 16, epoch 2 of 8
    "segment length": (["--tokens-per-sample-schedule", "16,8", "--bptt-depth", "1"], "--tokens-per-sample",
                       ("tokens_per_sample",), ((16,), (8,))),
}


@pytest.mark.parametrize("schedule", list(SCHEDULE_STEPS))
def test_killed_run_resumes_exactly_after_a_schedule_step(tiny_data_bin, tmp_path, schedule):
    # the run is killed after its save at update 15, in epoch 2
    flags, replaced, logged, (first, second) = SCHEDULE_STEPS[schedule]
    extra = ["--arch", "rmt_tiny", "--num-mem-tokens", "4", *flags]

    def command(save_dir):
        cmd = train_command(tiny_data_bin, save_dir, *extra)
        del cmd[cmd.index(replaced):cmd.index(replaced) + 2]
        return cmd

    reference_log = run(command(tmp_path / "reference"))
    records = [json.loads(line[line.index("{"):]) for line in reference_log.splitlines() if "| train_inner |" in line]
    used = {int(r["num_updates"]): tuple(float(r[key]) for key in logged) for r in records}
    assert used == {u: first if u <= 13 else second for u in range(1, 21)}
    reference = per_update_losses(reference_log)
    interrupted = command(tmp_path / "interrupted")
    run_and_kill(interrupted, lambda line: "Saved checkpoint" in line and "@ 15 updates" in line)
    resumed_log = run(interrupted)
    assert "(epoch 2 @ 15 updates)" in resumed_log and "fresh memory" not in resumed_log
    resumed = per_update_losses(resumed_log)
    assert sorted(resumed) == list(range(16, 21))
    assert resumed == {k: reference[k] for k in resumed}
    reference_weights, resumed_weights = final_weights(tmp_path / "reference"), final_weights(tmp_path / "interrupted")
    assert all(torch.equal(reference_weights[k], resumed_weights[k]) for k in reference_weights)


def readable(path):
    # Deliberately independent of rmt_compat._readable_checkpoint, the code under test.
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def test_kills_during_saves_never_leave_an_unreadable_last_checkpoint(tiny_data_bin, tmp_path):
    # 29 MB checkpoints (model + Adam state), one per update, no validation (so no
    # checkpoint_best.pt). Each run is a rerun of the previous one, killed 0-10 ms after its
    # numbered checkpoint is written, i.e. while it is copied to checkpoint_last.pt, where
    # fairseq's stock copy left a truncated file
    save_dir = tmp_path / "checkpoints"
    cmd = train_command(tiny_data_bin, save_dir, "--arch", "rmt_tiny", "--num-mem-tokens", "4", "--n-layer", "4",
                        "--d-model", "256", "--d-inner", "1024", "--save-interval-updates", "1",
                        "--keep-interval-updates", "2", "--max-update", "12", "--disable-validation")
    run(cmd + ["--max-update", "2"])
    rng = random.Random(0)
    for kill in range(4):
        log = run_and_kill(cmd, lambda line: "Finished saving checkpoint" in line, delay=rng.random() * 0.01)
        assert "unreadable" not in log
        assert readable(save_dir / "checkpoint_last.pt"), f"kill {kill} left checkpoint_last.pt unreadable"
    assert "unreadable" not in run(cmd)
    assert readable(save_dir / "checkpoint_last.pt")
    assert not list(save_dir.glob("*.tmp"))


def test_unreadable_last_checkpoint_falls_back_to_the_newest_intact_one(tiny_data_bin, tmp_path):
    save_dir = tmp_path / "checkpoints"
    cmd = train_command(tiny_data_bin, save_dir, "--arch", "rmt_tiny", "--num-mem-tokens", "4")
    run(cmd + ["--max-update", "10"])
    last = save_dir / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # as a kill during a plain copy left it
    (save_dir / "checkpoint_1_15.pt.tmp").write_bytes(b"half of a numbered checkpoint")
    log = run(cmd + ["--max-update", "12"])
    # checkpoint_best.pt may be the copy of checkpoint_1_10.pt written just after it
    fallback = re.search(rf"{re.escape(str(last))} is unreadable \(truncated\?\): resuming from (\S+),", log)
    assert fallback and Path(fallback.group(1)).name in ("checkpoint_1_10.pt", "checkpoint_best.pt"), log[-3000:]
    assert "(epoch 1 @ 10 updates)" in log
    assert readable(last) and not list(save_dir.glob("*.tmp"))


def test_unreadable_last_checkpoint_without_an_intact_one_stops_with_one_line(tiny_data_bin, tmp_path):
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    (save_dir / "checkpoint_last.pt").write_bytes(b"")
    proc = subprocess.run(train_command(tiny_data_bin, save_dir, "--arch", "rmt_tiny"), capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert f"{save_dir / 'checkpoint_last.pt'} is unreadable (truncated?) and {save_dir} holds no intact " \
           "checkpoint: remove it to start from scratch" in proc.stderr
