"""Retrieval head: a user vector, and next-item scores that can point back at the user's own nodes.

User vector (readout of the newest node plus an attention pool over all nodes):

    a_n = softmax_n((W_a h_last) · h_n / sqrt(d)),   u = W_u [h_last ; Σ_n a_n h_n]

Catalogue score of item i:  s(i) = u · e_i + b_i.

Pointer ("copy") over the user's graph: every node n is an extra candidate with logit

    c_n = (W_p u) · (W_k h_n) / sqrt(d) + ρ[bucket(N - 1 - n)]

(ρ: a learned recency bias by distance from the newest node: exact up to 16, then log2). Generating item i and copying
a node holding item i are events of one softmax, so

    p(i) ∝ exp(s(i)) + Σ_{n : item_n = i} exp(c_n),   i.e.  logit(i) = logaddexp(s(i), LSE_{n: item_n = i} c_n).

Transition prior (optional, ``ModelConfig.transition_prior``): the pointer can only name items
the user has already touched, and the item table alone rarely lifts a novel item into the top
10 (most of the catalogue is seen once). An item-to-item count of where users went next
(model/covisit.py, from the past only) is fed in as a learned-weight term of the generation logit:

    s(i) = u · e_i + b_i + w_π · log(1 + π(i)),   π(i) = Σ_k decay^k · count(x_k → i)

(x_k: the user's k-th most recent distinct item; the batch carries each row's P best-scored
candidates, π = 0 for every other item; w_π is one learned scalar, initialised to 1 and
learned at 20× the learning rate, see ``base.PRIOR_SCALE``). In the
sampled-softmax loss the uniform negatives get π = 0 (their keys are unknown there; a uniform
draw lands among P named candidates with probability P / catalogue size).

Repeating an item the user just viewed (a fifth of Taobao's next events; carted items bought
later) is then a matter of the pointer, while s(i) is free to model what comes new. Node states,
not item embeddings, carry the pointer, so items without an embedding row can be pointed at too.
Training uses sampled softmax over in-batch and uniform negatives (logQ-corrected) plus all of the
row's nodes exactly; evaluation ranks the full catalogue with the same formula.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def recency_bucket(distance: torch.Tensor, n_buckets: int, exact: int = 16) -> torch.Tensor:
    """Distance ``d`` back from the newest node: d itself below ``exact``, then log2-spaced
    (exact + floor(log2(d / exact))), capped at n_buckets - 1."""
    d = distance.clamp(min=0)
    far = exact + torch.floor(torch.log2(d.clamp(min=exact).float() / exact)).long()
    return torch.where(d < exact, d, far).clamp(max=n_buckets - 1)


class RetrievalHead(nn.Module):
    def __init__(self, dim: int, copy: bool, recency_buckets: int) -> None:
        super().__init__()
        self.dim, self.copy = dim, copy
        self.pool_query = nn.Linear(dim, dim)
        self.user = nn.Linear(2 * dim, dim)
        if copy:
            self.ptr_query = nn.Linear(dim, dim)
            self.ptr_key = nn.Linear(dim, dim, bias=False)
            self.recency = nn.Embedding(recency_buckets, 1)
            nn.init.zeros_(self.recency.weight)
        self.recency_buckets = recency_buckets

    def user_vector(self, states: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """states [B, N, d], mask [B, N], last [B] index of the newest node → u [B, d]."""
        h_last = states[torch.arange(states.shape[0], device=states.device), last]  # [B, d]
        att = torch.einsum("bd,bnd->bn", self.pool_query(h_last), states) / math.sqrt(self.dim)  # [B, N]
        att = att.masked_fill(~mask, -1e9).softmax(-1)  # finite: an empty graph pools padding instead of giving NaN
        pooled = torch.einsum("bn,bnd->bd", att, states)  # [B, d]
        return self.user(torch.cat([h_last, pooled], -1))

    def node_logits(self, u: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor
                    ) -> torch.Tensor:
        """Pointer logits c_n [B, N] (-inf on padding)."""
        pos = torch.arange(states.shape[1], device=states.device)  # [N]
        bucket = recency_bucket(lengths.unsqueeze(1) - 1 - pos.unsqueeze(0), self.recency_buckets)  # [B, N]
        c = torch.einsum("bd,bnd->bn", self.ptr_query(u), self.ptr_key(states)) / math.sqrt(self.dim)
        c = c + self.recency(bucket).squeeze(-1)
        return c.masked_fill(~mask, float("-inf"))


def scatter_logsumexp(values: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """out[b, k] = log Σ_{n : index[b, n] = k} exp(values[b, n]) (-inf where none); values [B, N]
    with -inf on entries to skip, index [B, N] in [0, width)."""
    m = values.max(dim=1, keepdim=True).values.clamp(min=-1e30)  # [B, 1], finite
    w = torch.exp(values - m)  # [B, N], 0 where -inf
    out = torch.zeros(values.shape[0], width, dtype=values.dtype, device=values.device).scatter_add(1, index, w)
    return torch.log(out) + m


def prior_logits(prior_keys: torch.Tensor, prior_vals: torch.Tensor, cand_keys: torch.Tensor) -> torch.Tensor:
    """log(1 + π) [B, M] of M candidates per row: prior_keys/prior_vals [B, P] (key 0 = none),
    cand_keys [M] (the same candidates for every row) or [B, M]."""
    cand = cand_keys.unsqueeze(0).expand(prior_keys.shape[0], -1) if cand_keys.dim() == 1 else cand_keys  # [B, M]
    hit = (prior_keys.unsqueeze(2) == cand.unsqueeze(1)) & (prior_keys > 0).unsqueeze(2)  # [B, P, M]
    return torch.einsum("bp,bpm->bm", prior_vals, hit.to(prior_vals.dtype)).log1p()


def prior_catalogue_logits(prior_keys: torch.Tensor, prior_vals: torch.Tensor, width: int) -> torch.Tensor:
    """log(1 + π) [B, C] over a catalogue whose column k holds key k + 1 (keys ≤ 0 or > C skipped)."""
    ok = (prior_keys > 0) & (prior_keys <= width)  # [B, P]
    out = prior_vals.new_zeros(prior_keys.shape[0], width)
    return out.scatter_add(1, (prior_keys - 1).clamp(0, width - 1), prior_vals * ok).log1p()
