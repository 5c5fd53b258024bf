#!/usr/bin/env python
"""Side-by-side speed and memory of fairseq's language models and ours, at equal size (CPU).

Models (all 4 layers, d_model 256, 4 x 64 heads, d_inner 1024, dropout 0.1 by default; segment T,
batch B streams, Adam):

    fairseq transformer_lm          --task language_modeling (blocks of T tokens, no memory)
    fairseq truncated_bptt Tr-XL    fairseq's examples/truncated_bptt (HuggingFace TransfoXL), mem T
    ours: baseline, Transformer-XL (mem T), RMT (m, chunk depth 1; chunk depth 3 with
          --memory-replay; sliding and prefix depth 3, with and without replay), Tr-XL + RMT
          (m, mem T, depth 1)

Every measurement runs in a fresh process (``--worker NAME``), and the repeats are interleaved
(repeat 1 of every model, then repeat 2, ...); the table gives medians. Per model: training
tokens/s (median step of ``--train-steps`` after two warm-up steps; a step is ``task.train_step``
and the optimizer step, as fairseq-train runs them; our task uses K = ``--segments-per-sample``
segments per batch row), eval-lm tokens/s (fairseq-eval-lm's own ``eval_lm`` loop over
``--eval-batches`` batches of B x T after one warm-up batch), the process's peak RSS after
training, and the peak bytes saved for backward during the warm-up steps (the second starts from
a carried state, as every later step does; :func:`rmt_plugin.measure.saved_tensor_peak`;
deterministic), and the work per token (FLOPs counted by torch in one more training step and one
more eval-lm batch, :func:`rmt_plugin.measure.flop_counter`) with the rate it ran at: the same
GFLOP/s means the same efficiency, so a model can only be faster per token by doing less work.
A last table gives the saved bytes for our RMT against the BPTT depth and K (one process, one
batch each).

The command behind docs/performance.md (about 15 minutes on one core)::

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/benchmark.py --data data-bin/wikitext-2-bytes

``--data`` is a byte-level data-bin (``rmt-prepare-wikitext --level byte``). ``--out FILE`` also
writes the tables there; ``--size tiny --repeats 1`` is a quick smoke run (2 layers, d_model 32).
``--profile`` prints instead where one training step of each of ``--models`` spends its time, by
torch op (torch.profiler's table, one process per model).

On a GPU (``--device cuda``; ``scripts/gpu_benchmark.sh`` is the whole prepared run): ``--bf16``
is fairseq's ``--bf16`` (bf16 weights and activations, fp32 master weights in fairseq's
FP16Optimizer), ``--size enwik8_base`` the paper's enwik8 backbone, time is read after
``torch.cuda.synchronize()``, and peak memory is the CUDA allocator's. Every run also measures the
device's peak matrix-product rate (the fastest square product of several sizes in the benchmark's
precision: the ceiling a model made of matrix products could reach) and gives each model's
model-FLOPs utilisation (MFU) against it.
"""

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODELS = {  # name -> row label
    "transformer_lm": "fairseq transformer_lm",
    "truncated_bptt_xl": "fairseq truncated_bptt Transformer-XL (HF), mem T",
    "baseline": "ours, baseline (no memory)",
    "transformer_xl": "ours, Transformer-XL, mem T",
    "rmt_chunk": "ours, RMT m, chunk, depth 1",
    "rmt_chunk_replay": "ours, RMT m, chunk, depth 3, --memory-replay",
    "rmt_sliding": "ours, RMT m, sliding, depth 3",
    "rmt_sliding_replay": "ours, RMT m, sliding, depth 3, --memory-replay",
    "rmt_prefix": "ours, RMT m, prefix, depth 3",
    "rmt_prefix_replay": "ours, RMT m, prefix, depth 3, --memory-replay",
    "rmt_xl": "ours, Tr-XL + RMT (m, mem T), depth 1",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="byte-level data-bin (train and valid splits)")
    parser.add_argument("--out", help="also write the tables (markdown) here")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per model (median)")
    parser.add_argument("--train-steps", type=int, default=3,
                        help="timed training steps after 2 warm-up steps (their median tokens/s)")
    parser.add_argument("--eval-batches", type=int, default=16, help="eval-lm batches of B x T tokens")
    parser.add_argument("--tokens-per-sample", type=int, default=128, help="segment length T")
    parser.add_argument("--segments-per-sample", type=int, default=4, help="K, our models' segments per batch row")
    parser.add_argument("--batch-size", type=int, default=8, help="B streams (rows)")
    parser.add_argument("--num-mem-tokens", type=int, default=16, help="RMT memory size m")
    parser.add_argument("--size", choices=["small", "tiny", "enwik8_base"], default="small",
                        help="small: 4 layers, d_model 256 (the CPU tables); tiny: 2 layers, d_model 32 (smoke "
                             "test); enwik8_base: the paper's enwik8 backbone, 12 layers, d_model 512")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="fairseq's --bf16 (needs --device cuda)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the memory against depth and K table")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the tables: where one training step of each model spends its time, "
                             "by torch op (torch.profiler)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sweep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ceiling", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bf16 and args.device != "cuda":
        parser.error("--bf16 needs --device cuda (the CPU tables are fp32)")
    return args


def size(args):
    if args.size == "enwik8_base":
        from rmt_plugin.model import PAPER_BACKBONES

        paper = PAPER_BACKBONES["enwik8_base"]
        return dict(layers=paper["n_layer"], d_model=paper["d_model"], heads=paper["n_head"], d_head=paper["d_head"],
                    d_inner=paper["d_inner"])
    if args.size == "tiny":
        return dict(layers=2, d_model=32, heads=2, d_head=16, d_inner=64)
    return dict(layers=4, d_model=256, heads=4, d_head=64, d_inner=1024)


def train_flags(name, args):
    """fairseq-train flags (after the data directory) of model ``name``."""
    s, T, m = size(args), args.tokens_per_sample, args.num_mem_tokens
    common = ["--optimizer", "adam", "--lr", "1e-4", "--batch-size", str(args.batch_size), "--num-workers", "0",
              "--seed", "1", "--dropout", "0.1", "--tokens-per-sample", str(T),
              *(["--cpu"] if args.device == "cpu" else []), *(["--bf16"] if args.bf16 else [])]
    if name == "transformer_lm":
        return common + ["--task", "language_modeling", "--sample-break-mode", "none", "--arch", "transformer_lm",
                         "--decoder-layers", str(s["layers"]), "--decoder-embed-dim", str(s["d_model"]),
                         "--decoder-ffn-embed-dim", str(s["d_inner"]), "--decoder-attention-heads", str(s["heads"]),
                         "--share-decoder-input-output-embed", "--criterion", "cross_entropy"]
    if name == "truncated_bptt_xl":
        import fairseq

        user_dir = Path(fairseq.__file__).parent / "examples" / "truncated_bptt"
        return common + ["--user-dir", str(user_dir), "--task", "truncated_bptt_lm", "--arch", "transformer_xl",
                         "--n-layer", str(s["layers"]), "--d-model", str(s["d_model"]), "--n-head", str(s["heads"]),
                         "--d-head", str(s["d_head"]), "--d-inner", str(s["d_inner"]), "--mem-len", str(T),
                         "--criterion", "cross_entropy"]
    ours = common + ["--user-dir", str(REPO / "rmt_plugin"), "--task", "rmt_lm", "--arch", "rmt",
                     "--segments-per-sample", str(args.segments_per_sample), "--n-layer", str(s["layers"]),
                     "--d-model", str(s["d_model"]), "--n-head", str(s["heads"]), "--d-head", str(s["d_head"]),
                     "--d-inner", str(s["d_inner"]), "--criterion", "rmt_lm"]
    memory = ["--num-mem-tokens", str(m)]
    return ours + {
        "baseline": ["--bptt-depth", "0"],
        "transformer_xl": ["--mem-len", str(T), "--bptt-depth", "0"],
        "rmt_chunk": memory + ["--bptt-depth", "1", "--bptt-mode", "chunk"],
        "rmt_chunk_replay": memory + ["--bptt-depth", "3", "--bptt-mode", "chunk", "--memory-replay"],
        "rmt_sliding": memory + ["--bptt-depth", "3", "--bptt-mode", "sliding"],
        "rmt_sliding_replay": memory + ["--bptt-depth", "3", "--bptt-mode", "sliding", "--memory-replay"],
        "rmt_prefix": memory + ["--bptt-depth", "3", "--bptt-mode", "prefix"],
        "rmt_prefix_replay": memory + ["--bptt-depth", "3", "--bptt-mode", "prefix", "--memory-replay"],
        "rmt_xl": memory + ["--mem-len", str(T), "--bptt-depth", "1", "--bptt-mode", "chunk"],
    }[name]


# ----------------------------------------------------------------------------- one process per measurement
def setup(data, flags, device="cpu"):
    """fairseq's task, model, criterion and optimizer for ``flags``, as fairseq-train builds them
    (its Trainer: the model in bf16 under ``--bf16``, then on ``device``; FP16Optimizer for bf16)."""
    import torch
    from fairseq import options, optim, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), [data, *flags]))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    for split in ("train", "valid"):
        task.load_dataset(split)
    model = task.build_model(cfg.model)
    if cfg.common.bf16:
        model = model.to(dtype=torch.bfloat16)
    model = model.to(device)
    criterion = task.build_criterion(cfg.criterion)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (optim.FP16Optimizer.build_optimizer(cfg, params) if cfg.common.bf16
                 else optim.build_optimizer(cfg.optimizer, params))
    return cfg, task, model, criterion, optimizer


def batches(cfg, task, model, split, batch_size):
    from fairseq import utils

    return task.get_batch_iterator(
        dataset=task.dataset(split), max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,
    ).next_epoch_itr(shuffle=False)


def training_step(cfg, task, model, criterion, optimizer, batch_size, device="cpu"):
    """``step(update)``: one training step on the next batch, as fairseq-train runs it; its tokens
    (on a GPU, once the device has finished the step)."""
    import torch
    from fairseq import utils

    train = batches(cfg, task, model, "train", batch_size)

    def step(update):
        sample = next(train)
        if device == "cuda":
            sample = utils.move_to_cuda(sample)
        task.train_step(sample, model, criterion, optimizer, update)
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        return sample["ntokens"]

    return step


def profile_step(name, args):
    """torch.profiler's table of one training step (after two warm-up steps), by op, and its
    matrix products by operand shapes with the rate each ran at."""
    from torch.profiler import ProfilerActivity, profile

    cfg, task, model, criterion, optimizer = setup(args.data, train_flags(name, args), args.device)
    step = training_step(cfg, task, model, criterion, optimizer, args.batch_size, args.device)
    step(0)
    step(1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        tokens = step(2)
    return dict(tokens=tokens, table=prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
                products=matrix_products(prof))


def matrix_products(prof, rows=12):
    """The profiled step's matrix products (``mm``, ``addmm``, ``bmm``) by operand shapes: total
    time, calls and GFLOP/s, the most time first, as a markdown table."""
    found = []
    for event in prof.key_averages(group_by_input_shape=True):
        shapes = event.input_shapes
        if event.key in ("aten::mm", "aten::bmm"):
            a, b = shapes[0], shapes[1]
        elif event.key == "aten::addmm":
            a, b = shapes[1], shapes[2]
        else:
            continue
        flops = 2 * b[-1] * (a[0] * a[1] * a[2] if event.key == "aten::bmm" else a[0] * a[1])
        seconds = event.self_cpu_time_total / 1e6
        found.append((seconds, event.key, f"{a} × {b}", event.count, flops * event.count / seconds / 1e9))
    found.sort(reverse=True)
    lines = [f"Matrix products: {sum(f[0] for f in found) * 1e3:.1f} ms in all", "",
             "| op | operands | calls | ms | GFLOP/s |", "|---|---|---|---|---|"]
    lines += [f"| {op} | {shapes} | {calls} | {seconds * 1e3:.1f} | {rate:.1f} |"
              for seconds, op, shapes, calls, rate in found[:rows]]
    return "\n".join(lines)


def measure(name, args):
    import torch
    from fairseq_cli.eval_lm import eval_lm

    from rmt_plugin.measure import flop_counter, saved_tensor_peak

    cuda = args.device == "cuda"
    cfg, task, model, criterion, optimizer = setup(args.data, train_flags(name, args), args.device)
    step = training_step(cfg, task, model, criterion, optimizer, args.batch_size, args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with saved_tensor_peak() as meter:  # two warm-up steps: the second starts from carried state
        step(0)                        # (sliding's history, prefix's re-run segments), as all later do
        step(1)
    rates = []  # the median step: a step slowed down by the machine's other work does not count
    for update in range(2, args.train_steps + 2):
        start = time.perf_counter()
        rates.append(step(update) / (time.perf_counter() - start))
    train_tps = statistics.median(rates)
    peak_mb = (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    with flop_counter() as counter:  # one more step, untimed: counting slows it down
        tokens = step(args.train_steps + 2)
    train_flops = counter.get_total_flops() / tokens

    model.eval()
    loader = task.eval_lm_dataloader(task.dataset("valid"), max_tokens=None, batch_size=args.batch_size,
                                     max_positions=args.tokens_per_sample, num_workers=0)
    counted = []

    def batches_of(n):
        for sample in itertools.islice(loader, n):
            counted.append(sample["ntokens"])
            yield sample

    with torch.no_grad():
        eval_lm([model], task.source_dictionary, batches_of(1), target_dictionary=task.target_dictionary)  # warm-up
        counted.clear()
        start = time.perf_counter()
        eval_lm([model], task.source_dictionary, batches_of(args.eval_batches),
                target_dictionary=task.target_dictionary)
        if cuda:
            torch.cuda.synchronize()
        eval_tps = sum(counted) / (time.perf_counter() - start)
        counted.clear()
        with flop_counter() as counter:
            eval_lm([model], task.source_dictionary, batches_of(1), target_dictionary=task.target_dictionary)
    eval_flops = counter.get_total_flops() / sum(counted)
    return dict(train_tps=train_tps, eval_tps=eval_tps, peak_mb=peak_mb, saved_mb=meter["peak"] / 2 ** 20,
                train_gflop=train_flops / 1e9, eval_gflop=eval_flops / 1e9)


def sweep(args):
    """Peak bytes saved for backward by one RMT training batch, against the depth and K (on a GPU
    also the allocator's peak over the batch, model and optimizer state included)."""
    import torch
    from fairseq import utils

    from rmt_plugin.criterion import RMTLMCriterion
    from rmt_plugin.measure import saved_tensor_peak

    k_max = 5
    cuda = args.device == "cuda"
    sweep_args = argparse.Namespace(**{**vars(args), "segments_per_sample": k_max})
    cfg, task, model, _, _ = setup(args.data, train_flags("rmt_chunk", sweep_args), args.device)
    sample = next(batches(cfg, task, model, "train", args.batch_size))
    if cuda:
        sample = utils.move_to_cuda(sample)
    model.train()
    rows = []
    runs = [(k, 0) for k in range(1, k_max)] + [(k_max, depth) for depth in range(5)]
    for k, depth in runs:
        tokens = sample["net_input"]["src_tokens"][:, :k * args.tokens_per_sample]
        batch = {"net_input": {"src_tokens": tokens}, "target": sample["target"][:, :tokens.size(1)]}
        row = {"K": k, "depth": depth}
        for column, mode, replay in (("one_backward", "chunk", False), ("chunk", "chunk", False),
                                     ("chunk_replay", "chunk", True), ("sliding_replay", "sliding", True)):
            criterion = RMTLMCriterion(task, bptt_depth=depth, bptt_mode=mode, memory_replay=replay)
            torch.manual_seed(0)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with saved_tensor_peak() as meter:
                if column == "one_backward":  # as before per-chain backwards: the whole batch's graph
                    criterion.forward_with_state(model, batch, None)[0].backward()
                else:
                    criterion.forward_with_state(model, batch, None, backward=lambda objective: objective.backward())
            model.zero_grad(set_to_none=True)
            row[column] = meter["peak"] / 2 ** 20
            if cuda:
                row[column + "_gpu"] = torch.cuda.max_memory_allocated() / 2 ** 20
        rows.append(row)
    return rows


def ceiling(args):
    """The device's peak matrix-product rate (FLOP/s) in the benchmark's precision: the fastest of
    10 products (after 3 warm-ups) over square sizes (2048-8192 on a GPU, 256-2048 on the CPU). A
    single size's median is no peak: on the CPU the models' own products ran faster than one median
    1024 x 1024 product (an MFU of 131%), as a product's rate depends on its shape and the cache."""
    import torch

    cuda = args.device == "cuda"
    best = 0.0
    for n in ((2048, 4096, 8192) if cuda else (256, 512, 1024, 2048)):
        a, b = (torch.randn(n, n, device=args.device, dtype=torch.bfloat16 if args.bf16 else torch.float32)
                for _ in range(2))
        for i in range(13):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.mm(a, b)
            if cuda:
                torch.cuda.synchronize()
            if i >= 3:
                best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def run_worker(args, *extra):
    cmd = [sys.executable, __file__, "--data", args.data, "--repeats", "1", "--train-steps", str(args.train_steps),
           "--eval-batches", str(args.eval_batches), "--tokens-per-sample", str(args.tokens_per_sample),
           "--segments-per-sample", str(args.segments_per_sample), "--batch-size", str(args.batch_size),
           "--num-mem-tokens", str(args.num_mem_tokens), "--size", args.size, "--device", args.device,
           *(["--bf16"] if args.bf16 else []), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tables(args, results, sweep_rows, peak_flops):
    med = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}
    T, m = args.tokens_per_sample, args.num_mem_tokens
    cuda = args.device == "cuda"
    precision = "bf16" if args.bf16 else "fp32"
    lines = [f"T = {T}, B = {args.batch_size}, K = {args.segments_per_sample} (ours), m = {m}, "
             f"{size(args)}, {args.device}, {precision}; medians of {args.repeats} interleaved runs; "
             f"peak matrix-product rate measured: {peak_flops / 1e9:.1f} GFLOP/s", "",
             "| | train tokens/s | × transformer_lm | eval-lm tokens/s | × transformer_lm | "
             f"{'peak allocated GPU MB' if cuda else 'peak RSS MB'} | saved for backward MB |",
             "|---|---|---|---|---|---|---|"]
    ref = med.get("transformer_lm")
    for name, r in med.items():
        rel = (lambda key: f"{r[key] / ref[key]:.2f}") if ref else (lambda key: "")
        lines.append(f"| {MODELS[name]} | {r['train_tps']:.0f} | {rel('train_tps')} | {r['eval_tps']:.0f} | "
                     f"{rel('eval_tps')} | {r['peak_mb']:.0f} | {r['saved_mb']:.1f} |")
    lines += ["", "Work counted by torch's FlopCounterMode (matrix products and attention, forward and backward; "
              "one training step, one eval-lm batch), the rate it ran at, and that rate as a share of the "
              "measured peak matrix-product rate (MFU):", "",
              "| | train MFLOP per token | train GFLOP/s | train MFU | eval-lm MFLOP per token | eval-lm GFLOP/s "
              "| eval-lm MFU |", "|---|---|---|---|---|---|---|"]
    for name, r in med.items():
        train_rate, eval_rate = r["train_gflop"] * r["train_tps"], r["eval_gflop"] * r["eval_tps"]
        lines.append(f"| {MODELS[name]} | {r['train_gflop'] * 1e3:.4g} | {train_rate:.1f} | "
                     f"{train_rate * 1e9 / peak_flops:.1%} | {r['eval_gflop'] * 1e3:.4g} | {eval_rate:.1f} | "
                     f"{eval_rate * 1e9 / peak_flops:.1%} |")
    cost = {name: 1 / r["train_tps"] for name, r in med.items()}
    goals = []
    if {"rmt_chunk", "baseline"} <= cost.keys():
        goals.append(("RMT chunk / baseline training cost", cost["rmt_chunk"] / cost["baseline"],
                      f"<= 1.05 × (T+2m)/T = {1.05 * (T + 2 * m) / T:.3f}"))
    if {"rmt_xl", "transformer_xl"} <= cost.keys():
        goals.append(("Tr-XL + RMT / our Transformer-XL training cost", cost["rmt_xl"] / cost["transformer_xl"],
                      f"<= 1.10 × (T+2m)/T = {1.10 * (T + 2 * m) / T:.3f}"))
    if {"transformer_xl", "truncated_bptt_xl"} <= cost.keys():
        goals.append(("our Transformer-XL / fairseq truncated_bptt training speed",
                      cost["truncated_bptt_xl"] / cost["transformer_xl"], ">= 1.5"))
    if {"rmt_chunk", "transformer_lm"} <= med.keys():
        goals.append(("RMT / transformer_lm eval-lm cost per token",
                      med["transformer_lm"]["eval_tps"] / med["rmt_chunk"]["eval_tps"], "<= 1.3"))
    if goals:
        lines += ["", "| ratio | measured | goal |", "|---|---|---|"]
        lines += [f"| {what} | {value:.3f} | {goal} |" for what, value, goal in goals]
    if sweep_rows:
        lines += ["", f"Saved for backward (MB) by one RMT training batch (B = {args.batch_size}, m = {m}):", "",
                  "| K | depth | chunk, one backward per batch (before) | chunk, backward per chain | "
                  "chunk, --memory-replay | sliding, --memory-replay |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['K']} | {r['depth']} | {r['one_backward']:.1f} | {r['chunk']:.1f} | {r['chunk_replay']:.1f} "
                  f"| {r['sliding_replay']:.1f} |" for r in sweep_rows]
        if cuda:
            lines += ["", "The CUDA allocator's peak (MB) over the same batches (weights, gradients and optimizer "
                      "state included):", "", "| K | depth | chunk, one backward per batch (before) | chunk, "
                      "backward per chain | chunk, --memory-replay | sliding, --memory-replay |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['K']} | {r['depth']} | {r['one_backward_gpu']:.1f} | {r['chunk_gpu']:.1f} | "
                      f"{r['chunk_replay_gpu']:.1f} | {r['sliding_replay_gpu']:.1f} |" for r in sweep_rows]
    return "\n".join(lines)


def main():
    args = parse_args()
    args.data = os.path.abspath(args.data)
    if args.worker:
        print(json.dumps((profile_step if args.profile else measure)(args.worker, args)))
        return
    if args.profile:
        for name in args.models:
            result = run_worker(args, "--worker", name, "--profile")
            print(f"### {MODELS[name]}: one training step of {result['tokens']} tokens\n\n{result['table']}\n\n"
                  f"{result['products']}\n")
        return
    if args.sweep or args.ceiling:
        print(json.dumps(sweep(args) if args.sweep else ceiling(args)))
        return
    peak_flops = run_worker(args, "--ceiling")
    # A model that fails (on a GPU run there is one try) is named in the output, the others measured.
    results, failed = {name: [] for name in args.models}, {}
    for repeat in range(args.repeats):
        for name in args.models:
            if name in failed:
                continue
            try:
                results[name].append(run_worker(args, "--worker", name))
            except RuntimeError as error:
                failed[name] = str(error).strip().splitlines()[-1]
                print(error, file=sys.stderr, flush=True)
                continue
            print(f"repeat {repeat + 1}: {name} {results[name][-1]}", file=sys.stderr, flush=True)
    try:
        sweep_rows = None if args.no_sweep else run_worker(args, "--sweep")
    except RuntimeError as error:
        sweep_rows, failed["sweep"] = None, str(error).strip().splitlines()[-1]
        print(error, file=sys.stderr, flush=True)
    table = tables(args, {name: runs for name, runs in results.items() if runs}, sweep_rows, peak_flops)
    if failed:
        table += "\n\nFailed:\n" + "\n".join(f"- {MODELS.get(name, name)}: {error}" for name, error in failed.items())
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
