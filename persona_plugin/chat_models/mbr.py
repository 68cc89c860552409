"""Minimum-Bayes-risk (MBR) decoding over preference models.

Sample ``n`` candidate replies, score each with the preference models the persona
retrieved (:class:`PreferenceRetriever`), and return the candidate with the highest

    utility_j = sum_i w_i * norm(score_i)_j  +  consensus_weight * norm(consensus)_j

where ``w_i`` are the mixture's signed weights (``sum |w_i| = 1``; a negative weight
prefers low scores), ``norm`` rescales one model's scores over the candidates (``minmax``
to [0, 1], ``zscore``, or ``rank``) so that models on different scales add up, and
``consensus_j`` is classic MBR's expected similarity of candidate ``j`` to the others
(mean cosine of the sentence embeddings).

:class:`MBRSelector` does the choosing, for one request or a batch where each request
carries its own mixture. :class:`MBRChatModel` wraps any LangChain chat model: it draws the
candidates (one call with ``n`` from a :class:`MultiLoraChatModel`, else ``n`` calls), picks,
and returns the chosen reply with ``response_metadata["mbr"]``: the candidates, every
model's scores, the weights, the utilities and the chosen index. Turning it on in a graph
is one line: ``model = MBRChatModel(base=model, n=8)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import add_usage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from persona_plugin.chat_models.persona_aware import NOSTREAM, LiftsConfigurable, coerce_persona
from persona_plugin.errors import PersonaConfigError
from persona_plugin.persona import Persona, user_of
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.mbr import MBRResult, MBRSelector
from persona_plugin.preferences.retrieval import (
    PreferenceMixture,
    PreferenceRetriever,
    normalize_preferences,
)

#: keys of ``config["configurable"]`` this model reads
CONFIGURABLE_KEYS = ("persona", "preferences")


def describe_mbr(metadata: Mapping[str, Any]) -> str:
    """One line for a chat UI or a log: which preference models were used, with their
    weights, and the chosen candidate's score under each. ``metadata``: a reply's
    ``response_metadata`` (or its ``"mbr"`` entry); empty when the reply was not MBR's."""
    mbr = metadata.get("mbr", metadata)
    if "chosen" not in mbr:
        return ""
    chosen, n = mbr["chosen"], mbr.get("n", len(mbr.get("candidates", ())))
    scores = mbr.get("chosen_scores", {})
    models = ", ".join(
        f"{m} {w:+.2f} (score {scores[m]:.2f})" if m in scores else f"{m} {w:+.2f}"
        for m, w in mbr.get("weights", {}).items()
    )
    line = f"MBR: candidate {chosen + 1} of {n}; preferences: {models or 'none'}"
    if mbr.get("consensus_weight"):
        line += f"; consensus weight {mbr['consensus_weight']:g}"
    return line


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(
        block if isinstance(block, str) else str(block.get("text", ""))
        for block in content or []
        if isinstance(block, str) or (isinstance(block, Mapping) and block.get("type") == "text")
    )


class MBRChatModel(LiftsConfigurable, BaseChatModel):
    """Any chat model with MBR decoding over the persona's preference models.

    Per call: the persona comes from ``persona=`` (or ``config["configurable"]["persona"]``,
    or the ``persona`` field); the mixture from ``preferences=`` (or the configurable key,
    or the ``preferences`` field), else from the retriever given the persona and the last
    user message. ``statements=``: the user's own words recalled for this turn (what the
    persona graph's memory recalled of their messages), which a persona-conditioned
    preference model (``scorer: persona``) reads beside the persona. ``n`` candidates are
    drawn from ``base``: a :class:`MultiLoraChatModel` draws them in one request (``n``, sampled at
    ``temperature``, the persona passed on for its own LoRA retrieval); any other chat model
    is called ``n`` times (``use_n=True`` passes ``n`` instead, e.g. to ``ChatOpenAI``).
    The reply is the chosen candidate's message with ``response_metadata["mbr"]``; its
    usage is every candidate's, summed (what the call cost). A stream yields it as one
    chunk once chosen: the candidates themselves never stream.

    The hub's scorers are loaded when the model is built, so a broken card fails there,
    not on the first request.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    configurable_keys: ClassVar[tuple[str, ...]] = CONFIGURABLE_KEYS
    #: the persona graph hands ``persona=`` to models that say so
    takes_persona: bool = True

    base: Any = Field(description="the chat model that samples the candidates")
    n: int = Field(4, description="candidates per request")
    hub: Any = Field(None, description="PreferenceHub; default: from settings")
    retriever: Any = Field(None, description="PreferenceRetriever; default: over the hub")
    preferences: Any = Field(None, description="a fixed mixture {id: weight} (no retrieval)")
    persona: Any = Field(None, description="default persona (Persona, dict or text)")
    consensus_weight: float = 0.0
    normalization: str = "minmax"
    temperature: float = Field(0.8, description="sampling temperature for a multi-LoRA base")
    seed: int | None = None
    use_n: bool | None = Field(None, description="ask base for n at once (None: auto)")
    stop: list[str] | None = Field(None, description="stop strings passed to base on every call")
    selector: Any = Field(None, exclude=True)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        # after pydantic's validation, so that a broken card's error reaches the caller as
        # is, not wrapped in a pydantic ValidationError
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= 64:
            raise PersonaConfigError(f"MBR n must be an integer from 1 to 64, not {self.n!r}.")
        if self.hub is None:
            self.hub = PreferenceHub.from_settings()
        if isinstance(self.hub, PreferenceHub):
            self.hub.load()  # a missing or incompatible model fails here, not mid-request
        if self.retriever is None and isinstance(self.hub, PreferenceHub):
            self.retriever = PreferenceRetriever(self.hub)
        if self.preferences is not None:
            self.preferences = normalize_preferences(self.preferences)
        self.selector = MBRSelector(
            self.hub,
            consensus_weight=self.consensus_weight,
            normalization=self.normalization,  # type: ignore[arg-type]
        )

    @property
    def _llm_type(self) -> str:
        return "persona-mbr"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"base": getattr(self.base, "_llm_type", type(self.base).__name__), "n": self.n}

    def _base_ls_params(self) -> dict[str, Any]:
        ls_params = getattr(self.base, "_get_ls_params", None)
        return dict(ls_params()) if callable(ls_params) else {}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """What a trace records: base's provider and model, whose n calls the reply's usage
        sums, so a cost computed from them is what the call cost."""
        base = self._base_ls_params()
        params = LangSmithParams(
            ls_provider=base.get("ls_provider") or "persona",
            ls_model_name=kwargs.get("model") or self._model_name(base),
            ls_model_type="chat",
        )
        for key in ("ls_temperature", "ls_max_tokens"):
            if base.get(key) is not None:
                params[key] = base[key]  # type: ignore[literal-required]
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or ())
        return params

    def _model_name(self, base_ls_params: Mapping[str, Any] | None = None) -> str:
        base = self._base_ls_params() if base_ls_params is None else base_ls_params
        return str(base.get("ls_model_name") or getattr(self.base, "_llm_type", "mbr"))

    def _stops(self, stop: list[str] | None) -> list[str] | None:
        return [*(self.stop or ()), *(stop or ())] or None

    # -- one request ------------------------------------------------------------------------

    def _plan(
        self, messages: Sequence[BaseMessage], kwargs: dict[str, Any]
    ) -> tuple[str, Persona | str | None, Any, dict[str, Any]]:
        """The prompt, the persona, the mixture (and how it was found), and base's kwargs."""
        persona = coerce_persona(kwargs.pop("persona", self.persona))
        statements = [str(s) for s in kwargs.pop("statements", None) or () if str(s).strip()]
        given = kwargs.pop("preferences", None)
        n = kwargs.pop("n", self.n)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise PersonaConfigError(f"MBR n must be an integer from 1 to 64, not {n!r}.")
        user = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)
        prompt = _text(user.content) if user is not None else ""
        info: dict[str, Any] = {"n": n}
        if given is not None:
            mixture: Any = normalize_preferences(given)
            info["source"] = "given"
        elif self.preferences is not None:
            mixture = self.preferences
            info["source"] = "fixed"
        elif self.retriever is not None and (persona is not None or statements):
            retrieved: PreferenceMixture = self.retriever.retrieve(
                persona, prompt, statements=statements
            )
            mixture = retrieved
            info["source"] = "retrieved"
            info["retrieved"] = [
                [m.id, round(m.weight, 4), round(m.score, 4)] for m in retrieved.models
            ]
        else:
            mixture, info["source"] = (), "none"
        return prompt, persona, mixture, {"info": info, "rest": kwargs, "statements": statements}

    def _select(
        self, prompt: str, texts: list[str], persona: Any, mixture: Any, plan: dict[str, Any]
    ) -> MBRResult:
        return self.selector.select(
            prompt,
            texts,
            mixture,
            user_id=user_of(persona),
            persona=persona if isinstance(persona, Persona) else None,
            statements=plan["statements"],
        )

    def _multi_lora(self) -> bool:
        if self.use_n is not None:
            return self.use_n
        from persona_plugin.chat_models.multi_lora import MultiLoraChatModel

        return isinstance(self.base, MultiLoraChatModel)

    def _base_kwargs(self, persona: Any, n: int, rest: dict[str, Any]) -> dict[str, Any]:
        from persona_plugin.chat_models.multi_lora import MultiLoraChatModel

        kwargs = dict(rest)
        kwargs["n"] = n
        if isinstance(self.base, MultiLoraChatModel):
            kwargs.setdefault("temperature", self.temperature)
            if self.seed is not None:
                kwargs.setdefault("seed", self.seed)
            if persona is not None:
                kwargs.setdefault("persona", persona)
        return kwargs

    def _finish(
        self, generations: list[Any], result: MBRResult, info: dict[str, Any]
    ) -> ChatResult:
        messages = [g.message if hasattr(g, "message") else g for g in generations]
        message = messages[result.chosen]
        metadata = dict(getattr(message, "response_metadata", {}) or {})
        metadata.setdefault("model_name", self._model_name())
        metadata["mbr"] = {**info, **result.to_metadata()}
        # the call cost every candidate: a multi-LoRA base reports the request's usage on
        # its first candidate alone, any other base one usage per call
        usage = None
        for candidate in messages:
            usage = add_usage(usage, getattr(candidate, "usage_metadata", None))
        reply = AIMessage(
            content=message.content,
            response_metadata=metadata,
            usage_metadata=usage if usage and usage["total_tokens"] else None,
            id=getattr(message, "id", None),
        )
        return ChatResult(generations=[ChatGeneration(message=reply)])

    @staticmethod
    def _one_chunk(result: ChatResult) -> ChatGenerationChunk:
        # the reply is known only once every candidate is scored: it streams as one chunk
        reply = result.generations[0].message
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=reply.content,
                response_metadata=reply.response_metadata,
                usage_metadata=reply.usage_metadata,  # type: ignore[attr-defined]
                id=reply.id,
                chunk_position="last",
            )
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt, persona, mixture, plan = self._plan(messages, kwargs)
        n = plan["info"]["n"]
        if self._multi_lora():
            out = self.base.generate(
                [messages],
                stop=self._stops(stop),
                tags=[NOSTREAM],
                **self._base_kwargs(persona, n, plan["rest"]),
            )
            generations = list(out.generations[0])
        else:
            # the candidates are not the reply: only the chosen one streams to a client
            generations = self.base.batch(
                [messages] * n, {"tags": [NOSTREAM]}, stop=self._stops(stop), **plan["rest"]
            )
        texts = [
            _text(g.message.content if hasattr(g, "message") else g.content) for g in generations
        ]
        result = self._select(prompt, texts, persona, mixture, plan)
        return self._finish(generations, result, plan["info"])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt, persona, mixture, plan = await asyncio.to_thread(self._plan, messages, kwargs)
        n = plan["info"]["n"]
        if self._multi_lora():
            out = await self.base.agenerate(
                [messages],
                stop=self._stops(stop),
                tags=[NOSTREAM],
                **self._base_kwargs(persona, n, plan["rest"]),
            )
            generations = list(out.generations[0])
        else:
            generations = await self.base.abatch(
                [messages] * n, {"tags": [NOSTREAM]}, stop=self._stops(stop), **plan["rest"]
            )
        texts = [
            _text(g.message.content if hasattr(g, "message") else g.content) for g in generations
        ]
        result = await asyncio.to_thread(self._select, prompt, texts, persona, mixture, plan)
        return self._finish(generations, result, plan["info"])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield self._one_chunk(self._generate(messages, stop, run_manager, **kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        yield self._one_chunk(await self._agenerate(messages, stop, run_manager, **kwargs))
