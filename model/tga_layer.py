"""One transition-aware graph attention layer (TGA, DESIGN.md §4).

Node ``j`` attends over its in-neighbors ``P(j)`` (item-, category- and neighbor-level
predecessors, each optional) and itself; every edge ``i → j`` has a transition type
``τ(i, j) ∈ [0, 48)`` (view × source behavior × target behavior), the self edge type 48.
With H heads of width d_h = d / H, for head m:

    q_j = W_Q h_j,    k_i = W_K h_i,    v_i = W_V h_i                      (one [d, 3d] matmul)
    e_ij = q_j^m · (k_i^m + r_τ(i,j)^m) / sqrt(d_h)                        (type-dependent score)
    α_ij = softmax_{i ∈ P(j) ∪ {j}} e_ij                                   (≤ 4 terms)
    m_j^m = Σ_i α_ij (v_i^m + r'_τ(i,j)^m)                                 (type-dependent message)
    h̃_j = LayerNorm(h_j + W_O [m_j^1 … m_j^H])
    h_j' = LayerNorm(h̃_j + W_2 GELU(W_1 h̃_j))

r, r' ∈ R^{49 × d} are learned per transition type. In-degree is at most 4, so the layer is a
batched gather over a neighbor index [B, N, 4]: cost O(N · 4 · d + N · d²), linear in N. Edges
only run from earlier to later nodes, so h_j' depends on nodes ≤ j only (causal by construction)
and node states can be computed once and extended one event at a time (:meth:`TGALayer.step`).

Three interchangeable implementations of the attention aggregation (same math, tested equal):

- ``naive``: gather the 4 neighbors' k and v, materialize r_τ and r'_τ per edge, einsum;
- ``reference``: one gather for k and v, type terms through q·Rᵀ [BN, H, 49] and a scatter of α
  over types (no per-edge type vectors), plain torch ops (any device, used on CUDA);
- ``fused``: model/kernels/tga_attention.c, one pass per node forward and backward, nothing of
  size [BN, 4, d] materialized (CPU; the default there when a C compiler is available).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tgastream.model import fused


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], heads, x.shape[-1] // heads)


def aggregate_naive(qkv: torch.Tensor, nbr4: torch.Tensor, etype4: torch.Tensor, r_score: torch.Tensor,
                    r_msg: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv [M, 3d] rows of the flattened nodes (plus queries), nbr4/etype4 [Q, 4] (-1 none) → [Q, d].

    Queries are the last Q rows of qkv; slot 3 is the query itself."""
    d = qkv.shape[1] // 3
    q = _heads(qkv[-nbr4.shape[0]:, :d], heads)  # [Q, H, dh]
    valid = nbr4 >= 0  # [Q, 4]
    kv = qkv[:, d:][nbr4.clamp(min=0)]  # [Q, 4, 2d]
    k, v = _heads(kv[..., :d], heads), _heads(kv[..., d:], heads)  # [Q, 4, H, dh]
    types = etype4.clamp(min=0)
    r, r2 = _heads(r_score[types], heads), _heads(r_msg[types], heads)  # [Q, 4, H, dh]
    scores = torch.einsum("qhd,qchd->qhc", q, k + r) / math.sqrt(q.shape[-1])  # [Q, H, 4]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    alpha = scores.softmax(-1)
    return torch.einsum("qhc,qchd->qhd", alpha, v + r2).reshape(-1, d)


def aggregate_reference(qkv: torch.Tensor, nbr4: torch.Tensor, etype4: torch.Tensor, r_score: torch.Tensor,
                        r_msg: torch.Tensor, heads: int) -> torch.Tensor:
    """Same contract as :func:`aggregate_naive`, with one gather and no per-edge type vectors."""
    d = qkv.shape[1] // 3
    nq = nbr4.shape[0]
    q = _heads(qkv[-nq:, :d], heads)  # [Q, H, dh]
    g = qkv[:, d:].index_select(0, nbr4.clamp(min=0).reshape(-1)).view(nq, 4, 2, heads, d // heads)  # k and v, one gather
    return attend(q, g[:, :, 0], g[:, :, 1], nbr4 >= 0, etype4, r_score, r_msg)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, etype4: torch.Tensor,
           r_score: torch.Tensor, r_msg: torch.Tensor) -> torch.Tensor:
    """q [Q, H, dh], gathered k/v [Q, 4, H, dh], valid/etype4 [Q, 4] → messages [Q, H*dh]."""
    nq, heads, dh = q.shape
    n_types = r_score.shape[0]
    types = etype4.clamp(min=0).unsqueeze(1).expand(nq, heads, 4)  # [Q, H, 4]
    qr = torch.einsum("qhd,thd->qht", q, _heads(r_score, heads))  # [Q, H, 49]: q · r for every type
    scores = (q.unsqueeze(1) * k).sum(-1).transpose(1, 2) + qr.gather(2, types)  # [Q, H, 4]
    scores = (scores / math.sqrt(dh)).masked_fill(~valid[:, None, :], float("-inf"))
    alpha = scores.softmax(-1)  # [Q, H, 4]
    msg = (alpha.transpose(1, 2).unsqueeze(-1) * v).sum(1)  # [Q, H, dh]
    alpha_by_type = torch.zeros(nq, heads, n_types, dtype=alpha.dtype, device=alpha.device).scatter_add(2, types, alpha)
    msg = msg + torch.einsum("qht,thd->qhd", alpha_by_type, _heads(r_msg, heads))  # Σ α r'_τ
    return msg.reshape(nq, heads * dh)


class TGALayer(nn.Module):
    """Transition-aware graph attention + residual/LayerNorm + feed-forward (math in the module doc)."""

    def __init__(self, dim: int, heads: int, n_edge_types: int, ffn_mult: int = 1, dropout: float = 0.0,
                 impl: str = "auto") -> None:
        super().__init__()
        self.dim, self.heads, self.impl = dim, heads, impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.r_score = nn.Parameter(torch.randn(n_edge_types, dim) * 0.02)  # r_τ
        self.r_msg = nn.Parameter(torch.randn(n_edge_types, dim) * 0.02)  # r'_τ
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _resolved_impl(self, x: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        return "fused" if x.device.type == "cpu" and fused.available() else "reference"

    def forward(self, h: torch.Tensor, nbr: torch.Tensor, etype: torch.Tensor) -> torch.Tensor:
        """h [B, N, d]; nbr/etype [B*N, 3] flattened predecessor rows and types (-1 none) → [B, N, d]:
        :meth:`forward_rows` on the grid's rows, one group of N rows per graph."""
        b, n, d = h.shape
        return self.forward_rows(h.reshape(b * n, d), nbr, etype, n).view(b, n, d)

    def forward_rows(self, h: torch.Tensor, nbr: torch.Tensor, etype: torch.Tensor, block: int) -> torch.Tensor:
        """The layer on node rows: h [M, d]; nbr/etype [M, 3] predecessor rows of h and types (-1
        none) → [M, d]. ``block``: rows per independent group for the fused backward's threads
        (the sequence length of a [B, N] grid; M when the rows are packed graphs of any length)."""
        m, d = h.shape
        qkv = self.qkv(h)  # [M, 3d]
        impl = self._resolved_impl(h)
        if impl == "fused":
            if h.device.type != "cpu":
                raise ValueError("the fused TGA kernel runs on CPU only; use impl='reference' on CUDA")
            msg = fused.FusedNeighborAttention.apply(qkv, nbr, etype, self.r_score, self.r_msg, self.heads, block)
        else:
            self_rows = torch.arange(m, device=h.device).unsqueeze(1)  # [M, 1]
            nbr4 = torch.cat([nbr, self_rows], 1)  # [M, 4]
            etype4 = torch.cat([etype, torch.full_like(self_rows, self.r_score.shape[0] - 1)], 1)  # [M, 4]
            agg = aggregate_naive if impl == "naive" else aggregate_reference
            msg = agg(qkv, nbr4, etype4, self.r_score, self.r_msg, self.heads)  # [M, d]
        return self._update(h, msg)

    def _update(self, h: torch.Tensor, msg: torch.Tensor) -> torch.Tensor:
        h = self.norm1(h + self.drop(self.out(msg)))
        return self.norm2(h + self.drop(self.ffn(h)))

    def step(self, h_new: torch.Tensor, kv_cache: torch.Tensor, nbr: torch.Tensor, etype: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Incremental: states of M new nodes appended after n cached ones.

        h_new [M, d] layer inputs of the new nodes; kv_cache [n, 2d] keys/values of the cached
        nodes at this layer; nbr/etype [M, 3] predecessors as indices into the n + M nodes.
        New nodes may point at each other (always earlier ones). Returns (outputs [M, d], kv of
        the new nodes [M, 2d]) so the caller extends its cache. O(M · (4d + d²)), independent of n.
        """
        m, d = h_new.shape
        n = kv_cache.shape[0]
        qkv_new = self.qkv(h_new)  # [M, 3d]
        kv_new = qkv_new[:, d:]  # [M, 2d]
        self_rows = torch.arange(n, n + m, device=h_new.device).unsqueeze(1)  # [M, 1]
        nbr4 = torch.cat([nbr, self_rows], 1)  # [M, 4]
        etype4 = torch.cat([etype, torch.full_like(self_rows, self.r_score.shape[0] - 1)], 1)  # [M, 4]
        idx = nbr4.clamp(min=0)
        cached = kv_cache[idx.clamp(max=max(n - 1, 0))] if n else kv_new.new_zeros(m, 4, 2 * d)  # [M, 4, 2d]
        g = torch.where((idx < n).unsqueeze(-1), cached, kv_new[(idx - n).clamp(min=0)])  # [M, 4, 2d]
        # few rows: per-edge type vectors are cheaper than the [M, H, 49] type tables
        types = etype4.clamp(min=0)
        k = (g[..., :d] + self.r_score[types]).view(m, 4, self.heads, d // self.heads)  # [M, 4, H, dh]
        v = (g[..., d:] + self.r_msg[types]).view(m, 4, self.heads, d // self.heads)
        q = _heads(qkv_new[:, :d], self.heads).unsqueeze(1)  # [M, 1, H, dh]
        scores = (q * k).sum(-1) / math.sqrt(d // self.heads)  # [M, 4, H]
        alpha = scores.masked_fill(~(nbr4 >= 0).unsqueeze(-1), float("-inf")).softmax(1)
        msg = (alpha.unsqueeze(-1) * v).sum(1).reshape(m, d)  # [M, d]
        out = self._update(h_new.unsqueeze(0), msg.unsqueeze(0)).squeeze(0)
        return out, kv_new
