"""Probes behind docs/memory_in_lm.md: is the memory written, read, learned?

Each probe trains (or builds) a small model in-process with the plugin's model and criterion, one
thread, seconds to minutes on a CPU:

  sensitivity  untrained 2-layer d_model 64 models, post-/pre-LN x init 0.02/0.1, run into the
               steady state of their carried memory: how much the written memory changes when one
               segment token changes, how much the logits change when the memory is swapped for
               another stream's, and the memory's norm against the token embeddings'.
  recall       a synthetic stream: random filler, and every ~40 tokens "STORE v" ... "RECALL v"
               1-2 segments later; recall accuracy with the memory carried and reset every segment.
               --recall-only puts the loss on the recalled tokens alone (no filler noise).
  lm           a language model on a fairseq data-bin (e.g. byte-level WikiText-2): bits per token
               on the start of the validation split as one stream, carried and with the memory /
               cache reset every segment, by position within the segment.

    python scripts/memory_probes.py sensitivity
    python scripts/memory_probes.py recall --pre-lnorm --init-std 0.1 --segments 3 --depth 2 [--recall-only]
  spread       a trained checkpoint (--path) run over a split of its data-bin as --batch streams:
               how far each stream's memory is from the streams' mean, relative to its norm, after
               1, 5, 20 and 100 segments (a memory that carries nothing about its stream goes to 0).

    python scripts/memory_probes.py lm --data data-bin/wikitext2-bytes --pre-lnorm --init-std 0.1 --m 8
    python scripts/memory_probes.py spread --path checkpoints/rmt/checkpoint_last.pt --data data-bin/wikitext2-bytes
"""

import argparse
import math
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from fairseq.data import Dictionary, data_utils

from rmt_plugin.bptt import SCHEDULES
from rmt_plugin.criterion import RMTLMCriterion
from rmt_plugin.model import RMTConfig, RMTLanguageModel, RMTState
from rmt_plugin.task import TokenStream


def build(dictionary, args, segment_length, segments=1):
    cfg = RMTConfig(n_layer=args.layers, d_model=args.d_model, n_head=2, d_head=args.d_model // 2,
                    d_inner=2 * args.d_model, dropout=0.0, num_mem_tokens=args.m, mem_len=args.mem_len,
                    pre_lnorm=args.pre_lnorm, init_std=args.init_std)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary,
                           cfg=SimpleNamespace(tokens_per_sample=segment_length, segments_per_sample=segments))
    return RMTLanguageModel.build_model(cfg, task), task


def train(model, task, args, streams, targets):
    """Adam on batches of K*T columns of ``streams`` [B, N], memory carried between batches; with
    ``--warmup-segment W`` the first ``--warmup-updates`` read segments of W (the segment-length
    schedule of --tokens-per-sample-schedule), the memory starting fresh at the switch."""
    criterion = RMTLMCriterion(task, bptt_depth=args.depth, bptt_mode=args.bptt_mode)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    carried, start, offset = None, time.time(), 0
    for update in range(args.updates):
        warm = getattr(args, "warmup_segment", 0) and update < args.warmup_updates
        length = args.warmup_segment if warm else task.cfg.tokens_per_sample
        width = length * task.cfg.segments_per_sample
        if update == getattr(args, "warmup_updates", 0) or offset + width > streams.size(1):
            carried, offset = None, 0  # a new pass (or a new segment length) starts from fresh memory
        sample = {"net_input": {"src_tokens": streams[:, offset:offset + width]},
                  "target": targets[:, offset:offset + width], "stream": {"segment_length": length}}
        offset += width
        loss, sample_size, _, carried = criterion.forward_with_state(model, sample, carried)
        optimizer.zero_grad()
        (loss / sample_size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        if (update + 1) % max(args.updates // 5, 1) == 0:
            print(f"update {update + 1}: train {loss.item() / sample_size / math.log(2):.3f} bits/token, "
                  f"{time.time() - start:.0f}s", flush=True)


@torch.no_grad()
def stream_nll(model, tokens, targets, segment_length, reset):
    """Per-token nll [N] (nats) of one stream, the state carried or reset at every segment."""
    model.eval()
    state, nll = None, []
    for s in range(0, tokens.numel() - segment_length + 1, segment_length):
        if reset == "memory" and state is not None:
            state = RMTState(None, state.cache)
        elif reset == "cache" and state is not None:
            state = RMTState(state.memory, None)
        logits, extra = model(tokens[None, s:s + segment_length], state=state)
        state = extra["state"]
        nll.append(F.cross_entropy(logits[0].float(), targets[s:s + segment_length], reduction="none"))
    model.train()
    return torch.cat(nll)


# ------------------------------------------------------------------------------------ sensitivity
def sensitivity(args):
    dictionary = Dictionary()
    for i in range(60):
        dictionary.add_symbol(f"w{i}")
    g = torch.Generator().manual_seed(0)
    print("| setting | memory change, 1 of 16 tokens changed | logit change, memory swapped | |memory| / |token| |")
    print("|---|---|---|---|")
    for pre_lnorm, init_std in ((False, 0.02), (True, 0.02), (False, 0.1), (True, 0.1)):
        torch.manual_seed(0)
        args.pre_lnorm, args.init_std = pre_lnorm, init_std
        model = build(dictionary, args, 16)[0].eval()
        decoder, state = model.decoder, None
        with torch.no_grad():
            for _ in range(20):  # into the steady state of the carried memory
                state = model(torch.randint(4, 60, (8, 16), generator=g), state=state)[1]["state"]
            x = torch.randint(4, 60, (8, 16), generator=g)
            changed = x.clone()
            changed[:, 5] = (changed[:, 5] - 4 + 7) % 56 + 4
            memory = model(x, state=state)[1]["state"].memory
            write = (model(changed, state=state)[1]["state"].memory - memory).norm() / memory.norm()
            logits = model(x, state=state)[0]
            swapped = model(x, state=RMTState(state.memory.roll(1, 0), None))[0]
            read = (swapped - logits).norm() / logits.norm()
            tokens = (decoder.embed_tokens(x) * decoder.embed_scale).norm(dim=-1).mean()
            ratio = state.memory.norm(dim=-1).mean() / tokens
        name = f"{'pre' if pre_lnorm else 'post'}-LN, init {init_std}"
        print(f"| {name} | {write:.2%} | {read:.2%} | {ratio:.1f} |")


# ------------------------------------------------------------------------------------ recall
def recall_stream(length, segment_length, filler, values, store, recall, gen):
    """Random filler; every event ``STORE v`` ... (1-2 segments later) ``RECALL v``."""
    tokens = torch.randint(4, 4 + filler, (length,), generator=gen)
    recalled, i = [], 0
    while True:
        gap = int(torch.randint(segment_length, 2 * segment_length + 1, (1,), generator=gen))
        if i + gap + 2 >= length:
            return tokens, torch.tensor(recalled)
        v = 4 + filler + int(torch.randint(0, values, (1,), generator=gen))
        tokens[i], tokens[i + 1], tokens[i + gap], tokens[i + gap + 1] = store, v, recall, v
        recalled.append(i + gap + 1)
        i += gap + 2 + int(torch.randint(0, segment_length, (1,), generator=gen))


def recall(args):
    filler, values, T = 32, 8, args.segment
    dictionary = Dictionary()
    for i in range(filler + values + 2):
        dictionary.add_symbol(f"s{i}")
    store, recall_marker = 4 + filler + values, 5 + filler + values
    torch.manual_seed(args.seed)
    model, task = build(dictionary, args, T, args.segments)
    gen = torch.Generator().manual_seed(1000 + args.seed)
    length = max(T, args.warmup_segment) * args.segments * (args.updates + 1) + 1
    rows = [recall_stream(length, T, filler, values, store, recall_marker, gen) for _ in range(args.batch)]
    streams = torch.stack([tokens for tokens, _ in rows])
    targets = streams.clone()
    if args.recall_only:
        keep = torch.zeros_like(streams, dtype=torch.bool)
        for row, (_, positions) in enumerate(rows):
            keep[row, positions] = True
        targets = streams.masked_fill(~keep, dictionary.pad())
    train(model, task, args, streams[:, :-1], targets[:, 1:])
    tokens, positions = recall_stream(8193, T, filler, values, store, recall_marker, torch.Generator().manual_seed(7))
    asked = positions - 1  # the targets at these input positions are the recalled values
    for reset in ("none", "memory", "cache"):
        if (reset == "memory" and not args.m) or (reset == "cache" and not args.mem_len):
            continue
        model.eval()
        state, right = None, []
        with torch.no_grad():
            for s in range(0, 8192 - T + 1, T):
                if reset != "none" and state is not None:
                    state = RMTState(None, state.cache) if reset == "memory" else RMTState(state.memory, None)
                logits, extra = model(tokens[None, s:s + T], state=state)
                state = extra["state"]
                here = asked[(asked >= s) & (asked < s + T)]
                right.append(logits[0, here - s].argmax(-1) == tokens[here + 1])
        print(f"recall accuracy, {'carried' if reset == 'none' else reset + ' reset every segment'}: "
              f"{torch.cat(right).float().mean():.3f} (chance {1 / values:.3f})")


# ------------------------------------------------------------------------------------ lm
def lm(args):
    dictionary = Dictionary.load(f"{args.data}/dict.txt")

    def split(name):
        stream = TokenStream(data_utils.load_indexed_dataset(f"{args.data}/{name}", dictionary),
                             dictionary.eos(), name)
        return stream.sources_and_targets(0, len(stream))

    torch.manual_seed(args.seed)
    model, task = build(dictionary, args, args.segment, args.segments)
    sources, targets = split("train")
    per_row = len(sources) // args.batch
    train(model, task, args, sources[:per_row * args.batch].view(args.batch, per_row),
          targets[:per_row * args.batch].view(args.batch, per_row))
    sources, targets = split("valid")
    n = args.eval_tokens // args.segment * args.segment
    print(f"validation, first {n} tokens as one stream (bits/token): all | positions 0-3 | 4-15 | 16+")
    for reset in ("none", "memory", "cache"):
        if (reset == "memory" and not args.m) or (reset == "cache" and not args.mem_len):
            continue
        bits = stream_nll(model, sources[:n], targets[:n], args.segment, reset).view(-1, args.segment).mean(0)
        bits = bits / math.log(2)
        print(f"  {'carried' if reset == 'none' else reset + ' reset every segment':<28}{bits.mean():.4f} | "
              f"{bits[:4].mean():.3f} | {bits[4:16].mean():.3f} | {bits[16:].mean():.3f}")


# ------------------------------------------------------------------------------------ spread
@torch.no_grad()
def spread(args):
    from fairseq import checkpoint_utils

    import rmt_plugin  # noqa: F401  (registers the task and model for the checkpoint)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": args.data})
    model = models[0].eval()
    task.load_dataset(args.split)
    batches = task.eval_lm_dataloader(task.dataset(args.split), batch_size=args.batch)
    state, report = None, (1, 5, 20, 100)
    print(f"memory of {args.batch} streams of {args.split}: mean distance from their mean / mean norm")
    for i, sample in enumerate(batches, start=1):
        state = model(sample["net_input"]["src_tokens"], state=state)[1]["state"]
        if i in report:
            memory = state.memory.float()
            distance = (memory - memory.mean(0, keepdim=True)).norm(dim=-1).mean()
            print(f"  after {i:>3} segments: {distance / memory.norm(dim=-1).mean():.4f}")
        if i == report[-1]:
            break


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=["sensitivity", "recall", "lm", "spread"])
    parser.add_argument("--path", help="spread: a checkpoint of an RMT model")
    parser.add_argument("--split", default="test", help="spread: the split run")
    parser.add_argument("--data", help="lm, spread: a fairseq data-bin")
    parser.add_argument("--m", type=int, default=4, help="memory tokens")
    parser.add_argument("--mem-len", type=int, default=0, help="Transformer-XL cache")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--pre-lnorm", action="store_true")
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--segment", type=int, default=16, help="segment length T")
    parser.add_argument("--segments", type=int, default=2, help="segments per batch row K")
    parser.add_argument("--depth", type=int, default=1, help="BPTT depth")
    parser.add_argument("--bptt-mode", default="chunk", choices=list(SCHEDULES))
    parser.add_argument("--warmup-segment", type=int, default=0,
                        help="recall: the first --warmup-updates read segments of this length (0: off)")
    parser.add_argument("--warmup-updates", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--recall-only", action="store_true", help="recall: loss on the recalled tokens only")
    parser.add_argument("--eval-tokens", type=int, default=40000, help="lm: validation tokens scored")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"sensitivity": sensitivity, "recall": recall, "lm": lm, "spread": spread}[args.probe](args)


if __name__ == "__main__":
    main()
