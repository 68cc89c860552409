"""Benchmark: assembling a full persona into the prompt block (target: p50 < 2 ms).

Run with ``python benchmarks/bench_prompt_assembly.py [--iterations N]``. The persona is
``tests/data/alice.yaml`` grown to a "full" one: every section filled, a long memory
(FAQ, feedback, 20 recent turns), several patterns, extensions and tools, and some
retrieved context items. The token budget is large enough that nothing is dropped, so
every template renders; a second figure uses the default budget (1024), where sections
are dropped to fit.

Two baselines are timed in the same run, so the ratios say what templating, quoting and
budgeting cost on this machine rather than what the machine is worth:

* ``json.dumps(persona.to_dict())``: serialising the persona as one JSON document;
* a naive f-string rendering: every section's keys and values, unquoted, one per line.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from persona_plugin import (  # noqa: E402
    Persona,
    PromptAssembler,
    load,
)

ALICE = ROOT / "tests" / "data" / "alice.yaml"
TARGET_P50_MS = 2.0


def full_persona() -> Persona:
    """alice.yaml plus enough content to be a heavily used persona."""
    data = load(ALICE).to_dict()
    data["personality"]["interests"] += [f"interest {i}" for i in range(10)]
    data["memory"]["faq"] += [
        {"question": f"How do I change setting {i}?", "answer": f"Open Settings, then tab {i}."}
        for i in range(8)
    ]
    data["memory"]["feedback"] += [
        {"text": f"Feedback note {i}: keep answers short and cite sources.", "turn_id": f"f{i}"}
        for i in range(6)
    ]
    data["memory"]["short_term"] = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"Turn {i}: a message of ordinary length about weekend plans and trails.",
            "turn_id": f"t{100 + i}",
        }
        for i in range(20)
    ]
    data["memory"]["functions"] += ["book_table", "convert_units", "calendar_lookup"]
    data["pattern"]["items"] += [
        {"description": f"Recurring habit number {i}", "frequency": "weekly"} for i in range(8)
    ]
    data["preference"]["style"] += ["no emojis", "metric units"]
    data["demographics"]["timezone"] = "Europe/Lisbon"
    data["extensions"].update(
        {
            "health": {"diet": "vegetarian", "allergies": ["peanuts"], "steps_goal": 9000},
            "finance": {"currency": "EUR", "risk": "low", "accounts": ["checking", "savings"]},
            "travel": {"home_airport": "LIS", "seat": "aisle", "loyalty": {"TAP": "gold"}},
            "learning": ["Spanish B1", "music theory"],
        }
    )
    data["tools"].update(
        {
            f"tool_{i}": {"type": "function", "description": f"Does useful thing {i}"}
            for i in range(4)
        }
    )
    return Persona.from_dict(data, source="benchmark")


CONTEXT = {
    "knowledge_base": [
        "Refunds are processed within 5 business days.",
        {"title": "Export data", "score": 0.82, "text": "Settings > Privacy > Export."},
        "The Sintra-Cascais trail is 22 km long.",
    ]
}


def naive_render(persona: Persona) -> str:
    """The cheapest plausible rendering: f-strings, no templates, no quoting, no budget."""
    lines = ["<user_profile>"]
    for name, section in persona.model_dump(mode="json", exclude={"meta"}).items():
        if section:
            lines.append(f"## {name}")
            lines.extend(f"- {key}: {value}" for key, value in section.items() if value)
    lines.append("</user_profile>")
    return "\n".join(lines)


def measure(fn: Callable[[], Any], iterations: int) -> list[float]:
    """Per-call wall times in milliseconds (after a warm-up)."""
    for _ in range(min(200, iterations)):
        fn()
    times = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        fn()
        times.append((clock() - start) / 1e6)
    return times


def p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[98]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000, help="calls timed per case")
    args = parser.parse_args()

    persona = full_persona()
    roomy = PromptAssembler(token_budget=100_000)
    default = PromptAssembler()
    full = roomy.assemble(persona, context=CONTEXT)
    fitted = default.assemble(persona, context=CONTEXT)
    assert not full.dropped, full.dropped

    gc.collect()
    cases = {
        "assemble() full persona, nothing dropped": lambda: roomy.assemble(
            persona, context=CONTEXT
        ),
        "assemble() full persona, default budget 1024": lambda: default.assemble(
            persona, context=CONTEXT
        ),
        "baseline json.dumps(persona.to_dict())": lambda: json.dumps(
            persona.to_dict(), ensure_ascii=False
        ),
        "baseline naive f-string rendering": lambda: naive_render(persona),
    }
    results = {name: measure(fn, args.iterations) for name, fn in cases.items()}

    print(f"python {platform.python_version()} on {platform.machine()}, {args.iterations} calls")
    print(
        f"persona: {len(persona.to_json(indent=None))} bytes as JSON; block "
        f"{len(full.text)} chars, {full.tokens} est. tokens, {len(full.included)} sections"
    )
    print(f"default budget 1024: {fitted.tokens} est. tokens, dropped {', '.join(fitted.dropped)}")
    width = max(len(name) for name in results)
    for name, times in results.items():
        print(f"{name:<{width}}  p50 {statistics.median(times):7.3f} ms  p99 {p99(times):7.3f} ms")
    p50 = statistics.median(results["assemble() full persona, nothing dropped"])
    for baseline in ("baseline json.dumps(persona.to_dict())", "baseline naive f-string rendering"):
        ratio = p50 / statistics.median(results[baseline])
        print(f"ratio assemble p50 / {baseline.removeprefix('baseline ')} p50: {ratio:.1f}x")
    met = p50 < TARGET_P50_MS
    print(f"target p50 < {TARGET_P50_MS:.1f} ms: {'MET' if met else 'NOT MET'} ({p50:.3f} ms)")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
