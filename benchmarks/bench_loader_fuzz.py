"""Benchmark: fuzzing the public persona loader (goal: no crash, every input < 1 s).

Run with ``python benchmarks/bench_loader_fuzz.py [--inputs N] [--quick]``. Draws N
generated documents (``tests/fuzz.py``: valid personas with odd values, YAML features a
persona has no use for, random text; default 10,000) and loads each: it must load, dump
and reload to the same document and save into a SQLite store, or raise
``PersonaValidationError``, within a second. Prints how many loaded, were refused,
crashed or round-tripped differently, the median and slowest load, and, as the baseline
measured in the same run, the median time of ``yaml.safe_load`` on the same texts (what
parsing alone costs on this machine). Exit status 1 if any input crashed, mismatched or
took a second or more. ``--quick`` draws 300 (the suite runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from persona_plugin import PersonaStore  # noqa: E402
from tests.fuzz import check_one, documents  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="300 inputs (a smoke run)")
    args = parser.parse_args(argv)
    n = 300 if args.quick else args.inputs

    texts: list[str] = []

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(documents())
    def draw(text: str) -> None:
        texts.append(text)

    draw()
    outcomes = {"loaded": 0, "refused": 0, "crashed": 0, "mismatch": 0}
    times: list[float] = []
    bad: list[str] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        PersonaStore(f"sqlite:///{Path(tmp) / 'fuzz.db'}") as store,
    ):
        for text in texts:
            outcome = check_one(text, store=store)
            outcomes[outcome.kind] += 1
            times.append(outcome.seconds)
            if outcome.kind in ("crashed", "mismatch") or outcome.seconds >= 1.0:
                bad.append(f"{outcome.kind} {outcome.seconds:.2f}s {outcome.detail}")
    baseline: list[float] = []
    for text in texts:
        started = time.monotonic()
        with contextlib.suppress(Exception):  # the baseline only times parsing
            yaml.safe_load(text)
        baseline.append(time.monotonic() - started)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"persona loader fuzz: {len(texts)} inputs ({platform.python_version()}, load {load:.1f})"
    )
    for kind, count in outcomes.items():
        print(f"  {kind:9s} {count}")
    median, slowest = statistics.median(times), max(times)
    base = statistics.median(baseline)
    print(f"  load median {median * 1e3:.2f} ms, slowest {slowest * 1e3:.1f} ms (goal < 1000 ms)")
    print(
        f"  yaml.safe_load median {base * 1e3:.2f} ms (ratio {median / base if base else 0:.1f}x)"
    )
    for line in bad[:20]:
        print("  BAD", line)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
