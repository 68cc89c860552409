"""Benchmark: ``LongTermMemory.recall`` latency over 10k memories of one user.

Run with ``python benchmarks/bench_memory_recall.py [--memories N] [--queries N]``.
Targets: p50 <= 15 ms, p99 <= 50 ms. One user gets ``--memories`` synthetic turns
(templates filled from a seeded vocabulary: people, places, things, activities, dates),
ingested once into a fresh embedded store. Then ``--queries`` varied questions are each
asked twice, alternately:

* ``recall(user, query, k=5)``: the full hybrid path (query embedding, Chroma vector
  query, BM25, fusion, dedupe);
* baseline: the pure Chroma vector query of the same collection, the same user filter and
  the same depth (``collection.query(query_texts=...)`` on the user's own collection).

The first recall, which builds the user's BM25 index from Chroma, is timed and reported
separately. The turns are independent statements, so they are embedded without dialogue
context (``context_turns=0``).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from persona_plugin import LongTermMemory  # noqa: E402
from persona_plugin.embeddings import MiniLMEmbeddingFunction  # noqa: E402

TARGET_P50_MS = 15.0
TARGET_P99_MS = 50.0
USER = "bench-user"

PEOPLE = """Alice Bruno Chen Dalia Emeka Farah Gustav Hana Ivan Jun Kofi Lena Mateo Nadia Omar
Priya Quentin Rosa Sami Tove Uma Viktor Wen Ximena Yusuf Zara""".split()
PLACES = """Lisbon Kyoto Nairobi Oslo Lima Hanoi Tbilisi Quebec Tasmania Marrakesh Reykjavik
Seville Cusco Bergen Valparaiso Zanzibar Krakow Hobart Tromso Oaxaca""".split()
THINGS = """kayak violin telescope sourdough bonsai drone typewriter hammock espresso-machine
paddleboard easel mandolin tent rucksack sewing-machine skateboard microscope
harmonica canoe record-player snowboard loom kiln ukulele""".split()
ACTIVITIES = """hiking sailing pottery birdwatching climbing baking gardening fencing surfing
knitting rowing painting chess tango archery cycling yoga kayaking skiing
woodworking""".split()
ADJECTIVES = """old red tiny second-hand borrowed handmade vintage broken shiny heavy
expensive cheap green wooden folding""".split()
FEELINGS = """proud nervous excited exhausted relieved curious homesick grateful""".split()

TEMPLATES = [
    "{p} and I went {a} near {pl} last {when}.",
    "I bought a {adj} {t} in {pl} for {n} euros.",
    "{p} lent me their {adj} {t} for the weekend.",
    "My {t} broke again, so {p} helped me fix it on {when}.",
    "We celebrated {p}'s birthday in {pl} with {a} and cake.",
    "I felt {f} before my first {a} class with {p}.",
    "{p} says {pl} is the best place for {a} in {when}.",
    "I finally sold the {adj} {t} to {p} for {n} euros.",
    "Planning a trip to {pl} in {when} to try {a}.",
    "{p} gave me a {adj} {t} as a thank-you gift.",
    "I've been practising {a} every {when} since moving to {pl}.",
    "Lost my {t} somewhere in {pl}; {p} is helping me look.",
]
QUESTIONS = [
    "Where did I go {a} with {p}?",
    "What did I buy in {pl}?",
    "Who lent me a {t}?",
    "When is the trip to {pl}?",
    "How much did the {t} cost?",
    "What does {p} think about {a}?",
    "Did I ever try {a}?",
    "what happened to my {t}",
    "{p} {pl}",
    "Which gift did {p} give me?",
    "How did I feel about {a} lessons?",
    "Who helped me fix something?",
]
WHEN = """January February March April May June July August September October November
December Monday Tuesday Saturday Sunday spring summer autumn winter""".split()


def fill(template: str, rng: random.Random) -> str:
    return template.format(
        p=rng.choice(PEOPLE),
        pl=rng.choice(PLACES),
        t=rng.choice(THINGS).replace("-", " "),
        a=rng.choice(ACTIVITIES),
        adj=rng.choice(ADJECTIVES),
        f=rng.choice(FEELINGS),
        when=rng.choice(WHEN),
        n=rng.randrange(5, 900),
    )


def synthetic_turns(count: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    start = datetime(2022, 1, 1, tzinfo=UTC)
    return [
        {
            "turn_id": f"s{i // 20}:{i % 20}",
            "speaker": rng.choice(["User", "User", "Assistant"]),
            "text": fill(rng.choice(TEMPLATES), rng),
            "timestamp": start + timedelta(minutes=97 * i),
            "session": str(i // 20),
        }
        for i in range(count)
    ]


def percentile(times: list[float], q: int) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=10_000, help="memories of the user")
    parser.add_argument("--queries", type=int, default=200, help="timed recall() calls")
    parser.add_argument("--k", type=int, default=5, help="items per recall")
    parser.add_argument(
        "--variant", default=None, help="embedding variant (default: the package default)"
    )
    args = parser.parse_args()

    ef = MiniLMEmbeddingFunction(**({"variant": args.variant} if args.variant else {}))
    ef(["warm up the model", "and its session"])
    turns = synthetic_turns(args.memories)
    rng = random.Random(2)
    queries = [fill(rng.choice(QUESTIONS), rng) for _ in range(args.queries)]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load:.2f}; embedding {ef.name()} {ef.get_config().get('variant', '')}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-recall-") as tmp:
        memory = LongTermMemory(
            Path(tmp) / "memory", embedding_function=ef, collection="bench", context_turns=0
        )
        start = time.perf_counter()
        memory.remember(USER, turns)
        ingest_s = time.perf_counter() - start
        assert memory.count(USER) == len(turns)
        distinct = len({t["text"] for t in turns})
        print(
            f"ingested {len(turns)} memories ({distinct} distinct texts) for one user in "
            f"{ingest_s:.1f} s ({len(turns) / ingest_s:.0f} turns/s); "
            f"{len(queries)} queries, k={args.k}"
        )

        depth = max(2 * args.k, 10)  # recall's vector depth

        collection = memory.collection_for(USER)

        def vector_only(query: str) -> list[str]:
            hits = collection.query(
                query_texts=[query],
                n_results=depth,
                include=["documents", "metadatas", "distances"],
            )
            return hits["ids"][0]

        clock = time.perf_counter_ns
        start = clock()
        memory.recall(USER, "first question builds the lexical index", k=args.k)
        cold_ms = (clock() - start) / 1e6
        for query in queries[:10]:  # warm-up
            memory.recall(USER, query, k=args.k)
            vector_only(query)

        recall_ms, vector_ms, found = [], [], 0
        for query in queries:
            start = clock()
            items = memory.recall(USER, query, k=args.k)
            recall_ms.append((clock() - start) / 1e6)
            start = clock()
            vector_only(query)
            vector_ms.append((clock() - start) / 1e6)
            found += len(items) == args.k
        embed_ms = []
        for query in queries[:50]:
            start = clock()
            ef([query])
            embed_ms.append((clock() - start) / 1e6)

    assert found == len(queries), f"only {found} recalls returned {args.k} items"
    p50, p99 = statistics.median(recall_ms), percentile(recall_ms, 99)
    b50, b99 = statistics.median(vector_ms), percentile(vector_ms, 99)
    print(f"first recall (builds BM25 over {len(turns)} items): {cold_ms:.1f} ms")
    print(f"recall()                          p50 {p50:7.2f} ms  p99 {p99:7.2f} ms")
    print(f"baseline collection.query vector  p50 {b50:7.2f} ms  p99 {b99:7.2f} ms")
    print(f"query embedding alone             p50 {statistics.median(embed_ms):7.2f} ms")
    print(f"ratio recall / vector query: p50 {p50 / b50:.2f}x, p99 {p99 / b99:.2f}x")
    met50, met99 = p50 <= TARGET_P50_MS, p99 <= TARGET_P99_MS
    print(f"target p50 <= {TARGET_P50_MS:.0f} ms: {'MET' if met50 else 'NOT MET'} ({p50:.2f} ms)")
    print(f"target p99 <= {TARGET_P99_MS:.0f} ms: {'MET' if met99 else 'NOT MET'} ({p99:.2f} ms)")
    return 0 if met50 and met99 else 1


if __name__ == "__main__":
    raise SystemExit(main())
