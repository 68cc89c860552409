"""Chat models by name, for deployable graphs and servers configured from settings.

``PERSONA_CHAT_MODEL`` names the model:

- ``local``: the local model (SmolLM2-135M-Instruct, in-process, offline) with LoRA
  adapters from the hub (the bundled style adapters and ``PERSONA_LORA_DIR``'s), the
  mixture retrieved per call from the persona (:func:`local_chat_model`);
- ``echo``: a deterministic offline stand-in that only acknowledges the user;
- ``provider:model`` (``openai:gpt-4o-mini``, ...): resolved by LangChain's
  ``init_chat_model`` when the ``langchain`` package and the provider's integration are
  installed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from persona_plugin.errors import PersonaConfigError

if TYPE_CHECKING:
    from persona_plugin.backends.local import LocalBackend
    from persona_plugin.chat_models.multi_lora import MultiLoraChatModel
    from persona_plugin.config import Settings

#: the names resolve_chat_model knows besides provider:model
BUILT_IN_MODELS = ("local", "echo")


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


@functools.lru_cache(maxsize=4)
def _shared_local_backend(
    lora_dir: Path, cache_dir: Path | None, owned_root: Path | None = None
) -> LocalBackend:
    # one loaded model per process and hub: the graph and the reflector resolve the model
    # separately, and a second copy of the weights would only cost memory
    from persona_plugin.backends.local import LocalBackend
    from persona_plugin.cards.owned import OwnedCards
    from persona_plugin.lora.hub import BUNDLED_LORA_DIR, LoraHub

    owned = OwnedCards(owned_root) if owned_root is not None else None
    hub = LoraHub(lora_dir, bundled=(BUNDLED_LORA_DIR,), owned=owned)
    return LocalBackend(lora_hub=hub, cache_dir=cache_dir)


def shared_local_backend(settings: Settings | None = None) -> LocalBackend:
    """The process's local backend on the LoRA hub (and users' own adapters) of
    ``settings``: one loaded model, whoever asks (the graph, the reflector, adaptation)."""
    from persona_plugin.cards.owned import OwnedCards
    from persona_plugin.config import Settings

    settings = settings or Settings.load()
    cache_dir = settings.cache_dir / "models" if settings.cache_dir is not None else None
    owned = OwnedCards.from_settings(settings).root
    return _shared_local_backend(settings.resolved_lora_dir, cache_dir, owned)


def local_chat_model(
    settings: Settings | None = None,
    *,
    backend: Any = None,
    top_k: int = 2,
    retrieval_temperature: float = 0.05,
    max_new_tokens: int = 256,
    temperature: float | None = 0.7,
    top_p: float | None = 0.9,
) -> MultiLoraChatModel:
    """The local model as a chat model whose adapters follow the persona.

    A :class:`MultiLoraChatModel` over a :class:`LocalBackend` on the LoRA hub of
    ``settings`` (bundled cards plus ``lora_dir``), with a :class:`LoraRetriever` that
    picks the ``top_k`` adapters for the persona of each call (``persona=`` or
    ``config["configurable"]["persona"]``; the persona graph passes it). Reflection
    adapters are left out: they serve the reflection step, not replies.
    ``retrieval_temperature`` spreads the mixture's weights (low: nearly all on the best
    match). Sampling at ``temperature`` 0.7: greedy decoding makes a 135M model repeat
    itself; pass ``temperature=None`` for deterministic replies.
    """
    from persona_plugin.chat_models.multi_lora import MultiLoraChatModel
    from persona_plugin.lora.retrieval import LoraRetriever

    if backend is None:
        backend = shared_local_backend(settings)
    retriever = LoraRetriever(
        backend.lora_hub,
        top_k=top_k,
        temperature=retrieval_temperature,
        exclude_kinds=("reflection",),
    )
    return MultiLoraChatModel(
        backend=backend,
        retriever=retriever,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
    )


def resolve_chat_model(spec: str, settings: Settings | None = None) -> BaseChatModel:
    """The chat model named by ``spec`` (see the module doc); ``settings`` locate the local
    model's LoRA hub and cache (default: :meth:`Settings.load`)."""
    if spec == "echo":
        return EchoChatModel()
    if spec == "local":
        return local_chat_model(settings)
    if ":" not in spec:
        raise PersonaConfigError(
            f"chat model {spec!r} is not known. Use 'local', 'echo' or 'provider:model', e.g. "
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
