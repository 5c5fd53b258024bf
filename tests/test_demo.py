"""README command (1), scripts/demo.sh, run as a user runs it (from another directory), shrunk
by its own knobs to a few updates and a tiny copy stream: both tables and the plot come out."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_prints_both_tables_and_draws_the_plot(tmp_path):
    env = dict(os.environ, DEMO_UPDATES="3", DEMO_COPY_EXAMPLES="200", DEMO_OUT="out")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("1. Language modelling")))
    second = lines.index(next(line for line in lines if line.startswith("2. Copy 2 symbols 27 tokens later")))
    assert [line.split()[0] for line in lines[first + 2:first + 5]] == ["baseline", "rmt", "transformer_xl"]
    assert lines[second + 2].startswith("RMT (8 memory tokens)")
    assert lines[second + 3].startswith("Transformer-XL (cache 8, reach 24)")
    assert (tmp_path / "out" / "diagnostics.png").stat().st_size > 10_000  # DEMO_OUT, relative to the caller
    for name in ("rmt", "transformer_xl"):
        assert (tmp_path / "out" / f"copy-{name}" / "test-score.json").exists()
