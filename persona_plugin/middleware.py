"""The persona in a LangChain v1 agent: :class:`PersonaMiddleware` for ``create_agent``.

``create_agent(model, tools, middleware=[PersonaMiddleware(store, memory=memory)])`` gives
any tool-calling agent the calling user's persona:

* ``before_agent`` (once per run) finds the user (``runtime.context`` — a dict or an
  object with ``user_id`` — else ``config["configurable"]["user_id"]``), loads their persona
  (an empty one for a new user) and recalls long-term memory for the run's user message,
  leaving out what the thread already shows;
* ``wrap_model_call`` (every model step of the tool loop) merges the assembled persona
  block and the recalled memories into the agent's system message, lists the persona's
  annotations of only the tools the agent has, and hands the persona to models that choose
  LoRA adapters from it (a :class:`~persona_plugin.chat_models.multi_lora.MultiLoraChatModel`);
* ``after_agent`` (once the agent answers) remembers the turn (guarded as everywhere),
  logs it in the interaction log, and reflects on it: ``inline`` before the run returns,
  ``background`` through the log's queue (the turn survives a crash), or ``off``. The final
  reply's ``response_metadata["persona"]`` carries the turn id (feedback names it) and the
  persona version that served it.

A run is one turn: the user's message, however many tool steps, the final answer.
Reflection reads the user message and the final answer, not the tool traffic. The sync
and async agent APIs both work (the async hooks run the store and memory work in a
thread).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, NotRequired

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain.agents.middleware.types import PrivateStateAttr
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langgraph.config import get_config
from langgraph.runtime import Runtime

from persona_plugin.chat import merge_system_message
from persona_plugin.chat_models.persona_aware import takes_persona
from persona_plugin.config import Settings
from persona_plugin.errors import PersonaConfigError, PersonaNotFoundError, PersonaValidationError
from persona_plugin.guard import guarded_turn
from persona_plugin.interactions import DONE, PENDING, InteractionLog
from persona_plugin.memory.long_term import exchange_turns
from persona_plugin.persona import Persona, validate_user_id
from persona_plugin.privacy import Forgotten, forget_user
from persona_plugin.prompt import PromptAssembler
from persona_plugin.reflection.apply import ReflectionJob
from persona_plugin.reflection.reflector import reflector_for
from persona_plugin.reflection.types import ReflectionTurn
from persona_plugin.reflection.worker import ReflectionWorker
from persona_plugin.store import PersonaStore

log = logging.getLogger(__name__)

MODES = ("inline", "background", "off")
#: runs whose persona is kept between before_agent and after_agent (runs that failed in
#: between are dropped oldest first)
MAX_RUNS_IN_FLIGHT = 1024


class PersonaAgentState(AgentState[Any]):
    """The agent's state plus this run's persona turn, kept out of the agent's input and
    output schemas: clients never see the persona or the recalled memories."""

    persona_turn: NotRequired[Annotated[dict[str, Any], PrivateStateAttr]]


def user_id_of(runtime: Any, key: str = "user_id") -> str:
    """The calling user: ``runtime.context[key]`` (or its attribute), else
    ``config["configurable"][key]``."""
    context = getattr(runtime, "context", None)
    value = context.get(key) if isinstance(context, Mapping) else getattr(context, key, None)
    source = f"the agent's context ({key})"
    if value is None:
        try:
            value = (get_config().get("configurable") or {}).get(key)
        except RuntimeError:  # not inside a runnable: there is no config
            value = None
        source = f"config['configurable']['{key}']"
    if value is None:
        raise PersonaConfigError(
            f"no user for this agent run: pass context={{'{key}': '<user id>'}} to invoke (with "
            f"create_agent(..., context_schema=...)) or config={{'configurable': {{'{key}': "
            "'<user id>'}}."
        )
    return validate_user_id(value, source=source)


def _thread_id() -> str | None:
    try:
        return (get_config().get("configurable") or {}).get("thread_id")
    except RuntimeError:
        return None


class PersonaMiddleware(AgentMiddleware[PersonaAgentState, Any, Any]):
    """Agent middleware: the user's persona and memories in every model call, reflection
    after every run. See the module docstring for what each hook does.

    ``store``: the persona store (default: the configured one). ``memory``: a
    :class:`~persona_plugin.memory.long_term.LongTermMemory` to recall from and remember
    into (None: no long-term memory). ``reflector``: the reflection model (a chat model, or
    a :class:`~persona_plugin.reflection.types.ReflectionModel`); by default the agent's
    own model, seen at its first call. ``interactions``: the interaction log (True: in the
    store's database; None/False: off, which rules out ``background``).
    """

    state_schema = PersonaAgentState

    def __init__(
        self,
        store: PersonaStore | None = None,
        *,
        memory: Any = None,
        assembler: PromptAssembler | None = None,
        reflector: Any = None,
        reflection: str = "inline",
        interactions: Any = True,
        recall_k: int = 5,
        cold_start: bool = True,
        user_id_key: str = "user_id",
        debounce_s: float = 1.0,
        settings: Settings | None = None,
    ) -> None:
        super().__init__()
        if reflection not in MODES:
            raise PersonaConfigError(
                f"reflection mode {reflection!r} is not one of {MODES} (the middleware "
                "reflects once per agent run)."
            )
        if store is None or assembler is None:
            settings = settings or Settings.load()
        self.store = store or PersonaStore.from_settings(settings)
        self.memory = memory
        self.assembler = assembler or PromptAssembler.from_settings(settings)
        self.reflection = reflection
        self.recall_k = recall_k
        self.cold_start = cold_start
        self.user_id_key = user_id_key
        self.interactions = (
            InteractionLog.on(self.store) if interactions is True else interactions or None
        )
        if reflection == "background" and self.interactions is None:
            raise PersonaConfigError(
                "reflection='background' is driven by the interaction log, which is off for "
                "this middleware: pass interactions=True or use reflection='inline'."
            )
        self._reflector = self._as_reflector(reflector) if reflector is not None else None
        self._lock = threading.Lock()
        self._background: ReflectionWorker | None = None
        self.debounce_s = debounce_s
        # the parsed persona of each run in flight, by (user, turn): the state holds only
        # plain data, and a tool loop calls the model many times
        self._personas: OrderedDict[tuple[str, str], Persona] = OrderedDict()
        self.tools = []

    # -- parts ----------------------------------------------------------------------------

    def _as_reflector(self, model: Any) -> Any:
        if callable(getattr(model, "call", None)):  # already a ReflectionModel
            return model
        return reflector_for(model, limits=self.store.limits)

    def _adopt(self, model: Any) -> None:
        """With no reflector given, the agent's own model reflects: the first seen."""
        if self._reflector is None:
            with self._lock:
                if self._reflector is None:
                    self._reflector = self._as_reflector(model)

    def _job(self) -> ReflectionJob | None:
        """The reflection job (None until a reflector is known)."""
        if self._reflector is None:
            return None
        return ReflectionJob(store=self.store, reflector=self._reflector, memory=self.memory)

    @property
    def background(self) -> ReflectionWorker | None:
        """The worker that reflects on queued turns (``reflection='background'``), made
        once the reflector is known."""
        with self._lock:
            worker = self._background
        if worker is None and self.reflection == "background" and self.interactions:
            job = self._job()
            if job is not None:
                with self._lock:
                    if self._background is None:
                        self._background = ReflectionWorker(
                            self.interactions, job, debounce_s=self.debounce_s
                        )
                    worker = self._background
        return worker

    def _persona(self, turn: Mapping[str, Any]) -> Persona:
        persona = self._personas.get((turn["user_id"], turn["turn_id"]))
        if persona is None:  # a run resumed in another process: read it again
            persona = self._load(turn["user_id"])[0]
        return persona

    def _load(self, user_id: str) -> tuple[Persona, bool]:
        try:
            return self.store.get(user_id), True
        except PersonaNotFoundError:
            if not self.cold_start:
                raise
            return Persona.new(user_id), False

    # -- before the agent -----------------------------------------------------------------

    def before_agent(self, state: PersonaAgentState, runtime: Runtime[Any]) -> dict[str, Any]:
        user_id = user_id_of(runtime, self.user_id_key)
        messages = state.get("messages") or []
        index = next(
            (i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], HumanMessage)),
            None,
        )
        if index is None or not messages[index].text.strip():
            raise PersonaValidationError(
                "agent input",
                "messages",
                "there is no user message to answer",
                "Invoke with {'messages': [{'role': 'user', 'content': 'your text'}]}.",
            )
        persona, exists = self._load(user_id)
        turn_id = f"t{uuid.uuid4().hex[:10]}"
        with self._lock:
            self._personas[(user_id, turn_id)] = persona
            while len(self._personas) > MAX_RUNS_IN_FLIGHT:
                self._personas.popitem(last=False)
        recalled: list[str] = []
        if self.memory is not None and exists:
            shown = {m.text.strip() for m in messages[:index]}
            query = messages[index].text
            items = self.memory.recall(user_id, query, k=self.recall_k + len(shown))
            recalled = [
                f"({i.timestamp[:10]}) {i.text}" if i.timestamp else i.text
                for i in items
                if i.text.removeprefix("user: ").removeprefix("assistant: ").strip() not in shown
            ][: self.recall_k]
        turn = {
            "user_id": user_id,
            "turn_id": turn_id,
            "persona_version": persona.meta.version,
            "exists": exists,
            "user_index": index,
            "context": {"memory": recalled} if recalled else {},
            "thread_id": _thread_id(),
        }
        return {"persona_turn": turn}

    async def abefore_agent(
        self, state: PersonaAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any]:
        # the config lives in a context variable: the thread gets a copy of this context
        return await asyncio.to_thread(self.before_agent, state, runtime)

    # -- every model call -----------------------------------------------------------------

    def _personalised(self, request: ModelRequest) -> ModelRequest:
        turn = request.state.get("persona_turn")
        if not turn:  # the hook did not run (a model call outside an agent run)
            return request
        persona = self._persona(turn)
        names = [
            getattr(t, "name", None) or (t.get("name") if isinstance(t, dict) else None)
            for t in request.tools
        ]
        block = self.assembler.assemble(
            persona, context=turn.get("context") or {}, tools=[n for n in names if n]
        ).text
        overrides: dict[str, Any] = {}
        if block:
            current = [request.system_message] if request.system_message else []
            overrides["system_message"] = merge_system_message(current, block)[0]
        if takes_persona(request.model):
            # the adapter mixture follows the persona (see MultiLoraChatModel)
            overrides["model_settings"] = {**request.model_settings, "persona": persona}
        return request.override(**overrides) if overrides else request

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelResponse:
        self._adopt(request.model)  # the agent's model reflects unless a reflector was given
        return handler(self._personalised(request))

    async def awrap_model_call(
        self,
        request: ModelRequest,
        handler: Callable[[ModelRequest], Awaitable[ModelResponse]],
    ) -> ModelResponse:
        self._adopt(request.model)
        return await handler(self._personalised(request))

    # -- after the agent ------------------------------------------------------------------

    def after_agent(self, state: PersonaAgentState, runtime: Runtime[Any]) -> dict[str, Any]:
        turn = state.get("persona_turn")
        messages = state.get("messages") or []
        if not turn or not messages:
            return {}
        user_id, turn_id = turn["user_id"], turn["turn_id"]
        try:
            return self._finish(turn, messages)
        finally:
            with self._lock:
                self._personas.pop((user_id, turn_id), None)

    async def aafter_agent(self, state: PersonaAgentState, runtime: Runtime[Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.after_agent, state, runtime)

    def _finish(self, turn: dict[str, Any], messages: list[BaseMessage]) -> dict[str, Any]:
        user_id, turn_id = turn["user_id"], turn["turn_id"]
        said = messages[turn["user_index"]]
        reply = messages[-1]
        if not isinstance(reply, AIMessage) or not reply.text.strip():
            # an agent stopped mid-tool-loop (a limit, an interrupt): no answer to learn from
            log.info("agent run %s of %s ended without an answer; not remembered", turn_id, user_id)
            return {}
        user_text, reply_text = guarded_turn(said.text, reply.text)
        if self.memory is not None:
            self.memory.remember(
                user_id,
                exchange_turns(turn_id, user_text, reply_text, session=turn.get("thread_id")),
            )
        outcome = None
        if self.reflection == "inline":
            job = self._job()
            if job is not None:
                outcome = job(
                    user_id, [ReflectionTurn(turn_id=turn_id, user=said.text, assistant=reply.text)]
                )
        self._log(turn, user_text, reply_text, reply, outcome)
        # no reflection created the persona: the user gets version 1 now, as in the graph
        self.store.create_first(
            user_id, self._persona(turn), memory=self.memory, reason=f"turn {turn_id}"
        )
        if self.reflection == "background" and self.background is not None:
            self.background.notify()
        tag = {"turn_id": turn_id, "persona_version": turn["persona_version"]}
        if outcome is not None:
            tag["reflection"] = {"version": outcome.version, "saved": bool(outcome.saved)}
        if reply.id is None:  # add_messages replaces a message by its id only
            return {}
        metadata = {**(reply.response_metadata or {}), "persona": tag}
        return {"messages": [reply.model_copy(update={"response_metadata": metadata})]}

    def _log(
        self, turn: dict[str, Any], said: str, answered: str, reply: AIMessage, outcome: Any
    ) -> None:
        if self.interactions is None:
            return
        queue: dict[str, Any] = {}
        if self.reflection == "background":
            queue["reflection"] = PENDING
        elif outcome is not None and outcome.version and not outcome.error:
            queue.update(reflection=DONE, reflected_version=outcome.version)
        details: dict[str, Any] = {}
        if reply.usage_metadata:
            details["tokens"] = dict(reply.usage_metadata)
        try:
            self.interactions.record_turn(
                turn["user_id"],
                turn["turn_id"],
                user_text=said,
                reply_text=answered,
                thread_id=turn.get("thread_id"),
                persona_version=turn["persona_version"],
                model=(reply.response_metadata or {}).get("model_name"),
                details=details,
                **queue,
            )
        except Exception as exc:  # the log must not cost the user the reply
            log.warning("turn %s of %s not logged: %s", turn["turn_id"], turn["user_id"], exc)

    # -- the app's handle -----------------------------------------------------------------

    def record_feedback(self, user_id: str, turn_id: str, kind: str, **fields: Any) -> Any:
        """Log feedback on one of the user's agent turns (the turn id is in the reply's
        ``response_metadata["persona"]``); background reflection then reads it."""
        if self.interactions is None:
            raise PersonaConfigError(
                "this middleware keeps no interaction log: pass interactions=True to take feedback."
            )
        event = self.interactions.record_feedback(user_id, turn_id, kind, **fields)
        if self.reflection == "background" and self.background is not None:
            self.background.notify()
        return event

    def forget(self, user_id: str, *, checkpointer: Any = None) -> Forgotten:
        """Delete every trace of ``user_id`` this middleware wrote (persona, memory, log;
        pass the agent's ``checkpointer`` to delete their threads too)."""
        # the user's queued reflections go with their log rows: they are not run
        return forget_user(
            user_id,
            store=self.store,
            memory=self.memory,
            checkpointer=checkpointer,
            interactions=self.interactions,
        )

    def close(self, timeout: float | None = None) -> bool:
        """Drain background reflection and stop its thread (call on shutdown)."""
        return self._background.close(timeout) if self._background is not None else True
