"""Roll an online learner back to a good checkpoint's weights without losing its id maps.

The learner keeps its *current* id maps (items and categories that arrived since the good
checkpoint keep their rows, so nothing published or mapped since becomes unknown): every layer
comes from the good model; each embedding-table row takes the good model's row of the same id,
and rows the good model does not have are re-initialised as a fresh row would be (not dropped).
The optimizer's moments are the good checkpoint's (re-indexed like the rows) and the replay
reservoir is the good checkpoint's (the bad stretch is not replayed). The version counter, consumed offsets and
rolling metrics are left alone: a rollback never rewinds the stream, so nothing is trained twice.
"""

from __future__ import annotations

import dataclasses

import torch

from tgastream.model.inference import load_model
from tgastream.model.online import OnlineLearner, online_adam
from tgastream.model.rows import INIT_STD, EmbeddingRows
from tgastream.model.tga import TGA
from tgastream.state.idmap import IdMap


def _remap(good: torch.Tensor, fresh: torch.Tensor, cur: IdMap, old: IdMap) -> torch.Tensor:
    """``fresh`` [n_cur, ...] with row r of every id in ``cur`` set to ``good``'s row of that id
    where ``old`` (the good model's map) has one; row 0 (padding) from ``good``."""
    out = fresh.clone()
    out[0] = good[0]
    entries = cur.items()
    if not entries:
        return out
    exts, rows = zip(*entries)
    dst = torch.as_tensor(rows, dtype=torch.long)  # [n] current rows
    src = torch.as_tensor(old.peek(exts), dtype=torch.long)  # [n] the good model's rows, 0 = none
    keep = (src > 0) & (src < good.shape[0])
    if bool(keep.any()):
        out[dst[keep].to(out.device)] = good[src[keep].to(good.device)]
    return out


def graft_model(good: TGA, good_rows: EmbeddingRows, current: TGA, rows: EmbeddingRows, device: torch.device,
                seed: int = 0) -> TGA:
    """A model shaped like ``current`` (tables sized by ``rows``) holding ``good``'s weights, its
    table rows re-indexed from ``good_rows`` to ``rows``; rows ``good`` lacks start as fresh rows
    do (seeded: the same graft twice gives the same model)."""
    model = TGA(dataclasses.replace(current.cfg, n_items=rows.items.capacity,
                                    n_categories=rows.categories.capacity)).to(device)
    sd = {k: v.detach().clone() for k, v in good.state_dict().items()}
    n_i, n_c = rows.items.capacity, rows.categories.capacity
    d = model.cfg.dim
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def fresh(n: int) -> torch.Tensor:
        return (torch.randn(n, d, generator=gen) * INIT_STD).to(device)

    sd["embed.item.weight"] = _remap(sd["embed.item.weight"], fresh(n_i), rows.items, good_rows.items)
    sd["embed.category.weight"] = _remap(sd["embed.category.weight"], fresh(n_c), rows.categories,
                                         good_rows.categories)
    if "item_bias.weight" in sd:
        sd["item_bias.weight"] = _remap(sd["item_bias.weight"], torch.zeros(n_i, 1, device=device),
                                        rows.items, good_rows.items)
    sd["item_counts"] = _remap(sd["item_counts"], torch.zeros(n_i, device=device), rows.items, good_rows.items)
    sd["item_category"] = current.item_category.detach().clone()  # current item rows → current category rows
    model.load_state_dict(sd)
    return model.eval()


def graft(good_state: dict, current: TGA, rows: EmbeddingRows, device: torch.device) -> TGA:
    """:func:`graft_model` from a checkpoint's learner state."""
    good, good_rows = load_model(good_state, current.cfg, device)
    return graft_model(good, good_rows, current, rows, device)


TABLES = {"embed.item.weight": "items", "item_bias.weight": "items", "embed.category.weight": "categories"}


def graft_optimizer(good_opt: dict, model: TGA, rows: EmbeddingRows, good_rows: EmbeddingRows) -> dict:
    """The good checkpoint's Adam state for ``model`` (the grafted one): the moments of table rows
    re-indexed like the rows (zero for rows the good model lacks), the rest as saved."""
    names = [n for n, _ in model.named_parameters()]
    state = {}
    for idx, st in good_opt["state"].items():
        name = names[int(idx)] if int(idx) < len(names) else None
        kind = TABLES.get(name or "")
        out = {}
        for key, value in st.items():
            if kind and torch.is_tensor(value) and value.dim() >= 1:
                cur, old = getattr(rows, kind), getattr(good_rows, kind)
                fresh = value.new_zeros((cur.capacity, *value.shape[1:]))
                value = _remap(value, fresh, cur, old)
            out[key] = value
        state[idx] = out
    return {"state": state, "param_groups": good_opt["param_groups"]}


def rollback_learner(learner: OnlineLearner, good_state: dict, reservoir: dict | None = None) -> None:
    """Put the good checkpoint's weights (``good_state``: its learner state) into ``learner``
    on the learner's current id maps, with the good checkpoint's optimizer moments (a fresh Adam
    would move every weight by a full learning rate at its first steps) and replay reservoir
    (``reservoir``: where it comes from instead, e.g. a trainer rank's own checkpoint part)."""
    good, good_rows = load_model(good_state, learner.model.cfg, learner.device)
    learner.model = graft_model(good, good_rows, learner.model, learner.rows, learner.device)
    learner.forget_snapshot()  # (the bad weights' copy must not judge the clicks after the rollback)
    learner.optimizer = online_adam(learner.model.parameters(), learner.cfg.lr)
    if good_state.get("optimizer"):
        learner.optimizer.load_state_dict(graft_optimizer(good_state["optimizer"], learner.model, learner.rows,
                                                          good_rows))
    source = good_state if reservoir is None else reservoir
    learner.reservoir.load(source.get("reservoir", []), source.get("seen"))
