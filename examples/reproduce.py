#!/usr/bin/env python3
"""Score a recipe row's checkpoint with that row's evaluations and print ours beside the paper's.

    python examples/reproduce.py enwik8 rmt_m20_bptt2 --path checkpoints/enwik8/rmt_m20_bptt2/checkpoint_best.pt
    python examples/reproduce.py wikitext103 transformer_xl_mem150 --data data-bin/wikitext-103 \\
        --path ckpt.pt -- --cpu

Every evaluation the row's script runs (examples/<dataset>/recipes.yaml: the paper's setting and,
where published, Dai et al.'s or fairseq truncated_bptt's) is run here the same way, with
fairseq-eval-lm on the test split, and its result printed beside the published number: bits per
character on enwik8 (eval-lm's "Loss (base 2)"), perplexity on WikiText-103 (2 to that loss,
unrounded). Arguments after ``--`` go to every fairseq-eval-lm. Exits 1 if an evaluation fails.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_recipes import DATASETS, eval_words, load_table, recipes  # noqa: E402

RESULT = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("row", help="a row of examples/<dataset>/recipes.yaml, e.g. rmt_m20_bptt2")
    p.add_argument("--path", required=True, help="the row's checkpoint (checkpoint_best.pt)")
    p.add_argument("--data", help="the data-bin (default: the recipes' data-bin/<dataset>)")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    args.eval_args = extra
    rows = recipes(args.dataset)
    if args.row not in rows:
        p.error(f"{args.row!r} is no row of examples/{args.dataset}/recipes.yaml; rows: {', '.join(rows)}")
    if not Path(args.path).is_file():
        p.error(f"--path {args.path}: no such checkpoint")
    return args


def evaluate(data, path, eval_args, extra):
    """fairseq-eval-lm as the row's script runs it; returns its loss in bits per token."""
    cmd = [sys.executable, "-m", "fairseq_cli.eval_lm", data, "--path", path, "--user-dir", "rmt_plugin",
           "--task", "rmt_lm", *eval_words(eval_args), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = RESULT.findall(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        sys.stderr.write((proc.stdout + proc.stderr)[-3000:])
        raise SystemExit(f"error: fairseq-eval-lm failed ({' '.join(cmd[3:])})")
    return float(found[-1][0])


def main(argv=None):
    args = parse_args(argv)
    table = load_table(args.dataset)
    row = recipes(args.dataset)[args.row]
    data = args.data or table["data"]
    per_word = args.dataset == "wikitext103"  # perplexity; enwik8: bits per character
    lines = [f"{table['title']}, {row['title']} ({args.path})", "",
             "| evaluation | setting | published | ours |", "|---|---|---|---|"]
    for name, spec in row["evals"].items():
        loss = evaluate(data, args.path, spec["args"], args.eval_args)
        ours = f"{2 ** loss:.2f}" if per_word else f"{loss:.3f}"
        published = row["paper"] if name == "paper" else spec["paper"]
        title = "the paper" if name == "paper" else spec["title"]
        setting = " ".join(eval_words(spec["args"])[2:])
        lines.append(f"| {title} | `{setting}` | {published} | {ours} |")
    print("\n".join(lines))
    print(f"\n{table['metric']}; ours from fairseq-eval-lm on the test split of {data}.")


if __name__ == "__main__":
    main()
