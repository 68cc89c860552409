"""The preference-model hub: cards for reward models, their scorers, and retrieval by persona.

A preference (reward) model scores how well a candidate answer fits one preference:
brevity, formality, warmth, a content rule. Every scorer exposes one method,
``score(prompt, candidates) -> list[float]`` (higher is better), and MBR decoding
(:mod:`persona_plugin.mbr`) picks the candidate with the best weighted sum of normalised
scores. Three scorer types:

* ``embedding_head``: a small Bradley-Terry head (linear or one hidden layer) on the local
  sentence embeddings: the candidate's embedding, its cosine to the prompt's, and a few
  surface features (length, contractions, exclamations, ...). Trained from preference
  pairs in seconds on CPU (:mod:`persona_plugin.preference_training`); stored as a small
  ``.npz`` file.
* ``sequence_classifier``: a transformers sequence-classification reward model in a local
  folder (one logit, or two: the second minus the first), reading ``(prompt, candidate)``.
* ``llm_judge``: any LangChain chat model grading each candidate against the card's
  ``rubric`` with a number in ``scale``.

Cards are YAML files, one per model, in ``$PERSONA_HOME/prefs`` (and the demo models
bundled in ``persona_plugin/assets/prefs``; a user card with the same id replaces the
bundled one). Example (``$PERSONA_HOME/prefs/brevity.yaml``)::

    id: brevity
    description: Brief, concise, to-the-point answers; short replies without padding.
    opposite: Detailed, thorough, in-depth answers with long, complete explanations.
    kind: style
    scorer: embedding_head
    location: brevity.npz          # relative to the card's folder
    tags: [concise, short]

``opposite`` says what a *low* score means: a persona that asks for the opposite gets the
model with a negative weight (a persona wanting detail is served by the brevity model
reversed), so one model serves both poles.

A card's model is checked when it is loaded (:meth:`PreferenceHub.load`), not at first
use: a missing file, a head built for another embedding size, a classifier with three
labels, a judge card without a judge all raise :class:`PersonaValidationError` naming the
card and the field. A scorer that returns NaN raises :class:`PreferenceScoreError`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from persona_plugin.errors import PersonaError, PersonaNotFoundError, PersonaValidationError
from persona_plugin.lora_hub import _ID_PATTERN, MAX_CARD_BYTES, CardFolder
from persona_plugin.lora_retrieval import (
    CardRetriever,
    LRUCache,
    PersonaTextMode,
    TextEmbedder,
    _check_temperature,
    _check_top_k,
    _free_values,
)
from persona_plugin.persona import (
    Persona,
    _SafeDumper,
    _StrictSafeLoader,
    format_path,
    yaml_error,
)

PreferenceKind = Literal["behaviour", "style", "content", "format", "safety", "other"]
PREFERENCE_KINDS: tuple[str, ...] = PreferenceKind.__args__  # type: ignore[attr-defined]
ScorerType = Literal["embedding_head", "sequence_classifier", "llm_judge"]
SCORER_TYPES: tuple[str, ...] = ScorerType.__args__  # type: ignore[attr-defined]
#: the demo models that ship with the package, and their training data
BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "prefs"
_CARD_KEYS = "id, description, opposite, kind, scorer, location, rubric, scale, tags, sample_inputs"


class PreferenceScoreError(PersonaError):
    """A preference model returned something that is not a score (NaN, inf, too few)."""


# -- cards --------------------------------------------------------------------------------


class PreferenceCard(BaseModel):
    """What the hub knows about one preference model."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: str = Field(pattern=_ID_PATTERN, description="unique in the hub; the file's name")
    description: str = Field(min_length=1, description="what a high score means")
    opposite: str | None = Field(
        None, min_length=1, description="what a low score means; lets a persona ask for it"
    )
    kind: PreferenceKind
    scorer: ScorerType
    location: str | None = Field(
        None,
        min_length=1,
        validate_default=True,
        description="the model: a head file or a classifier folder",
    )
    rubric: str | None = Field(
        None, min_length=1, validate_default=True, description="what an LLM judge grades"
    )
    scale: tuple[float, float] = Field((0.0, 10.0), description="an LLM judge's score range")
    tags: list[str] = Field(default_factory=list)
    sample_inputs: list[str] = Field(default_factory=list)

    _path: Path | None = PrivateAttr(default=None)

    @field_validator("location")
    @classmethod
    def _location_fits_scorer(cls, value: str | None, info: ValidationInfo) -> str | None:
        scorer = info.data.get("scorer")
        if value is None and scorer in ("embedding_head", "sequence_classifier"):
            raise ValueError(f"scorer {scorer} needs a location (its model file or folder)")
        return value

    @field_validator("rubric")
    @classmethod
    def _rubric_fits_scorer(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("scorer") == "llm_judge":
            raise ValueError("scorer llm_judge needs a rubric (what the judge grades)")
        return value

    @field_validator("scale")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"{list(value)} is not a range [low, high] with low < high")
        return value

    @field_validator("tags", "sample_inputs")
    @classmethod
    def _non_empty_items(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise ValueError("items must be non-empty strings")
        return value

    @property
    def path(self) -> Path | None:
        """The card file it was read from (None for a card built in memory)."""
        return self._path

    @property
    def resolved_location(self) -> Path | None:
        """``location`` as a path, made absolute against the card's folder."""
        if self.location is None:
            return None
        path = Path(self.location.removeprefix("file://")).expanduser()
        if not path.is_absolute() and self._path is not None:
            path = (self._path.parent / path).resolve()
        return path

    @property
    def source(self) -> str:
        return str(self._path) if self._path is not None else f"preference card {self.id!r}"

    def embedding_texts(self) -> list[str]:
        """What retrieval embeds for a high score: description, tags, sample inputs."""
        text = self.description.strip()
        if self.tags:
            text += f" Tags: {', '.join(self.tags)}."
        return [text, *self.sample_inputs]

    @functools.cached_property
    def content_hash(self) -> str:
        """Changes whenever the card's content (or where it was read from) does."""
        data = json.dumps([self.to_dict(), str(self._path)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(data.encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_defaults=True)
        for key in ("id", "description", "kind", "scorer"):
            data[key] = getattr(self, key)
        order = _CARD_KEYS.split(", ")
        return {k: data[k] for k in order if k in data}

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_SafeDumper, sort_keys=False, allow_unicode=True)


def _describe(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "string_pattern_mismatch" and err["loc"][-1:] == ("id",):
        return (
            f"{err['input']!r} is not a valid id: use 1-128 letters, digits, _ . -, starting "
            "with a letter or digit (no spaces or slashes)"
        )
    if err["type"] == "literal_error":
        allowed = PREFERENCE_KINDS if err["loc"][-1:] == ("kind",) else SCORER_TYPES
        return f"{err['input']!r} is not allowed; use one of {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:]
    if err["type"] not in ("missing", "value_error"):
        shown = repr(err["input"])
        msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    return msg


def parse_card(data: object, *, source: str = "<dict>") -> PreferenceCard:
    """Validate plain data as a preference card, raising :class:`PersonaValidationError`."""
    if not isinstance(data, Mapping):
        raise PersonaValidationError(
            source,
            "",
            f"top level is a {type(data).__name__}, not a mapping",
            f"A preference card is a mapping with the keys {_CARD_KEYS}.",
        )
    if isinstance(data.get("scale"), list):  # YAML has no tuples; strict mode wants one
        data = {**data, "scale": tuple(data["scale"])}
    try:
        return PreferenceCard.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = [(format_path(tuple(e["loc"])), _describe(e)) for e in errors]
        hint = (
            f"A preference card has the keys {_CARD_KEYS}."
            if errors[0]["type"] == "extra_forbidden"
            else "Fix it; the docstring of persona_plugin.preferences shows an example card."
        )
        raise PersonaValidationError(
            source, problems[0][0], problems[0][1], hint, problems=problems
        ) from None


def load_card(path: str | os.PathLike[str]) -> PreferenceCard:
    """Read one card file (YAML or JSON)."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise PersonaValidationError(
            str(file), "", f"cannot read the card ({exc.strerror})", "Check the path."
        ) from None
    if len(raw) > MAX_CARD_BYTES:
        raise PersonaValidationError(
            str(file), "", f"card is {len(raw)} bytes", f"Cards are at most {MAX_CARD_BYTES}."
        )
    try:
        data = yaml.load(raw.decode("utf-8-sig"), Loader=_StrictSafeLoader)
    except UnicodeDecodeError as exc:
        raise PersonaValidationError(
            str(file), "", f"not UTF-8 (offset {exc.start})", "Save the card as UTF-8."
        ) from None
    except yaml.YAMLError as exc:
        raise yaml_error(exc, str(file)) from None
    card = parse_card(data, source=str(file))
    card._path = file
    return card


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
            from persona_plugin.embeddings import DIMENSIONS, MiniLMEmbeddingFunction

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


# -- the hub ------------------------------------------------------------------------------


class PreferenceHub:
    """Preference cards from ``directory`` (default ``$PERSONA_HOME/prefs``) and the bundled
    demo models, and their loaded scorers.

    Card reads are cached per file (size and modification time), so :meth:`cards` is cheap
    on every turn. One broken card fails the read, naming its file. Scorers load once per
    card content; :meth:`load` loads (and so checks) them all up front.

    ``embedder``: what embedding heads and retrieval embed with (default: the local
    MiniLM). ``judge``: the chat model of ``llm_judge`` cards.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        bundled: bool = True,
        embedder: Any = None,
        judge: Any = None,
        device: str = "cpu",
    ) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.bundled = bundled
        self.embeddings = (
            embedder if isinstance(embedder, CandidateEmbeddings) else CandidateEmbeddings(embedder)
        )
        self.judge = judge
        self.device = device
        self._folders = [
            CardFolder(
                d, load_card, hub="the preference hub", setting="prefs_dir", noun="preference"
            )
            for d in self.directories
        ]
        self._scorers: dict[str, PreferenceScorer] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_settings(cls, settings: Any = None, **options: Any) -> PreferenceHub:
        if settings is None:
            from persona_plugin.config import Settings

            settings = Settings.load()
        return cls(prefs_dir(settings), **options)

    def __repr__(self) -> str:
        return f"PreferenceHub({str(self.directory)!r}, bundled={self.bundled})"

    @property
    def directories(self) -> list[Path]:
        """Where cards are read from, later ones replacing earlier ones' ids."""
        dirs = [BUNDLED_DIR] if self.bundled else []
        return dirs + ([self.directory] if self.directory is not None else [])

    def cards(self) -> list[PreferenceCard]:
        """Every card, sorted by id (a user card replaces a bundled one with its id)."""
        with self._lock:
            merged: dict[str, PreferenceCard] = {}
            for folder in self._folders:
                merged.update(folder.cards())
            return sorted(merged.values(), key=lambda c: c.id)

    def __iter__(self) -> Iterator[PreferenceCard]:
        return iter(self.cards())

    def __len__(self) -> int:
        return len(self.cards())

    def __contains__(self, model_id: object) -> bool:
        return any(c.id == model_id for c in self.cards())

    def ids(self) -> list[str]:
        return [c.id for c in self.cards()]

    def get(self, model_id: str) -> PreferenceCard:
        for card in self.cards():
            if card.id == model_id:
                return card
        known = ", ".join(self.ids()) or "none"
        raise PersonaNotFoundError(
            f"preference model {model_id!r} is not in the hub "
            f"({', '.join(map(str, self.directories))}; known: {known}). Add its card with "
            "`persona prefs add FILE`."
        )

    def is_bundled(self, card: PreferenceCard) -> bool:
        return card.path is not None and card.path.parent == BUNDLED_DIR

    # -- scorers --------------------------------------------------------------------------

    def scorer(self, model_id: str | PreferenceCard) -> PreferenceScorer:
        """The loaded scorer of a card (loaded and checked on first request, then kept)."""
        card = model_id if isinstance(model_id, PreferenceCard) else self.get(model_id)
        key = card.content_hash
        with self._lock:
            found = self._scorers.get(key)
            if found is None:
                found = load_scorer(
                    card, embeddings=self.embeddings, judge=self.judge, device=self.device
                )
                self._scorers[key] = found
            return found

    def load(self, ids: Collection[str] | None = None) -> dict[str, PreferenceScorer]:
        """Load (and so check) the scorers of ``ids`` (default: every card) now."""
        cards = self.cards() if ids is None else [self.get(i) for i in ids]
        return {card.id: self.scorer(card) for card in cards}

    # -- writing --------------------------------------------------------------------------

    def add(
        self, card: PreferenceCard | str | os.PathLike[str], *, replace: bool = False
    ) -> PreferenceCard:
        """Validate ``card`` (a card or a card file), check its model loads, and write it
        into the hub's directory as ``<id>.yaml`` (a relative location made absolute)."""
        if self.directory is None:
            raise PersonaValidationError(
                "<hub>", "", "this hub has no directory to write to", "Pass directory=."
            )
        source = "<card>"
        if not isinstance(card, PreferenceCard):
            source = str(card)
            card = load_card(card)
        resolved = card.resolved_location
        if resolved is not None and str(resolved) != card.location:
            # a relative path is relative to the file it came from, not to the hub
            card = parse_card(card.to_dict() | {"location": str(resolved)}, source=source)
        existing = next((c for c in self.cards() if c.id == card.id), None)
        if existing is not None and not replace and not self.is_bundled(existing):
            raise PersonaValidationError(
                source,
                "id",
                f"preference model {card.id!r} is already in the hub ({existing.path})",
                "Pass replace=True (`persona prefs add --replace`) to overwrite it.",
            )
        # the model must load before the card is written: nothing half-added
        load_scorer(card, embeddings=self.embeddings, judge=self.judge, device=self.device)
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{card.id}.yaml"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{card.id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(card.to_yaml())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        stale = existing is not None and existing.path not in (None, target)
        if stale and not self.is_bundled(existing):  # type: ignore[arg-type]
            existing.path.unlink(missing_ok=True)  # type: ignore[union-attr]
        return self.get(card.id)


def prefs_dir(settings: Any) -> Path:
    """The user's preference hub: ``settings.prefs_dir``, else ``$PERSONA_HOME/prefs``."""
    directory = getattr(settings, "prefs_dir", None)
    return Path(directory).expanduser() if directory else Path(settings.home) / "prefs"


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
    return LLMJudgeScorer(card, judge)


# -- mixtures -----------------------------------------------------------------------------

#: ``((model id, signed weight), ...)``, absolute weights summing to 1, heaviest first
PreferenceWeights = tuple[tuple[str, float], ...]


def normalize_preferences(value: Any) -> PreferenceWeights:
    """``{id: weight}``, ``[(id, weight), ...]``, ids, a :class:`PreferenceMixture` or None
    as weights whose absolute values sum to 1.

    A negative weight uses the model reversed (prefer low scores). Zero weights are
    dropped; NaN, infinities, non-numbers and an id listed twice are errors.
    """
    if value is None:
        return ()
    if isinstance(value, PreferenceMixture):
        value = value.pairs()
    if isinstance(value, str):
        value = [value]
    items = list(value.items()) if isinstance(value, Mapping) else list(value)
    hint = "Pass preferences as {model_id: weight} or [(model_id, weight), ...]."
    pairs: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, str):
            item = (item, 1.0)
        if not isinstance(item, Sequence) or len(item) != 2:
            raise PersonaValidationError("preferences", "", f"{item!r} is not a pair", hint)
        model_id, weight = item
        if not isinstance(model_id, str) or not model_id:
            raise PersonaValidationError("preferences", "", f"{model_id!r} is not an id", hint)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise PersonaValidationError(
                "preferences", model_id, f"weight {weight!r} is not a number", hint
            )
        if not math.isfinite(weight):
            raise PersonaValidationError(
                "preferences", model_id, f"weight {weight!r} is not finite", "Use a real number."
            )
        if any(m == model_id for m, _ in pairs):
            raise PersonaValidationError("preferences", model_id, "listed twice", hint)
        if weight != 0:
            pairs.append((model_id, float(weight)))
    total = sum(abs(w) for _, w in pairs)
    return tuple(sorted(((m, w / total) for m, w in pairs), key=lambda p: -abs(p[1])))


@dataclass(frozen=True, slots=True)
class RetrievedPreference:
    id: str
    weight: float  # signed: negative means the model is used reversed
    score: float  # cosine similarity of the query to the matching pole
    kind: str

    @property
    def reversed(self) -> bool:
        return self.weight < 0


@dataclass(frozen=True, slots=True)
class PreferenceMixture:
    """The preference models retrieved for one (persona, input); ``|weights|`` sum to 1."""

    models: tuple[RetrievedPreference, ...]
    cached: bool = False

    def pairs(self) -> list[tuple[str, float]]:
        return [(m.id, m.weight) for m in self.models]

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.models]

    def weight(self, model_id: str) -> float:
        return next((m.weight for m in self.models if m.id == model_id), 0.0)

    def __len__(self) -> int:
        return len(self.models)

    def __bool__(self) -> bool:
        return bool(self.models)


def preference_persona_text(persona: Persona) -> str:
    """The parts of a persona that say which preference models apply: the preference
    section (styles, content, formats, reasoning, free keys) and the patterns."""
    parts: list[str] = []
    pref = persona.preference
    for label, values in (
        ("Preferred style", pref.style),
        ("Preferred content", pref.content),
        ("Preferred format", pref.format),
        ("Reasoning", pref.reasoning),
    ):
        if values:
            parts.append(f"{label}: {', '.join(values)}.")
    parts.extend(_free_values(pref.model_extra))
    patterns = [item.description for item in persona.pattern.items[:5]]
    if patterns:
        parts.append(f"Patterns: {'; '.join(patterns)}.")
    return " ".join(parts)


class PreferenceRetriever(CardRetriever):
    """Retrieves a weighted mixture of preference models for a persona and an input.

    As for LoRA adapters (:class:`LoraRetriever`), the query is the persona's text (its
    preference and pattern sections, :func:`preference_persona_text`) blended with the
    input; each card is matched by its description and, when it has one, by its
    ``opposite``. The better-matching pole decides the sign: a persona asking for detail
    gets the brevity model with a negative weight. The ``top_k`` cards by that similarity
    get softmax weights; results are cached per persona version and input.
    """

    def __init__(
        self,
        hub: PreferenceHub | Sequence[PreferenceCard],
        *,
        embedder: Any = None,
        top_k: int = 3,
        temperature: float = 0.1,
        kinds: Collection[str] | None = None,
        input_weight: float = 0.25,
        persona_text: PersonaTextMode | Callable[[Persona], str] = "compact",
        assembler: Any = None,
        cache_size: int = 4096,
    ) -> None:
        if embedder is None and isinstance(hub, PreferenceHub):
            embedder = hub.embeddings.embed_texts  # one embedding model for both
        super().__init__(
            embedder=embedder,
            top_k=top_k,
            temperature=temperature,
            input_weight=input_weight,
            persona_text=persona_text,
            assembler=assembler,
            cache_size=cache_size,
        )
        self.hub = hub
        self.kinds = _check_preference_kinds(kinds) if kinds is not None else None

    def compact_text(self, persona: Persona) -> str:
        return preference_persona_text(persona)

    def _candidates(
        self, kinds: frozenset[str] | None, allowed: frozenset[str] | None
    ) -> list[PreferenceCard]:
        cards = self.hub.cards() if isinstance(self.hub, PreferenceHub) else list(self.hub)
        return [
            c
            for c in cards
            if (kinds is None or c.kind in kinds) and (allowed is None or c.id in allowed)
        ]

    def retrieve(
        self,
        persona: Persona | str | None = None,
        input: str = "",
        *,
        top_k: int | None = None,
        temperature: float | None = None,
        kinds: Collection[str] | None = None,
        allowed: Collection[str] | None = None,
    ) -> PreferenceMixture:
        """The ``top_k`` preference models for ``persona`` (a persona or its text) and
        ``input``, with signed weights. Empty: no cards, or nothing to retrieve with."""
        k = self.top_k if top_k is None else _check_top_k(top_k)
        temp = self.temperature if temperature is None else _check_temperature(temperature)
        kind_set = self.kinds if kinds is None else _check_preference_kinds(kinds)
        allowed_set = frozenset(allowed) if allowed is not None else None
        cards = self._candidates(kind_set, allowed_set)
        hashes = tuple(c.content_hash for c in cards)
        persona_key, persona_text = self._persona_key(persona)
        key: Hashable = ("prefs", persona_key, input, k, temp, kind_set, allowed_set, hashes)
        hit = self._cached(key)
        if hit is not None:
            return PreferenceMixture(hit, cached=True)
        models = self._score(cards, persona, persona_key, persona_text, input, k, temp)
        self._remember(key, models)
        return PreferenceMixture(models)

    def _score(
        self,
        cards: list[PreferenceCard],
        persona: Persona | str | None,
        persona_key: Hashable,
        persona_text: str | None,
        input: str,
        k: int,
        temperature: float,
    ) -> tuple[RetrievedPreference, ...]:
        if not cards:
            return ()
        query = self._query(persona, persona_key, persona_text, input)
        if query is None:
            return ()
        positive = self._mean_vectors([(c.content_hash, c.embedding_texts()) for c in cards])
        similarity = positive @ query
        sign = np.ones(len(cards))
        with_opposite = [i for i, c in enumerate(cards) if c.opposite]
        if with_opposite:
            groups = [
                (cards[i].content_hash + ":opposite", [cards[i].opposite or ""])
                for i in with_opposite
            ]
            negative = self._mean_vectors(groups) @ query
            for j, i in enumerate(with_opposite):
                if negative[j] > similarity[i]:
                    similarity[i], sign[i] = negative[j], -1.0
        order, weights = self._softmax_top(similarity, k, temperature)
        return tuple(
            RetrievedPreference(
                cards[i].id, float(sign[i] * w), float(similarity[i]), cards[i].kind
            )
            for i, w in zip(order, weights, strict=True)
        )


def _check_preference_kinds(kinds: Collection[str]) -> frozenset[str]:
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = sorted(set(kinds) - set(PREFERENCE_KINDS))
    if unknown:
        raise PersonaValidationError(
            "kinds",
            "",
            f"unknown preference kinds {unknown}",
            f"Use some of {', '.join(PREFERENCE_KINDS)}.",
        )
    return frozenset(kinds)
