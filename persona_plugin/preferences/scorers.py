"""Preference scorers: the models behind the cards, each giving one score per candidate.

Every scorer follows :class:`PreferenceScorer`, ``score(prompt, candidates) -> list[float]``
(higher is better), so MBR decoding (:mod:`persona_plugin.preferences.mbr`) can combine any of
them. :func:`load_scorer` builds a card's scorer and loads and checks its model right away,
not at first use:

* :class:`EmbeddingHeadScorer`: a Bradley-Terry :class:`PreferenceHead` (linear or one tanh
  layer) on the local sentence embeddings, the cosine to the prompt and
  :data:`SURFACE_FEATURES`. It trains in seconds on CPU and is stored as a small ``.npz`` file.
* :class:`SequenceClassifierScorer`: a transformers reward model in a local folder.
* :class:`LLMJudgeScorer`: any LangChain chat model grading against the card's ``rubric``.
* :class:`PersonaScorer` (``scorer: persona``): no model of its own; candidates are scored
  against the persona's own stated likes and avoids (:func:`persona_stances`), each
  weighted by how much it bears on the prompt. It is conditioned on a persona:
  :meth:`PersonaScorer.bind` (what :class:`~persona_plugin.preferences.mbr.MBRSelector`
  calls with the request's persona) returns the scorer for that persona.

:class:`CandidateEmbeddings` is shared by a hub's heads, so each candidate is embedded once,
not once per head. A NaN, infinite or missing score raises :class:`PreferenceScoreError`
(:func:`check_scores`) instead of silently swaying the choice.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from persona_plugin.cards.retrieval import (
    LRUCache,
    TextEmbedder,
)
from persona_plugin.errors import PersonaError, PersonaValidationError
from persona_plugin.persona import Persona
from persona_plugin.polarity import Polarity, Stance, content_words, read_polarity
from persona_plugin.preferences.cards import PreferenceCard


class PreferenceScoreError(PersonaError):
    """A preference model returned something that is not a score (NaN, inf, too few)."""


# -- scorers ------------------------------------------------------------------------------


@runtime_checkable
class PreferenceScorer(Protocol):
    """A preference model: one score per candidate, higher is better."""

    card: PreferenceCard

    def score(self, prompt: str, candidates: Sequence[str]) -> list[float]: ...


def check_scores(model_id: str, scores: Any, count: int) -> list[float]:
    """``scores`` as floats, one per candidate, all finite, or :class:`PreferenceScoreError`."""
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise PreferenceScoreError(
            f"preference model {model_id!r} returned {scores!r}, not a list of numbers."
        ) from None
    if len(values) != count:
        raise PreferenceScoreError(
            f"preference model {model_id!r} returned {len(values)} scores for {count} "
            "candidates: a scorer returns one score per candidate."
        )
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise PreferenceScoreError(
            f"preference model {model_id!r} returned {values[bad[0]]} for candidate {bad[0]} "
            f"(non-finite at {bad}): its weights are probably broken (retrain it, "
            "`persona prefs train`) or its input was empty. Scores must be finite numbers."
        )
    return values


class CandidateEmbeddings:
    """The embedder with a per-text LRU cache, shared by every embedding-head scorer of a
    hub: MBR with three head models embeds each candidate once, not three times."""

    def __init__(self, embedder: Any = None, *, cache_size: int = 2048) -> None:
        self.embed_texts = TextEmbedder(embedder)
        self._cache = LRUCache(cache_size)
        self._lock = threading.Lock()
        self._dim: int | None = None

    @property
    def dimension(self) -> int:
        """The embedding size (known without loading the model for the default embedder)."""
        if self._dim is None:
            from persona_plugin.embeddings.minilm import DIMENSIONS, MiniLMEmbeddingFunction

            if isinstance(self.embed_texts.embedder, MiniLMEmbeddingFunction):
                self._dim = DIMENSIONS
            else:
                self._dim = int(self.embed_texts(["dimension probe"]).shape[1])
        return self._dim

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            found = {t: self._cache.get(t) for t in texts}
        todo = list(dict.fromkeys(t for t, v in found.items() if v is None))
        if todo:
            rows = self.embed_texts(todo)
            with self._lock:
                for text, row in zip(todo, rows, strict=True):
                    self._cache.put(text, row)
                    found[text] = row
        return np.stack([found[t] for t in texts]) if texts else np.zeros((0, self.dimension))

    def clear(self) -> None:
        with self._lock:
            self._cache.data.clear()


#: surface features an embedding head sees beside the embedding (in this order)
SURFACE_FEATURES = (
    "log_words",
    "log_sentences",
    "mean_word_length",
    "contractions",
    "exclamations",
    "second_person",
)
HEAD_FORMAT = "persona-preference-head-1"
_WORD = re.compile(r"[A-Za-z0-9']+")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_YOU = frozenset({"you", "your", "yours", "you're", "you'll", "you've", "yourself"})


def surface_features(texts: Sequence[str]) -> np.ndarray:
    """The raw :data:`SURFACE_FEATURES` of each text, one row each."""
    rows = []
    for text in texts:
        words = _WORD.findall(text)
        n = max(len(words), 1)
        sentences = max(len(_SENTENCE_END.findall(text.strip())), 1)
        rows.append(
            [
                math.log1p(len(words)),
                math.log1p(sentences),
                sum(len(w) for w in words) / n,
                sum("'" in w for w in words) / n,
                text.count("!") / sentences,
                sum(w.lower() in _YOU for w in words) / n,
            ]
        )
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), len(SURFACE_FEATURES))


@dataclass
class PreferenceHead:
    """A Bradley-Terry scoring head: ``features -> score`` (linear, or one tanh layer).

    Features: the candidate's unit embedding, its cosine to the prompt's embedding, then
    the standardised surface features. Saved as an ``.npz`` file with its metadata.
    """

    embedding_dim: int
    surface_mean: np.ndarray
    surface_std: np.ndarray
    weights: dict[str, np.ndarray]
    info: dict[str, Any]

    @property
    def type(self) -> str:
        return "mlp" if "w1" in self.weights else "linear"

    @property
    def input_dim(self) -> int:
        return self.embedding_dim + 1 + len(SURFACE_FEATURES)

    def features(
        self, prompt_vec: np.ndarray | None, cand_vecs: np.ndarray, candidates: Sequence[str]
    ) -> np.ndarray:
        relevance = cand_vecs @ prompt_vec if prompt_vec is not None else np.zeros(len(candidates))
        surface = (surface_features(candidates) - self.surface_mean) / self.surface_std
        return np.hstack([cand_vecs, relevance[:, None], surface]).astype(np.float32)

    def forward(self, x: np.ndarray) -> np.ndarray:
        w = self.weights
        if "w1" in w:
            return np.tanh(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]
        return x @ w["w"] + w["b"]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a reader never sees half a file)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    format=np.array(HEAD_FORMAT),
                    surface_names=np.array(SURFACE_FEATURES),
                    embedding_dim=np.array(self.embedding_dim),
                    surface_mean=self.surface_mean.astype(np.float32),
                    surface_std=self.surface_std.astype(np.float32),
                    info=np.array(json.dumps(self.info, sort_keys=True)),
                    **{k: v.astype(np.float32) for k, v in self.weights.items()},
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, *, source: str = "<head>") -> PreferenceHead:
        """Read and check a head file; every problem names ``source`` and ``location``."""

        def bad(problem: str, hint: str) -> PersonaValidationError:
            return PersonaValidationError(source, "location", problem, hint)

        retrain = "Retrain it with `persona prefs train`, or point location at a head file."
        if not path.is_file():
            raise bad(f"the head file {path} does not exist", retrain)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise bad(f"{path} is not a head file (.npz): {exc}", retrain) from None
        if str(arrays.get("format", "")) != HEAD_FORMAT:
            raise bad(f"{path} is not a {HEAD_FORMAT} file", retrain)
        names = tuple(str(n) for n in arrays.get("surface_names", ()))
        if names != SURFACE_FEATURES:
            raise bad(f"{path} was trained on the surface features {names}", retrain)
        keys = ("w1", "b1", "w2", "b2") if "w1" in arrays else ("w", "b")
        missing = [
            k for k in (*keys, "embedding_dim", "surface_mean", "surface_std") if k not in arrays
        ]
        if missing:
            raise bad(f"{path} lacks the arrays {missing}", retrain)
        weights = {k: arrays[k].astype(np.float32) for k in keys}
        head = cls(
            embedding_dim=int(arrays["embedding_dim"]),
            surface_mean=arrays["surface_mean"].astype(np.float32),
            surface_std=np.clip(arrays["surface_std"].astype(np.float32), 1e-6, None),
            weights=weights,
            info=json.loads(str(arrays["info"])) if "info" in arrays else {},
        )
        first = weights["w1"] if "w1" in weights else weights["w"]
        shapes_ok = first.shape[0] == head.input_dim and (
            "w1" not in weights
            or (
                weights["b1"].shape == (first.shape[1],)
                and weights["w2"].shape == (first.shape[1],)
            )
        )
        if not shapes_ok:
            raise bad(
                f"{path} has weights of shape {first.shape}; a head for {head.embedding_dim}-"
                f"dimensional embeddings takes {head.input_dim} inputs",
                retrain,
            )
        if not all(np.isfinite(v).all() for v in weights.values()):
            raise bad(f"{path} holds NaN or infinite weights", retrain)
        return head


class EmbeddingHeadScorer:
    """An :class:`PreferenceHead` on the (cached) local sentence embeddings."""

    def __init__(
        self, card: PreferenceCard, head: PreferenceHead, embeddings: CandidateEmbeddings
    ) -> None:
        if head.embedding_dim != embeddings.dimension:
            raise PersonaValidationError(
                card.source,
                "location",
                f"the head {card.resolved_location} was trained on {head.embedding_dim}-"
                f"dimensional embeddings, but the hub's embedder gives {embeddings.dimension}",
                "Retrain the head with this embedder (`persona prefs train`), or use the "
                "embedder it was trained with.",
            )
        self.card = card
        self.head = head
        self.embeddings = embeddings

    def score(self, prompt: str, candidates: Sequence[str]) -> list[float]:
        if not candidates:
            return []
        texts = [*candidates, prompt] if prompt.strip() else list(candidates)
        rows = self.embeddings(texts)
        prompt_vec = rows[len(candidates)] if prompt.strip() else None
        x = self.head.features(prompt_vec, rows[: len(candidates)], candidates)
        return check_scores(self.card.id, self.head.forward(x), len(candidates))


class SequenceClassifierScorer:
    """A transformers sequence-classification reward model read from a local folder."""

    def __init__(self, card: PreferenceCard, *, device: str = "cpu", max_length: int = 512):
        path = card.resolved_location
        assert path is not None  # the card validator requires it

        def bad(problem: str) -> PersonaValidationError:
            return PersonaValidationError(
                card.source,
                "location",
                problem,
                "Point location at a folder saved by save_pretrained() of a "
                "*ForSequenceClassification model with num_labels 1 or 2, and its tokenizer.",
            )

        if not (path / "config.json").is_file():
            raise bad(f"{path} is not a transformers model folder (no config.json)")
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise bad(f"cannot read {path / 'config.json'}: {exc}") from None
        if config.num_labels not in (1, 2):
            raise bad(
                f"{path} classifies into {config.num_labels} labels; a reward model gives one "
                "score (num_labels 1) or a good-vs-bad pair (num_labels 2)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise bad(f"cannot load the classifier or its tokenizer from {path}: {exc}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.card = card
        self.tokenizer = tokenizer
        self.model = model.to(device).eval()
        self.device = device
        positions = getattr(model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, positions) if positions else max_length
        self._lock = threading.Lock()

    def score(self, prompt: str, candidates: Sequence[str]) -> list[float]:
        if not candidates:
            return []
        import torch

        encoded = self.tokenizer(
            [prompt] * len(candidates),
            list(candidates),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with self._lock, torch.inference_mode():
            logits = self.model(**encoded).logits.float()
        values = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
        return check_scores(self.card.id, values.tolist(), len(candidates))


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
JUDGE_SYSTEM = (
    "You grade one answer against a rubric. Rubric: {rubric}\n"
    "Reply with one number from {low:g} (fails the rubric) to {high:g} (fits it best), "
    "nothing else."
)
JUDGE_USER = "Request:\n{prompt}\n\nAnswer to grade:\n{candidate}\n\nScore ({low:g}-{high:g}):"


class LLMJudgeScorer:
    """Any LangChain chat model grading each candidate against the card's rubric."""

    def __init__(self, card: PreferenceCard, judge: Any) -> None:
        if judge is None or not hasattr(judge, "batch"):
            raise PersonaValidationError(
                card.source,
                "scorer",
                f"the llm_judge card {card.id!r} needs a judge chat model, and none was given",
                "Pass judge=<a LangChain chat model> to PreferenceHub.",
            )
        self.card = card
        self.judge = judge

    def _messages(self, prompt: str, candidate: str) -> list[tuple[str, str]]:
        low, high = self.card.scale
        return [
            ("system", JUDGE_SYSTEM.format(rubric=self.card.rubric, low=low, high=high)),
            ("human", JUDGE_USER.format(prompt=prompt, candidate=candidate, low=low, high=high)),
        ]

    def parse(self, reply: Any, index: int) -> float:
        text = reply.content if hasattr(reply, "content") else str(reply)
        text = text if isinstance(text, str) else str(text)
        match = _NUMBER.search(text)
        low, high = self.card.scale
        if match is None or not low <= float(match.group()) <= high:
            raise PreferenceScoreError(
                f"the judge of preference model {self.card.id!r} answered {text[:80]!r} for "
                f"candidate {index}, not a number from {low:g} to {high:g}: use a judge model "
                "that follows the instruction, or reword the rubric."
            )
        return float(match.group())

    def score(self, prompt: str, candidates: Sequence[str]) -> list[float]:
        replies = self.judge.batch([self._messages(prompt, c) for c in candidates])
        values = [self.parse(reply, i) for i, reply in enumerate(replies)]
        return check_scores(self.card.id, values, len(candidates))


# -- the persona's own likes and avoids ----------------------------------------------------

#: what each persona field means, read by :func:`persona_stances`: its items' polarity
#: when they carry no cue of their own ("like", "avoid"), or None (free text: only what its
#: cues say). This scorer scores what an answer is about. Style, format and reasoning (and
#: the feedback on replies, which is mostly about them) are how an answer reads, which the
#: style heads score (brevity, formality, warmth); patterns are what the user does, not
#: what they want.
PERSONA_FIELDS: tuple[tuple[str, Polarity | None], ...] = (
    ("preference.content", "like"),
    ("preference.avoid", "avoid"),
    ("preference.*", "like"),  # the section's free keys
    ("personality.interests", "like"),
    ("personality.values", "like"),
    ("personality.description", None),
    ("personality.*", None),
)


def _field_texts(persona: Persona, path: str) -> list[str]:
    section_name, _, name = path.partition(".")
    section = getattr(persona, section_name)
    if name == "*":
        values = list((section.model_extra or {}).values())
    else:
        value = getattr(section, name)
        values = value if isinstance(value, list) else [value]
    texts: list[str] = []
    for value in values:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            texts.extend(v for v in value if isinstance(v, str))
        else:  # a pattern item, a feedback entry
            text = getattr(value, "description", None) or getattr(value, "text", None)
            if isinstance(text, str):
                texts.append(text)
    return [t for t in texts if t.strip()]


def persona_stances(
    persona: Persona | None, statements: Sequence[str] = ()
) -> list[tuple[Stance, str]]:
    """What the persona says the user likes and avoids (:data:`PERSONA_FIELDS`, read with
    :func:`~persona_plugin.polarity.read_polarity`), then what ``statements`` say: the
    user's own words from elsewhere (recalled messages), read for their cues alone. Each
    stance once, with the text it was read from, in that order."""
    found: list[tuple[Stance, str]] = []
    sources: list[tuple[str, Polarity | None]] = []
    if isinstance(persona, Persona):
        for path, default in PERSONA_FIELDS:
            sources += [(text, default) for text in _field_texts(persona, path)]
    sources += [(text, None) for text in statements if text.strip()]
    seen: set[Stance] = set()
    for text, default in sources:
        for stance in read_polarity(text, default=default).stances:
            if stance not in seen:
                seen.add(stance)
                found.append((stance, text))
    return found


#: a statement counts for a prompt only if its cosine to the prompt is at least this: the
#: user's dislike of horror films has nothing to say about a question on tax forms
RELEVANCE_FLOOR = 0.1
#: how sharply the statements most relevant to the prompt dominate (a softmax temperature
#: over their cosines to it)
RELEVANCE_TEMPERATURE = 0.1
#: the share of the embedding cosine in a candidate's fit to a stance; the rest is the
#: share of the stance's words the candidate names (see :class:`PersonaScorer`)
EMBEDDING_SHARE = 0.5


class PersonaScorer:
    """Scores candidates by how they fit the user's own stated likes and keep away from
    their avoids::

        score_j = sum_i w_i * s_i * fit(candidate_j, stance_i)

    ``s_i`` is +1 for a like and -1 for an avoid. ``w_i`` is how much the statement the
    stance was read from bears on the prompt: the softmax (``temperature``) of its cosine
    to the prompt, over the statements at least ``floor`` from it; none: every candidate
    scores 0, which MBR's normalisation makes neutral. ``fit`` is, in equal parts
    (``embedding_share``):

    * the MiniLM cosine of the candidate to the stance's text, and
    * the share of the stance's content words that the candidate names, counted against
      it where the candidate itself negates them ("a puzzle game without in-app purchases"
      does not offer in-app purchases; :func:`~persona_plugin.polarity.read_polarity`
      reads the candidate too). The words the prompt uses are left out (every candidate
      answers the prompt: "games" in "I dislike mobile games" says nothing about which
      answer to a question on games fits), unless they are all the stance has.

    Unbound (as a hub loads it) it knows no persona and scores every candidate 0;
    :meth:`bind` gives the scorer of one persona, plus any ``statements`` of the user's own
    (recalled messages), each read by :func:`persona_stances`. Embeddings go through the
    hub's shared, cached :class:`CandidateEmbeddings`.
    """

    def __init__(
        self,
        card: PreferenceCard,
        embeddings: CandidateEmbeddings,
        *,
        stances: Sequence[tuple[Stance, str]] = (),
        floor: float = RELEVANCE_FLOOR,
        temperature: float = RELEVANCE_TEMPERATURE,
        embedding_share: float = EMBEDDING_SHARE,
    ) -> None:
        if not temperature > 0 or not 0.0 <= embedding_share <= 1.0:
            raise PersonaValidationError(
                card.source,
                "scorer",
                f"temperature {temperature!r}, embedding_share {embedding_share!r}",
                "Use a positive temperature and an embedding share from 0 to 1.",
            )
        self.card = card
        self.embeddings = embeddings
        self.stances = tuple(s for s, _ in stances)
        self.sources = tuple(t for _, t in stances)
        self.floor = floor
        self.temperature = temperature
        self.embedding_share = embedding_share

    def bind(self, persona: Persona | None, statements: Sequence[str] = ()) -> PersonaScorer:
        """This scorer for ``persona`` (and the user's ``statements``)."""
        return PersonaScorer(
            self.card,
            self.embeddings,
            stances=persona_stances(persona, statements),
            floor=self.floor,
            temperature=self.temperature,
            embedding_share=self.embedding_share,
        )

    def weights(self, prompt: str) -> np.ndarray:
        """Each stance's signed weight for ``prompt`` (zeros: none bears on it)."""
        if not self.stances:
            return np.zeros(0)
        signs = np.array([1.0 if s.polarity == "like" else -1.0 for s in self.stances])
        if not prompt.strip():
            return signs / len(signs)
        rows = self.embeddings([*self.sources, prompt])
        relevance = rows[:-1] @ rows[-1]
        mask = relevance >= self.floor
        if not mask.any():
            return np.zeros(len(signs))
        top = float(relevance[mask].max())
        w = np.where(mask, np.exp((relevance - top) / self.temperature), 0.0)
        return signs * w / w.sum()

    def fit(self, prompt: str, candidates: Sequence[str]) -> np.ndarray:
        """``fit(candidate_j, stance_i)``, one row per candidate (see the class)."""
        texts = [s.text for s in self.stances]
        rows = self.embeddings([*texts, *candidates])
        cosine = rows[len(texts) :] @ rows[: len(texts)].T
        asked = content_words(prompt)
        # the prompt's words are the topic every candidate answers, not the preference,
        # unless they are all the stance has ("peanuts", asked about peanut snacks)
        wanted = [(content_words(t) - asked) or content_words(t) for t in texts]
        named = np.zeros_like(cosine)
        for j, candidate in enumerate(candidates):
            reading = read_polarity(candidate, default="like")
            negated = content_words(" ".join(reading.avoids))
            said = content_words(candidate) - negated
            for i, words in enumerate(wanted):
                if words:
                    named[j, i] = (len(said & words) - len(negated & words)) / len(words)
        share = self.embedding_share
        return share * cosine + (1 - share) * named

    def score(self, prompt: str, candidates: Sequence[str]) -> list[float]:
        if not candidates:
            return []
        weights = self.weights(prompt)
        if not weights.any():
            return [0.0] * len(candidates)
        values = self.fit(prompt, candidates) @ weights
        return check_scores(self.card.id, values, len(candidates))


@runtime_checkable
class PersonaConditioned(Protocol):
    """A scorer that must know whose request it scores (:class:`PersonaScorer`)."""

    card: PreferenceCard

    def bind(self, persona: Persona | None, statements: Sequence[str] = ()) -> PreferenceScorer: ...


def load_scorer(
    card: PreferenceCard,
    *,
    embeddings: CandidateEmbeddings | None = None,
    judge: Any = None,
    device: str = "cpu",
) -> PreferenceScorer:
    """The scorer of ``card``, its model loaded and checked now."""
    if card.scorer == "embedding_head":
        path = card.resolved_location
        assert path is not None
        head = PreferenceHead.load(path, source=card.source)
        return EmbeddingHeadScorer(card, head, embeddings or CandidateEmbeddings())
    if card.scorer == "sequence_classifier":
        return SequenceClassifierScorer(card, device=device)
    if card.scorer == "persona":
        return PersonaScorer(card, embeddings or CandidateEmbeddings())
    return LLMJudgeScorer(card, judge)
