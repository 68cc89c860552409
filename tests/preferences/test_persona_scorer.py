"""The persona-conditioned preference scorer (``scorer: persona``): candidates scored against
the persona's own stated likes and avoids, bound to the request's persona by retrieval and
MBR. Every example is written for this test; the embedder is the local MiniLM."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage

from persona_plugin.chat_models.mbr import MBRChatModel
from persona_plugin.graph import build_persona_graph, recalled_user_words
from persona_plugin.memory.long_term import LongTermMemory
from persona_plugin.persona import Persona
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.mbr import MBRSelector
from persona_plugin.preferences.retrieval import PreferenceRetriever
from persona_plugin.preferences.scorers import (
    CandidateEmbeddings,
    PersonaConditioned,
    PersonaScorer,
    persona_stances,
)
from persona_plugin.store import PersonaStore
from tests.fakes import CyclingChatModel

SNACK = "Suggest a snack for my hike."
SNACKS = [
    "Dried apricots and pumpkin seeds.",
    "A peanut butter sandwich.",
    "Trail mix with roasted peanuts.",
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> PreferenceHub:
    return PreferenceHub(tmp_path_factory.mktemp("prefs"), embedder=CandidateEmbeddings())


@pytest.fixture(scope="module")
def scorer(hub: PreferenceHub) -> PersonaScorer:
    found = hub.scorer("persona")
    assert isinstance(found, PersonaScorer) and isinstance(found, PersonaConditioned)
    return found


def best(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)


@pytest.mark.parametrize(
    ("persona", "statements", "prompt", "candidates"),
    [
        (
            {"preference": {"avoid": ["horror films"]}},
            [],
            "Which film should we watch tonight?",
            [
                "A light romantic comedy about two bakers in Lyon.",
                "A slasher horror film set in a lonely cabin.",
                "A horror anthology of ghost stories.",
            ],
        ),
        (None, ["I'm allergic to peanuts."], SNACK, SNACKS),
        (
            None,
            ["I prefer trains rather than planes."],
            "How should I travel from Paris to Berlin?",
            [
                "Take the high-speed train via Frankfurt.",
                "Book a cheap flight from Orly.",
                "Fly direct from Charles de Gaulle.",
            ],
        ),
        (
            # the candidate's own negation counts: "without ads" respects "I hate ads"
            None,
            ["I hate apps with ads."],
            "Can you recommend a weather app?",
            [
                "ClearSky, a paid weather app without ads.",
                "WeatherNow, free with banner ads.",
                "StormWatch, free and supported by video ads.",
            ],
        ),
        (
            {"personality": {"description": "Loves quiet places and can't stand crowds."}},
            [],
            "Where should I spend my Saturday afternoon?",
            [
                "A quiet walk through the botanical garden.",
                "The crowded Saturday street market.",
                "A packed stadium concert.",
            ],
        ),
    ],
)
def test_a_candidate_that_respects_the_users_avoidance_ranks_first(
    scorer: PersonaScorer,
    persona: dict | None,
    statements: list[str],
    prompt: str,
    candidates: list[str],
) -> None:
    holder = Persona.from_dict(persona) if persona is not None else None
    bound = scorer.bind(holder, statements)
    for order in (candidates, candidates[::-1]):  # not by position
        scores = bound.score(prompt, order)
        assert order[best(scores)] == candidates[0], scores


def test_what_the_scorer_reads_of_a_persona() -> None:
    persona = Persona.from_dict(
        {
            "personality": {
                "interests": ["board games"],
                "description": "Curious; dislikes small talk.",
            },
            "preference": {
                "style": ["concise"],  # how an answer reads: the style heads' part
                "content": ["recipes without nuts"],
                "avoid": ["horror films"],
                "diet": "vegetarian",  # a free key of the section: a like
            },
            "pattern": {"items": ["Always asks for warm replies"]},  # behaviour, not a wish
        }
    )
    read = [(s.polarity, s.text) for s, _ in persona_stances(persona, ["I never fly."])]
    assert read == [
        ("like", "recipes"),
        ("avoid", "nuts"),
        ("avoid", "horror films"),
        ("like", "vegetarian"),
        ("like", "board games"),
        ("avoid", "small talk"),
        ("avoid", "fly"),
    ]


def test_no_persona_or_nothing_relevant_scores_every_candidate_alike(
    scorer: PersonaScorer,
) -> None:
    assert scorer.score(SNACK, SNACKS) == [0.0, 0.0, 0.0]  # unbound: no persona
    styled = Persona.from_dict({"preference": {"style": ["concise"]}})
    assert scorer.bind(styled).score(SNACK, SNACKS) == [0.0, 0.0, 0.0]
    # a stance far from the prompt does not count
    films = scorer.bind(Persona.from_dict({"preference": {"avoid": ["horror films"]}}))
    assert films.score("How do I fill in my tax return?", ["a", "b"]) == [0.0, 0.0]
    assert scorer.bind(None, ["I'm allergic to peanuts."]).score(SNACK, []) == []


def test_mbr_binds_the_scorer_to_the_requests_persona(hub: PreferenceHub) -> None:
    allergic = Persona.from_dict({"preference": {"avoid": ["peanuts"]}})
    selector = MBRSelector(hub)
    assert selector.select(SNACK, SNACKS[::-1], {"persona": 1}, persona=allergic).text == SNACKS[0]
    # and the user's own words recalled for the turn, without a persona
    said = ["I'm allergic to peanuts."]
    assert selector.select(SNACK, SNACKS[::-1], {"persona": 1}, statements=said).text == SNACKS[0]
    # no persona: a neutral model, so the first candidate stands
    assert selector.select(SNACK, SNACKS[::-1], {"persona": 1}).chosen == 0


def test_retrieval_mixes_the_persona_card_in_for_a_persona_that_states_something(
    hub: PreferenceHub,
) -> None:
    retriever = PreferenceRetriever(hub)
    allergic = Persona.from_dict({"preference": {"style": ["concise"], "avoid": ["peanuts"]}})
    mixture = retriever.retrieve(allergic, SNACK)
    assert mixture.weight("persona") == pytest.approx(0.5)
    assert mixture.weight("brevity") > 0  # the style heads share the rest
    assert sum(abs(w) for _, w in mixture.pairs()) == pytest.approx(1.0)
    # a persona of styles alone states no like or avoid: the card is not mixed in
    assert (
        "persona"
        not in retriever.retrieve(
            Persona.from_dict({"preference": {"style": ["concise"]}}), SNACK
        ).ids
    )
    said = retriever.retrieve(None, SNACK, statements=["I'm allergic to peanuts."])
    assert said.weight("persona") == pytest.approx(0.5)
    assert (
        PreferenceRetriever(hub, persona_weight=0).retrieve(allergic, SNACK).weight("persona") == 0
    )


def test_the_mbr_chat_model_serves_any_persona_by_its_own_avoids(hub: PreferenceHub) -> None:
    base = CyclingChatModel(replies=SNACKS[::-1])
    model = MBRChatModel(base=base, n=3, hub=hub, preferences={"persona": 1.0})
    allergic = Persona.from_dict({"preference": {"avoid": ["peanuts"]}})
    reply = model.invoke([HumanMessage(SNACK)], persona=allergic)
    assert reply.content == SNACKS[0]
    assert reply.response_metadata["mbr"]["weights"] == {"persona": 1.0}


def test_the_graph_hands_mbr_the_users_recalled_words(
    tmp_path, store: PersonaStore, hub: PreferenceHub
) -> None:
    assert recalled_user_words(
        ["(2025-01-02) user: I never fly.", "assistant: Noted.", "The user has a cat."]
    ) == ["I never fly."]
    memory = LongTermMemory(
        tmp_path / "memory", embedding_function=hub.embeddings.embed_texts.embedder
    )
    store.create("dora", Persona.new("dora"))
    memory.remember(
        "dora",
        [
            {"turn_id": "t1", "speaker": "user", "text": "I'm allergic to peanuts."},
            {"turn_id": "t2", "speaker": "assistant", "text": "Thanks for telling me."},
        ],
    )
    base = CyclingChatModel(replies=SNACKS[::-1])
    graph = build_persona_graph(
        base, store=store, memory=memory, reflection="off", mbr_n=3, preference_hub=hub
    )
    # the persona model alone (retrieval mixes in the style heads too, at half the weight)
    configurable = {"user_id": "dora", "thread_id": "dora-1", "preferences": {"persona": 1}}
    state = graph.invoke({"messages": [HumanMessage(SNACK)]}, {"configurable": configurable})
    reply = state["messages"][-1]
    assert reply.content == SNACKS[0]  # the persona is empty: the recalled words did it
    assert reply.response_metadata["mbr"]["weights"] == {"persona": 1.0}
