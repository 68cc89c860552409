"""Chat models by name, for deployable graphs and servers configured from settings.

``PERSONA_CHAT_MODEL`` names the model: ``echo`` (the built-in offline stand-in, until
the local model backend lands), or ``provider:model`` (``openai:gpt-4o-mini``, ...),
resolved by LangChain's ``init_chat_model`` when the ``langchain`` package and the
provider's integration are installed.
"""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from persona_plugin.errors import PersonaConfigError


class EchoChatModel(BaseChatModel):
    """An offline, deterministic chat model: acknowledges the last user message.

    It exists so graphs and servers run with nothing installed or reachable; it is not
    a language model. It says how much user information reached it, which makes the
    persona injection visible in demos.
    """

    @property
    def _llm_type(self) -> str:
        return "persona-echo"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **_: Any
    ) -> ChatResult:
        last = next((m for m in reversed(messages) if m.type == "human"), None)
        said = last.text if last is not None else ""
        system = next((m.text for m in messages if m.type == "system"), "")
        facts = sum(1 for line in system.splitlines() if line.startswith("- "))
        reply = f'You said: "{said[:200]}". (echo model; {facts} facts about you in my prompt)'
        message = AIMessage(
            content=reply,
            usage_metadata={
                "input_tokens": sum(len(m.text) for m in messages) // 4,
                "output_tokens": len(reply) // 4,
                "total_tokens": (sum(len(m.text) for m in messages) + len(reply)) // 4,
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


def resolve_chat_model(spec: str) -> BaseChatModel:
    """The chat model named by ``spec`` (see the module doc)."""
    if spec == "echo":
        return EchoChatModel()
    if ":" not in spec:
        raise PersonaConfigError(
            f"chat model {spec!r} is not known. Use 'echo' or 'provider:model', e.g. "
            "'openai:gpt-4o-mini' (set PERSONA_CHAT_MODEL)."
        )
    try:
        from langchain.chat_models import init_chat_model  # type: ignore[import-not-found]
    except ImportError:
        raise PersonaConfigError(
            f"chat model {spec!r} needs the 'langchain' package and the provider's "
            "integration (e.g. pip install langchain langchain-openai)."
        ) from None
    try:
        return init_chat_model(spec)
    except Exception as exc:
        raise PersonaConfigError(f"cannot create chat model {spec!r}: {exc}") from None
