"""Background reflection: reflect after the reply has gone, off the request's path.

:class:`BackgroundReflector` runs reflections in one worker thread, so a reply never waits
for a reflection call. Turns of one user that arrive within ``debounce_s`` of each other
become one reflection: a burst of messages costs one LLM call, and the reflection sees them
together. :meth:`BackgroundReflector.drain` waits for everything queued, or for one user's
queue before that user's persona is deleted, so a late reflection cannot recreate it.
:meth:`BackgroundReflector.close` drains and stops the worker and should be called on
shutdown. A failed reflection is logged, not raised, because nothing is waiting for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from persona_plugin.persona import Turn
from persona_plugin.reflection.types import ReflectionTurn

log = logging.getLogger(__name__)


# -- background reflection ---------------------------------------------------------------


@dataclass
class _Pending:
    turns: list[ReflectionTurn] = field(default_factory=list)
    short_term: list[Turn] = field(default_factory=list)
    due: float = 0.0


class BackgroundReflector:
    """Reflects after the reply has gone, in a worker thread, with debounce.

    Turns of one user that arrive within ``debounce_s`` of each other become one
    reflection. :meth:`drain` waits for everything queued (or one user's queue, before
    that user is forgotten); :meth:`close` drains and stops the worker (call it on
    shutdown).
    """

    def __init__(
        self,
        run: Callable[[str, list[ReflectionTurn], list[Turn]], Any],
        *,
        debounce_s: float = 1.0,
    ) -> None:
        self._run = run
        self.debounce_s = debounce_s
        self._pending: dict[str, _Pending] = {}
        self._busy = 0
        self._running: set[str] = set()  # users whose reflection runs now
        self._cond = threading.Condition()
        self._closed = False
        self.outcomes: list[Any] = []
        self._thread = threading.Thread(target=self._work, name="persona-reflection", daemon=True)
        self._thread.start()

    def submit(self, user_id: str, turn: ReflectionTurn, short_term: Sequence[Turn] = ()) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the background reflector is closed")
            pending = self._pending.setdefault(user_id, _Pending())
            pending.turns.append(turn)
            pending.short_term.extend(short_term)
            pending.due = time.monotonic() + self.debounce_s
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed and not self._pending:
                        return
                    now = time.monotonic()
                    ready = [u for u, p in self._pending.items() if p.due <= now or self._closed]
                    if ready:
                        user_id = ready[0]
                        job = self._pending.pop(user_id)
                        self._busy += 1
                        self._running.add(user_id)
                        break
                    wait = (
                        min(p.due for p in self._pending.values()) - now if self._pending else None
                    )
                    self._cond.wait(timeout=wait)
            try:
                self.outcomes.append(self._run(user_id, job.turns, job.short_term))
            except Exception:
                log.warning("background reflection for %s failed", user_id, exc_info=True)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._running.discard(user_id)
                    self._cond.notify_all()

    def drain(self, timeout: float | None = None, *, user_id: str | None = None) -> bool:
        """Reflect on everything queued now (no more debounce); True if all finished.

        ``user_id``: only that user's queued and running reflection (other users' keep
        their debounce), e.g. before the user's persona is deleted.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def waiting() -> bool:
            if user_id is None:
                return bool(self._pending or self._busy)
            return user_id in self._pending or user_id in self._running

        with self._cond:
            for user, pending in self._pending.items():
                if user_id is None or user == user_id:
                    pending.due = 0.0
            self._cond.notify_all()
            while waiting():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(timeout=remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        finished = self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return finished
