"""The protocol every inference backend speaks, and what the remote ones share.

A backend turns a :class:`GenerationRequest` (a prompt or chat messages, a mixture of
LoRA adapters as ``[(adapter id, weight), ...]``, sampling parameters) into a
:class:`GenerationResult` (the texts, token counts, finish reasons, and the adapters that
*actually* served it: a server that cannot merge serves a mixture some other way, and
says so). Adapter ids are the LoRA hub's card ids; each backend maps them to the names
its server knows.

Faults: a timeout, a refused connection, a 429 (its ``Retry-After`` honoured) or a 5xx
is retried with exponential backoff (:class:`RetryPolicy`), then raised as
:class:`BackendUnavailableError`. A request the server rejects (422, 424, other 4xx) is
raised at once as :class:`BackendRequestError`. A stream is retried only until its first
token; once text has been handed out, a cut raises :class:`BackendStreamError`: a partial
reply is never passed off as a complete one.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from persona_plugin.backends.types import (
    SERVED_ADAPTER,
    SERVED_BASE,
    SERVED_PREMERGED,
    SERVED_TOP,
    AdapterNotServedError,
    BackendError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    Mixture,
)
from persona_plugin.errors import PersonaConfigError, PersonaValidationError
from persona_plugin.lora.hub import mixture_matches

logger = logging.getLogger("persona_plugin.backends")

T = TypeVar("T")


# -- the protocol -------------------------------------------------------------------------


@runtime_checkable
class Backend(Protocol):
    """What :class:`MultiLoraChatModel` (and MBR decoding) need from an inference backend.

    ``adapter_ids`` are the hub ids the backend can serve (None: any id, e.g. LoRAX loads
    adapters on demand); retrieval is limited to them. ``stream`` serves ``n == 1``.
    ``generate_batch`` serves several requests, each with its own adapters, and returns
    their results in order.
    """

    name: str

    @property
    def adapter_ids(self) -> frozenset[str] | None: ...

    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    async def agenerate(self, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]: ...


class BaseBackend(ABC):
    """Defaults for a backend: async versions that run the sync ones in a thread.

    A local backend (transformers + peft) only has to implement :meth:`generate` and
    :meth:`stream`; the remote ones override the async methods with real async I/O.
    """

    name: str = "backend"

    @property
    def adapter_ids(self) -> frozenset[str] | None:
        return None

    @abstractmethod
    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    @abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]: ...

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Serve ``requests`` (each with its own adapters); their results, in order.

        This default serves them one by one with :meth:`generate`: a remote server batches
        concurrent requests on its side (continuous batching), so one call per request
        loses nothing there. The local backend overrides it to run requests with different
        adapters in one ``model.generate`` call. The first error is raised as is.
        """
        return [self.generate(request) for request in requests]

    async def agenerate(self, request: GenerationRequest) -> GenerationResult:
        return await asyncio.to_thread(self.generate, request)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        iterator = self.stream(request)
        done = object()
        while True:
            chunk = await asyncio.to_thread(next, iterator, done)
            if chunk is done:
                return
            yield chunk  # type: ignore[misc]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (remote backends)."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_streamable(request: GenerationRequest, backend: str) -> None:
    if request.n != 1:
        raise PersonaValidationError(
            "GenerationRequest",
            "n",
            f"a stream serves one candidate, not n={request.n}",
            f"Use generate() for several candidates ({backend}).",
        )


MixturePolicy = Literal["premerged_or_top", "top", "strict"]
MIXTURE_POLICIES: tuple[str, ...] = ("premerged_or_top", "top", "strict")


def check_policy(policy: str, tolerance: float) -> None:
    if policy not in MIXTURE_POLICIES:
        raise PersonaConfigError(
            f"mixture_policy {policy!r} is not one of {', '.join(MIXTURE_POLICIES)}."
        )
    if not 0 <= tolerance < 1:
        raise PersonaConfigError(f"merge_tolerance must be in [0, 1), not {tolerance!r}.")


@dataclass(frozen=True, slots=True)
class Served:
    """How a mixture will be served by a one-adapter-per-request server."""

    name: str | None  # the id sent to the server; None for the base model
    adapters: Mixture  # in hub ids
    served_by: str


def serve_one_adapter(
    mixture: Mixture,
    *,
    served: Mapping[str, str],
    premerged: Mapping[str, Mapping[str, float]],
    policy: str,
    tolerance: float,
    unknown: Callable[[list[str]], BackendError],
) -> Served:
    """Serve ``mixture`` with one adapter: itself, a pre-merged adapter, or its top adapter.

    Every id must be one the server serves, unless the whole mixture is served by a
    pre-merged adapter (whose parts need not be loaded). ``unknown`` builds the error.
    """
    if not mixture:
        return Served(None, (), SERVED_BASE)
    missing = [a for a, _ in mixture if a not in served]
    if len(mixture) == 1:
        if missing:
            raise unknown(missing)
        return Served(served[mixture[0][0]], ((mixture[0][0], 1.0),), SERVED_ADAPTER)
    wanted = dict(mixture)
    for merged_id, weights in premerged.items() if policy != "top" else ():
        if merged_id in served and mixture_matches(wanted, weights, tolerance=tolerance):
            return Served(served[merged_id], ((merged_id, 1.0),), SERVED_PREMERGED)
    if missing:
        raise unknown(missing)
    if policy == "strict":
        raise AdapterNotServedError(
            f"no pre-merged adapter on this server matches the mixture "
            f"{[(a, round(w, 3)) for a, w in mixture]} (tolerance {tolerance}), and "
            "mixture_policy='strict' forbids serving its top adapter alone. Register a "
            "pre-merged adapter (a card with merge_of) or use mixture_policy='premerged_or_top'."
        )
    top = mixture[0][0]
    return Served(served[top], ((top, 1.0),), SERVED_TOP)
