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

from model.base import SequenceRecommender
from model.batching import Batch, EncodedSamples, to_batch
from model.config import ModelConfig
from model.tga_layer import TGALayer


@dataclass
class NodeCache:
    """Per-node states of one user's graph window, kept between events.

    ``kv[l]`` [n, 2d] are the keys/values of layer l's inputs (what later nodes attend to) and
    ``states`` [n, d] the last layer's outputs; node k of the cache is node k of the window of a
    graph whose ``total`` (events ever appended) is ``total``.
    """

    total: int
    kv: list[torch.Tensor]
    states: torch.Tensor

    def __len__(self) -> int:
        return self.states.shape[0]


class TGA(SequenceRecommender):
    name = "tga"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(
            TGALayer(cfg.dim, cfg.heads, cfg.n_edge_types, cfg.ffn_mult, cfg.dropout, cfg.impl)
            for _ in range(cfg.layers))

    def encode(self, batch: Batch) -> torch.Tensor:
        h = self.embed(batch)  # [B, N, d]
        nbr, etype = batch.flat_graph  # [B*N, 3] each
        for layer in self.layers:
            h = layer(h, nbr, etype)
        return h

    @torch.no_grad()
    def refresh(self, cache: NodeCache | None, graph: EncodedSamples, total: int) -> NodeCache:
        """States of the graph's window after new events, computing only the new nodes.

        ``graph`` is the encoded window (one row, e.g. ``encode_graphs([g.to_arrays()], vocabs)``)
        and ``total`` the graph's event count (``UserGraph.total``). Nodes that left the window
        are dropped from the cache; nodes that arrived since ``cache.total`` are computed from
        the cached states of their predecessors. With no eviction the result equals a full
        recompute; after the window slides, cached nodes keep the states they had when their
        now-evicted predecessors were still there (a full recompute would drop those edges).
        """
        n = int(graph.lengths[0])
        new = total - (cache.total if cache is not None else total - n)
        if cache is None or new > n or new < 0:
            cache, new = self._empty_cache(), n
        evicted = len(cache) + new - n
        kv = [t[evicted:] for t in cache.kv]
        states = cache.states[evicted:]
        if new == 0:
            return NodeCache(total, kv, states)
        rows = to_batch(graph.take(slice(0, 1)), device=self.item_counts.device, width=n)
        sl = slice(n - new, n)
        h = self.embed.nodes(rows.items[0, sl], rows.cats[0, sl], rows.behaviors[0, sl], rows.gaps[0, sl])  # [M, d]
        nbr, etype = rows.nbr[0, sl, :3], rows.etype[0, sl, :3]  # [M, 3] local indices into the window
        for layer_no, layer in enumerate(self.layers):
            h, kv_new = layer.step(h, kv[layer_no], nbr, etype)
            kv[layer_no] = torch.cat([kv[layer_no], kv_new])
        return NodeCache(total, kv, torch.cat([states, h]))

    def _empty_cache(self) -> NodeCache:
        d = self.cfg.dim
        dev = self.item_counts.device
        return NodeCache(0, [torch.zeros(0, 2 * d, device=dev) for _ in self.layers], torch.zeros(0, d, device=dev))

    @torch.no_grad()
    def user_vector_from_cache(self, cache: NodeCache) -> torch.Tensor:
        """The user vector [d] from cached node states (same readout as :meth:`user_vectors`)."""
        n = len(cache)
        mask = torch.ones(1, n, dtype=torch.bool, device=cache.states.device)
        last = torch.tensor([max(n - 1, 0)], device=cache.states.device)
        return self._head().user_vector(cache.states.unsqueeze(0), mask, last)[0]
