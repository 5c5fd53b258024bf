"""The paper architectures are the authors' model (LM-RMT, on Transformer-XL's PyTorch code).

Two oracles, the weights of each side mapped from the other's:

* HuggingFace's TransfoXL (float32) (transformers 4.35.2), an implementation of Transformer-XL's code with
  its projected adaptive embedding and softmax (several clusters, div_val 1 and 4, projections tied
  as the authors tie them) and one pair of relative biases for all layers, over segments with a
  cache.
* ``AuthorsRMT`` below (float64): an independent re-implementation of the authors' forward with memory
  tokens, written from reading LM-RMT's ``MemTransformerLM``: sequence-first tensors, the input
  ``[memory; segment; memory]`` with the memory unscaled, their attention mask, Transformer-XL's
  ``_rel_shift`` over the whole key sequence (so memory tokens attending to later ones read what it
  reads there), a cache of the last ``mem_len`` layer inputs over the whole sequence, and the
  written memory taken from the final output (after the output dropout in training).

Each of our options that differs from the authors' code, put back alone, breaks the match.
"""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fairseq import models
from fairseq.data import Dictionary
from omegaconf import OmegaConf

import rmt_plugin  # noqa: F401  (registers the "rmt" model with fairseq)
from rmt_plugin.criterion import RMTLMCriterion
from rmt_plugin.model import RMTConfig

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 4.35 announces TransfoXL's deprecation; it still works
    from transformers.models.transfo_xl import TransfoXLConfig, TransfoXLLMHeadModel

# float64, but the sinusoids are float32 on our side (as in the authors' code): the log-probabilities
# differ by up to ~1e-6 (measured 9.5e-7), the gradients by ~3e-7; the goal is 1e-5
TOL = 1e-5
HF_TOL = 1e-5  # float32 (as tests/test_oracle.py)
BSZ = 2
BACKBONE = dict(n_layer=2, d_model=24, n_head=3, d_head=10, d_inner=40)
# The authors' code in the options where our defaults differ (see PAPER_COMMON in the model).
AUTHORS = dict(share_rel_bias=True, memory_parametrisation="raw", memory_write_dropout=True,
               memory_positions="rel_shift", cache_content="sequence", cache_distance="sequence",
               adaptive_softmax_type="transformer_xl", pre_lnorm=False, tie_weights=True)


def dictionary(size):
    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"w{i}")
    return d


def build_ours(vocab, dtype=torch.double, **flags):
    d = dictionary(vocab)
    task = SimpleNamespace(target_dictionary=d, source_dictionary=d)
    cfg = OmegaConf.structured(RMTConfig(**{**BACKBONE, **AUTHORS, "dropout": 0.0, "dropatt": 0.0, **flags}))
    cfg._name = "rmt"
    return models.build_model(cfg, task).to(dtype).eval()


def randomise(model, seed=0):
    """Random values everywhere (LayerNorm gains and every bias included), so that a skipped or
    swapped one cannot pass unnoticed at its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)


def stream(vocab, seg_len, n_segments, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BSZ, seg_len * n_segments), generator=gen).split(seg_len, dim=1)


# =========================================================================== HF, adaptive softmax
ADAPTIVE_VOCAB = 60
CUTOFFS = [20, 35, 50]


def build_hf(div_val, mem_len):
    config = TransfoXLConfig(
        vocab_size=ADAPTIVE_VOCAB, cutoffs=CUTOFFS, div_val=div_val, adaptive=True, tie_word_embeddings=True,
        proj_share_all_but_first=True,  # the authors' tie_projs for WikiText-103: [False, True, True, True]
        d_embed=BACKBONE["d_model"], untie_r=False, pre_lnorm=False, attn_type=0, dropout=0.0, dropatt=0.0,
        mem_len=mem_len, same_length=False, clamp_len=0, **BACKBONE,
    )
    model = TransfoXLLMHeadModel(config).eval()  # float32: HF's attention mask value overflows in float64
    randomise(model)
    return model


def our_name(hf_name):
    """Our state_dict key for an HF key, or None for a tied copy or a buffer."""
    parts = hf_name.split(".")
    if hf_name.startswith("transformer.word_emb.emb_layers."):
        return f"decoder.embed_tokens.tables.{parts[3]}.weight"
    if hf_name.startswith("transformer.word_emb.emb_projs."):
        return f"decoder.embed_tokens.projections.{parts[3]}"
    if hf_name in ("transformer.r_w_bias", "transformer.r_r_bias"):
        return "decoder." + parts[1]
    if hf_name.startswith("crit.out_layers.") and parts[3] == "bias":
        return f"decoder.adaptive_softmax.biases.{parts[2]}"
    if hf_name in ("crit.cluster_weight", "crit.cluster_bias"):
        return "decoder.adaptive_softmax." + parts[1]
    if hf_name == "crit.out_projs.0":
        return "decoder.adaptive_softmax.projections.0"  # the head's projection is not tied
    if hf_name.startswith(("crit.out_layers.", "crit.out_projs.")) or hf_name.endswith("inv_freq"):
        return None  # tied to the input's table / projection (checked below), or a buffer
    layer, rest = parts[2], ".".join(parts[3:])
    if rest in ("dec_attn.r_w_bias", "dec_attn.r_r_bias"):
        return None  # the model's one pair, which every layer holds (checked below)
    renames = {"dec_attn.qkv_net.weight": "attn.qkv_net.weight", "dec_attn.r_net.weight": "attn.r_net.weight",
               "dec_attn.o_net.weight": "attn.o_net.weight", "dec_attn.layer_norm.weight": "attn_norm.weight",
               "dec_attn.layer_norm.bias": "attn_norm.bias", "pos_ff.layer_norm.weight": "ff_norm.weight",
               "pos_ff.layer_norm.bias": "ff_norm.bias"}
    for i in ("0", "3"):
        for kind in ("weight", "bias"):
            renames[f"pos_ff.CoreNet.{i}.{kind}"] = f"ff.{i}.{kind}"
    return f"decoder.layers.{layer}.{renames[rest]}"


def map_hf_weights(hf_model, ours):
    crit, emb = hf_model.crit, hf_model.transformer.word_emb
    for i, layer in enumerate(crit.out_layers):  # the ties the mapping relies on
        assert layer.weight is emb.emb_layers[i].weight
    for layer in hf_model.transformer.layers:
        assert layer.dec_attn.r_w_bias is hf_model.transformer.r_w_bias
    for i in range(1, len(crit.out_projs)):
        assert crit.out_projs[i] is None or crit.out_projs[i] is emb.emb_projs[i]
    mapped = {}
    for hf_key, value in hf_model.state_dict().items():
        key = our_name(hf_key)
        if key is not None:
            mapped[key] = value
    # HF's forward reads cluster i's head entry at column cutoffs[0] + i - 1; the authors' code
    # (and ours) at column -i (its last row is cluster 1): the same model with the rows reversed.
    for name in ("cluster_weight", "cluster_bias"):
        key = f"decoder.adaptive_softmax.{name}"
        mapped[key] = mapped[key].flip(0)
    ours.load_state_dict(mapped, strict=True)  # every weight of ours, every shape


@torch.no_grad()
def hf_and_ours(div_val, mem_len, seg_len=5, n_segments=3):
    hf_model = build_hf(div_val, mem_len)
    ours = build_ours(ADAPTIVE_VOCAB, torch.float, adaptive_softmax_cutoff=",".join(map(str, CUTOFFS)),
                      div_val=div_val, mem_len=mem_len)
    map_hf_weights(hf_model, ours)
    mems = [torch.zeros(0, BSZ, BACKBONE["d_model"])] * BACKBONE["n_layer"]
    state, diffs = None, []
    for tokens in stream(ADAPTIVE_VOCAB, seg_len, n_segments):
        net_output = ours(tokens, state=state)
        state = net_output[1]["state"]
        lprobs = ours.get_normalized_probs(net_output, log_probs=True)
        hf_out = hf_model(input_ids=tokens, mems=mems)
        mems = hf_out.mems
        diffs.append((lprobs - hf_out.prediction_scores).abs().max().item())
        # the target-only path of training and diagnostics gives the same log-probabilities
        target_lp = ours.decoder.target_log_prob(net_output[0], tokens)
        torch.testing.assert_close(target_lp, lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    return diffs


@pytest.mark.parametrize("div_val", [1, 4])
def test_projected_adaptive_softmax_matches_huggingface_transformer_xl(div_val):
    diffs = hf_and_ours(div_val, mem_len=5)
    assert max(diffs) <= HF_TOL, diffs


def test_the_hf_oracle_fails_with_a_perturbed_cluster_bias():
    """The comparison can fail: HF's cluster entries are in reverse order; mapping them wrongly (here:
    nudging one) must show."""
    hf_model = build_hf(1, 5)
    ours = build_ours(ADAPTIVE_VOCAB, torch.float, adaptive_softmax_cutoff=",".join(map(str, CUTOFFS)), mem_len=5)
    map_hf_weights(hf_model, ours)
    with torch.no_grad():
        ours.decoder.adaptive_softmax.cluster_bias[0] += 0.5
        tokens = stream(ADAPTIVE_VOCAB, 5, 1)[0]
        ours_lp = ours.get_normalized_probs(ours(tokens), log_probs=True)
        hf_lp = hf_model(input_ids=tokens, mems=[torch.zeros(0, BSZ, 24)] * 2).prediction_scores
    assert (ours_lp - hf_lp).abs().max() > 1e-3


def authors_adaptive_log_prob(hidden, target, weight, bias, cluster_weight, cluster_bias, cutoffs):
    """log p(target) as the authors' ProjectedAdaptiveLogSoftmax computes it with div_val 1 and no
    projection: the head scores [shortlist; clusters], a word of cluster i adds its tail's
    log-softmax to the head's log-probability at column -i."""
    bounds = [0, *cutoffs, weight.size(0)]
    head = F.log_softmax(hidden @ torch.cat([weight[:cutoffs[0]], cluster_weight]).T
                         + torch.cat([bias[:cutoffs[0]], cluster_bias]), dim=-1)
    out = []
    for row, word in zip(hidden, target.tolist()):
        cluster = next(i for i in range(len(bounds) - 1) if bounds[i] <= word < bounds[i + 1])
        if cluster == 0:
            out.append(head[len(out), word])
            continue
        lo, hi = bounds[cluster], bounds[cluster + 1]
        tail = F.log_softmax(row @ weight[lo:hi].T + bias[lo:hi], dim=-1)
        out.append(head[len(out), -cluster] + tail[word - lo])
    return torch.stack(out)


def test_cluster_entries_are_read_as_the_authors_code_reads_them():
    ours = build_ours(ADAPTIVE_VOCAB, adaptive_softmax_cutoff=",".join(map(str, CUTOFFS)))
    randomise(ours)
    softmax = ours.decoder.adaptive_softmax
    hidden = torch.randn(ADAPTIVE_VOCAB, 24, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    target = torch.arange(ADAPTIVE_VOCAB)  # every word of every cluster
    with torch.no_grad():
        expected = authors_adaptive_log_prob(hidden, target, ours.decoder.embed_tokens.tables[0].weight,
                                             softmax.biases[0], softmax.cluster_weight, softmax.cluster_bias, CUTOFFS)
        torch.testing.assert_close(softmax.target_log_prob(hidden, target), expected)
        full = softmax.get_log_prob(hidden)
    torch.testing.assert_close(full.gather(1, target[:, None]).squeeze(1), expected)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(ADAPTIVE_VOCAB, dtype=torch.double))


# =========================================================================== the authors' RMT
def sinusoids(distances, d_model):
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, dtype=torch.double) / d_model))
    angles = distances[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(x):
    """Transformer-XL's skew of a [Q, K, ...] score table from 'key column c = distance K-1-c' to
    'key j': pad a zero column in front, read the buffer as [K+1, Q], drop its first row."""
    q_len, k_len = x.shape[:2]
    padded = torch.cat([x.new_zeros(q_len, 1, *x.shape[2:]), x], dim=1)
    return padded.view(k_len + 1, q_len, *x.shape[2:])[1:].reshape(x.shape)


class AuthorsRMT:
    """LM-RMT's ``MemTransformerLM`` forward (attn_type 0, post-LayerNorm, mem_at_end, memory tokens
    not reading the cache), sequence-first, reading the weights of our model by name."""

    def __init__(self, ours, num_mem_tokens, mem_len, dropout=None):
        self.w = dict(ours.named_parameters())  # the same tensors: gradients land on ours
        self.m, self.mem_len = num_mem_tokens, mem_len
        self.n_layer, self.d, self.h, self.dh = (BACKBONE[k] for k in ("n_layer", "d_model", "n_head", "d_head"))
        self.dropout = dropout or (lambda x: x)

    def start_memory(self):
        return self.w["decoder.mem_init"][:, None, :].expand(-1, BSZ, -1)  # [m, B, d], unscaled

    def layer(self, i, h, cache, mask, pos):
        w = lambda name: self.w[f"decoder.layers.{i}.{name}"]  # noqa: E731
        q_len, bsz = h.shape[:2]
        keys = h if cache is None else torch.cat([cache, h])
        q, k, v = (keys @ w("attn.qkv_net.weight").T).chunk(3, dim=-1)
        q, k, v = (t.reshape(t.size(0), bsz, self.h, self.dh) for t in (q[-q_len:], k, v))
        r = (pos @ w("attn.r_net.weight").T).view(-1, self.h, self.dh)
        ac = torch.einsum("ibnd,jbnd->ijbn", q + self.w["decoder.r_w_bias"], k)
        bd = rel_shift(torch.einsum("ibnd,jnd->ijbn", q + self.w["decoder.r_r_bias"], r))
        score = ((ac + bd) / math.sqrt(self.dh)).masked_fill(mask[:, :, None, None], float("-inf"))
        out = torch.einsum("ijbn,jbnd->ibnd", score.softmax(dim=1), v).reshape(q_len, bsz, -1)
        h = F.layer_norm(h + self.dropout(out @ w("attn.o_net.weight").T), (self.d,), w("attn_norm.weight"),
                         w("attn_norm.bias"))
        ff = F.linear(F.relu(F.linear(h, w("ff.0.weight"), w("ff.0.bias"))), w("ff.3.weight"), w("ff.3.bias"))
        return F.layer_norm(h + ff, (self.d,), w("ff_norm.weight"), w("ff_norm.bias"))

    def segment(self, tokens, cache, memory):
        """tokens [T, B] -> (log-probs [T, B, V], next cache, next memory)."""
        seg_len, m = tokens.size(0), self.m
        x = self.w["decoder.embed_tokens.weight"][tokens] * math.sqrt(self.d)
        if m:
            x = torch.cat([memory, x, memory])
        q_len, c_len = x.size(0), cache[0].size(0) if cache else 0
        k_len = c_len + q_len
        mask = torch.ones(q_len, k_len).triu(1 + c_len).bool()
        if m:
            mask[:m, c_len:c_len + m] = False  # read tokens see each other
            mask[:m, :c_len] = True  # and not the cache
            mask[-m:, -m:] = False  # write tokens see each other
            mask[-m:, :c_len] = True
        pos = self.dropout(sinusoids(torch.arange(k_len - 1, -1, -1.0, dtype=torch.double), self.d))
        h = self.dropout(x)
        inputs = []
        for i in range(self.n_layer):
            inputs.append(h)
            h = self.layer(i, h, cache[i] if cache else None, mask, pos)
        h = self.dropout(h)
        new_cache = None
        if self.mem_len:
            new_cache = [(x if cache is None else torch.cat([cache[i], x]))[-self.mem_len:].detach()
                         for i, x in enumerate(inputs)]
        logits = h[m:m + seg_len] @ self.w["decoder.embed_tokens.weight"].T + self.w["decoder.out_bias"]
        return logits.log_softmax(-1), new_cache, (h[-m:] if m else None)


VOCAB = 30
RMT_CASES = {  # (m, mem_len, segment length)
    "RMT": (3, 0, 6),
    "Tr-XL + RMT, cache < sequence": (3, 5, 6),
    "Tr-XL + RMT, cache > sequence": (2, 15, 4),
    "Transformer-XL": (0, 6, 6),
}


def authors_training(authors, batches, depth):
    """LM-RMT's train() loop, one segment per batch: per batch the gradients of its mean loss, and
    its log-probabilities. The memory is the previous batch's output, detached (the first batch:
    the learned start memory). With depth k the last k batches are kept with the cache each
    started with and re-run, losses discarded, from that newest memory, each with its own cache;
    the batch then runs from the memory and the cache of the last re-run."""
    kept, memory, cache, steps = [], None, None, []
    for tokens in batches:
        for p in authors.w.values():
            p.grad = None
        kept = (kept + [(tokens, cache)])[-(depth + 1):]
        m = authors.start_memory() if memory is None else memory.detach()
        c = cache
        for past_tokens, past_cache in kept[:-1]:
            _, c, m = authors.segment(past_tokens, past_cache, m)
        lprobs, cache, memory = authors.segment(tokens, c, m)
        lprobs.gather(-1, targets_of(tokens)[..., None]).mean().neg().backward()
        steps.append((lprobs.detach(), {k: p.grad.clone() for k, p in authors.w.items() if p.grad is not None}))
    return steps


def targets_of(tokens):
    """Each segment's targets: here the tokens themselves, reversed in the vocabulary (any fixed
    function of the batch would do; both sides score the same targets)."""
    return VOCAB - 1 - tokens


def our_training(ours, batches, depth, mode="authors"):
    """The same batches through our criterion's training entrance (rmt_lm's train_step calls it
    this way), one segment per batch, the state carried from batch to batch."""
    dictionary = ours.decoder.dictionary
    task = SimpleNamespace(target_dictionary=dictionary, source_dictionary=dictionary,
                           cfg=SimpleNamespace(tokens_per_sample=batches[0].size(0)))
    criterion = RMTLMCriterion(task, bptt_depth=depth, bptt_mode=mode)
    carried, steps = None, []
    for tokens in batches:
        ours.zero_grad(set_to_none=True)
        sample = {"net_input": {"src_tokens": tokens.T}, "target": targets_of(tokens).T}
        lprobs = []
        hook = ours.decoder.register_forward_hook(lambda mod, args, out: lprobs.append(out[0]))
        _, n_targets, _, carried = criterion.forward_with_state(ours, sample, carried,
                                                                backward=lambda objective: objective.backward())
        hook.remove()
        grads = {k: p.grad / n_targets for k, p in ours.named_parameters() if p.grad is not None}
        steps.append((lprobs[-1].detach().log_softmax(-1).transpose(0, 1), grads))
    return steps


BPTT_CASES = {  # (m, mem_len, segment length, depth)
    "RMT, BPTT-1": (3, 0, 5, 1),
    "RMT, BPTT-2": (3, 0, 5, 2),
    "Tr-XL + RMT, BPTT-2": (2, 4, 5, 2),
}


def compare_training(case, mode="authors"):
    m, mem_len, seg_len, depth = BPTT_CASES[case]
    ours = build_ours(VOCAB, num_mem_tokens=m, mem_len=mem_len, adaptive_softmax_cutoff=None).train()
    randomise(ours)
    batches = [tokens.T.contiguous() for tokens in stream(VOCAB, seg_len, 5)]  # [T, B], one per batch
    reference = authors_training(AuthorsRMT(ours, m, mem_len), batches, depth)
    mine = our_training(ours, batches, depth, mode)
    worst = 0.0
    for (ref_lp, ref_grads), (our_lp, our_grads) in zip(reference, mine):
        worst = max(worst, (ref_lp - our_lp).abs().max().item())
        for name in set(ref_grads) | set(our_grads):  # a gradient only one side has counts in full
            ref_g, our_g = ref_grads.get(name), our_grads.get(name)
            ref_g = torch.zeros_like(our_g) if ref_g is None else ref_g
            our_g = torch.zeros_like(ref_g) if our_g is None else our_g
            worst = max(worst, (ref_g - our_g).abs().max().item())
    return worst


@pytest.mark.parametrize("case", list(BPTT_CASES))
def test_authors_bptt_mode_is_the_authors_training_loop(case):
    """--bptt-mode authors: log-probabilities and every gradient of five training steps equal the
    authors' loop (the re-run from the newest memory, each re-run with its own cache)."""
    assert compare_training(case) <= TOL


@pytest.mark.parametrize("case", list(BPTT_CASES))
def test_our_sliding_bptt_is_not_the_authors_loop(case):
    """The oracle can tell: BPTT as the method describes it (the re-run from the memory the oldest
    re-run segment started with) gives other gradients."""
    assert compare_training(case, mode="sliding") > 1e-4


@torch.no_grad()
def authors_and_ours(m, mem_len, seg_len, n_segments=4, **our_flags):
    ours = build_ours(VOCAB, num_mem_tokens=m, mem_len=mem_len, adaptive_softmax_cutoff=None, **our_flags)
    randomise(ours)
    authors = AuthorsRMT(ours, m, mem_len)
    state, cache, memory = None, None, (authors.start_memory() if m else None)
    diffs = []
    for tokens in stream(VOCAB, seg_len, n_segments):
        net_output = ours(tokens, state=state)
        state = net_output[1]["state"]
        ours_lp = ours.get_normalized_probs(net_output, log_probs=True)
        ref_lp, cache, memory = authors.segment(tokens.T, cache, memory)
        diffs.append((ours_lp - ref_lp.transpose(0, 1)).abs().max().item())
        if m:  # the written memory too
            diffs.append((state.memory - memory.transpose(0, 1)).abs().max().item())
    return diffs


@pytest.mark.parametrize("case", list(RMT_CASES))
def test_paper_options_reproduce_the_authors_forward_segment_after_segment(case):
    diffs = authors_and_ours(*RMT_CASES[case])
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("case, ours_instead", [
    ("RMT", dict(memory_parametrisation="embedding")),  # start memory scaled by sqrt(d_model)
    ("RMT", dict(memory_positions="signed")),  # memory-to-memory distances signed
    ("Tr-XL + RMT, cache < sequence", dict(cache_content="segment")),  # cache of segment positions only
    ("Tr-XL + RMT, cache < sequence", dict(memory_positions="signed")),
    ("Tr-XL + RMT, cache > sequence", dict(cache_content="segment")),
])
def test_each_of_our_own_choices_breaks_the_match(case, ours_instead):
    diffs = authors_and_ours(*RMT_CASES[case], **ours_instead)
    assert max(diffs) > 1e-3, diffs


def test_written_memory_is_taken_after_the_output_dropout():
    """With --memory-write-dropout the next memory is the dropped-out final output: at dropout 0.5
    about half its entries are exactly 0 (never so before the output dropout)."""
    for write_dropout, zeros in ((True, (0.35, 0.65)), (False, (0.0, 0.0))):
        ours = build_ours(VOCAB, num_mem_tokens=8, mem_len=0, dropout=0.5, memory_write_dropout=write_dropout,
                          adaptive_softmax_cutoff=None).train()
        torch.manual_seed(0)
        memory = ours(stream(VOCAB, 6, 1)[0])[1]["state"].memory
        share = memory.eq(0).double().mean().item()
        assert zeros[0] <= share <= zeros[1], (write_dropout, share)


def test_the_paper_initialisation():
    """The start memory is one N(0, 1) vector repeated (m x d parameters); LayerNorm gains ~ N(1, 0.02)."""
    torch.manual_seed(0)
    ours = build_ours(VOCAB, num_mem_tokens=4, mem_len=0, adaptive_softmax_cutoff=None, init_std=0.02,
                      layer_norm_init_std=0.02, d_model=512, n_head=8, d_head=64)
    start = ours.decoder.mem_init
    assert start.shape == (4, 512) and torch.equal(start, start[:1].expand(4, -1))
    assert 0.9 < start.std().item() < 1.1
    gains = torch.cat([ours.decoder.layers[0].attn_norm.weight, ours.decoder.layers[1].ff_norm.weight])
    assert abs(gains.mean().item() - 1) < 0.01 and 0.015 < gains.std().item() < 0.025


def test_validation_carries_the_memory_plainly_as_the_authors_evaluate():
    """In validation (eval mode, no autograd) the authors' schedule re-runs nothing: batch after
    batch the losses are those of the authors' evaluation, the memory read once per segment."""
    m, mem_len, seg_len, depth = BPTT_CASES["Tr-XL + RMT, BPTT-2"]
    ours = build_ours(VOCAB, num_mem_tokens=m, mem_len=mem_len, adaptive_softmax_cutoff=None)
    randomise(ours)
    authors = AuthorsRMT(ours, m, mem_len)
    dictionary = ours.decoder.dictionary
    task = SimpleNamespace(target_dictionary=dictionary, source_dictionary=dictionary,
                           cfg=SimpleNamespace(tokens_per_sample=seg_len))
    criterion = RMTLMCriterion(task, bptt_depth=depth, bptt_mode="authors")
    carried, cache, memory = None, None, authors.start_memory()
    with torch.no_grad():
        for tokens in stream(VOCAB, seg_len, 4):
            sample = {"net_input": {"src_tokens": tokens}, "target": targets_of(tokens)}
            loss, _, _, carried = criterion.forward_with_state(ours.eval(), sample, carried)
            lprobs, cache, memory = authors.segment(tokens.T, cache, memory)
            expected = -lprobs.gather(-1, targets_of(tokens).T[..., None]).sum()
            assert abs(loss.item() - expected.item()) <= TOL * abs(expected.item())
