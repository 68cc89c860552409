"""A reflection worker process for the tests: ``python -m tests.processes.reflection_worker
STORE_URL RECORD_FILE DELAY READY_FILE GO_FILE`` reflects on everything queued in the
store's interaction log with :class:`tests.fakes.TurnReflector` (each call recorded in
RECORD_FILE), then exits. It writes READY_FILE once it is set up and waits for GO_FILE,
so that several workers start reflecting together however long each took to start."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from persona_plugin.interactions import InteractionLog
from persona_plugin.reflection.apply import ReflectionJob
from persona_plugin.reflection.worker import ReflectionWorker
from persona_plugin.store import PersonaStore
from tests.fakes import TurnReflector


def main(url: str, record_to: str, delay: str, ready: str, go: str) -> None:
    with PersonaStore(url) as store:
        job = ReflectionJob(store=store, reflector=TurnReflector(record_to, delay=float(delay)))
        worker = ReflectionWorker(InteractionLog.on(store), job, max_turns=4)
        Path(ready).touch()
        deadline = time.monotonic() + 120
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.close(timeout=300)
        print(sum(len(o.turn_ids) for o in worker.outcomes if not o.error))


if __name__ == "__main__":
    main(*sys.argv[1:])
