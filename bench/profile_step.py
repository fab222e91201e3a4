"""Profile the trainer's per-step work with torch.profiler: publish vectors, prequential scoring,
learn, on ``bench trainer``'s stored stream, one process, one thread, the default model.

    python -m tgastream.bench.profile_step [STEPS] [--json PATH] [--demo-stream]

Prints the CPU time per step (process time: robust on a shared machine, where wall time is not)
and torch.profiler's table (top ops by total CPU time). It runs against whatever tgastream is
installed, so the same file measures an older checkout (``before``). ``--demo-stream``: the demo's
stream instead (its 500 users' 20,000 events: longer graphs), from a third of the way in: with one-pass scoring it
calls ``learn(score_limit=...)`` and publishes from an inference copy refreshed after each step
(stream/publisher.py), else ``vectors``, ``score``, ``learn`` as the trainer did then."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from tgastream.bench.trainer import stored_stream
    from tgastream.core.settings import Settings
    from tgastream.model.online import OnlineLearner
    from tgastream.state.samples import Sample
    from tgastream.stream.configs import online_config, online_model_config

    steps = int(argv[0]) if argv and not argv[0].startswith("-") else 20
    out = Path(argv[argv.index("--json") + 1]) if "--json" in argv else None
    torch.set_num_threads(1)
    st = Settings()
    bs = st.batch_size
    demo = "--demo-stream" in argv
    if demo:
        encoded = [s.to_bytes() for s in demo_stream(st.sample_len)]
        encoded = encoded[len(encoded) // 3:][:bs * (steps + 10)]
    else:
        encoded = [b for _p, b in stored_stream(bs * (steps + 10), 400, 4, st.sample_len, st.seed)]
    samples = [Sample.from_bytes(b) for b in encoded]  # decoded, as the trainer reads them
    learner = OnlineLearner(online_model_config(st), online_config(st, device="cpu", threads=1))
    one_pass = hasattr(learner, "scores_from_training")
    latest = None
    if one_pass:
        from tgastream.stream.publisher import LatestModel

        latest = LatestModel()
        latest.put(learner, learner.version)

    def step(batch: list) -> None:
        if one_pass:
            with record_function("publish (rows + vectors, inference copy)"):
                learner.assign_rows(batch)
                with latest.use() as twin:
                    learner.rows.grow_tables(twin.model, None, None)
                    out = twin.vectors(batch)
                if hasattr(learner, "note_predictions"):  # (the clicks' P(buy) from the publishing forward)
                    learner.note_predictions(out.clicks)
            with record_function("learn (scores from its forward)"):
                learner.learn(batch, score_limit=bs)
            with record_function("refresh the inference copy"):
                latest.put(learner, learner.version)
        else:
            with record_function("publish (vectors)"):
                learner.vectors(batch)
            with record_function("score (eval pass)"):
                learner.score(batch, score_limit=bs)
            with record_function("learn"):
                learner.learn(batch)

    for k in range(10):  # warm-up: tables grow, the reservoir fills
        step(samples[k * bs:(k + 1) * bs])
    t0, c0 = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(10, 10 + steps):
            step(samples[k * bs:(k + 1) * bs])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=44)
    result = {"stream": "demo" if demo else "stored", "one_pass": one_pass, "steps": steps, "batch_size": bs, "wall_ms_per_step": 1000 * wall / steps,
              "cpu_ms_per_step": 1000 * cpu / steps, "samples_per_cpu_s": steps * bs / cpu, "table": table}
    print(f"{'demo' if demo else 'stored'} stream: one_pass={one_pass} steps={steps} batch={bs}: CPU {result['cpu_ms_per_step']:.0f} ms/step "
          f"({result['samples_per_cpu_s']:,.0f} samples per CPU-second), wall {result['wall_ms_per_step']:.0f} ms/step")
    print(table)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def demo_stream(sample_len: int) -> list:
    """The samples of ``tgastream demo``'s default stream (its users, events and seed), in order."""
    from tgastream.bench.online import _synthetic
    from tgastream.state.samples import samples_from_events
    from tgastream.stream.demo import DemoConfig

    demo = DemoConfig(out=Path("."))
    events, _ = _synthetic(demo.users, demo.events, demo.seed, 0.0)  # (no drift, as the demo's log)
    return samples_from_events(events, sample_len=sample_len, final_watermark=events[-1].ts + 2 * 86400)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
