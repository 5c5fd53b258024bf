"""Named architectures: resolved from the command line exactly as fairseq-train does, they give
the paper configurations (Transformer-XL base backbones of Dai et al. 2019, which the RMT paper
reuses), the published parameter counts, and the memory/cache settings their names say.
"""

import argparse
import functools

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY

import rmt_plugin  # noqa: F401  (registers the archs, so the registry listing below sees them)
from paper import ENWIK8_BASE, PAPER_COMMON, WT103_BASE  # tests/paper.py
from rmt_plugin.model import RMTConfig

# The authors' vocabulary sizes (n_token in LM-RMT's result CSVs). fairseq's Dictionary adds 4
# specials to a dict.txt, so a dict.txt of 4 fewer entries gives exactly the authors' size.
WT103_TYPES = 267_735
ENWIK8_TYPES = 204
FAIRSEQ_SPECIALS = 4

# Each named paper architecture is one row of the paper's tables (memory tokens m, cache L).
PAPER_ARCHS = {
    "baseline_wt103_base": dict(WT103_BASE, num_mem_tokens=0, mem_len=0),           # 29.95
    "transformer_xl_wt103_base": dict(WT103_BASE, num_mem_tokens=0, mem_len=150),   # 24.12
    "rmt_wt103_base": dict(WT103_BASE, num_mem_tokens=10, mem_len=0),               # 26.85 .. 25.04
    "memtr_wt103_base": dict(WT103_BASE, num_mem_tokens=10, mem_len=0, memory_layout="memtr"),  # 29.63
    # 24.30, 23.99: with the paper's memory-token loss, whose target symbol the model appends
    "rmt_xl_wt103_base": dict(WT103_BASE, num_mem_tokens=10, mem_len=150, memory_target_token=True),
    "baseline_enwik8_base": dict(ENWIK8_BASE, num_mem_tokens=0, mem_len=0),         # 1.402
    "transformer_xl_enwik8_base": dict(ENWIK8_BASE, num_mem_tokens=0, mem_len=200),  # 1.140
    "rmt_enwik8_base": dict(ENWIK8_BASE, num_mem_tokens=20, mem_len=0),             # 1.301 .. 1.222
}
BACKBONE_FIELDS = ("n_layer", "d_model", "n_head", "d_head", "d_inner", "dropout", "dropatt", "pre_lnorm",
                   "adaptive_softmax_cutoff", "div_val", "tie_weights", "clamp_len", "same_length")

# n_all_param of the authors' runs (LM-RMT, experiment_results/results_wt103_enwik8_all_parameters.csv).
AUTHORS_COUNTS = {
    "baseline_wt103_base": 151_107_538,
    "transformer_xl_wt103_base": 151_107_538,
    "rmt_wt103_base": 151_111_638,  # m = 10
    "memtr_wt103_base": 151_111_638,
    "baseline_enwik8_base": 41_055_436,
    "transformer_xl_enwik8_base": 41_055_436,
    "rmt_enwik8_base": 41_065_676,  # m = 20
}

# Every architecture registered for the "rmt" model, so a family added later is covered too.
ALL_ARCHS = list(ARCH_MODEL_INV_REGISTRY["rmt"])
NAMED_ARCHS = [a for a in ALL_ARCHS if a != "rmt"]
FAMILY_ARCHS = [a for a in NAMED_ARCHS if a not in PAPER_ARCHS]  # rmt/transformer_xl/rmt_xl_<size>


def family_of(arch):
    for prefix in ("transformer_xl_", "rmt_xl_", "rmt_"):
        if arch.startswith(prefix):
            return arch[len(prefix):]
    raise AssertionError(f"{arch}: not named <rmt|transformer_xl|rmt_xl>_<family>")


# --------------------------------------------------------------------------- fairseq's CLI path
@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """fairseq-preprocess-like directories holding only a dict.txt of the right size."""
    dirs = {}
    for name, n_types in (("wt103", WT103_TYPES - FAIRSEQ_SPECIALS), ("enwik8", ENWIK8_TYPES - FAIRSEQ_SPECIALS),
                          ("small", 100)):
        path = tmp_path_factory.mktemp(name)
        (path / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(n_types)))
        dirs[name] = str(path)
    return dirs


@functools.lru_cache(maxsize=None)
def resolve(data_dir, arch, *extra):
    """The composed config fairseq-train would run with: argparse, arch defaults, then OmegaConf."""
    argv = [data_dir, "--task", "rmt_lm", "--arch", arch, "--user-dir", "rmt_plugin",
            "--batch-size", "1", *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    return convert_namespace_to_omegaconf(args)


@functools.lru_cache(maxsize=None)
def setup_task(data_dir):
    return tasks.setup_task(resolve(data_dir, "rmt").task)


def count_parameters(data_dir, arch):
    """Built on the meta device: the count is structural, and three real 151M-parameter models
    would cost seconds and gigabytes each for nothing."""
    cfg = resolve(data_dir, arch)
    with torch.device("meta"):
        model = setup_task(data_dir).build_model(cfg.model)
    return sum(p.numel() for p in model.parameters()), model


def data_dir_for(dirs, name):
    return dirs["wt103" if "wt103" in name else "enwik8" if "enwik8" in name else "small"]


# --------------------------------------------------------------------------- configs
def test_paper_archs_are_exactly_the_named_base_archs():
    assert sorted(a for a in NAMED_ARCHS if "base" in a) == sorted(PAPER_ARCHS)


@pytest.mark.parametrize("arch", list(PAPER_ARCHS))
def test_paper_archs_resolve_to_the_paper_row_in_every_field(data_dirs, arch):
    cfg = resolve(data_dir_for(data_dirs, arch), arch).model
    assert set(PAPER_ARCHS[arch]) == set(RMTConfig.__dataclass_fields__) - {"_name"}, "a field has no paper value"
    for name, value in PAPER_ARCHS[arch].items():
        assert cfg[name] == value, f"{arch}: {name} = {cfg[name]!r}, paper: {value!r}"
    assert cfg.n_head * cfg.d_head == cfg.d_model


def test_paper_archs_keep_the_paper_values_when_the_model_defaults_change(monkeypatch):
    """The plugin's defaults may change (e.g. pre-LayerNorm to help small models); a paper arch must
    not. Every default is moved away from the paper value and the arch function gets what fairseq's
    parser then hands it: None for an option not given, but the (new) default for a boolean flag
    not given, so an arch that only fills unset fields would miss the booleans."""
    fields = RMTConfig.__dataclass_fields__
    parsed = {}
    for name, paper in PAPER_COMMON.items():
        choices = {"memory_layout": "memtr", "memory_write_input": "learned", "cache_distance": "stream",
                   "adaptive_softmax_type": "fairseq", "memory_parametrisation": "embedding",
                   "memory_positions": "signed", "cache_content": "segment"}
        other = not paper if isinstance(paper, bool) else choices[name] if name in choices else paper + 1
        monkeypatch.setattr(fields[name], "default", other)
        parsed[name] = other if isinstance(paper, bool) else None
    for arch in PAPER_ARCHS:
        args = argparse.Namespace(**parsed, num_mem_tokens=None, mem_len=None)
        ARCH_CONFIG_REGISTRY[arch](args)
        for name in PAPER_COMMON:
            assert getattr(args, name) == PAPER_ARCHS[arch][name], f"{arch}: {name} follows the changed default"


def test_explicit_boolean_flags_still_override_a_paper_arch(data_dirs):
    cfg = resolve(data_dirs["enwik8"], "rmt_enwik8_base", "--pre-lnorm", "--same-length").model
    assert cfg.pre_lnorm and cfg.same_length


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_memory_and_cache_are_what_the_name_says(data_dirs, arch):
    family = family_of(arch)
    cfg = resolve(data_dir_for(data_dirs, family), arch).model
    if arch.startswith("transformer_xl_"):
        assert cfg.num_mem_tokens == 0 and cfg.mem_len > 0
    elif arch.startswith("rmt_xl_"):
        assert cfg.num_mem_tokens > 0 and cfg.mem_len > 0
    else:
        assert cfg.num_mem_tokens > 0 and cfg.mem_len == 0
    assert cfg.memory_layout == "rmt" and not cfg.mem_attend_cache  # the paper's RMT defaults


@pytest.mark.parametrize("family", sorted({family_of(a) for a in FAMILY_ARCHS}))
def test_a_family_shares_one_backbone_and_its_sizes(data_dirs, family):
    data_dir = data_dir_for(data_dirs, family)
    rmt, xl, both = (resolve(data_dir, f"{v}_{family}").model for v in ("rmt", "transformer_xl", "rmt_xl"))
    for name in BACKBONE_FIELDS:
        assert rmt[name] == xl[name] == both[name], f"{family}: {name} differs between variants"
    # Tr-XL + RMT is exactly the union: RMT's memory and Transformer-XL's cache
    assert both.num_mem_tokens == rmt.num_mem_tokens
    assert both.mem_len == xl.mem_len


def test_bare_rmt_arch_is_the_no_memory_baseline(data_dirs):
    cfg = resolve(data_dirs["small"], "rmt").model
    assert cfg.num_mem_tokens == 0 and cfg.mem_len == 0


def test_command_line_flags_override_the_arch_defaults(data_dirs):
    # Sweeping memory sizes on a named backbone must work: explicit flags win, the rest stays.
    cfg = resolve(data_dirs["wt103"], "rmt_xl_wt103_base", "--num-mem-tokens", "10", "--mem-len", "75",
                  "--n-layer", "4", "--dropout", "0.2").model
    assert (cfg.num_mem_tokens, cfg.mem_len, cfg.n_layer, cfg.dropout) == (10, 75, 4, 0.2)
    assert (cfg.d_model, cfg.n_head, cfg.d_inner) == (410, 10, 2100)


@pytest.mark.parametrize("arch", ["rmt_tiny", "transformer_xl_small", "rmt_xl_small"])
def test_small_archs_use_the_small_scale_values_that_learn_memory(data_dirs, arch):
    # post-LayerNorm with init std 0.02 leaves memory unlearned at these widths (docs/memory_in_lm.md)
    cfg = resolve(data_dirs["small"], arch).model
    assert (cfg.pre_lnorm, cfg.init_std) == (True, 0.1)
    assert cfg.memory_write_input == ("auto" if cfg.num_mem_tokens else "memory")  # the task's: test_memory_tasks
    assert resolve(data_dirs["small"], arch, "--init-std", "0.05").model.init_std == 0.05
    assert resolve(data_dirs["small"], arch, "--memory-write-input", "memory").model.memory_write_input == "memory"


def test_small_memtr_keeps_the_write_input_it_has_no_block_for(data_dirs):
    cfg = resolve(data_dirs["small"], "rmt_tiny", "--memory-layout", "memtr").model
    assert (cfg.memory_layout, cfg.memory_write_input) == ("memtr", "memory")


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("arch", list(AUTHORS_COUNTS))
def test_paper_archs_have_exactly_the_authors_parameter_count(data_dirs, arch):
    count, _ = count_parameters(data_dir_for(data_dirs, arch), arch)
    print(f"\n{arch}: {count:,} parameters, the authors' runs {AUTHORS_COUNTS[arch]:,}")
    assert count == AUTHORS_COUNTS[arch]


def test_the_counts_decompose_as_the_authors_model():
    """The authors' WikiText-103 count, part by part: a tied embedding of the whole vocabulary, an
    output bias per word, 3 cluster weights and biases, 16 layers, one (u, v) pair, m memory vectors;
    enwik8 likewise without clusters. Independent of the code under test: only arithmetic."""
    d, inner, layers = 410, 2100, 16
    layer = 3 * d * d + d * d + d * d + 2 * d + (d * inner + inner + inner * d + d) + 2 * d  # qkv, r, o, LN, FF, LN
    assert WT103_TYPES * d + WT103_TYPES + 3 * d + 3 + layers * layer + 2 * d == AUTHORS_COUNTS["baseline_wt103_base"]
    assert AUTHORS_COUNTS["rmt_wt103_base"] - AUTHORS_COUNTS["baseline_wt103_base"] == 10 * d
    d, inner, layers = 512, 2048, 12
    layer = 5 * d * d + 2 * d + (2 * d * inner + inner + d) + 2 * d
    assert ENWIK8_TYPES * d + ENWIK8_TYPES + layers * layer + 2 * d == AUTHORS_COUNTS["baseline_enwik8_base"]
    assert AUTHORS_COUNTS["rmt_enwik8_base"] - AUTHORS_COUNTS["baseline_enwik8_base"] == 20 * d


def test_wt103_base_parts(data_dirs):
    """Where the WikiText-103 count comes from in ours: the one table of the whole vocabulary at full
    width (div_val 1, no projections), an output bias per word, one shared (u, v) pair; Tr-XL + RMT
    adds the embedding row and output bias of its memory-token loss's target <mem>."""
    _, model = count_parameters(data_dirs["wt103"], "transformer_xl_wt103_base")
    assert len(setup_task(data_dirs["wt103"]).target_dictionary) == WT103_TYPES
    names = {n: p.numel() for n, p in model.named_parameters() if not n.startswith("decoder.layers.")}
    assert names == {"decoder.embed_tokens.tables.0.weight": WT103_TYPES * 410,
                     "decoder.adaptive_softmax.cluster_weight": 3 * 410, "decoder.adaptive_softmax.cluster_bias": 3,
                     "decoder.adaptive_softmax.biases.0": WT103_TYPES,
                     "decoder.r_w_bias": 410, "decoder.r_r_bias": 410}
    both, _ = count_parameters(data_dirs["wt103"], "rmt_xl_wt103_base")
    assert both - AUTHORS_COUNTS["rmt_wt103_base"] == 410 + 1


@pytest.mark.parametrize("family", ["wt103_base", "enwik8_base"])
def test_layer_stack_has_exactly_transformer_xls_parameters(data_dirs, family):
    """Independent count: HF's Transformer-XL layers of the same size, biases shared as in the
    authors' runs (built on the meta device; the layers do not depend on the vocabulary), hold
    exactly as many parameters as ours."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransfoXL is deprecated in transformers 4.35
        from transformers.models.transfo_xl import TransfoXLConfig, TransfoXLLMHeadModel
    cfg = resolve(data_dir_for(data_dirs, family), f"transformer_xl_{family}").model
    hf_config = TransfoXLConfig(vocab_size=16, cutoffs=[], d_model=cfg.d_model, d_embed=cfg.d_model,
                                n_head=cfg.n_head, d_head=cfg.d_head, d_inner=cfg.d_inner, n_layer=cfg.n_layer,
                                div_val=1, untie_r=False, pre_lnorm=False)
    with torch.device("meta"):
        hf_layers = TransfoXLLMHeadModel(hf_config).transformer.layers
    _, ours = count_parameters(data_dir_for(data_dirs, family), f"transformer_xl_{family}")
    # HF's layers hold references to the shared pair, counted once; ours is the decoder's
    shared = ours.decoder.r_w_bias.numel() + ours.decoder.r_r_bias.numel()
    ours_layers = sum(p.numel() for p in ours.decoder.layers.parameters()) + shared
    assert ours_layers == sum(p.numel() for p in hf_layers.parameters())


# --------------------------------------------------------------------------- small models run
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_small_archs_carry_the_state_their_name_says(data_dirs, arch):
    """Built for real and run over two segments: memory and cache exist exactly when promised."""
    data_dir = data_dirs["small"]
    cfg = resolve(data_dir, arch, "--tokens-per-sample", "8").model
    model = setup_task(data_dir).build_model(cfg).eval()
    tokens = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, extra = model(tokens)
        logits, extra = model(tokens, state=extra["state"])
    state = extra["state"]
    assert logits.shape == (2, 8, 104) and torch.isfinite(logits).all()
    if cfg.num_mem_tokens > 0:
        assert state.memory.shape == (2, cfg.num_mem_tokens, cfg.d_model)
    else:
        assert state.memory is None
    if cfg.mem_len > 0:
        assert len(state.cache) == cfg.n_layer
        assert state.cache[0].shape == (2, min(cfg.mem_len, 16), cfg.d_model)  # two segments seen
    else:
        assert state.cache is None
