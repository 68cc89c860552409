"""LangChain's standard test suites (langchain-tests) on the project's chat models.

:class:`MultiLoraChatModel` runs on the local backend: SmolLM2-135M-Instruct on CPU, served
through a bundled LoRA adapter, replies of a few greedy tokens. The suites build a model per
test from ``chat_model_params``, so the loaded backend is one object shared by all of them.
:class:`MBRChatModel` runs over the echo model with two candidates, chosen by the bundled
preference models. The unit suites build the models only (the local backend loads nothing
until a request).

Capability flags turn off what the models do not offer: neither binds tools (the backends
take text messages; MBR chooses among text candidates), so tool calling and structured
output are off, and so are JSON mode, images, PDFs, audio and a per-call ``model=`` (the
local backend serves one base model; a call chooses adapters, not a model). The tests
after the suites check what the suites pass without seeing: that the standard init
parameters ``max_tokens`` and ``stop`` take effect, and what MBR's usage counts.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from persona_plugin.chat_models.mbr import MBRChatModel
from persona_plugin.chat_models.multi_lora import MultiLoraChatModel
from persona_plugin.chat_models.registry import EchoChatModel
from persona_plugin.preferences.hub import PreferenceHub
from tests.paths import MODEL_CACHE

#: where the suite's SmolLM2 conversion is kept (as in test_graph_local.py)
MODELS = MODEL_CACHE / "models"
#: the bundled adapter that serves the multi-LoRA suite's replies
ADAPTER = "concise"
#: new tokens per reply: enough for a non-empty answer, few enough for 2 slow cores
MAX_NEW_TOKENS = 8


@functools.cache
def local_backend() -> Any:
    """The loaded local backend on the bundled LoRA cards, once per test session."""
    import tempfile

    from persona_plugin.backends.local import LocalBackend
    from persona_plugin.lora.hub import BUNDLED_LORA_DIR, LoraHub

    hub = LoraHub(tempfile.mkdtemp(prefix="persona-std-lora-"), bundled=(BUNDLED_LORA_DIR,))
    return LocalBackend(lora_hub=hub, cache_dir=MODELS).load()


@functools.cache
def preference_hub() -> PreferenceHub:
    """The bundled preference models (their embedder loads on the first request)."""
    return PreferenceHub(bundled=True)


class NoToolsFlags:
    """The capability flags both models share (see the module docstring)."""

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False


# -- MultiLoraChatModel --------------------------------------------------------------------


class TestMultiLoraUnit(NoToolsFlags, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[MultiLoraChatModel]:
        return MultiLoraChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        from persona_plugin.backends.local import LocalBackend

        return {"backend": LocalBackend(cache_dir=MODELS), "adapters": [(ADAPTER, 1.0)]}


# the suite's async tests carry no marker, pytest-asyncio runs in strict mode here, and the
# suite forbids marking them by overriding: the class is marked (as in memory/test_retriever)
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test .* is marked with '@pytest.mark.asyncio'")
class TestMultiLoraIntegration(NoToolsFlags, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[MultiLoraChatModel]:
        return MultiLoraChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "backend": local_backend(),
            "adapters": [(ADAPTER, 1.0)],
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": None,  # greedy: the same reply on every run
        }


# -- MBRChatModel --------------------------------------------------------------------------


def mbr_params() -> dict[str, Any]:
    return {"base": EchoChatModel(), "n": 2, "hub": preference_hub()}


class TestMBRUnit(NoToolsFlags, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[MBRChatModel]:
        return MBRChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return mbr_params()


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test .* is marked with '@pytest.mark.asyncio'")
class TestMBRIntegration(NoToolsFlags, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[MBRChatModel]:
        return MBRChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return mbr_params()


# -- what the suites pass without checking -----------------------------------------------

QUESTION = "What is the capital of France?"


def test_max_tokens_and_stop_given_at_init_take_effect() -> None:
    backend = local_backend()
    short = MultiLoraChatModel(backend=backend, max_tokens=3, temperature=None).invoke(QUESTION)
    assert short.usage_metadata is not None and short.usage_metadata["output_tokens"] <= 3
    assert short.response_metadata["finish_reason"] == "length"

    full = MultiLoraChatModel(backend=backend, max_new_tokens=12).invoke(QUESTION).text
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    cut = MultiLoraChatModel(backend=backend, max_new_tokens=12, stop=[stop]).invoke(QUESTION)
    assert cut.text == full[: full.index(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"


def test_mbr_usage_counts_every_candidate() -> None:
    echo = EchoChatModel().invoke(QUESTION).usage_metadata
    reply = MBRChatModel(**mbr_params()).invoke(QUESTION)
    assert echo is not None and reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] == 2 * echo["output_tokens"]
    assert reply.response_metadata["model_name"] == "persona-echo"


def test_mbr_over_the_local_model_reports_usage_whichever_candidate_wins() -> None:
    # a multi-LoRA base reports the request's usage on its first candidate: a later
    # candidate's reply must carry it too
    base = MultiLoraChatModel(backend=local_backend(), max_new_tokens=MAX_NEW_TOKENS)
    model = MBRChatModel(base=base, n=2, hub=preference_hub(), seed=3)
    replies = [model.invoke(QUESTION, preferences={"brevity": sign}) for sign in (1, -1)]
    assert {r.response_metadata["mbr"]["chosen"] for r in replies} == {0, 1}
    usages = [r.usage_metadata for r in replies]
    assert usages[0] is not None and usages[0] == usages[1]


def test_mbr_passes_the_stop_given_at_init_to_its_base() -> None:
    base = MultiLoraChatModel(backend=local_backend(), max_new_tokens=12, temperature=None)
    greedy = {"base": base, "n": 1, "hub": preference_hub(), "temperature": 0}
    full = MBRChatModel(**greedy).invoke(QUESTION).text
    stop = " " + full.split()[2]
    cut = MBRChatModel(**greedy, stop=[stop]).invoke(QUESTION).text
    assert cut == full[: full.index(stop)]
