"""Benchmark: what the interaction log adds to a turn (goal: <= 1 ms at p50 on SQLite).

Run with ``python benchmarks/bench_interaction_log.py [--turns N] [--quick]
[--postgres URL]``. Two persona graphs on one SQLite store (a scripted chat model, no
memory, reflection off), one with the log and one without, take turns in alternation, so
load on the machine weighs on both alike; prints the median turn of each, their
difference and ratio, and the median of ``InteractionLog.record_turn`` alone. The log
keeps each turn as the guard lets memory keep it; with memory on (the default) memory
reads the turn first and the log's reading is a cache hit, so the guard reads each
message before it is timed (``--cold`` leaves that reading, ~3 ms for two new texts, in
the log's cost). With
``--postgres`` the same on PostgreSQL. ``--quick`` runs 40 turns (the suite runs it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from persona_plugin.graph import build_persona_graph  # noqa: E402
from persona_plugin.guard import instruction_reason  # noqa: E402
from persona_plugin.interactions import InteractionLog  # noqa: E402
from persona_plugin.store import PersonaStore  # noqa: E402
from tests.fakes import ScriptedChatModel  # noqa: E402


def measure(url: str, turns: int, *, cold: bool = False) -> dict[str, float]:
    store = PersonaStore(url)
    model = ScriptedChatModel(default="A reply of ordinary length for the benchmark.")
    logged = build_persona_graph(model, store=store, reflection="off")
    plain = build_persona_graph(model, store=store, reflection="off", interactions=None)
    times: dict[str, list[float]] = {"with log": [], "without": []}
    try:
        for n in range(turns + 5):
            if not cold:
                instruction_reason(f"Message number {n}")
                instruction_reason(model.default)
            pair = [("with log", logged), ("without", plain)]
            # which goes first alternates too: the second of a pair finds warmer caches
            for name, graph in pair if n % 2 else pair[::-1]:
                user = "bench-log" if name == "with log" else "bench-plain"
                config = {"configurable": {"user_id": user, "thread_id": f"{user}-{n}"}}
                started = time.perf_counter()
                graph.invoke({"messages": [("user", f"Message number {n}")]}, config)
                if n >= 5:  # the first turns create the personas
                    times[name].append(time.perf_counter() - started)
        log = InteractionLog.on(store)
        alone = []
        for n in range(turns):
            started = time.perf_counter()
            log.record_turn("bench-alone", f"t{n}", user_text="hi", reply_text="hello")
            alone.append(time.perf_counter() - started)
        for user in ("bench-log", "bench-plain", "bench-alone"):
            log.delete_user(user)
            if store.exists(user):
                store.delete(user)
    finally:
        store.close()
    with_log = statistics.median(times["with log"]) * 1000
    without = statistics.median(times["without"]) * 1000
    return {
        "turn with log (ms)": with_log,
        "turn without (ms)": without,
        "added (ms)": with_log - without,
        "ratio": with_log / without,
        "record_turn alone (ms)": statistics.median(alone) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="40 turns (a smoke run)")
    parser.add_argument("--postgres", help="a PostgreSQL URL to measure as well")
    parser.add_argument("--cold", action="store_true", help="the guard's reading counted")
    args = parser.parse_args(argv)
    turns = 40 if args.quick else args.turns
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{turns} turns each; {os.cpu_count()} cores, load {load:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        targets = [("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}")]
        if args.postgres:
            targets.append(("postgresql", args.postgres))
        for name, url in targets:
            print(f"{name}:")
            for key, value in measure(url, turns, cold=args.cold).items():
                print(f"  {key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
