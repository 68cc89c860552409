"""Benchmark: what the backend layer adds over a raw HTTP call, and LoRA retrieval latency.

Run with ``python benchmarks/bench_backends.py [--requests N] [--json]`` (well under a
minute). A stand-in server on 127.0.0.1 answers TGI/LoRAX ``/generate`` and vLLM
``/v1/completions`` with canned bodies at once, so the figures are client-side cost only:

* **remote overhead**: p50 and p99 latency of ``TGIBackend`` (huggingface_hub's
  InferenceClient), ``LoRAXBackend`` and ``VLLMBackend`` ``generate()`` against a raw
  ``httpx.Client.post`` + ``json()`` of the same body to the same server, interleaved
  request by request so drift hits all alike; the overhead is the p50 difference.
* **retrieval**: ``LoraRetriever.retrieve`` over 24 adapter cards with the offline MiniLM
  embedder: uncached (a new persona version and a new input each time: two embeddings),
  new input only (one embedding), and cached (same persona version and input).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from persona_plugin import Persona  # noqa: E402
from persona_plugin.backends import (  # noqa: E402
    GenerationRequest,
    LoRAXBackend,
    RetryPolicy,
    TGIBackend,
    VLLMBackend,
)
from persona_plugin.lora import (  # noqa: E402
    LoraRetriever,
    parse_card,
)

REPLIES: dict[str, bytes] = {}


def canned_replies(tokens: int) -> None:
    """The stand-in's bodies: a TGI/LoRAX reply with ``tokens`` token details, and a vLLM one."""
    details = [{"id": 5 + i, "text": f" w{i}", "logprob": -0.2, "special": False}
               for i in range(tokens)]  # fmt: skip
    text = "".join(t["text"] for t in details)
    REPLIES["generate"] = json.dumps(
        {
            "generated_text": text,
            "details": {
                "finish_reason": "length",
                "prompt_tokens": 12,
                "generated_tokens": tokens,
                "prefill": [],
                "tokens": details,
                "seed": None,
            },
        }
    ).encode()
    REPLIES["completion"] = json.dumps(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "formal",
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": tokens,
                "total_tokens": 12 + tokens,
            },
        }
    ).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed ACK

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = REPLIES["completion" if self.path.startswith("/v1/") else "generate"]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {
        "p50_ms": percentile(ms, 0.5),
        "p99_ms": percentile(ms, 0.99),
        "mean_ms": statistics.fmean(ms),
    }


def bench_remote(requests: int, tokens: int) -> dict[str, Any]:
    canned_replies(tokens)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    retry = RetryPolicy(timeout=10.0)
    tgi = TGIBackend(url, adapters=["formal"], retry=retry)
    lorax = LoRAXBackend(url, retry=retry)
    vllm = VLLMBackend(url, model="base", adapters=["formal"], retry=retry)
    raw = httpx.Client(base_url=url, timeout=10.0)
    request = GenerationRequest(prompt="Write to the board.", adapters=[("formal", 1.0)],
                                max_new_tokens=tokens)  # fmt: skip
    lorax_mix = request.replace(adapters=[("formal", 0.7), ("kb", 0.3)])
    generate_body = {"inputs": request.prompt, "parameters": {"adapter_id": "formal",
                     "max_new_tokens": tokens, "details": True, "do_sample": False}}  # fmt: skip
    completion_body = {"model": "formal", "prompt": request.prompt, "max_tokens": tokens}
    cases: dict[str, Callable[[], Any]] = {
        "raw httpx /generate": lambda: raw.post("/generate", json=generate_body).json(),
        "TGIBackend.generate": lambda: tgi.generate(request),
        "LoRAXBackend.generate (merged)": lambda: lorax.generate(lorax_mix),
        "raw httpx /v1/completions": lambda: raw.post(
            "/v1/completions", json=completion_body
        ).json(),
        "VLLMBackend.generate": lambda: vllm.generate(request),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(requests + 20):
        for name, call in cases.items():
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            if i >= 20:  # warm-up: connections, imports, caches
                samples[name].append(elapsed)
    server.shutdown()
    results = {name: summary(values) for name, values in samples.items()}
    base_generate = results["raw httpx /generate"]["p50_ms"]
    base_completion = results["raw httpx /v1/completions"]["p50_ms"]
    for name, result in results.items():
        base = base_completion if "VLLM" in name else base_generate
        if not name.startswith("raw"):
            result["overhead_p50_ms"] = result["p50_ms"] - base
    return results


def bench_retrieval(iterations: int) -> dict[str, Any]:
    styles = ["formal", "concise", "playful", "casual", "detailed", "terse", "warm", "dry"]
    topics = ["cooking", "hiking", "finance", "python", "travel", "music", "health", "law"]
    base = {"base_model": "m", "rank": 16, "target_modules": ["q_proj"], "location": "o/x"}
    cards = (
        [
            parse_card(
                {
                    "id": f"style-{s}",
                    "kind": "style",
                    "description": f"Answers in a {s} tone.",
                    "sample_inputs": [f"Say it in a {s} way."],
                    **base,
                }
            )
            for s in styles
        ]
        + [
            parse_card(
                {
                    "id": f"kb-{t}",
                    "kind": "knowledge",
                    "description": f"Knows {t} well.",
                    "tags": [t],
                    "sample_inputs": [f"A question about {t}?"],
                    **base,
                }
            )
            for t in topics
        ]
        + [
            parse_card(
                {
                    "id": f"trait-{i}",
                    "kind": "personality",
                    "description": f"Personality trait number {i}: curious and methodical.",
                    **base,
                }
            )
            for i in range(8)
        ]
    )
    retriever = LoraRetriever(cards, top_k=3)
    persona = Persona.new("alice")
    persona.preference.style = ["formal", "concise"]
    persona.personality.interests = ["hiking", "jazz"]
    started = time.perf_counter()
    retriever.retrieve(persona.with_meta(version=1, user_id="alice"), "warm-up")  # model + cards
    first_call = time.perf_counter() - started
    uncached, new_input, cached = [], [], []
    for i in range(iterations):
        versioned = persona.with_meta(version=10 + i, user_id="alice")
        start = time.perf_counter()
        retriever.retrieve(versioned, f"Which trail should I hike on day {i}?")
        uncached.append(time.perf_counter() - start)
        start = time.perf_counter()
        retriever.retrieve(versioned, f"And what should I cook after hike {i}?")
        new_input.append(time.perf_counter() - start)
        start = time.perf_counter()
        mixture = retriever.retrieve(versioned, f"Which trail should I hike on day {i}?")
        cached.append(time.perf_counter() - start)
        assert mixture.cached
    return {
        "cards": len(cards),
        "first_call_ms": first_call * 1000,
        "uncached (new persona version + new input)": summary(uncached),
        "new input, same persona version": summary(new_input),
        "cached (same persona version and input)": summary(cached),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--retrievals", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=16, help="tokens in each canned reply")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    started = time.perf_counter()
    remote = bench_remote(args.requests, args.tokens)
    retrieval = bench_retrieval(args.retrievals)
    result = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "requests_per_case": args.requests,
        "tokens_per_reply": args.tokens,
        "remote": remote,
        "retrieval": retrieval,
        "wall_s": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"remote backends vs raw httpx, {args.requests} requests each, {args.tokens}-token "
        f"replies ({result['machine']})"
    )
    print(f"{'case':34} {'p50 ms':>8} {'p99 ms':>8} {'overhead p50':>13}")
    for name, r in remote.items():
        overhead = f"{r['overhead_p50_ms']:+.3f} ms" if "overhead_p50_ms" in r else ""
        print(f"{name:34} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {overhead:>13}")
    print(f"\nLoRA retrieval over {retrieval['cards']} cards, {args.retrievals} iterations")
    for name, r in retrieval.items():
        if isinstance(r, dict):
            print(f"{name:46} p50 {r['p50_ms']:8.3f} ms   p99 {r['p99_ms']:8.3f} ms")
    first = retrieval["first_call_ms"]
    print(f"first call (model load + card embeddings): {first:.0f} ms")
    print(f"\nwall time {result['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
