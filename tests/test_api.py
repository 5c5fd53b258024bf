"""The Python API (rmt_plugin/api.py, docs/python_api.md): a checkpoint reads a long stream segment
by segment with the memory carried, scoring exactly what fairseq-eval-lm scores; the state can be
inspected, reset and swapped; generation continues a stream. examples/stream_api.py, the docs'
example, runs as written."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq import options
from fairseq.data import Dictionary, data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import eval_lm

from conftest import run_cli
from rmt_plugin.api import bits, load

REPO = Path(__file__).resolve().parents[1]
T = 8


@pytest.fixture(scope="module")
def checkpoint(tiny_data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("api")
    run_cli("fairseq_cli.train", tiny_data_bin, "--user-dir", "rmt_plugin", "--task", "rmt_lm", "--arch", "rmt_xl_tiny",
            "--criterion", "rmt_lm", "--tokens-per-sample", T, "--batch-size", "4", "--optimizer", "adam",
            "--lr", "3e-3", "--max-update", "30", "--cpu", "--num-workers", "0", "--save-dir", save,
            "--no-epoch-checkpoints", "--seed", "1", cwd=save)
    return save / "checkpoint_last.pt"


def test_a_checkpoint_trained_with_a_segment_length_schedule_reads_segments_of_its_last_length(
        tiny_data_bin, tmp_path):
    run_cli("fairseq_cli.train", tiny_data_bin, "--user-dir", "rmt_plugin", "--task", "rmt_lm", "--arch", "rmt_tiny",
            "--criterion", "rmt_lm", "--tokens-per-sample-schedule", "16,4", "--batch-size", "2", "--optimizer",
            "adam", "--lr", "3e-3", "--max-update", "2", "--cpu", "--num-workers", "0", "--save-dir", tmp_path,
            "--no-epoch-checkpoints", cwd=tmp_path)
    assert load(tmp_path / "checkpoint_last.pt").segment_length == 4  # as validation, not the default 512


def split_tokens(data_bin, split):
    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    lines = data_utils.load_indexed_dataset(str(data_bin / split), dictionary)
    return torch.cat([lines[i].long() for i in range(len(lines))])[None]


def test_scoring_a_split_in_one_call_is_fairseq_eval_lm(checkpoint, tiny_data_bin):
    lm = load(checkpoint)
    ours = bits(lm.score(split_tokens(tiny_data_bin, "test")))
    argv = [str(tiny_data_bin), "--path", str(checkpoint), "--user-dir", "rmt_plugin", "--task", "rmt_lm",
            "--gen-subset", "test", "--batch-size", "1", "--tokens-per-sample", str(T), "--cpu"]
    args = options.parse_args_and_arch(options.get_eval_lm_parser(), argv)
    expected = float(eval_lm.main(convert_namespace_to_omegaconf(args))["loss"])
    assert ours == pytest.approx(expected, abs=1e-5)


def test_the_memory_is_carried_between_calls_and_can_be_reset_or_swapped(checkpoint, tiny_data_bin):
    lm = load(checkpoint)
    tokens = split_tokens(tiny_data_bin, "valid")[:, :5 * T]
    whole = lm.score(tokens)
    lm.reset()
    first = lm.score(tokens[:, :2 * T])
    saved = lm.state  # after 2 segments
    assert lm.memory.shape == (1, 8, 64)  # rmt_xl_tiny: m = 8, d_model 64
    parts = torch.cat([first, lm.score(tokens[:, 2 * T:])], dim=1)
    torch.testing.assert_close(parts, whole)  # two calls read the stream as one
    lm.reset()
    fresh = lm.score(tokens[:, 2 * T:3 * T])
    assert not torch.allclose(fresh, whole[:, 2 * T:3 * T])  # what was read before matters
    lm.state = saved  # the saved stream back in
    torch.testing.assert_close(lm.score(tokens[:, 2 * T:3 * T]), whole[:, 2 * T:3 * T])


def test_generation_continues_each_stream(checkpoint, tiny_data_bin):
    lm = load(checkpoint)
    with pytest.raises(ValueError, match="score\\(\\) a prompt first"):
        lm.generate(3)
    prompt = split_tokens(tiny_data_bin, "valid")[:, :T + 3].repeat(2, 1)
    lm.score(prompt)
    greedy = lm.generate(2 * T + 1)
    assert greedy.shape == (2, 2 * T + 1) and torch.equal(greedy[0], greedy[1])  # two equal streams
    assert int(greedy.max()) < len(lm.dictionary)
    lm.reset()
    lm.score(prompt)
    sampled = lm.generate(5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 5)


def test_the_documented_example_runs_as_written(checkpoint, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "stream_api.py"), str(checkpoint)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bits per token" in out.stdout and "memory" in out.stdout
