#!/usr/bin/env python
"""RMT vs Transformer-XL vs no memory on the copy and reverse memory tasks (CPU benchmark).

Each model is the paper's small size (``rmt_small``: 4 layers, 4 heads, d_model 128, d_inner
512) trained by ``fairseq-train --task rmt_memory`` with the same budget (updates x batch size)
and hyper-parameters; only the memory differs:

    RMT             --num-mem-tokens M (M <= T)  --mem-len 0   full BPTT over the segments
    Transformer-XL  --num-mem-tokens 0           --mem-len T
    no memory       --num-mem-tokens 0           --mem-len 0

Every run validates once, at the end, on the valid and test splits; the script prints a markdown
table of test exact match (whole target right) and per-token accuracy and writes it to --out.
Logs go to --workdir. Example (the command behind docs/memory_tasks.md):

    .venv/bin/python scripts/bench_memory_tasks.py --out /tmp/rmt_bench_memory_tasks/table.md
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FAIRSEQ_TRAIN = str(Path(sys.executable).with_name("fairseq-train"))
MODELS = ("RMT", "Transformer-XL", "no memory")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["copy", "reverse"], choices=["copy", "reverse"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--source-len", type=int, default=16, help="source tokens (copy and reverse)")
    parser.add_argument("--copy-repeats", type=int, default=1, help="times copy writes the source out")
    parser.add_argument("--tokens-per-sample", type=int, default=8, help="segment length T")
    parser.add_argument("--num-mem-tokens", type=int, default=8, help="RMT memory size M (<= T)")
    parser.add_argument("--max-update", type=int, default=1200, help="updates per model (the budget)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--init-std", type=float, default=0.1,
                        help="weight init std (0.02 leaves memory models on a long plateau)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: cores / jobs; more threads than free "
                             "cores can slow torch down badly)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rmt_bench_memory_tasks"))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    if args.num_mem_tokens > args.tokens_per_sample:
        parser.error(f"--num-mem-tokens {args.num_mem_tokens} is larger than the segment "
                     f"(--tokens-per-sample {args.tokens_per_sample})")
    return args


def target_len(args, task):
    return args.source_len * (args.copy_repeats if task == "copy" else 1)


def num_segments(args, task):
    return math.ceil((args.source_len + target_len(args, task)) / args.tokens_per_sample)


def memory_flags(args, model, segments):
    if model == "RMT":
        return ["--num-mem-tokens", str(args.num_mem_tokens), "--mem-len", "0", "--bptt-depth", str(segments - 1)]
    mem_len = args.tokens_per_sample if model == "Transformer-XL" else 0
    return ["--num-mem-tokens", "0", "--mem-len", str(mem_len), "--bptt-depth", "0"]


def command(args, task, model):
    segments = num_segments(args, task)
    return [
        FAIRSEQ_TRAIN, "--user-dir", "rmt_plugin", "--task", "rmt_memory", "--memory-task", task,
        "--source-len", str(args.source_len), "--copy-repeats", str(args.copy_repeats),
        "--tokens-per-sample", str(args.tokens_per_sample),
        "--arch", "rmt_small", "--pre-lnorm", "--dropout", "0", "--init-std", str(args.init_std),
        *memory_flags(args, model, segments),
        "--criterion", "rmt_lm", "--optimizer", "adam", "--lr", str(args.lr),
        "--batch-size", str(args.batch_size), "--max-update", str(args.max_update),
        # validate once, when --max-update stops training
        "--validate-interval", "1000000", "--valid-subset", "valid,test",
        "--seed", str(args.seed), "--num-workers", "0", "--cpu", "--no-save",
        "--log-format", "json", "--log-interval", "50",
    ]


def final_stats(log_text, subset):
    """The last stats line fairseq logged for ``subset`` (keys without the subset prefix)."""
    lines = [line for line in log_text.splitlines() if f"| {subset} | {{" in line]
    if not lines:
        return None
    stats = json.loads(lines[-1][lines[-1].index("{"):])
    return {key[len(subset) + 1:]: float(value) for key, value in stats.items()}


def run(args, task, model, threads):
    name = f"{task}-{model.replace(' ', '_')}"
    log_path = args.workdir / f"{name}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.run(command(args, task, model), cwd=args.workdir, stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
    minutes = (time.time() - start) / 60
    test = final_stats(log_path.read_text(), "test")
    if process.returncode != 0 or test is None:
        raise RuntimeError(f"{name} failed (exit {process.returncode}); see {log_path}")
    print(f"{name}: test exact match {test['exact_match']:.3f} in {minutes:.1f} min", flush=True)
    return dict(task=task, model=model, minutes=minutes, **test)


def table(args, results, threads):
    rows = [
        "| task | segments (T) | model | memory | test exact match | test token accuracy | wall (min) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    memory = {"RMT": f"{args.num_mem_tokens} tokens", "Transformer-XL": f"cache {args.tokens_per_sample}",
              "no memory": "none"}
    for r in results:
        task = f"{r['task']} {args.source_len} -> {target_len(args, r['task'])}"
        rows.append(f"| {task} | {num_segments(args, r['task'])} ({args.tokens_per_sample}) | {r['model']} | "
                    f"{memory[r['model']]} | {r['exact_match']:.3f} | {r['accuracy']:.3f} | {r['minutes']:.1f} |")
    budget = (f"\nBudget per model: {args.max_update} updates x batch {args.batch_size}, adam lr {args.lr}, "
              f"init std {args.init_std}, seed {args.seed}; {args.jobs} run(s) at a time, "
              f"{threads} thread(s) each, on {os.cpu_count()} CPU cores.")
    return "\n".join(rows) + "\n" + budget + "\n"


def main():
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    runs = [(task, model) for task in args.tasks for model in args.models]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda tm: run(args, *tm, threads), runs))
    text = table(args, results, threads)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
