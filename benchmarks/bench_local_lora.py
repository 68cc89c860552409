"""Benchmark: mixed-adapter batches and the merge cache of the local backend.

Run with ``python benchmarks/bench_local_lora.py [--quick] [--runs N] [--device cpu]``
(a few minutes on two CPU cores; ``--quick`` in about one). The model is SmolLM2-135M-
Instruct from the model cache (converted first if the cache has none); the adapters are
built here: four random LoRA adapters (r=8 on q_proj/v_proj, seeded) saved to a temp
folder, so nothing depends on trained adapters.

* **mixed batch**: eight greedy requests (the base model, four distinct adapters, two of
  them twice, and one merged mixture of two), different prompts, served by one
  ``LocalBackend.generate_batch`` call (one ``model.generate`` with peft's per-row
  ``adapter_names``) against the baseline of serving them one at a time with
  ``generate`` (the adapter switched before each). Both produce the same texts (checked)
  and so the same tokens; the figure is completion tokens per second, median of
  ``--runs`` passes, the two taking turns so a noisy neighbour slows both alike.
  Target: the batch at least 3x the baseline.
* **merge cache**: entering ``LocalBackend.serving(mixture)`` for a mixture not merged
  yet (``add_weighted_adapter``, a new weight each time) against one already merged
  (an LRU lookup), median of ``--merges`` each.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from persona_plugin.backends import (  # noqa: E402
    GenerationRequest,
    LocalBackend,
)
from persona_plugin.backends.local_model import ensure_local_model  # noqa: E402

TARGET_RATIO = 3.0
ADAPTERS = ("formal", "pirate", "kb", "brief")
PROMPTS = (
    "What is the capital of France?",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Name three colours of the rainbow.",
    "How do I keep a plant alive?",
    "What does a librarian do?",
    "Suggest a name for a cat.",
    "What is two plus two?",
)


def build_adapters(model_path: Path, folder: Path) -> dict[str, Path]:
    """Random r=8 LoRA adapters on q_proj/v_proj; B small but non-zero, so each acts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = {}
    for i, name in enumerate(ADAPTERS):
        base = AutoModelForCausalLM.from_pretrained(model_path)
        torch.manual_seed(1000 + i)
        model = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        )
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.05)
        model.save_pretrained(folder / name)
        dirs[name] = folder / name
    return dirs


def batch_requests(max_new_tokens: int) -> list[GenerationRequest]:
    """Base, four adapters (two of them twice) and one mixture: six distinct servings."""
    adapters: list[list[tuple[str, float]]] = [
        [],
        [("formal", 1.0)],
        [("pirate", 1.0)],
        [("kb", 1.0)],
        [("brief", 1.0)],
        [("formal", 1.0)],
        [("pirate", 1.0)],
        [("formal", 0.6), ("kb", 0.4)],
    ]
    return [
        GenerationRequest(
            messages=({"role": "user", "content": prompt},),
            adapters=mix,
            max_new_tokens=max_new_tokens,
        )
        for prompt, mix in zip(PROMPTS, adapters, strict=True)
    ]


def bench_batch(backend: LocalBackend, requests: list[GenerationRequest], runs: int) -> bool:
    # warm-up, which also loads the adapters and makes the merge, and checks the texts
    alone = [backend.generate(r) for r in requests]
    batched = backend.generate_batch(requests)
    same = [a.texts for a in alone] == [b.texts for b in batched]
    tokens = sum(r.completion_tokens or 0 for r in alone)
    servings = {(r.served_by, r.adapters) for r in batched}
    print(
        f"mixed batch: {len(requests)} requests, {len(servings)} distinct servings "
        f"({', '.join(sorted({r.served_by for r in batched}))}), {tokens} completion tokens, "
        f"texts {'identical' if same else 'DIFFERENT'} to one at a time"
    )
    one_by_one: list[float] = []
    in_one_call: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        for request in requests:
            backend.generate(request)
        one_by_one.append(time.perf_counter() - started)
        started = time.perf_counter()
        backend.generate_batch(requests)
        in_one_call.append(time.perf_counter() - started)
    base_s, batch_s = statistics.median(one_by_one), statistics.median(in_one_call)
    print(f"  one at a time (baseline)  {base_s:7.3f} s  {tokens / base_s:8.1f} tokens/s")
    print(f"  one generate_batch call   {batch_s:7.3f} s  {tokens / batch_s:8.1f} tokens/s")
    ratio = base_s / batch_s
    met = ratio >= TARGET_RATIO and same
    print(f"  ratio batch / one at a time: {ratio:.2f}x")
    print(f"  target >= {TARGET_RATIO:.0f}x: {'MET' if met else 'NOT MET'} ({ratio:.2f}x)")
    return met


def bench_merge(backend: LocalBackend, merges: int) -> None:
    uncached: list[float] = []
    cached: list[float] = []
    for i in range(merges):
        weight = 0.3 + 0.4 * i / max(merges, 1)  # a mixture not merged before
        mixture = [("pirate", weight), ("brief", 1 - weight)]
        started = time.perf_counter()
        with backend.serving(mixture):
            pass
        uncached.append(time.perf_counter() - started)
        started = time.perf_counter()
        with backend.serving(mixture):
            pass
        cached.append(time.perf_counter() - started)
    new_ms, hit_ms = statistics.median(uncached) * 1e3, statistics.median(cached) * 1e3
    print(f"merge cache (median of {merges}, max_merged={backend.max_merged}):")
    print(f"  uncached (add_weighted_adapter)  {new_ms:8.2f} ms")
    print(f"  cached (LRU hit)                 {hit_ms:8.2f} ms")
    print(f"  ratio uncached / cached: {new_ms / hit_ms:.0f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and passes")
    parser.add_argument("--runs", type=int, help="timed passes (default 5, --quick 2)")
    parser.add_argument("--tokens", type=int, help="max new tokens (default 32, --quick 16)")
    parser.add_argument("--merges", type=int, help="merges timed (default 8, --quick 4)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--cache-dir", help="model cache (default $PERSONA_CACHE_DIR, ...)")
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    tokens = args.tokens or (16 if args.quick else 32)
    merges = args.merges or (4 if args.quick else 8)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}; "
        f"{tokens} new tokens max, median of {runs} runs"
    )
    model_path = ensure_local_model(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as folder:
        adapters = build_adapters(model_path, Path(folder))
        backend = LocalBackend(
            model_path, adapters=adapters, device=args.device, max_merged=merges + 2
        ).load()
        met = bench_batch(backend, batch_requests(tokens), runs)
        bench_merge(backend, merges)
    print(f"load after: {os.getloadavg()[0]:.1f}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
