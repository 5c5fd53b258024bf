"""Memory tasks served as one LM stream (``python -m rmt_plugin.memory_streams``)."""

import json
import subprocess
import sys

import pytest
import torch

from rmt_plugin.memory_streams import TargetScorer, main

SEP, EOS = 5, 2


def test_written_stream_has_one_example_a_line_with_the_gap(tmp_path):
    main(["write", "--destdir", str(tmp_path), "--source-len", "3", "--gap", "2",
          "--train-size", "50", "--valid-size", "5", "--test-size", "7"])
    lines = (tmp_path / "text" / "test.txt").read_text().splitlines()
    assert len(lines) == 7
    for line in lines:
        source, target = line.split(" <sep> ")
        words = source.split()
        assert words[3:] == ["_", "_"] and target.split() == words[:3]  # copy, after the gap
    assert {"train.bin", "valid.idx", "test.idx", "dict.txt"} <= {p.name for p in tmp_path.iterdir()}
    train = set((tmp_path / "text" / "train.txt").read_text().splitlines())
    assert not train & set(lines)  # splits never share a source


@pytest.mark.parametrize("flags, message", [
    (["--gap", "-1"], "--gap must be >= 0"),
    (["--memory-task", "nope"], "--memory-task 'nope' is unknown"),
])
def test_bad_options_are_one_line_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(["write", "--destdir", str(tmp_path), *flags])


def test_scorer_counts_only_the_tokens_after_sep_across_segments():
    # stream: a b <sep> c d <eos> e <sep> f <eos>; targets are the next tokens
    stream = [10, 11, SEP, 12, 13, EOS, 14, SEP, 15, EOS]
    inputs, targets = torch.tensor([[EOS] + stream[:-1]]), torch.tensor([stream])
    predictions = targets.clone()
    predictions[0, 4] = 99  # the second target token of the first example is wrong
    scorer = TargetScorer(SEP, EOS, rows=1)
    for seg in (slice(0, 4), slice(4, 7), slice(7, 10)):  # segments cut through examples
        scorer.add(inputs[:, seg], targets[:, seg], predictions[:, seg])
    assert scorer.result() == {"examples": 2, "exact_match": 0.5, "target_tokens": 3, "accuracy": 2 / 3}
