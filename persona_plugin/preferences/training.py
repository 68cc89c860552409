"""Training embedding-head preference models from preference pairs, in seconds on CPU.

A preference pair is ``(prompt, chosen, rejected)``. The head is trained as a
Bradley-Terry model: ``P(chosen beats rejected) = sigmoid(f(chosen) - f(rejected))``, with
``f`` linear (or one tanh layer) over the features of :class:`PreferenceHead`, L2
regularised, full-batch Adam. A fifth of the prompts is held out to report accuracy
(``holdout=0`` when the caller holds out its own, as slow adaptation does by time).

What trains here: the user's own models (``persona prefs train`` from a pairs file), the
per-user models of slow adaptation (:mod:`persona_plugin.adaptation`), and the bundled
demo models (:mod:`persona_plugin.lab.training.preferences`). Pairs files are JSONL (one
``{"prompt", "chosen", "rejected"}`` object a line) or YAML (a list of such mappings).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from persona_plugin._yaml import StrictSafeLoader, load_json_lines, read_text, yaml_error
from persona_plugin.errors import PersonaValidationError
from persona_plugin.preferences.cards import PreferenceCard, parse_card
from persona_plugin.preferences.scorers import (
    SURFACE_FEATURES,
    CandidateEmbeddings,
    PreferenceHead,
    surface_features,
)

HeadType = Literal["linear", "mlp"]


# -- pairs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True, slots=True)
class TrainingReport:
    pairs: int
    train_accuracy: float
    heldout_accuracy: float | None
    seconds: float


# -- pairs --------------------------------------------------------------------------------


def parse_pairs(items: Sequence[Any], *, source: str) -> list[PreferencePair]:
    """Validate ``[{"prompt", "chosen", "rejected"}, ...]``; errors name the item and key."""
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise PersonaValidationError(
                source, f"[{i}]", f"a {type(item).__name__}, not a mapping", _PAIR_HINT
            )
        unknown = sorted(set(item) - {"prompt", "chosen", "rejected"})
        if unknown:
            raise PersonaValidationError(source, f"[{i}]", f"unknown keys {unknown}", _PAIR_HINT)
        for key in ("chosen", "rejected"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise PersonaValidationError(
                    source, f"[{i}].{key}", "missing or not a non-empty string", _PAIR_HINT
                )
        prompt = item.get("prompt", "")
        if not isinstance(prompt, str):
            raise PersonaValidationError(source, f"[{i}].prompt", "not a string", _PAIR_HINT)
        pairs.append(PreferencePair(prompt, item["chosen"], item["rejected"]))
    if len(pairs) < 4:
        raise PersonaValidationError(
            source, "", f"{len(pairs)} pairs", "Training needs at least 4 preference pairs."
        )
    return pairs


_PAIR_HINT = 'Each pair is {"prompt": "...", "chosen": "...", "rejected": "..."}.'


def load_pairs(path: str | os.PathLike[str]) -> list[PreferencePair]:
    """Read a JSONL or YAML pairs file."""
    file = Path(path)
    text = read_text(file, what="pairs file", hint="Check the path.")
    if file.suffix == ".jsonl":
        items = load_json_lines(text, source=str(file), hint=_PAIR_HINT)
    else:
        try:
            items = yaml.load(text, Loader=StrictSafeLoader)
        except yaml.YAMLError as exc:
            raise yaml_error(exc, str(file)) from None
        if not isinstance(items, list):
            raise PersonaValidationError(str(file), "", "not a list of pairs", _PAIR_HINT)
    return parse_pairs(items, source=str(file))


# -- training -----------------------------------------------------------------------------


def _pair_features(
    pairs: Sequence[PreferencePair], embeddings: CandidateEmbeddings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chosen rows, rejected rows (embedding + relevance), and the raw surface rows of all."""
    prompts = sorted({p.prompt for p in pairs if p.prompt.strip()})
    texts = [t for p in pairs for t in (p.chosen, p.rejected)]
    rows = embeddings([*texts, *prompts])
    vec = dict(zip([*texts, *prompts], rows, strict=True))

    def part(text: str, prompt: str) -> np.ndarray:
        relevance = float(vec[text] @ vec[prompt]) if prompt.strip() else 0.0
        return np.append(vec[text], relevance)

    chosen = np.stack([part(p.chosen, p.prompt) for p in pairs])
    rejected = np.stack([part(p.rejected, p.prompt) for p in pairs])
    return chosen, rejected, surface_features(texts)


def train_head(
    pairs: Sequence[PreferencePair],
    embeddings: CandidateEmbeddings | None = None,
    *,
    head: HeadType = "linear",
    hidden: int = 32,
    l2: float = 1e-2,
    steps: int = 400,
    holdout: float = 0.2,
    seed: int = 0,
) -> tuple[PreferenceHead, TrainingReport]:
    """A Bradley-Terry head trained on ``pairs``; held-out accuracy on a ``holdout`` share."""
    import torch

    if head not in ("linear", "mlp"):
        raise PersonaValidationError("train", "head", f"{head!r}", "Use 'linear' or 'mlp'.")
    if len(pairs) < 4:
        raise PersonaValidationError(
            "train", "pairs", f"{len(pairs)} pairs", "Training needs at least 4 pairs."
        )
    started = time.monotonic()
    embeddings = embeddings or CandidateEmbeddings()
    chosen, rejected, surface = _pair_features(pairs, embeddings)
    mean, std = surface.mean(axis=0), np.clip(surface.std(axis=0), 1e-3, None)
    s = (surface - mean) / std
    x_c = np.hstack([chosen, s[0::2]]).astype(np.float32)
    x_r = np.hstack([rejected, s[1::2]]).astype(np.float32)
    # held out by prompt: pairs of one prompt share its answers, so a random split of
    # pairs would test on near-copies of the training data
    rng = np.random.default_rng(seed)
    prompts = sorted({p.prompt for p in pairs})
    n_held = 0
    if holdout > 0 and len(prompts) >= 5:
        held_prompts = set(rng.permutation(prompts)[: max(1, int(len(prompts) * holdout))])
        held = np.array([i for i, p in enumerate(pairs) if p.prompt in held_prompts], dtype=int)
        train = np.array(
            [i for i, p in enumerate(pairs) if p.prompt not in held_prompts], dtype=int
        )
        n_held = len(held)
    else:
        held, train = np.zeros(0, dtype=int), np.arange(len(pairs))

    torch.manual_seed(seed)
    dim = x_c.shape[1]
    if head == "mlp":
        model: Any = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )
    else:
        model = torch.nn.Linear(dim, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    tc, tr = torch.from_numpy(x_c[train]), torch.from_numpy(x_r[train])
    for _ in range(steps):
        optimizer.zero_grad()
        margin = (model(tc) - model(tr)).squeeze(-1)
        penalty = sum((p**2).sum() for n, p in model.named_parameters() if "weight" in n)
        loss = torch.nn.functional.softplus(-margin).mean() + l2 * penalty
        loss.backward()
        optimizer.step()

    params = [p.detach().numpy().astype(np.float32) for p in model.parameters()]
    if head == "mlp":
        weights = {"w1": params[0].T, "b1": params[1], "w2": params[2][0], "b2": params[3][0]}
    else:
        weights = {"w": params[0][0], "b": params[1][0]}

    def accuracy(idx: np.ndarray, trained: PreferenceHead) -> float:
        return float(np.mean(trained.forward(x_c[idx]) > trained.forward(x_r[idx])))

    result = PreferenceHead(
        embedding_dim=chosen.shape[1] - 1,
        surface_mean=mean.astype(np.float32),
        surface_std=std.astype(np.float32),
        weights=weights,
        info={},
    )
    report = TrainingReport(
        pairs=len(pairs),
        train_accuracy=accuracy(train, result),
        heldout_accuracy=accuracy(held, result) if n_held else None,
        seconds=round(time.monotonic() - started, 3),
    )
    result.info = {
        "head": head,
        "pairs": report.pairs,
        "train_accuracy": round(report.train_accuracy, 4),
        "heldout_accuracy": None
        if report.heldout_accuracy is None
        else round(report.heldout_accuracy, 4),
        "surface_features": list(SURFACE_FEATURES),
    }
    return result, report


def train_model(
    card_data: dict[str, Any],
    pairs: Sequence[PreferencePair],
    out_dir: str | os.PathLike[str],
    embeddings: CandidateEmbeddings | None = None,
    *,
    head: HeadType = "linear",
) -> tuple[PreferenceCard, TrainingReport]:
    """Train a head, write ``<id>.npz`` and its card ``<id>.yaml`` into ``out_dir``.

    The card is validated before anything is trained or written.
    """
    model_id = card_data.get("id")
    data = {**card_data, "scorer": "embedding_head", "location": f"{model_id}.npz"}
    card = parse_card(data, source=f"card of {model_id!r}")
    trained, report = train_head(pairs, embeddings, head=head)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    trained.save(out / f"{card.id}.npz")
    target = out / f"{card.id}.yaml"
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(card.to_yaml(), encoding="utf-8")
    os.replace(tmp, target)
    return card, report
