"""Conversion head: will the user buy the candidate item? (DESIGN.md §4, the paper's task)

Target attention of the candidate over node states (DIN-style), with explicit same-item and
same-category terms because "has this user touched this item/category before" is the strongest
conversion signal there is:

    e_c = E_item[c] + E_cat[cat_c]
    a_n = softmax_n((W_q e_c) · (W_k h_n) / sqrt(d) + w_item [item_n = c] + w_cat [cat_n = cat_c])
    z   = MLP([Σ_n a_n h_n ; e_c ; h_last ; (Σ_n a_n h_n) ⊙ e_c ; log(1 + #same item) ; log(1 + #same cat)])
    p   = sigmoid(z),   loss = binary cross-entropy

With ``raw`` (``ModelConfig.conversion_raw``) the head also sees DIN's input: the same target
attention over raw node embeddings x'_n = E'(item_n, cat_n, behavior_n, gap_n) from a table of its
own (:class:`model.embedding.NodeEmbedding`, trained by the conversion loss alone, like DIN's), with
the candidate e'_c = E'_item[c] + E'_cat[cat_c]:

    a'_n = softmax_n((W'_q e'_c) · (W'_k x'_n) / sqrt(d) + w'_item [item_n = c] + w'_cat [cat_n = cat_c])
    z    = MLP([... as above ... ; Σ_n a'_n x'_n ; e'_c ; (Σ_n a'_n x'_n) ⊙ e'_c ; log counts])

so TGA's conversion head holds everything DIN's has, beside the encoder's states (which, with
``conversion_grad`` 0, are shaped by retrieval only).

With ``context features`` (``ModelConfig.conversion_features``) the MLP also reads
:func:`context_features`: per behavior b (click, fav, cart, buy) log(1 + #nodes of the candidate
item with behavior b) and the same for its category, and log(1 + nodes back from the newest to the
candidate's latest node) (log(1 + N) when it is absent): "carted it two events ago" spelled out
instead of left for the attention to find.

With the repeat-interest prior (``ModelConfig.conversion_prior``, the online learner's default) the
logit starts as the heuristic the model contains, repeat-recent's conversion score (model/shadow.py
``repeat_interest``: touches of the candidate item in the context, carts and favs counting double):

    r   = Σ_n [item_n = c] · (1 + [b_n ∈ {fav, cart}])
    z   = MLP([...]) + s · log(1 + r),   s learned from 1, the MLP's output layer from 0

so the untrained head ranks clicks exactly as repeat-interest does (ties broken by nothing), and
training moves it away only where the labels say so. Why: online, the head learning from about one
buy in a hundred clicks ranked below that heuristic on both real logs' validation shares
(docs/conversion.md, "The heuristic inside the conversion head").

With a base rate ρ (``ModelConfig.conversion_base_rate`` > 0; the trainer's default 0.02) the MLP's
output bias starts at logit(ρ), so the untrained head predicts

    p = sigmoid(logit(ρ) + s · log(1 + r))     (with the prior; ρ itself for an untouched item)

instead of 0.5 and up: the same order, calibrated from the first step, so that fewer and larger
steps (catch-up steps) do not leave it far above the buy rate (docs/conversion.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tgastream.core.events import BEHAVIOR_CODE

STRONG_BEHAVIORS = (BEHAVIOR_CODE["fav"], BEHAVIOR_CODE["cart"])
"""Behaviors that count double in repeat-recent's conversion score (here and model/shadow.py)."""


class TargetAttention(nn.Module):
    """a_n = softmax_n((W_q e_c) · (W_k h_n) / sqrt(d) + w_item [item_n = c] + w_cat [cat_n = cat_c]);
    returns Σ_n a_n h_n."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim, bias=False)
        self.same_item = nn.Parameter(torch.zeros(()))
        self.same_cat = nn.Parameter(torch.zeros(()))

    def forward(self, states: torch.Tensor, mask: torch.Tensor, cand: torch.Tensor, same_item: torch.Tensor,
                same_cat: torch.Tensor) -> torch.Tensor:
        """states [B, N, d], mask/same_item/same_cat [B, N] bool, cand [B, d] → pooled [B, d]."""
        att = torch.einsum("bd,bnd->bn", self.query(cand), self.key(states)) / math.sqrt(self.dim)  # [B, N]
        att = att + self.same_item * same_item + self.same_cat * same_cat
        att = att.masked_fill(~mask, -1e9).softmax(-1)  # finite: an empty graph pools padding instead of giving NaN
        return torch.einsum("bn,bnd->bd", att, states)  # [B, d]


class ConversionHead(TargetAttention):
    """Target attention over node states (the inherited parameters, names kept for checkpoints),
    an optional second one over raw embeddings, and the MLP."""

    def __init__(self, dim: int, dropout: float = 0.0, raw: bool = False, n_features: int = 0,
                 prior: bool = False, base_rate: float = 0.0) -> None:
        super().__init__(dim)
        self.attend_raw = TargetAttention(dim) if raw else None
        self.n_features = n_features
        width = (7 if raw else 4) * dim + 2 + n_features
        self.mlp = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, 1))
        self.prior = prior
        if prior:  # z = MLP(...) + s · log(1 + r): starts as the heuristic (module docstring)
            self.prior_scale = nn.Parameter(torch.ones(()))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        if base_rate > 0:  # the untrained head predicts about the base rate, not 0.5 and up
            nn.init.constant_(self.mlp[-1].bias, math.log(base_rate / (1 - base_rate)))

    def forward(self, states: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, cand: torch.Tensor,
                same_item: torch.Tensor, same_cat: torch.Tensor, raw_states: torch.Tensor | None = None,
                raw_cand: torch.Tensor | None = None, features: torch.Tensor | None = None,
                interest: torch.Tensor | None = None) -> torch.Tensor:
        """states [B, N, d], mask/same_item/same_cat [B, N] bool, last [B], cand [B, d] → logits [B];
        raw_states [B, N, d] / raw_cand [B, d]: the head's own raw embeddings (required iff ``raw``);
        features [B, n_features]: :func:`context_features` (required iff ``n_features``);
        interest [B]: :func:`repeat_interest` (required iff ``prior``)."""
        pooled = super().forward(states, mask, cand, same_item, same_cat)  # [B, d]
        h_last = states[torch.arange(states.shape[0], device=states.device), last]  # [B, d]
        counts = torch.stack([(same_item & mask).sum(1), (same_cat & mask).sum(1)], -1).to(states.dtype).log1p()  # [B, 2]
        parts = [pooled, cand, h_last, pooled * cand]
        if self.attend_raw is not None:
            if raw_states is None or raw_cand is None:
                raise ValueError("this conversion head attends over raw embeddings too: pass raw_states and raw_cand")
            raw_pooled = self.attend_raw(raw_states, mask, raw_cand, same_item, same_cat)  # [B, d]
            parts += [raw_pooled, raw_cand, raw_pooled * raw_cand]
        parts.append(counts)
        if self.n_features:
            if features is None or features.shape[-1] != self.n_features:
                raise ValueError(f"this conversion head reads {self.n_features} context features per row")
            parts.append(features)
        z = self.mlp(torch.cat(parts, -1)).squeeze(-1)  # [B]
        if self.prior:
            if interest is None:
                raise ValueError("this conversion head starts from repeat-interest: pass interest")
            z = z + self.prior_scale * interest.log1p()
        return z


def n_context_features(n_behaviors: int) -> int:
    """Width of :func:`context_features`: two counts per behavior and one recency."""
    return 2 * n_behaviors + 1


def context_features(behaviors: torch.Tensor, mask: torch.Tensor, same_item: torch.Tensor, same_cat: torch.Tensor,
                     n_behaviors: int) -> torch.Tensor:
    """behaviors [B, N] long, mask/same_item/same_cat [B, N] bool → [B, 2 · n_behaviors + 1] float:
    log(1 + count) of the candidate's item and of its category per behavior, then log(1 + nodes
    back from the newest node to the candidate item's latest one), log(1 + N) if it is absent."""
    onehot = nn.functional.one_hot(behaviors.clamp(0, n_behaviors - 1), n_behaviors) * mask.unsqueeze(-1)  # [B, N, K]
    by_item = (onehot * same_item.unsqueeze(-1)).sum(1)  # [B, K]
    by_cat = (onehot * same_cat.unsqueeze(-1)).sum(1)  # [B, K]
    n = behaviors.shape[1]
    pos = torch.arange(n, device=behaviors.device).expand_as(behaviors)  # [B, N]
    newest = torch.where(mask, pos, -1).max(1).values  # [B]
    latest = torch.where(same_item & mask, pos, -1).max(1).values  # [B], -1: absent
    back = torch.where(latest >= 0, newest - latest, torch.full_like(latest, n))  # [B]
    return torch.cat([by_item, by_cat, back.unsqueeze(1)], 1).float().log1p()


def repeat_interest(behaviors: torch.Tensor, mask: torch.Tensor, same_item: torch.Tensor) -> torch.Tensor:
    """behaviors [B, N] long, mask/same_item [B, N] bool → [B] float: touches of the candidate item
    in the context, carts and favs counting double (repeat-recent's conversion score, as
    model/shadow.py ``repeat_interest`` computes it for one sample)."""
    strong = torch.isin(behaviors, torch.tensor(STRONG_BEHAVIORS, device=behaviors.device))  # [B, N]
    return ((same_item & mask).float() * (1 + strong.float())).sum(1)  # [B]
