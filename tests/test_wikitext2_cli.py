"""End to end through the stock CLI on real WikiText-2: preprocess, train, evaluate.

RMT, Transformer-XL and Tr-XL + RMT (tiny, adaptive softmax; Tr-XL + RMT also with both extra
losses, the memory-only loss and the paper's memory-token loss) each train a few hundred updates with `fairseq-train --user-dir rmt_plugin`;
validation loss must fall, and `fairseq-eval-lm` on the checkpoint must print Loss (base 2) and
Perplexity for every token it claims to score.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SEG_LEN, SEGMENTS, BATCH = 32, 3, 8

VARIANTS = {
    "rmt": ["--arch", "rmt_tiny", "--num-mem-tokens", "4"],
    "transformer_xl": ["--arch", "transformer_xl_tiny", "--mem-len", str(SEG_LEN)],
    "rmt_xl": ["--arch", "rmt_xl_tiny", "--num-mem-tokens", "4", "--mem-len", str(SEG_LEN)],
    "rmt_xl_extra_losses": ["--arch", "rmt_xl_tiny", "--num-mem-tokens", "4", "--mem-len", str(SEG_LEN),
                            "--memory-only-loss-weight", "0.01", "--memory-token-loss-weight", "0.01",
                            "--memory-target-token"],
}


def run(cmd, cwd):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wikitext2_bin(shared_data, tmp_path_factory):
    dest = tmp_path_factory.mktemp("wt2") / "data-bin"
    run([sys.executable, REPO / "scripts" / "prepare_wikitext.py", "--input", shared_data / "wikitext-2",
         "--dataset", "wikitext-2", "--destdir", dest], cwd=REPO)
    return dest


def valid_logs(log):
    return [json.loads(line[line.index("{"):]) for line in log.splitlines() if '"valid_loss"' in line]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_lowers_valid_loss_and_eval_lm_reports_it(wikitext2_bin, tmp_path, variant):
    save_dir = tmp_path / "checkpoints"
    train_log = run([
        BIN / "fairseq-train", wikitext2_bin, "--user-dir", "rmt_plugin", "--task", "rmt_lm",
        "--criterion", "rmt_lm", "--bptt-depth", "2", *VARIANTS[variant],
        "--adaptive-softmax-cutoff", "2000,10000", "--div-val", "2",
        "--tokens-per-sample", SEG_LEN, "--segments-per-sample", SEGMENTS, "--batch-size", BATCH,
        "--optimizer", "adam", "--lr", "0.002", "--clip-norm", "0.25", "--max-update", "240",
        "--validate-interval-updates", "60", "--max-valid-steps", "40", "--save-interval-updates", "240",
        "--no-epoch-checkpoints", "--save-dir", save_dir, "--log-format", "json", "--log-interval", "60",
        "--seed", "1", "--num-workers", "0",
    ], cwd=REPO)
    logs = valid_logs(train_log)
    losses = [float(log["valid_loss"]) for log in logs]
    assert len(losses) >= 4, train_log[-2000:]
    assert losses[-1] < losses[0] - 0.5, f"{variant}: validation loss did not fall: {losses}"
    extra_losses = "--memory-only-loss-weight" in VARIANTS[variant]
    assert all(("valid_memory_only_loss" in log) == extra_losses for log in logs)
    assert all(("valid_memory_token_loss" in log) == extra_losses for log in logs)
    if extra_losses:  # the memory alone predicts worse than memory + cache; <mem> is learned fast
        assert all(float(log["valid_memory_only_loss"]) > float(log["valid_loss"]) for log in logs)
        tokens = [float(log["valid_memory_token_loss"]) for log in logs]
        assert tokens[-1] < tokens[0], tokens

    eval_log = run([
        BIN / "fairseq-eval-lm", wikitext2_bin, "--path", save_dir / "checkpoint_last.pt",
        "--user-dir", "rmt_plugin", "--task", "rmt_lm", "--gen-subset", "test",
        "--batch-size", "2", "--tokens-per-sample", SEG_LEN,
        # eval-lm scores the full vocabulary at every position: on 2 CPU cores, score the first
        # 2 of 32 streams (data-parallel shard 0 of 16), ~15k tokens
        "--num-shards", "16", "--shard-id", "0",
    ], cwd=REPO)
    evaluated = int(re.search(r"Evaluated ([\d,]+) tokens", eval_log).group(1).replace(",", ""))
    assert evaluated == 2 * (245_569 // 32)
    found = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", eval_log)
    assert found, eval_log[-2000:]
    loss2, ppl = float(found.group(1)), float(found.group(2))
    assert ppl == pytest.approx(2 ** loss2, rel=1e-3)
    assert loss2 < losses[0], "the trained model should beat its first validation"
