"""The persona graph: load persona -> recall -> assemble -> generate -> reflect -> save.

``build_persona_graph(chat_model, store=..., memory=...)`` returns a compiled LangGraph
graph. Input is ``{"messages": [...]}`` (the new user message); the user comes from
``config["configurable"]["user_id"]``, the conversation from ``thread_id`` (with a
checkpointer, earlier turns of the thread are in ``messages``). Also configurable per
call: ``model`` (a name among ``models``), ``reflection`` (``inline``,
``background``, ``every_n_turns``, ``off``) and ``mbr_n``. ``background`` and
``every_n_turns`` queue the turn in the interaction log before the reply is returned;
:class:`~persona_plugin.reflection.worker.ReflectionWorker` (``graph.background``) reflects
on it, and on feedback recorded with :meth:`PersonaGraph.record_feedback`.

The ``generate`` node hands the persona to models that choose LoRA adapters from it
(:func:`~persona_plugin.chat_models.persona_aware.takes_persona`: a
:class:`~persona_plugin.chat_models.multi_lora.MultiLoraChatModel`),
so the adapter mixture follows the persona turn by turn; the reply's
``response_metadata`` then says which adapters were retrieved (``retrieved``: id, weight,
score) and which served (``adapters``, ``served_by``).

MBR decoding is an optional stage of ``generate`` (``mbr_n`` candidates, 0 = off, the
default; configurable per call): the model is wrapped in
:class:`~persona_plugin.chat_models.mbr.MBRChatModel`, which samples the candidates, scores
them with the preference models retrieved from the persona and returns the best, its choice in
``response_metadata["mbr"]``. The user's own messages among the recalled memories go with
the persona (:func:`recalled_user_words`): the persona-conditioned model reads both.

:func:`build_persona_graph` returns a :class:`PersonaGraph`: the compiled LangGraph graph
(``.compiled``; ``invoke``, ``stream``, ``get_state`` ... are its own) together with the
parts it runs on, so an app can ``forget(user_id)`` a user and ``close()`` on shutdown.
One turn's persona is parsed once, in ``load_persona``; later nodes reuse that object.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from langchain_core.messages import (
    AnyMessage,
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    trim_messages,
)
from langchain_core.runnables import RunnableBinding, RunnableConfig
from langgraph.graph import END, START, StateGraph, add_messages
from langgraph.runtime import get_runtime
from typing_extensions import TypedDict  # pydantic reads only this one on Python < 3.12

from persona_plugin.adaptation.routing import ModelRouter, Route
from persona_plugin.chat import merge_system_message
from persona_plugin.chat_models.persona_aware import takes_persona
from persona_plugin.config import Settings
from persona_plugin.errors import PersonaConfigError, PersonaNotFoundError, PersonaValidationError
from persona_plugin.guard import guarded_turn
from persona_plugin.interactions import BATCHED, DONE, PENDING, FeedbackEvent, InteractionLog
from persona_plugin.memory.knowledge_base import KnowledgeBaseSearch
from persona_plugin.memory.long_term import exchange_turns
from persona_plugin.persona import Persona, validate_user_id
from persona_plugin.privacy import Forgotten, export_user, forget_user
from persona_plugin.prompt import PromptAssembler, bound_tool_names, token_counter_for
from persona_plugin.reflection.apply import ReflectionJob, roll_back
from persona_plugin.reflection.reflector import reflector_for
from persona_plugin.reflection.types import ReflectionMode, ReflectionModel, ReflectionTurn
from persona_plugin.reflection.worker import ReflectionWorker
from persona_plugin.store import PersonaStore, VersionRecord

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("inline", "background", "every_n_turns", "off")
#: modes whose turns wait in the interaction log's reflection queue
QUEUED_MODES = ("background", "every_n_turns")
#: parsed personas kept for turns between load_persona and save
MAX_TURNS_IN_FLIGHT = 1024


class PersonaState(TypedDict, total=False):
    """The graph's state; ``messages`` accumulate over a thread."""

    messages: Annotated[list[AnyMessage], add_messages]
    user_id: str
    turn_id: str
    persona: dict[str, Any]
    persona_exists: bool
    context: dict[str, list[str]]
    system_prompt: str
    reflection: dict[str, Any] | None


class PersonaInput(TypedDict):
    """What a client sends: the new user message (the thread's earlier ones are in the
    checkpoint). Who the user is comes from the context or the config, never the input."""

    messages: Annotated[list[AnyMessage], add_messages]


class PersonaOutput(TypedDict, total=False):
    """What a client gets back: the messages, the turn id (feedback names it) and what
    reflection did. The persona, recalled memories and system prompt stay inside."""

    messages: Annotated[list[AnyMessage], add_messages]
    turn_id: str
    reflection: dict[str, Any] | None


class PersonaContext(TypedDict, total=False):
    """The per-run options (``context=`` in LangGraph 1.x and on the Platform, or the same
    keys in ``config["configurable"]``, which wins)."""

    user_id: str
    thread_id: str
    turn_id: str
    reflection: ReflectionMode
    mbr_n: int
    model: str


def _configurable(config: RunnableConfig | None) -> dict[str, Any]:
    """A run's options: the runtime context's (``context=``), then the config's
    ``configurable`` keys over them."""
    options: dict[str, Any] = {}
    try:
        context = get_runtime().context
    except RuntimeError:  # called outside a graph run
        context = None
    if isinstance(context, Mapping):
        options.update((k, v) for k, v in context.items() if v is not None)
    elif context is not None:
        options.update((k, v) for k, v in vars(context).items() if v is not None)
    options.update((config or {}).get("configurable") or {})
    return options


def _turn_text(memory_text: str) -> str:
    """A remembered turn's text without its speaker label ("user: ...")."""
    for speaker in ("user: ", "assistant: "):
        if memory_text.startswith(speaker):
            return memory_text[len(speaker) :].strip()
    return memory_text.strip()


def recalled_user_words(memories: Sequence[str]) -> list[str]:
    """The user's own messages among recalled memory items (``"(2024-05-01) user: ..."``):
    what a persona-conditioned preference model reads beside the persona (the assistant's
    replies are not the user's words, and facts are already in the third person)."""
    said = []
    for item in memories:
        text = item.split(") ", 1)[1] if item.startswith("(") and ") " in item[:14] else item
        if text.startswith("user: "):
            said.append(text[len("user: ") :].strip())
    return said


def _check_mbr_n(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 32:
        raise PersonaConfigError(
            f"mbr_n must be an integer from 0 (MBR off) to 32 candidates, not {value!r}."
        )
    return value


class PersonaGraph:
    """The persona graph's nodes bound to their parts, and the compiled graph over them.

    Build it with :func:`build_persona_graph`. It is used like the compiled graph: its
    ``invoke``, ``ainvoke``, ``stream``, ``astream``, ``batch``, ``get_state`` and the rest
    are the compiled graph's (``.compiled``, which LangGraph's CLI and Platform load).
    """

    def __init__(
        self,
        chat_model: Any,
        *,
        store: PersonaStore,
        memory: Any = None,
        assembler: PromptAssembler | None = None,
        reflector: ReflectionModel | None = None,
        models: Mapping[str, Any] | None = None,
        reflection: ReflectionMode = "inline",
        every_n_turns: int = 3,
        debounce_s: float = 1.0,
        recall_k: int = 5,
        max_message_chars: int = 16000,
        short_term_window: int = 10,
        history_tokens: int = 2000,
        cold_start: bool = True,
        mbr_n: int = 0,
        preference_hub: Any = None,
        interactions: Any = True,
        routing: bool = False,
    ) -> None:
        if reflection not in MODES:
            raise PersonaConfigError(f"reflection mode {reflection!r} is not one of {MODES}")
        self.chat_model = chat_model
        self.models = dict(models or {})
        self.store = store
        self.memory = memory
        self.assembler = assembler or PromptAssembler(token_counter=token_counter_for(chat_model))
        self.reflector = reflector or reflector_for(chat_model, limits=store.limits)
        self.reflection = reflection
        self.every_n_turns = every_n_turns
        self.recall_k = recall_k
        self.max_message_chars = max_message_chars
        self.short_term_window = short_term_window
        self.history_tokens = history_tokens
        self.cold_start = cold_start
        self.mbr_n = _check_mbr_n(mbr_n)
        self.preference_hub = preference_hub
        #: the interaction log (default: in the store's database; ``None`` or ``False``: off)
        self.interactions = (
            InteractionLog.on(store) if interactions is True else interactions or None
        )
        self._mbr_models: dict[tuple[int, int], Any] = {}
        #: picks the model a turn that names none is served by (adaptation.routing)
        self.router = self._router(routing)
        self._routes: OrderedDict[tuple[str, str], Route] = OrderedDict()
        self._routes_lock = threading.Lock()
        self.knowledge_bases = KnowledgeBaseSearch(getattr(memory, "client", None))
        # this turn's parsed persona, by turn id: the state holds it as plain data (what a
        # checkpointer can store), and re-validating it in every node cost four parses a turn
        self._personas: OrderedDict[tuple[str, str], Persona] = OrderedDict()
        self.has_checkpointer = False
        self.compiled: Any = None
        self.reflect_job = ReflectionJob(store=store, reflector=self.reflector, memory=memory)
        #: reflects on the log's queued turns and feedback (None without a log)
        self.background = (
            ReflectionWorker(self.interactions, self.reflect_job, debounce_s=debounce_s)
            if self.interactions is not None
            else None
        )
        self._check_queue(reflection)

    def __getattr__(self, name: str) -> Any:
        # only reached for names PersonaGraph lacks: the compiled graph's API
        # (invoke, stream, get_state, ...)
        compiled = self.__dict__.get("compiled")
        if compiled is None:
            raise AttributeError(name)
        return getattr(compiled, name)

    def _check_queue(self, mode: str) -> None:
        if mode in QUEUED_MODES and self.background is None:
            raise PersonaConfigError(
                f"reflection mode {mode!r} is driven by the interaction log, which is off "
                "for this graph: turn it on (PERSONA_LOG=true, interactions=True) or use "
                "reflection='inline'."
            )

    def record_feedback(
        self, user_id: str, turn_id: str, kind: str, **fields: Any
    ) -> FeedbackEvent:
        """Log feedback on one of the user's turns (see
        :meth:`~persona_plugin.interactions.InteractionLog.record_feedback`); unless this
        graph's reflection is off, the worker then reflects on it with its turn."""
        if self.interactions is None:
            raise PersonaConfigError(
                "this graph keeps no interaction log, so there is no turn to give feedback "
                "on: turn it on (PERSONA_LOG=true, interactions=True)."
            )
        event = self.interactions.record_feedback(user_id, turn_id, kind, **fields)
        if self.reflection != "off" and self.background is not None:
            self.background.notify()
        return event

    @property
    def _checkpointer(self) -> Any:
        return self.compiled.checkpointer if self.compiled is not None else None

    def _persona(self, state: PersonaState) -> Persona:
        persona = self._personas.get((state.get("user_id", ""), state.get("turn_id", "")))
        if persona is None:  # a run resumed from a checkpoint, in another process
            persona = Persona.model_validate(state["persona"])
        return persona

    # -- nodes ----------------------------------------------------------------------------

    def load_persona(self, state: PersonaState, config: RunnableConfig) -> dict[str, Any]:
        configurable = _configurable(config)
        user_id = configurable.get("user_id") or state.get("user_id")
        if not user_id:
            raise PersonaConfigError(
                "config['configurable']['user_id'] is missing: pass context={'user_id': "
                "'<user id>'} or config={'configurable': {'user_id': '<user id>', "
                "'thread_id': '<conversation id>'}}."
            )
        validate_user_id(user_id, source="config['configurable']['user_id']")
        self._last_user_message(state)  # refuses empty and oversized input up front
        try:
            persona, exists = self.store.get(user_id), True
        except PersonaNotFoundError:
            if not self.cold_start:
                raise
            persona, exists = Persona.new(user_id), False
        turn_id = str(configurable.get("turn_id") or f"t{uuid.uuid4().hex[:10]}")
        # keyed by user too: turn ids come from callers, and two users' may be equal
        self._personas[(user_id, turn_id)] = persona
        while len(self._personas) > MAX_TURNS_IN_FLIGHT:  # runs that failed before save
            self._personas.popitem(last=False)
        update: dict[str, Any] = {
            "user_id": user_id,
            "turn_id": turn_id,
            "persona": persona.model_dump(mode="json"),
            "persona_exists": exists,
            "reflection": None,
        }
        # A checkpointer keeps a thread's input even when this node refused it; a refused
        # (empty or oversized) message must not reach the model with the next turn.
        refused = [
            m
            for m in (state.get("messages") or [])[:-1]
            if isinstance(m, HumanMessage) and m.id and not self._acceptable(m.text)
        ]
        if refused:
            update["messages"] = [RemoveMessage(id=m.id) for m in refused]
        return update

    def _acceptable(self, text: str) -> bool:
        return bool(text.strip()) and len(text) <= self.max_message_chars

    def _last_user_message(self, state: PersonaState) -> BaseMessage:
        messages = state.get("messages") or []
        if not messages or not isinstance(messages[-1], HumanMessage):
            raise PersonaValidationError(
                "graph input",
                "messages",
                "the last message is not a user message",
                "Invoke with {'messages': [('user', 'your text')]}.",
            )
        message = messages[-1]
        text = message.text
        if not text.strip():
            raise PersonaValidationError(
                "graph input", "messages[-1]", "the user message is empty", "Send some text."
            )
        if len(text) > self.max_message_chars:
            raise PersonaValidationError(
                "graph input",
                "messages[-1]",
                f"the user message is {len(text)} characters, over the cap of "
                f"{self.max_message_chars}",
                "Shorten it, or raise max_message_chars.",
            )
        return message

    def _window(self, state: PersonaState) -> list[BaseMessage]:
        """The thread as the model sees it: its latest messages within ``history_tokens``
        (from a user message on, the app's system message kept), then this turn's
        message. Older messages stay in the checkpoint; memory recalls them when they
        matter, so token cost stops growing with the thread."""
        *earlier, current = state["messages"]
        if not earlier:
            return [current]
        count = self.assembler.token_counter

        def tokens(messages: list[BaseMessage]) -> int:
            return sum(count(m.text) + 4 for m in messages)  # ~4 tokens of role framing

        kept = trim_messages(
            earlier,
            max_tokens=max(self.history_tokens - tokens([current]), 0),
            token_counter=tokens,
            strategy="last",
            start_on="human",
            include_system=True,
            allow_partial=False,
        )
        return [*kept, current]

    def recall(self, state: PersonaState, config: RunnableConfig) -> dict[str, Any]:
        query = state["messages"][-1].text
        context: dict[str, list[str]] = {}
        if self.memory is not None and state.get("persona_exists"):
            # what the model reads in the thread already is not recalled a second time; ask
            # for more, so that leaving those out still leaves recall_k items
            in_window = {m.text.strip() for m in self._window(state)[:-1]}
            items = self.memory.recall(state["user_id"], query, k=self.recall_k + len(in_window))
            items = [i for i in items if _turn_text(i.text) not in in_window][: self.recall_k]
            context["memory"] = [
                f"({item.timestamp[:10]}) {item.text}" if item.timestamp else item.text
                for item in items
            ]
        persona = self._persona(state)
        for name, tool in persona.tools.items():
            if tool.type != "knowledge_base" or not tool.collection:
                continue
            try:
                context[f"knowledge_base {name}"] = self.knowledge_bases.search(
                    tool.address, tool.collection, query
                )
            except Exception as exc:  # a tool's failure must not cost the user the reply
                log.warning("knowledge base %r (%s) failed: %s", name, tool.address, exc)
        return {"context": context}

    def assemble(self, state: PersonaState, config: RunnableConfig) -> dict[str, Any]:
        persona = self._persona(state)
        assembled = self.assembler.assemble(
            persona,
            context=state.get("context") or {},
            tools=bound_tool_names(self._model(config, self._route(state, config))),
        )
        return {"system_prompt": assembled.text}

    def _router(self, routing: bool) -> ModelRouter | None:
        if not routing:
            return None
        if not self.models or self.interactions is None:
            raise PersonaConfigError(
                "routing picks among the graph's models= by the ratings in the interaction "
                "log: pass models={name: chat_model, ...} and keep the log on."
            )
        return ModelRouter(list(self.models), self.interactions)

    def _route(self, state: PersonaState, config: RunnableConfig) -> Route | None:
        """The router's pick for this turn (once per turn), when the call names no model
        (or the server's pick, ``configurable["route"]``, for ``model: "auto"``)."""
        given = _configurable(config).get("route")
        if isinstance(given, dict) and given.get("model"):
            return Route(
                str(given["model"]), str(given.get("reason", "")), given.get("ratings") or {}
            )
        if self.router is None or _configurable(config).get("model") not in (None, "", "auto"):
            return None
        key = (state.get("user_id", ""), state.get("turn_id", ""))
        with self._routes_lock:
            route = self._routes.get(key)
        if route is None:
            route = self.router.route(key[0], self._persona(state))
            with self._routes_lock:  # server threads run turns at once
                self._routes[key] = route
                while len(self._routes) > MAX_TURNS_IN_FLIGHT:
                    self._routes.popitem(last=False)
        return route

    def _model(self, config: RunnableConfig, route: Route | None = None) -> Any:
        """The chat model this call asked for (``configurable["model"]``), else the one the
        router picked, else the default."""
        name = route.model if route is not None else _configurable(config).get("model")
        if name == "auto" and route is None:
            name = None  # no router: "auto" is the default model
        if not name:
            return self.chat_model
        if name not in self.models:
            raise PersonaConfigError(
                f"model {name!r} is not configured; choose one of {sorted(self.models)}."
            )
        return self.models[name]

    def generate(self, state: PersonaState, config: RunnableConfig) -> dict[str, Any]:
        route = self._route(state, config)
        with self._routes_lock:
            self._routes.pop((state.get("user_id", ""), state.get("turn_id", "")), None)
        model = self._model(config, route)
        messages = self._window(state)
        if state.get("system_prompt"):
            messages = merge_system_message(messages, state["system_prompt"])
        mbr_n = _check_mbr_n(_configurable(config).get("mbr_n", self.mbr_n))
        if mbr_n:
            model = self._mbr_model(model, mbr_n)
        started = time.perf_counter()
        persona = self._persona(state)
        if takes_persona(model) and mbr_n:
            # the persona's own likes and avoids, and what the user said of them in the
            # messages recalled for this turn, score MBR's candidates
            recalled = recalled_user_words((state.get("context") or {}).get("memory", []))
            reply = model.invoke(messages, config, persona=persona, statements=recalled)
        elif takes_persona(model):
            # the adapter mixture follows the persona (its user id and version key the
            # retriever's cache, so an updated persona is retrieved afresh)
            reply = model.invoke(messages, config, persona=persona)
        else:
            reply = model.invoke(messages, config)
        # the turn id comes back with the reply: feedback on it names the turn
        tag = {
            "turn_id": state["turn_id"],
            "persona_version": persona.meta.version,
            "latency_ms": round(1000 * (time.perf_counter() - started), 3),
        }
        metadata = {**(getattr(reply, "response_metadata", None) or {}), "persona": tag}
        if route is not None:
            metadata["route"] = route.to_metadata()
        reply = reply.model_copy(update={"response_metadata": metadata})
        return {"messages": [reply]}

    def _mbr_model(self, model: Any, n: int) -> Any:
        """``model`` with MBR decoding over ``n`` candidates, built once per (model, n):
        building it loads and checks every preference model."""
        from persona_plugin.chat_models.mbr import MBRChatModel
        from persona_plugin.preferences.hub import PreferenceHub

        key = (id(model), n)
        if key not in self._mbr_models:
            if self.preference_hub is None:
                self.preference_hub = PreferenceHub.from_settings()
            self._mbr_models[key] = MBRChatModel(base=model, n=n, hub=self.preference_hub)
        return self._mbr_models[key]

    def _mode(self, config: RunnableConfig) -> str:
        mode = _configurable(config).get("reflection", self.reflection)
        if mode not in MODES:
            raise PersonaConfigError(f"reflection mode {mode!r} is not one of {MODES}")
        self._check_queue(mode)
        return mode

    def reflect(self, state: PersonaState, config: RunnableConfig) -> dict[str, Any]:
        mode = self._mode(config)
        if mode == "off":
            return {}
        if mode in QUEUED_MODES:
            # queued in the interaction log by save, before the reply is returned: the
            # worker (background) or the n-th turn (every_n_turns) reflects on it
            return {"reflection": {"queued": True}}
        turn = ReflectionTurn(
            turn_id=state["turn_id"],
            user=state["messages"][-2].text,
            assistant=state["messages"][-1].text,
        )
        # the recent turns live in the thread, not in the persona: a version is a change
        outcome = self.reflect_job(state["user_id"], [turn])
        return {"reflection": outcome.model_dump() if outcome else None}

    def save(self, state: PersonaState, config: RunnableConfig) -> dict[str, Any]:
        user_id, turn_id = state["user_id"], state["turn_id"]
        user_msg, reply = state["messages"][-2], state["messages"][-1]
        replied = bool(reply.text.strip()) or bool(getattr(reply, "tool_calls", None))
        if self.memory is not None and not replied:
            # an empty reply is no answer: recalled later, it would read as one
            log.info("turn %s of %s had an empty reply; not remembered", turn_id, user_id)
        # recalled turns reach later prompts, so the guard reads them as it reads the
        # persona: instructions are withheld, not remembered (nor logged); read once for both
        user_text, reply_text = guarded_turn(user_msg.text, reply.text) if replied else ("", "")
        if self.memory is not None and replied:
            self.memory.remember(
                user_id,
                exchange_turns(
                    turn_id,
                    user_text,
                    reply_text or "(a tool call)",
                    session=_configurable(config).get("thread_id"),
                ),
            )
        mode = self._mode(config)
        queue = {"background": PENDING, "every_n_turns": BATCHED}.get(mode)
        if self.interactions is not None and replied:
            done = state.get("reflection") or {}
            self._log_turn(
                state,
                config,
                user_text,
                reply_text,
                reply,
                reflection=queue
                or (DONE if done.get("version") and not done.get("error") else None),
                reflected_version=done.get("version") if not queue else None,
            )
        # cold start with no reflection yet: the user gets version 1 now
        self.store.create_first(
            user_id, self._persona(state), memory=self.memory, reason=f"turn {turn_id}"
        )
        self._personas.pop((user_id, turn_id), None)
        update: dict[str, Any] = {"persona_exists": True}
        if replied and queue == PENDING:
            self.background.notify()
        elif replied and queue == BATCHED and self._batch_full(user_id):
            outcome = self.background.reflect_user(
                user_id, states=(BATCHED,), limit=self.every_n_turns
            )
            update["reflection"] = outcome.model_dump() if outcome else None
        return update

    def _batch_full(self, user_id: str) -> bool:
        """Whether the user's turns waiting for every-n-turns reflection number n."""
        waiting = self.background.log.count_queued(user_id, states=(BATCHED,))
        return waiting >= self.every_n_turns

    def _log_turn(
        self,
        state: PersonaState,
        config: RunnableConfig,
        said: str,
        answered: str,
        reply: Any,
        **queue: Any,
    ) -> None:
        """The turn into the interaction log, as the guard let memory keep it (``said``,
        ``answered``), with what produced ``reply`` (the persona version, model, adapters,
        MBR candidates, tokens)."""
        metadata = getattr(reply, "response_metadata", None) or {}
        tag = metadata.get("persona") or {}
        details: dict[str, Any] = {}
        for key in ("adapters", "retrieved", "mbr", "backend"):
            if metadata.get(key) is not None:
                details[key] = metadata[key]
        if getattr(reply, "usage_metadata", None):
            details["tokens"] = dict(reply.usage_metadata)
        configurable = _configurable(config)
        try:
            self.interactions.record_turn(
                state["user_id"],
                state["turn_id"],
                user_text=said,
                reply_text=answered or "(a tool call)",
                thread_id=configurable.get("thread_id"),
                persona_version=tag.get("persona_version"),
                model=(metadata.get("route") or {}).get("model")
                or configurable.get("model")
                or type(self.chat_model).__name__,
                latency_ms=tag.get("latency_ms"),
                details=json.loads(json.dumps(details, default=str)),
                **queue,
            )
        except Exception as exc:  # the log must not cost the user the reply
            log.warning("turn %s of %s not logged: %s", state["turn_id"], state["user_id"], exc)

    # -- the app's handle -----------------------------------------------------------------

    def forget(self, user_id: str) -> Forgotten:
        """Delete every trace of ``user_id``: persona versions, long-term memory, the
        checkpoints of their threads, cached retrievals, queued reflection (see
        :func:`~persona_plugin.privacy.forget_user`)."""
        return forget_user(
            user_id,
            store=self.store,
            memory=self.memory,
            checkpointer=self._checkpointer,
            retrievers=self._retrievers(),
            interactions=self.interactions,
            owned=self._owned(),
        )

    def rollback(self, user_id: str, to_version: int, *, reason: str = "") -> VersionRecord:
        """Restore ``to_version`` as a new version and withdraw the facts the rolled-back
        reflections stored (see :func:`~persona_plugin.reflection.apply.roll_back`)."""
        return roll_back(user_id, to_version, store=self.store, memory=self.memory, reason=reason)

    def export(self, user_id: str) -> dict[str, Any]:
        """Everything kept about ``user_id`` (see :func:`~persona_plugin.privacy.export_user`)."""
        return export_user(
            user_id,
            store=self.store,
            memory=self.memory,
            checkpointer=self._checkpointer,
            interactions=self.interactions,
            owned=self._owned(),
        )

    def _owned(self) -> Any:
        """Where users' own models are: the preference hub's (None: the settings')."""
        hub = self.preference_hub
        return hub.owned if hub is not None and hasattr(hub, "owned") else None

    def _retrievers(self) -> list[Any]:
        """The adapter and preference retrievers of every model this graph serves (they
        cache results per persona version), and backends that keep a user's own adapter
        loaded: each ``forget``s the user."""
        found: dict[int, Any] = {}
        models = [self.chat_model, *self.models.values(), *self._mbr_models.values()]
        while models:
            model = models.pop()
            while isinstance(model, RunnableBinding):
                model = model.bound
            retriever = getattr(model, "retriever", None)
            if retriever is not None and hasattr(retriever, "forget"):
                found[id(retriever)] = retriever
            backend = getattr(model, "backend", None)  # holds the user's own adapter loaded
            if backend is not None and hasattr(backend, "forget"):
                found[id(backend)] = backend
            base = getattr(model, "base", None)  # MBR over a multi-LoRA model
            if base is not None:
                models.append(base)
        return list(found.values())

    def close(self, timeout: float | None = None) -> bool:
        """Drain background reflections and stop their worker (call on shutdown). A graph
        whose reflection is off leaves what is queued for a worker that reflects."""
        if self.background is None:
            return True
        if self.reflection == "off":
            self.background.stop(timeout)
            return True
        return self.background.close(timeout)


def build_persona_graph(
    chat_model: Any,
    *,
    store: PersonaStore,
    memory: Any = None,
    checkpointer: Any = None,
    **options: Any,
) -> PersonaGraph:
    """The persona graph (a :class:`PersonaGraph`); ``options`` go to its constructor.

    Call ``graph.close()`` on shutdown (it drains background reflections) and
    ``graph.forget(user_id)`` to delete a user; ``graph.compiled`` is the LangGraph graph.
    """
    nodes = PersonaGraph(chat_model, store=store, memory=memory, **options)
    nodes.has_checkpointer = checkpointer is not None
    builder = StateGraph(
        PersonaState,
        context_schema=PersonaContext,
        input_schema=PersonaInput,
        output_schema=PersonaOutput,
    )
    order = ["load_persona", "recall", "assemble", "generate", "reflect", "save"]
    for name in order:
        builder.add_node(name, getattr(nodes, name))
    builder.add_edge(START, order[0])
    for first, second in itertools.pairwise(order):
        builder.add_edge(first, second)
    builder.add_edge(order[-1], END)
    nodes.compiled = builder.compile(checkpointer=checkpointer, name="persona_chat")
    return nodes


def _redacted_url(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        import sqlalchemy as sa

        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: show no part of it that may be secret
        return url.split("@")[-1]


def make_checkpointer(url: str) -> Any:
    """LangGraph's SQLite checkpointer for ``sqlite:///path``, Postgres's for postgresql URLs."""
    if url.startswith("sqlite:///"):
        from langgraph.checkpoint.sqlite import SqliteSaver

        path = Path(url.removeprefix("sqlite:///")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteSaver(sqlite3.connect(str(path), check_same_thread=False))
    if url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        import psycopg
        from langgraph.checkpoint.postgres import PostgresSaver
        from psycopg.rows import dict_row

        conninfo = url.replace("postgresql+psycopg://", "postgresql://")
        try:
            conn = psycopg.connect(
                conninfo, autocommit=True, prepare_threshold=0, row_factory=dict_row
            )
            saver = PostgresSaver(conn)
            saver.setup()
        except psycopg.Error as exc:
            where = _redacted_url(url)
            raise PersonaConfigError(
                f"cannot open the checkpointer at {where}: {exc}. Check "
                "PERSONA_CHECKPOINTER_URL and that the database is reachable."
            ) from None
        return saver
    raise PersonaConfigError(
        f"checkpointer URL {url!r} is not supported: use sqlite:///path or postgresql://..."
    )


def build_persona_graph_from_settings(
    settings: Settings | None = None, *, checkpointer: Any = None, chat_model: Any = None
) -> PersonaGraph:
    """The persona graph on the configured store, memory and chat model."""
    from persona_plugin.chat_models.registry import resolve_chat_model
    from persona_plugin.memory.long_term import LongTermMemory
    from persona_plugin.preferences.hub import PreferenceHub

    settings = settings or Settings.load()
    model = chat_model or resolve_chat_model(settings.chat_model, settings)
    store = PersonaStore.from_settings(settings)
    interactions = (
        InteractionLog.on(store, retention_days=settings.log_retention_days)
        if settings.log
        else None
    )
    return build_persona_graph(
        model,
        store=store,
        interactions=interactions,
        memory=LongTermMemory.from_settings(settings),
        checkpointer=checkpointer,
        assembler=PromptAssembler.from_settings(settings, token_counter=token_counter_for(model)),
        reflection=settings.reflection,
        debounce_s=settings.reflection_debounce_s,
        short_term_window=settings.short_term_window,
        history_tokens=settings.history_tokens,
        mbr_n=settings.mbr_n,
        preference_hub=PreferenceHub.from_settings(settings) if settings.mbr_n else None,
    )
