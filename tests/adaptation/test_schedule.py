"""Slow adaptation off the request path: leases in the database, the scheduler, the
server's background job and the ``persona adapt --watch`` worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient

from persona_plugin.adaptation.schedule import AdaptationScheduler, Leases
from persona_plugin.cards.owned import OwnedCards
from persona_plugin.interactions import InteractionLog
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.privacy import forget_user
from persona_plugin.server.app import create_app
from persona_plugin.store import PersonaStore
from tests.adaptation.test_adaptation import QUESTIONS, long_reply
from tests.paths import REPO


def give_feedback(store: PersonaStore, user: str, questions: list[tuple[str, str, str]]) -> None:
    log = InteractionLog.on(store)
    for n, (question, short, topic) in enumerate(questions):
        turn = f"{user}-{n}-{time.monotonic_ns()}"
        log.record_turn(user, turn, user_text=question, reply_text=short)
        edit = long_reply(short, topic)  # they expand every reply
        log.record_feedback(user, turn, "edit", text=edit, reflect=False)


def scheduler(url: str, owned: OwnedCards, tmp_path: Path, **options) -> AdaptationScheduler:
    store = PersonaStore(url)
    hub = PreferenceHub(tmp_path / "prefs", owned=owned)
    return AdaptationScheduler(store=store, log=InteractionLog.on(store), hub=hub, **options)


def test_a_lease_has_one_holder_until_it_expires(store: PersonaStore) -> None:
    leases = Leases(store.engine)
    assert leases.acquire("ana", "preference", "a", lease_s=60)
    assert not leases.acquire("ana", "preference", "b", lease_s=60)
    assert leases.acquire("ana", "preference", "a", lease_s=60)  # the holder renews
    assert leases.acquire("bob", "preference", "b", lease_s=60)  # per user
    leases.release("ana", "preference", "b", seen=5, status="x")  # not b's: nothing
    assert not leases.acquire("ana", "preference", "b", lease_s=60)
    assert leases.acquire("cy", "preference", "a", lease_s=0.01)
    time.sleep(0.05)
    assert leases.acquire("cy", "preference", "b", lease_s=60)  # a died: b takes over
    leases.release("ana", "preference", "a", seen=5, status="promoted")
    assert leases.seen("ana", "preference") == 5
    assert leases.acquire("ana", "preference", "b", lease_s=60)


def test_two_replicas_adapt_each_user_once_and_again_only_after_new_feedback(
    tmp_path: Path, store_url: str
) -> None:
    with PersonaStore(store_url) as store:
        users = ["ana", "bob", "cy", "dee"]
        for user in users:
            give_feedback(store, user, QUESTIONS[:9])
        owned = OwnedCards(tmp_path / "owned")
        replicas = [scheduler(store_url, owned, tmp_path, holder=h) for h in ("r1", "r2")]
        results: list = []
        go = threading.Barrier(2)

        def round_of(replica: AdaptationScheduler) -> None:
            go.wait()
            results.extend(replica.run_once())

        threads = [threading.Thread(target=round_of, args=(r,)) for r in replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(r.user_id for r in results) == users  # each once, by one replica
        assert all(len(owned.versions(u, "preference")) == 1 for u in users)
        assert all(r.run_once() == [] for r in replicas)  # nothing new: nothing to do
        give_feedback(store, "bob", QUESTIONS[9:])
        assert [r.user_id for r in replicas[1].run_once()] == ["bob"]
        assert len(owned.versions("bob", "preference")) == 2
        forget_user("bob", store=store, owned=owned)
        assert Leases(store.engine).seen("bob", "preference") == 0
        for replica in replicas:
            replica.store.close()


def test_the_server_adapts_in_the_background_while_it_serves(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'personas.db'}"
    owned = OwnedCards(tmp_path / "owned")
    with PersonaStore(url) as store:
        give_feedback(store, "ana", QUESTIONS)
        job = scheduler(url, owned, tmp_path, interval_s=0.2)
        app = create_app(
            store=store,
            tokens={"tok-0123456789abcdef": {"users": ["ana"]}},
            reflection="off",
            adaptation=job,
        )
        with TestClient(app) as client:
            assert client.get("/health").status_code == 200
            deadline = time.monotonic() + 60
            while owned.serving("ana", "preference") != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert owned.serving("ana", "preference") == 1
            assert job._thread is not None and job._thread.is_alive()
        assert not job._thread.is_alive()  # shutdown stopped it
        job.store.close()


def test_adapt_watch_is_a_worker_that_stops_on_sigterm(tmp_path: Path) -> None:
    home = Path(os.environ["PERSONA_HOME"])
    with PersonaStore(f"sqlite:///{home / 'personas.db'}") as store:
        give_feedback(store, "ana", QUESTIONS)
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "persona"), "adapt", "--watch", "--interval", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    owned = OwnedCards(home / "owned")
    try:
        deadline = time.monotonic() + 120
        while owned.serving("ana", "preference") != 1 and time.monotonic() < deadline:
            assert worker.poll() is None, worker.communicate()[0]
            time.sleep(0.2)
        assert owned.serving("ana", "preference") == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    assert "adapting users with new feedback every 0.5 s" in output
    assert "ana: preference promoted" in output
