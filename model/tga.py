"""TGA: Transition-Aware Graph Attention Network over a user's behavior-transition graph.

    x_j = NodeEmbedding(item_j, cat_j, behavior_j, gap_j)           (model/embedding.py)
    h^0 = x,  h^{l+1} = TGALayer_l(h^l; predecessors, transition types)  (model/tga_layer.py)
    heads: retrieval (user vector + pointer over nodes), conversion (target attention)

Every node's state depends only on it and earlier nodes, so a user's states can be kept
(:class:`NodeCache`) and extended by one event in O(L · d²) regardless of history length
(:meth:`TGA.refresh`): the streaming inference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tgastream.model.base import SequenceRecommender
from tgastream.model.batching import Batch, Vocabs, encode_graphs
from tgastream.model.config import ModelConfig
from tgastream.model.tga_layer import TGALayer
from tgastream.state.graph import GraphArrays


@dataclass
class NodeCache:
    """Per-node states of one user's graph window, kept between events (updated in place).

    Rows ``start .. start + size`` of the buffers are the window's nodes, oldest first:
    ``kv[l]`` holds the keys/values of layer l's inputs (what later nodes attend to), ``out``
    the last layer's outputs. ``total`` is the graph's event count when last refreshed. Buffers
    have spare capacity, so appending a node and dropping the oldest are O(d) (amortised).
    """

    total: int
    start: int
    size: int
    kv: list[torch.Tensor]  # per layer [capacity, 2d]
    out: torch.Tensor  # [capacity, d]

    def __len__(self) -> int:
        return self.size

    @property
    def states(self) -> torch.Tensor:
        """Last-layer node states of the window [n, d]."""
        return self.out[self.start:self.start + self.size]

    def keys_values(self, layer: int) -> torch.Tensor:
        return self.kv[layer][self.start:self.start + self.size]

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more rows after the window: compact to the front, grow if needed."""
        cap = self.out.shape[0]
        if self.start + self.size + extra <= cap:
            return
        new_cap = max(cap, 2 * (self.size + extra))
        live = slice(self.start, self.start + self.size)
        self.kv = [_moved(t, live, new_cap) for t in self.kv]
        self.out = _moved(self.out, live, new_cap)
        self.start = 0


def _moved(t: torch.Tensor, live: slice, cap: int) -> torch.Tensor:
    out = t.new_zeros(cap, t.shape[1])
    rows = t[live]
    out[:rows.shape[0]] = rows
    return out


class TGA(SequenceRecommender):
    name = "tga"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(
            TGALayer(cfg.dim, cfg.heads, cfg.n_edge_types, cfg.ffn_mult, cfg.dropout, cfg.impl)
            for _ in range(cfg.layers))

    def encode_nodes(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        """Node states [B, N, d] computed on the real nodes only (packed rows).

        Every operation of a layer is per node (projections, LayerNorm, feed-forward) or reads a
        node's predecessors, which are real nodes of the same graph; so the layers run on the M
        real rows of the batch with their predecessor rows re-indexed, and the states are put
        back in the [B, N] grid (padding rows 0: masked downstream). A batch of the stream is
        mostly padding (mean graph 7 nodes in a width of 50 on the bench's stream): the dense
        layout spent ~85% of the encoder's work on it."""
        b, n, d = x.shape
        nbr, etype = batch.flat_graph  # [B*N, 3] each, rows of the flat [B*N] node axis
        real = batch.mask.reshape(-1).nonzero().squeeze(1)  # [M]
        if len(real) == b * n:  # no padding: the grid itself
            h = x.reshape(b * n, d)
            for layer in self.layers:
                h = layer.forward_rows(h, nbr, etype, n)
            return h.view(b, n, d)
        pos = torch.full((b * n,), -1, dtype=torch.long, device=x.device)
        pos[real] = torch.arange(len(real), device=x.device)
        nb = nbr[real]  # [M, 3]
        nbr_rows = torch.where(nb >= 0, pos[nb.clamp(min=0)], nb).contiguous()  # [M, 3] packed rows, -1 none
        et_rows = etype[real].contiguous()  # [M, 3]
        h = x.reshape(b * n, d)[real]  # [M, d]
        for layer in self.layers:
            h = layer.forward_rows(h, nbr_rows, et_rows, len(real))
        return x.new_zeros(b * n, d).index_copy(0, real, h).view(b, n, d)

    @torch.no_grad()
    def refresh(self, cache: NodeCache | None, graph: GraphArrays, total: int, vocabs: Vocabs) -> NodeCache:
        """Bring a user's cached node states up to date with their graph, computing new nodes only.

        ``graph`` is the current window (``UserGraph.to_arrays()``) and ``total`` its event count
        (``UserGraph.total``). Nodes that left the window are dropped from the cache; the nodes
        that arrived since ``cache.total`` are embedded (only their ids are looked up) and passed
        through the layers against the cached keys/values of their predecessors: O(L · d²) per
        new event, whatever the window length. With no eviction the result equals a full
        recompute (tested); after the window slides, cached nodes keep the states they had when
        their now-evicted predecessors were still there, where a recompute would drop those edges.
        The cache is updated in place and returned (a new one when ``cache`` is None).
        """
        n = len(graph)
        new = n if cache is None else total - cache.total
        if cache is None or new > n or new < 0:
            cache, new = self._empty_cache(2 * n), n
        evicted = cache.size + new - n
        cache.start, cache.size, cache.total = cache.start + evicted, cache.size - evicted, total
        if new == 0:
            return cache
        sl = slice(n - new, n)
        part = GraphArrays(graph.items[sl], graph.categories[sl], graph.behaviors[sl], graph.ts[sl],
                           graph.gap_buckets[sl], graph.neighbors[sl], graph.edge_types[sl])
        enc = encode_graphs([part], vocabs)  # neighbors still index the whole window
        dev = self.item_counts.device

        def t(a) -> torch.Tensor:
            return torch.from_numpy(a[0].astype("int64")).to(dev)

        h = self.embed.nodes(t(enc.items), t(enc.cats), t(enc.behaviors), t(enc.gaps))  # [M, d]
        nbr, etype = t(enc.nbr), t(enc.etype)  # [M, 3] local indices into the window
        cache.reserve(new)
        end = cache.start + cache.size
        for layer_no, layer in enumerate(self.layers):
            h, kv_new = layer.step(h, cache.keys_values(layer_no), nbr, etype)
            cache.kv[layer_no][end:end + new] = kv_new
        cache.out[end:end + new] = h
        cache.size += new
        return cache

    def _empty_cache(self, capacity: int) -> NodeCache:
        d, cap = self.cfg.dim, max(capacity, 16)
        dev = self.item_counts.device
        return NodeCache(0, 0, 0, [torch.zeros(cap, 2 * d, device=dev) for _ in self.layers], torch.zeros(cap, d, device=dev))

    @torch.no_grad()
    def user_vector_from_cache(self, cache: NodeCache) -> torch.Tensor:
        """The user vector [d] from cached node states (same readout as :meth:`user_vectors`)."""
        n = len(cache)
        mask = torch.ones(1, n, dtype=torch.bool, device=cache.states.device)
        last = torch.tensor([max(n - 1, 0)], device=cache.states.device)
        return self._head().user_vector(cache.states.unsqueeze(0), mask, last)[0]
