"""The polarity reader: what a statement says the user likes, and what it says they avoid.

Every sentence here is written for this test (none is PrefEval's)."""

from __future__ import annotations

import time

import pytest

from persona_plugin.polarity import Stance, content_words, contradiction, read_polarity


def stances(text: str, **kwargs: object) -> list[tuple[str, str]]:
    return [(s.polarity, s.text) for s in read_polarity(text, **kwargs).stances]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # avoidance verbs, phrases, allergies, phobias
        ("I strongly dislike horror films.", [("avoid", "horror films")]),
        ("I avoid sugary drinks whenever possible.", [("avoid", "sugary drinks")]),
        ("I stay away from crowded malls.", [("avoid", "crowded malls")]),
        ("I can't stand loud restaurants.", [("avoid", "loud restaurants")]),
        ("I hate waiting in queues.", [("avoid", "waiting in queues")]),
        ("I'm allergic to shellfish.", [("avoid", "shellfish")]),
        ("I have a phobia of spiders.", [("avoid", "spiders")]),
        ("I have a strong aversion to reality shows.", [("avoid", "reality shows")]),
        ("I am strongly opposed to fur coats.", [("avoid", "fur coats")]),
        ("Not a fan of jazz.", [("avoid", "jazz")]),
        ("I'm not into team sports.", [("avoid", "team sports")]),
        ("I'd rather not travel by bus.", [("avoid", "travel by bus")]),
        ("I refuse to shop at MegaMart due to its prices.", [("avoid", "shop at MegaMart")]),
        # negations of a like-verb, and of any verb
        ("I do not really like crowded beaches.", [("avoid", "crowded beaches")]),
        ("I don't enjoy long car trips.", [("avoid", "long car trips")]),
        ("I don't eat red meat.", [("avoid", "eat red meat")]),
        ("I no longer drink coffee.", [("avoid", "drink coffee")]),
        ("I never fly.", [("avoid", "fly")]),
        ("Strictly no dairy, please.", [("avoid", "dairy")]),
        # likes
        ("I love sourdough baking.", [("like", "sourdough baking")]),
        ("I only buy second-hand furniture.", [("like", "buy second-hand furniture")]),
        ("I have a strong preference for quiet trains.", [("like", "quiet trains")]),
        ("I learn best through hands-on labs.", [("like", "hands-on labs")]),
        ("My favourite food is Thai curry.", [("like", "Thai curry")]),
        # a like and an avoid in one sentence
        (
            "I strongly dislike horror films and prefer light comedies.",
            [("avoid", "horror films"), ("like", "light comedies")],
        ),
        (
            "I prefer cycling to work rather than taking the bus.",
            [("like", "cycling to work"), ("avoid", "taking the bus")],
        ),
        ("I prefer tea over coffee.", [("like", "tea"), ("avoid", "coffee")]),
        ("I'd rather walk than drive.", [("like", "walk"), ("avoid", "drive")]),
        (
            "I take trains instead of planes.",
            [("like", "take trains"), ("avoid", "planes")],
        ),
        (
            "Not a fan of jazz, but I love classical music.",
            [("avoid", "jazz"), ("like", "classical music")],
        ),
        ("I'd like recipes without nuts.", [("like", "recipes"), ("avoid", "nuts")]),
        (
            "I love hiking but hate hiking in the rain.",
            [("like", "hiking"), ("avoid", "hiking in the rain")],
        ),
        # evaluations, and a pronoun naming what was just said
        (
            "I find podcasts distracting and prefer silence while I study.",
            [("avoid", "podcasts"), ("like", "silence")],
        ),
        ("I find it tedious to fill in forms.", [("avoid", "fill in forms")]),
        ("Cruises are not for me.", [("avoid", "Cruises")]),
        (
            "I find crowded gyms intimidating and prefer not to visit them.",
            [("avoid", "crowded gyms"), ("avoid", "visit crowded gyms")],
        ),
        # an avoidance of what lacks something is a like of that thing
        ("I avoid shops that do not accept cards.", [("like", "accept cards")]),
        ("I steer clear of hotels that lack a gym.", [("like", "a gym")]),
        ("I like games that don't have ads.", [("like", "games"), ("avoid", "have ads")]),
        # negated idioms that mean a like, and ones that state nothing
        ("I can't live without my morning tea.", [("like", "my morning tea")]),
        ("I can't get enough of salsa dancing.", [("like", "salsa dancing")]),
        ("I don't mind long hikes.", [("like", "long hikes")]),
        ("I'm not sure which laptop to buy.", []),
        ("I don't know what to cook tonight.", []),
        # "like" as a preposition, a request without a stance
        ("Try board games like chess.", []),
        ("Can you help me write a Python function that reverses a list?", []),
    ],
)
def test_statements_split_into_likes_and_avoids(text: str, expected: list) -> None:
    assert stances(text) == expected


def test_a_field_says_what_a_text_without_cues_means() -> None:
    assert stances("sources for claims") == []
    assert stances("sources for claims", default="like") == [("like", "sources for claims")]
    assert stances("spoilers", default="avoid") == [("avoid", "spoilers")]
    # what precedes the first cue takes the field's polarity
    assert stances("recipes without nuts", default="like") == [
        ("like", "recipes"),
        ("avoid", "nuts"),
    ]
    reading = read_polarity("Curious, methodical, dislikes small talk.")
    assert reading.avoids == ("small talk",) and reading.likes == ()
    assert reading.stances[0] == Stance("small talk", "avoid", "dislikes")


def test_several_sentences_and_curly_apostrophes() -> None:
    text = "I don\u2019t like olives. I love capers; I avoid anchovies.\nI never eat tripe"
    assert stances(text) == [
        ("avoid", "olives"),
        ("like", "capers"),
        ("avoid", "anchovies"),
        ("avoid", "eat tripe"),
    ]


def test_the_documented_limits_are_read_literally() -> None:
    # whose stance it is: not read
    assert stances("My son hates broccoli.") == [("avoid", "broccoli")]
    # an identity that implies an avoidance: not read
    assert stances("I'm vegan.") == []
    # the scope of a negation is the rest of its clause
    assert stances("I don't like olives and capers.") == [("avoid", "olives and capers")]


def test_content_words_match_objects_loosely() -> None:
    assert content_words("the Mobile Games") == content_words("mobile game")
    assert content_words("I really like it") == frozenset()


def test_contradiction_finds_a_value_that_drops_the_negation() -> None:
    said = ["I strongly dislike horror films and prefer light comedies."]
    found = contradiction("horror films", said)
    assert found == Stance("horror films", "avoid", "dislike")
    assert contradiction("horror film", said) is not None  # a fragment, singular
    assert contradiction("light comedies", said) is None
    # the value keeps the negation, or goes where avoids go
    assert contradiction("dislikes horror films", said) is None
    assert contradiction("horror films", said, polarity="avoid") is None
    # a like stored as an avoid is turned around too
    assert contradiction("light comedies", said, polarity="avoid") == Stance(
        "light comedies", "like", "prefer"
    )
    # a like of the same thing in the evidence wins: nothing is turned around
    assert contradiction("hiking", ["I love hiking but hate hiking in the rain."]) is None
    # evidence that states nothing about the value
    assert contradiction("horror films", ["I watched a horror film yesterday."]) is None
    assert contradiction("horror films", []) is None


def test_reading_is_fast_and_linear_on_long_or_odd_texts() -> None:
    long_text = " ".join(["I tried the new cafe and the soup was fine."] * 400)
    for text in (long_text, "not " * 3000, "," * 5000 + "x", "I dislike " + "very " * 3000):
        start = time.perf_counter()
        read_polarity(text)
        assert time.perf_counter() - start < 1.0
