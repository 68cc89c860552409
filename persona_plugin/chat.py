"""The drop-in LangChain component: any chat model, personalised per user.

``with_persona(model, store)`` returns a Runnable that takes what the model takes (a
string, messages, a prompt value), reads the user id from
``config["configurable"]["user_id"]``, merges the user's assembled persona into the
system message and calls the model. It is an ordinary ``RunnableSequence``, so invoke,
ainvoke, stream, astream and batch work and callbacks, tags and metadata reach the
wrapped model unchanged.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

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

    def assemble(self, config: RunnableConfig | None) -> AssembledPersona:
        return self.assembler.assemble(self.persona(self.user_id(config)), tools=self.tools)

    def inject(self, value: LanguageModelInput, config: RunnableConfig) -> list[BaseMessage]:
        messages = _to_messages(value)
        block = self.assemble(config).text
        # an empty block: the token budget cannot hold even the frame
        return merge_system_message(messages, block) if block else messages


def with_persona(
    chat_model: BaseChatModel | Runnable[Any, Any],
    store: PersonaStore | None = None,
    *,
    assembler: PromptAssembler | None = None,
    cold_start: bool | Persona | None = None,
    user_id_key: str = "user_id",
    settings: Settings | None = None,
) -> Runnable[LanguageModelInput, BaseMessage]:
    """Wrap ``chat_model`` so every call carries the calling user's persona.

    The user comes from ``config["configurable"][user_id_key]``. An unknown user raises
    :class:`PersonaNotFoundError` unless ``cold_start`` is set: ``True`` serves an empty
    persona, a :class:`Persona` serves a copy of that template; ``None`` (the default)
    follows the ``cold_start`` setting (``PERSONA_COLD_START``). Cold start never writes
    to the store; creating the persona is the app's (or reflection's) decision.
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
    inject = RunnableLambda(injector.inject, name="inject_persona")
    return (inject | chat_model).with_config(run_name="persona_chat")
