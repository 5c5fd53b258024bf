"""Memory tasks served as one language-modelling stream: ``python -m rmt_plugin.memory_streams``.

``write`` draws examples of a registered memory task (copy, reverse, associative retrieval or
your own, see ``memory_tasks.py``) and writes them back to back, one example a line,
``source [_ x gap] <sep> target``, as train/valid/test text, then binarizes them with
``fairseq-preprocess``. Trained with ``--task rmt_lm``, the lines are one contiguous stream:
the memory is never reset between examples, so a model must also learn to overwrite what the
previous example left. ``--gap`` puts that many blank ``_`` tokens (predictable, so they add no
noise to the loss) between source and ``<sep>``: a copy target then lies ``source_len + gap + 1``
tokens after its source token. Example, copy, ``--source-len 3 --gap 2``::

    s4 s1 s7 _ _ <sep> s4 s1 s7
    s0 s0 s9 _ _ <sep> s0 s0 s9

``--filler random`` fills the gap with random draws from ``--filler-symbols`` symbols of their own
(``~0``, ``~1``, ...) instead: a sparse dependency in noise, as in natural text, where most of
the loss is on tokens no memory can predict::

    s4 s1 s7 ~13 ~2 <sep> s4 s1 s7

A Transformer-XL of L layers and cache M reaches at most ``L x M + T`` tokens back, so with a
longer dependency only a memory carried by the model itself can solve the task.

``score`` runs a checkpoint over a split as one stream (memory and cache carried, batch 1, as
``fairseq-eval-lm --batch-size 1`` does) and reports, on the target positions only (the tokens
after ``<sep>``), token accuracy and exact match (every target token of an example right under
argmax; with teacher forcing that equals greedy decoding being right).
"""

import argparse
import json
import logging
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import torch

from .memory_tasks import MEMORY_TASKS, SEPARATOR, SPLITS, build_memory_task, generate_split

logger = logging.getLogger(__name__)
BLANK = "_"
FILLER = "~{}"


def example_line(memory_task, source, target, gap: list) -> str:
    symbols = memory_task.symbols
    return " ".join([symbols[i] for i in source] + gap + [SEPARATOR] + [symbols[i] for i in target])


def gap_filler(args, split: str):
    """The gap's tokens, one list per call: blanks, or random filler symbols (reproducible per split).

    With ``--max-gap`` each gap's length is drawn uniformly from ``--gap`` .. ``--max-gap``.
    """
    rng = random.Random(f"{args.data_seed}-{split}")

    def gap():
        length = args.gap if args.max_gap is None else rng.randint(args.gap, args.max_gap)
        if args.filler == "blank":
            return [BLANK] * length
        return [FILLER.format(rng.randrange(args.filler_symbols)) for _ in range(length)]
    return gap


def write_streams(args) -> None:
    """Text splits and their fairseq-preprocess data-bin in ``args.destdir``."""
    cfg = SimpleNamespace(memory_task=args.memory_task, source_len=args.source_len, copy_repeats=args.copy_repeats,
                          num_pairs=args.num_pairs, num_symbols=args.num_symbols, tokens_per_sample=1,
                          max_segments=sys.maxsize)
    memory_task = build_memory_task(cfg)
    if BLANK in memory_task.symbols or SEPARATOR in memory_task.symbols or any(
            s.startswith(FILLER[0]) for s in memory_task.symbols):
        raise ValueError(f"--memory-task {args.memory_task!r} uses {BLANK!r}, {SEPARATOR!r} or "
                         f"{FILLER[0]!r}... as a symbol")
    if args.gap < 0:
        raise ValueError(f"--gap must be >= 0, got {args.gap}")
    if args.max_gap is not None and args.max_gap < args.gap:
        raise ValueError(f"--max-gap must be >= --gap ({args.gap}), got {args.max_gap}")
    if args.filler == "random" and args.filler_symbols < 1:
        raise ValueError(f"--filler-symbols must be >= 1, got {args.filler_symbols}")
    text_dir = os.path.join(args.destdir, "text")
    os.makedirs(text_dir, exist_ok=True)
    sizes = {"train": args.train_size, "valid": args.valid_size, "test": args.test_size}
    for split in SPLITS:
        examples = generate_split(memory_task, split, sizes[split], args.data_seed)
        gap = gap_filler(args, split)
        with open(os.path.join(text_dir, f"{split}.txt"), "w") as f:
            for source, target in examples:
                f.write(example_line(memory_task, source, target, gap()) + "\n")
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
                    "--trainpref", os.path.join(text_dir, "train.txt"),
                    "--validpref", os.path.join(text_dir, "valid.txt"),
                    "--testpref", os.path.join(text_dir, "test.txt"),
                    "--destdir", args.destdir, "--workers", "1"], check=True, capture_output=True)
    with open(os.path.join(args.destdir, "memory_stream.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    gaps = args.gap if args.max_gap is None else f"{args.gap}-{args.max_gap}"
    logger.info(f"wrote {args.memory_task} streams (gap {gaps}) to {args.destdir}")


class TargetScorer:
    """Accuracy and exact match on the tokens after ``<sep>``, fed the stream segment by segment.

    Per batch row it remembers whether the row is inside a target (a ``<sep>`` was read and the
    line's eos not yet predicted), whether the example so far is all right, and how many tokens of
    the line came before ``<sep>``. An example's distance is that count + 1: how far the first target
    token lies after the first source token (copy of 2, gap 40: 43). Exact match is also kept per
    distance, for streams written with ``--max-gap``.
    """

    def __init__(self, sep: int, eos: int, rows: int):
        self.sep, self.eos = sep, eos
        self.inside = [False] * rows
        self.all_right = [True] * rows
        self.line_len = [0] * rows
        self.distance = [0] * rows
        self.correct = self.tokens = self.exact = self.examples = 0
        self.by_distance = {}  # distance -> [examples, exact]

    def add(self, inputs: torch.Tensor, targets: torch.Tensor, predictions: torch.Tensor) -> None:
        for row in range(inputs.size(0)):
            for x, y, p in zip(inputs[row].tolist(), targets[row].tolist(), predictions[row].tolist()):
                self.line_len[row] = 0 if x == self.eos else self.line_len[row] + 1
                if x == self.sep:
                    self.inside[row], self.all_right[row] = True, True
                    self.distance[row] = self.line_len[row]  # the tokens before <sep>, + 1 for the target's shift
                if not self.inside[row]:
                    continue
                if y == self.eos:  # the example ended: its last target token came before
                    self.inside[row] = False
                    self.examples += 1
                    self.exact += self.all_right[row]
                    counts = self.by_distance.setdefault(self.distance[row], [0, 0])
                    counts[0] += 1
                    counts[1] += self.all_right[row]
                    continue
                self.tokens += 1
                self.correct += p == y
                self.all_right[row] &= p == y

    def result(self) -> dict:
        return {"examples": self.examples, "exact_match": self.exact / max(self.examples, 1),
                "target_tokens": self.tokens, "accuracy": self.correct / max(self.tokens, 1),
                "exact_match_by_distance": {d: {"examples": n, "exact_match": e / n}
                                            for d, (n, e) in sorted(self.by_distance.items())}}


@torch.no_grad()
def score_checkpoint(path: str, data: str, split: str, tokens_per_sample=None, model_overrides=None) -> dict:
    from fairseq import checkpoint_utils

    task_overrides = {"data": data}
    if tokens_per_sample:  # replaces the training's T, and so its T schedule if it had one
        task_overrides.update(tokens_per_sample=tokens_per_sample, tokens_per_sample_schedule=None)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [path], arg_overrides=dict(task_overrides, **(model_overrides or {})))
    model = models[0].eval()
    task.load_dataset(split)
    dictionary = task.target_dictionary
    scorer = TargetScorer(dictionary.index(SEPARATOR), dictionary.eos(), rows=1)
    for sample in task.eval_lm_dataloader(task.dataset(split), batch_size=1):
        logits = model(**sample["net_input"])[0]
        scorer.add(sample["net_input"]["src_tokens"], sample["target"], logits.argmax(-1))
    return scorer.result()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rmt_plugin.memory_streams", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write a memory task's examples as text and a fairseq data-bin")
    write.add_argument("--memory-task", default="copy", help=f"one of {', '.join(sorted(MEMORY_TASKS))}")
    write.add_argument("--destdir", required=True, help="output directory (data-bin; text/ inside)")
    write.add_argument("--source-len", type=int, default=4)
    write.add_argument("--copy-repeats", type=int, default=1)
    write.add_argument("--num-pairs", type=int, default=4)
    write.add_argument("--num-symbols", type=int, default=10)
    write.add_argument("--gap", type=int, default=0, help="tokens between source and <sep>")
    write.add_argument("--max-gap", type=int, default=None,
                       help="draw each example's gap uniformly from --gap to this (default: every gap is --gap)")
    write.add_argument("--filler", choices=["blank", "random"], default="blank",
                       help="the gap's tokens: blanks (predictable) or random filler symbols (noise in the loss)")
    write.add_argument("--filler-symbols", type=int, default=32, help="--filler random: symbols drawn from")
    write.add_argument("--train-size", type=int, default=20000)
    write.add_argument("--valid-size", type=int, default=500)
    write.add_argument("--test-size", type=int, default=1000)
    write.add_argument("--data-seed", type=int, default=1)
    score = sub.add_parser("score", help="target accuracy / exact match of a checkpoint on one split")
    score.add_argument("data", help="the data-bin written by `write`")
    score.add_argument("--path", required=True, help="checkpoint")
    score.add_argument("--split", default="test")
    score.add_argument("--tokens-per-sample", type=int, default=None, help="segment length (default: training's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "write":
        write_streams(args)
    else:
        import rmt_plugin  # noqa: F401  (registers the task and model the checkpoint names)

        print(json.dumps(score_checkpoint(args.path, args.data, args.split, args.tokens_per_sample)))


if __name__ == "__main__":
    main()
