"""MBR decoding: choosing by weighted preference scores, per persona, per request.

The proof of issue #6: over one fixed candidate set, a persona preferring brevity gets a
shorter answer than a persona preferring detail, and flipping the persona flips the
choice. The preference models are the bundled demo heads on the local embedder, the
mixture comes from the persona through retrieval; the candidates come from a scripted
LangChain chat model, or from the local SmolLM2 model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
from langchain_core.messages import AIMessage

from persona_plugin.chat_models.mbr import MBRChatModel, describe_mbr
from persona_plugin.errors import PersonaConfigError, PersonaValidationError
from persona_plugin.persona import Persona
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.mbr import MBRRequest, MBRSelector, normalize_scores
from persona_plugin.preferences.retrieval import PreferenceRetriever
from persona_plugin.preferences.scorers import CandidateEmbeddings, PreferenceScoreError
from tests.fakes import CyclingChatModel

PROMPT = "How can I keep my online accounts safe?"
SHORT = "Use a password manager and turn on two-factor authentication."
MEDIUM = (
    "Use a password manager so every site gets its own long password, and turn on "
    "two-factor authentication for email and banking."
)
LONG = (
    "Start with a password manager: it generates a long, unique password for every site "
    "and remembers them for you, so a leak at one service cannot unlock the others. Then "
    "turn on two-factor authentication wherever it is offered, preferably with an "
    "authenticator app or a hardware key rather than text messages, which can be "
    "intercepted. Keep your phone and browser updated, be suspicious of links in "
    "unexpected emails, and check now and then whether your address appeared in a known "
    "breach, changing the affected passwords at once."
)
CANDIDATES = [MEDIUM, LONG, SHORT]

BRIEF = {"style": ["concise", "short answers"]}
DETAILED = {"style": ["detailed", "thorough, in-depth explanations"]}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> PreferenceHub:
    hub = PreferenceHub(tmp_path_factory.mktemp("prefs"), embedder=CandidateEmbeddings())
    hub.load()
    return hub


def persona(user: str, version: int, **preference: list[str]) -> Persona:
    p = Persona.new(user)
    for key, value in preference.items():
        setattr(p.preference, key, value)
    return p.with_meta(version=version, user_id=user)


# -- the selector -------------------------------------------------------------------------


def test_normalisations() -> None:
    assert normalize_scores([1, 3, 2]).tolist() == [0.0, 1.0, 0.5]
    assert normalize_scores([2, 2]).tolist() == [0.5, 0.5]  # a flat model does not sway
    assert normalize_scores([5, -1, 0], "rank").tolist() == [1.0, 0.0, 0.5]
    z = normalize_scores([1, 2, 3], "zscore")
    assert z.mean() == pytest.approx(0) and z.std() == pytest.approx(1)
    with pytest.raises(PersonaConfigError, match="normalization"):
        MBRSelector({}, normalization="softmax")  # type: ignore[arg-type]


def test_brevity_persona_gets_a_shorter_answer_and_flipping_flips_it(hub: PreferenceHub) -> None:
    retriever = PreferenceRetriever(hub)
    selector = MBRSelector(hub)

    def choose(p: Persona) -> str:
        return selector.select(PROMPT, CANDIDATES, retriever.retrieve(p, PROMPT)).text

    brief, detailed = choose(persona("ann", 1, **BRIEF)), choose(persona("bo", 1, **DETAILED))
    assert len(brief) < len(detailed)
    assert brief == SHORT and detailed == LONG
    # the same users, their preference flipped (a new persona version)
    assert choose(persona("ann", 2, **DETAILED)) == detailed
    assert choose(persona("bo", 2, **BRIEF)) == brief


def test_the_result_carries_candidates_scores_and_weights(hub: PreferenceHub) -> None:
    result = MBRSelector(hub).select(PROMPT, CANDIDATES, {"brevity": 3, "warmth": 1})
    assert result.weights == {"brevity": 0.75, "warmth": 0.25}
    assert set(result.scores) == {"brevity", "warmth"}
    assert all(len(s) == 3 for s in result.scores.values())
    expected = sum(w * normalize_scores(result.scores[m]) for m, w in result.weights.items())
    assert list(result.utility) == pytest.approx(list(expected))
    assert result.chosen == int(np.argmax(expected))
    meta = result.to_metadata()
    assert meta["candidates"] == CANDIDATES and meta["chosen"] == result.chosen
    assert meta["chosen_scores"]["brevity"] == pytest.approx(
        result.scores["brevity"][result.chosen], abs=1e-4
    )


def test_a_batch_carries_a_mixture_per_request(hub: PreferenceHub) -> None:
    selector = MBRSelector(hub)
    formal = "I would be pleased to assist; kindly provide the document at your convenience."
    casual = "Sure, just send it over whenever, no rush!"
    results = selector.select_batch(
        [
            MBRRequest(PROMPT, CANDIDATES, {"brevity": 1.0}),
            (PROMPT, CANDIDATES, {"brevity": -1.0}),  # reversed: prefers the long one
            ("Can you check my essay?", [casual, formal], {"formality": 0.9}),
            ("Can you check my essay?", [casual, formal], [("formality", -0.5)]),
            (PROMPT, CANDIDATES, None),  # no preferences: the first candidate
        ]
    )
    assert [r.text for r in results] == [SHORT, LONG, formal, casual, MEDIUM]
    assert results[1].weights == {"brevity": -1.0} and results[3].weights == {"formality": -1.0}


def test_the_consensus_term_prefers_what_the_candidates_agree_on(hub: PreferenceHub) -> None:
    agreeing = [
        "Paris is the capital of France.",
        "The capital of France is Paris.",
        "France's capital city is Paris.",
        "Bananas are rich in potassium.",
    ]
    result = MBRSelector(hub, consensus_weight=1.0).select("Capital of France?", agreeing)
    assert result.consensus is not None and result.chosen != 3
    assert int(np.argmin(result.consensus)) == 3
    # with a strong brevity preference the shortest wins despite the consensus
    strong = MBRSelector(hub, consensus_weight=0.1).select(
        "Capital of France?", [LONG, SHORT, LONG + " "], {"brevity": 1.0}
    )
    assert strong.text == SHORT


def test_bad_input_is_rejected(hub: PreferenceHub) -> None:
    selector = MBRSelector(hub)
    with pytest.raises(PersonaConfigError, match="at least one candidate"):
        selector.select(PROMPT, [], {"brevity": 1})
    with pytest.raises(PersonaValidationError, match="not finite"):
        selector.select(PROMPT, CANDIDATES, {"brevity": float("nan")})
    with pytest.raises(Exception, match="'nope' is not in the hub"):
        selector.select(PROMPT, CANDIDATES, {"nope": 1})
    with pytest.raises(PersonaConfigError, match="consensus_weight"):
        MBRSelector(hub, consensus_weight=-1)

    class Broken:
        """A user-supplied scorer that returns NaN."""

        card = None

        def score(self, prompt: str, candidates: Sequence[str]) -> list[float]:
            return [float("nan")] * len(candidates)

    with pytest.raises(PreferenceScoreError, match="'broken' returned nan for candidate 0"):
        MBRSelector({"broken": Broken()}).select(PROMPT, CANDIDATES, {"broken": 1})


# -- the chat model -----------------------------------------------------------------------


def test_mbr_chat_model_picks_per_persona_from_config(hub: PreferenceHub) -> None:
    base = CyclingChatModel(replies=CANDIDATES)
    model = MBRChatModel(base=base, n=3, hub=hub)
    reply = model.invoke(PROMPT, config={"configurable": {"persona": persona("a", 1, **BRIEF)}})
    assert reply.content == SHORT and base.calls == 3
    mbr = reply.response_metadata["mbr"]
    assert sorted(mbr["candidates"]) == sorted(CANDIDATES)
    assert mbr["candidates"][mbr["chosen"]] == SHORT and mbr["source"] == "retrieved"
    assert mbr["weights"]["brevity"] > 0.5 and set(mbr["scores"]) == set(mbr["weights"])
    assert reply.response_metadata["scripted"] is True  # the candidate's own metadata stays
    line = describe_mbr(reply.response_metadata)
    assert line.startswith(f"MBR: candidate {mbr['chosen'] + 1} of 3; preferences: brevity +")
    assert f"(score {mbr['chosen_scores']['brevity']:.2f})" in line
    assert describe_mbr(AIMessage(content="plain").response_metadata) == ""

    detailed = model.invoke(PROMPT, persona=persona("b", 1, **DETAILED).model_dump())
    assert detailed.content == LONG

    given = model.invoke(PROMPT, preferences={"brevity": -1})
    assert given.content == LONG and given.response_metadata["mbr"]["source"] == "given"


def test_a_batch_of_personas_gets_different_replies(hub: PreferenceHub) -> None:
    model = MBRChatModel(base=CyclingChatModel(replies=CANDIDATES), n=3, hub=hub)
    replies = model.batch(
        [PROMPT, PROMPT],
        config=[
            {"configurable": {"persona": persona("a", 1, **BRIEF)}, "max_concurrency": 1},
            {"configurable": {"persona": persona("b", 1, **DETAILED)}},
        ],
    )
    assert [r.content for r in replies] == [SHORT, LONG]
    reply = asyncio.run(
        MBRChatModel(base=CyclingChatModel(replies=CANDIDATES), n=3, hub=hub).ainvoke(
            PROMPT, persona=persona("c", 1, **BRIEF)
        )
    )
    assert reply.content == SHORT


def test_mbr_chat_model_rejects_bad_setup(tmp_path: Path, hub: PreferenceHub) -> None:
    base = CyclingChatModel(replies=["x"])
    with pytest.raises(PersonaConfigError, match="from 1 to 64"):
        MBRChatModel(base=base, n=0, hub=hub)
    (tmp_path / "ghost.yaml").write_text(
        yaml.safe_dump(
            {
                "id": "ghost",
                "description": "d",
                "kind": "style",
                "scorer": "embedding_head",
                "location": "ghost.npz",
            }
        )
    )
    broken = PreferenceHub(tmp_path, embedder=hub.embeddings)
    with pytest.raises(PersonaValidationError, match=r"ghost\.yaml"):
        MBRChatModel(base=base, n=2, hub=broken)  # at load, not at the first request
    model = MBRChatModel(base=base, n=2, hub=hub)
    with pytest.raises(PersonaConfigError, match="persona must be"):
        model.invoke(PROMPT, persona=42)


def test_mbr_over_the_local_model_samples_n_candidates(hub: PreferenceHub) -> None:
    from persona_plugin.backends.local import LocalBackend
    from persona_plugin.chat_models.multi_lora import MultiLoraChatModel

    base = MultiLoraChatModel(backend=LocalBackend().load(), max_new_tokens=12)
    model = MBRChatModel(base=base, n=3, hub=hub, seed=7)
    reply = model.invoke("Name a fruit.", persona=persona("a", 1, **BRIEF))
    mbr = reply.response_metadata["mbr"]
    assert mbr["n"] == 3 and len(mbr["candidates"]) == 3
    assert reply.content == mbr["candidates"][mbr["chosen"]]
    assert len(set(mbr["candidates"])) > 1  # sampled, not greedy
    assert reply.response_metadata["backend"] == "local"
    brevity = mbr["scores"]["brevity"]
    assert mbr["utility"][mbr["chosen"]] == max(mbr["utility"])
    assert len(brevity) == 3
