"""Benchmark: what MBR's preference scoring costs beside generating the candidates.

Run with ``python benchmarks/bench_mbr.py [--n 8] [--max-new-tokens 32] [--runs 30]``
(about a minute on CPU). In one run:

* **generation**: the local backend (SmolLM2-135M-Instruct, transformers on CPU) samples
  ``n`` candidates for one prompt (``GenerationRequest(n=8)``, ``max_new_tokens``
  tokens at most); median of a few runs, each with new seeds.
* **scoring**: :meth:`MBRSelector.select` over those ``n`` candidates with the three
  bundled embedding-head models (brevity, formality, warmth): embedding the candidates
  and the prompt once with the local MiniLM (the embedding cache is cleared before every
  run, as each request brings new candidates), three heads, normalisation, the argmax.
  Also with the consensus term on. Median of ``--runs``; the target is <= 20 ms.

Printed: both medians and the scoring cost as a share of generation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from persona_plugin.backends import (  # noqa: E402
    GenerationRequest,
    LocalBackend,
)
from persona_plugin.embeddings import MiniLMEmbeddingFunction  # noqa: E402
from persona_plugin.preferences import (  # noqa: E402
    MBRSelector,
    PreferenceHub,
)
from persona_plugin.preferences.scorers import CandidateEmbeddings  # noqa: E402

PROMPT = "How can I keep my online accounts safe?"
TARGET_MS = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8, help="candidates per request")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--generation-runs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30, help="scoring runs")
    parser.add_argument(
        "--threads", type=int, default=None, help="embedder threads (default: onnxruntime's)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    os.environ.setdefault("PERSONA_CACHE_DIR", str(ROOT / ".cache" / "test"))

    backend = LocalBackend().load()
    messages = ({"role": "user", "content": PROMPT},)
    backend.generate(GenerationRequest(messages=messages, max_new_tokens=4))  # warm up
    gen_times, candidates = [], []
    for run in range(args.generation_runs):
        request = GenerationRequest(
            messages=messages,
            max_new_tokens=args.max_new_tokens,
            temperature=0.8,
            seed=1 + run * args.n,
            n=args.n,
        )
        started = time.perf_counter()
        result = backend.generate(request)
        gen_times.append(time.perf_counter() - started)
        candidates.append(list(result.texts))

    embeddings = CandidateEmbeddings(MiniLMEmbeddingFunction(threads=args.threads))
    hub = PreferenceHub(None, embedder=embeddings)
    hub.load()
    mixture = {"brevity": 0.6, "formality": -0.25, "warmth": 0.15}
    plain, consensus = MBRSelector(hub), MBRSelector(hub, consensus_weight=0.3)
    plain.select(PROMPT, candidates[0], mixture)  # load the embedder's session

    cpu_times: list[float] = []

    def timed(selector: MBRSelector, *, cold: bool = True) -> float:
        times = []
        cpu_times.clear()
        for run in range(args.runs):
            texts = candidates[run % len(candidates)]
            if cold:
                embeddings.clear()  # every request brings new candidates
            started, cpu_started = time.perf_counter(), time.process_time()
            selector.select(PROMPT, texts, mixture)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
        return statistics.median(times) * 1000

    def embed_only() -> float:
        times = []
        for run in range(args.runs):
            texts = [*candidates[run % len(candidates)], PROMPT]
            started = time.perf_counter()
            embeddings.embed_texts(texts)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    score_ms = timed(plain)
    # CPU time spent by this process: on a machine shared with other work it stays near
    # what an idle machine's wall time would be, for one embedder thread (--threads 1)
    score_cpu_ms = statistics.median(cpu_times) * 1000
    consensus_ms = timed(consensus)
    embed_ms = embed_only()
    heads_ms = timed(plain, cold=False)  # embeddings cached: the heads alone
    gen_ms = statistics.median(gen_times) * 1000
    words = statistics.mean(len(t.split()) for batch in candidates for t in batch)
    figures = {
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "mean_candidate_words": round(words, 1),
        "generation_ms_median": round(gen_ms, 1),
        "scoring_ms_median": round(score_ms, 2),
        "scoring_cpu_ms_median": round(score_cpu_ms, 2),
        "scoring_with_consensus_ms_median": round(consensus_ms, 2),
        "of_which_embedding_ms_median": round(embed_ms, 2),
        "of_which_heads_ms_median": round(heads_ms, 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "scoring_share_of_generation": round(score_ms / gen_ms, 4),
        "target_ms": TARGET_MS,
        "within_target": score_ms <= TARGET_MS,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"MBR over n={args.n} candidates ({figures['device']})")
    print(
        f"  generating {args.n} candidates, local SmolLM2-135M, <= {args.max_new_tokens} "
        f"tokens each (mean {words:.0f} words): median {gen_ms:8.1f} ms"
    )
    print(
        f"  scoring them with 3 embedding-head models:               median {score_ms:8.2f} ms"
        f"  (target <= {TARGET_MS:.0f} ms: {'met' if score_ms <= TARGET_MS else 'MISSED'})"
    )
    print(f"    its CPU time (this process, all threads): median {score_cpu_ms:.2f} ms")
    print(
        f"  ... with the consensus term:                             median {consensus_ms:8.2f} ms"
    )
    print(
        f"    of which embedding {args.n}+1 texts (MiniLM): {embed_ms:.2f} ms; the heads, "
        f"normalisation and argmax: {heads_ms:.3f} ms"
    )
    print(f"  scoring / generation: {score_ms / gen_ms:.2%}")
    print(f"  (1-minute load average during the run: {figures['load_average_1min']})")


if __name__ == "__main__":
    main()
