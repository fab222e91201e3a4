"""SASRec-style baseline: causal transformer over the same node inputs, same heads as TGA.

    x_j = NodeEmbedding(item, cat, behavior, gap) + P[min(N - 1 - j, P_max - 1)]

P is a learned embedding of the distance from the newest node (the right-padded equivalent of
SASRec's left-padded absolute positions). By default its retrieval head scores the catalogue only,
like SASRec (``copy=False``); ``sasrec_copy`` in the evaluation switches the pointer on to show
what the encoder alone is worth.
"""

from __future__ import annotations

import torch
from torch import nn

from tgastream.model.base import SequenceRecommender
from tgastream.model.batching import Batch
from tgastream.model.config import ModelConfig
from tgastream.model.sasrec_layer import CausalSelfAttentionLayer


class SASRec(SequenceRecommender):
    name = "sasrec"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.position = nn.Embedding(cfg.max_positions, cfg.dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.layers = nn.ModuleList(
            CausalSelfAttentionLayer(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.layers))

    def encode_nodes(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(batch.width, device=batch.items.device)  # [N]
        back = (batch.lengths.unsqueeze(1) - 1 - pos).clamp(0, self.cfg.max_positions - 1)  # [B, N]
        h = x + self.position(back)  # [B, N, d]
        for layer in self.layers:
            h = layer(h)
        return h
