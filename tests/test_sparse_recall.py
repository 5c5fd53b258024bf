"""scripts/sparse_recall.py: a smoke run in the default suite (the real runs are docs/memory_in_lm.md's, 3b)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_stream_of_mixed_gaps_is_reported_within_and_beyond_transformer_xls_reach(tmp_path):
    out = tmp_path / "table"
    subprocess.run([sys.executable, str(REPO / "scripts" / "sparse_recall.py"), "--gaps", "0", "--max-gap", "40",
                    "--methods", "transformer_xl", "--seeds", "1", "--updates", "2", "--train-size", "50",
                    "--workdir", str(tmp_path / "runs"), "--out", str(out)], check=True, capture_output=True,
                   timeout=600)
    rows = [line.split(" | ")[0] for line in out.with_suffix(".md").read_text().splitlines()[2:] if line]
    assert rows[:2] == ["| 3-40", "| 41-43 (beyond)"]
    result = json.loads(out.with_suffix(".json").read_text())["results"]["gap0-transformer_xl"][0]
    distances = {int(d) for d in result["exact_match_by_distance"]}
    assert distances == set(range(3, 44))  # every gap 0..40 drawn, each scored at its own distance
    assert out.with_suffix(".png").stat().st_size > 0  # the training curves
