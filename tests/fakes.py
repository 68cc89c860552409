"""The suite's shared test fakes: chat models that script an LLM's answers.

One copy each, imported by every test that needs one (``from tests.fakes import ...``),
as LangGraph prebuilt's tests share ``tests/model.py``. LangChain's own fakes
(``FakeListChatModel``, ``GenericFakeChatModel``) are used where they suffice; these add
what they lack: recording the messages of each call, answers that depend on the prompt,
exceptions on cue, tool calling, and thread safety (MBR and batches call from threads).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr


class ScriptedChatModel(BaseChatModel):
    """Answers from ``script``, then ``default``; records the messages of every call.

    An answer is text, an AIMessage, an exception to raise, or a callable of the messages.
    """

    script: list[Any] = Field(default_factory=list)
    default: Any = None
    calls: list[list[BaseMessage]] = Field(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        with self._lock:
            self.calls.append(list(messages))
            item = self.script.pop(0) if self.script else self.default
        assert item is not None, "the script ran out"
        if callable(item):
            item = item(messages)
        if isinstance(item, BaseException):
            raise item
        message = item if isinstance(item, AIMessage) else AIMessage(content=item)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def system_texts(self) -> list[str]:
        """The system message of every call, in order."""
        return [
            next((m.text for m in call if isinstance(m, SystemMessage)), "") for call in self.calls
        ]


class ToolCallingChatModel(ScriptedChatModel):
    """A scripted model that supports tool calling, as ``with_structured_output`` needs;
    records what each ``bind_tools`` bound."""

    binds: list[dict[str, Any]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, *, tool_choice: Any = None, **kwargs: Any) -> Any:
        formatted = [convert_to_openai_tool(t) for t in tools]
        self.binds.append({"tools": formatted, "tool_choice": tool_choice})
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)


class CyclingChatModel(BaseChatModel):
    """Answers with ``replies`` in turn, round and round; ``calls`` counts the calls.
    Thread-safe: MBR asks for its candidates from threads."""

    replies: list[str]
    calls: int = 0
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        with self._lock:
            text = self.replies[self.calls % len(self.replies)]
            self.calls += 1
        message = AIMessage(content=text, response_metadata={"scripted": True})
        return ChatResult(generations=[ChatGeneration(message=message)])


_TURN = re.compile(r'\[turn ([^\]]+)\]\nuser: ("(?:[^"\\]|\\.)*")')


class ScriptedReflection(BaseChatModel):
    """A reflection stand-in: "I love X" in a turn becomes interest X, cited to that turn
    (and a memory "The user loves X."), in the reflection's JSON answer."""

    @property
    def _llm_type(self) -> str:
        return "scripted-reflection"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **_: Any
    ) -> ChatResult:
        operations, memories = [], []
        for turn_id, quoted in _TURN.findall(messages[-1].text):
            for thing in re.findall(r"I love (\w+)", json.loads(quoted)):
                operations.append(
                    {
                        "op": "append",
                        "path": "personality.interests",
                        "value": thing,
                        "confidence": 0.9,
                        "evidence": [turn_id],
                    }
                )
                memories.append({"text": f"The user loves {thing}.", "evidence": [turn_id]})
        answer = {
            "loss": {"revealed": [m["text"] for m in memories], "missed": [], "score": 0.8},
            "gradients": [],
            "operations": operations,
            "memories": memories,
        }
        message = AIMessage(content=json.dumps(answer))
        return ChatResult(generations=[ChatGeneration(message=message)])


class TurnReflector:
    """A reflection model (what ``reflect_and_save`` needs) that learns one interest per
    turn, ``topic <turn id>``, and records every call: in ``calls`` and, with
    ``record_to``, as a line of turn ids appended (and fsynced) to that file, so that
    calls made in other processes, even killed ones, can be counted. ``delay``: seconds
    each call takes; ``fail_for``: users whose reflection raises."""

    min_confidence = 0.6

    def __init__(
        self, record_to: Any = None, *, delay: float = 0.0, fail_for: tuple[str, ...] = ()
    ) -> None:
        from persona_plugin.persona import DEFAULT_LIMITS

        self.limits = DEFAULT_LIMITS
        self.record_to = record_to
        self.delay = delay
        self.fail_for = fail_for
        self.calls: list[list[Any]] = []
        self._lock = threading.Lock()

    def call(self, persona: Any, turns: Any) -> Any:
        import os
        import time

        from persona_plugin.reflection.optimizer import Operation
        from persona_plugin.reflection.types import LanguageLoss, ReflectionCall, ReflectionOutput

        with self._lock:
            self.calls.append(list(turns))
            if self.record_to is not None:
                with open(self.record_to, "a", encoding="utf-8") as out:
                    out.write(json.dumps([persona.meta.user_id, [t.turn_id for t in turns]]) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
        time.sleep(self.delay)
        if persona.meta.user_id in self.fail_for:
            raise RuntimeError("reflection model down")
        operations = [
            Operation(
                op="append",
                path="personality.interests",
                value=f"topic {t.turn_id}",
                confidence=0.9,
                evidence=[t.turn_id],
            )
            for t in turns
        ]
        output = ReflectionOutput(loss=LanguageLoss(score=0.5), operations=operations)
        return ReflectionCall(output=output, attempts=1)


class FeedbackReflection:
    """A scripted reflection model: for each feedback line of its prompt it answers what
    ``plan(line)`` returns (operations and memories, citing the feedback and its turn)."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.prompts: list[str] = []

    def __call__(self, messages: list[BaseMessage]) -> AIMessage:
        prompt = messages[-1].text
        self.prompts.append(prompt)
        ops, memories = [], []
        for fb, turn, line in re.findall(r"\[feedback (fb\d+) on turn ([^\]]+)\] (.*)", prompt):
            step = self.plan(line) or {}
            cite = step.get("evidence", [fb, turn])
            ops += [{"confidence": 0.9, "evidence": cite, **o} for o in step.get("ops", [])]
            memories += [{"text": m, "evidence": cite} for m in step.get("memories", [])]
        answer = {
            "loss": {"revealed": ["feedback"], "missed": [], "score": 0.4},
            "gradients": [],
            "operations": ops,
            "memories": memories,
        }
        return AIMessage(content=json.dumps(answer))
