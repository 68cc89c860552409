"""The drop-in LangChain component: any chat model, personalised per user.

``with_persona(model, store)`` returns a chat model (:class:`PersonaChatModel`) that takes
what the model takes (a string, messages, a prompt value), reads the user id from
``config["configurable"]["user_id"]``, merges the user's assembled persona into the
system message and calls the model. invoke, ainvoke, stream, astream and batch work,
callbacks, tags and metadata reach the wrapped model unchanged, and ``bind_tools`` /
``with_structured_output`` make it usable as the model of a tool-calling agent.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    BaseMessage,
    BaseMessageChunk,
    HumanMessage,
    SystemMessage,
    convert_to_messages,
)
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableConfig,
    RunnableLambda,
    ensure_config,
)
from pydantic import ConfigDict, Field

from persona_plugin.config import Settings
from persona_plugin.errors import PersonaConfigError, PersonaNotFoundError
from persona_plugin.persona import Persona, validate_user_id
from persona_plugin.prompt import (
    AssembledPersona,
    PromptAssembler,
    bound_tool_names,
    token_counter_for,
)
from persona_plugin.store import PersonaStore

log = logging.getLogger(__name__)


def _to_messages(value: LanguageModelInput) -> list[BaseMessage]:
    if isinstance(value, str):
        return [HumanMessage(content=value)]
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, Sequence):
        return convert_to_messages(value)
    raise PersonaConfigError(
        f"input of type {type(value).__name__} is not a chat model input. Pass a string, "
        "a list of messages or a prompt value."
    )


def merge_system_message(messages: list[BaseMessage], block: str) -> list[BaseMessage]:
    """Append ``block`` to the app's first system message, or send it as a new first one.

    The block joins an existing system message wherever it stands rather than adding a
    second one: several providers reject more than one system message.
    """
    for index, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            if isinstance(message.content, str):
                content: Any = f"{message.content}\n\n{block}" if message.content else block
            else:
                content = [*message.content, {"type": "text", "text": block}]
            merged = message.model_copy(update={"content": content})
            return [*messages[:index], merged, *messages[index + 1 :]]
    return [SystemMessage(content=block), *messages]


class PersonaInjector:
    """Looks up the user's persona and merges it into the messages (one call's work)."""

    def __init__(
        self,
        store: PersonaStore,
        assembler: PromptAssembler,
        *,
        cold_start: bool | Persona = False,
        user_id_key: str = "user_id",
        tools: Collection[str] = (),
    ) -> None:
        self.store = store
        self.assembler = assembler
        self.cold_start = cold_start
        self.user_id_key = user_id_key
        #: the tools the model is given: the persona's annotations of these are listed
        self.tools = set(tools)

    def user_id(self, config: RunnableConfig | None) -> str:
        configurable = (config or {}).get("configurable") or {}
        user_id = configurable.get(self.user_id_key)
        if user_id is None:
            raise PersonaConfigError(
                f"config['configurable']['{self.user_id_key}'] is missing: pass "
                f"config={{'configurable': {{'{self.user_id_key}': '<user id>'}}}} so the "
                "model knows whose persona to use."
            )
        return validate_user_id(user_id, source=f"config['configurable']['{self.user_id_key}']")

    def persona(self, user_id: str) -> Persona:
        try:
            return self.store.get(user_id)
        except PersonaNotFoundError:
            if self.cold_start is False:
                raise
            if isinstance(self.cold_start, Persona):
                template = self.cold_start.model_copy(deep=True)
                template.identity.user_id = user_id
                return template.with_meta(user_id=user_id, version=0)
            return Persona.new(user_id)

    def version_of(self, user_id: str) -> int:
        """The version of the persona a call of ``user_id`` is served (0: a cold start)."""
        try:
            return self.store.current_version(user_id)
        except PersonaNotFoundError:
            return 0

    def assemble(self, config: RunnableConfig | None) -> AssembledPersona:
        return self.assembler.assemble(self.persona(self.user_id(config)), tools=self.tools)

    def inject(self, value: LanguageModelInput, config: RunnableConfig) -> list[BaseMessage]:
        messages = _to_messages(value)
        block = self.assemble(config).text
        # an empty block: the token budget cannot hold even the frame
        return merge_system_message(messages, block) if block else messages


class PersonaChatModel(BaseChatModel):
    """A chat model that carries the calling user's persona: what :func:`with_persona`
    returns.

    It is a ``BaseChatModel``, so it goes wherever a chat model goes (``create_agent``,
    ``create_react_agent``, chains): ``bind_tools`` binds the tools on the wrapped model and
    keeps the persona (whose annotations of exactly those tools are then listed),
    ``with_structured_output`` uses the wrapped model's own, and every call (invoke,
    stream, their async twins, batch) first merges the persona into the system message. The
    wrapped model runs as a child of a ``persona_chat`` chain run, so callbacks, tags and
    metadata reach it as before. With an interaction log, each reply is logged and its
    ``response_metadata["persona"]`` carries the turn id (feedback names it) and the
    persona version.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    #: the wrapped chat model, or its binding (tools bound)
    model: Any
    injector: Any = Field(exclude=True)
    #: logs every reply (None: nothing is written, the wrapper only reads)
    interactions: Any = Field(default=None, exclude=True)

    @property
    def _llm_type(self) -> str:
        return f"persona-{getattr(self.base, '_llm_type', 'chat')}"

    @property
    def base(self) -> Any:
        """The wrapped chat model itself, through its bindings."""
        model = self.model
        while isinstance(model, RunnableBinding):
            model = model.bound
        return model

    def _chain(self, kwargs: dict[str, Any]) -> Runnable[Any, Any]:
        model = self.model.bind(**kwargs) if kwargs else self.model
        inject = RunnableLambda(self.injector.inject, name="inject_persona")
        return (inject | model).with_config(run_name="persona_chat")

    # -- calls ----------------------------------------------------------------------------

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> BaseMessage:
        config = ensure_config(config)
        started = time.perf_counter()
        reply = self._chain(_with_stop(kwargs, stop)).invoke(input, config)
        return self._logged(input, config, reply, started)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> BaseMessage:
        config = ensure_config(config)
        started = time.perf_counter()
        reply = await self._chain(_with_stop(kwargs, stop)).ainvoke(input, config)
        return await asyncio.to_thread(self._logged, input, config, reply, started)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[BaseMessageChunk]:
        config = ensure_config(config)
        started, whole, held = time.perf_counter(), None, None
        # each chunk is held back by one, so that the last can carry the turn's tag (a
        # model that cannot stream yields one whole message, which cannot take a chunk)
        for chunk in self._chain(_with_stop(kwargs, stop)).stream(input, config):
            whole = chunk if whole is None else whole + chunk
            if held is not None:
                yield held
            held = chunk
        if held is not None:
            yield _tagged(held, self._log(input, config, whole, started))

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[BaseMessageChunk]:
        config = ensure_config(config)
        started, whole, held = time.perf_counter(), None, None
        async for chunk in self._chain(_with_stop(kwargs, stop)).astream(input, config):
            whole = chunk if whole is None else whole + chunk
            if held is not None:
                yield held
            held = chunk
        if held is not None:
            tag = await asyncio.to_thread(self._log, input, config, whole, started)
            yield _tagged(held, tag)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        # reached only through generate(); invoke and stream are overridden. The user comes
        # from the config of the run this call is part of.
        config = ensure_config({"callbacks": run_manager.get_child()} if run_manager else None)
        reply = self._chain(_with_stop(kwargs, stop)).invoke(messages, config)
        return ChatResult(generations=[ChatGeneration(message=reply)])

    # -- the interaction log --------------------------------------------------------------

    def _logged(
        self, input: LanguageModelInput, config: RunnableConfig, reply: Any, started: float
    ) -> Any:
        return _tagged(reply, self._log(input, config, reply, started))

    def _log(
        self, input: LanguageModelInput, config: RunnableConfig, reply: Any, started: float
    ) -> dict[str, Any] | None:
        """Log the turn (the last user message and the reply, guarded as memory keeps
        them); the tag for the reply's metadata, or None without a log."""
        if self.interactions is None or not isinstance(reply, BaseMessage):
            return None
        from persona_plugin.guard import guarded_turn

        user_id = self.injector.user_id(config)
        said = next(
            (m.text for m in reversed(_to_messages(input)) if isinstance(m, HumanMessage)), ""
        )
        answered = reply.text or ("(a tool call)" if getattr(reply, "tool_calls", None) else "")
        if not answered.strip():
            return None  # an empty reply is no turn
        said, answered = guarded_turn(said, answered)
        turn_id = f"t{uuid.uuid4().hex[:10]}"
        version = self.injector.version_of(user_id)
        latency = round(1000 * (time.perf_counter() - started), 3)
        usage = getattr(reply, "usage_metadata", None)
        try:
            self.interactions.record_turn(
                user_id,
                turn_id,
                user_text=said,
                reply_text=answered,
                thread_id=(config.get("configurable") or {}).get("thread_id"),
                persona_version=version,
                model=getattr(self.base, "_llm_type", None),
                latency_ms=latency,
                details={"tokens": dict(usage)} if usage else {},
            )
        except Exception as exc:  # the log must not cost the user the reply
            log.warning("reply to %s not logged: %s", user_id, exc)
            return None
        return {"turn_id": turn_id, "persona_version": version, "latency_ms": latency}

    # -- what a chat model offers ---------------------------------------------------------

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> PersonaChatModel:  # type: ignore[override]
        """Tools bound on the wrapped model; the persona stays, and lists its annotations
        of these tools."""
        bound = self.base.bind_tools(tools, **kwargs)
        injector = copy.copy(self.injector)
        injector.tools = set(bound_tool_names(bound))
        return self.model_copy(update={"model": bound, "injector": injector})

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Runnable[Any, Any]:  # type: ignore[override]
        """The wrapped model's structured output, its input carrying the persona."""
        inject = RunnableLambda(self.injector.inject, name="inject_persona")
        structured = self.base.with_structured_output(schema, **kwargs)
        return (inject | structured).with_config(run_name="persona_chat")


def _tagged(message: Any, tag: dict[str, Any] | None) -> Any:
    """``message`` with the turn's tag in ``response_metadata["persona"]``."""
    if not tag or not isinstance(message, BaseMessage):
        return message
    metadata = {**(message.response_metadata or {}), "persona": tag}
    return message.model_copy(update={"response_metadata": metadata})


def _with_stop(kwargs: dict[str, Any], stop: list[str] | None) -> dict[str, Any]:
    return {**kwargs, "stop": stop} if stop is not None else kwargs


def with_persona(
    chat_model: BaseChatModel | Runnable[Any, Any],
    store: PersonaStore | None = None,
    *,
    assembler: PromptAssembler | None = None,
    cold_start: bool | Persona | None = None,
    user_id_key: str = "user_id",
    settings: Settings | None = None,
    interactions: Any = None,
) -> PersonaChatModel:
    """Wrap ``chat_model`` so every call carries the calling user's persona.

    The user comes from ``config["configurable"][user_id_key]``. An unknown user raises
    :class:`PersonaNotFoundError` unless ``cold_start`` is set: ``True`` serves an empty
    persona, a :class:`Persona` serves a copy of that template; ``None`` (the default)
    follows the ``cold_start`` setting (``PERSONA_COLD_START``). Cold start never writes
    to the store; creating the persona is the app's (or reflection's) decision.

    ``interactions``: an :class:`~persona_plugin.interactions.InteractionLog` (or True: the
    one in the store's database) to log every reply in, with its turn id in
    ``response_metadata["persona"]``; None (the default) writes nothing.

    The result is a chat model (:class:`PersonaChatModel`): ``bind_tools``,
    ``with_structured_output`` and streaming of tool-call chunks work, and it can be the
    model of ``create_agent`` / ``create_react_agent``.
    """
    if store is None or assembler is None or cold_start is None:
        settings = settings or Settings.load()
    if cold_start is None:
        assert settings is not None
        cold_start = settings.cold_start
    if store is None:
        store = PersonaStore.from_settings(settings)
    if assembler is None:
        assert settings is not None
        assembler = PromptAssembler.from_settings(
            settings, token_counter=token_counter_for(chat_model)
        )
    injector = PersonaInjector(
        store,
        assembler,
        cold_start=cold_start,
        user_id_key=user_id_key,
        tools=bound_tool_names(chat_model),
    )
    if interactions is True:
        from persona_plugin.interactions import InteractionLog

        interactions = InteractionLog.on(store)
    base = chat_model
    while isinstance(base, RunnableBinding):
        base = base.bound
    return PersonaChatModel(
        model=chat_model,
        injector=injector,
        interactions=interactions or None,
        profile=getattr(base, "profile", None),
    )
