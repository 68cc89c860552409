"""LoRA retrieval: weights, temperature, kind filters, caching, and fast adaptation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from persona_plugin.cards.retrieval import compact_persona_text
from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.errors import PersonaConfigError
from persona_plugin.lora.hub import AdapterCard, LoraHub, parse_card
from persona_plugin.lora.retrieval import LoraRetriever
from persona_plugin.persona import Persona
from persona_plugin.prompt import PromptAssembler

BASE = {"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "rank": 16, "target_modules": ["q_proj"]}


def make_card(id: str, kind: str, description: str, **extra: Any) -> AdapterCard:
    return parse_card({"id": id, "kind": kind, "description": description,
                       "location": f"acme/{id}", **BASE, **extra})  # fmt: skip


CARDS = [
    make_card(
        "formal-concise",
        "style",
        "Answers in a formal, concise, professional register: short, precise sentences.",
        tags=["formal", "concise", "business"],
        sample_inputs=["Draft a short reply to the board about the delay."],
    ),
    make_card(
        "playful-casual",
        "style",
        "Casual, playful and humorous tone, with jokes, slang and emoji.",
        tags=["playful", "casual", "fun"],
        sample_inputs=["lol tell me something fun to do tonight"],
    ),
    make_card(
        "patient-teacher",
        "personality",
        "A patient teacher: long, detailed explanations with worked examples.",
        tags=["detailed", "explanatory"],
    ),
    make_card(
        "cooking",
        "knowledge",
        "Knows recipes, baking, cooking techniques and ingredients.",
        tags=["cooking", "recipes", "food"],
        sample_inputs=["How long should I proof sourdough?"],
    ),
    make_card(
        "hiking",
        "knowledge",
        "Knows hiking trails, outdoor gear, mountains and weather for walks.",
        tags=["hiking", "outdoors"],
    ),
    make_card(
        "reflection-json",
        "reflection",
        "Reflects on the conversation and writes persona updates as JSON.",
        tags=["reflection", "formal", "concise"],
    ),
    make_card(
        "formal-cooking",
        "style",
        "A pre-merged adapter.",
        merge_of=[{"id": "formal-concise", "weight": 1}, {"id": "cooking", "weight": 1}],
    ),
]


class CountingEmbedder:
    """The real offline MiniLM, counting the texts it embeds."""

    def __init__(self, inner: MiniLMEmbeddingFunction) -> None:
        self.inner = inner
        self.texts: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.texts.extend(texts)
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbeddingFunction:
    # the packaged int8 model, not the locally built "fast" one: its quantization moves
    # with the installed libraries, and some retrieval margins here are a few hundredths
    return MiniLMEmbeddingFunction(variant="shipped")


@pytest.fixture
def embedder(minilm: MiniLMEmbeddingFunction) -> CountingEmbedder:
    return CountingEmbedder(minilm)


def persona(version: int, **preference: Any) -> Persona:
    p = Persona.new("alice")
    for key, value in preference.items():
        setattr(p.preference, key, value)
    return p.with_meta(version=version, user_id="alice")


FORMAL = {"style": ["formal", "concise"], "format": ["short paragraphs"]}
PLAYFUL = {"style": ["playful", "casual"], "format": ["emoji welcome"]}


def test_weights_are_a_softmax_over_the_top_k(embedder: CountingEmbedder) -> None:
    retriever = LoraRetriever(CARDS, embedder=embedder, top_k=3, temperature=0.1)
    mixture = retriever.retrieve(persona(1, **FORMAL), "Write to my manager about the delay.")
    weights = [a.weight for a in mixture.adapters]
    scores = [a.score for a in mixture.adapters]
    assert len(mixture) == 3 and sum(weights) == pytest.approx(1.0)
    assert weights == sorted(weights, reverse=True) and scores == sorted(scores, reverse=True)
    expected = np.exp(np.array(scores) / 0.1)
    assert weights == pytest.approx(list(expected / expected.sum()))
    assert mixture.pairs() == [(a.id, a.weight) for a in mixture.adapters]
    assert retriever.retrieve(persona(1, **FORMAL), "x", top_k=50).ids.__len__() == 5


def test_temperature_sharpens_or_flattens(embedder: CountingEmbedder) -> None:
    retriever = LoraRetriever(CARDS, embedder=embedder, top_k=4)
    p = persona(1, **FORMAL)
    sharp = retriever.retrieve(p, "hello", temperature=0.01).adapters
    mild = retriever.retrieve(p, "hello", temperature=0.1).adapters
    flat = retriever.retrieve(p, "hello", temperature=100.0).adapters
    assert [a.id for a in sharp] == [a.id for a in mild] == [a.id for a in flat]
    assert sharp[0].weight > mild[0].weight > flat[0].weight
    assert sharp[0].weight > 0.95
    assert all(a.weight == pytest.approx(0.25, abs=0.01) for a in flat)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(PersonaConfigError, match="temperature"):
            LoraRetriever(CARDS, embedder=embedder, temperature=bad)


def test_a_persona_change_changes_the_mixture(embedder: CountingEmbedder) -> None:
    """Fast adaptation: the next version of the persona retrieves a different mixture."""
    retriever = LoraRetriever(CARDS, embedder=embedder, top_k=3, temperature=0.05)
    request = "Write an update to my team about the project."
    before = retriever.retrieve(persona(1, **FORMAL), request)
    after = retriever.retrieve(persona(2, **PLAYFUL), request)
    assert before.ids[0] == "formal-concise" and after.ids[0] == "playful-casual"
    assert before.pairs() != after.pairs()
    assert dict(after.pairs()).get("formal-concise", 0) < dict(before.pairs())["formal-concise"]
    # and back: the mixture follows the persona, not the order of calls
    again = retriever.retrieve(persona(3, **FORMAL), request)
    assert again.ids == before.ids
    assert [a.weight for a in again.adapters] == pytest.approx([a.weight for a in before.adapters])


def test_the_input_counts_too(embedder: CountingEmbedder) -> None:
    retriever = LoraRetriever(CARDS, embedder=embedder, top_k=2, temperature=0.05)
    p = persona(1, **FORMAL)
    assert "cooking" in retriever.retrieve(p, "What should I bake with sourdough starter?").ids
    assert "hiking" in retriever.retrieve(p, "Which mountain trail for Saturday's walk?").ids
    persona_only = LoraRetriever(CARDS, embedder=embedder, input_weight=0.0, top_k=1)
    assert persona_only.retrieve(p, "What should I bake tonight?").ids == ["formal-concise"]
    input_only = LoraRetriever(CARDS, embedder=embedder, input_weight=1.0, top_k=1)
    assert input_only.retrieve(p, "What should I bake with sourdough?").ids == ["cooking"]


def test_kind_filters(embedder: CountingEmbedder) -> None:
    retriever = LoraRetriever(CARDS, embedder=embedder, top_k=10)
    p = persona(1, **FORMAL)
    default = retriever.retrieve(p, "Update my persona as JSON after reflecting.")
    assert "reflection-json" not in default.ids  # excluded by default
    assert "formal-cooking" not in default.ids  # pre-merged cards are never candidates
    everything = retriever.retrieve(p, "reflect", exclude_kinds=())
    assert "reflection-json" in everything.ids
    knowledge = retriever.retrieve(p, "hello", kinds=["knowledge"])
    assert sorted(knowledge.ids) == ["cooking", "hiking"]
    assert {a.kind for a in knowledge.adapters} == {"knowledge"}
    only = LoraRetriever(CARDS, embedder=embedder, kinds=["reflection"], exclude_kinds=())
    assert only.retrieve(p, "x").ids == ["reflection-json"]
    with pytest.raises(PersonaConfigError, match="unknown adapter kinds"):
        retriever.retrieve(p, "x", kinds=["mood"])
    with pytest.raises(PersonaConfigError, match="unknown adapter kinds"):
        LoraRetriever(CARDS, embedder=embedder, exclude_kinds=["mood"])


def test_allowed_and_base_model_filters(embedder: CountingEmbedder) -> None:
    other_base = make_card("other", "style", "Formal and concise.").model_copy(
        update={"base_model": "other/model"}
    )
    retriever = LoraRetriever(
        [*CARDS, other_base], embedder=embedder, base_model=BASE["base_model"]
    )
    p = persona(1, **FORMAL)
    assert "other" not in retriever.retrieve(p, "x", top_k=10).ids
    allowed = retriever.retrieve(p, "x", top_k=10, allowed={"hiking", "cooking"})
    assert sorted(allowed.ids) == ["cooking", "hiking"]
    assert not retriever.retrieve(p, "x", allowed=set())


def test_results_are_cached_per_persona_version_and_input(embedder: CountingEmbedder) -> None:
    retriever = LoraRetriever(CARDS, embedder=embedder)
    p1 = persona(1, **FORMAL)
    first = retriever.retrieve(p1, "hello")
    embedded = len(embedder.texts)
    # 5 candidate cards (5 descriptions, 3 sample inputs), the persona, the input
    assert not first.cached and embedded == 8 + 1 + 1
    again = retriever.retrieve(p1, "hello")
    assert again.cached and again.pairs() == first.pairs()
    assert len(embedder.texts) == embedded  # nothing embedded again
    # same version, new input: only the input is embedded
    retriever.retrieve(p1, "something else")
    assert embedder.texts[embedded:] == ["something else"]
    # a new version: only the persona text is embedded (cards and inputs are cached)
    count = len(embedder.texts)
    retriever.retrieve(persona(2, **PLAYFUL), "hello")
    assert len(embedder.texts) == count + 1
    info = retriever.cache_info()
    assert info["hits"] == 1 and info["misses"] == 3 and info["cards"] == 5
    retriever.clear_cache()
    assert retriever.cache_info()["results"] == 0


def test_unsaved_personas_are_keyed_by_their_text(embedder: CountingEmbedder) -> None:
    retriever = LoraRetriever(CARDS, embedder=embedder, top_k=1)
    draft = Persona.new("bob")  # version 0: never saved, may change in place
    draft.preference.style = ["formal", "concise"]
    assert retriever.retrieve(draft, "x").ids == ["formal-concise"]
    draft.preference.style = ["playful", "casual", "jokes"]
    assert retriever.retrieve(draft, "x").ids == ["playful-casual"]
    assert retriever.retrieve("I like jokes, slang and emoji", "").ids == ["playful-casual"]


def test_card_embeddings_are_cached_per_card_content(
    tmp_path: Path, embedder: CountingEmbedder
) -> None:
    hub = LoraHub(tmp_path)
    for card in CARDS[:3]:
        hub.add(card)
    retriever = LoraRetriever(hub, embedder=embedder)
    retriever.retrieve(persona(1, **FORMAL), "hello")
    count = len(embedder.texts)
    hub.add(CARDS[3])  # a new card: only it is embedded
    mixture = retriever.retrieve(persona(1, **FORMAL), "hello", top_k=10)
    assert "cooking" in mixture.ids and not mixture.cached
    assert embedder.texts[count:] == CARDS[3].embedding_texts()
    count = len(embedder.texts)
    edited = CARDS[2].model_copy(update={"description": "Explains things slowly."})
    hub.add(parse_card(edited.to_dict()), replace=True)
    retriever.retrieve(persona(1, **FORMAL), "hello")
    assert embedder.texts[count:] == ["Explains things slowly. Tags: detailed, explanatory."]


def test_nothing_to_retrieve_with(embedder: CountingEmbedder) -> None:
    retriever = LoraRetriever(CARDS, embedder=embedder)
    assert not retriever.retrieve(Persona.new("carol"), "")  # an empty persona, no input
    assert not retriever.retrieve(None, "")
    assert retriever.retrieve(None, "bake bread").ids[0] == "cooking"
    assert not LoraRetriever([], embedder=embedder).retrieve("formal", "hello")


def test_persona_texts(embedder: CountingEmbedder) -> None:
    p = persona(1, **FORMAL)
    p.personality.description = "Methodical and curious"
    p.personality.interests = ["jazz"]
    p.preference.tone = "dry"  # a free key
    p.pattern.items = ["Plans hikes on Thursdays"]  # type: ignore[assignment]
    text = compact_persona_text(p)
    assert text.startswith("Preferred style: formal, concise.")
    for part in ("Methodical and curious.", "Interests: jazz.", "Tone: dry.", "Plans hikes"):
        assert part in text
    assert "alice" not in text  # identity is left out
    assembled = LoraRetriever(CARDS, embedder=embedder, persona_text="assembled")
    assert "<user_profile>" in assembled.persona_text(p)
    assert assembled.retrieve(p, "Write to the board.").ids[0] == "formal-concise"
    custom = LoraRetriever(CARDS, embedder=embedder, persona_text=lambda q: "bake bread")
    assert custom.retrieve(p, "").ids[0] == "cooking"
    assert isinstance(PromptAssembler(), PromptAssembler)
    with pytest.raises(PersonaConfigError):
        LoraRetriever(CARDS, embedder=embedder, persona_text="full")  # type: ignore[arg-type]
    with pytest.raises(PersonaConfigError):
        LoraRetriever(CARDS, embedder=embedder, top_k=0)
    with pytest.raises(PersonaConfigError):
        LoraRetriever(CARDS, embedder=embedder, input_weight=2.0)
    with pytest.raises(PersonaConfigError, match="cannot embed"):
        LoraRetriever(CARDS, embedder=object())


def test_other_embedders(embedder: CountingEmbedder) -> None:
    class LangChainStyle:
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return embedder.embed(texts).tolist()

    retriever = LoraRetriever(CARDS, embedder=LangChainStyle(), top_k=1)
    assert retriever.retrieve(persona(1, **FORMAL), "").ids == ["formal-concise"]
    broken = LoraRetriever(CARDS, embedder=lambda texts: [[1.0, 0.0]])
    with pytest.raises(PersonaConfigError, match="one vector per text"):
        broken.retrieve("formal", "")
