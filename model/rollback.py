"""Roll an online learner back to a good checkpoint's weights without losing its id maps.

The learner keeps its *current* id maps (items and categories that arrived since the good
checkpoint keep their rows, so nothing published or mapped since becomes unknown): every layer
comes from the good model; each embedding-table row takes the good model's row of the same id,
and rows the good model does not have are re-initialised as a fresh row would be (not dropped).
The optimizer restarts (its moments were learned on the bad stretch) and the replay reservoir is
the good checkpoint's (the bad stretch is not replayed). The version counter, consumed offsets and
rolling metrics are left alone: a rollback never rewinds the stream, so nothing is trained twice.
"""

from __future__ import annotations

import dataclasses

import torch

from tgastream.model.inference import load_model
from tgastream.model.online import OnlineLearner
from tgastream.model.rows import INIT_STD, EmbeddingRows
from tgastream.model.tga import TGA
from tgastream.state.idmap import IdMap
from tgastream.state.samples import Sample


def _remap(good: torch.Tensor, fresh: torch.Tensor, cur: IdMap, old: IdMap) -> torch.Tensor:
    """``fresh`` [n_cur, ...] with row r of every id in ``cur`` set to ``good``'s row of that id
    where ``old`` (the good model's map) has one; row 0 (padding) from ``good``."""
    out = fresh.clone()
    out[0] = good[0]
    pairs = [(r, old.row_of(ext)) for ext, r in cur.items()]
    pairs = [(r, g) for r, g in pairs if g > 0 and g < good.shape[0]]
    if pairs:
        dst = torch.as_tensor([r for r, _ in pairs], device=out.device)
        src = torch.as_tensor([g for _, g in pairs], device=out.device)
        out[dst] = good[src]
    return out


def graft(good_state: dict, current: TGA, rows: EmbeddingRows, device: torch.device) -> TGA:
    """A model shaped like ``current`` (tables sized by ``rows``) holding the good checkpoint's
    weights, its table rows re-indexed from the good id maps to ``rows``."""
    good, good_rows = load_model(good_state, current.cfg, device)
    model = TGA(dataclasses.replace(current.cfg, n_items=rows.items.capacity,
                                    n_categories=rows.categories.capacity)).to(device)
    sd = good.state_dict()
    n_i, n_c = rows.items.capacity, rows.categories.capacity
    d = model.cfg.dim
    sd["embed.item.weight"] = _remap(sd["embed.item.weight"], torch.randn(n_i, d, device=device) * INIT_STD,
                                     rows.items, good_rows.items)
    sd["embed.category.weight"] = _remap(sd["embed.category.weight"], torch.randn(n_c, d, device=device) * INIT_STD,
                                         rows.categories, good_rows.categories)
    if "item_bias.weight" in sd:
        sd["item_bias.weight"] = _remap(sd["item_bias.weight"], torch.zeros(n_i, 1, device=device),
                                        rows.items, good_rows.items)
    sd["item_counts"] = _remap(sd["item_counts"], torch.zeros(n_i, device=device), rows.items, good_rows.items)
    sd["item_category"] = current.item_category.detach().clone()  # current item rows → current category rows
    model.load_state_dict(sd)
    return model


def rollback_learner(learner: OnlineLearner, good_state: dict) -> None:
    """Put the good checkpoint's weights (``good_state``: its learner state) into ``learner``
    on the learner's current id maps; fresh optimizer, the good checkpoint's replay reservoir."""
    learner.model = graft(good_state, learner.model, learner.rows, learner.device)
    learner.optimizer = torch.optim.Adam(learner.model.parameters(), lr=learner.cfg.lr)
    learner.reservoir.samples = [Sample.from_bytes(b) for b in good_state.get("reservoir", [])]
    learner.reservoir.seen = int(good_state.get("seen", len(learner.reservoir.samples)))
