"""What every sequence recommender here shares: input embedding, item tower, heads and the loss.

A subclass only says how node states are computed (:meth:`SequenceRecommender.encode`): TGA by
transition-aware graph attention, SASRec by causal self-attention, DIN not at all. Heads, loss,
negatives and scoring are identical, so a comparison measures the encoder (and, where switched
on, the pointer of the retrieval head).

The API the online trainer uses:

- ``loss(batch)``: one scalar for a micro-batch mixing retrieval and conversion samples;
- ``user_vectors(batch)`` [B, d] and ``item_vectors(rows, cats)`` ([M, d], bias [M]);
- ``conversion_proba(batch)`` [B]: probability that each row's candidate (target) is bought,
  ``candidate_conversion_proba(batch, rows, cats, keys)`` [B, K] for K candidates per graph;
- ``score_catalogue(batch, vectors, bias)`` [B, C]: full next-item scores incl. the pointer;
- TGA adds ``refresh(cache, graph, total)``: per-node state caching, one new event at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tgastream.model.batching import Batch
from tgastream.model.config import ModelConfig
from tgastream.model.conversion_head import ConversionHead, context_features, n_context_features, repeat_interest
from tgastream.model.distributed import GlobalView
from tgastream.model.embedding import NodeEmbedding
from tgastream.model.feedback import conversion_loss
from tgastream.model.retrieval_head import (RetrievalHead, prior_catalogue_logits, prior_logits, repeat_level,
                                            scatter_logsumexp)
from tgastream.state.samples import CONVERSION, RETRIEVAL


PRIOR_SCALE = 20.0
"""The transition prior's weight is learned as w / PRIOR_SCALE (its learning rate × PRIOR_SCALE)."""


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    retrieval: float  # mean retrieval loss of the batch (nan when it has no retrieval rows)
    conversion: float  # mean conversion BCE (nan when none)
    n_retrieval: int
    n_conversion: int
    states: torch.Tensor | None = None  # node states [B, N, d] of the forward (``loss(keep_states=True)``)


class SequenceRecommender(nn.Module):
    """Embedding + encoder (subclass) + retrieval and conversion heads."""

    name = "base"
    does_retrieval = True
    does_conversion = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = NodeEmbedding(cfg)
        self.item_bias = nn.Embedding(cfg.n_items, 1) if self.does_retrieval else None
        if self.item_bias is not None:
            nn.init.zeros_(self.item_bias.weight)
        self.retrieval_head = (RetrievalHead(cfg.dim, cfg.copy, cfg.recency_buckets, cfg.repeat_prior,
                                             repeat_level(cfg.temperature, cfg.max_positions), cfg.pointer_bound)
                               if self.does_retrieval else None)
        # DIN's own input for the conversion head (cfg.conversion_raw): a separate embedding, conversion-trained
        raw = cfg.conversion_raw and self.does_conversion and self.does_retrieval
        # DIN (conversion only) is the baseline and keeps its plain head whatever the config says
        n_feat = n_context_features(cfg.n_behaviors) if cfg.conversion_features and self.does_retrieval else 0
        self.conversion_head = (ConversionHead(cfg.dim, cfg.dropout, raw, n_feat,
                                               prior=cfg.conversion_prior and self.does_retrieval,
                                               base_rate=cfg.conversion_base_rate if self.does_retrieval else 0.0)
                                if self.does_conversion else None)
        self.conversion_embed = NodeEmbedding(cfg) if raw else None
        # weight of the transition prior's logit term (retrieval_head.py); only when configured.
        # Stored as w / PRIOR_SCALE: Adam moves a parameter by about lr a step whatever its
        # gradient, so a bare scalar would barely leave its initial value in a few hundred steps
        self.prior_param = (nn.Parameter(torch.full((), 1.0 / PRIOR_SCALE))
                            if cfg.transition_prior and self.does_retrieval else None)
        # what the stream has shown so far: target frequency (logQ of in-batch negatives) and each
        # item row's category (the item tower of uniformly sampled negatives)
        self.register_buffer("item_counts", torch.zeros(cfg.n_items))
        self.register_buffer("item_category", torch.zeros(cfg.n_items, dtype=torch.long))

    # -- encoder -------------------------------------------------------------------------------

    def encode(self, batch: Batch, x: torch.Tensor | None = None) -> torch.Tensor:
        """Node states [B, N, d] (padding rows are arbitrary and masked downstream); ``x`` are
        the node inputs when already looked up (see :meth:`NodeEmbedding.lookup`)."""
        return self.encode_nodes(batch, self.embed(batch) if x is None else x)

    def encode_nodes(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        """The encoder proper: node inputs [B, N, d] → node states [B, N, d]."""
        raise NotImplementedError

    # -- vectors and scores --------------------------------------------------------------------

    def user_vectors(self, batch: Batch, states: torch.Tensor | None = None) -> torch.Tensor:
        states = self.encode(batch) if states is None else states
        return self._head().user_vector(states, batch.mask, batch.last_index)  # [B, d]

    def item_vectors(self, rows: torch.Tensor, cats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate vectors [M, d] and biases [M] of item rows (with their category rows)."""
        vectors = self.embed.items(rows, cats)
        if self.item_bias is None:
            return vectors, vectors.new_zeros(vectors.shape[:-1])
        return vectors, self.item_bias(rows).squeeze(-1)

    def conversion_logits(self, batch: Batch, states: torch.Tensor | None = None,
                          cand: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] that each row's candidate (its target item) is bought."""
        if self.conversion_head is None:
            raise ValueError(f"{self.name} has no conversion head")
        states = self.encode(batch) if states is None else states
        cand = self.embed.items(batch.target_item, batch.target_cat) if cand is None else cand  # [B, d]
        same_item = batch.keys == batch.target_key.unsqueeze(1)  # [B, N]
        same_cat = (batch.cats == batch.target_cat.unsqueeze(1)) & (batch.target_cat.unsqueeze(1) > 0)
        raw_states = raw_cand = None
        if self.conversion_embed is not None:
            raw_states = self.conversion_embed(batch)  # [B, N, d]
            raw_cand = self.conversion_embed.items(batch.target_item, batch.target_cat)  # [B, d]
        features = (context_features(batch.behaviors, batch.mask, same_item, same_cat, self.cfg.n_behaviors)
                    if self.conversion_head.n_features else None)  # [B, F]
        interest = (repeat_interest(batch.behaviors, batch.mask, same_item).to(states.dtype)
                    if self.conversion_head.prior else None)  # [B]
        return self.conversion_head(states, batch.mask, batch.last_index, cand, same_item, same_cat, raw_states,
                                    raw_cand, features, interest)

    def conversion_proba(self, batch: Batch) -> torch.Tensor:
        """P(buy) of each row's candidate item [B]."""
        return torch.sigmoid(self.conversion_logits(batch))

    @torch.no_grad()
    def candidate_conversion_proba(self, batch: Batch, rows: torch.Tensor, cats: torch.Tensor,
                                   keys: torch.Tensor) -> torch.Tensor:
        """P(buy) of K candidates per graph [B, K] (rows/cats/keys [B, K]), encoding each graph once
        (serving: "score these items for this user")."""
        states = self.encode(batch)  # [B, N, d]
        k = rows.shape[1]
        rep = torch.arange(batch.size, device=rows.device).repeat_interleave(k)  # [B*K]
        sub = batch.select(rep)
        sub.target_item, sub.target_cat, sub.target_key = rows.reshape(-1), cats.reshape(-1), keys.reshape(-1)
        return torch.sigmoid(self.conversion_logits(sub, states[rep])).view(-1, k)

    def score_catalogue(self, batch: Batch, vectors: torch.Tensor, bias: torch.Tensor,
                        states: torch.Tensor | None = None) -> torch.Tensor:
        """Next-item logits over C candidates [B, C]; node keys must be candidate index + 1."""
        states = self.encode(batch) if states is None else states
        head = self._head()
        u = head.user_vector(states, batch.mask, batch.last_index)  # [B, d]
        z = self._catalogue_logits(u, vectors) + bias  # [B, C]
        if self._uses_prior(batch):
            z = z + self.prior_weight * prior_catalogue_logits(batch.prior_keys, batch.prior_vals, z.shape[1])
        if head.copy:
            c = head.node_logits(u, states, batch.mask, batch.lengths, batch.keys)  # [B, N]
            z = _add_pointer(z, c, batch.keys)
        return z

    def _catalogue_logits(self, u: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """u [B, d] · e [C, d] → [B, C] (cosine / temperature when configured)."""
        if self.cfg.temperature > 0:
            return F.normalize(u, dim=-1) @ F.normalize(vectors, dim=-1).T / self.cfg.temperature
        return u @ vectors.T

    @property
    def prior_weight(self) -> torch.Tensor | None:
        """w_π of the transition prior term (None when the model has none)."""
        return None if self.prior_param is None else PRIOR_SCALE * self.prior_param

    def _uses_prior(self, batch: Batch) -> bool:
        return self.prior_param is not None and batch.prior_keys is not None and batch.prior_vals is not None

    def _head(self) -> RetrievalHead:
        if self.retrieval_head is None:
            raise ValueError(f"{self.name} has no retrieval head")
        return self.retrieval_head

    # -- training ------------------------------------------------------------------------------

    def observe(self, view: GlobalView) -> None:
        """Record the union batch's retrieval targets (their frequency) and item → category rows
        (every graph node, then every target: a later one wins)."""
        with torch.no_grad():
            self.item_counts.index_add_(0, view.target_item, torch.ones_like(view.target_item, dtype=self.item_counts.dtype))
            self.item_category[view.nodes[0]] = view.nodes[1]
            self.item_category[view.targets[0]] = view.targets[1]
            self.item_category[0] = 0

    def loss(self, batch: Batch, view: GlobalView | None = None, feedback: str = "wait",
             keep_states: bool = False) -> LossOutput:
        """Retrieval (sampled softmax + pointer) and conversion (BCE) losses of a mixed batch.

        ``view`` (data-parallel ranks, model/distributed.py) is the union of every rank's batch:
        its retrieval targets are the in-batch negatives, its counts are observed and normalise
        the loss, its uniform negatives are shared; the value is then this rank's share of the
        union's loss, (1/R) Σ_{own retrieval rows} ℓ_ret + w (1/C) Σ_{own conversion rows} ℓ_bce.
        Without it the union is ``batch`` itself (one process). ``feedback`` ``fnw`` weighs ℓ_bce
        by the fake-negative importance weights (model/feedback.py). ``keep_states``: the forward's
        node states come back too (``LossOutput.states``), for scoring the batch from this very
        pass (model/online.py)."""
        ret = (batch.kind == RETRIEVAL) if self.does_retrieval else torch.zeros_like(batch.kind, dtype=torch.bool)
        conv = (batch.kind == CONVERSION) if self.does_conversion else torch.zeros_like(ret)
        n_ret, n_conv = int(ret.sum()), int(conv.sum())
        if view is None:
            n_uni = self.cfg.uniform_negatives if n_ret else 0
            uni = torch.randint(1, max(self.cfg.n_items, 2), (n_uni,), device=batch.items.device)  # [U]
            view = GlobalView(batch.target_item[ret], batch.target_cat[ret], batch.target_key[ret], 0, n_ret, n_conv,
                              uni, torch.stack([batch.items[batch.mask], batch.cats[batch.mask]]),
                              torch.stack([batch.target_item, batch.target_cat]))
        if self.training:
            self.observe(view)
        uni = view.uniform
        b, r_all = batch.size, view.n_retrieval
        # every item vector the step needs, one lookup: own targets [B], the union's retrieval
        # targets [R] (in-batch negatives), uniform negatives [U]
        rows = torch.cat([batch.target_item, view.target_item, uni])
        cats = torch.cat([batch.target_cat, view.target_cat, self.item_category[uni]])
        x, vecs = self.embed.lookup(batch, rows, cats)  # [B, N, d], [B + R + U, d]
        bias = self.item_bias(rows).squeeze(-1) if self.item_bias is not None else None  # [B + R + U]
        states = self.encode(batch, x)
        total = states.new_zeros(())
        r_loss = c_loss = float("nan")
        if n_ret:
            idx = ret.nonzero().squeeze(1)
            lr = self._retrieval_loss(_rows(batch, idx), states[idx], view, vecs[b:b + r_all], bias[b:b + r_all],
                                      vecs[b + r_all:], bias[b + r_all:])
            total = total + lr
            r_loss = float(lr.detach())
        if n_conv:
            idx = conv.nonzero().squeeze(1)
            # the balance of the two heads: a conversion-only model (DIN) has nothing to balance
            g, w = (self.cfg.conversion_grad, self.cfg.conversion_weight) if self.does_retrieval else (1.0, 1.0)
            logits = self.conversion_logits(_rows(batch, idx), scale_grad(states[idx], g), scale_grad(vecs[idx], g))
            lc = conversion_loss(logits, batch.label[idx], feedback) / view.n_conversion
            total = total + w * lc
            c_loss = float(lc.detach())
        return LossOutput(total, r_loss, c_loss, n_ret, n_conv, states if keep_states else None)

    def _retrieval_loss(self, sub: Batch, st: torch.Tensor, view: GlobalView, e_t: torch.Tensor, b_t: torch.Tensor,
                        e_u: torch.Tensor, b_u: torch.Tensor) -> torch.Tensor:
        """Sampled softmax over the union's in-batch targets and uniform rows (logQ-corrected) plus
        the row's own nodes (exact), summed over this batch's r retrieval rows (sub/st) and divided
        by the union's R; e_t/b_t are the vectors/biases of the union's R targets, e_u/b_u of the
        uniform rows."""
        head = self._head()
        u = head.user_vector(st, sub.mask, sub.last_index)  # [r, d]
        r = u.shape[0]
        big_r, uni = view.n_retrieval, view.uniform
        own = torch.arange(r, device=u.device)
        # logQ: expected number of times a column is drawn as a negative for one row
        freq = self.item_counts / self.item_counts.sum().clamp(min=1.0)
        log_q_in = torch.log(((big_r - 1) * freq[view.target_item]).clamp(min=1e-6))  # [R]
        log_q_uni = torch.log(torch.tensor(len(uni) / max(self.cfg.n_items - 1, 1), device=u.device))
        if not self.cfg.logq:
            log_q_in, log_q_uni = torch.zeros_like(log_q_in), torch.zeros_like(log_q_uni)
        s_in = self._catalogue_logits(u, e_t) + b_t  # [r, R]
        if self._uses_prior(sub):
            s_in = s_in + self.prior_weight * prior_logits(sub.prior_keys, sub.prior_vals, view.target_key)  # [r, R]
        pos = s_in[own, view.offset + own]  # [r]: each row's own target
        same = sub.target_key.unsqueeze(1) == view.target_key.unsqueeze(0)  # [r, R] accidental hits (incl. own)
        neg_in = (s_in - log_q_in).masked_fill(same, float("-inf"))  # [r, R]
        neg_uni = (self._catalogue_logits(u, e_u) + b_u - log_q_uni).masked_fill(
            uni.unsqueeze(0) == sub.target_item.unsqueeze(1), float("-inf"))  # [r, U]
        parts_den = [pos.unsqueeze(1), neg_in, neg_uni]
        parts_num = [pos.unsqueeze(1)]
        if head.copy:
            c = head.node_logits(u, st, sub.mask, sub.lengths, sub.keys)  # [r, N]
            match = (sub.keys == sub.target_key.unsqueeze(1)) & sub.mask
            parts_den.append(c)
            parts_num.append(c.masked_fill(~match, float("-inf")))
        den = torch.logsumexp(torch.cat(parts_den, 1), 1)
        num = torch.logsumexp(torch.cat(parts_num, 1), 1)
        return (den - num).sum() / big_r


def _add_pointer(z: torch.Tensor, c: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """z [B, C] with the pointer's mass added at the columns of each row's nodes:

        z'[b, k] = log(exp z[b, k] + Σ_{n : keys[b, n] = k + 1} exp c[b, n])

    (c [B, N] node logits, keys [B, N] column + 1; 0 = padding/none and keys above C, items
    without a column (model/vocab.py ``RowKeys``), add nothing). Only the ≤ N columns a row's
    nodes name change, so the log-sum-exp is taken there (B × N entries) instead of over the
    whole [B, C] catalogue (what ``logaddexp(z, scatter_logsumexp(...))`` computed: two
    transcendental passes over every catalogue column, most of the ranking's time)."""
    valid = (keys > 0) & (keys <= z.shape[1])  # [B, N]; a key above the catalogue has no column
    if not bool(valid.any()):
        return z
    cols = (keys - 1).clamp(min=0, max=z.shape[1] - 1)  # [B, N]
    c = c.masked_fill(~valid, float("-inf"))
    m = c.max(dim=1, keepdim=True).values.clamp(min=-1e30)  # [B, 1], finite
    w = torch.exp(c - m)  # [B, N], 0 off the nodes
    mass = torch.zeros_like(z).scatter_add(1, cols, w)  # [B, C]: Σ exp(c - m) per column
    rows, at = valid.nonzero(as_tuple=True)  # the node entries [V]
    col = cols[rows, at]  # [V]
    pointer = torch.log(mass[rows, col]) + m[rows, 0]  # [V]; a column named twice gets the same value twice
    out = z.clone()
    out[rows, col] = torch.logaddexp(z[rows, col], pointer)
    return out


def scale_grad(t: torch.Tensor, g: float) -> torch.Tensor:
    """``t`` in the forward pass, ``g`` × its gradient in the backward pass:

        y = g · t + (1 - g) · stopgrad(t),   ∂L/∂t = g · ∂L/∂y

    The conversion loss reaches the shared encoder and item tower through this with
    ``g = cfg.conversion_grad``: the two heads pull the shared states apart (a heavy conversion
    weight lifted conversion AUC and cost retrieval HR@10), so the conversion head can be trained
    hard on its own parameters while the encoder hears it only at scale ``g``."""
    if g == 1.0:
        return t
    if g == 0.0:
        return t.detach()
    return g * t + (1.0 - g) * t.detach()


def _rows(batch: Batch, idx: torch.Tensor) -> Batch:
    """The sub-batch of rows ``idx`` (same width); kept for callers, see :meth:`Batch.select`."""
    return batch.select(idx)
