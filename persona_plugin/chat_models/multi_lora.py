"""Any multi-LoRA backend as a plain LangChain chat model.

``MultiLoraChatModel(backend=..., retriever=...)`` is a ``BaseChatModel``: it works
wherever a chat model does (``invoke``, ``stream``, ``batch``, async, LangGraph nodes).
The adapters of a call come, first match wins, from:

1. ``adapters=[(id, weight), ...]`` passed to ``invoke``/``stream`` (or bound with
   ``.bind(adapters=...)``), or ``config["configurable"]["adapters"]``;
2. the ``retriever`` (a :class:`LoraRetriever`), given the persona
   (``persona=`` in the call, ``config["configurable"]["persona"]``, or the model's
   ``persona`` field) and the last user message; retrieval is limited to the adapters the
   backend can serve;
3. the model's ``adapters`` field (empty: the base model).

The reply's ``response_metadata`` says what served it: ``adapters`` (what actually
served), ``requested_adapters``, ``served_by`` (``adapter``, ``merged``, ``premerged``,
``top``, ``base``), ``backend`` and, when retrieved, ``retrieved`` (id, weight, score).

When the backend stays unavailable after its retries (:class:`BackendUnavailableError`)
and a ``fallback`` chat model is set, the fallback answers and the reply's metadata says
``fallback: True``. A stream that breaks after text was sent raises
:class:`BackendStreamError`; it never falls back mid-reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import AliasChoices, ConfigDict, Field

from persona_plugin.backends.types import (
    BackendUnavailableError,
    GenerationRequest,
    GenerationResult,
    Mixture,
    normalize_mixture,
)
from persona_plugin.cards.owned import OWNED_PREFIX, owned_id
from persona_plugin.chat_models.persona_aware import LiftsConfigurable, coerce_persona, content_text
from persona_plugin.errors import PersonaConfigError
from persona_plugin.persona import user_of

#: keys of ``config["configurable"]`` this model reads
log = logging.getLogger(__name__)
CONFIGURABLE_KEYS = ("adapters", "persona")
_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "n")


#: OpenAI's names for what the backends call otherwise
_OPENAI_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}
#: OpenAI sampling parameters no backend here applies: accepted, so an OpenAI client that
#: sends them is served, and dropped (logged), as vLLM drops what it does not support
_OPENAI_IGNORED = ("presence_penalty", "frequency_penalty")


def _openai_sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with OpenAI's sampling names mapped onto the backends' (``max_tokens``
    is ``max_new_tokens``) and the penalties no backend applies dropped."""
    out = dict(kwargs)
    for openai_name, name in _OPENAI_ALIASES.items():
        if openai_name in out:
            value = out.pop(openai_name)
            if value is not None:
                out.setdefault(name, value)
    for name in _OPENAI_IGNORED:
        if out.pop(name, None) not in (None, 0, 0.0):
            log.debug("MultiLoraChatModel ignores %s: no backend applies it", name)
    return out


def message_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``{"role", "content"}`` dicts (text content only)."""
    out = []
    for message in messages:
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            role = "assistant"
        elif isinstance(message, ToolMessage):
            role = "tool"
        elif isinstance(message, ChatMessage):
            role = message.role
        else:
            role = message.type
        out.append({"role": role, "content": content_text(message.content)})
    return out


class MultiLoraChatModel(LiftsConfigurable, BaseChatModel):
    """A chat model served by a multi-LoRA :class:`Backend`, adapters chosen per call."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    configurable_keys: ClassVar[tuple[str, ...]] = CONFIGURABLE_KEYS
    #: the persona graph hands this model the persona (see takes_persona)
    takes_persona: ClassVar[bool] = True

    backend: Any = Field(description="a persona_plugin.backends Backend")
    retriever: Any = Field(None, description="a LoraRetriever choosing adapters per call")
    persona: Any = Field(None, description="default persona (Persona or text) for retrieval")
    adapters: list[tuple[str, float]] = Field(
        default_factory=list, description="default adapters when none are given or retrieved"
    )
    # max_tokens too: LangChain's standard name, which the other chat models take at init
    max_new_tokens: int = Field(256, validation_alias=AliasChoices("max_new_tokens", "max_tokens"))
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    stop: list[str] | None = Field(None, description="stop strings of every call")
    fallback: Any = Field(None, description="chat model answering when the backend is down")

    @property
    def _llm_type(self) -> str:
        return "persona-multi-lora"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "n": self.n,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """What a trace records: the backend as the provider, its base model as the model."""
        params = LangSmithParams(
            ls_provider=f"persona-{getattr(self.backend, 'name', 'backend')}",
            ls_model_name=kwargs.get("model") or backend_model_name(self.backend),
            ls_model_type="chat",
            ls_max_tokens=_openai_sampling(kwargs).get("max_new_tokens", self.max_new_tokens),
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or ())
        return params

    # -- building the request ---------------------------------------------------------------

    def _adapters(
        self, messages: Sequence[BaseMessage], kwargs: dict[str, Any]
    ) -> tuple[Mixture, list[tuple[str, float, float]] | None]:
        persona = coerce_persona(kwargs.get("persona", self.persona))
        if kwargs.get("adapters") is not None:
            given = normalize_mixture(kwargs["adapters"])
            _check_owned(given, persona)
            return given, None
        if self.retriever is not None and persona is not None:
            user = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)
            mixture = self.retriever.retrieve(
                persona,
                content_text(user.content) if user is not None else "",
                allowed=getattr(self.backend, "adapter_ids", None),
                owned=getattr(self.backend, "serves_owned_adapters", False),
            )
            retrieved = [(a.id, round(a.weight, 4), round(a.score, 4)) for a in mixture.adapters]
            return normalize_mixture(mixture.pairs()), retrieved
        return normalize_mixture(self.adapters), None

    def _request(
        self,
        messages: Sequence[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        stream: bool = False,
    ) -> tuple[GenerationRequest, list[tuple[str, float, float]] | None]:
        kwargs = _openai_sampling(kwargs)
        if "stop" in kwargs:  # bound with .bind(stop=...), as the persona server does
            bound_stop = kwargs.pop("stop")
            stop = [*(stop or ()), *([bound_stop] if isinstance(bound_stop, str) else bound_stop)]
        stop = [*(self.stop or ()), *(stop or ())]
        unknown = sorted(
            k
            for k in kwargs
            if k not in (*CONFIGURABLE_KEYS, *_SAMPLING_KEYS) and not k.startswith("ls_")
        )
        if unknown:
            raise PersonaConfigError(
                f"MultiLoraChatModel does not take {unknown}; it takes adapters, persona and "
                f"{', '.join(_SAMPLING_KEYS)}."
            )
        adapters, retrieved = self._adapters(messages, kwargs)
        sampling = {k: kwargs.get(k, getattr(self, k)) for k in _SAMPLING_KEYS}
        if stream:
            sampling["n"] = 1  # a stream is one message; n candidates come from generate()
        request = GenerationRequest(
            messages=tuple(message_dicts(messages)),
            adapters=adapters,
            stop=tuple(stop or ()),
            **sampling,
        )
        return request, retrieved

    def _metadata(
        self, result: GenerationResult, retrieved: list[tuple[str, float, float]] | None, i: int
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "model_name": result.model or result.backend,
            "finish_reason": result.finish_reasons[i],
            "backend": result.backend,
            "served_by": result.served_by,
            "adapters": [list(p) for p in result.adapters],
            "requested_adapters": [list(p) for p in result.requested_adapters],
        }
        if retrieved is not None:
            meta["retrieved"] = [list(r) for r in retrieved]
        return meta

    @staticmethod
    def _usage(result: GenerationResult) -> dict[str, int] | None:
        if result.prompt_tokens is None or result.completion_tokens is None:
            return None
        return {
            "input_tokens": result.prompt_tokens,
            "output_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }

    def _chat_result(
        self, result: GenerationResult, retrieved: list[tuple[str, float, float]] | None
    ) -> ChatResult:
        usage = self._usage(result)
        generations = []
        for i, text in enumerate(result.texts):
            message = AIMessage(
                content=text,
                response_metadata=self._metadata(result, retrieved, i),
                usage_metadata=usage if i == 0 and usage else None,  # type: ignore[arg-type]
            )
            generations.append(ChatGeneration(message=message))
        return ChatResult(
            generations=generations,
            llm_output={"token_usage": usage or {}, "backend": result.backend},
        )

    @staticmethod
    def _mark_fallback(message: BaseMessage, exc: BaseException) -> BaseMessage:
        message.response_metadata = {
            **message.response_metadata,
            "fallback": True,
            "fallback_reason": str(exc).split("\n")[0],
        }
        return message

    # -- BaseChatModel ----------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request, retrieved = self._request(messages, stop, kwargs)
        try:
            result = self.backend.generate(request)
        except BackendUnavailableError as exc:
            if self.fallback is None:
                raise
            reply = self.fallback.invoke(messages, stop=list(request.stop) or None)
            return ChatResult(generations=[ChatGeneration(message=self._mark_fallback(reply, exc))])
        return self._chat_result(result, retrieved)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request, retrieved = await asyncio.to_thread(self._request, messages, stop, kwargs)
        try:
            result = await self.backend.agenerate(request)
        except BackendUnavailableError as exc:
            if self.fallback is None:
                raise
            reply = await self.fallback.ainvoke(messages, stop=list(request.stop) or None)
            return ChatResult(generations=[ChatGeneration(message=self._mark_fallback(reply, exc))])
        return self._chat_result(result, retrieved)

    def _final_chunk(
        self, result: GenerationResult, retrieved: list[tuple[str, float, float]] | None
    ) -> ChatGenerationChunk:
        usage = self._usage(result)
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                response_metadata=self._metadata(result, retrieved, 0),
                usage_metadata=usage,  # type: ignore[arg-type]
            ),
            generation_info={"finish_reason": result.finish_reason},
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request, retrieved = self._request(messages, stop, kwargs, stream=True)
        try:
            # BackendUnavailableError can only come before the first chunk: later failures
            # are BackendStreamError, which must reach the caller
            for chunk in self.backend.stream(request):
                if chunk.text:
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text)
                    yield ChatGenerationChunk(message=AIMessageChunk(content=chunk.text))
                if chunk.result is not None:
                    yield self._final_chunk(chunk.result, retrieved)
        except BackendUnavailableError as exc:
            if self.fallback is None:
                raise
            for piece in self.fallback.stream(messages, stop=list(request.stop) or None):
                yield ChatGenerationChunk(message=piece)
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    response_metadata={"fallback": True, "fallback_reason": str(exc)[:200]},
                )
            )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if not hasattr(self.backend, "astream"):
            async for piece in super()._astream(messages, stop, run_manager, **kwargs):
                yield piece
            return
        request, retrieved = await asyncio.to_thread(self._request, messages, stop, kwargs, True)
        try:
            async for chunk in self.backend.astream(request):
                if chunk.text:
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text)
                    yield ChatGenerationChunk(message=AIMessageChunk(content=chunk.text))
                if chunk.result is not None:
                    yield self._final_chunk(chunk.result, retrieved)
        except BackendUnavailableError as exc:
            if self.fallback is None:
                raise
            async for piece in self.fallback.astream(messages, stop=list(request.stop) or None):
                yield ChatGenerationChunk(message=piece)
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    response_metadata={"fallback": True, "fallback_reason": str(exc)[:200]},
                )
            )


def backend_model_name(backend: Any) -> str:
    """The base model a backend serves, for traces: its ``model_name`` or ``model``
    attribute if it has one (read from the instance: LocalBackend's ``model`` property
    would load the weights), else the backend's name."""
    own = getattr(backend, "__dict__", {})
    for attribute in ("model_name", "model"):
        if isinstance(own.get(attribute), str) and own[attribute]:
            return own[attribute]
    return str(getattr(backend, "name", type(backend).__name__))


def _check_owned(mixture: Mixture, persona: Any) -> None:
    """A user's own adapter is served to that user alone: an own id in a mixture given
    for someone else's request is refused."""
    own = [a for a, _ in mixture if a.startswith(OWNED_PREFIX)]
    if not own:
        return
    user_id = user_of(persona)
    mine = {owned_id(user_id, "adapter")} if user_id else set()
    theirs = [a for a in own if a.rpartition("-v")[0] not in mine]
    if theirs:
        raise PersonaConfigError(
            f"adapters {theirs} are a user's own and this request is not that user's: "
            "own adapters are served to their owner alone."
        )
