"""One SASRec-style causal self-attention block (the baseline encoder).

    Q, K, V = W_Q h, W_K h, W_V h
    A = softmax(Q Kᵀ / sqrt(d_h) + causal mask) V                 (fused SDPA kernel)
    h̃ = LayerNorm(h + W_O A),   h' = LayerNorm(h̃ + W_2 GELU(W_1 h̃))

Same width, heads, feed-forward and normalisation placement as :class:`model.tga_layer.TGALayer`;
only the attention pattern differs (all earlier nodes, O(N²), instead of ≤ 4 graph neighbors).
Graphs are right-padded, so the causal mask alone keeps real nodes from seeing padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_mult: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, N, dh] each
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, N, dh]
        h = self.norm1(h + self.drop(self.out(a.transpose(1, 2).reshape(b, n, d))))
        return self.norm2(h + self.drop(self.ffn(h)))
