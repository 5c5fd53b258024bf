"""Adaptive input and softmax: fairseq's, and Transformer-XL's projected ones (the paper's).

A vocabulary cut at ``cutoffs`` into a head (the frequent words) and clusters of rarer words::

    cutoffs 3,5 over 7 words:  head = words 0 1 2 + one entry per cluster;  cluster 1 = words 3 4;
                               cluster 2 = words 5 6
    log p(word 4) = log p_head(cluster 1) + log p_cluster1(word 4)

``--adaptive-softmax-type transformer_xl`` is Transformer-XL's ``AdaptiveEmbedding`` and
``ProjectedAdaptiveLogSoftmax`` (Dai et al. 2019), which the RMT paper's WikiText-103 runs use:
with ``div_val`` 1 one table of the whole vocabulary at full width, tied to the output, no
projections, one output bias per word, and a weight and bias per cluster in the head; with
``div_val`` > 1 cluster i has width d / div_val^i and a projection to and from d (the output
shares the input's projections of the clusters, the head's is its own, as the paper's code ties
them). Cluster i's head entry is the i-th from the end (cluster 1 the last row of
``cluster_weight``), in the order of the paper's code, so that weights map one to one.

``fairseq`` is fairseq's ``AdaptiveInput``/``AdaptiveSoftmax``: each band has a projection even at
factor 1 (four 410 x 410 matrices on WikiText-103), no output bias, its own initialisation.
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Transformer-XL's --proj_init_std: the projections' normal initialisation.
PROJ_INIT_STD = 0.01


def cluster_bounds(vocab: int, cutoffs: List[int]) -> List[int]:
    return [0, *cutoffs, vocab]


class TransformerXLAdaptiveInput(nn.Module):
    """Transformer-XL's adaptive embedding, unscaled (the decoder multiplies by sqrt(d_model))."""

    def __init__(self, vocab: int, d_model: int, cutoffs: List[int], div_val: int, init_std: float):
        super().__init__()
        self.bounds = cluster_bounds(vocab, cutoffs)
        self.d_model = d_model
        self.div_val = div_val
        if div_val == 1:
            self.tables = nn.ModuleList([nn.Embedding(vocab, d_model)])
            self.projections = nn.ParameterList()
        else:
            widths = [d_model // div_val ** i for i in range(len(self.bounds) - 1)]
            self.tables = nn.ModuleList(
                nn.Embedding(hi - lo, w) for lo, hi, w in zip(self.bounds, self.bounds[1:], widths))
            self.projections = nn.ParameterList(nn.Parameter(torch.empty(d_model, w)) for w in widths)
        for table in self.tables:
            nn.init.normal_(table.weight, std=init_std)
        for proj in self.projections:
            nn.init.normal_(proj, std=PROJ_INIT_STD)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.div_val == 1:
            return self.tables[0](tokens)
        out = self.projections[0].new_zeros(*tokens.shape, self.d_model)
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            rows = (tokens >= lo) & (tokens < hi)
            if rows.any():
                out[rows] = F.linear(self.tables[i](tokens[rows] - lo), self.projections[i])
        return out


class TransformerXLAdaptiveSoftmax(nn.Module):
    """Transformer-XL's projected adaptive log-softmax (see the module docstring)."""

    def __init__(self, vocab: int, d_model: int, cutoffs: List[int], div_val: int, init_std: float,
                 tied_input: TransformerXLAdaptiveInput = None):
        super().__init__()
        self.bounds = cluster_bounds(vocab, cutoffs)
        self.n_clusters = len(cutoffs)
        self.div_val = div_val
        # in a tuple, so that the decoder's input module is not registered here a second time
        self.tied_input = (tied_input,) if tied_input is not None else None
        sizes = [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])]
        widths = [d_model // div_val ** i for i in range(len(sizes))] if div_val > 1 else [d_model]
        if self.n_clusters:
            self.cluster_weight = nn.Parameter(torch.empty(self.n_clusters, widths[0]))
            nn.init.normal_(self.cluster_weight, std=init_std)
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        out_sizes = sizes if div_val > 1 else [vocab]
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in out_sizes)
        self.weights = nn.ParameterList()
        if tied_input is None:
            self.weights.extend(nn.Parameter(torch.empty(n, w).normal_(std=init_std)) for n, w in zip(out_sizes, widths))
        # Projections exist only with div_val > 1; the clusters' are the input's when tied.
        self.projections = nn.ParameterList()
        if div_val > 1:
            own = 1 if tied_input is not None else len(sizes)
            self.projections.extend(nn.Parameter(torch.empty(d_model, w).normal_(std=PROJ_INIT_STD))
                                    for w in widths[:own])

    def _weight(self, i: int) -> Tensor:
        return self.tied_input[0].tables[i].weight if self.tied_input is not None else self.weights[i]

    def _projection(self, i: int):
        if self.div_val == 1:
            return None
        return self.projections[i] if i < len(self.projections) else self.tied_input[0].projections[i]

    def _cluster_params(self, i: int):
        """(weight, bias, projection) of band i: the head (with the cluster entries) or cluster i."""
        if self.div_val == 1:
            lo, hi = self.bounds[i], self.bounds[i + 1]
            weight, bias = self._weight(0)[lo:hi], self.biases[0][lo:hi]
        else:
            weight, bias = self._weight(i), self.biases[i]
        if i == 0 and self.n_clusters:
            weight = torch.cat([weight, self.cluster_weight])
            bias = torch.cat([bias, self.cluster_bias])
        return weight, bias, self._projection(i)

    def _log_softmax(self, hidden: Tensor, i: int) -> Tensor:
        weight, bias, proj = self._cluster_params(i)
        if proj is not None:
            hidden = hidden @ proj
        logits = F.linear(hidden, weight, bias)
        return F.log_softmax(logits if logits.dtype == torch.double else logits.float(), dim=-1)

    def get_log_prob(self, hidden: Tensor, target=None) -> Tensor:
        """log p of every word [..., vocab] (what fairseq's get_normalized_probs asks for)."""
        head = self._log_softmax(hidden, 0)
        if not self.n_clusters:
            return head
        parts = [head[..., :self.bounds[1]]]
        for i in range(1, self.n_clusters + 1):
            parts.append(head[..., -i, None] + self._log_softmax(hidden, i))
        return torch.cat(parts, dim=-1)

    def target_log_prob(self, hidden: Tensor, target: Tensor) -> Tensor:
        """log p(target) [...] without the table of the whole vocabulary: a cluster's softmax
        is computed only for the rows whose target is in it."""
        x = hidden.reshape(-1, hidden.size(-1))
        flat = target.reshape(-1)
        head = self._log_softmax(x, 0)
        in_head = flat < self.bounds[1]
        log_prob = head.gather(1, torch.where(in_head, flat, 0).unsqueeze(1)).squeeze(1)
        for i in range(1, self.n_clusters + 1):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            rows = (flat >= lo) & (flat < hi)
            if rows.any():
                tail = self._log_softmax(x[rows], i).gather(1, (flat[rows] - lo).unsqueeze(1)).squeeze(1)
                log_prob = log_prob.masked_scatter(rows, head[rows, -i] + tail)
        return log_prob.view(target.shape)


def fairseq_target_log_prob(adaptive_softmax, hidden: Tensor, target: Tensor) -> Tensor:
    """log p(target) [B, T] under fairseq's ``AdaptiveSoftmax``, without its [B*T, vocab] table.

    ``get_log_prob`` fills a table of the whole vocabulary for every token (68 MB per 512 tokens
    at WikiText-2's 33k words, 1 GB at WikiText-103's 267k); a target needs only its head entry
    and, for a rare word, its cluster's entry: ``log p(w) = log p_head(cluster(w)) + log p_cluster(w)``.
    """
    heads, rows = adaptive_softmax.adapt_target(target)  # head targets, then each cluster's
    x = hidden.reshape(-1, hidden.size(-1))
    log_prob = torch.log_softmax(adaptive_softmax.head(x).float(), -1).gather(1, heads[0].unsqueeze(1)).squeeze(1)
    for cluster, (tail, in_cluster) in enumerate(zip(adaptive_softmax.tail, rows)):
        if in_cluster is not None:
            tail_log_prob = torch.log_softmax(tail(x[in_cluster]).float(), -1)
            log_prob[in_cluster] += tail_log_prob.gather(1, heads[cluster + 1].unsqueeze(1)).squeeze(1)
    return log_prob.view(target.shape)
