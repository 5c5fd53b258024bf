"""Python use of a trained checkpoint: score or continue long token streams with the memory carried.

    from rmt_plugin.api import load

    lm = load("checkpoints/checkpoint_best.pt")          # the model, its dictionary, its segment length
    tokens = lm.encode("the cat sat on the mat")          # [1, N] ids (word level: words; byte level: bytes)
    log_probs = lm.score(tokens)                          # [1, N]: log p(token | everything read before)
    more = lm.score(lm.encode("and the dog"))             # continues the same stream: memory carried
    lm.memory                                             # [1, m, d]: what the memory holds now
    saved = lm.state; lm.reset(); lm.state = saved        # forget, or swap in another stream's state
    ids = lm.generate(10)                                 # [1, 10] greedy continuation, memory carried

A row of ``tokens`` is a stream: with ``B`` rows, ``B`` streams are read side by side, each with
its own memory. Each call is cut into segments of the checkpoint's ``--tokens-per-sample`` (the
last one may be shorter), run one after another from the carried state, as ``fairseq-eval-lm
--task rmt_lm`` reads a split: scoring a split in one call gives eval-lm's loss. The first token of
a stream is predicted from an end-of-line, as in fairseq; later calls predict their first token
from the last token of the call before. ``load`` registers the plugin with fairseq first, so no
``import rmt_plugin`` is needed before it.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .model import RMTState


def load(path: str, device: str = "cpu", overrides: Optional[dict] = None) -> "StreamingLM":
    """The model of checkpoint ``path`` in eval mode, ready to read streams (``overrides``: model
    fields to change, as ``fairseq-eval-lm --model-overrides``, e.g. ``{"mem_len": 640}``)."""
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides=overrides or {})
    # the segment length validation used: with --tokens-per-sample-schedule, its last value
    return StreamingLM(models[0].to(device).eval(), task.target_dictionary, task.length_schedule[-1])


class StreamState(NamedTuple):
    """Where the streams are: the model's state (memory, cache) and each stream's last token."""

    model: Optional[RMTState]
    last: Tensor  # [B, 1]: the source of the next token


class StreamingLM:
    """A model reading streams segment by segment, carrying its state (see the module docstring)."""

    def __init__(self, model, dictionary, segment_length: int):
        self.model, self.dictionary, self.segment_length = model, dictionary, segment_length
        self.state: Optional[StreamState] = None  # None: fresh streams

    @property
    def memory(self) -> Optional[Tensor]:
        """[B, m, d]: what each stream's memory holds now (None before any token or without memory)."""
        return None if self.state is None or self.state.model is None else self.state.model.memory

    def reset(self):
        """Start every stream afresh: the learned start memory, an empty cache."""
        self.state = None

    def encode(self, text: str) -> Tensor:
        """[1, N] ids of ``text`` as the data-bin was made: words split at spaces, or, for a
        byte-level dictionary, each UTF-8 byte as its number."""
        byte_level = all(self.dictionary[i].isdigit() for i in range(self.dictionary.nspecial,
                                                                      min(len(self.dictionary), 40)))
        words = [str(b) for b in text.encode("utf-8")] if byte_level else text.split()
        return torch.tensor([[self.dictionary.index(w) for w in words]], device=self._device())

    @torch.no_grad()
    def score(self, tokens: Tensor) -> Tensor:
        """log p of each token [B, N] (natural log) given everything its stream read before."""
        tokens = tokens.to(self._device())
        if self.state is None:
            model_state, first = None, tokens.new_full((tokens.size(0), 1), self.dictionary.eos())
        else:
            model_state, first = self.state
        sources = torch.cat([first, tokens[:, :-1]], dim=1)
        out = []
        for start in range(0, tokens.size(1), self.segment_length):
            stop = start + self.segment_length
            net_output = self.model(sources[:, start:stop], state=model_state)
            model_state = net_output[1]["state"]
            out.append(self.model.decoder.target_log_prob(net_output[0], tokens[:, start:stop]))
        self.state = StreamState(model_state, tokens[:, -1:])
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate(self, n: int, temperature: float = 0.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """[B, n] tokens continuing each stream: greedy, or sampled at ``temperature`` > 0. They are
        read as they are written, in segments of the checkpoint's length: the tokens of the segment
        being written are re-read from the state at its start at every step, and the state moves
        past a segment once it is full (and past the last, shorter one at the end), as in scoring."""
        if self.state is None:
            raise ValueError("generate continues a stream: score() a prompt first")
        model_state, sources = self.state
        written = []
        for i in range(n):
            net_output = self.model(sources, state=model_state)
            log_probs = self.model.get_normalized_probs(net_output, log_probs=True)[:, -1]
            if temperature > 0:
                token = torch.multinomial((log_probs / temperature).softmax(-1), 1, generator=generator)
            else:
                token = log_probs.argmax(-1, keepdim=True)
            written.append(token)
            if sources.size(1) == self.segment_length or i == n - 1:
                model_state, sources = net_output[1]["state"], token
            else:
                sources = torch.cat([sources, token], dim=1)
        self.state = StreamState(model_state, written[-1])
        return torch.cat(written, dim=1)

    def _device(self):
        return next(self.model.parameters()).device


def bits(log_probs: Tensor) -> float:
    """Mean loss in bits per token of ``score``'s log-probabilities (eval-lm's ``Loss (base 2)``)."""
    return -log_probs.mean().item() / math.log(2)
