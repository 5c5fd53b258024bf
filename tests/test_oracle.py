"""Oracle: with no memory tokens our model *is* Transformer-XL, so it must reproduce an
independent implementation, HuggingFace's ``TransfoXLLMHeadModel`` (transformers 4.35.2),
given the same weights, segment after segment, with each side carrying its own cache.

Plain softmax on both sides (HF: ``cutoffs=[]``, ``div_val=1``, tied input/output weights),
post-LayerNorm, untied ``r_w_bias``/``r_r_bias`` per layer, eval mode.
"""

import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from fairseq import models
from fairseq.data import Dictionary
from omegaconf import OmegaConf

import rmt_plugin  # noqa: F401  (registers the "rmt" model with fairseq)
from rmt_plugin.model import RMTConfig, RMTState

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 4.35 announces TransfoXL's deprecation; it still works
    from transformers.models.transfo_xl import TransfoXLConfig, TransfoXLLMHeadModel

VOCAB = 50  # fairseq's 4 specials + 46 words; HF simply gets vocab_size = len(dictionary)
SEG_LEN = 6
N_SEGMENTS = 3
BSZ = 2
TOL = 1e-5
# n_head * d_head != d_model, so a head split/merge along the wrong axis cannot pass by luck.
BACKBONE = dict(n_layer=3, d_model=24, n_head=3, d_head=10, d_inner=40)

CASES = {
    # cache = segment length: every segment after the first sees exactly the previous one
    "mem_len=seg_len": dict(mem_len=SEG_LEN),
    # longer cache: it grows (0 -> 6 -> 9 positions) and is then trimmed to its oldest-first tail
    "mem_len>seg_len": dict(mem_len=9),
    # distances reach mem_len + seg_len - 1 = 11, well past the clamp
    "clamp_len": dict(mem_len=SEG_LEN, clamp_len=4),
    "same_length": dict(mem_len=SEG_LEN, same_length=True),
    "same_length, mem_len>seg_len": dict(mem_len=9, same_length=True),
}


# --------------------------------------------------------------------------- the two models
def make_dictionary():
    d = Dictionary()
    for i in range(VOCAB - len(d)):
        d.add_symbol(f"w{i}")
    assert len(d) == VOCAB
    return d


def build_ours(mem_len, clamp_len=-1, same_length=False):
    """Through fairseq's registry, as fairseq-train does once the config is composed."""
    dictionary = make_dictionary()
    task = SimpleNamespace(target_dictionary=dictionary, source_dictionary=dictionary)
    cfg = OmegaConf.structured(RMTConfig(
        **BACKBONE, dropout=0.0, dropatt=0.0, num_mem_tokens=0, mem_len=mem_len, clamp_len=clamp_len,
        same_length=same_length, pre_lnorm=False, tie_weights=True, adaptive_softmax_cutoff=None,
    ))
    cfg._name = "rmt"
    return models.build_model(cfg, task).eval()


def build_hf(mem_len, clamp_len=-1, same_length=False):
    config = TransfoXLConfig(
        vocab_size=VOCAB, cutoffs=[], div_val=1, adaptive=True, tie_word_embeddings=True,
        d_model=BACKBONE["d_model"], d_embed=BACKBONE["d_model"], n_head=BACKBONE["n_head"],
        d_head=BACKBONE["d_head"], d_inner=BACKBONE["d_inner"], n_layer=BACKBONE["n_layer"],
        mem_len=mem_len, same_length=same_length,
        clamp_len=max(clamp_len, 0),  # HF clamps only when > 0; our "off" is -1
        untie_r=True, pre_lnorm=False, attn_type=0, dropout=0.0, dropatt=0.0,
    )
    model = TransfoXLLMHeadModel(config).eval()
    # Random values everywhere (LayerNorm gains/biases and output bias included): at their
    # initial values (ones/zeros) a swapped or skipped LayerNorm or bias would go unnoticed.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("layer_norm.weight") else 0.3 * noise)
    return model


# --------------------------------------------------------------------------- weight mapping
_LAYER_RENAMES = [
    (r"dec_attn\.(qkv_net|r_net|o_net)\.weight", r"attn.\1.weight"),
    (r"dec_attn\.(r_w_bias|r_r_bias)", r"attn.\1"),
    (r"dec_attn\.layer_norm\.(weight|bias)", r"attn_norm.\1"),
    (r"pos_ff\.CoreNet\.(0|3)\.(weight|bias)", r"ff.\1.\2"),
    (r"pos_ff\.layer_norm\.(weight|bias)", r"ff_norm.\1"),
]
# HF buffers that are not weights: Transformer-XL's fixed sinusoid frequencies, which our model
# recomputes (the logits comparison covers them).
HF_NOT_WEIGHTS = {"transformer.pos_emb.inv_freq"}


def our_name(hf_name):
    """Our state_dict key for an HF state_dict key (None if it has no counterpart)."""
    fixed = {
        "transformer.word_emb.emb_layers.0.weight": "decoder.embed_tokens.weight",
        # tied to the word embedding in HF (checked in map_weights), as ours is
        "crit.out_layers.0.weight": "decoder.embed_tokens.weight",
        "crit.out_layers.0.bias": "decoder.out_bias",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    layer = re.fullmatch(r"transformer\.layers\.(\d+)\.(.+)", hf_name)
    if layer:
        for pattern, replacement in _LAYER_RENAMES:
            if re.fullmatch(pattern, layer.group(2)):
                return f"decoder.layers.{layer.group(1)}." + re.sub(pattern, replacement, layer.group(2))
    return None


def map_weights(hf_model, ours):
    """Copy every HF weight into ours; fail if any weight on either side is left out."""
    hf_state = hf_model.state_dict()
    our_keys = set(ours.state_dict())
    # Tied output weights: only then is mapping both HF names onto our one embedding right.
    assert hf_model.crit.out_layers[0].weight is hf_model.transformer.word_emb.emb_layers[0].weight

    mapped, sources = {}, {}
    for hf_key, value in hf_state.items():
        if hf_key in HF_NOT_WEIGHTS:
            continue
        key = our_name(hf_key)
        assert key is not None, f"HF weight {hf_key} has no counterpart in our model"
        assert key in our_keys, f"HF weight {hf_key} mapped to {key}, which our model lacks"
        if key in mapped:  # only the tied pair may share a target, and they hold the same tensor
            assert torch.equal(mapped[key], value), f"{hf_key} and {sources[key]} both map to {key}"
        mapped[key], sources[key] = value.clone(), hf_key
    unmapped = our_keys - set(mapped)
    assert not unmapped, f"our weights with no HF counterpart: {sorted(unmapped)}"
    ours.load_state_dict(mapped, strict=True)  # also checks every shape
    return mapped


# --------------------------------------------------------------------------- running segments
def segments(seed=1):
    gen = torch.Generator().manual_seed(seed)
    # every id, specials included: the models do not treat them differently
    stream = torch.randint(0, VOCAB, (BSZ, SEG_LEN * N_SEGMENTS), generator=gen)
    return stream.split(SEG_LEN, dim=1)


@torch.no_grad()
def run_both(ours, hf_model):
    """Per segment: (our log-probs, HF log-probs, our cache, HF mems), each side carrying its own."""
    d_model = BACKBONE["d_model"]
    # HF's default first-segment mems (mems=None) are mem_len *zero vectors* that the first
    # segment attends to; Transformer-XL (Dai et al.'s code) and our model start with an empty
    # cache. Passing empty mems makes HF start like the original.
    mems = [torch.zeros(0, BSZ, d_model) for _ in range(BACKBONE["n_layer"])]
    state = None
    results = []
    for tokens in segments():
        net_output = ours(tokens, state=state)
        state = net_output[1]["state"]
        assert isinstance(state, RMTState)
        our_lprobs = ours.get_normalized_probs(net_output, log_probs=True)
        hf_out = hf_model(input_ids=tokens, mems=mems)
        mems = hf_out.mems
        results.append((our_lprobs, hf_out.prediction_scores, state.cache, mems))
    return results


def max_diff(results):
    worst = 0.0
    for our_lprobs, hf_lprobs, _, _ in results:
        worst = max(worst, (our_lprobs - hf_lprobs).abs().max().item())
    return worst


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_transformer_xl_matches_huggingface_over_three_segments(case):
    flags = CASES[case]
    torch.manual_seed(0)
    ours, hf_model = build_ours(**flags), build_hf(**flags)
    map_weights(hf_model, ours)
    results = run_both(ours, hf_model)

    mem_len = flags["mem_len"]
    for i, (our_lprobs, hf_lprobs, cache, mems) in enumerate(results):
        assert our_lprobs.shape == hf_lprobs.shape == (BSZ, SEG_LEN, VOCAB)
        # HF's prediction_scores are log-probabilities when no labels are given: each row
        # exponentiates to a distribution. Comparing them to our log-probs is apples to apples.
        torch.testing.assert_close(hf_lprobs.exp().sum(-1), torch.ones(BSZ, SEG_LEN))
        diff = (our_lprobs - hf_lprobs).abs().max().item()
        assert diff <= TOL, f"segment {i}: max |log p ours - log p HF| = {diff:.3g}"
        # The carried state matches too: one cache per layer, the last min(mem_len, seen)
        # positions of each layer's input, ours [B, L, d] against HF's [L, B, d].
        expected_len = min(mem_len, SEG_LEN * (i + 1))
        assert len(cache) == len(mems) == BACKBONE["n_layer"]
        for layer, (ours_c, hf_m) in enumerate(zip(cache, mems)):
            assert ours_c.shape == (BSZ, expected_len, BACKBONE["d_model"]), f"layer {layer}"
            cache_diff = (ours_c - hf_m.transpose(0, 1)).abs().max().item()
            assert cache_diff <= TOL, f"segment {i}, layer {layer}: cache differs by {cache_diff:.3g}"

    # The later segments depended on the cache: rerunning segment 2 with a fresh state changes
    # it, so the agreement above really covered the carried state (not just one segment 3 times).
    with torch.no_grad():
        fresh = ours.get_normalized_probs(ours(segments()[1]), log_probs=True)
    assert (fresh - results[1][0]).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("weight", [
    "decoder.layers.1.attn.r_r_bias",  # only reaches the output through the relative positions
    "decoder.layers.2.ff_norm.bias",  # the very last LayerNorm
])
def test_negative_control_one_perturbed_weight_breaks_the_match(weight):
    """The oracle can fail: nudging a single mapped weight pushes the difference past TOL."""
    flags = CASES["clamp_len"]
    ours, hf_model = build_ours(**flags), build_hf(**flags)
    map_weights(hf_model, ours)
    assert max_diff(run_both(ours, hf_model)) <= TOL  # same setup, untouched: it passes
    with torch.no_grad():
        ours.state_dict()[weight].view(-1)[0] += 0.5
    assert max_diff(run_both(ours, hf_model)) > 100 * TOL


@pytest.mark.parametrize("case, ours_without_it", [
    ("mem_len>seg_len", dict(mem_len=SEG_LEN)),
    ("clamp_len", dict(mem_len=SEG_LEN)),
    ("same_length", dict(mem_len=SEG_LEN)),
    ("same_length, mem_len>seg_len", dict(mem_len=9)),
])
def test_each_case_exercises_its_feature(case, ours_without_it):
    """Our model without the case's feature no longer matches HF with it, so each passing case
    above really checked that feature (e.g. the distances did exceed clamp_len)."""
    ours, hf_model = build_ours(**ours_without_it), build_hf(**CASES[case])
    map_weights(hf_model, ours)
    assert max_diff(run_both(ours, hf_model)) > 100 * TOL


def test_weight_mapping_rejects_a_model_with_an_extra_weight():
    """map_weights' completeness check bites: a weight HF does not have is reported."""
    flags = CASES["mem_len=seg_len"]
    ours, hf_model = build_ours(**flags), build_hf(**flags)
    ours.decoder.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(AssertionError, match="decoder.extra"):
        map_weights(hf_model, ours)
