"""``tgastream bench model``: TGA vs the SASRec baseline by sequence length, in one run.

Rows (each measured in a fresh child process, so peak memory is per row):

- train: samples/s of full training steps (loss of a batch mixing retrieval and conversion
  samples, backward, AdamW step), same batch, width, depth, heads, feed-forward and catalogue;
- inference: ms to compute one user's vector from a whole sequence (batch of 1);
- peak memory: growth of the peak resident set during the train steps (CPU), or peak CUDA
  memory allocated;
- refresh: ms to bring a user's vector up to date after one new event, TGA incremental
  (cached node states, :meth:`model.tga.TGA.refresh`) vs recomputing the whole window (TGA, SASRec),
  graph encoding included;
- steps: TGA at one length with each implementation of its attention (naive → reference →
  fused kernel), i.e. what each optimisation bought.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = "TGA vs SASRec: train samples/s, inference latency, peak memory by sequence length; refresh cost"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import int_list

    p.add_argument("--lengths", type=int_list, default=[50, 200, 1000, 5000],
                   help="sequence lengths (default: 50,200,1000,5000)")
    p.add_argument("--sasrec-max-length", type=int, default=5000,
                   help="skip SASRec above this length (default: 5000)")
    p.add_argument("--batch", type=int, default=16, help="sequences per training step (default: 16)")
    p.add_argument("--dim", type=int, default=None, help="width (default: settings dim)")
    p.add_argument("--layers", type=int, default=None, help="layers (default: settings layers)")
    p.add_argument("--heads", type=int, default=None, help="heads (default: settings heads)")
    p.add_argument("--ffn-mult", type=int, default=1, help="feed-forward width / dim, both models (default: 1)")
    p.add_argument("--items", type=int, default=20000, help="catalogue size / embedding rows (default: 20000)")
    p.add_argument("--min-steps", type=int, default=3, help="timed train steps per row, at least (default: 3)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds per row, at least (default: 3)")
    p.add_argument("--refresh-lengths", type=int_list, default=[200, 1000], help="refresh rows (default: 200,1000)")
    p.add_argument("--steps-length", type=int, default=1000,
                   help="length of the implementation-steps table; 0 = skip (default: 1000)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure every row this many times, interleaved, and report medians (default: 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of every measurement (default: 0 = torch's default)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: settings device)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")


# -- the measurements (child process) ---------------------------------------------------------------


def _synthetic_samples(n_seq: int, length: int, n_items: int, seed: int):
    """``n_seq`` samples whose graphs hold ``length`` events each: browsing with repeats and
    same-category runs (so all three edge kinds occur), half retrieval, half conversion."""
    import numpy as np

    from tgastream.state.graph import UserGraph
    from tgastream.state.samples import CONVERSION, RETRIEVAL, Sample

    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_seq):
        g = UserGraph(max(length, 1))
        pool = rng.integers(1, n_items, size=max(8, length // 4))
        items = pool[rng.integers(0, len(pool), size=length)]
        beh = rng.choice(4, size=length, p=[0.88, 0.03, 0.06, 0.03])
        ts = np.cumsum(rng.exponential(60.0, size=length))
        for i, b, t in zip(items, beh, ts):
            g.append(str(i), str(i % 500), int(b), float(t))
        kind = RETRIEVAL if s % 2 == 0 else CONVERSION
        target = str(int(rng.choice(pool)))
        out.append(Sample(kind, f"u{s}", g, target, str(int(target) % 500), 0, float(rng.random() < 0.1), float(ts[-1])))
    return out


def _vocabs(n_items: int):
    from tgastream.model.batching import Vocabs
    from tgastream.model.vocab import InMemoryVocab

    return Vocabs(InMemoryVocab(str(i) for i in range(1, n_items)), InMemoryVocab(str(c) for c in range(500)))


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(spec: dict):
    from tgastream.model.config import ModelConfig
    from tgastream.model.sasrec import SASRec
    from tgastream.model.tga import TGA

    cfg = ModelConfig(n_items=spec["items"], n_categories=501, dim=spec["dim"], layers=spec["layers"],
                      heads=spec["heads"], ffn_mult=spec["ffn_mult"], dropout=0.0, copy=True,
                      max_positions=max(spec["length"], 8), impl=spec.get("impl", "auto"))
    return (TGA if spec["model"] == "tga" else SASRec)(cfg)


def measure(spec: dict) -> dict:
    """One row: train samples/s, inference ms, peak memory (runs in a child process)."""
    import numpy as np
    import torch

    from tgastream.model.batching import encode_samples, to_batch
    from tgastream.model.device import resolve_device
    from tgastream.model.training import make_optimizer

    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    cuda = device.type == "cuda"
    vocabs = _vocabs(spec["items"])
    samples = _synthetic_samples(spec["batch"], spec["length"], spec["items"], seed=1)
    enc = encode_samples(samples, vocabs)
    model = _build(spec).to(device).train()
    opt = make_optimizer(model, 1e-3)
    batch = to_batch(enc, device=device)

    def step() -> None:
        out = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    step()  # warm-up (and the fused kernel's one-off build)
    sync()
    rss0 = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    steps, t0 = 0, time.perf_counter()
    while steps < spec["min_steps"] or time.perf_counter() - t0 < spec["min_seconds"]:
        step()
        sync()
        steps += 1
    train_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else max(_peak_rss_mb() - rss0, 0.0)
    model.eval()
    one = to_batch(enc, np.array([0]), device)
    times = []
    with torch.no_grad():
        model.user_vectors(one)
        t_end = time.perf_counter() + 1.0
        while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
            t1 = time.perf_counter()
            model.user_vectors(one)
            sync()
            times.append(time.perf_counter() - t1)
    return {"model": spec["label"], "seq_len": spec["length"],
            "train_samples_per_s": round(spec["batch"] * steps / train_s, 2),
            "infer_ms": round(1000 * float(np.median(times)), 3), "peak_mem_mb": round(peak, 1),
            "refresh_ms": None}


def measure_refresh(spec: dict) -> list[dict]:
    """ms per refresh after one new event at ``spec['length']``: TGA incremental vs full recompute."""
    import numpy as np
    import torch

    from tgastream.model.batching import encode_graphs, to_batch
    from tgastream.model.device import resolve_device
    from tgastream.state.graph import UserGraph

    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    length, n_items = spec["length"], spec["items"]
    vocabs = _vocabs(n_items)
    rng = np.random.default_rng(2)
    pool = rng.integers(1, n_items, size=max(8, length // 4))
    graph = UserGraph(length)

    def append() -> None:
        i = int(rng.choice(pool))
        graph.append(str(i), str(i % 500), int(rng.choice(4, p=[0.88, 0.03, 0.06, 0.03])), float(graph.total * 60))

    for _ in range(length):
        append()
    tga = _build({**spec, "model": "tga"}).to(device).eval()
    sas = _build({**spec, "model": "sasrec"}).to(device).eval()
    cache = tga.refresh(None, graph.to_arrays(), graph.total, vocabs)

    def timed(fn, n: int = 30) -> float:
        fn()
        times = []
        for _ in range(n):
            append()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return round(1000 * float(np.median(times)), 3)

    def incremental() -> None:
        nonlocal cache
        cache = tga.refresh(cache, graph.to_arrays(), graph.total, vocabs)
        tga.user_vector_from_cache(cache)

    def full(model):
        def go() -> None:
            with torch.no_grad():
                model.user_vectors(to_batch(encode_graphs([graph.to_arrays()], vocabs), device=device))
        return go

    rows = [("tga-incremental", timed(incremental)), ("tga-full-recompute", timed(full(tga))),
            ("sasrec-full-recompute", timed(full(sas)))]
    return [{"model": m, "seq_len": length, "train_samples_per_s": None, "infer_ms": None, "peak_mem_mb": None,
             "refresh_ms": ms} for m, ms in rows]


# -- the command (parent process) ---------------------------------------------------------------


def _child(spec: dict, timeout: float = 900.0) -> dict | list:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-m", "tgastream.bench.model", json.dumps(spec)], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[1])
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({spec.get('label')}, {spec.get('length')}): "
                           f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_tables(result: dict) -> str:
    rows = [r for r in result["rows"] if r["train_samples_per_s"] is not None]
    sas = {r["seq_len"]: r for r in rows if r["model"] == "sasrec"}
    lines = [f"device: {result['device']}; batch {result['config']['batch']}, dim {result['config']['dim']}, "
             f"{result['config']['layers']} layers, {result['config']['heads']} heads, ffn x{result['config']['ffn_mult']}",
             "",
             f"{'model':<8} {'len':>5} {'train samples/s':>16} {'vs SASRec':>10} {'infer ms':>9} {'vs SASRec':>10} {'peak MB':>8}"]
    for r in rows:
        ref = sas.get(r["seq_len"])
        speed = _ratio(r["train_samples_per_s"], ref["train_samples_per_s"]) if ref and r["model"] != "sasrec" else ""
        lat = _ratio(ref["infer_ms"], r["infer_ms"]) if ref and r["model"] != "sasrec" else ""
        lines.append(f"{r['model']:<8} {r['seq_len']:>5} {r['train_samples_per_s']:>16,.1f} {speed:>10} "
                     f"{r['infer_ms']:>9.2f} {lat:>10} {r['peak_mem_mb']:>8.0f}")
    refresh = [r for r in result["rows"] if r["refresh_ms"] is not None]
    if refresh:
        lines += ["", f"{'refresh after one event':<24} {'len':>5} {'ms':>9}"]
        for r in refresh:
            lines.append(f"{r['model']:<24} {r['seq_len']:>5} {r['refresh_ms']:>9.3f}")
    if result.get("steps"):
        base = result["steps"][0]["train_samples_per_s"]
        lines += ["", f"what each step bought (TGA, length {result['steps'][0]['seq_len']}):",
                  f"{'implementation':<44} {'train samples/s':>16} {'vs sasrec':>10} {'vs previous':>12}"]
        prev = None
        for s in result["steps"]:
            lines.append(f"{s['step']:<44} {s['train_samples_per_s']:>16,.1f} "
                         f"{_ratio(s['train_samples_per_s'], base) if s is not result['steps'][0] else '1.00x':>10} "
                         f"{_ratio(s['train_samples_per_s'], prev) if prev else '':>12}")
            prev = s["train_samples_per_s"]
    return "\n".join(lines)


STEPS = [("sasrec", "auto", "SASRec baseline (fused SDPA attention)"),
         ("tga", "naive", "TGA naive: 4 gathers, per-edge type vectors, einsum"),
         ("tga", "reference", "+ one k/v gather, q.R table, type scatter"),
         ("tga", "fused", "+ fused C kernel (one pass/node, fwd+bwd)")]
CPU_ONLY_IMPLS = frozenset({"fused"})  # the fused TGA kernel runs on CPU tensors only (model/tga_layer.py)


def step_jobs(base: dict, device_type: str) -> tuple[list[dict], list[str]]:
    """The implementation-steps rows this device can run, and the labels of those it cannot
    (the CPU-only fused kernel on CUDA): a GPU run reports the steps it has, not an error."""
    jobs, skipped = [], []
    for model, impl, label in STEPS:
        if device_type != "cpu" and impl in CPU_ONLY_IMPLS:
            skipped.append(label)
            continue
        jobs.append({**base, "model": model, "impl": impl, "label": label})
    return jobs, skipped


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from tgastream.core.errors import CommandError

    base = {"batch": args.batch, "dim": args.dim or settings.dim, "layers": args.layers or settings.layers,
            "heads": args.heads or settings.heads, "ffn_mult": args.ffn_mult, "items": args.items,
            "min_steps": args.min_steps, "min_seconds": args.min_seconds, "device": args.device or settings.device,
            "threads": args.threads}
    if base["dim"] % base["heads"]:
        raise CommandError(f"dim ({base['dim']}) must be divisible by heads ({base['heads']})")
    jobs: list[tuple[str, dict]] = []
    for length in args.lengths:
        jobs.append(("row", {**base, "model": "tga", "label": "tga", "length": length}))
        if length <= args.sasrec_max_length:
            jobs.append(("row", {**base, "model": "sasrec", "label": "sasrec", "length": length}))
    for length in args.refresh_lengths:
        jobs.append(("refresh", {**base, "length": length}))
    skipped: list[str] = []
    if args.steps_length:
        from tgastream.model.device import resolve_device

        steps, skipped = step_jobs(base, resolve_device(base["device"]).type)
        jobs.extend(("step", {**spec, "length": args.steps_length}) for spec in steps)
    t0 = time.perf_counter()
    result: dict = {"device": None, "rows": [], "steps": [], "steps_skipped": skipped,
                    "config": base | {"repeat": args.repeat}}
    runs: list[list] = [[] for _ in jobs]
    order = [j for _ in range(max(args.repeat, 1)) for j in range(len(jobs))]  # interleaved rounds
    bar = tqdm(order, desc="bench model", unit="row", disable=None)
    for j in bar:
        kind, spec = jobs[j]
        bar.set_postfix_str(f"{spec.get('label', kind)} @ {spec['length']}")
        try:
            runs[j].append(_child({**spec, "kind": "refresh" if kind == "refresh" else "row"}))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            raise CommandError(str(exc)) from None
    for (kind, spec), got in zip(jobs, runs):
        if kind == "refresh":
            result["rows"].extend(_median_rows(got))
        elif kind == "row":
            result["rows"].append(_median_rows([[r] for r in got])[0])
        else:
            row = _median_rows([[r] for r in got])[0]
            result["steps"].append({"step": spec["label"], "seq_len": spec["length"],
                                    "train_samples_per_s": row["train_samples_per_s"]})
    result["device"] = _device_line(base["device"], args.threads)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["ratios"] = _ratios(result["rows"])
    print(format_tables(result))
    if skipped:
        print(f"not run on {result['device']}: {'; '.join(skipped)} (CPU only)")
    print(f"total {result['seconds']:.0f}s")
    write_json(args.json, result)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _median_rows(runs: list[list[dict]]) -> list[dict]:
    """Rows of repeated runs (each run a list of rows in the same order) → per-field medians."""
    import statistics

    out = []
    for rows in zip(*runs):
        row = dict(rows[0])
        for key in ("train_samples_per_s", "infer_ms", "peak_mem_mb", "refresh_ms"):
            vals = [r[key] for r in rows if r[key] is not None]
            row[key] = round(statistics.median(vals), 3) if vals else None
        out.append(row)
    return out


def _ratios(rows: list[dict]) -> dict:
    """TGA / SASRec train samples/s and SASRec / TGA inference ms, by length."""
    by = {(r["model"], r["seq_len"]): r for r in rows if r["train_samples_per_s"] is not None}
    out: dict = {"train_speedup": {}, "infer_speedup": {}}
    for (model, length), r in by.items():
        s = by.get(("sasrec", length))
        if model == "tga" and s:
            out["train_speedup"][str(length)] = round(r["train_samples_per_s"] / s["train_samples_per_s"], 2)
            out["infer_speedup"][str(length)] = round(s["infer_ms"] / r["infer_ms"], 2)
    return out


def _device_line(setting: str, threads: int = 0) -> str:
    import torch

    from tgastream.model.device import describe, resolve_device

    if threads:
        torch.set_num_threads(threads)
    return describe(resolve_device(setting)) + f", torch {torch.__version__}"


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    if _spec.get("threads"):
        import torch

        torch.set_num_threads(_spec["threads"])
    _out = measure_refresh(_spec) if _spec.get("kind") == "refresh" else measure(_spec)
    print(json.dumps(_out))
