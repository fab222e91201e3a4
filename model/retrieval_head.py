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

Repeat-recent prior (``ModelConfig.repeat_prior``, on by default): the pointer starts as the
repeat-recent heuristic and learns away from it only where the data says so. Let the context's
distinct items be ordered by their newest occurrence, k_i = 0 for the most recent one (exactly
the order of the repeat-recent baseline, ``evaluation.repeat_ranks``: every event counts, whatever
its behavior), and n_i = the number of nodes holding item i. The newest node n* of every item
gets an extra logit

    π_{n*} = a + g(u) - β · log(1 + k_i) + γ · log n_i,     g(u) = w_g · u + b_g

(every older occurrence gets π = 0) and the pointer logit is c_n + π_n. a, β, γ are learned
scalars stored as value / REPEAT_SCALE (Adam moves a parameter by about lr a step, so a bare
scalar would hardly leave its start in one epoch); w_g, b_g a learned per-user correction of the
level, zero at the start. Initialisation: β = 1, γ = 0, w_g = b_g = 0, a = a_0 and the pointer's
query projection W_p = 0, so that c_n = ρ = 0 for every node. Then for a context item

    logit(i) = logaddexp(s(i), log(e^{a_0 - log(1 + k_i)} + (n_i - 1)))
             = a_0 - log(1 + k_i) + ε,   0 ≤ ε ≤ (e^{s(i)} + n_i - 1) · e^{-(a_0 - log(1 + k_i))}

and for every other item logit(i) = s(i) ≤ 1/τ + b_i = 1/τ (cosine scores, zero biases at the
start). With a_0 = 1/τ + log(1 + K) + 12 (K = ``max_positions``, the longest context) every context
item is above every other item by at least 12, ε < n_i e^{-12} ≈ 6e-6 · n_i, and consecutive
distinct ranks differ by log((k + 2)/(k + 1)) ≥ 1/(K + 1) ≫ ε for the contexts used here, so the
untrained model ranks exactly as repeat-recent does: own items newest first, then the rest (where
repeat-recent ties them, the model orders them by s(i)). Training then moves a (how often a user
comes back at all), β (how fast the return chance falls with distinct rank), γ (touch counts:
items touched often return more), g(u) (per user), and the learned pointer c_n (which item, from
the node states) away from that start; the gradient of every one of them is non-zero from the
first step (W_p = 0 still gets ∂c/∂W_p = (W_k h_n) u^T / √d).

**The learned pointer is bounded while the prior is on** (``ModelConfig.pointer_bound`` P, 8 by
default): the bilinear term enters as

    c_n = P · tanh((W_p u) · (W_k h_n) / (sqrt(d) · P)) + ρ[bucket(N - 1 - n)]

so it can reorder the context's items by up to ±P logits but not switch the pointer off. Measured
without it (the online learner on the first 30k events of taobao-users-60k, seed 0): the stream's
first batches are three quarters novel targets, every one of which pushes the saturated pointer
mass down; the fastest way down was the bilinear term (|u| grew 6.7 → 20), which went to -35..-56
for every node within 45 steps, below the prior's level (~25): the pointer was off, the untrained
catalogue scores ranked alone and prequential HR@10 was 0.000-0.004 for ~120 steps (repeat-recent:
~0.17) before it recovered. With the bound, the level a + g(u) is the only way to switch the
pointer off (it is meant to be: that is "learning away from the heuristic where the data says
so"), and the same run kept HR@10 at 0.07-0.18 through those steps. Without the prior the plain
pointer is unbounded, as before (P = 0 also turns the bound off).

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


REPEAT_SCALE = 50.0
"""The repeat prior's scalars a, β, γ are learned as value / REPEAT_SCALE (their learning rate × 50: the
level a starts ~20 logits above where data puts it and has to get there within one epoch of ~100 steps)."""
REPEAT_MARGIN = 12.0
"""How far (in logits) the untrained model puts the last context item above any other item."""


def repeat_level(temperature: float, longest: int) -> float:
    """a_0: the start of the repeat prior's level, so that the untrained pointer ranks as
    repeat-recent (see the module docstring); ``temperature`` 0 (plain dot scores) assumes |s| ≤ 5."""
    top = 1.0 / temperature if temperature > 0 else 5.0
    return top + math.log1p(max(longest, 1)) + REPEAT_MARGIN


def repeat_features(keys: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per node of a right-padded context (keys [B, N], 0 = none; mask [B, N]):
    newest [B, N] bool (the node is its item's most recent occurrence), rank [B, N] float (k: how
    many distinct items occur more recently; meaningful on newest nodes) and count [B, N] float
    (n_i: nodes holding the same item)."""
    valid = mask & (keys > 0)  # [B, N]
    n = keys.shape[1]
    same = (keys.unsqueeze(2) == keys.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)  # [B, N, N]
    later = torch.ones(n, n, dtype=torch.bool, device=keys.device).triu(1)  # [N, N]: m > n
    newest = valid & ~(same & later).any(-1)  # [B, N]
    rank = (newest.unsqueeze(1) & later).sum(-1).to(torch.float32)  # [B, N]
    count = same.sum(-1).to(torch.float32)  # [B, N]
    return newest, rank, count


class RetrievalHead(nn.Module):
    def __init__(self, dim: int, copy: bool, recency_buckets: int, repeat_prior: bool = False,
                 repeat_start: float = 0.0, pointer_bound: float = 0.0) -> None:
        """``repeat_prior``: the pointer gets the repeat-recent prior (module docstring) starting
        at level ``repeat_start`` (a_0, see :func:`repeat_level`); ``pointer_bound`` P > 0: with
        the prior, the learned pointer term is bounded to ±P (module docstring)."""
        super().__init__()
        self.dim, self.copy = dim, copy
        self.pointer_bound = pointer_bound if repeat_prior else 0.0
        self.pool_query = nn.Linear(dim, dim)
        self.user = nn.Linear(2 * dim, dim)
        self.repeat = self.repeat_gate = None
        if copy:
            self.ptr_query = nn.Linear(dim, dim)
            self.ptr_key = nn.Linear(dim, dim, bias=False)
            self.recency = nn.Embedding(recency_buckets, 1)
            nn.init.zeros_(self.recency.weight)
            if repeat_prior:
                # a, β, γ (/ REPEAT_SCALE); the learned pointer starts at 0 so the prior alone ranks
                self.repeat = nn.Parameter(torch.tensor([repeat_start, 1.0, 0.0]) / REPEAT_SCALE)
                self.repeat_gate = nn.Linear(dim, 1)
                nn.init.zeros_(self.repeat_gate.weight)
                nn.init.zeros_(self.repeat_gate.bias)
                nn.init.zeros_(self.ptr_query.weight)
                nn.init.zeros_(self.ptr_query.bias)
        self.recency_buckets = recency_buckets

    @property
    def repeat_coefficients(self) -> dict[str, float] | None:
        """The repeat prior's current a, β, γ (None without the prior)."""
        if self.repeat is None:
            return None
        a, beta, gamma = (REPEAT_SCALE * self.repeat.detach()).tolist()
        return {"a": a, "beta": beta, "gamma": gamma}

    def repeat_logits(self, u: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """π_n [B, N] of the repeat-recent prior (0 on all but each item's newest node)."""
        newest, rank, count = repeat_features(keys, mask)  # [B, N] each
        a, beta, gamma = REPEAT_SCALE * self.repeat  # scalars
        level = a + self.repeat_gate(u)  # [B, 1]
        pi = level - beta * torch.log1p(rank) + gamma * torch.log(count.clamp(min=1.0))  # [B, N]
        return torch.where(newest, pi, torch.zeros_like(pi))

    def user_vector(self, states: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """states [B, N, d], mask [B, N], last [B] index of the newest node → u [B, d]."""
        h_last = states[torch.arange(states.shape[0], device=states.device), last]  # [B, d]
        att = torch.einsum("bd,bnd->bn", self.pool_query(h_last), states) / math.sqrt(self.dim)  # [B, N]
        att = att.masked_fill(~mask, -1e9).softmax(-1)  # finite: an empty graph pools padding instead of giving NaN
        pooled = torch.einsum("bn,bnd->bd", att, states)  # [B, d]
        return self.user(torch.cat([h_last, pooled], -1))

    def node_logits(self, u: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor,
                    keys: torch.Tensor | None = None) -> torch.Tensor:
        """Pointer logits c_n [B, N] (-inf on padding), plus the repeat prior π_n when the head has
        one (it needs the nodes' item ``keys`` [B, N])."""
        pos = torch.arange(states.shape[1], device=states.device)  # [N]
        bucket = recency_bucket(lengths.unsqueeze(1) - 1 - pos.unsqueeze(0), self.recency_buckets)  # [B, N]
        c = torch.einsum("bd,bnd->bn", self.ptr_query(u), self.ptr_key(states)) / math.sqrt(self.dim)  # [B, N]
        if self.pointer_bound > 0:  # (with the repeat prior: only its level may switch the pointer off)
            c = self.pointer_bound * torch.tanh(c / self.pointer_bound)
        c = c + self.recency(bucket).squeeze(-1)
        if self.repeat is not None:
            if keys is None:
                raise ValueError("the repeat prior needs the nodes' item keys")
            c = c + self.repeat_logits(u, keys, mask)
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
