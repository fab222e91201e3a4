"""Conversion head: will the user buy the candidate item? (DESIGN.md §4, the paper's task)

Target attention of the candidate over node states (DIN-style), with explicit same-item and
same-category terms because "has this user touched this item/category before" is the strongest
conversion signal there is:

    e_c = E_item[c] + E_cat[cat_c]
    a_n = softmax_n((W_q e_c) · (W_k h_n) / sqrt(d) + w_item [item_n = c] + w_cat [cat_n = cat_c])
    z   = MLP([Σ_n a_n h_n ; e_c ; h_last ; (Σ_n a_n h_n) ⊙ e_c ; log(1 + #same item) ; log(1 + #same cat)])
    p   = sigmoid(z),   loss = binary cross-entropy
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ConversionHead(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim, bias=False)
        self.same_item = nn.Parameter(torch.zeros(()))
        self.same_cat = nn.Parameter(torch.zeros(()))
        self.mlp = nn.Sequential(nn.Linear(4 * dim + 2, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, 1))

    def forward(self, states: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, cand: torch.Tensor,
                same_item: torch.Tensor, same_cat: torch.Tensor) -> torch.Tensor:
        """states [B, N, d], mask/same_item/same_cat [B, N] bool, last [B], cand [B, d] → logits [B]."""
        att = torch.einsum("bd,bnd->bn", self.query(cand), self.key(states)) / math.sqrt(self.dim)  # [B, N]
        att = att + self.same_item * same_item + self.same_cat * same_cat
        att = att.masked_fill(~mask, -1e9).softmax(-1)  # finite: an empty graph pools padding instead of giving NaN
        pooled = torch.einsum("bn,bnd->bd", att, states)  # [B, d]
        h_last = states[torch.arange(states.shape[0], device=states.device), last]  # [B, d]
        counts = torch.stack([(same_item & mask).sum(1), (same_cat & mask).sum(1)], -1).float().log1p()  # [B, 2]
        z = torch.cat([pooled, cand, h_last, pooled * cand, counts], -1)
        return self.mlp(z).squeeze(-1)
