"""What the persona-aware chat models share: the ``persona=`` argument and config lifting.

:class:`~persona_plugin.chat_models.multi_lora.MultiLoraChatModel` and
:class:`~persona_plugin.chat_models.mbr.MBRChatModel` both take a persona (or a mixture) per
call. Inside a LangGraph graph a node cannot pass call kwargs, but the config travels
everywhere. So :class:`LiftsConfigurable`, a mixin, turns the ``config["configurable"]`` keys
a model names into call kwargs (an explicit kwarg wins). :func:`coerce_persona` accepts a
:class:`~persona_plugin.persona.Persona`, its dict or plain text, and
:func:`content_text` reads the text of a message's content, whether a string or blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from langchain_core.runnables import RunnableBinding, RunnableConfig

from persona_plugin.errors import PersonaConfigError
from persona_plugin.persona import Persona

#: the tag (LangGraph's ``TAG_NOSTREAM``) on a model call made inside a graph node that is
#: not the reply: a reflection, MBR's candidates. ``stream_mode="messages"`` skips it, so
#: clients stream only the answer.
NOSTREAM = "nostream"


def takes_persona(model: Any) -> bool:
    """Whether ``model`` chooses what serves a call from a ``persona=`` argument (its
    ``takes_persona`` attribute: true for the multi-LoRA and MBR chat models), looking
    through bindings (``model.bind(...)``)."""
    while isinstance(model, RunnableBinding):
        model = model.bound
    return bool(getattr(model, "takes_persona", False))


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or its text blocks joined."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def coerce_persona(value: Any) -> Persona | str | None:
    """A ``persona=`` argument as a Persona (from a dict), text, or None."""
    if value is None or isinstance(value, Persona | str):
        return value
    if isinstance(value, Mapping):
        return Persona.from_dict(value, source="persona argument")
    raise PersonaConfigError(
        f"persona must be a Persona, a dict or text, not {type(value).__name__}."
    )


class LiftsConfigurable:
    """A chat-model mixin: the ``config["configurable"]`` keys named in
    ``configurable_keys`` become call kwargs (an explicit kwarg wins), so a persona or a
    mixture can travel in a graph's config."""

    configurable_keys: ClassVar[tuple[str, ...]] = ()

    def _lift(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        configurable = (config or {}).get("configurable") or {}
        for key in self.configurable_keys:
            if key in configurable and key not in kwargs:
                kwargs[key] = configurable[key]
        return kwargs

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return super().invoke(input, config, **self._lift(config, kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await super().ainvoke(input, config, **self._lift(config, kwargs))

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return super().stream(input, config, **self._lift(config, kwargs))

    def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return super().astream(input, config, **self._lift(config, kwargs))
