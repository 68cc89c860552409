"""What backends exchange: requests, results, stream chunks, adapter mixtures, and errors.

A :class:`GenerationRequest` holds a prompt or chat messages, a mixture of LoRA adapters as
``[(adapter id, weight), ...]`` and the sampling parameters. It is checked when it is built,
so a bad request fails in the caller's code before any server is asked. A
:class:`GenerationResult` holds the texts, token counts and finish reasons, plus the adapters
that *actually* served the request, with ``served_by`` saying how (``SERVED_*``). A server
that cannot merge a mixture serves it some other way, and says so. Adapter ids are the LoRA
hub's card ids. :func:`normalize_mixture` puts a mixture in one form: weights summing to 1,
heaviest first, with an id listed twice an error rather than a silent sum.

Each error (:class:`BackendError` and its subclasses) tells the caller what to do next:
:class:`BackendRequestError` and :class:`AdapterNotServedError` need a different request,
:class:`BackendUnavailableError` a fallback or a later try, and :class:`BackendStreamError` a
new turn, since part of the reply was already handed out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import (
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from persona_plugin.errors import PersonaError, PersonaValidationError

logger = logging.getLogger("persona_plugin.backends")

T = TypeVar("T")

#: ``((adapter id, weight), ...)``, weights summing to 1, heaviest first
Mixture = tuple[tuple[str, float], ...]

#: how a result was served (:attr:`GenerationResult.served_by`)
SERVED_BASE = "base"  # no adapter
SERVED_ADAPTER = "adapter"  # the one adapter asked for
SERVED_MERGED = "merged"  # the mixture, merged by the server per request (LoRAX)
SERVED_PREMERGED = "premerged"  # a pre-merged adapter whose card lists the mixture
SERVED_TOP = "top"  # the mixture's heaviest adapter alone


# -- errors -------------------------------------------------------------------------------


class BackendError(PersonaError):
    """Base class of the errors backends raise."""

    def __init__(self, message: str, *, backend: str = "") -> None:
        self.backend = backend
        super().__init__(message)


class AdapterNotServedError(BackendError):
    """An adapter id the server was not configured with: refused before any request."""

    exit_code = 2


class BackendRequestError(BackendError):
    """The server rejected the request (422 validation, 424 generation, other 4xx)."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        backend: str = "",
        status: int | None = None,
        error_type: str | None = None,
    ) -> None:
        self.status = status
        self.error_type = error_type
        super().__init__(message, backend=backend)


class BackendUnavailableError(BackendError):
    """Timeouts, 429s, 5xx or connection failures outlasted the retries."""

    def __init__(
        self,
        message: str,
        *,
        backend: str = "",
        attempts: int = 0,
        status: int | None = None,
    ) -> None:
        self.attempts = attempts
        self.status = status
        super().__init__(message, backend=backend)


class BackendProtocolError(BackendError):
    """The server answered, but not in its documented shape (a 200 without the text, a
    ``content: null`` reply): a fault of the server or of what sits in front of it."""


class BackendStreamError(BackendError):
    """A stream broke after text was handed out; ``partial_text`` is what arrived."""

    def __init__(self, message: str, *, backend: str = "", partial_text: str = "") -> None:
        self.partial_text = partial_text
        super().__init__(message, backend=backend)


# -- requests and results -----------------------------------------------------------------


def _reject(field_name: str, problem: str, hint: str) -> PersonaValidationError:
    return PersonaValidationError("GenerationRequest", field_name, problem, hint)


_ADAPTERS_HINT = "Pass adapters as [(adapter_id, weight), ...], e.g. [('formal', 0.7), ('kb', 0.3)]"


def normalize_mixture(adapters: Any) -> Mixture:
    """``[(id, weight), ...]``, a mapping, a :class:`LoraMixture` or None -> a :data:`Mixture`.

    Zero weights are dropped, the rest scaled to sum to 1 and sorted heaviest first (ties
    keep their order). An id listed twice is an error, not a silent sum.
    """
    if adapters is None:
        return ()
    if isinstance(adapters, str):  # one adapter id
        adapters = [adapters]
    if hasattr(adapters, "pairs") and callable(adapters.pairs):  # a LoraMixture
        adapters = adapters.pairs()
    items = list(adapters.items()) if isinstance(adapters, Mapping) else list(adapters)
    pairs: list[tuple[str, float]] = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            item = (item, 1.0)
        if not isinstance(item, Sequence) or len(item) != 2:
            raise _reject(
                "adapters", f"{item!r} is not an (adapter id, weight) pair", _ADAPTERS_HINT
            )
        adapter_id, weight = item
        if not isinstance(adapter_id, str) or not adapter_id:
            raise _reject("adapters", f"adapter id {adapter_id!r} is not a string", _ADAPTERS_HINT)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise _reject(
                "adapters", f"weight {weight!r} of {adapter_id!r} is not a number", _ADAPTERS_HINT
            )
        if not math.isfinite(weight) or weight < 0:
            raise _reject(
                "adapters", f"weight {weight!r} of {adapter_id!r}", "Use a finite weight >= 0."
            )
        if adapter_id in seen:
            raise _reject("adapters", f"adapter {adapter_id!r} is listed twice", _ADAPTERS_HINT)
        seen.add(adapter_id)
        if weight > 0:
            pairs.append((adapter_id, float(weight)))
    total = sum(w for _, w in pairs)
    ordered = sorted(pairs, key=lambda p: -p[1])
    return tuple((a, w / total) for a, w in ordered)


def _message_dict(message: Any) -> dict[str, str]:
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    elif isinstance(message, Sequence) and not isinstance(message, str) and len(message) == 2:
        role, content = message  # (role, content)
    else:
        role = content = None
    if not isinstance(role, str) or not role or not isinstance(content, str):
        raise _reject(
            "messages",
            f"{message!r} is not a message",
            "Each message is {'role': 'user' | 'assistant' | 'system', 'content': '...'}.",
        )
    return {"role": role, "content": content}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: a ``prompt`` *or* chat ``messages``, adapters and sampling.

    ``temperature`` None or 0 means greedy decoding; ``top_p`` None or 1 means no nucleus
    cut; ``seed`` is a positive integer (TGI and LoRAX reject 0); ``n`` > 1 asks for that
    many candidates (for MBR decoding), drawn with seeds ``seed, seed+1, ...`` where the
    server cannot draw them in one call.
    """

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    adapters: Mixture = ()
    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if (self.prompt is None) == (self.messages is None):
            raise _reject(
                "prompt", "give a prompt or messages, and not both", "Pass exactly one of them."
            )
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise _reject("prompt", f"prompt is a {type(self.prompt).__name__}", "Pass a string.")
        if self.messages is not None:
            messages = tuple(_message_dict(m) for m in self.messages)
            if not messages:
                raise _reject("messages", "no messages", "Pass at least one message.")
            set_(self, "messages", messages)
        set_(self, "adapters", normalize_mixture(self.adapters))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise _reject(
                "max_new_tokens", f"{self.max_new_tokens!r} is not an integer", "Use one >= 1."
            )
        if self.max_new_tokens < 1:
            raise _reject("max_new_tokens", f"{self.max_new_tokens} < 1", "Use an integer >= 1.")
        if self.temperature is not None and (
            not math.isfinite(self.temperature) or self.temperature < 0
        ):
            raise _reject(
                "temperature",
                f"{self.temperature!r} is not a temperature",
                "Use None or 0 (greedy) or a value > 0.",
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise _reject("top_p", f"{self.top_p!r} is not in (0, 1]", "Use None or (0, 1].")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 1
        ):
            raise _reject(
                "seed", f"{self.seed!r} is not a positive integer", "TGI and LoRAX reject 0."
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise _reject("stop", f"{stop!r} holds a non-string or an empty string", "Fix it.")
        set_(self, "stop", stop)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= 64:
            raise _reject("n", f"{self.n!r} candidates", "Ask for 1 to 64.")

    @property
    def greedy(self) -> bool:
        return not self.temperature

    @property
    def nucleus(self) -> float | None:
        """``top_p`` if it cuts anything (servers refuse 1.0), else None."""
        return self.top_p if self.top_p is not None and self.top_p < 1 else None

    def seeds(self) -> list[int | None]:
        """One seed per candidate: ``seed, seed+1, ...`` (all None if no seed was given)."""
        return [None if self.seed is None else self.seed + i for i in range(self.n)]

    def replace(self, **changes: Any) -> GenerationRequest:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What came back: ``texts`` (``n`` of them) and how it was served.

    ``adapters`` is what served the request, in hub ids: the mixture itself when merged,
    ``((premerged_id, 1.0),)`` for a pre-merged adapter, ``((top_id, 1.0),)`` when only the
    heaviest adapter served, ``()`` for the base model. ``served_by`` names which.
    """

    texts: tuple[str, ...]
    finish_reasons: tuple[str | None, ...]
    backend: str
    served_by: str = SERVED_BASE
    adapters: Mixture = ()
    requested_adapters: Mixture = ()
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0]

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """A piece of a streamed reply; the last chunk carries the whole :class:`GenerationResult`."""

    text: str
    result: GenerationResult | None = None


def merge_results(results: Sequence[GenerationResult]) -> GenerationResult:
    """``n`` single-candidate results of one request as one result."""
    first = results[0]

    def total(name: str) -> int | None:
        values = [getattr(r, name) for r in results]
        return None if any(v is None for v in values) else sum(values)

    prompt = first.prompt_tokens if all(r.prompt_tokens is not None for r in results) else None
    return replace(
        first,
        texts=tuple(t for r in results for t in r.texts),
        finish_reasons=tuple(f for r in results for f in r.finish_reasons),
        prompt_tokens=prompt,
        completion_tokens=total("completion_tokens"),
    )
