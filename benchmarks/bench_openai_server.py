"""Benchmark: what the OpenAI-compatible persona server adds to a chat request.

Run with ``python benchmarks/bench_openai_server.py [--requests 200] [--concurrency 8]``.

Two servers run in subprocesses on loopback, each under uvicorn:

* the **persona server** as ``persona serve`` runs it (``create_app_from_settings``) in a
  fresh ``PERSONA_HOME``: SQLite store, embedded Chroma memory with MiniLM, the echo
  model upstream; and the same without long-term memory, which shows what memory
  (embedding the query and the turn, Chroma) costs of the total (``--no-memory`` runs
  only this one);
* the **baseline**: a bare FastAPI endpoint at the same path that parses the same JSON
  and returns an OpenAI-shaped echo reply, with nothing else.

This process sends the same requests to each with httpx (after a warm-up that is not
counted: it creates the personas and loads the embedding model), ``--concurrency`` at a
time, and prints throughput and p50/p99 latency of both, and the overhead of the persona
server: the p50/p99 difference and ratio. The upstream model is the offline echo model,
so the overhead is the persona work itself (auth, validation, persona load, memory recall
and write, prompt assembly, store), not a language model's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token-0123456789"
USERS = [f"bench-{i}" for i in range(8)]
START_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 100.0


# -- the servers (run in subprocesses) ----------------------------------------------------


def baseline_app() -> Any:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        said = body["messages"][-1]["content"]
        text = f'You said: "{said[:200]}". (echo model; 0 facts about you in my prompt)'
        return {
            "id": "chatcmpl-baseline",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


def persona_app(memory: bool) -> Any:
    from persona_plugin import PersonaStore, Settings, create_app
    from persona_plugin.server import create_app_from_settings

    if memory:
        return create_app_from_settings()
    settings = Settings.load()
    # as create_app_from_settings does for the echo model: it cannot reflect
    return create_app(
        store=PersonaStore.from_settings(settings), settings=settings, reflection="off"
    )


def serve(kind: str, port: int, memory: bool) -> None:
    import uvicorn

    app = baseline_app() if kind == "baseline" else persona_app(memory)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- the client ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(kind: str, home: Path, memory: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env["PERSONA_HOME"] = str(home)
    env["PERSONA_SERVER_TOKENS"] = json.dumps({TOKEN: {"users": USERS}})
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    if not memory:
        command.append("--no-memory")
    proc = subprocess.Popen(command, env=env, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(client: Any, url: str, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with status {proc.returncode}")
        try:
            if (await client.get(f"{url}/health", timeout=2)).is_success:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"the server at {url} did not come up in {START_TIMEOUT_S:.0f} s")


def request_body(i: int) -> dict[str, Any]:
    return {
        "model": "persona-echo",
        "user": USERS[i % len(USERS)],
        "messages": [
            {"role": "system", "content": "You are a helpful assistant for Example Corp."},
            {"role": "user", "content": "Which trail would you suggest for this weekend?"},
            {"role": "assistant", "content": "The coastal trail is lovely this time of year."},
            {"role": "user", "content": f"Request {i}: and if it rains, what then?"},
        ],
    }


async def measure(
    client: Any, url: str, requests: int, concurrency: int, warmup: int
) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    latencies: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int, record: bool) -> None:
        async with semaphore:
            began = time.perf_counter()
            response = await client.post(
                f"{url}/v1/chat/completions", json=request_body(i), headers=headers, timeout=30
            )
            elapsed = time.perf_counter() - began
        if response.status_code != 200:
            raise SystemExit(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
        if not response.json()["choices"][0]["message"]["content"].startswith("You said:"):
            raise SystemExit(f"{url}: unexpected reply {response.text[:300]}")
        if record:
            latencies.append(elapsed)

    # warm-up: every user once (creates the personas), then a few more
    await asyncio.gather(*(one(i, False) for i in range(max(warmup, len(USERS)))))
    began = time.perf_counter()
    await asyncio.gather(*(one(i, True) for i in range(requests)))
    wall = time.perf_counter() - began
    latencies.sort()
    return {
        "throughput": requests / wall,
        "p50": _quantile(latencies, 0.50) * 1000,
        "p99": _quantile(latencies, 0.99) * 1000,
        "wall": wall,
    }


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted ``values``."""
    index = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return values[index]


SERVERS = {
    "baseline": ("baseline (bare FastAPI)", "baseline", True),
    "persona": ("persona server", "persona", True),
    "persona-no-memory": ("persona, no memory", "persona", False),
}


async def run(args: argparse.Namespace) -> None:
    import httpx

    names = ["baseline", "persona-no-memory"] if args.no_memory else list(SERVERS)
    with tempfile.TemporaryDirectory(prefix="bench-openai-server-") as tmp:
        servers = {}
        for name in names:
            _label, kind, memory = SERVERS[name]
            servers[name] = start(kind, Path(tmp) / name, memory)
        try:
            limits = httpx.Limits(max_connections=args.concurrency * 2)
            async with httpx.AsyncClient(limits=limits) as client:
                for proc, url in servers.values():
                    await wait_ready(client, url, proc)
                results = {}
                for name, (_proc, url) in servers.items():
                    results[name] = await asyncio.wait_for(
                        measure(client, url, args.requests, args.concurrency, args.warmup),
                        RUN_TIMEOUT_S,
                    )
        finally:
            for proc, _url in servers.values():
                proc.terminate()
            for proc, _url in servers.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    report(results, args)


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    base = results["baseline"]
    print(
        f"OpenAI-compatible persona server vs a bare FastAPI echo endpoint "
        f"({args.requests} requests, concurrency {args.concurrency}, loopback)"
    )
    print(
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
        "persona server: SQLite store, Chroma memory (MiniLM), echo model upstream"
    )
    print()
    print(f"{'':26}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, r in results.items():
        label = SERVERS[name][0]
        print(f"{label:26}{r['throughput']:>10.1f}{r['p50']:>10.2f}{r['p99']:>10.2f}")
    print()
    for name, r in results.items():
        if name == "baseline":
            continue
        print(
            f"overhead of the {SERVERS[name][0]}: p50 +{r['p50'] - base['p50']:.2f} ms "
            f"(x{r['p50'] / base['p50']:.1f}), p99 +{r['p99'] - base['p99']:.2f} ms "
            f"(x{r['p99'] / base['p99']:.1f}); throughput "
            f"x{r['throughput'] / base['throughput']:.2f} of the baseline"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="timed requests per server")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--warmup", type=int, default=16, help="untimed requests first")
    parser.add_argument(
        "--no-memory", action="store_true", help="only the persona server without memory"
    )
    parser.add_argument("--serve", choices=["baseline", "persona"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    if args.serve:
        serve(args.serve, args.port, memory=not args.no_memory)
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
