"""Background reflection across processes: a server killed with work queued and one
reflection in flight, restarted; two worker processes on one PostgreSQL database.

The processes are real (``tests/processes/``): the persona server under uvicorn, and
reflection workers. Their reflection model, :class:`tests.fakes.TurnReflector`, learns one
interest per turn and appends every call to a file, so calls made by a process that was
killed still count. "Exactly once" is checked where it matters: every turn is learned
once, in exactly one saved version, and marked reflected once in the log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from persona_plugin.interactions import DONE, PENDING, InteractionLog
from persona_plugin.store import PersonaStore
from tests.paths import REPO


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _module(name: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"tests.processes.{name}", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _serve(url: str, record: Path, debounce_s: float, delay: float) -> tuple[Any, str]:
    port = _free_port()
    process = _module("reflecting_server", url, record, port, debounce_s, delay)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {process.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    pytest.fail("the server did not start")


def _calls(record: Path) -> list[tuple[str, list[str]]]:
    if not record.exists():
        return []
    return [tuple(json.loads(line)) for line in record.read_text().splitlines() if line]


def _learned_once(store: PersonaStore, log: InteractionLog, turns: dict[str, list[str]]) -> None:
    """Every turn learned once, in exactly one saved version, and marked reflected once."""
    for user, ids in turns.items():
        assert Counter(store.get(user).personality.interests) == Counter(
            f"topic {t}" for t in ids
        ), user
        in_versions = Counter(
            turn
            for record in store.history(user)
            for turn in record.details.get("reflection", {}).get("turn_ids", [])
        )
        assert in_versions == Counter(ids), user
        logged = {t.turn_id: t for t in log.turns(user)}
        assert {logged[t].reflection for t in ids} == {DONE}, user
        for t in ids:
            record = store.get_version(user, logged[t].reflected_version)
            assert t in record.details["reflection"]["turn_ids"]


def test_a_killed_server_loses_no_queued_turn_and_reflects_each_once(
    store_url: str, tmp_path: Path
) -> None:
    record = tmp_path / "calls.jsonl"
    # reflections here take 60 s: the first one is still running when the server is killed
    server, base = _serve(store_url, record, debounce_s=1.0, delay=60)
    turns: dict[str, list[str]] = {f"u{n}": [] for n in range(4)}
    try:
        auth = {"Authorization": "Bearer tok-0123456789"}
        with httpx.Client(base_url=base, headers=auth) as client:
            for n in range(6):
                for user in turns:
                    reply = client.post(
                        "/v1/chat/completions",
                        json={
                            "model": "echo",
                            "user": user,
                            "messages": [{"role": "user", "content": f"{user} says {n}"}],
                        },
                        timeout=30,
                    )
                    assert reply.status_code == 200, reply.text
                    turns[user].append(reply.json()["id"])
        with PersonaStore(store_url) as store:
            log = InteractionLog.on(store)
            # every turn was logged as pending before its reply came back
            assert sum(log.count_queued(user) for user in turns) == 24
            deadline = time.monotonic() + 60
            while not _calls(record) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(_calls(record)) == 1, "the first reflection did not start"
            server.send_signal(signal.SIGKILL)
            server.wait(30)
            assert sum(log.count_queued(user) for user in turns) == 24  # nothing was lost
            killed = _calls(record)[0]

            restarted, _ = _serve(store_url, record, debounce_s=0.1, delay=0)
            try:
                deadline = time.monotonic() + 120
                while any(log.count_queued(u) for u in turns) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert not any(log.count_queued(u) for u in turns)
            finally:
                restarted.send_signal(signal.SIGTERM)
                restarted.wait(60)
            _learned_once(store, log, turns)
            # the restarted server reflected each turn once; the killed call counted nothing
            after = _calls(record)[1:]
            assert Counter(t for _, ids in after for t in ids) == Counter(
                t for ids in turns.values() for t in ids
            )
            assert killed[1] and set(killed[1]) <= set(turns[killed[0]])
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.postgres
def test_two_worker_processes_on_postgres_reflect_each_of_200_turns_once(
    postgres_url: str, tmp_path: Path
) -> None:
    record = tmp_path / "calls.jsonl"
    turns = {f"u{n:02}": [f"u{n:02}-t{k}" for k in range(10)] for n in range(20)}
    with PersonaStore(postgres_url) as store:
        log = InteractionLog.on(store)
        for k in range(10):
            for user, ids in turns.items():
                log.record_turn(
                    user, ids[k], user_text=f"turn {k}", reply_text="ok", reflection=PENDING
                )
        ready = [tmp_path / f"ready-{n}" for n in range(2)]
        go = tmp_path / "go"
        workers = [
            _module("reflection_worker", postgres_url, record, 0.01, ready[n], go) for n in range(2)
        ]
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()  # both set up: they start claiming together
        outputs = [w.communicate(timeout=240)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
        counted = [int(out.strip().splitlines()[-1]) for out in outputs]
        assert sum(counted) == 200
        assert all(counted), f"one worker did all the work: {counted}"
        # each turn reached a reflection call exactly once, across both processes
        reflected = Counter(t for _, ids in _calls(record) for t in ids)
        assert reflected == Counter(t for ids in turns.values() for t in ids)
        _learned_once(store, log, turns)
