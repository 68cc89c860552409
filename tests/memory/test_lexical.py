"""The BM25 index and tokenizer behind the lexical half of memory recall."""

from __future__ import annotations

import math

import pytest

from persona_plugin.memory.lexical import STOPWORDS, BM25Index, tokenize


def test_tokenize_lowercases_splits_and_drops_stopwords() -> None:
    assert tokenize("The Quick, brown FOX -- and the lazy dog!") == [
        "quick",
        "brown",
        "fox",
        "lazy",
        "dog",
    ]
    assert tokenize("I'm certain you're right, it's what I'd say") == ["certain", "right", "say"]
    assert tokenize("e-mail order #A7F3K9 at 10:45") == ["e", "mail", "order", "a7f3k9", "10", "45"]
    assert tokenize("") == [] and tokenize("  ...  ") == []
    assert tokenize("the and of to a") == []
    assert all(word == word.lower() for word in STOPWORDS)


@pytest.mark.parametrize(
    "forms",
    [
        ["hike", "hikes", "hiked", "hiking"],
        ["paint", "paints", "painted", "painting", "paintings"],
        ["story", "stories"],
        ["change", "changes", "changed", "changing"],
        ["box", "boxes"],
        ["glass", "glasses"],
        ["Caroline", "Caroline's"],
    ],
)
def test_light_stemming_joins_the_forms_of_a_word(forms: list[str]) -> None:
    stems = {tokenize(form)[0] for form in forms}
    assert len(stems) == 1, dict(zip(forms, (tokenize(f) for f in forms), strict=True))


def test_light_stemming_leaves_short_and_double_s_words_alone() -> None:
    assert tokenize("bus red ring sing glass dress") == [
        "bus",
        "red",
        "ring",
        "sing",
        "glass",
        "dress",
    ]
    assert tokenize("walks")[0] == tokenize("walk")[0] != tokenize("talk")[0]


def _index(*docs: str) -> BM25Index:
    index = BM25Index()
    index.add((f"d{i}", text) for i, text in enumerate(docs))
    return index


def test_rarer_matching_terms_rank_higher() -> None:
    index = _index(
        "apple banana",
        "apple cherry",
        "apple banana grape",
        "apple plum",
    )
    # "apple" is everywhere (idf ~0), "cherry" in one document
    hits = index.search("apple cherry", 4)
    assert hits[0][0] == "d1"
    assert hits[0][1] > 5 * hits[1][1]
    # one rare term beats one common term
    index = _index("kayak trip", "weekend trip", "weekend plans", "weekend brunch")
    rare, common = dict(index.search("kayak weekend", 4))["d0"], dict(index.search("weekend", 4))
    assert rare > max(common.values())


def test_score_matches_the_okapi_formula() -> None:
    index = _index("violin lesson", "piano lesson lesson", "guitar")
    n, df = 3, 1
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    avgdl = (2 + 3 + 1) / 3
    k1, b = 1.2, 0.75
    expected = idf * 1 * (k1 + 1) / (1 + k1 * (1 - b + b * 2 / avgdl))
    ((doc, score),) = index.search("violin", 5)
    assert doc == "d0" and score == pytest.approx(expected, rel=1e-5)
    # tf saturates: two "lesson"s score more than one, but less than twice as much
    lesson = dict(index.search("lesson", 5))
    assert lesson["d0"] < lesson["d1"] < 2 * lesson["d0"]


def test_length_normalisation_favours_the_shorter_document() -> None:
    docs = ("kayak", "kayak river lake mountain forest meadow valley")
    index = _index(*docs)
    (first, short), (second, long) = index.search("kayak", 2)
    assert (first, second) == ("d0", "d1") and short > long
    flat = BM25Index(b=0.0)  # no length normalisation: equal scores
    flat.add((f"d{i}", text) for i, text in enumerate(docs))
    scores = dict(flat.search("kayak", 2))
    assert scores["d0"] == pytest.approx(scores["d1"])


def test_allowed_filters_the_candidates() -> None:
    index = _index("red apple", "green apple", "apple pie", "banana")
    assert {doc for doc, _ in index.search("apple", 10)} == {"d0", "d1", "d2"}
    assert [doc for doc, _ in index.search("apple", 10, allowed={"d1", "d3", "nope"})] == ["d1"]
    assert index.search("apple", 10, allowed=set()) == []
    assert index.search("banana", 10, allowed={"d0"}) == []


def test_duplicate_ids_are_skipped() -> None:
    index = BM25Index()
    index.add([("a", "first text about otters"), ("a", "second text about beavers")])
    index.add([("a", "third text about beavers")])
    assert len(index) == 1 and "a" in index and "b" not in index
    assert index.search("beaver", 5) == []
    assert [doc for doc, _ in index.search("otters", 5)] == ["a"]


def test_search_sees_documents_added_after_a_search() -> None:
    index = _index("alpha beta")
    assert [d for d, _ in index.search("gamma", 5)] == []
    index.add([("late", "gamma delta")])
    assert [d for d, _ in index.search("gamma", 5)] == ["late"]
    assert len(index) == 2


def test_empty_index_and_empty_queries() -> None:
    empty = BM25Index()
    assert len(empty) == 0 and empty.search("anything", 5) == []
    index = _index("some words here", "", "more words")
    assert index.search("words", 0) == [] and index.search("words", -1) == []
    assert index.search("the and of", 5) == []  # stopwords only
    assert index.search("zebra", 5) == []  # no match: nothing with score 0
    assert index.search("", 5) == []


def test_top_k_best_first_with_stable_ties() -> None:
    index = _index(*(f"note {i} about lanterns" for i in range(20)), "lanterns lanterns")
    hits = index.search("lanterns", 5)
    assert len(hits) == 5 and hits[0][0] == "d20"
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert [d for d, _ in hits[1:]] == ["d0", "d1", "d2", "d3"]  # equal scores: insertion order
