"""Plot memory diagnostics written by ``fairseq-eval-lm --memory-diagnostics --memory-diagnostics-file``.

    python scripts/plot_memory_diagnostics.py rmt.json:RMT txl.json:Transformer-XL --out diag.png

One figure, three panels, every model in its own colour:
  1. loss by segment index since the stream start (memory that helps makes it fall after 0);
  2. loss by position within the segment, carried (solid), with the memory / the cache reset at
     every segment (dashed / dotted) and with another stream's (dash-dot): what the state buys is
     the gap, largest at the first positions of a segment;
  3. memory and cache gains, reset and swap (bits per token; see rmt_plugin/diagnostics.py).
"""

import argparse
import json
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

RESET_STYLES = {"carried": "-", "memory_reset": "--", "cache_reset": ":", "memory_swap": "-.",
                "cache_swap": (0, (3, 1, 1, 1, 1, 1))}
RESET_NAMES = {"carried": "carried", "memory_reset": "memory reset", "cache_reset": "cache reset",
               "memory_swap": "another stream's memory", "cache_swap": "another stream's cache"}
GAINS = ("memory_gain", "memory_swap_gain", "cache_gain", "cache_swap_gain")


def load(spec):
    path, _, label = spec.partition(":")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"plot_memory_diagnostics: cannot read {path}: {e}")
    if "loss_by_segment" not in report:
        sys.exit(f"plot_memory_diagnostics: {path} is not a --memory-diagnostics-file report")
    return label or path, report


def plot(reports, out, title=None):
    fig, (by_segment, by_position, gains) = plt.subplots(
        1, 3, figsize=(18, 4.6 + 0.3 * ((len(reports) + 3) // 4) + 0.15 * max(len(reports) - 6, 0)),
        gridspec_kw={"width_ratios": [1, 1, 1.25]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, report) in enumerate(reports):
        colour = colours[i % len(colours)]
        buckets = list(report["loss_by_segment"])
        by_segment.plot(range(len(buckets)), list(report["loss_by_segment"].values()), "o-", color=colour,
                        label=label)
        by_segment.set_xticks(range(len(buckets)), buckets, rotation=45 if len(buckets) > 6 else 0)
        for variant, losses in report["loss_by_position"].items():
            by_position.plot(range(len(losses)), losses, linestyle=RESET_STYLES[variant], color=colour)
    by_segment.set(xlabel="segment index since the stream start", ylabel="loss (bits/token)",
                   title="loss by segment index")
    # one legend of models (colours) for the figure, one of line styles (what was reset) for panel 2
    fig.legend(*by_segment.get_legend_handles_labels(), loc="lower center", ncol=min(len(reports), 4), fontsize=8)
    by_position.set_xscale("symlog", linthresh=1)  # what the state buys sits at the first positions
    width_seen = max(len(losses) for _, report in reports for losses in report["loss_by_position"].values())
    ticks = [0] + [2 ** k for k in range(width_seen.bit_length()) if 2 ** k < width_seen]
    by_position.set_xticks(ticks, [str(t) for t in ticks])
    by_position.set(xlabel="position within the segment (log scale)", ylabel="loss (bits/token)",
                    title="loss by position: carried vs reset every segment")
    variants = [v for v in RESET_STYLES if any(v in report["loss_by_position"] for _, report in reports)]
    by_position.legend(handles=[Line2D([], [], color="black", linestyle=RESET_STYLES[v], label=RESET_NAMES[v])
                                for v in variants], fontsize=7)
    # horizontal bars, one group per model (top to bottom), so that many models keep readable names
    names = [label for label, _ in reports]
    shown = [gain for gain in GAINS if any(gain in report for _, report in reports)]
    height = 0.8 / max(len(shown), 1)
    for i, gain in enumerate(shown):
        offset = (i - (len(shown) - 1) / 2) * height
        present = [(k, report[gain]) for k, (_, report) in enumerate(reports) if gain in report]
        # a model without a memory (cache) has no such gain: no bar rather than a zero
        bars = gains.barh([k + offset for k, _ in present], [v for _, v in present], height,
                          label=gain.replace("_", " "))
        gains.bar_label(bars, fmt="%.3f", fontsize=6, padding=2)
    gains.set_yticks(range(len(names)), [textwrap.fill(name, 34) for name in names], fontsize=7)
    gains.invert_yaxis()
    gains.set_xlim(right=gains.get_xlim()[1] * 1.15)  # room for the bar labels
    gains.set(xlabel="bits/token", title="loss saved by carrying the memory / the cache")
    gains.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 * ((len(reports) + 3) // 4), 1, 1))
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="diagnostics JSON files, each optionally :LABEL")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    plot([load(spec) for spec in args.reports], args.out, args.title)


if __name__ == "__main__":
    main()
