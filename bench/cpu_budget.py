"""Where the machine's CPU goes while a command runs: CPU seconds of every tgastream process (and
the broker) it starts, and of each thread of the trainer, sampled from /proc (Linux).

    python -m tgastream.bench.cpu_budget [--json PATH] -- tgastream bench freshness --rate 1000 ...

Why: whether a trainer can keep pace on a machine is a budget. The stream's other parts (broker,
worker, API replica, replayer, the trainer's publishing thread) take their share of the cores
first; the training thread gets the rest. Prints a table, largest first, with each process's share
of one core over the time it was seen, and writes the same as JSON."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROLES = ("train", "worker", "serve", "bench", "replay", "produce")
"""tgastream subcommands named as roles (the first one in a process's command line wins)."""


@dataclass
class Seen:
    """One process (or thread) as last sampled: its role, CPU seconds, first and last time seen."""

    role: str
    cpu_s: float
    first: float
    last: float


def role_of(cmdline: str) -> str | None:
    """``broker`` for Tansu, the tgastream subcommand for ours, None for anything else."""
    if "tansu" in cmdline:
        return "broker"
    if "tgastream" not in cmdline:
        return None
    words = cmdline.split()
    return next((w for w in words if w in ROLES), "other")


def cpu_seconds(stat: str, tick: int) -> float:
    """utime + stime of a /proc/<pid>/stat line, in seconds (fields after the command's ')')."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return None


def sample(procs: dict[int, Seen], threads: dict[int, Seen], tick: int, skip: set[int]) -> None:
    """One pass over /proc: update every matching process, and the threads of the trainer."""
    now = time.monotonic()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        pid = int(name)
        cmd = _read(f"/proc/{pid}/cmdline")
        role = role_of(cmd.replace("\0", " ")) if cmd else None
        stat = _read(f"/proc/{pid}/stat") if role else None
        if stat is None or role is None:
            continue
        old = procs.get(pid)
        procs[pid] = Seen(role, cpu_seconds(stat, tick), old.first if old else now, now)
        if role != "train":
            continue
        for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
            tstat, comm = _read(f"/proc/{pid}/task/{tid}/stat"), _read(f"/proc/{pid}/task/{tid}/comm")
            if tstat is None:
                continue
            t_old = threads.get(int(tid))
            threads[int(tid)] = Seen(f"train/{(comm or '?').strip()}", cpu_seconds(tstat, tick),
                                     t_old.first if t_old else now, now)


def table(procs: dict[int, Seen], threads: dict[int, Seen], wall_s: float) -> str:
    """Largest first: CPU seconds and share of one core, by process, then the trainer's threads."""
    lines = [f"{'CPU s':>8} {'cores':>6}  process (seen for)"]
    for p in sorted(procs.values(), key=lambda s: -s.cpu_s):
        lines.append(f"{p.cpu_s:8.1f} {p.cpu_s / max(p.last - p.first, 1e-9):6.2f}  {p.role} ({p.last - p.first:.0f} s)")
    total = sum(p.cpu_s for p in procs.values())
    lines.append(f"{total:8.1f} {total / max(wall_s, 1e-9):6.2f}  all of them, over the command's {wall_s:.0f} s")
    for t in sorted(threads.values(), key=lambda s: -s.cpu_s)[:4]:
        lines.append(f"{t.cpu_s:8.1f} {t.cpu_s / max(t.last - t.first, 1e-9):6.2f}    thread {t.role}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tgastream.bench.cpu_budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the samples here")
    p.add_argument("--every", type=float, default=0.25, help="seconds between samples (default: 0.25)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    if not os.path.isdir("/proc/self/task"):
        p.error("needs Linux's /proc")
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, Seen] = {}
    threads: dict[int, Seen] = {}
    t0 = time.monotonic()
    child = subprocess.Popen(command)
    skip = {os.getpid()}
    while child.poll() is None:
        sample(procs, threads, tick, skip)
        time.sleep(args.every)
    wall = time.monotonic() - t0
    print("\n" + table(procs, threads, wall))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(command), "returncode": child.returncode, "wall_s": wall,
                                         "processes": [asdict(s) for s in procs.values()],
                                         "trainer_threads": [asdict(s) for s in threads.values()]}, indent=1) + "\n")
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
