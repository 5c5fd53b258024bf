"""The RMT paper's configurations (Bulatov et al., NeurIPS 2022), written out from its tables for
the tests (test_architectures.py, test_recipes.py), independently of the plugin's own tables.

Every RMTConfig field has a value here: a field added to the model must get its paper value.
"""

# Transformer-XL base backbones (Dai et al. 2019), as the paper uses them: post-LayerNorm,
# relative attention, tied weights, same_length and clamp_len off, dropout 0.1, dropatt 0.
PAPER_COMMON = dict(dropout=0.1, dropatt=0.0, pre_lnorm=False, init_std=0.02, tie_weights=True,
                    same_length=False, clamp_len=-1, memory_layout="rmt", memory_write_input="memory",
                    mem_attend_cache=False, cache_distance="sequence",  # as in the paper's code
                    div_val=1.0, memory_target_token=False,
                    # the paper's code (LM-RMT), not our defaults: tests/test_authors_model.py checks them
                    adaptive_softmax_type="transformer_xl", share_rel_bias=True, layer_norm_init_std=0.02,
                    memory_parametrisation="raw", memory_write_dropout=True, memory_positions="rel_shift",
                    cache_content="sequence")
WT103_BASE = dict(PAPER_COMMON, n_layer=16, d_model=410, n_head=10, d_head=41, d_inner=2100,
                  adaptive_softmax_cutoff="20000,40000,200000")
ENWIK8_BASE = dict(PAPER_COMMON, n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048,
                   adaptive_softmax_cutoff=None)

# Every LM run: Adam, lr 2.5e-4, cosine schedule without warm-up, clip 0.25.
TRAINING = dict(optimizer="adam", adam_betas="(0.9, 0.999)", adam_eps=1e-8, weight_decay=0.0, lr=[0.00025],
                clip_norm=0.25, lr_scheduler="cosine", warmup_updates=0)
MEMORY_TOKEN_LOSS = 0.01  # Tr-XL + RMT's auxiliary loss weight (appendix)


def row(paper, seg, batch, steps, m=0, mem_len=0, bptt=0, layout="rmt", memory_token_loss=0.0, evals=(),
        eval_seg=None):
    """One row of a table: the test-set number and the settings that differ between rows.
    ``eval_seg``: the authors' eval_tgt_len where it is not the training segment; their evaluation
    then resets the cache to mem_len + seg - eval_seg (LM-RMT's train.py, evaluate()).
    ``evals``: published evaluation settings besides the paper's own."""
    eval_seg = eval_seg or seg
    paper_eval = dict(tokens_per_sample=eval_seg, batch_size=10,
                      model_overrides=dict(mem_len=mem_len + seg - eval_seg) if eval_seg != seg and mem_len else {})
    return dict(paper=paper, tokens_per_sample=seg, batch=batch, max_update=steps, num_mem_tokens=m,
                mem_len=mem_len, bptt_depth=bptt, memory_layout=layout, memory_token_loss_weight=memory_token_loss,
                paper_eval=paper_eval, evals=dict(evals))


def wt103(paper, seg=150, batch=60, steps=200_000, **kw):
    return row(paper, seg, batch, steps, **kw)


def enwik8(paper, seg=128, batch=64, steps=400_000, **kw):
    return row(paper, seg, batch, steps, **kw)


TRUNCATED_BPTT = ("23.70", dict(tokens_per_sample=64, batch_size=1,
                                model_overrides=dict(mem_len=640, clamp_len=400, same_length=True)))
DAI_ENWIK8 = ("1.06", dict(tokens_per_sample=80, batch_size=10,
                           model_overrides=dict(mem_len=2100, clamp_len=820, same_length=True)))

WIKITEXT103_ROWS = {  # test perplexity
    "baseline": wt103("29.95"),
    "transformer_xl_mem150": wt103("24.12", mem_len=150, evals={"truncated_bptt": TRUNCATED_BPTT}),
    "rmt_m10_bptt0": wt103("26.85", m=10, bptt=0),
    "rmt_m10_bptt1": wt103("25.92", m=10, bptt=1),
    "rmt_m10_bptt2": wt103("25.32", m=10, bptt=2),
    "rmt_m10_bptt3": wt103("25.04", m=10, bptt=3),
    "rmt_m25_bptt1": wt103("24.91", m=25, bptt=1),
    "rmt_m25_bptt2": wt103("24.85", m=25, bptt=2),
    "memtr_m10": wt103("29.63", m=10, layout="memtr"),
    "rmt_xl_150_10_bptt1": wt103("24.30", m=10, mem_len=150, bptt=1, memory_token_loss=MEMORY_TOKEN_LOSS),
    "rmt_xl_140_10_bptt0": wt103("24.25", m=10, mem_len=140, bptt=0, memory_token_loss=MEMORY_TOKEN_LOSS),
    "rmt_xl_150_10_bptt3_400k": wt103("23.99", m=10, mem_len=150, bptt=3, steps=400_000,
                                      memory_token_loss=MEMORY_TOKEN_LOSS),
    "seg50_baseline": wt103("39.05", seg=50, batch=128),
    "seg50_transformer_xl_mem50": wt103("26.54", seg=50, batch=128, mem_len=50),
    "seg50_rmt_m10_bptt4": wt103("26.25", seg=50, batch=128, m=10, bptt=4),
}
ENWIK8_ROWS = {  # test bits per character
    "baseline": enwik8("1.402"),
    "transformer_xl_mem200": enwik8("1.140", mem_len=200),
    "transformer_xl_mem40": enwik8("1.230", mem_len=40),
    "transformer_xl_mem10": enwik8("1.283", mem_len=10),
    "rmt_m20_bptt0": enwik8("1.301", m=20, bptt=0),
    "rmt_m20_bptt1": enwik8("1.229", m=20, bptt=1),
    "rmt_m20_bptt2": enwik8("1.222", m=20, bptt=2),
    "rmt_m10_bptt2": enwik8("1.228", m=10, bptt=2),
    "transformer_xl_seg512_mem512": enwik8("1.071", seg=512, batch=22, mem_len=512, eval_seg=128,
                                           evals={"dai_et_al": DAI_ENWIK8}),
}
ROWS = {"wikitext103": WIKITEXT103_ROWS, "enwik8": ENWIK8_ROWS}
BACKBONES = {"wikitext103": WT103_BASE, "enwik8": ENWIK8_BASE}
