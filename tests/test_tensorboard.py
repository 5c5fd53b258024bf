"""fairseq's --tensorboard-logdir works out of the box: the package installs tensorboardX, so
fairseq-train neither asks for it nor skips the event files."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd):
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_tensorboard_logdir_writes_event_files(tmp_path):
    data = tmp_path / "data-bin"
    run([BIN / "rmt-prepare-wikitext", "--input", REPO / "examples" / "data" / "tiny-wikitext2",
         "--level", "byte", "--destdir", data, "--workers", "1"])
    logdir = tmp_path / "tb"
    log = run([
        BIN / "fairseq-train", data, "--user-dir", "rmt_plugin", "--task", "rmt_lm", "--criterion", "rmt_lm",
        "--arch", "rmt_tiny", "--tokens-per-sample", "16", "--batch-size", "2", "--optimizer", "adam",
        "--lr", "0.001", "--max-update", "2", "--log-interval", "1", "--max-valid-steps", "1",
        "--save-dir", tmp_path / "checkpoints", "--no-save", "--num-workers", "0",
        "--tensorboard-logdir", logdir,
    ])
    assert "Please install tensorboardX" not in log
    events = {p.parent.name for p in logdir.glob("*/events.out.tfevents.*")}
    assert {"train", "valid"} <= events, sorted(logdir.rglob("*"))
