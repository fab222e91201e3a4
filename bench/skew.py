"""``tgastream bench skew``: is what the API serves one embedding space? Without and with the re-publish sweep.

A user's published vector keeps the model version of that user's last event, while item vectors
move on with every step, so a served dot product can mix model versions (issue #12, item 4). This
benchmark runs the demo's real processes (its own embedded broker per run, worker, trainer, API
replica) twice on the same log: ``republish_rate`` 0 ("before": no sweep) and the setting's rate
("after"). Each user's last event after a cut time is held out (never replayed): those events are
the targets. When the trainer has trained every sample (the demo's end condition, before anything
is stopped) it reads what the API serves: top-k recommendations of every target user through
``/v1/users/{id}/recommendations``, and the model version of every user and item vector from the
replica's materialized store. After the trainer's final checkpoint (same model version: nothing is
trained after that point) it recomputes the top-k with that newest model, users from their stored
context graph, items from their category, excluding the same bought items as the API. Reported
per run: HR@k of the served and of the recomputed top-k, their overlap@k, and the version skew
(oldest and median model version of served user and item vectors against the current one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tgastream.bench.report import write_json
from tgastream.core.events import Event
from tgastream.core.settings import Settings

HELP = "served vs recomputed HR@10 and model-version skew of served vectors, without and with the re-publish sweep"


@dataclass(frozen=True)
class Holdout:
    """A log split for the measurement: what is replayed, and each target user's held-out event."""

    replayed: list[Event]
    targets: dict[str, Event]  # user → their last event, when it is after the cut
    cut_ts: float


@dataclass
class Snapshot:
    """What the API served at the read point, and the model it should agree with."""

    current_version: int  # the trainer's model version when read
    served: dict[str, list[str]]  # target user → served top-k item ids (users the API knows)
    served_user_versions: dict[str, int]  # target user → model version of the vector that answered
    user_versions: list[int]  # every served user vector's model version
    item_versions: dict[str, int]  # every served item → its vector's model version
    contexts: dict[str, tuple[bytes, float]]  # target user → stored context graph (as published), its newest event ts
    bought: dict[str, set[str]]  # target user → items excluded from their recommendations
    republished: float  # vectors the sweep had re-published by then
    read_s: float  # demo time of the read (s after the replay started)
    after_last_step_s: float  # how long after the trainer's last optimizer step
    materialize_wait_s: float  # waited for the replica to hold everything on the topic


def hold_out_last(events: list[Event], cut_quantile: float) -> Holdout:
    """Hold out each user's last event (in time order) when it is after the ``cut_quantile`` of
    event times; everything else is replayed, in the same order as the log."""
    if not events:
        raise ValueError("the log has no valid events")
    cut = float(np.quantile([e.ts for e in events], cut_quantile))
    last: dict[str, int] = {}
    for i in sorted(range(len(events)), key=lambda j: events[j].ts):  # stable: equal ts keep file order
        last[events[i].user_id] = i
    held = {i for i in last.values() if events[i].ts > cut}
    users_before = {e.user_id for i, e in enumerate(events) if i not in held}
    held = {i for i in held if events[i].user_id in users_before}  # a target needs a user with history
    return Holdout(replayed=[e for i, e in enumerate(events) if i not in held],
                   targets={events[i].user_id: events[i] for i in held}, cut_ts=cut)


def write_jsonl(events: list[Event], path: Path) -> None:
    """The replayed log as JSON lines (the events' canonical encoding; float times kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for e in events:
            fh.write(e.to_json() + b"\n")


def item_categories(events: list[Event]) -> dict[str, str]:
    """Item → category id of its latest replayed event (what the trainer's category rows know)."""
    return {e.item_id: e.category_id for e in sorted(events, key=lambda e: e.ts)}


def _get_json(url: str, timeout_s: float = 10.0) -> dict | None:
    """GET ``url`` as JSON; None on 404 (a user without a vector)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _wait_materialized(bootstrap: str, topic: str, store, timeout_s: float = 60.0, security=None) -> float:
    """Wait until the replica's store holds the embeddings topic up to its end offsets as of now;
    the seconds waited. The condition read is the one needed: the store's recorded offsets."""
    from kafka import KafkaConsumer, TopicPartition

    from tgastream.core.kafka_security import PLAINTEXT, kafka_python_args

    consumer = KafkaConsumer(**kafka_python_args(bootstrap, security or PLAINTEXT, enable_auto_commit=False, group_id=None))
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()
    if not ends:
        raise RuntimeError(f"no partitions of {topic} found: cannot tell whether the replica holds it")
    start = time.monotonic()
    while True:
        store.catch_up()
        held = store.offsets()
        if all(held.get(p, 0) >= end for p, end in ends.items()):
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the API replica did not reach the topic's end offsets {ends} (holds {held})")
        time.sleep(0.1)


def _last_step_time(history: Path) -> float | None:
    lines = history.read_text().splitlines() if history.exists() else []
    return json.loads(lines[-1])["time"] if lines else None


def read_served(live, targets: dict[str, Event], k: int, secondary: Path) -> Snapshot:
    """Everything the API serves for the targets, read while every process still runs."""
    from tgastream.state.serving import ServingStore
    from tgastream.stream.promscrape import scrape, total

    settings = live.settings
    data_dir = Path(settings.data_dir)
    metrics = scrape(live.trainer_port)
    current = int(metrics.get("tgastream_model_version", 0))
    republished = total(metrics, "tgastream_embeddings_republished_total")
    store = ServingStore.reader(data_dir / "api" / "api-serving", secondary)
    try:
        waited = _wait_materialized(settings.bootstrap, settings.embeddings_topic, store, security=settings.kafka_security)
        read_at = time.time()
        served: dict[str, list[str]] = {}
        served_versions: dict[str, int] = {}
        base = f"http://127.0.0.1:{live.api_port}/v1/users"
        for uid in targets:
            body = _get_json(f"{base}/{urllib.request.quote(uid, safe='')}/recommendations?k={k}")
            if body is not None:
                served[uid] = [it["item_id"] for it in body["items"]]
                served_versions[uid] = int(body["model_version"])
        store.catch_up()
        user_versions = [rec.model_version for _, rec in store.records("user")]
        item_versions = {iid: rec.model_version for iid, rec in store.records("item")}
        contexts = {u: (c, rec.event_ts) for u in targets
                    if (c := store.context(u)) is not None and (rec := store.user(u)) is not None}
        bought = {u: store.bought(u) for u in targets}
    finally:
        store.close()
    last_step = _last_step_time(data_dir / "trainer" / "trainer-history.jsonl")
    return Snapshot(current_version=current, served=served, served_user_versions=served_versions,
                    user_versions=user_versions, item_versions=item_versions, contexts=contexts, bought=bought,
                    republished=republished, read_s=round(read_at - live.started, 1),
                    after_last_step_s=round(read_at - last_step, 1) if last_step else float("nan"),
                    materialize_wait_s=round(waited, 2))


def recompute_top_k(checkpoint_dir: Path, snap: Snapshot, categories: dict[str, str], k: int,
                    chunk: int = 256) -> tuple[int, dict[str, list[str]], int]:
    """Top-k of each target user with the newest checkpoint's model: the user vector from the
    stored context graph, item vectors of the served catalogue (items the model has a row for),
    the same bought items excluded. Returns (model version, user → item ids, catalogue size)."""
    import torch

    from tgastream.model.batching import collate
    from tgastream.model.inference import InferenceModel
    from tgastream.state.checkpoint import load_latest
    from tgastream.state.graph import UserGraph
    from tgastream.state.samples import RETRIEVAL, Sample
    from tgastream.stream.serve import top_k

    ck = load_latest(checkpoint_dir)
    if ck is None:
        raise RuntimeError(f"no checkpoint in {checkpoint_dir}")
    state = ck["learner"]
    inf = InferenceModel.from_state(state, torch.device("cpu"))
    model, rows = inf.model, inf.rows
    ids = [i for i in snap.item_versions if i in rows.items and i in categories]
    with torch.no_grad():
        item_rows = torch.as_tensor(rows.items.peek(ids))
        cats = torch.as_tensor(rows.categories.peek([categories[i] for i in ids]))
        matrix = model.item_vectors(item_rows, cats)[0].float().numpy() if ids else np.zeros((0, 0), np.float32)
        users = list(snap.contexts)
        vectors: dict[str, np.ndarray] = {}
        for lo in range(0, len(users), chunk):
            part = users[lo:lo + chunk]
            # the trainer's pseudo sample for a user vector (OnlineLearner.user_vectors_of): the graph alone
            pseudo = [Sample(RETRIEVAL, u, UserGraph.from_bytes(snap.contexts[u][0]), "", "", 0, 1.0, snap.contexts[u][1])
                      for u in part]
            vecs = model.user_vectors(collate(pseudo, rows.vocabs(), "cpu")).float().numpy()  # [U, d]
            vectors.update({u: vecs[j] for j, u in enumerate(part)})
    top = {u: [i for i, _ in top_k(v, ids, matrix, k, snap.bought.get(u, set()))] for u, v in vectors.items()}
    return int(state["version"]), top, len(ids)


def hit_rate(targets: dict[str, Event], lists: dict[str, list[str]]) -> float:
    """Share of targets whose held-out item is in the user's list (no list: a miss)."""
    return sum(1 for u, e in targets.items() if e.item_id in lists.get(u, ())) / len(targets)


def overlap(a: dict[str, list[str]], b: dict[str, list[str]], k: int) -> float | None:
    """Mean |A ∩ B| / k over the users with both lists."""
    both = [u for u in a if u in b]
    return sum(len(set(a[u]) & set(b[u])) for u in both) / (k * len(both)) if both else None


def skew(versions: list[int], current: int) -> dict:
    """Oldest and median model version of served vectors, and the share at ``current``."""
    if not versions:
        return {"n": 0, "oldest": None, "median": None, "lag_oldest": None, "lag_median": None, "current_share": None}
    oldest, median = min(versions), float(statistics.median(versions))
    return {"n": len(versions), "oldest": oldest, "median": median, "lag_oldest": current - oldest,
            "lag_median": current - median, "current_share": round(sum(v >= current for v in versions) / len(versions), 4)}


def measure(name: str, rate: int, settings: Settings, args: argparse.Namespace, holdout: Holdout, log: Path,
            categories: dict[str, str]) -> dict:
    """One demo run with ``republish_rate`` = ``rate``: read at the end condition, recompute, score."""
    from tgastream.stream.broker import EmbeddedBroker
    from tgastream.stream.demo import DemoConfig, run_demo

    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    snaps: list[Snapshot] = []
    with EmbeddedBroker(log_path=out / "broker.log") as broker:  # a broker per run: the runs share nothing
        run_settings = settings.replace(bootstrap=broker.bootstrap, republish_rate=rate)
        opts = DemoConfig(out=out, data=log, rate=args.rate, timeout_s=args.timeout, quiet=True)
        report = run_demo(run_settings, opts, say=lambda s: print(f"  [{name}] {s}", flush=True),
                          on_settled=lambda live: snaps.append(read_served(live, holdout.targets, args.k,
                                                                           out / "skew-reader")))
    if not snaps:
        raise RuntimeError(f"{name}: the demo timed out before the trainer had trained every sample")
    snap = snaps[0]
    version, recomputed, catalogue = recompute_top_k(out / "data" / "trainer" / "checkpoints", snap, categories, args.k)
    current = snap.current_version
    return {
        "republish_rate": rate,
        "read_at_s": snap.read_s, "read_after_last_step_s": snap.after_last_step_s,
        "materialize_wait_s": snap.materialize_wait_s, "republished_by_read": int(snap.republished),
        "model_version": current, "checkpoint_version": version,
        "users_served": len(snap.served), "catalogue": len(snap.item_versions), "catalogue_recomputed": catalogue,
        f"hr@{args.k}_served": round(hit_rate(holdout.targets, snap.served), 4),
        f"hr@{args.k}_recomputed": round(hit_rate(holdout.targets, recomputed), 4),
        f"overlap@{args.k}": None if (o := overlap(snap.served, recomputed, args.k)) is None else round(o, 4),
        "target_user_versions": skew(list(snap.served_user_versions.values()), current),
        "user_versions": skew(snap.user_versions, current),
        "item_versions": skew(list(snap.item_versions.values()), current),
        "trained_share": report["trained_share"], "freshness_p50_s": report["freshness_p50_s"],
        "freshness_p99_s": report["freshness_p99_s"], "samples": report["samples"], "train_steps": report["train_steps"],
        "demo_seconds": report["seconds"], "device": report["device"],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags

    p.add_argument("--data", type=Path, help="log to use (default: the demo's generated one)")
    p.add_argument("--events", type=int, default=20_000, help="generated events (default: 20000, as the demo)")
    p.add_argument("--users", type=int, default=500, help="generated users (default: 500, as the demo)")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated log (default: 7)")
    p.add_argument("--rate", type=float, default=1000.0, help="replay rate, events/s (default: 1000, as the demo)")
    p.add_argument("--cut", type=float, default=0.5,
                   help="hold out each user's last event when it is after this quantile of event times (default: 0.5)")
    p.add_argument("--k", type=int, default=10, help="list length for HR@k and overlap@k (default: 10)")
    p.add_argument("--out", type=Path, default=Path("bench-skew"), help="folder of the two runs (default: bench-skew)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up on a run after this many seconds (default: 900)")
    p.add_argument("--json", type=Path, help="write the result as JSON")
    p.add_argument("--png", type=Path, help="write the plot here (default: OUT/skew.png)")
    add_setting_flags(p, "partitions", "device", "dim", "layers", "heads", "batch_size", "sample_len", "republish_rate")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.core.errors import CommandError
    from tgastream.core.events import load_events
    from tgastream.stream.broker import install_sigterm_handler
    from tgastream.stream.synth import SynthConfig, write_file

    if args.data is not None and not args.data.is_file():
        raise CommandError(f"no such file: {args.data}")
    if not 0.0 < args.cut < 1.0 or args.k < 1 or args.rate <= 0:
        raise CommandError("need 0 < --cut < 1, --k >= 1 and --rate > 0")
    if settings.republish_rate <= 0:
        raise CommandError("--republish-rate is the 'after' run's rate: it must be > 0 (the 'before' run uses 0)")
    install_sigterm_handler()
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.data
    if source is None:
        source = args.out / "events.csv"
        write_file(SynthConfig(users=args.users, events=args.events, seed=args.seed), source)
    events = load_events(source)
    holdout = hold_out_last(events, args.cut)
    if not holdout.targets:
        raise CommandError("no user has a last event after the cut: lower --cut")
    log = args.out / "replayed.jsonl"
    write_jsonl(holdout.replayed, log)
    print(f"{len(events):,} events of {len({e.user_id for e in events}):,} users; held out {len(holdout.targets):,} "
          f"last events after t={holdout.cut_ts:.0f} (quantile {args.cut}); replaying {len(holdout.replayed):,}", flush=True)
    categories = item_categories(holdout.replayed)
    runs = {}
    for name, rate in (("before", 0), ("after", settings.republish_rate)):
        print(f"run {name}: republish_rate {rate}", flush=True)
        runs[name] = measure(name, rate, settings, args, holdout, log, categories)
    result = {"runs": runs, "targets": len(holdout.targets), "k": args.k, "cut_quantile": args.cut,
              "cut_ts": holdout.cut_ts, "events": len(events), "replayed": len(holdout.replayed),
              "data": str(args.data) if args.data else f"synth users={args.users} events={args.events} seed={args.seed}",
              "rate": args.rate,
              "read_point": "when the trainer has trained every sample (3 s settled), before any process stops; "
                            "recomputed with the final checkpoint written at stop"}
    print_table(result)
    plot(result, args.png or args.out / "skew.png")
    write_json(args.json, result)
    return 0


def _f(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def print_table(result: dict) -> None:
    k = result["k"]
    print(f"\n{result['targets']:,} targets (each user's last event after the cut), HR@{k} of the held-out item")
    print(f"{'run':<7} {'republish/s':>11} {'model':>6} {'user ver oldest/median':>23} {'item ver oldest/median':>23} "
          f"{'HR served':>10} {'HR recomputed':>14} {'overlap':>8} {'trained':>8} {'fresh p50/p99':>14} {'read after step':>16}")
    for name, r in result["runs"].items():
        u, i = r["user_versions"], r["item_versions"]
        print(f"{name:<7} {r['republish_rate']:>11} {r['model_version']:>6} "
              f"{_f(u['oldest'], 'd'):>11} / {_f(u['median'], '.0f'):<9} {_f(i['oldest'], 'd'):>11} / {_f(i['median'], '.0f'):<9} "
              f"{r[f'hr@{k}_served']:>10.3f} {r[f'hr@{k}_recomputed']:>14.3f} {_f(r[f'overlap@{k}']):>8} "
              f"{_f(r['trained_share'], '.2f'):>8} {_f(r['freshness_p50_s'], '.2f') + '/' + _f(r['freshness_p99_s'], '.2f') + ' s':>14} "
              f"{r['read_after_last_step_s']:>15.1f}s")


def plot(result: dict, path: Path) -> None:
    """Served vs recomputed HR@k, and how many model versions the served vectors are behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, runs = result["k"], result["runs"]
    names = list(runs)
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for dx, key, label in ((-0.2, "served", "served by the API"), (0.2, "recomputed", "recomputed, newest model")):
        a.bar_label(a.bar(x + dx, [runs[n][f"hr@{k}_{key}"] for n in names], 0.4, label=label), fmt="%.3f")
    a.set_ylim(0, 1.4 * max(max(r[f"hr@{k}_served"], r[f"hr@{k}_recomputed"]) for r in runs.values()) + 1e-3)
    a.set_xticks(x, [f"{n}\n(republish {runs[n]['republish_rate']}/s)" for n in names])
    a.set_ylabel(f"HR@{k} of held-out last events")
    a.set_title(f"HR@{k}, {result['targets']} targets")
    a.legend()
    bars = [("user oldest", "user_versions", "lag_oldest"), ("user median", "user_versions", "lag_median"),
            ("item oldest", "item_versions", "lag_oldest"), ("item median", "item_versions", "lag_median")]
    for j, (label, kind, key) in enumerate(bars):
        b.bar_label(b.bar(x + (j - 1.5) * 0.2, [runs[n][kind][key] or 0 for n in names], 0.2, label=label), fmt="%g")
    b.set_xticks(x, names)
    b.set_ylabel("model versions behind the current one")
    b.set_title("Version skew of served vectors")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Holdout", "Snapshot", "hold_out_last", "hit_rate", "overlap", "skew", "recompute_top_k", "read_served",
           "add_arguments", "run", "HELP"]
