"""``tgastream bench freshness``: event-to-embedding freshness at a sustained replay rate.

Runs the demo's real processes (embedded broker unless --bootstrap, one stream worker, the
trainer, the API) and replays a log at ``--rate`` events/s; freshness is measured by the trainer
for every published user vector: publish time minus the wall-clock time the worker received the
newest event behind it.

``--compare-guard N``: N pairs of runs, the trainer's guard off and on (shadow evaluation,
registry, rollback checks: model/guardrails.py), in alternating order, and the ratio of the
freshness quantiles and trainer throughput, on vs off (the cost of the guard, measured side by
side on the same machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = "event-to-embedding freshness (p50/p99) at a sustained replay rate, worker + trainer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS, add_setting_flags

    p.add_argument("--rate", type=float, default=2000.0, help="replay rate, events/s (default: 2000)")
    p.add_argument("--data", type=Path, help="log to replay (default: a generated one)")
    p.add_argument("--events", type=int, default=60_000, help="generated events (default: 60000 = 30 s at 2000/s)")
    p.add_argument("--users", type=int, default=2000, help="generated users (default: 2000)")
    p.add_argument("--out", type=Path, default=Path("bench-freshness"), help="report folder (default: bench-freshness)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default: 900)")
    p.add_argument("--json", type=Path, help="write the result as JSON")
    p.add_argument("--trainer-ranks", type=int, default=1, metavar="N",
                   help="data-parallel trainer ranks (default: 1)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="N runs; the JSON has each and the medians (default: 1)")
    p.add_argument("--compare-guard", type=int, default=0, metavar="PAIRS",
                   help="run PAIRS pairs (guard off, guard on, alternating order) and report on/off ratios (default: 0 = one run)")
    add_setting_flags(p, "bootstrap", "partitions", "device", "batch_size", *KAFKA_SECURITY_SETTINGS)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.stream.broker import install_sigterm_handler
    from tgastream.core.errors import CommandError

    if args.rate <= 0:
        raise CommandError("--rate must be > 0")
    if args.data is not None and not args.data.is_file():
        raise CommandError(f"no such file: {args.data}")
    if args.compare_guard < 0:
        raise CommandError("--compare-guard must be >= 0")
    if args.trainer_ranks < 1 or args.repeat < 1:
        raise CommandError("--trainer-ranks and --repeat must be >= 1")
    install_sigterm_handler()
    if args.compare_guard:
        return _compare_guard(args, settings)
    if args.repeat > 1:
        return _repeat(args, settings)
    result = _one_run(args, settings, args.out)
    _print_table([("", result)])
    write_json(args.json, result)
    return 0


CAPACITY_KEYS = ("freshness_p50_s", "freshness_p99_s", "trainer_capacity_ratio", "trained_samples_per_busy_s",
                 "produced_samples_per_s_during_replay", "trained_lag_at_stream_end", "trained_share_at_stream_end")


def _repeat(args: argparse.Namespace, settings: Settings) -> int:
    """``--repeat N`` runs of the same command; each run and the medians."""
    import statistics

    runs = [_one_run(args, settings, args.out / f"run-{k + 1}") for k in range(args.repeat)]
    _print_table([(f"run {k + 1}", r) for k, r in enumerate(runs)])
    median = {key: statistics.median(r[key] for r in runs if r.get(key) is not None)
              for key in CAPACITY_KEYS if any(r.get(key) is not None for r in runs)}
    print(f"\nmedian of {args.repeat} runs: " + ", ".join(f"{k} {v:g}" for k, v in median.items()))
    write_json(args.json, {"repeat": args.repeat, "rate": args.rate, "trainer_ranks": args.trainer_ranks,
                           "runs": runs, "median": median, "load_average": list(__import__("os").getloadavg()),
                           "command": f"tgastream bench freshness --rate {args.rate:g} --events {args.events} "
                                      f"--users {args.users} --trainer-ranks {args.trainer_ranks} "
                                      f"--repeat {args.repeat}"})
    return 0


def _one_run(args: argparse.Namespace, settings: Settings, out: Path) -> dict:
    """The demo's processes at ``args.rate``; freshness, throughput and what was trained."""
    from tgastream.stream.demo import DemoConfig, run_demo

    opts = DemoConfig(out=out, data=args.data, events=args.events, users=args.users, rate=args.rate,
                      timeout_s=args.timeout, quiet=False, trainer_ranks=getattr(args, "trainer_ranks", 1))
    report = run_demo(settings, opts, say=lambda s: print(s, flush=True))
    return {
        "rate": args.rate, "events": report["events_replayed"],
        "achieved_events_per_s": report["events_per_s"],
        "freshness_p50_s": report["freshness_p50_s"], "freshness_p99_s": report["freshness_p99_s"],
        "trainer_samples_per_s": report["trainer_samples_per_s"], "samples": report["samples"],
        "trained_share": report["trained_share"], "train_policy": report["train_policy"],
        "device": report["device"], "data": str(args.data) if args.data else "synth", "guard": settings.guard,
        "trainer_ranks": report["trainer_ranks"], "publishing": report["publishing"],
        "version_lag_at_end": report["version_lag"],
        "published_version_lag_max": report["published_version_lag_max"],
        **{k: report.get(k) for k in ("trainer_capacity_ratio", "trained_samples_per_busy_s",
                                      "produced_samples_per_s_during_replay", "trained_share_at_stream_end",
                                      "trained_lag_at_stream_end", "trained_lag_at_stream_end_batches")},
    }


def _print_table(rows: list[tuple[str, dict]]) -> None:
    print(f"\n{'run':>10} {'rate':>8} {'events':>8} {'achieved/s':>11} {'fresh p50':>10} {'fresh p99':>10} "
          f"{'trainer samples/s':>18} {'trained':>8} {'capacity':>9} {'lag@end':>8}  device")
    for name, r in rows:
        share = r["trained_share"]
        print(f"{name:>10} {r['rate']:>8.0f} {r['events']:>8,} {r['achieved_events_per_s']:>11,.0f} "
              f"{(r['freshness_p50_s'] or float('nan')):>9.2f}s {(r['freshness_p99_s'] or float('nan')):>9.2f}s "
              f"{r['trainer_samples_per_s']:>18,.0f} {'–' if share is None else f'{share:.0%}':>8} "
              f"{_num(r.get('trainer_capacity_ratio'), '.2f'):>9} {_num(r.get('trained_lag_at_stream_end'), ',.0f'):>8}"
              f"  {r['device']}")


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _compare_guard(args: argparse.Namespace, settings: Settings) -> int:
    """Pairs of runs, guard off and on in alternating order; medians and on/off ratios."""
    import statistics

    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for k in range(args.compare_guard):
        order = ("off", "on") if k % 2 == 0 else ("on", "off")
        for name in order:
            print(f"\n== pair {k + 1}/{args.compare_guard}: guard {name}", flush=True)
            runs[name].append(_one_run(args, settings.replace(guard=name == "on"), args.out / f"pair-{k + 1}-guard-{name}"))
    _print_table([(f"guard {name}", r) for name in ("off", "on") for r in runs[name]])
    keys = ("freshness_p50_s", "freshness_p99_s", "trainer_samples_per_s")
    median = {name: {key: statistics.median(r[key] for r in rs if r[key] is not None) for key in keys}
              for name, rs in runs.items()}
    ratio = {key: median["on"][key] / median["off"][key] for key in keys if median["off"][key]}
    print(f"\nmedian of {args.compare_guard} runs each, guard on / off: "
          + ", ".join(f"{key} {median['on'][key]:.2f} / {median['off'][key]:.2f} = {ratio.get(key, float('nan')):.2f}x"
                      for key in keys))
    write_json(args.json, {"pairs": args.compare_guard, "runs": runs, "median": median, "ratio_on_over_off": ratio,
                           "command": f"tgastream bench freshness --rate {args.rate:g} --events {args.events} "
                                      f"--users {args.users} --compare-guard {args.compare_guard}"})
    return 0
