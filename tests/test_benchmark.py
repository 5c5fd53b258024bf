"""scripts/benchmark.py: a tiny smoke run in the default suite (the real run is docs/performance.md's)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from rmt_plugin.measure import flop_counter

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_prints_the_side_by_side_table(tiny_data_bin, tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--data", str(tiny_data_bin), "--size", "tiny",
         "--repeats", "1", "--train-steps", "1", "--eval-batches", "1", "--batch-size", "2",
         "--segments-per-sample", "2", "--tokens-per-sample", "8", "--num-mem-tokens", "2",
         "--models", "transformer_lm", "rmt_chunk", "rmt_prefix", "--no-sweep", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    blocks = [block for block in table.split("\n\n") if block.startswith("| |")]
    rows, work = (table_rows(block) for block in blocks[:2])  # speed and memory; counted work
    assert rows["| fairseq transformer_lm"][1] == "1.00"
    rmt = rows["| ours, RMT m, chunk, depth 1"]
    assert float(rmt[0]) > 0 and float(rmt[2]) > 0  # train and eval-lm tokens/s
    prefix = rows["| ours, RMT m, prefix, depth 3"]  # its second warm-up step re-runs a carried prefix
    saved = {name: float(row[-1].rstrip(" |")) for name, row in (("chunk", rmt), ("prefix", prefix))}
    assert float(prefix[0]) > 0 and saved["prefix"] > saved["chunk"] > 0, saved  # K+k segments' activations
    assert "| RMT / transformer_lm eval-lm cost per token |" in table
    for name, row in work.items():  # GFLOP per token: a training step is a forward and a backward
        train_gflop, eval_gflop = float(row[0]), float(row[3])
        assert train_gflop > 2 * eval_gflop > 0, (name, row)
        # MFU: the counted rate over the measured matrix-product rate (rates printed to 0.1 GFLOP/s,
        # MFU to 0.1%)
        peak = float(table.split("matrix-product rate measured: ")[1].split(" GFLOP/s")[0])
        for rate, mfu in ((row[1], row[2]), (row[4], row[5].rstrip(" |"))):
            lowest, highest = (100 * (float(rate) + d) / peak for d in (-0.05, 0.05))
            assert lowest - 0.05 <= float(mfu.rstrip("%")) <= highest + 0.05, (name, row, peak)
            assert float(mfu.rstrip("%")) < 100, (name, row, peak)  # the ceiling is a peak
    assert float(work["| ours, RMT m, prefix, depth 3"][0]) > float(work["| ours, RMT m, chunk, depth 1"][0])


def test_benchmark_names_the_models_that_failed_and_exits_1(tiny_data_bin, tmp_path):
    # a data-bin without its valid split: every model fails, and the table says so for each
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data_bin, data, ignore=shutil.ignore_patterns("valid.*"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--data", str(data), "--size", "tiny",
         "--repeats", "2", "--batch-size", "2", "--segments-per-sample", "2", "--tokens-per-sample", "8",
         "--models", "transformer_lm", "rmt_chunk", "--no-sweep"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = proc.stdout.split("Failed:\n")[1].splitlines()
    assert [line.split(":")[0] for line in failed] == ["- fairseq transformer_lm", "- ours, RMT m, chunk, depth 1"]
    assert proc.stderr.count("--worker transformer_lm failed") == 1  # not retried in the second repeat


def test_benchmark_bf16_needs_a_gpu(tiny_data_bin):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--data", str(tiny_data_bin),
                           "--bf16"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--bf16 needs --device cuda" in proc.stderr.splitlines()[-1]


def test_benchmark_profiles_a_training_step(tiny_data_bin):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--data", str(tiny_data_bin), "--size", "tiny",
         "--batch-size", "2", "--segments-per-sample", "2", "--tokens-per-sample", "8",
         "--models", "transformer_xl", "--profile"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### ours, Transformer-XL, mem T: one training step of 32 tokens" in proc.stdout  # 2 rows x 2 x 8
    assert "aten::mm" in proc.stdout and "Self CPU time total" in proc.stdout
    total, table = proc.stdout.split("Matrix products: ")[1].split("\n\n")[:2]
    rows = [line.strip("| ").split(" | ") for line in table.splitlines()[2:]]
    assert 0 < len(rows) <= 12 and {row[0] for row in rows} <= {"aten::mm", "aten::addmm", "aten::bmm"}
    # the rows shown are part of the total (each printed to 0.1 ms)
    assert sum(float(row[3]) for row in rows) <= float(total.split(" ms")[0]) + 0.05 * (len(rows) + 1)
    for op, operands, calls, ms, rate in rows:  # the rate is 2·(rows·inner·columns) per call over the time
        a, b = (json.loads(shape) for shape in operands.split(" × "))
        gflop = 2 * math.prod(a) * b[-1] * int(calls) / 1e9
        ms, rate = float(ms), float(rate)  # both printed to 0.1
        slowest, fastest = gflop / ((ms + 0.05) / 1e3), gflop / (max(ms - 0.05, 1e-9) / 1e3)
        assert slowest - 0.05 <= rate <= fastest + 0.05, (op, operands, calls, ms, rate)


def table_rows(block):
    """A markdown table's body: first cell -> the other cells."""
    return {line.split(" | ")[0]: line.split(" | ")[1:] for line in block.splitlines()[2:]}


def test_flop_counter_counts_the_cpu_fused_attention():
    # torch has no FLOP formula for SDPA's CPU flash kernel (evaluation, and training without a
    # mask gradient): rmt_plugin.measure.flop_counter adds torch's own SDPA formulas for it
    q, k, v = torch.ones(1, 2, 8, 4), torch.ones(1, 2, 12, 4), torch.ones(1, 2, 12, 4)
    with torch.no_grad(), flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(8, 12))
    assert counter.get_total_flops() == 2 * (2 * 2 * 8 * 12 * 4)  # scores and weighted values


def test_memory_task_benchmark_trains_every_model_and_tabulates_them(tmp_path):
    # scripts/bench_memory_tasks.py at 2 updates: every model's command runs, the curriculum
    # column is filled, and the test split is the task's (copy 24 -> 48 over 9 segments)
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_memory_tasks.py"), "--setups", "copy-9",
         "--models", "RMT", "Transformer-XL", "MemTr", "no memory", "--max-update", "2", "--batch-size", "4",
         "--epoch-updates", "1", "--valid-size", "8", "--test-size", "8", "--jobs", "2", "--threads", "1",
         "--workdir", str(tmp_path), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| copy-9")]
    assert [row[3] for row in rows] == ["RMT", "Transformer-XL", "MemTr", "no memory"]
    assert {row[2] for row in rows} == {"9 (8)"} and {row[5] for row in rows} <= {"4", "8"}
    assert all(0 <= float(row[6]) <= 1 for row in rows)
    logs = {row[3]: (tmp_path / f"copy-9-{row[3].replace(' ', '_')}.log").read_text() for row in rows}
    assert "'memory_layout': memtr" in logs["MemTr"] and "'mem_len': 8" in logs["Transformer-XL"]
