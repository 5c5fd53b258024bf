"""Sparse recall through random filler, learned from the plain LM loss (docs/memory_in_lm.md, 3b).

A copy stream (``python -m rmt_plugin.memory_streams write --filler random``): two symbols, a gap
of random filler symbols, ``<sep>``, the two symbols again, loss on every token. Each method is
trained with ``fairseq-train`` on the same batches (segments of T = 8, K segments per row, batch
16: the same tokens per update) and scored by ``memory_streams score`` on the test split as one
stream: exact match of the copy (chance 0.01) and token accuracy (chance 0.1).

    python scripts/sparse_recall.py --gaps 4 24 40 --seeds 1 2 3 --out docs/study/sparse-recall

A Transformer-XL of 2 layers and cache 16 (``transformer_xl_tiny``) with T = 8 reaches 2 x 16 + 8 =
40 tokens back; the copy's distance is gap + 3. Data-bins are written to ``--workdir`` if missing,
finished runs reused.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAIRSEQ_TRAIN = str(Path(sys.executable).with_name("fairseq-train"))  # this Python's, activated or not
REACH = 2 * 16 + 8  # transformer_xl_tiny's: 2 layers x cache 16 + T = 8
METHODS = {  # name -> (label, flags beyond the common ones)
    "transformer_xl": ("Transformer-XL (cache 16)", "--arch transformer_xl_tiny"),
    "rmt": ("RMT", "--arch rmt_tiny"),
    "rmt_tschedule": ("RMT, T schedule {schedule}", "--arch rmt_tiny --tokens-per-sample-schedule {schedule}"),
}


def run(cmd, log):
    with open(log, "a") as f:  # a resumed run adds to its log
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
            sys.exit(f"sparse_recall: {cmd[0]} failed, see {log}")


def data_bin(args, gap):
    gaps = f"{gap}" if args.max_gap is None else f"{gap}-{args.max_gap}"
    path = Path(args.workdir) / f"data-rcopy2-gap{gaps}"
    if not (path / "memory_stream.json").exists():
        run([sys.executable, "-m", "rmt_plugin.memory_streams", "write", "--destdir", str(path), "--source-len", "2",
             "--gap", str(gap), *([] if args.max_gap is None else ["--max-gap", str(args.max_gap)]),
             "--filler", "random", "--train-size", str(args.train_size)],
            Path(args.workdir) / f"write-gap{gaps}.log")
    return path


def run_dir(args, gap, method, seed) -> Path:
    """A run's save dir, named by everything that makes it another run."""
    tag = args.flags_name + (f"{args.schedule.replace(',', '-')}-" if method == "rmt_tschedule" else "")
    gaps = f"{gap}" if args.max_gap is None else f"{gap}-{args.max_gap}"
    return Path(args.workdir) / f"gap{gaps}-{method}-{tag}seed{seed}"


def train_and_score(args, gap, method, seed):
    data = data_bin(args, gap)
    flags = METHODS[method][1].format(schedule=args.schedule)
    save = run_dir(args, gap, method, seed)
    result = save / "test-score.json"
    finished = save / f"finished-{args.updates}"
    if not finished.exists():
        save.mkdir(parents=True, exist_ok=True)
        run([FAIRSEQ_TRAIN, str(data), "--user-dir", "rmt_plugin", "--task", "rmt_lm", "--criterion", "rmt_lm",
             *flags.split(), *(args.rmt_flags.split() if method.startswith("rmt") else []),
             *([] if "--tokens-per-sample-schedule" in flags else ["--tokens-per-sample", "8"]),
             "--segments-per-sample", str(args.segments),
             "--batch-size", "16", *args.flags.split(), "--optimizer", "adam", "--lr", str(args.lr),
             "--clip-norm", "0.25", "--max-update", str(args.updates), "--disable-validation",
             "--save-dir", str(save), "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "500",
             "--num-workers", "0", "--seed", str(seed)], save / "train.log")
        finished.touch()
    if not result.exists() or "exact_match_by_distance" not in json.loads(result.read_text()):  # or scored before it
        run([sys.executable, "-m", "rmt_plugin.memory_streams", "score", str(data), "--path",
             str(save / "checkpoint_last.pt"), "--tokens-per-sample", "8"], save / "score.log")
        score = json.loads(Path(save / "score.log").read_text().strip().splitlines()[-1])
        result.write_text(json.dumps(score) + "\n")
    return json.loads(result.read_text())


def training_curve(save_dir):
    """(updates, train loss in bits/token) from a run's simple-format log, every --log-interval updates."""
    points = re.findall(r"loss=([0-9.]+).*?num_updates=([0-9]+)", (Path(save_dir) / "train.log").read_text())
    return [int(u) for _, u in points], [float(loss) for loss, _ in points]


def plot_curves(args, path):
    """Training loss per run, one panel a gap, with the levels of a copy at chance and recalled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.gaps), figsize=(6.5 * len(args.gaps), 4), squeeze=False)
    for ax, gap in zip(axes[0], args.gaps):
        for color, method in enumerate(args.methods):  # a color a method, a line style a seed
            for style, seed in zip(("-", "--", ":", "-."), args.seeds):
                updates, losses = training_curve(run_dir(args, gap, method, seed))
                ax.plot(updates, losses, color=f"C{color}", ls=style,
                        label=f"{METHODS[method][0].format(schedule=args.schedule)}, seed {seed}")
        if args.max_gap is None:  # a fixed gap: 32 filler symbols, 10 copied ones, <sep> and eos predictable
            per_example = gap * math.log2(32) + 2 * math.log2(10)
            for copy_bits, name in ((2 * math.log2(10), "copy at chance"), (0, "copy recalled")):
                level = (per_example + copy_bits) / (gap + 6)
                ax.axhline(level, color="gray", ls="--", lw=0.8)
                ax.text(0.99, level, name, transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                        fontsize=7, color="gray")
        ax.set(title=f"distance {gap + 3}" if args.max_gap is None else f"distances {gap + 3}-{args.max_gap + 3}",
               xlabel="updates", ylabel="training loss (bits/token)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 5.0))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def distance_rows(gap, max_gap):
    """The table's distance ranges: the one distance of a fixed gap, else within and beyond reach."""
    if max_gap is None:
        return [(gap + 3, gap + 3)]
    rows = [(gap + 3, min(max_gap + 3, REACH)), (max(gap + 3, REACH + 1), max_gap + 3)]
    return [(low, high) for low, high in rows if low <= high]


def exact_match_between(result, low, high):
    """Exact match over the test examples whose distance lies in low..high."""
    counts = [(c["examples"], c["exact_match"]) for d, c in result["exact_match_by_distance"].items()
              if low <= int(d) <= high]
    return sum(n * e for n, e in counts) / sum(n for n, _ in counts)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gaps", nargs="+", type=int, default=[4, 24, 40])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--max-gap", type=int, help="each example's gap drawn from GAP .. MAX_GAP; exact match "
                        "is reported within and beyond Transformer-XL's reach")
    parser.add_argument("--segments", type=int, default=4, help="segments per batch row K")
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-size", type=int, default=20000, help="training examples")
    parser.add_argument("--flags", default="", help="added to every method's fairseq-train command")
    parser.add_argument("--schedule", default="32,16,8", help="rmt_tschedule's --tokens-per-sample-schedule")
    parser.add_argument("--rmt-flags", default="", help="added to the RMT methods' commands only")
    parser.add_argument("--workdir", default="checkpoints/sparse-recall")
    parser.add_argument("--out", help="OUT.md, OUT.json and OUT.png (training curves) are written")
    args = parser.parse_args(argv)
    flags = args.flags + args.rmt_flags
    args.flags_name = "".join(c for c in flags if c.isalnum()) + ("-" if flags else "")
    if args.lr != parser.get_default("lr"):  # runs of another learning rate are other runs
        args.flags_name += f"lr{args.lr:g}-"
    return args


def main(argv=None):
    args = parse_args(argv)
    args.workdir = str(Path(args.workdir).resolve())
    os.makedirs(args.workdir, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {(gap, method): [train_and_score(args, gap, method, seed) for seed in args.seeds]
               for gap in args.gaps for method in args.methods}
    lines = ["| distance (gap + 3) | " + " | ".join(METHODS[m][0].format(schedule=args.schedule)
                                                   for m in args.methods) + " |",
             "|---|" + "---|" * len(args.methods)]
    for gap in args.gaps:
        for low, high in distance_rows(gap, args.max_gap):
            cells = []
            for method in args.methods:
                exact = [exact_match_between(r, low, high) for r in results[gap, method]]
                accuracy = [r["accuracy"] for r in results[gap, method]]
                cells.append(f"{statistics.mean(exact):.3f} ({', '.join(f'{e:.2f}' for e in exact)}; "
                             f"acc {statistics.mean(accuracy):.2f})")
            label = f"{low}" if low == high else f"{low}-{high}"
            lines.append(f"| {label}{' (beyond)' if low > REACH else ''} | " + " | ".join(cells) + " |")
    lines += ["", f"exact match, mean (per seed {', '.join(map(str, args.seeds))}; token accuracy); {args.updates} "
              f"updates of 16 x {args.segments} x 8 tokens (RMT's schedules may change K and T), Adam {args.lr}; flags: '{args.flags}', RMT only: '{args.rmt_flags}'."]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
        Path(args.out + ".json").write_text(json.dumps(
            {"settings": {k: v for k, v in vars(args).items() if k != "flags_name"},
             "results": {f"gap{g}-{m}": r for (g, m), r in results.items()}}, indent=1) + "\n")
        plot_curves(args, args.out + ".png")


if __name__ == "__main__":
    main()
