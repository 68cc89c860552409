"""A small in-memory BM25 index (Okapi BM25, k1=1.2, b=0.75) with numpy scoring.

Long-term memory pairs it with vector search: names, places and rare words that an
embedding blurs are exactly what BM25 matches. The index is per user and append-only
between rebuilds; scoring touches only the postings of the query's terms.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

# common English function words: they match everywhere and only add noise to BM25
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just me more most my myself no nor not now of off on
    once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves i'm it's that's what's you're i've i'd i'll
    don't didn't doesn't can't won't isn't wasn't aren't let's hey hi oh yeah yes wow
    really also get got go going like lot lots much many thing things one ever""".split()
)


def _stem(token: str) -> str:
    # a light suffix stripper: enough to match "hiking"/"hike", "paintings"/"painting"
    # plural first, then the verb ending, then a silent final e, so that every form of a
    # word meets: "paintings"/"painting"/"paint" -> "paint", "hike"/"hikes"/"hiked" -> "hik"
    if token.endswith("'s"):
        token = token[:-2]
    if token.endswith("ies") and len(token) >= 5:
        token = token[:-3] + "y"
    elif token.endswith("es") and len(token) >= 5:
        token = token[:-2]
    elif token.endswith("s") and not token.endswith("ss") and len(token) >= 4:
        token = token[:-1]
    if token.endswith("ing") and len(token) >= 6:
        token = token[:-3]
    elif token.endswith("ed") and len(token) >= 5:
        token = token[:-2]
    if token.endswith("e") and len(token) >= 4:
        token = token[:-1]
    return token


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens without stopwords, lightly stemmed."""
    return [_stem(t) for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS]


class BM25Index:
    """Append-only BM25 over documents identified by string ids."""

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        self.ids: list[str] = []
        self._position: dict[str, int] = {}
        self._lengths: list[int] = []
        self._postings: dict[str, tuple[list[int], list[int]]] = {}
        self._length_array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._position

    def add(self, items: Iterable[tuple[str, str]]) -> None:
        """Index ``(id, text)`` pairs; an id already indexed is skipped."""
        for doc_id, text in items:
            if doc_id in self._position:
                continue
            index = len(self.ids)
            self.ids.append(doc_id)
            self._position[doc_id] = index
            counts = Counter(tokenize(text))
            self._lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                docs, tfs = self._postings.setdefault(term, ([], []))
                docs.append(index)
                tfs.append(tf)
        self._length_array = None

    def search(
        self, query: str, k: int, allowed: set[str] | None = None
    ) -> list[tuple[str, float]]:
        """The best ``k`` ``(id, score)`` pairs with a positive score, best first."""
        n = len(self.ids)
        if n == 0 or k <= 0:
            return []
        if self._length_array is None:
            self._length_array = np.asarray(self._lengths, dtype=np.float32)
        lengths = self._length_array
        norm = self.k1 * (1 - self.b + self.b * lengths / max(float(lengths.mean()), 1.0))
        scores = np.zeros(n, dtype=np.float32)
        for term in set(tokenize(query)):
            posting = self._postings.get(term)
            if posting is None:
                continue
            docs = np.asarray(posting[0])
            tfs = np.asarray(posting[1], dtype=np.float32)
            idf = math.log(1 + (n - len(docs) + 0.5) / (len(docs) + 0.5))
            scores[docs] += idf * tfs * (self.k1 + 1) / (tfs + norm[docs])
        candidates = np.flatnonzero(scores > 0)
        if allowed is not None:
            candidates = np.asarray(
                [i for i in candidates if self.ids[i] in allowed], dtype=np.int64
            )
        if candidates.size == 0:
            return []
        top = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
        return [(self.ids[i], float(scores[i])) for i in top]
