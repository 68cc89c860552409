"""Benchmark: ingest throughput of ``LongTermMemory.remember`` (target: >= 200 turns/s).

Run with ``python benchmarks/bench_memory_ingest.py [--runs N] [--variant fast]``. Every
turn of ``../shared/data/locomo-dev/*.json`` (read with ``persona_plugin.lab.eval.locomo``) is
ingested into a fresh embedded memory, one ``remember`` call per conversation, ``--runs``
times; the median turns/s is reported. Timed in the same runs, on the same turns:

* baseline ``collection.add``: the stored texts (``speaker: text``) added to a plain
  Chroma collection (fresh, same embedding function, same batch size) in one call per
  conversation and 512-item chunks, as ``remember`` writes;
* embedding only (once, after the runs): the embedding function alone on the texts
  ``remember`` embeds (each turn with its time and the two turns before it) and on the
  plain stored texts.

The ratios say what ``remember`` costs beyond a bare Chroma insert on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import chromadb  # noqa: E402

from persona_plugin import LongTermMemory  # noqa: E402
from persona_plugin.embeddings import MiniLMEmbeddingFunction  # noqa: E402
from persona_plugin.lab.eval.locomo import Conversation, load_conversation  # noqa: E402

LOCOMO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "locomo-dev"
TARGET_TURNS_PER_S = 200.0
CHUNK = 512  # LongTermMemory's upsert batch


class Recorder:
    """Wraps an embedding function and keeps every text it is asked to embed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.texts: list[str] = []

    def __call__(self, input: list[str]) -> Any:
        self.texts.extend(input)
        return self.inner(input)


def ingest_memory(ef: Any, conversations: list[Conversation], record: bool = False):
    """Seconds to remember every conversation into a fresh store (and, if asked, the texts)."""
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        memory = LongTermMemory(Path(tmp) / "memory", embedding_function=ef, collection="bench")
        recorder = Recorder(ef) if record else None
        if recorder:
            for conv in conversations:  # Chroma needs the real function to create these
                memory.collection_for(conv.name)
            memory.embedding_function = recorder  # what _write embeds; negligible overhead
        start = time.perf_counter()
        for conv in conversations:
            memory.remember(conv.name, conv.turns)
        elapsed = time.perf_counter() - start
        stored = sum(memory.count(conv.name) for conv in conversations)
    return elapsed, stored, recorder.texts if recorder else []


def ingest_baseline(ef: Any, conversations: list[Conversation]) -> tuple[float, int]:
    """Seconds to add the same stored texts to a plain Chroma collection."""
    with tempfile.TemporaryDirectory(prefix="bench-plain-") as tmp:
        client = chromadb.PersistentClient(path=str(Path(tmp) / "plain"))
        collection = client.create_collection(
            "plain", embedding_function=ef, configuration={"hnsw": {"space": "cosine"}}
        )
        start = time.perf_counter()
        for conv in conversations:
            ids = [f"{conv.name}/{t.turn_id}" for t in conv.turns]
            docs = [f"{t.speaker}: {t.text}" for t in conv.turns]
            for at in range(0, len(ids), CHUNK):
                collection.add(ids=ids[at : at + CHUNK], documents=docs[at : at + CHUNK])
        elapsed = time.perf_counter() - start
        stored = collection.count()
    return elapsed, stored


def timed(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh-store runs (median)")
    parser.add_argument("--data", type=Path, default=LOCOMO, help="LoCoMo directory")
    parser.add_argument(
        "--variant", default=None, help="embedding variant (default: the package default)"
    )
    args = parser.parse_args()

    files = sorted(args.data.glob("*.json"))
    if not files:
        print(f"no LoCoMo files in {args.data}", file=sys.stderr)
        return 2
    conversations = [load_conversation(f) for f in files]
    turns = sum(len(c.turns) for c in conversations)
    plain_texts = [f"{t.speaker}: {t.text}" for c in conversations for t in c.turns]
    ef = MiniLMEmbeddingFunction(**({"variant": args.variant} if args.variant else {}))
    ef(["warm up the model", "and its session"])

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load:.2f}; embedding {ef.name()} {ef.get_config().get('variant', '')}"
    )
    names = ", ".join(f.name for f in files)
    print(f"{turns} turns from {len(files)} LoCoMo conversations ({names})", flush=True)

    memory_s, baseline_s = [], []
    embed_texts: list[str] = []
    for run in range(args.runs):
        seconds, stored, recorded = ingest_memory(ef, conversations, record=run == 0)
        assert stored == turns, (stored, turns)
        embed_texts = embed_texts or recorded
        memory_s.append(seconds)
        seconds, stored = ingest_baseline(ef, conversations)
        assert stored == turns, (stored, turns)
        baseline_s.append(seconds)
        print(
            f"run {run + 1}: remember {turns / memory_s[-1]:6.1f} turns/s, "
            f"collection.add {turns / baseline_s[-1]:6.1f} turns/s",
            flush=True,
        )
    embed_s = timed(ef, embed_texts)
    plain_embed_s = timed(ef, plain_texts)

    assert len(embed_texts) == turns, len(embed_texts)
    chars = statistics.mean(len(t) for t in embed_texts)
    plain_chars = statistics.mean(len(t) for t in plain_texts)
    rate = turns / statistics.median(memory_s)
    base = turns / statistics.median(baseline_s)
    embed = turns / embed_s
    plain_embed = turns / plain_embed_s
    print(f"\nmedian of {args.runs} runs, fresh stores:")
    print(f"  remember()                            {rate:7.1f} turns/s")
    print(f"  baseline collection.add (plain texts) {base:7.1f} turns/s")
    for label, value, width in (
        ("remember's texts", embed, chars),
        ("plain texts", plain_embed, plain_chars),
    ):
        print(f"  embedding only, {label:<21} {value:7.1f} turns/s ({width:.0f} chars, 1 run)")
    print(f"ratio remember / collection.add: {rate / base:.2f}x")
    print(f"share of remember() spent embedding: {min(1.0, rate / embed):.0%}")
    met = rate >= TARGET_TURNS_PER_S
    print(
        f"target >= {TARGET_TURNS_PER_S:.0f} turns/s: {'MET' if met else 'NOT MET'} "
        f"({rate:.1f} turns/s)"
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
