"""Memory diagnostics (``--memory-diagnostics``): memory/cache gain and loss by segment index."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq import metrics

from rmt_plugin import diagnostics
from rmt_plugin.criterion import RMTLMCriterion
from rmt_plugin.diagnostics import bucket_label, diagnose_batch, summarize
from rmt_plugin.model import RMTConfig, RMTLanguageModel, RMTState
from conftest import SEG_LEN, make_model, make_stream_task, make_task, run_cli, write_corpus


def test_bucket_labels_are_log_spaced():
    assert [bucket_label(i) for i in (0, 1, 2, 3, 4, 7, 8, 15, 16, 100)] == [
        "0", "1", "2-3", "2-3", "4-7", "4-7", "8-15", "8-15", "16-31", "64-127"]


def test_summary_of_the_docstring_example():
    counts = {"diag_ntokens@0": 1, "diag_carried@0": 3.0, "diag_memory_reset@0": 3.0,
              "diag_ntokens@1": 1, "diag_carried@1": 2.0, "diag_memory_reset@1": 2.6}
    summary = summarize(counts)
    assert summary["memory_gain"] == pytest.approx(0.3 / math.log(2))
    assert "cache_gain" not in summary
    assert summary["loss_by_segment"] == pytest.approx({"0": 3.0 / math.log(2), "1": 2.0 / math.log(2)})


def nll_sum(model, tokens, target, state):
    lprobs = model.get_normalized_probs(model(tokens, state=state), log_probs=True)
    return -lprobs.gather(-1, target.unsqueeze(-1)).sum().item()


def test_adaptive_softmax_nll_without_the_vocabulary_table_equals_fairseqs():
    task = make_task()  # 40 symbols: a head of 10 and two clusters
    torch.manual_seed(3)
    cfg = RMTConfig(n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, num_mem_tokens=2,
                    adaptive_softmax_cutoff="10,25", div_val=2.0)
    model = RMTLanguageModel.build_model(cfg, task).eval()
    tokens = torch.randint(4, 40, (3, 8))
    target = torch.tensor([[2, 9, 10, 24, 25, 39, 5, 30]] * 3)  # every cluster and its edges
    with torch.no_grad():
        output = model(tokens)
        table = model.get_normalized_probs(output, log_probs=True, sample={"target": target})
        expected = -table.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(diagnostics.token_nll(model, output, target), expected, atol=1e-5)
        assert torch.allclose(diagnostics.token_nll(model.decoder, output, target), expected, atol=1e-5)


@pytest.mark.parametrize("num_mem_tokens, mem_len", [(2, 0), (0, 3), (2, 3)])
def test_reset_scores_equal_runs_written_out_by_hand(num_mem_tokens, mem_len):
    task = make_task()
    model = make_model(task, num_mem_tokens=num_mem_tokens, mem_len=mem_len, seed=3)
    torch.manual_seed(0)
    tokens = torch.randint(4, 40, (2, 3 * SEG_LEN))
    target = torch.randint(4, 40, (2, 3 * SEG_LEN))
    with torch.no_grad():
        start = model(torch.randint(4, 40, (2, SEG_LEN)))[1]["state"]  # a stream already under way
        sample = {"net_input": {"src_tokens": tokens}, "target": target, "stream": {"index": 1}}
        counts = diagnose_batch(model, sample, start, SEG_LEN, segments_per_sample=3)

        state, expected = start, {}
        for j in range(3):
            seg = slice(j * SEG_LEN, (j + 1) * SEG_LEN)
            label = bucket_label(3 + j)  # batch 1 of 3-segment batches starts at segment 3
            add = lambda key, value: expected.__setitem__(key, expected.get(key, 0) + value)  # noqa: E731
            add(f"diag_carried@{label}", nll_sum(model, tokens[:, seg], target[:, seg], state))
            if num_mem_tokens:
                add(f"diag_memory_reset@{label}",
                    nll_sum(model, tokens[:, seg], target[:, seg], RMTState(None, state.cache)))
                other_rows = state.memory[[1, 0]]  # row 0 gets row 1's memory and back
                add(f"diag_memory_swap@{label}",
                    nll_sum(model, tokens[:, seg], target[:, seg], RMTState(other_rows, state.cache)))
            if mem_len:
                add(f"diag_cache_reset@{label}",
                    nll_sum(model, tokens[:, seg], target[:, seg], RMTState(state.memory, None)))
                other_rows = [c[[1, 0]] for c in state.cache]
                add(f"diag_cache_swap@{label}",
                    nll_sum(model, tokens[:, seg], target[:, seg], RMTState(state.memory, other_rows)))
            add(f"diag_ntokens@{label}", 2 * SEG_LEN)
            state = model(tokens[:, seg], state=state)[1]["state"]
    assert counts.keys() == expected.keys()
    for key in expected:
        assert counts[key] == pytest.approx(expected[key], rel=1e-5), key
    summary = summarize(counts)
    assert ("memory_gain" in summary) == bool(num_mem_tokens)
    assert ("cache_gain" in summary) == bool(mem_len)
    assert ("memory_swap_gain" in summary) == bool(num_mem_tokens)
    assert ("cache_swap_gain" in summary) == bool(mem_len)
    for gain in ("memory_gain", "cache_gain", "memory_swap_gain", "cache_swap_gain"):
        if gain in summary:
            assert summary[gain] != 0  # a random model's state still changes its predictions


def test_a_memory_without_content_has_a_reset_gain_but_no_swap_gain():
    """MemTr's memory cannot see its segment, so every stream carries the same memory: resetting
    it changes the predictions, swapping it with another stream's does not."""
    task = make_task()
    model = make_model(task, num_mem_tokens=2, layout="memtr", seed=3)
    tokens = torch.randint(4, 40, (3, 4 * SEG_LEN))
    sample = {"net_input": {"src_tokens": tokens}, "target": tokens.roll(-1, 1), "stream": {"index": 0}}
    summary = summarize(diagnose_batch(model, sample, None, SEG_LEN, segments_per_sample=4))
    assert abs(summary["memory_gain"]) > 1e-5  # an untrained model: small, but not zero
    assert summary["memory_swap_gain"] == pytest.approx(0, abs=1e-12)


def test_one_stream_has_no_other_stream_to_swap_with():
    task = make_task()
    model = make_model(task, num_mem_tokens=2, mem_len=3)
    tokens = torch.randint(4, 40, (1, 2 * SEG_LEN))
    sample = {"net_input": {"src_tokens": tokens}, "target": tokens, "stream": {"index": 0}}
    summary = summarize(diagnose_batch(model, sample, None, SEG_LEN, segments_per_sample=2))
    assert "memory_gain" in summary and "cache_gain" in summary
    assert "memory_swap_gain" not in summary and "cache_swap_gain" not in summary


def test_a_fresh_stream_counts_with_zero_gain():
    task = make_task()
    model = make_model(task, num_mem_tokens=2, mem_len=3)
    tokens = torch.randint(4, 40, (2, SEG_LEN))
    sample = {"net_input": {"src_tokens": tokens}, "target": tokens, "stream": {"index": 0}}
    summary = summarize(diagnose_batch(model, sample, None, SEG_LEN, segments_per_sample=1))
    assert summary["memory_gain"] == 0 and summary["cache_gain"] == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_validation_logs_diagnostics_only_when_asked(data, enabled):  # noqa: F811
    task = make_stream_task(data[0], tokens_per_sample=SEG_LEN, segments_per_sample=2, splits=("valid",))
    task.cfg.memory_diagnostics = enabled
    model = make_model(task, num_mem_tokens=2, mem_len=3)
    criterion = RMTLMCriterion(task, bptt_mode="chunk", bptt_depth=1)
    itr = task.get_batch_iterator(task.dataset("valid"), max_sentences=2)
    with metrics.aggregate() as agg:
        logs = [task.valid_step(sample, model, criterion)[2] for sample in itr.next_epoch_itr(shuffle=False)]
        criterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert ("memory_gain" in values and "cache_gain" in values and "loss_seg_0" in values) == enabled
    assert ("loss_seg_1" in values) == enabled
    if enabled:  # the carried loss of the diagnostics is the validation loss itself
        n = sum(log["diag_ntokens@" + label] for log in logs for label in ("0", "1", "2-3", "4-7", "8-15")
                if "diag_ntokens@" + label in log)
        assert n == sum(log["ntokens"] for log in logs)
        carried = sum(v for log in logs for k, v in log.items() if k.startswith("diag_carried@"))
        assert carried == pytest.approx(sum(log["loss"].item() for log in logs), rel=1e-5)


def test_train_and_eval_lm_report_diagnostics_through_the_cli(tmp_path):
    for split, n_lines, seed in [("train", 200, 0), ("valid", 20, 1), ("test", 21, 2)]:
        write_corpus(tmp_path / f"{split}.txt", n_lines, seed)
    run_cli("fairseq_cli.preprocess", "--only-source", "--trainpref", "train.txt", "--validpref", "valid.txt",
            "--testpref", "test.txt", "--destdir", "bin", "--workers", "1", cwd=tmp_path)
    train_log = run_cli("fairseq_cli.train", "bin", "--user-dir", "rmt_plugin", "--task", "rmt_lm",
                        "--arch", "rmt_xl_tiny", "--criterion", "rmt_lm", "--num-mem-tokens", 2, "--mem-len", 8,
                        "--segments-per-sample", 2, "--tokens-per-sample", 8, "--batch-size", 4,
                        "--max-update", 10, "--optimizer", "adam", "--lr", 1e-3, "--memory-diagnostics",
                        "--save-dir", "ckpt", "--no-epoch-checkpoints", "--cpu", "--num-workers", 0,
                        "--log-format", "json", "--seed", 1, cwd=tmp_path)
    valid = [json.loads(line[line.index("{"):]) for line in train_log.splitlines() if '"valid_loss"' in line]
    assert valid and all(k in valid[-1] for k in ("valid_memory_gain", "valid_cache_gain", "valid_loss_seg_0"))

    out = run_cli("fairseq_cli.eval_lm", "bin", "--user-dir", "rmt_plugin", "--task", "rmt_lm",
                  "--path", "ckpt/checkpoint_last.pt", "--gen-subset", "test", "--batch-size", 2,
                  "--tokens-per-sample", 8, "--cpu", "--memory-diagnostics",
                  "--memory-diagnostics-file", "diag.json", cwd=tmp_path)
    assert "memory diagnostics on test" in out
    report = json.loads((tmp_path / "diag.json").read_text())
    eval_loss = float(re.search(r"Loss \(base 2\): ([\d.]+)", out).group(1))
    assert report["loss"] == pytest.approx(eval_loss, abs=1e-4)  # two independent scorings agree
    assert report["ntokens"] == int(re.search(r"Evaluated ([\d,]+) tokens", out).group(1).replace(",", ""))
    assert set(report["loss_by_position"]) == {"carried", "memory_reset", "cache_reset", "memory_swap", "cache_swap"}
    assert len(report["loss_by_position"]["carried"]) == 8
    assert report["loss_by_segment"]["0"] > 0 and "memory_gain" in report and "cache_gain" in report


def test_reduce_metrics_is_silent_without_diagnostics():
    with metrics.aggregate() as agg:
        diagnostics.reduce_metrics([{"loss": 1.0}])
    assert agg.get_smoothed_values() == {}


def test_plot_script_draws_reports_and_rejects_other_files(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_memory_diagnostics.py"
    report = {"loss": 2.0, "ntokens": 8, "memory_gain": 0.1, "memory_swap_gain": 0.05, "cache_gain": 0.2,
              "cache_swap_gain": 0.3, "loss_by_segment": {"0": 2.2, "1": 1.9},
              "loss_by_position": {"carried": [2.5, 1.8], "memory_reset": [2.9, 1.9], "memory_swap": [2.6, 1.8],
                                   "cache_reset": [3.0, 2.0], "cache_swap": [3.1, 2.1]}}
    (tmp_path / "rmt.json").write_text(json.dumps(report))
    (tmp_path / "base.json").write_text(json.dumps(dict(report, loss_by_position={"carried": [2.6, 1.9]})))
    (tmp_path / "other.json").write_text(json.dumps({"loss": 1.0}))
    out = tmp_path / "diag.png"
    done = subprocess.run([sys.executable, str(script), f"{tmp_path / 'rmt.json'}:RMT", str(tmp_path / "base.json"),
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "other.json"), "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "is not a --memory-diagnostics-file report" in bad.stderr.strip().splitlines()[-1]
