"""scripts/study.py: the CPU-scale study's table (mean ± std over seeds) and plots; end to end (slow)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import study  # noqa: E402


def report(loss, memory_gain=None, cache_gain=None):
    out = {"loss": loss, "loss_by_segment": {"0": loss + 1, "1": loss},
           "loss_by_position": {"carried": [loss + 0.5, loss]}}
    if memory_gain is not None:
        out["memory_gain"] = memory_gain
        out["loss_by_position"]["memory_reset"] = [loss + 0.5 + memory_gain, loss]
    if cache_gain is not None:
        out["cache_gain"] = cache_gain
    return out


def test_table_is_the_mean_and_spread_over_seeds_and_plots_are_written(tmp_path):
    args = study.parse_args(["--data", "unused", "--name", "toy", "--out", str(tmp_path), "--seeds", "1", "2",
                             "--models", "baseline", "rmt_deep", "--unit", "char"])
    curve = [(100, 3.0), (200, 2.5)]
    results = {"baseline": [(report(2.0), curve), (report(2.2), curve)],
               "rmt_deep": [(report(1.9, memory_gain=0.1), curve), (report(1.7, memory_gain=0.3), curve)]}
    study.summarise(args, results)

    table = (tmp_path / "toy.md").read_text().splitlines()
    assert table[0].startswith("| model | test loss (bits/char) | memory gain: reset | swap |")
    assert table[2] == "| no memory | 2.1000 ± 0.1414 | - | - | - | - | 3.1000 ± 0.1414 |"
    assert table[3] == "| RMT m=8 BPTT-3 | 1.8000 ± 0.1414 | 0.2000 ± 0.1414 | - | - | - | 2.8000 ± 0.1414 |"
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved["models"]["rmt_deep"]["memory_gain"] == [0.1, 0.3]
    assert saved["settings"]["seeds"] == [1, 2]
    for png in ("toy-curves.png", "toy-diagnostics.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_average_of_reports_is_taken_key_by_key():
    mean = study.average_reports([report(1.0, memory_gain=0.2), report(2.0, memory_gain=0.4)])
    assert mean["loss_by_segment"] == {"0": 2.5, "1": 1.5}
    assert mean["loss_by_position"]["memory_reset"] == pytest.approx([2.3, 1.5])
    assert mean["memory_gain"] == pytest.approx(0.3)


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent"], "--data /nonexistent has no dict.txt"),
    (["--segments", "4", "--depth", "2"], "--segments 4 must be a multiple of --depth + 1 = 3"),
])
def test_bad_settings_stop_with_one_line(tiny_data_bin, argv, message):
    with pytest.raises(SystemExit) as stop:
        study.main(["--name", "x", "--data", str(tiny_data_bin)] + argv)  # the later --data wins
    assert message in str(stop.value)


@pytest.mark.slow
def test_every_model_trains_and_scores_end_to_end(tiny_data_bin, tmp_path):
    study.main(["--data", str(tiny_data_bin), "--name", "e2e", "--out", str(tmp_path / "out"),
                "--workdir", str(tmp_path / "runs"), "--seeds", "1", "--updates", "2", "--valid-interval", "1",
                "--segment", "4", "--segments", "4", "--batch", "2", "--mem", "2", "--valid-steps", "2"])
    saved = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert set(saved["models"]) == set(study.MODELS)
    assert "memory_gain" in saved["models"]["rmt_xl"] and "cache_gain" in saved["models"]["rmt_xl"]
