#!/usr/bin/env python
"""RMT vs Transformer-XL vs MemTr vs no memory on the memory tasks (CPU benchmark).

Each model is the paper's small size (``rmt_small``: 4 layers, 4 heads, d_model 128, d_inner
512) trained by ``fairseq-train --task rmt_memory`` with the same budget (updates x batch size)
and hyper-parameters; only the memory differs (m memory tokens, T the segment length):

    RMT             --num-mem-tokens m  --mem-len 0   full BPTT over the example's segments
    Transformer-XL  --num-mem-tokens 0  --mem-len m   a cache as large as RMT's memory
    MemTr           --num-mem-tokens m  --mem-len 0   --memory-layout memtr (memory cannot see the segment)
    no memory       --num-mem-tokens 0  --mem-len 0

A setup is one task at one size (``SETUPS``): the 4-segment copy and reverse of our first table,
and the paper's sizes (copy 24 -> 48 over 9 segments, reverse 24 -> 24 over 6, associative
retrieval of 4 pairs over 4 and 5 segments, long copy with T = 120 and m = 60). Setups with a
curriculum train through ``--curriculum-source-len`` (the same for every model), validating every
``--epoch-updates`` updates; the test split is always at the last length. Every run ends with a
validation on the valid and test splits; the script prints a markdown table of test exact match
(whole target right), per-token accuracy and the source length training reached, and writes it
to --out. Logs go to --workdir. Examples (the commands behind docs/memory_tasks.md):

    .venv/bin/python scripts/bench_memory_tasks.py --out /tmp/rmt_bench_memory_tasks/table.md
    .venv/bin/python scripts/bench_memory_tasks.py --setups copy-9 reverse-6 ar-4 ar-5 \\
        --models RMT Transformer-XL MemTr "no memory" --valid-size 500 --test-size 1000 \\
        --workdir /tmp/rmt_paper_tasks --out /tmp/rmt_paper_tasks/table.md
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
MODELS = ("RMT", "Transformer-XL", "MemTr", "no memory")

# task: the --memory-task; T: --tokens-per-sample; m: RMT's and MemTr's memory tokens; source_len
# (or a curriculum of them), copy_repeats, num_pairs: the task's size; batch, updates: the budget.
SETUPS = {
    "copy-4": dict(task="copy", source_len=16, copy_repeats=1, T=8, m=8, batch=64, updates=1200),
    "reverse-4": dict(task="reverse", source_len=16, T=8, m=8, batch=64, updates=1200),
    "copy-9": dict(task="copy", source_len=24, copy_repeats=2, T=8, m=8, curriculum="4,8,16,24",
                   batch=32, updates=3000),
    "reverse-6": dict(task="reverse", source_len=24, T=8, m=8, curriculum="4,8,16,24", batch=32, updates=3000),
    "ar-4": dict(task="associative_retrieval", num_pairs=4, T=3, m=8, batch=32, updates=3000),
    "ar-5": dict(task="associative_retrieval", num_pairs=4, T=2, m=8, batch=32, updates=3000),
    "long-copy": dict(task="copy", source_len=360, copy_repeats=1, T=120, m=60, curriculum="60,120,240,360",
                      batch=16, updates=600),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", default=["copy-4", "reverse-4"], choices=SETUPS)
    parser.add_argument("--models", nargs="+", default=["RMT", "Transformer-XL", "no memory"], choices=MODELS)
    parser.add_argument("--max-update", type=int, default=None, help="updates per model (default: the setup's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the setup's")
    parser.add_argument("--curriculum", default=None,
                        help="source lengths to train through, replacing the setups' (e.g. 4,8,12,16,20,24)")
    parser.add_argument("--epoch-updates", type=int, default=250,
                        help="curriculum setups: updates per epoch (a validation after each)")
    parser.add_argument("--train-size", type=int, default=100000, help="setups without a curriculum: training examples")
    parser.add_argument("--valid-size", type=int, default=1000, help="validation examples")
    parser.add_argument("--test-size", type=int, default=10000, help="test examples")
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
    return parser.parse_args()


def with_overrides(args, setup):
    """The setup with --curriculum applied (setups without a curriculum keep none)."""
    if args.curriculum and "curriculum" in setup:
        return dict(setup, curriculum=args.curriculum)
    return setup


def budget(args, setup):
    return (args.max_update or setup["updates"]), (args.batch_size or setup["batch"])


def final_length(setup):
    return int(setup["curriculum"].split(",")[-1]) if "curriculum" in setup else setup.get("source_len")


def describe(setup):
    """E.g. ``copy 24 -> 48`` or ``associative_retrieval 4 pairs``."""
    if setup["task"] == "associative_retrieval":
        return f"associative retrieval, {setup['num_pairs']} pairs"
    source = final_length(setup)
    target = source * setup.get("copy_repeats", 1) if setup["task"] == "copy" else source
    return f"{setup['task']} {source} -> {target}"


def num_segments(setup):
    if setup["task"] == "associative_retrieval":
        tokens = 2 * setup["num_pairs"] + 2  # pairs, the query key, its value
    else:
        source = final_length(setup)
        tokens = source + (source * setup.get("copy_repeats", 1) if setup["task"] == "copy" else source)
    return math.ceil(tokens / setup["T"])


def task_flags(args, setup):
    updates, batch = budget(args, setup)
    flags = ["--memory-task", setup["task"], "--tokens-per-sample", str(setup["T"]),
             "--valid-size", str(args.valid_size), "--test-size", str(args.test_size)]
    for key in ("copy_repeats", "num_pairs"):
        if key in setup:
            flags += [f"--{key.replace('_', '-')}", str(setup[key])]
    if "curriculum" in setup:
        return flags + ["--curriculum-source-len", setup["curriculum"], "--train-size", str(args.epoch_updates * batch)]
    if "source_len" in setup:
        flags += ["--source-len", str(setup["source_len"])]
    # validate once, when --max-update stops training
    return flags + ["--train-size", str(args.train_size), "--validate-interval", "1000000"]


def memory_flags(setup, model):
    m = setup["m"]
    if model == "RMT":
        return ["--num-mem-tokens", str(m), "--mem-len", "0", "--bptt-depth", str(num_segments(setup) - 1)]
    if model == "MemTr":
        return ["--num-mem-tokens", str(m), "--mem-len", "0", "--memory-layout", "memtr", "--bptt-depth", "0"]
    mem_len = m if model == "Transformer-XL" else 0
    return ["--num-mem-tokens", "0", "--mem-len", str(mem_len), "--bptt-depth", "0"]


def command(args, setup, model):
    updates, batch = budget(args, setup)
    return [
        FAIRSEQ_TRAIN, "--user-dir", "rmt_plugin", "--task", "rmt_memory", *task_flags(args, setup),
        "--arch", "rmt_small", "--pre-lnorm", "--dropout", "0", "--init-std", str(args.init_std),
        *memory_flags(setup, model),
        "--criterion", "rmt_lm", "--optimizer", "adam", "--lr", str(args.lr),
        "--batch-size", str(batch), "--max-update", str(updates), "--valid-subset", "valid,test",
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


def run(args, name, model, threads):
    setup = with_overrides(args, SETUPS[name])
    log_path = args.workdir / f"{name}-{model.replace(' ', '_')}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.run(command(args, setup, model), cwd=args.workdir, stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
    minutes = (time.time() - start) / 60
    text = log_path.read_text()
    test, valid = final_stats(text, "test"), final_stats(text, "valid")
    if process.returncode != 0 or test is None:
        raise RuntimeError(f"{name} {model} failed (exit {process.returncode}); see {log_path}")
    reached = valid.get("curriculum_source_len") if "curriculum" in setup else None
    print(f"{name} {model}: test exact match {test['exact_match']:.3f} in {minutes:.1f} min", flush=True)
    return dict(setup=name, model=model, minutes=minutes, reached=reached, **test)


def table(args, results, threads):
    rows = [
        "| setup | task | segments (T) | model | memory | trained up to source | test exact match "
        "| test token accuracy | wall (min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        setup = with_overrides(args, SETUPS[r["setup"]])
        memory = {"RMT": f"{setup['m']} tokens", "MemTr": f"{setup['m']} tokens",
                  "Transformer-XL": f"cache {setup['m']}", "no memory": "none"}[r["model"]]
        reached = f"{r['reached']:.0f}" if r["reached"] is not None else "-"
        rows.append(f"| {r['setup']} | {describe(setup)} | {num_segments(setup)} ({setup['T']}) | {r['model']} | "
                    f"{memory} | {reached} | {r['exact_match']:.3f} | {r['accuracy']:.3f} | {r['minutes']:.1f} |")
    budgets = "; ".join("{}: {} updates x batch {}".format(name, *budget(args, SETUPS[name])) for name in args.setups)
    curricula = "; ".join(f"{name}: {with_overrides(args, SETUPS[name])['curriculum']}" for name in args.setups
                          if "curriculum" in SETUPS[name])
    footer = (f"\nBudget per model: {budgets}; curriculum (source lengths) {curricula or 'none'}; adam lr {args.lr}, init std {args.init_std}, seed {args.seed}; "
              f"curriculum epochs of {args.epoch_updates} updates, valid {args.valid_size}, test {args.test_size} "
              f"examples; {args.jobs} run(s) at a time, {threads} thread(s) each, on {os.cpu_count()} CPU cores.")
    return "\n".join(rows) + "\n" + footer + "\n"


def main():
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    # model by model, so that the first models' results come first; the table is setup by setup
    runs = [(name, model) for model in args.models for name in args.setups]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda run_args: run(args, *run_args, threads), runs))
    results.sort(key=lambda r: (args.setups.index(r["setup"]), args.models.index(r["model"])))
    text = table(args, results, threads)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
