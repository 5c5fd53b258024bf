"""What a user gets from the named tiny architectures with no memory or BPTT flags: the plain
``fairseq-train ... --task rmt_lm --arch rmt_tiny --criterion rmt_lm`` command (only the segment
length, batch, optimiser and budget given), against the same command for no memory and for
Transformer-XL, on the embedded corpus at the byte level.

    python scripts/defaults_table.py --out docs/study/defaults
    python scripts/defaults_table.py --out docs/study/defaults-before --name before \\
        --task-flags "--segments-per-sample 1 --bptt-depth 1 --bptt-mode chunk" --rmt-flags "--num-mem-tokens 4"

(the second line: the defaults before issue #21, for the before/after table). Each model is
trained with ``fairseq-train`` and its test split scored as one stream (batch 1) by
``fairseq-eval-lm --memory-diagnostics``. The table gives the loss (bits per character), RMT's share
of Transformer-XL's improvement over no memory, and the memory (cache) gain: what the loss grows by
when the memory (cache) is reset at every segment, or (``--eval-batch`` > 1) swapped for another
stream's. Finished runs
in ``--workdir`` are reused.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "data-bin/tiny-wikitext2-bytes"
MODELS = {  # name -> (label, flags): the named architectures, nothing else
    "baseline": ("no memory (rmt_tiny --num-mem-tokens 0)", "--arch rmt_tiny --num-mem-tokens 0"),
    "transformer_xl": ("Transformer-XL (transformer_xl_tiny)", "--arch transformer_xl_tiny"),
    "rmt": ("RMT (rmt_tiny)", "--arch rmt_tiny"),
}


def run(cmd, log):
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"defaults_table: {cmd[0]} failed, see {log}")


def train_and_score(args, name, seed):
    flags = MODELS[name][1].split() + args.task_flags.split() + (args.rmt_flags.split() if name == "rmt" else [])
    save = Path(args.workdir) / args.name / f"{name}-seed{seed}"
    finished = save / f"finished-{args.updates}"
    if not finished.exists():
        save.mkdir(parents=True, exist_ok=True)
        run(["fairseq-train", args.data, "--user-dir", "rmt_plugin", "--task", "rmt_lm", "--criterion", "rmt_lm",
             *flags, "--tokens-per-sample", str(args.segment), "--batch-size", str(args.batch),
             "--optimizer", "adam", "--lr", str(args.lr), "--clip-norm", "0.25", "--max-update", str(args.updates),
             "--disable-validation", "--save-dir", str(save), "--no-epoch-checkpoints", "--log-format", "simple",
             "--log-interval", "200", "--num-workers", "0", "--seed", str(seed)], save / "train.log")
        finished.touch()
    report = save / "test-diagnostics.json"
    if not report.exists():
        run(["fairseq-eval-lm", args.data, "--path", str(save / "checkpoint_last.pt"), "--user-dir", "rmt_plugin",
             "--task", "rmt_lm", "--gen-subset", "test", "--batch-size", str(args.eval_batch), "--tokens-per-sample",
             str(args.segment), "--memory-diagnostics", "--memory-diagnostics-file", str(report)], save / "eval.log")
    return json.load(open(report))


def table(args, reports):
    """reports: name -> [report per seed] -> markdown lines and a json-able summary."""
    mean = {name: sum(r["loss"] for r in rs) / len(rs) for name, rs in reports.items()}
    gain = {name: sum(r.get("memory_gain", r.get("cache_gain", 0.0)) for r in rs) / len(rs)
            for name, rs in reports.items()}
    swap = {name: sum(r.get("memory_swap_gain", r.get("cache_swap_gain", 0.0)) for r in rs) / len(rs)
            for name, rs in reports.items()}
    improvement = mean["baseline"] - mean["transformer_xl"]
    swaps = args.eval_batch > 1  # one stream has no other stream's memory to swap in
    lines = ["| model | bits/char | share of Transformer-XL's improvement | memory / cache gain: reset |"
             + (" swap |" if swaps else ""), "|---|---|---|---|" + ("---|" if swaps else "")]
    summary = {}
    for name, (label, _) in MODELS.items():
        share = (mean["baseline"] - mean[name]) / improvement if improvement > 0 else float("nan")
        summary[name] = dict(label=label, loss=mean[name], share=share, gain=gain[name], swap_gain=swap[name],
                             seeds=[r["loss"] for r in reports[name]])
        cells = [f"{mean[name]:.4f}", "" if name == "baseline" else f"{share:.0%}",
                 "" if name == "baseline" else f"{gain[name]:.3f}"]
        if swaps:
            cells.append("" if name == "baseline" else f"{swap[name]:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"{args.name}: T = {args.segment}, batch {args.batch}, Adam {args.lr}, clip 0.25, {args.updates} "
              f"updates, seeds {', '.join(map(str, args.seeds))} (mean); test split scored as {args.eval_batch} stream(s); flags "
              f"added to every model: '{args.task_flags}', to RMT only: '{args.rmt_flags}'."]
    return lines, summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="a fairseq data-bin (default: the embedded corpus at the byte level, prepared if missing)")
    parser.add_argument("--out", required=True, help="OUT.md and OUT.json are written")
    parser.add_argument("--name", default="defaults", help="the runs' name under --workdir")
    parser.add_argument("--workdir", default="checkpoints/defaults")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--segment", type=int, default=32, help="segment length T")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--updates", type=int, default=1200)
    parser.add_argument("--eval-batch", type=int, default=1,
                        help="streams the test split is scored as (the swap gains need 2 or more)")
    parser.add_argument("--task-flags", default="", help="added to every model's command")
    parser.add_argument("--rmt-flags", default="", help="added to the RMT model's command only")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.out, args.workdir = str(Path(args.out).resolve()), str(Path(args.workdir).resolve())
    args.data = str(Path(args.data).resolve()) if args.data != DEFAULT_DATA else args.data
    os.chdir(ROOT)  # the default data and the user dir are the checkout's
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.data == DEFAULT_DATA and not Path(args.data, "dict.txt").exists():
        run([sys.executable, "scripts/prepare_wikitext.py", "--input", "examples/data/tiny-wikitext2", "--level",
             "byte", "--destdir", args.data], "/dev/null")
    if not Path(args.data, "dict.txt").exists():
        sys.exit(f"defaults_table: --data {args.data} has no dict.txt (not a fairseq data-bin)")
    reports = {name: [train_and_score(args, name, seed) for seed in args.seeds] for name in MODELS}
    lines, summary = table(args, reports)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"settings": vars(args), "models": summary}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
