"""The CPU-scale study: every model family of the RMT paper at one small size and the same budget
(same updates, same tokens per update), several seeds, on real data, with the stock fairseq tools.

    python scripts/study.py --data data-bin/wikitext-2-bytes --name wt2-byte --out docs/study

For each model and seed: ``fairseq-train`` (json logs; validation every ``--valid-interval``
updates with ``--memory-diagnostics``), then ``fairseq-eval-lm`` on the test split with the
training segment length and ``--memory-diagnostics-file`` (the paper scores with its training
settings too). Writes, next to each other:

    OUT/NAME.md, OUT/NAME.json      test loss, memory / cache gain, first-segment loss: mean ± std
                                    over seeds, and every seed's numbers
    OUT/NAME-curves.png             validation loss against updates, mean over seeds (band: min-max)
    OUT/NAME-diagnostics.png        loss by segment index and by position within the segment,
                                    carried and reset, averaged over seeds

Every model is the ``*_tiny`` backbone (2 layers, d_model 64; pre-LayerNorm, init std 0.1, see
README) with the paper's optimiser shape (Adam, cosine schedule without warm-up, clip 0.25).
Checkpoints go to ``--workdir``; finished runs are reused, so a rerun only redoes what is missing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_memory_diagnostics import GAINS, plot as plot_diagnostics  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# name -> (label, flags); {T}: segment length, {m}: memory tokens, {k}: BPTT depth of the deep RMT.
# The paper's RMT feeds its write block the memory read (--memory-write-input memory); the *_lw rows
# feed it the learned start memory instead (docs/memory_in_lm.md, section 2c).
RMT = "--arch rmt_tiny --num-mem-tokens {m}"
TRXL_RMT = ("--arch rmt_xl_tiny --mem-len {T} --num-mem-tokens {m} --bptt-depth {k} "
            "--memory-target-token --memory-token-loss-weight 0.01")  # the paper's memory-token loss
PAPER_WRITE, LEARNED_WRITE = " --memory-write-input memory", " --memory-write-input learned"
# Where Tr-XL + RMT's cached keys sit (model docstring): the paper's code counts the read block between
# cache and segment; the *_stream rows measure distances as in the token stream (our default).
PAPER_DISTANCE, STREAM_DISTANCE = " --cache-distance sequence", " --cache-distance stream"
MODELS = {
    "baseline": ("no memory", "--arch rmt_tiny --num-mem-tokens 0"),
    "memtr": ("MemTr m={m}", RMT + " --memory-layout memtr --bptt-depth 0"),
    "rmt_bptt0": ("RMT m={m} BPTT-0", RMT + " --bptt-depth 0" + PAPER_WRITE),
    "rmt_deep": ("RMT m={m} BPTT-{k}", RMT + " --bptt-depth {k}" + PAPER_WRITE),
    "transformer_xl": ("Transformer-XL mem {T}", "--arch transformer_xl_tiny --mem-len {T}"),
    "rmt_xl": ("Tr-XL + RMT {T}+{m} BPTT-{k}", TRXL_RMT + PAPER_WRITE + PAPER_DISTANCE),
    "rmt_bptt0_lw": ("RMT m={m} BPTT-0, learned write input", RMT + " --bptt-depth 0" + LEARNED_WRITE),
    "rmt_deep_lw": ("RMT m={m} BPTT-{k}, learned write input", RMT + " --bptt-depth {k}" + LEARNED_WRITE),
    "rmt_xl_lw": ("Tr-XL + RMT {T}+{m} BPTT-{k}, learned write input", TRXL_RMT + LEARNED_WRITE + PAPER_DISTANCE),
    "rmt_xl_stream": ("Tr-XL + RMT {T}+{m} BPTT-{k}, stream distance", TRXL_RMT + PAPER_WRITE + STREAM_DISTANCE),
    "rmt_xl_lw_stream": ("Tr-XL + RMT {T}+{m} BPTT-{k}, learned write input, stream distance",
                         TRXL_RMT + LEARNED_WRITE + STREAM_DISTANCE),
    # BPTT as the method describes it and as the authors' code runs it (docs/authors_model.md)
    "rmt_deep_sliding": ("RMT m={m} BPTT-{k}, sliding", RMT + " --bptt-depth {k} --bptt-mode sliding" + PAPER_WRITE),
    "rmt_deep_authors": ("RMT m={m} BPTT-{k}, the authors' BPTT",
                         RMT + " --bptt-depth {k} --bptt-mode authors" + PAPER_WRITE),
}
CHUNK_MODE = "--bptt-mode chunk"  # the models that name no other mode


def run(cmd, log):
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"study: {cmd[0]} failed, see {log}")


def train_and_score(args, name, seed):
    """One model and seed: returns its diagnostics report and its validation curve."""
    label, flags = MODELS[name]
    flags = flags.format(T=args.segment, m=args.mem, k=args.depth).split() + args.model_flags.split()
    save = Path(args.workdir) / args.name / f"{name}-seed{seed}"
    finished = save / f"finished-{args.updates}"
    if not finished.exists():
        save.mkdir(parents=True, exist_ok=True)
        run(["fairseq-train", args.data, "--user-dir", "rmt_plugin", "--task", "rmt_lm",
             "--tokens-per-sample", str(args.segment), "--segments-per-sample", str(args.segments),
             "--batch-size", str(args.batch), "--max-valid-steps", str(args.valid_steps),
             "--memory-diagnostics", "--criterion", "rmt_lm", *CHUNK_MODE.split(), *flags,
             "--optimizer", "adam", "--lr", str(args.lr), "--lr-scheduler", "cosine", "--clip-norm", "0.25",
             "--max-update", str(args.updates), "--validate-interval-updates", str(args.valid_interval),
             "--validate-interval", "1000", "--save-dir", str(save), "--no-epoch-checkpoints",
             "--log-format", "json", "--log-interval", "100", "--num-workers", "0", "--seed", str(seed)],
            save / "train.log")
        finished.touch()
    report = save / "test-diagnostics.json"
    if not report.exists():
        run(["fairseq-eval-lm", args.data, "--path", str(save / "checkpoint_last.pt"), "--user-dir", "rmt_plugin",
             "--task", "rmt_lm", "--gen-subset", "test", "--batch-size", str(args.batch),
             "--tokens-per-sample", str(args.segment), "--memory-diagnostics",
             "--memory-diagnostics-file", str(report)], save / "eval.log")
    curve = [(int(v["valid_num_updates"]), float(v["valid_loss"]))
             for v in (json.loads(line.split("|")[-1]) for line in open(save / "train.log")
                       if '"valid_loss"' in line)]
    return json.load(open(report)), curve


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def average_reports(reports):
    """The seeds' diagnostics reports averaged key by key (for the plot)."""
    first = reports[0]
    out = {"loss_by_segment": {b: statistics.mean(r["loss_by_segment"][b] for r in reports)
                               for b in first["loss_by_segment"]},
           "loss_by_position": {v: [statistics.mean(r["loss_by_position"][v][i] for r in reports)
                                    for i in range(len(first["loss_by_position"][v]))]
                                for v in first["loss_by_position"]}}
    for gain in GAINS:
        if gain in first:
            out[gain] = statistics.mean(r[gain] for r in reports)
    return out


def summarise(args, results):
    """results: name -> [(report, curve) per seed] -> table (md + json) and plots."""
    table = {}
    for name, runs in results.items():
        reports = [r for r, _ in runs]
        row = {"label": MODELS[name][0].format(T=args.segment, m=args.mem, k=args.depth),
               "seeds": args.seeds, "test_loss": [r["loss"] for r in reports],
               "first_segment": [r["loss_by_segment"]["0"] for r in reports]}
        for gain in GAINS:
            if gain in reports[0]:
                row[gain] = [r[gain] for r in reports]
        table[name] = row
    settings = {k: getattr(args, k) for k in ("data", "segment", "segments", "batch", "mem", "depth", "updates",
                                              "lr", "seeds", "valid_steps", "model_flags")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"settings": settings, "models": table}, indent=1) + "\n")

    unit = f"bits/{args.unit}"
    lines = [f"| model | test loss ({unit}) | memory gain: reset | swap | cache gain: reset | swap | first segment |",
             "|---|---|---|---|---|---|---|"]
    for row in table.values():
        cells = []
        for key in ("test_loss", *GAINS, "first_segment"):
            cells.append("%.4f ± %.4f" % mean_std(row[key]) if key in row else "-")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± std over seeds {', '.join(map(str, args.seeds))}; {args.updates} updates of "
                 f"{args.batch} × {args.segments} × {args.segment} tokens; test split scored as "
                 f"{args.batch} streams with segments of {args.segment}.")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    plot_curves(args, results, out / f"{args.name}-curves.png")
    plot_diagnostics([(table[name]["label"], average_reports([r for r, _ in runs])) for name, runs in results.items()],
                     out / f"{args.name}-diagnostics.png",
                     title=f"{args.name}: test split, mean over {len(args.seeds)} seeds")


def plot_curves(args, results, path):
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in results.items():
        curves = [c for _, c in runs]
        steps = [u for u, _ in curves[0]]
        per_step = [[c[i][1] for c in curves] for i in range(min(len(c) for c in curves))]
        ax.plot(steps[:len(per_step)], [statistics.mean(v) for v in per_step], "o-", ms=3,
                label=MODELS[name][0].format(T=args.segment, m=args.mem, k=args.depth))
        ax.fill_between(steps[:len(per_step)], [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2)
    ax.set(xlabel="update", ylabel=f"validation loss (bits/{args.unit})",
           title=f"{args.name}: validation loss, mean over seeds {', '.join(map(str, args.seeds))} (band: min-max)")
    # the first validation is far above the rest: the axis ends just above the later ones
    later = [v for _, runs in results.items() for _, c in runs for _, v in (c[1:] or c)]
    ax.set_ylim(top=min(ax.get_ylim()[1], max(later) + 0.1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a fairseq data-bin with train, valid and test")
    parser.add_argument("--name", required=True, help="name of the outputs, e.g. wt2-byte")
    parser.add_argument("--out", default="docs/study", help="where the table and the plots go")
    parser.add_argument("--workdir", default="checkpoints/study", help="where checkpoints and logs go")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--segment", type=int, default=32, help="segment length T")
    parser.add_argument("--segments", type=int, default=4, help="segments per batch row K")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mem", type=int, default=8, help="memory tokens m")
    parser.add_argument("--depth", type=int, default=3, help="BPTT depth of the deep RMT and Tr-XL + RMT")
    parser.add_argument("--updates", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--valid-interval", type=int, default=250)
    parser.add_argument("--valid-steps", type=int, default=40, help="validation batches per validation")
    parser.add_argument("--model-flags", default="", help="added to every model, e.g. "
                        "'--adaptive-softmax-cutoff 2000,10000 --div-val 4' at word level")
    parser.add_argument("--unit", choices=["char", "token"], default="token", help="how the table names the loss")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.data, "dict.txt").exists():
        sys.exit(f"study: --data {args.data} has no dict.txt (not a fairseq data-bin)")
    # chunk mode cuts every --depth + 1 segments: only the models of depth {k} in chunk mode care
    chunked = [name for name in args.models if "{k}" in MODELS[name][1] and "--bptt-mode" not in MODELS[name][1]]
    if chunked and args.segments % (args.depth + 1):
        sys.exit(f"study: --segments {args.segments} must be a multiple of --depth + 1 = {args.depth + 1} "
                 f"(chunk mode: {', '.join(chunked)})")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {name: [] for name in args.models}
    for seed in args.seeds:  # seed by seed, so that a first full comparison comes early
        for name in args.models:
            results[name].append(train_and_score(args, name, seed))
    summarise(args, results)


if __name__ == "__main__":
    main()
