"""The Recurrent Memory Transformer (RMT) and Transformer-XL as one fairseq language model.

One segment of T tokens is processed per forward call. What links segments is an
:class:`RMTState`: the memory (m vectors) and the Transformer-XL cache (per-layer hidden states
of up to ``mem_len`` previous positions). ``num_mem_tokens=0, mem_len=0`` is the paper's
baseline, ``num_mem_tokens=0, mem_len>0`` is Transformer-XL, ``num_mem_tokens>0, mem_len=0`` is
RMT and both > 0 is "Tr-XL + RMT". Attention is always Transformer-XL's relative positional
attention (Dai et al. 2019), as in the paper's code base.

Memory layout (``--memory-layout rmt``), m=2 memory tokens, a segment x0..x2 (T=3), no cache::

    input   [M0 M1 | x0 x1 x2 | M0 M1]      read block = write block input = the memory
             read     segment    write
    query\\key  r0 r1  x0 x1 x2  w0 w1
    r0          1  1   .  .  .   .  .       read tokens see each other, not the segment
    r1          1  1   .  .  .   .  .
    x0          1  1   1  .  .   .  .       segment tokens: all read tokens + causal
    x1          1  1   1  1  .   .  .
    x2          1  1   1  1  1   .  .
    w0          1  1   1  1  1   1  1       write tokens see everything, each other too
    w1          1  1   1  1  1   1  1

The final-layer outputs at w0, w1 are the next segment's memory; the loss covers x0..x2 only
(so the last layer computes no r rows: ``last_layer_first_row``).
The first segment of a stream reads a learned memory embedding. ``--memory-layout memtr`` is
the paper's "MemTr" baseline: ``[M; x]`` only, memory tokens see each other, and the next
memory is the output at those positions (with causal attention it cannot see the segment).

With a Transformer-XL cache of L positions, keys are ``[cache; read; segment; write]`` and
queries the last ``Q = 2m + T`` of them. Segment tokens always see the cache (within
``same_length``); memory tokens see it only with ``--mem-attend-cache``. The cache holds
segment positions only (detached, as in Dai et al.). Relative distance is query position minus
key position, so memory blocks, being bidirectional, also use negative distances; sinusoids are
defined for them, and ``clamp_len`` clamps both signs. Only the distances that allowed query-key
pairs have are embedded and scored (``build_attention_plan``): with m memory tokens and K keys,
at most K+m of the K+Q-1 a [Q, K] score matrix spans.

Where cached keys sit (``--cache-distance``), cache c0 c1, m=2, segment x0 x1::

    sequence   c0 c1 r0 r1 x0 x1 w0 w1    positions along the key sequence (the paper's code):
                0  1  2  3  4  5  6  7    x0 is 3 from c1, though c1 is the token just before it
    stream     c0 c1 r0 r1 x0 x1 w0 w1    cached keys m positions later: x0 is 1 from c1 and
                2  3  2  3  4  5  6  7    sees the cache as a Transformer-XL without memory does

With ``sequence`` the read block shifts every segment-to-cache distance by m, so what relative
attention learns within a segment does not carry over to the cache (measured in
docs/memory_in_lm.md, section 2d). The paper's code uses ``sequence``, with a cache of the last
``mem_len`` positions of ``[read; segment; write]`` (``--cache-content sequence``); our default
caches segment positions only. docs/authors_model.md lists every option where the paper's code
and our defaults differ.

Attention runs through ``F.scaled_dot_product_attention`` with the position scores and the -inf
mask added into one float ``attn_mask``, so a fused kernel that takes a float mask can run: on the
CPU the flash kernel runs when the mask needs no gradient (evaluation); in training it carries the
position scores' gradient and torch picks its math kernel. On GPUs the memory-efficient kernel
takes such a mask with gradient (not run here: no GPU was available).
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import FairseqDecoder, FairseqLanguageModel, register_model, register_model_architecture
from fairseq.modules import AdaptiveInput, AdaptiveSoftmax
from fairseq.tasks import TASK_REGISTRY, FairseqTask
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn

from .adaptive import TransformerXLAdaptiveInput, TransformerXLAdaptiveSoftmax, fairseq_target_log_prob
from .flags import int_list

MEMORY_LAYOUTS = ChoiceEnum(["rmt", "memtr"])
WRITE_INPUTS = ChoiceEnum(["memory", "learned", "auto"])
CACHE_DISTANCES = ChoiceEnum(["sequence", "stream"])
CACHE_CONTENTS = ChoiceEnum(["segment", "sequence"])
MEMORY_POSITIONS = ChoiceEnum(["signed", "rel_shift"])
MEMORY_PARAMETRISATIONS = ChoiceEnum(["embedding", "raw"])
ADAPTIVE_SOFTMAX_TYPES = ChoiceEnum(["fairseq", "transformer_xl"])


class RMTState(NamedTuple):
    """What one segment hands to the next: memory ``[B, m, d]`` and per-layer cache ``[B, L, d]``."""

    memory: Optional[Tensor]
    cache: Optional[List[Tensor]]

    def detach(self) -> "RMTState":
        memory = None if self.memory is None else self.memory.detach()
        return RMTState(memory, self.cache)  # the cache is always stored detached


@dataclass
class RMTConfig(FairseqDataclass):
    n_layer: int = field(default=12, metadata={"help": "number of decoder layers"})
    d_model: int = field(default=512, metadata={"help": "model dimension"})
    n_head: int = field(default=8, metadata={"help": "number of attention heads"})
    d_head: int = field(default=64, metadata={"help": "dimension of each attention head"})
    d_inner: int = field(default=2048, metadata={"help": "feed-forward inner dimension"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings, residual branches and outputs"})
    dropatt: float = field(default=0.0, metadata={"help": "dropout on attention probabilities"})
    pre_lnorm: bool = field(
        default=False, metadata={"help": "pre-LayerNorm layers (Transformer-XL's default is post-LayerNorm)"}
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the normal weight initialisation"})
    num_mem_tokens: int = field(default=0, metadata={"help": "number of memory tokens m (0: no RMT memory)"})
    memory_layout: MEMORY_LAYOUTS = field(
        default="rmt",
        metadata={"help": "rmt: [read; segment; write]; memtr: [memory; segment] (the paper's MemTr baseline)"},
    )
    memory_write_input: WRITE_INPUTS = field(
        default="memory",
        metadata={"help": "what the write block is fed: memory (the paper: the memory read), learned (the "
                          "learned start memory, every segment), which cuts the memory's residual loop "
                          "(see the module docstring), or auto (the small architectures' default): what the "
                          "task asks for, learned for --task rmt_lm, memory for --task rmt_memory"},
    )
    mem_len: int = field(
        default=0, metadata={"help": "Transformer-XL cache length: hidden states of this many past positions"}
    )
    mem_attend_cache: bool = field(
        default=False, metadata={"help": "memory tokens also attend to the Transformer-XL cache"}
    )
    cache_distance: CACHE_DISTANCES = field(
        default="stream",
        metadata={"help": "relative distance to cached positions with memory tokens: sequence (along "
                          "[cache; read; segment; write], the read block between cache and segment) or "
                          "stream (as in the token stream: the last cached token is 1 before the first "
                          "segment token; see the module docstring)"},
    )
    cache_content: CACHE_CONTENTS = field(
        default="segment",
        metadata={"help": "what the Transformer-XL cache holds with memory tokens: segment (segment positions "
                          "only) or sequence (the last --mem-len positions of [read; segment; write], the "
                          "paper's code; needs --cache-distance sequence)"},
    )
    memory_positions: MEMORY_POSITIONS = field(
        default="signed",
        metadata={"help": "position scores of memory tokens attending to later ones in their block: signed "
                          "(sinusoids of the negative distance) or rel_shift (what Transformer-XL's rel_shift "
                          "reads there, the paper's code: 0 at distance -1, the next query row's score beyond; "
                          "needs --cache-distance sequence)"},
    )
    memory_parametrisation: MEMORY_PARAMETRISATIONS = field(
        default="embedding",
        metadata={"help": "the learned start memory: embedding (m vectors ~ N(0, init_std) scaled by "
                          "sqrt(d_model) like token embeddings) or raw (the paper's code: one N(0, 1) vector "
                          "repeated m times as the m x d_model parameters' start, used unscaled)"},
    )
    memory_write_dropout: bool = field(
        default=False,
        metadata={"help": "take the written memory after the output dropout (the paper's code), so it is "
                          "dropped out again as the next segment's input"},
    )
    share_rel_bias: bool = field(
        default=False,
        metadata={"help": "one pair of relative-attention biases (u, v) for all layers, as Transformer-XL's "
                          "code and the paper's runs (default: a pair per layer)"},
    )
    layer_norm_init_std: float = field(
        default=0.0,
        metadata={"help": "LayerNorm gains start ~ N(1, this) (Transformer-XL's code: init_std); 0: ones"},
    )
    clamp_len: int = field(
        default=-1, metadata={"help": "use the same positional embedding for distances beyond this (-1: off)"}
    )
    same_length: bool = field(
        default=False, metadata={"help": "every segment token attends to the same number of past positions"}
    )
    adaptive_softmax_cutoff: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated cutoffs for adaptive input and softmax, e.g. 20000,40000,200000"},
    )
    div_val: float = field(
        default=1.0, metadata={"help": "adaptive input/softmax: each cluster's dimension is divided by this"}
    )
    adaptive_softmax_type: ADAPTIVE_SOFTMAX_TYPES = field(
        default="fairseq",
        metadata={"help": "with --adaptive-softmax-cutoff: fairseq (AdaptiveInput/AdaptiveSoftmax) or "
                          "transformer_xl (Transformer-XL's projected adaptive embedding and softmax, the "
                          "paper's; see rmt_plugin/adaptive.py)"},
    )
    tie_weights: bool = field(default=True, metadata={"help": "tie input embeddings and output weights"})
    memory_target_token: bool = field(
        default=False,
        metadata={"help": "append the special token <mem> after the dictionary, the target of the paper's "
                          "--memory-token-loss-weight (data-bins stay valid: no token id changes)"},
    )


@register_model("rmt", dataclass=RMTConfig)
class RMTLanguageModel(FairseqLanguageModel):
    """Decoder-only LM with RMT memory tokens and a Transformer-XL cache (see module docstring)."""

    # The criterion calls the model once per segment before one backward, which torch's DDP
    # forbids; the compat layer then reduces gradients after the backward (fairseq's legacy_ddp).
    several_forwards_per_backward = True

    @classmethod
    def build_model(cls, cfg: RMTConfig, task):
        check_task(cfg, task)
        fill_missing_fields(cfg)
        resolve_write_input(cfg, task)
        check_config(cfg, len(task.target_dictionary))
        return cls(RMTDecoder(cfg, task.target_dictionary))


# Fields whose default changed after they were added: what a checkpoint without the field did.
BEHAVIOUR_BEFORE_FIELD = {"cache_distance": "sequence"}


def fill_missing_fields(cfg) -> None:
    """A checkpoint saved before a model field existed has no value for it: give it the value that
    keeps the behaviour of the time: the field's default (e.g. ``memory_write_input``: ``memory``),
    or ``BEHAVIOUR_BEFORE_FIELD`` where the default is not that behaviour."""
    missing = {name: BEHAVIOUR_BEFORE_FIELD.get(name, f.default) for name, f in RMTConfig.__dataclass_fields__.items()
               if isinstance(cfg, DictConfig) and name not in cfg}
    if missing:
        with open_dict(cfg):
            for name, value in missing.items():
                setattr(cfg, name, value)


def resolve_write_input(cfg, task) -> None:
    """``--memory-write-input auto`` becomes the task's ``auto_memory_write_input``, in ``cfg`` itself
    so that the checkpoint keeps it (the task calls this on the config fairseq saves, before fairseq
    may copy it for ``--arch rmt``; the model again, after a named arch set ``auto`` under hydra). Language modelling runs the memory along one long stream, where
    a small model's memory fed back into the write block collapses to one vector for every stream
    (docs/memory_in_lm.md, 2c): learned. A memory task's example spans a few segments, and there
    the memory read fed back is what hands the source on (copy 16 -> 16 in docs/memory_tasks.md:
    exact 1.000 against 0.000 with learned): memory."""
    if getattr(cfg, "memory_write_input", None) == "auto":
        has_write_block = getattr(cfg, "num_mem_tokens", 0) > 0 and getattr(cfg, "memory_layout", "rmt") == "rmt"
        with open_dict(cfg) if isinstance(cfg, DictConfig) else contextlib.nullcontext():
            cfg.memory_write_input = getattr(task, "auto_memory_write_input", "learned") if has_write_block else "memory"


def check_task(cfg, task):
    """A fairseq task that does not carry the state from segment to segment (``--task
    language_modeling``, fairseq-eval-lm's default) would score or train every segment from fresh
    memory and an empty cache, a silently wrong number: stop with one line instead."""
    if isinstance(task, FairseqTask) and not getattr(task, "carries_memory", False):
        name = next((n for n, c in TASK_REGISTRY.items() if type(task) is c), type(task).__name__)
        arch = getattr(cfg, "arch", None) or getattr(cfg, "_name", "rmt")
        raise ValueError(f"--arch {arch} carries memory from segment to segment and needs --task rmt_lm (or "
                         f"rmt_memory), not --task {name}, which would start every segment from fresh memory")


def check_config(cfg: RMTConfig, vocab_size: int):
    """Reject impossible flag combinations before any weights are built."""

    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    need(cfg.num_mem_tokens >= 0, f"--num-mem-tokens must be >= 0, got {cfg.num_mem_tokens}")
    need(cfg.mem_len >= 0, f"--mem-len must be >= 0, got {cfg.mem_len}")
    need(cfg.n_layer > 0 and cfg.d_model > 0 and cfg.n_head > 0 and cfg.d_head > 0, "--n-layer, --d-model, "
         "--n-head and --d-head must be positive")
    need(not cfg.mem_attend_cache or (cfg.mem_len > 0 and cfg.num_mem_tokens > 0),
         "--mem-attend-cache needs both --mem-len > 0 and --num-mem-tokens > 0")
    need(cfg.memory_write_input == "memory" or (cfg.num_mem_tokens > 0 and cfg.memory_layout == "rmt"),
         "--memory-write-input learned needs the write block of --memory-layout rmt and --num-mem-tokens > 0")
    for cutoff in parse_cutoffs(cfg.adaptive_softmax_cutoff):
        need(0 < cutoff < vocab_size, f"--adaptive-softmax-cutoff {cutoff} is not inside the vocabulary "
             f"(size {vocab_size}); drop it")
    with_cache_and_memory = cfg.mem_len > 0 and cfg.num_mem_tokens > 0
    for flag, value, paper_value in (("--cache-content", cfg.cache_content, "sequence"),
                                     ("--memory-positions", cfg.memory_positions, "rel_shift")):
        need(value != paper_value or not with_cache_and_memory or cfg.cache_distance == "sequence",
             f"{flag} {value} measures distances along the key sequence, as the paper's code does: "
             "add --cache-distance sequence")
    need(cfg.adaptive_softmax_type != "transformer_xl" or float(cfg.div_val).is_integer(),
         f"--adaptive-softmax-type transformer_xl needs an integer --div-val, got {cfg.div_val}")


def parse_cutoffs(spec: Optional[str]) -> List[int]:
    cutoffs = int_list(spec, "--adaptive-softmax-cutoff")
    if cutoffs != sorted(set(cutoffs)):
        raise ValueError(f"--adaptive-softmax-cutoff must be strictly increasing, got {spec!r}")
    return cutoffs


def sinusoid(distances: Tensor, d_model: int) -> Tensor:
    """Transformer-XL's positional embedding [sin | cos] of (possibly negative) distances."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=distances.device) / d_model))
    angles = torch.outer(distances.float(), inv_freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class AttentionPlan(NamedTuple):
    """Everything about one (cache length, segment length) shape that all layers share."""

    bias: Tensor  # [Q, K] float: 0 where allowed, -inf where masked
    pos_emb: Tensor  # [n, d] sinusoids of the distances max_distance down to max_distance - n + 1, clamped
    max_distance: int  # the largest distance an allowed query-key pair has (see relative_scores)
    cache_shift: int  # cached keys sit this many positions later than along the sequence (stream distance)
    segment: slice  # query rows that are segment tokens (their inputs to each layer are cached)
    last_layer_rows: int  # the last layer computes query rows from here on (see last_layer_first_row)
    output_segment: slice  # rows of the last layer's output that are segment tokens
    next_memory: slice  # rows of the last layer's output that become the next memory


class RMTDecoder(FairseqDecoder):
    def __init__(self, cfg: RMTConfig, dictionary):
        super().__init__(dictionary)
        if cfg.memory_write_input == "auto":
            raise ValueError("--memory-write-input auto is the task's choice: build the model through the task "
                             "(task.build_model) or name memory or learned")
        self.cfg = cfg
        self.padding_idx = dictionary.pad()
        self.num_mem_tokens = cfg.num_mem_tokens
        self.mem_len = cfg.mem_len
        self.embed_scale = math.sqrt(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        cutoffs = parse_cutoffs(cfg.adaptive_softmax_cutoff)
        # <mem> is a model symbol appended after the task's dictionary (rather than added to it), so
        # a data-bin's ids are untouched; only the embedding and output layer get one more row.
        self.memory_target = len(dictionary) if cfg.memory_target_token else None
        vocab = len(dictionary) + cfg.memory_target_token
        if cutoffs and cfg.adaptive_softmax_type == "transformer_xl":
            self.embed_tokens = TransformerXLAdaptiveInput(vocab, cfg.d_model, cutoffs, int(cfg.div_val), cfg.init_std)
            self.adaptive_softmax = TransformerXLAdaptiveSoftmax(
                vocab, cfg.d_model, cutoffs, int(cfg.div_val), cfg.init_std,
                tied_input=self.embed_tokens if cfg.tie_weights else None,
            )
        elif cutoffs:
            self.embed_tokens = AdaptiveInput(
                vocab, self.padding_idx, cfg.d_model, cfg.div_val, cfg.d_model, list(cutoffs)
            )
            self.adaptive_softmax = AdaptiveSoftmax(
                vocab, cfg.d_model, list(cutoffs), dropout=0.0, factor=cfg.div_val,
                adaptive_inputs=self.embed_tokens if cfg.tie_weights else None, tie_proj=cfg.tie_weights,
            )
        else:
            self.embed_tokens = nn.Embedding(vocab, cfg.d_model, padding_idx=self.padding_idx)
            nn.init.normal_(self.embed_tokens.weight, std=cfg.init_std)
            self.adaptive_softmax = None
            self.out_weight = None if cfg.tie_weights else nn.Parameter(torch.empty(vocab, cfg.d_model))
            if self.out_weight is not None:
                nn.init.normal_(self.out_weight, std=cfg.init_std)
            self.out_bias = nn.Parameter(torch.zeros(vocab))
        self.mem_init = None
        if cfg.num_mem_tokens > 0:
            self.mem_init = nn.Parameter(initial_memory(cfg))
        # With --share-rel-bias the decoder owns the one pair of relative-attention biases.
        self.r_w_bias = self.r_r_bias = None
        if cfg.share_rel_bias:
            self.r_w_bias, self.r_r_bias = rel_bias_pair(cfg)
        self.layers = nn.ModuleList(RelDecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.final_norm = layer_norm(cfg) if cfg.pre_lnorm else None
        self._plans = {}

    # ----------------------------------------------------------------- forward
    def forward(self, src_tokens, src_lengths=None, state: Optional[RMTState] = None, stream=None,
                target=None, **unused):
        """Process one segment. ``stream`` (from fairseq-eval-lm) carries the state between calls
        (and, with its diagnostics on, gets the segment's ``target`` to score them against)."""
        if stream is not None:
            state = stream.state
        features, next_state = self.extract_features(src_tokens, state)
        output = self.output_layer(features), {"state": next_state}
        if stream is not None:
            stream.state = next_state.detach()
            if stream.diagnostics is not None:
                stream.diagnostics.observe(self, src_tokens, target, state, output)
        return output

    def extract_features(self, src_tokens: Tensor, state: Optional[RMTState] = None):
        bsz, seg_len = src_tokens.shape
        m = self.num_mem_tokens
        cache = state.cache if state is not None and self.mem_len > 0 else None
        cache_len = cache[0].size(1) if cache else 0
        plan = self._plan(seg_len, cache_len, src_tokens.device)

        h = self.embed_tokens(src_tokens) * self.embed_scale
        if m > 0:
            memory = self._read_memory(state, bsz)
            blocks = [memory, h, self._write_input(memory)] if self.cfg.memory_layout == "rmt" else [memory, h]
            h = torch.cat(blocks, dim=1)
        h = self.dropout(h)
        pos_emb = self.dropout(plan.pos_emb.to(h.dtype))
        positions = (pos_emb, plan.max_distance, cache_len, plan.cache_shift)

        new_cache = [] if self.mem_len > 0 else None
        cached_rows = plan.segment if self.cfg.cache_content == "segment" else slice(None)
        shared_bias = (self.r_w_bias, self.r_r_bias) if self.cfg.share_rel_bias else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache else None
            if new_cache is not None:
                new_cache.append(self._update_cache(layer_cache, h[:, cached_rows]))
            h = layer(h, layer_cache, positions, plan.bias, first_row=plan.last_layer_rows if i == last else 0,
                      shared_bias=shared_bias)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.cfg.memory_write_dropout:
            h = self.dropout(h)
            features = h[:, plan.output_segment]
        else:
            features = self.dropout(h[:, plan.output_segment])
        next_memory = h[:, plan.next_memory] if m > 0 else None
        return features, RMTState(next_memory, new_cache)

    def target_log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        """log p(target) [B, T] in float from ``output`` (the forward's first result: logits, or
        features for an adaptive softmax, which needs no table of the whole vocabulary)."""
        if isinstance(self.adaptive_softmax, TransformerXLAdaptiveSoftmax):
            return self.adaptive_softmax.target_log_prob(output, target)
        if self.adaptive_softmax is not None:
            return fairseq_target_log_prob(self.adaptive_softmax, output, target)
        return F.log_softmax(output.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)

    def output_layer(self, features: Tensor) -> Tensor:
        if self.adaptive_softmax is not None:
            return features  # the criterion / get_normalized_probs apply the adaptive softmax
        weight = self.embed_tokens.weight if self.out_weight is None else self.out_weight
        return F.linear(features, weight, self.out_bias)

    # ----------------------------------------------------------------- memory and cache
    def _read_memory(self, state: Optional[RMTState], bsz: int) -> Tensor:
        if state is not None and state.memory is not None:
            if state.memory.size(0) != bsz:
                raise ValueError(
                    f"memory holds {state.memory.size(0)} streams but the batch has {bsz} rows; "
                    "batches of one stream must keep the same --batch-size"
                )
            return state.memory
        return self._start_memory().unsqueeze(0).expand(bsz, -1, -1)

    def _start_memory(self) -> Tensor:
        scale = self.embed_scale if self.cfg.memory_parametrisation == "embedding" else 1.0
        return self.mem_init * scale

    def _write_input(self, memory: Tensor) -> Tensor:
        if self.cfg.memory_write_input == "learned":
            return self._start_memory().unsqueeze(0).expand_as(memory)
        return memory

    def _update_cache(self, cache: Optional[Tensor], segment_hidden: Tensor) -> Tensor:
        merged = segment_hidden if cache is None else torch.cat([cache, segment_hidden], dim=1)
        return merged[:, -self.mem_len:].detach()

    # ----------------------------------------------------------------- masks, built once per shape
    def _plan(self, seg_len: int, cache_len: int, device) -> AttentionPlan:
        key = (seg_len, cache_len, device)
        if key not in self._plans:
            self._plans[key] = build_attention_plan(
                seg_len, cache_len, self.num_mem_tokens, self.cfg.memory_layout, self.cfg.mem_attend_cache,
                self.cfg.same_length, self.mem_len, self.cfg.clamp_len, self.cfg.d_model, device,
                cache_shift=self.num_mem_tokens if self.cfg.cache_distance == "stream" else 0,
                memory_positions=self.cfg.memory_positions,
            )
        return self._plans[key]


def allowed_attention(seg_len: int, cache_len: int, m: int, layout: str, mem_attend_cache: bool,
                      same_length: bool, mem_len: int) -> Tensor:
    """Boolean [Q, K] matrix (True = may attend); see the module docstring for the layout."""
    if m == 0:
        layout = "none"
    read = m
    write = m if layout == "rmt" else 0
    q_len = read + seg_len + write
    k_len = cache_len + q_len
    allowed = torch.zeros(q_len, k_len, dtype=torch.bool)
    seg_q = slice(read, read + seg_len)
    read_k = slice(cache_len, cache_len + read)
    seg_k = slice(cache_len + read, cache_len + read + seg_len)

    causal = torch.ones(seg_len, seg_len, dtype=torch.bool).tril()
    seg_rows = allowed[seg_q]
    seg_rows[:, seg_k] = causal
    seg_rows[:, read_k] = True
    seg_rows[:, :cache_len] = True
    if same_length:
        # Transformer-XL: each segment token sees the same number (mem_len) of past positions.
        past = torch.cat([torch.ones(seg_len, cache_len, dtype=torch.bool), causal], dim=1)
        mask_len = cache_len + seg_len - mem_len
        shift = seg_len - mask_len if mask_len > 0 else seg_len
        too_old = torch.ones_like(past).tril(-shift)
        past &= ~too_old
        seg_rows[:, :cache_len] = past[:, :cache_len]
        seg_rows[:, seg_k] = past[:, cache_len:]
    if read:
        allowed[:read, read_k] = True
        if mem_attend_cache:
            allowed[:read, :cache_len] = True
    if write:
        allowed[read + seg_len:, cache_len:] = True
        if mem_attend_cache:
            allowed[read + seg_len:, :cache_len] = True
    return allowed


def build_attention_plan(seg_len, cache_len, m, layout, mem_attend_cache, same_length, mem_len, clamp_len,
                         d_model, device, cache_shift=0, memory_positions="signed") -> AttentionPlan:
    allowed = allowed_attention(seg_len, cache_len, m, layout, mem_attend_cache, same_length, mem_len)
    q_len, k_len = allowed.shape
    bias = torch.zeros(q_len, k_len).masked_fill_(~allowed, float("-inf"))
    cache_shift = cache_shift if cache_len > 0 else 0
    # Only the distances some allowed pair has (see relative_scores): with a cache L and segment T,
    # L+T-1 down to 0, and down to -(m-1) with memory tokens (bidirectional within their block),
    # instead of all K+Q-1 a [Q, K] matrix spans. At least K+1 rows, so the skewed view of
    # relative_scores never overlaps itself (an overlapping view has a slow backward), and from
    # the distance of the last layer's first query row to the first key on, so that its view of the
    # last layer's rows starts inside the scores (with a cache longer than the memory and segment
    # blocks, as for eval-lm's short last segment, no allowed pair may be that far).
    key_positions = torch.arange(k_len)
    key_positions[:cache_len] += cache_shift
    used = (torch.arange(q_len)[:, None] + (k_len - q_len) - key_positions[None, :])[allowed]
    first_row = last_layer_first_row(m, layout)
    max_distance = max(int(used.max()), k_len - q_len + first_row)
    min_distance = min(int(used.min()), max_distance - k_len)
    if memory_positions == "rel_shift":
        max_distance, min_distance = k_len, 0  # a zero row at distance K, then K-1..0 (relative_scores)
    distances = torch.arange(max_distance, min_distance - 1, -1.0)
    if clamp_len > 0:
        distances = distances.clamp(-clamp_len, clamp_len)
    read = m if m > 0 else 0
    segment = slice(read, read + seg_len)
    if m > 0 and layout == "rmt":
        next_memory = slice(read + seg_len, q_len)
    else:
        next_memory = slice(0, read)
    pos_emb = sinusoid(distances, d_model)
    if memory_positions == "rel_shift":
        pos_emb[0] = 0.0
    return AttentionPlan(bias.to(device), pos_emb.to(device), max_distance, cache_shift, segment, first_row,
                         shift_slice(segment, -first_row), shift_slice(next_memory, -first_row))


def last_layer_first_row(m: int, layout: str) -> int:
    """The first query row the last layer computes: nothing reads the last layer's outputs at the
    read block of ``[read; segment; write]`` (the loss takes the segment rows, the next memory the
    write rows), so the last layer skips those m queries; their keys and values it still uses.
    Example, m=16, T=128, 4 layers: the last layer computes 144 of 160 rows, 2.5% less work in all.
    With ``memtr`` the memory rows are the next memory, so every row is computed."""
    return m if m > 0 and layout == "rmt" else 0


def shift_slice(rows: slice, by: int) -> slice:
    return slice(rows.start + by, rows.stop + by)


def relative_scores(q_r: Tensor, r_k: Tensor, k_len: int, max_distance: int, cache_len: int = 0,
                    cache_shift: int = 0) -> Tensor:
    """Position scores ``BD[b, h, i, j] = q_r[b, h, i] . r_k[dist(i, j)]`` without a Python loop.

    ``r_k`` [H, n, Dh] holds one row per distance, from ``max_distance`` down; query i sits at key
    position K-Q+i, so the row for key j is ``max_distance - (K-Q+i-j)``: a diagonal skew of
    ``q_r @ r_k^T`` [B, H, Q, n], read with a strided view (Transformer-XL's "rel_shift",
    generalised to negative distances). ``r_k`` covers only the distances of allowed pairs
    (``build_attention_plan``); for a masked pair the view may read a neighbouring row's score
    instead, which the mask's -inf discards (and whose gradient is therefore zero). Example, Q=K=2
    (no cache), distances 1, 0, -1: row 0 reads columns (1, 2) = distances (0, -1), row 1 columns
    (0, 1) = distances (1, 0). With n = K+Q-1 every read is in its own row. The first
    ``cache_len`` keys are cached ones, ``cache_shift`` further away (``--cache-distance stream``).

    ``--memory-positions rel_shift`` (the paper's code, Transformer-XL's ``_rel_shift``): the rows
    are distances K (a zero embedding) down to 0, n = K+1, and the same view then reads, for a key
    after its query (only memory tokens attend to such keys), what ``_rel_shift`` reads: 0 at
    distance -1, and for distance -1-e the next query row's score at distance K-e. Example, K=Q=2,
    rows (2, 1, 0) = (zero, r1, r0): row 0 reads (q0 . r0, 0), row 1 (q1 . r1, q1 . r0).
    """
    full = torch.matmul(q_r, r_k.transpose(-1, -2)).contiguous()  # [B, H, Q, n]
    bsz, heads, q_len, n_dist = full.shape
    s_b, s_h, s_q, s_d = full.stride()
    offset = max_distance - (k_len - q_len)

    def skewed(shift, width):
        return full.as_strided((bsz, heads, q_len, width), (s_b, s_h, s_q - s_d, s_d),
                               full.storage_offset() + offset + shift)

    if cache_shift == 0:
        return skewed(0, k_len)
    # cached keys: distance cache_shift less, so rows cache_shift further down
    return torch.cat([skewed(cache_shift, cache_len), skewed(0, k_len)[..., cache_len:]], dim=-1)


class RelMultiheadAttention(nn.Module):
    """Transformer-XL's relative multi-head attention ("RelPartialLearnable"), through SDPA."""

    def __init__(self, cfg: RMTConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        inner = cfg.n_head * cfg.d_head
        self.qkv_net = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.r_net = nn.Linear(cfg.d_model, inner, bias=False)
        self.o_net = nn.Linear(inner, cfg.d_model, bias=False)
        for p in (self.qkv_net.weight, self.r_net.weight, self.o_net.weight):
            nn.init.normal_(p, std=cfg.init_std)
        self.r_w_bias = self.r_r_bias = None  # --share-rel-bias: the decoder's pair is passed in
        if not cfg.share_rel_bias:
            self.r_w_bias, self.r_r_bias = rel_bias_pair(cfg)
        self.dropatt = cfg.dropatt
        self.scale = 1.0 / math.sqrt(cfg.d_head)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), self.n_head, self.d_head).transpose(1, 2)

    def forward(self, h: Tensor, keys_in: Tensor, positions, bias: Tensor, shared_bias=None) -> Tensor:
        """``positions``: (sinusoids of the plan's distances, the largest of them, the cache length, the
        cached keys' distance shift); the queries ``h`` are the last rows of ``keys_in``;
        ``shared_bias``: the decoder's (u, v) with --share-rel-bias."""
        pos_emb, max_distance, cache_len, cache_shift = positions
        r_w_bias, r_r_bias = shared_bias if shared_bias is not None else (self.r_w_bias, self.r_r_bias)
        inner = self.n_head * self.d_head
        w_q, w_kv = self.qkv_net.weight.split([inner, 2 * inner])
        q = self._heads(F.linear(h, w_q))
        k, v = (self._heads(t) for t in F.linear(keys_in, w_kv).chunk(2, dim=-1))
        # scaled here, on [H, n, Dh], rather than the [B, H, Q, K] scores: the same product, less work
        r_k = (self.r_net(pos_emb) * self.scale).view(-1, self.n_head, self.d_head).transpose(0, 1)
        position = relative_scores(q + r_r_bias.unsqueeze(1), r_k, keys_in.size(1), max_distance, cache_len,
                                   cache_shift)
        attn_bias = position + bias
        out = F.scaled_dot_product_attention(
            q + r_w_bias.unsqueeze(1), k, v, attn_mask=attn_bias.to(q.dtype),
            dropout_p=self.dropatt if self.training else 0.0, scale=self.scale,
        )
        return self.o_net(out.transpose(1, 2).reshape(h.size(0), h.size(1), inner))


class RelDecoderLayer(nn.Module):
    def __init__(self, cfg: RMTConfig):
        super().__init__()
        self.pre_lnorm = cfg.pre_lnorm
        self.attn = RelMultiheadAttention(cfg)
        self.attn_norm = layer_norm(cfg)
        self.ff = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_inner), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_inner, cfg.d_model), nn.Dropout(cfg.dropout),
        )
        for lin in (self.ff[0], self.ff[3]):
            nn.init.normal_(lin.weight, std=cfg.init_std)
            nn.init.zeros_(lin.bias)
        self.ff_norm = layer_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: Tensor, cache: Optional[Tensor], positions, bias: Tensor, first_row: int = 0,
                shared_bias=None) -> Tensor:
        """Outputs for the rows of ``h`` from ``first_row`` on; every row of ``h`` is a key."""
        keys_in = h if cache is None else torch.cat([cache, h], dim=1)
        x, bias = h[:, first_row:], bias[first_row:]
        if self.pre_lnorm:
            normed = self.attn_norm(keys_in)
            x = x + self.dropout(self.attn(normed[:, -x.size(1):], normed, positions, bias, shared_bias))
            return x + self.ff(self.ff_norm(x))
        x = self.attn_norm(x + self.dropout(self.attn(x, keys_in, positions, bias, shared_bias)))
        return self.ff_norm(x + self.ff(x))


def rel_bias_pair(cfg: RMTConfig):
    """Transformer-XL's content bias u (``r_w_bias``) and position bias v (``r_r_bias``), [H, Dh]."""
    return tuple(nn.Parameter(torch.empty(cfg.n_head, cfg.d_head).normal_(std=cfg.init_std)) for _ in range(2))


def layer_norm(cfg: RMTConfig) -> nn.LayerNorm:
    norm = nn.LayerNorm(cfg.d_model)
    if cfg.layer_norm_init_std > 0:
        nn.init.normal_(norm.weight, 1.0, cfg.layer_norm_init_std)
    return norm


def initial_memory(cfg: RMTConfig) -> Tensor:
    """The learned start memory's initial value [m, d_model] (``--memory-parametrisation``)."""
    if cfg.memory_parametrisation == "raw":
        return torch.randn(1, cfg.d_model).repeat(cfg.num_mem_tokens, 1)
    return torch.randn(cfg.num_mem_tokens, cfg.d_model) * cfg.init_std


# ----------------------------------------------------------------------------- named architectures
def _set_defaults(cfg, **defaults):
    for name, value in defaults.items():
        if getattr(cfg, name, None) is None:
            setattr(cfg, name, value)


# The RMT paper's backbones (Transformer-XL base, Dai et al. 2019). A paper architecture sets every
# RMTConfig value itself, defaults included, so that a later change of a default cannot change a
# paper recipe; tests/test_architectures.py checks that no field is left to the default.
# They are the paper's code (LM-RMT on Transformer-XL's) parameter for parameter, where our defaults
# differ on purpose: Transformer-XL's projected adaptive softmax with an output bias per word, one
# pair of relative biases for all layers, LayerNorm gains ~ N(1, 0.02); the memory as that code has
# it (one N(0, 1) vector repeated, unscaled, written after the output dropout, memory-to-memory
# positions as its rel_shift reads them); a cache of the last mem_len positions of [read; segment;
# write], distances along the key sequence. Our defaults (stream distance, segment-only cache,
# signed memory positions, scaled memory) are explained in the module docstring and docs.
PAPER_COMMON = dict(dropout=0.1, dropatt=0.0, pre_lnorm=False, init_std=0.02, tie_weights=True,
                    same_length=False, clamp_len=-1, memory_layout="rmt", memory_write_input="memory",
                    mem_attend_cache=False, cache_distance="sequence", div_val=1.0, memory_target_token=False,
                    adaptive_softmax_type="transformer_xl", share_rel_bias=True, layer_norm_init_std=0.02,
                    memory_parametrisation="raw", memory_write_dropout=True, memory_positions="rel_shift",
                    cache_content="sequence")
PAPER_BACKBONES = {
    "wt103_base": dict(PAPER_COMMON, n_layer=16, d_model=410, n_head=10, d_head=41, d_inner=2100,
                       adaptive_softmax_cutoff="20000,40000,200000"),
    "enwik8_base": dict(PAPER_COMMON, n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048,
                        adaptive_softmax_cutoff=None),
}
# Named paper architectures: backbone + the memory of the paper's rows they are named after
# (segment length, BPTT depth and the other rows' memory sizes are in examples/*/recipes.yaml).
PAPER_ARCHS = {
    # WikiText-103, segment 150: baseline; Tr-XL mem 150; RMT m=10; MemTr m=10; Tr-XL + RMT 150+10 (with the
    # target symbol of the paper's memory-token loss)
    "baseline_wt103_base": ("wt103_base", dict(num_mem_tokens=0, mem_len=0)),
    "transformer_xl_wt103_base": ("wt103_base", dict(num_mem_tokens=0, mem_len=150)),
    "rmt_wt103_base": ("wt103_base", dict(num_mem_tokens=10, mem_len=0)),
    "memtr_wt103_base": ("wt103_base", dict(num_mem_tokens=10, mem_len=0, memory_layout="memtr")),
    "rmt_xl_wt103_base": ("wt103_base", dict(num_mem_tokens=10, mem_len=150, memory_target_token=True)),
    # enwik8, segment 128: baseline; Tr-XL mem 200; RMT m=20 (the paper has no Tr-XL + RMT row here)
    "baseline_enwik8_base": ("enwik8_base", dict(num_mem_tokens=0, mem_len=0)),
    "transformer_xl_enwik8_base": ("enwik8_base", dict(num_mem_tokens=0, mem_len=200)),
    "rmt_enwik8_base": ("enwik8_base", dict(num_mem_tokens=20, mem_len=0)),
}


def _set_paper_values(cfg, values):
    """Like ``_set_defaults``, but also for booleans, which fairseq's parser never leaves unset
    (used by every named architecture whose values must not follow the dataclass defaults).

    A boolean flag can only flip its dataclass default (``--pre-lnorm`` when the default is False),
    so a value equal to the current default was not given: it gets the paper's value. Example: if
    the default of ``pre_lnorm`` became True, ``--arch rmt_wt103_base`` would still give False.
    """
    for name, value in values.items():
        default = RMTConfig.__dataclass_fields__[name].default
        if getattr(cfg, name, None) is None or (isinstance(default, bool) and getattr(cfg, name) == default):
            setattr(cfg, name, value)


def _register_paper_arch(name, backbone, memory):
    values = {**PAPER_BACKBONES[backbone], **memory}
    register_model_architecture("rmt", name)(lambda cfg: _set_paper_values(cfg, values))


for _name, (_backbone, _memory) in PAPER_ARCHS.items():
    _register_paper_arch(_name, _backbone, _memory)


def _register_family(name, backbone, rmt_mem, xl_mem):
    """Three named variants of one backbone: RMT, Transformer-XL and Tr-XL + RMT."""

    def variant(num_mem_tokens, mem_len):
        def arch(cfg):
            _set_defaults(cfg, num_mem_tokens=num_mem_tokens, mem_len=mem_len)
            backbone(cfg)

        return arch

    register_model_architecture("rmt", f"rmt_{name}")(variant(rmt_mem, 0))
    register_model_architecture("rmt", f"transformer_xl_{name}")(variant(0, xl_mem))
    register_model_architecture("rmt", f"rmt_xl_{name}")(variant(rmt_mem, xl_mem))


# At these widths Transformer-XL's post-LayerNorm and init std 0.02 (tuned for d_model 410-512) leave
# the memory unlearned: every residual branch adds ~0.02^2 * d_model of its input, so a written
# memory barely depends on its segment. Pre-LayerNorm with init std 0.1 learns it (the evidence is
# in docs/memory_in_lm.md).
SMALL_SCALE = dict(pre_lnorm=True, init_std=0.1)


def _small_scale(cfg):
    _set_paper_values(cfg, SMALL_SCALE)
    # The write input is the task's (resolve_write_input): learned for language modelling, where with
    # the paper's a small model's memory collapses (docs/memory_in_lm.md, 2c); the paper's for the
    # memory tasks. Only the RMT layout with memory has a write block.
    if cfg.num_mem_tokens and getattr(cfg, "memory_layout", None) in (None, "rmt"):
        _set_defaults(cfg, memory_write_input="auto")


def _tiny(cfg):
    _set_defaults(cfg, n_layer=2, d_model=64, n_head=2, d_head=32, d_inner=128, dropout=0.0)
    _small_scale(cfg)


def _small(cfg):
    # The paper's size for the algorithmic tasks.
    _set_defaults(cfg, n_layer=4, d_model=128, n_head=4, d_head=32, d_inner=512, dropout=0.1)
    _small_scale(cfg)


# Small sizes for CPU runs and tests (not paper configurations).
_register_family("small", _small, rmt_mem=10, xl_mem=24)
# rmt_tiny's 8 memory tokens: with 4 its memory did not pay in language modelling (docs/memory_in_lm.md, 4)
_register_family("tiny", _tiny, rmt_mem=8, xl_mem=16)
