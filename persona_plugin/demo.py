"""The offline demo: a scripted conversation on the embedded defaults.

It shows what exists so far, end to end: a persona is created in the SQLite store, each
turn goes through :func:`with_persona` around a chat model (LangChain's fake chat model
with scripted replies, until the local model lands), the system prompt that reached the
model is printed, the persona is updated after the turn as a new version, and finally
history, a diff and a rollback are shown.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from persona_plugin.chat import with_persona
from persona_plugin.config import Settings
from persona_plugin.persona import FAQ, Feedback, PatternItem, Persona
from persona_plugin.prompt import PromptAssembler
from persona_plugin.store import PersonaStore

USER = "alice"


class _CaptureSystemPrompt(BaseCallbackHandler):
    """Keeps the system message of the last chat-model call."""

    def __init__(self) -> None:
        self.system = ""

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], **kwargs: Any
    ) -> None:
        first = messages[0][0]
        self.system = first.content if first.type == "system" else ""


def _learn_language(p: Persona) -> None:
    p.demographics.native_language = "Portuguese"
    p.demographics.location = "Lisbon"


def _learn_style(p: Persona) -> None:
    p.preference.style.append("concise")
    p.preference.format.append("bullet points")
    p.memory.feedback.append(Feedback(text="found the first answer too long", turn_id="t2"))


def _learn_pattern(p: Persona) -> None:
    p.pattern.items.append(
        PatternItem(description="plans weekend hikes on Thursdays", evidence=["t3"])
    )
    p.personality.interests.append("hiking")
    p.memory.faq.append(FAQ(question="what is the weather on the coast this weekend?"))


# (user says, scripted reply, what the turn teaches about the user)
SCRIPT: list[tuple[str, str, Callable[[Persona], None]]] = [
    (
        "Hi! I just moved to Lisbon; Portuguese is my first language.",
        "Welcome to Lisbon! How can I help you settle in?",
        _learn_language,
    ),
    (
        "Your answers are too long. Short bullet points, please.",
        "- Understood.\n- Short bullets from now on.",
        _learn_style,
    ),
    (
        "It's Thursday, so I'm planning a hike for Saturday. Any coastal trail ideas?",
        "- Sintra-Cascais coast trail\n- Arrábida ridge walk",
        _learn_pattern,
    ),
]


def run_demo(home: Path | None = None, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    with tempfile.TemporaryDirectory(prefix="persona-demo-") as tmp:
        data_dir = Path(home or tmp).expanduser()
        settings = Settings.load(home=data_dir, store_url=None)
        console.rule("[bold]persona-plugin demo (offline)")
        console.print(f"data directory: {data_dir}  (store: {settings.resolved_store_url})")
        with PersonaStore.from_settings(settings) as store:
            if store.exists(USER):
                store.delete(USER)
            store.create(USER, Persona.new(USER, name="Alice"), reason="demo sign-up")
            replies = [AIMessage(content=reply) for _, reply, _ in SCRIPT]
            model = GenericFakeChatModel(messages=iter(replies))
            capture = _CaptureSystemPrompt()
            chat = with_persona(model, store, assembler=PromptAssembler.from_settings(settings))
            config: Any = {"configurable": {"user_id": USER}, "callbacks": [capture]}
            for turn, (user_says, _reply, learn) in enumerate(SCRIPT, start=1):
                console.rule(f"turn {turn}")
                answer = chat.invoke(user_says, config=config)
                console.print(Panel(Text(capture.system), title="system prompt the model received"))
                console.print(Text(f"user: {user_says}", style="cyan"))
                console.print(Text(f"assistant: {answer.content}", style="magenta"))
                record = store.update(
                    USER, learn, source=f"demo script turn t{turn}", reason="what the turn revealed"
                )
                console.print(f"persona saved as version {record.version}:")
                for change in record.change:
                    console.print(Text(f"  {change.describe()}", style="green"))
            console.rule("history")
            for rec in store.history(USER):
                console.print(f"v{rec.version}  {rec.source:<24} {len(rec.change)} changes")
            latest = store.current_version(USER)
            console.rule(f"diff v1 -> v{latest}")
            for change in store.diff(USER, 1, latest):
                console.print(Text(change.describe(), style="yellow"))
            undone = store.rollback(USER, latest - 1, reason="undo the last turn's update")
            console.rule("rollback")
            console.print(
                f"restored v{latest - 1} as v{undone.version}; {len(undone.change)} changes undone"
            )
            console.print(Panel(Text(store.get(USER).to_yaml()), title="final persona (YAML)"))
        console.print("[bold green]demo finished")
