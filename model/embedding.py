"""Node input embedding and the item tower they share (DESIGN.md §4).

    x_j = LayerNorm(E_item[item_j] + E_cat[cat_j] + E_beh[beh_j] + E_gap[gap_j])
    e_i = E_item[item_i] + E_cat[cat_i]                    (candidate item vector, item tower)

Row 0 of the item and category tables is padding/unknown and stays zero, so an item without a
row falls back to its category's embedding, in the input and as a candidate alike.
"""

from __future__ import annotations

import torch
from torch import nn

from tgastream.model.batching import Batch
from tgastream.model.config import ModelConfig


class NodeEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.item = nn.Embedding(cfg.n_items, d, padding_idx=0)
        self.category = nn.Embedding(cfg.n_categories, d, padding_idx=0)
        self.behavior = nn.Embedding(cfg.n_behaviors, d)
        self.gap = nn.Embedding(cfg.n_gap_buckets, d)
        for table in (self.item, self.category, self.behavior, self.gap):
            nn.init.normal_(table.weight, std=0.05)
        with torch.no_grad():
            self.item.weight[0].zero_()
            self.category.weight[0].zero_()
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def nodes(self, items: torch.Tensor, cats: torch.Tensor, behaviors: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        """Node inputs [..., d] from rows of the same shape."""
        x = self.item(items) + self.category(cats) + self.behavior(behaviors) + self.gap(gaps)
        return self.drop(self.norm(x))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.nodes(batch.items, batch.cats, batch.behaviors, batch.gaps)  # [B, N, d]

    def lookup(self, batch: Batch, rows: torch.Tensor, cats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Node inputs [B, N, d] and item vectors of ``rows`` [M, d] from *one* lookup per table.

        Every lookup of a table costs a dense [rows, d] gradient in the backward pass; a training
        step that reads the item table once instead of four times is markedly faster on big
        catalogues.
        """
        n = batch.items.numel()
        it = self.item(torch.cat([batch.items.reshape(-1), rows]))  # [B*N + M, d]
        ct = self.category(torch.cat([batch.cats.reshape(-1), cats]))
        x = (it[:n] + ct[:n]).view(*batch.items.shape, -1) + self.behavior(batch.behaviors) + self.gap(batch.gaps)
        return self.drop(self.norm(x)), it[n:] + ct[n:]

    def items(self, rows: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        """Candidate item vectors e_i [..., d] (the retrieval/conversion item tower)."""
        return self.item(rows) + self.category(cats)
