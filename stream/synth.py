"""A seeded generator of realistic multi-behavior logs in Taobao UserBehavior CSV format.

The world it simulates, and why a transition-aware model can predict it:

- categories have Zipf popularity; each item belongs to one category and has Zipf popularity
  within it; each item has a few *related* items in its category (browsing chains);
- each user prefers a few categories; preferences drift (a favourite is swapped now and then), and
  with ``drift_at`` every user's favourites are redrawn at that point of the time span;
- users browse in sessions: a session picks a favourite category, then views items: a related item
  of the one just seen, a repeat of a recently viewed item, or a popular item of the category;
- the funnel: a view may be followed by fav or cart of that item; carted items are bought later
  (in the session or the next), rarely an item is bought straight after a view. Rates come out
  close to Taobao's (about 89% click, 6% cart, 3% fav, 2% buy). How likely a view converts
  depends on the user (a heavy-tailed buyer propensity, visible in their past carts and buys) and
  on the category, so conversion is predictable from the graph, not a coin flip.

So the next event is predictable from the graph (same item, same category, previous event), which
is what TGA's three edge kinds see, and far less so from global popularity.
The same arguments give the same file, byte for byte (Python's ``random.Random`` is stable).
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tgastream.core.events import TAOBAO_CODES

START_TS = 1511568000  # 2017-11-25 00:00:00 UTC, the first day of the Taobao log


@dataclass(frozen=True)
class SynthConfig:
    users: int = 2000
    events: int = 200_000
    seed: int = 7
    items: int = 0  # 0 = events // 10, at least 100
    categories: int = 0  # 0 = items // 40, at least 10
    days: float = 9.0
    drift_at: float = 0.0  # 0 = no abrupt drift; 0.5 = every user's favourites change halfway
    start_ts: int = START_TS

    def validate(self) -> "SynthConfig":
        if self.users < 1 or self.events < self.users:
            raise ValueError(f"need users >= 1 and events >= users, got users={self.users} events={self.events}")
        if not 0.0 <= self.drift_at < 1.0:
            raise ValueError(f"drift_at must be in [0, 1), got {self.drift_at}")
        if self.days <= 0:
            raise ValueError(f"days must be > 0, got {self.days}")
        return self

    @property
    def n_items(self) -> int:
        return self.items or max(100, self.events // 10)

    @property
    def n_categories(self) -> int:
        return self.categories or max(10, self.n_items // 40)


# funnel probabilities per view
P_CART, P_FAV, P_DIRECT_BUY = 0.068, 0.034, 0.003
P_BUY_CART = 0.30  # a carted item is bought later
BUYER_SIGMA = 0.8  # spread of users' propensity to cart and buy (lognormal, mean 1)
CATEGORY_SIGMA = 0.6  # spread of categories' conversion (lognormal, mean 1)
P_CHECKOUT = 0.15  # per view, while something carted awaits purchase
# next-view choice within a session
P_RELATED, P_REPEAT = 0.40, 0.22
P_END_SESSION = 0.08
P_SWAP_FAVOURITE = 0.05  # per session: gradual preference drift


class _World:
    """Catalogue: categories, items with popularity and related-item links."""

    def __init__(self, cfg: SynthConfig, rng: random.Random) -> None:
        n_items, n_cats = cfg.n_items, cfg.n_categories
        self.n_cats = n_cats
        self.cat_cum = list(itertools.accumulate(1.0 / (c + 1) ** 0.9 for c in range(n_cats)))
        # items are dealt to categories by category popularity, then ranked within the category
        item_cat = [bisect.bisect_left(self.cat_cum, rng.random() * self.cat_cum[-1]) for _ in range(n_items)]
        for c in range(n_cats):  # every category holds at least one item
            item_cat[c % n_items] = c
        self.items_of: list[list[int]] = [[] for _ in range(n_cats)]
        for item, c in enumerate(item_cat):
            self.items_of[c].append(item)
        for members in self.items_of:
            rng.shuffle(members)
        self.item_cum = [list(itertools.accumulate(1.0 / (r + 1) ** 1.1 for r in range(len(m)))) for m in self.items_of]
        self.item_cat = item_cat
        self.cat_conversion = [rng.lognormvariate(-0.5 * CATEGORY_SIGMA ** 2, CATEGORY_SIGMA) for _ in range(n_cats)]
        self.related: list[list[int]] = []
        for item in range(n_items):
            members = self.items_of[item_cat[item]]
            self.related.append([members[rng.randrange(len(members))] for _ in range(3)])

    def popular_item(self, rng: random.Random, cat: int) -> int:
        cum = self.item_cum[cat]
        return self.items_of[cat][bisect.bisect_left(cum, rng.random() * cum[-1])]

    def random_category(self, rng: random.Random) -> int:
        return bisect.bisect_left(self.cat_cum, rng.random() * self.cat_cum[-1])


def _favourites(world: _World, rng: random.Random) -> list[int]:
    return [world.random_category(rng) for _ in range(rng.randint(2, 4))]


def _user_events(world: _World, cfg: SynthConfig, rng: random.Random, n: int) -> list[tuple[int, int, int, int]]:
    """``n`` events (ts, item, category, behavior code) of one user, in time order."""
    span = cfg.days * 86400.0
    drift_ts = cfg.start_ts + cfg.drift_at * span if cfg.drift_at else None
    favs, favs_after = _favourites(world, rng), _favourites(world, rng)
    # how readily this user buys: heavy-tailed, mean 1 (some users buy a lot, most rarely)
    buyer = rng.lognormvariate(-0.5 * BUYER_SIGMA ** 2, BUYER_SIGMA)
    n_sessions = max(1, round(n / rng.uniform(6, 14)))
    starts = sorted(cfg.start_ts + rng.random() * span for _ in range(n_sessions))
    out: list[tuple[int, int, int, int]] = []
    recent: list[int] = []
    carted: list[int] = []
    s = 0
    while len(out) < n:
        t = starts[s % n_sessions] + (s // n_sessions) * 60.0  # wrap-around sessions stay ordered
        if out and t <= out[-1][0]:
            t = out[-1][0] + rng.expovariate(1 / 600.0)
        s += 1
        if rng.random() < P_SWAP_FAVOURITE:
            favs[rng.randrange(len(favs))] = world.random_category(rng)
        active = favs_after if drift_ts is not None and t >= drift_ts else favs
        cat = active[rng.randrange(len(active))]
        item = world.popular_item(rng, cat)
        while len(out) < n:
            out.append((int(t), item, world.item_cat[item], 0))
            recent.append(item)
            del recent[:-20]
            u = rng.random()
            p_cart = min(0.5, P_CART * buyer * world.cat_conversion[world.item_cat[item]])
            if u < p_cart:
                t += rng.expovariate(1 / 40.0)
                out.append((int(t), item, world.item_cat[item], 2))
                if rng.random() < min(0.9, P_BUY_CART * buyer):
                    carted.append(item)
            elif u < p_cart + P_FAV:
                t += rng.expovariate(1 / 40.0)
                out.append((int(t), item, world.item_cat[item], 1))
            elif u < p_cart + P_FAV + P_DIRECT_BUY * buyer:
                t += rng.expovariate(1 / 60.0)
                out.append((int(t), item, world.item_cat[item], 3))
            if carted and rng.random() < P_CHECKOUT:
                # check-out: revisit a carted item, then buy it
                bought = carted.pop(rng.randrange(len(carted)))
                t += rng.expovariate(1 / 60.0)
                out.append((int(t), bought, world.item_cat[bought], 0))
                t += rng.expovariate(1 / 30.0)
                out.append((int(t), bought, world.item_cat[bought], 3))
            if rng.random() < P_END_SESSION:
                break
            t += rng.expovariate(1 / 30.0)
            v = rng.random()
            if v < P_RELATED:
                item = world.related[item][rng.randrange(3)]
            elif v < P_RELATED + P_REPEAT and recent:
                item = recent[rng.randrange(len(recent))]
            else:
                item = world.popular_item(rng, cat)
    return out[:n]


def _events_per_user(cfg: SynthConfig, rng: random.Random) -> list[int]:
    """Split ``cfg.events`` over users by heavy-tailed activity; every user gets at least one."""
    weights = [rng.lognormvariate(0.0, 1.0) for _ in range(cfg.users)]
    total = sum(weights)
    extra = cfg.events - cfg.users
    counts = [1 + int(extra * w / total) for w in weights]
    by_activity = sorted(range(cfg.users), key=lambda u: -weights[u])
    for i in range(cfg.events - sum(counts)):  # rounding remainder, most active users first
        counts[by_activity[i % cfg.users]] += 1
    return counts


def generate(cfg: SynthConfig) -> list[tuple[int, int, int, int, int]]:
    """All events (ts, user, item, category, behavior code), sorted by time like a live stream."""
    cfg.validate()
    rng = random.Random(cfg.seed)
    world = _World(cfg, rng)
    rows: list[tuple[int, int, int, int, int]] = []
    for user, n in enumerate(_events_per_user(cfg, rng)):
        for seq, (ts, item, cat, beh) in enumerate(_user_events(world, cfg, rng, n)):
            rows.append((ts, user, seq, item, cat, beh))
    rows.sort()
    return [(ts, user, item, cat, beh) for ts, user, _seq, item, cat, beh in rows]


_CODES = [TAOBAO_CODES[b] for b in ("click", "fav", "cart", "buy")]


def write_csv(rows: list[tuple[int, int, int, int, int]], out: IO[str]) -> None:
    """Taobao UserBehavior CSV: user_id,item_id,category_id,behavior,timestamp (ids start at 1)."""
    out.writelines(f"{u + 1},{i + 1},{c + 1},{_CODES[b]},{ts}\n" for ts, u, i, c, b in rows)


def write_file(cfg: SynthConfig, path: Path) -> int:
    rows = generate(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="\n") as fh:
        write_csv(rows, fh)
    return len(rows)
