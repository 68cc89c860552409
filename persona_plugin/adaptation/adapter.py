"""A user's own LoRA adapter on the local model, trained from the replies they endorsed.

Once a user's log gives at least ``min_examples`` supervised examples (default 32: replies
rated +1 and the user's edited replies, :mod:`persona_plugin.adaptation.data`), a small
LoRA (rank 4 on the attention's q and v projections, saved in float16) is trained on the
older 80% with :func:`~persona_plugin.lora.training.train_lora`, on CPU, in its own copy of
the local model. The gate holds out the newest 20% (at least 2) and compares the mean
per-token loss of those replies (how likely the model finds what the user wanted,
:func:`~persona_plugin.lora.training.reply_loss`) under:

* **serving**: the adapter mixture that serves the user now (retrieved from their persona
  over the adapters the backend serves, with their current own adapter, if any);
* **candidate**: the same mixture with the candidate in the own adapter's place, at
  :data:`~persona_plugin.cards.retrieval.OWN_WEIGHT` (all of it when nothing else is
  retrieved), merged by the backend exactly as it would be served.

Promoted only if its loss is strictly lower. Either way the candidate is a version (its card
records both losses, the counts and the data span); a rejected one's weights are removed.
The card id carries the version (``own-lora-<hash>-v<N>``), so a running local backend
loads a newly promoted adapter on the user's next request, with no restart.
"""

from __future__ import annotations

import time
from typing import Any

from persona_plugin.adaptation.data import (
    HOLDOUT,
    SupervisedExample,
    TrainingData,
    persona_of,
    split,
    training_data,
)
from persona_plugin.adaptation.preference import AdaptationResult
from persona_plugin.cards.owned import OwnedCards, owned_id
from persona_plugin.cards.retrieval import mix_in_own
from persona_plugin.errors import PersonaConfigError
from persona_plugin.lora.retrieval import LoraMixture, LoraRetriever, RetrievedAdapter
from persona_plugin.lora.training import TrainingExample, reply_loss, train_lora

#: a user needs this many endorsed replies before an adapter of their own is trained
MIN_EXAMPLES = 32
KIND = "adapter"
RANK = 4
TARGET_MODULES = ("q_proj", "v_proj")


def _chat(example: SupervisedExample) -> TrainingExample:
    return TrainingExample.of([{"role": "user", "content": example.prompt}], example.reply)


def training_steps(examples: int, batch_size: int = 4) -> int:
    """About three passes over the examples, between 20 and 60 optimizer steps."""
    return max(20, min(60, 3 * examples // batch_size))


def adapt_adapter(
    user_id: str,
    *,
    log: Any,
    backend: Any,
    store: Any = None,
    owned: OwnedCards | None = None,
    min_examples: int = MIN_EXAMPLES,
    holdout: float = HOLDOUT,
    steps: int | None = None,
    dry_run: bool = False,
    data: TrainingData | None = None,
    embeddings: Any = None,
) -> AdaptationResult:
    """Train, gate and version ``user_id``'s own adapter (see the module).

    ``backend``: the :class:`~persona_plugin.backends.local.LocalBackend` that serves the
    user (its LoRA hub finds their adapters, and the gate measures through it); ``store``:
    where their persona is; ``steps``: optimizer steps (default :func:`training_steps`).
    """
    hub = getattr(backend, "lora_hub", None)
    in_process = callable(getattr(backend, "serving", None)) and hasattr(backend, "unload")
    if hub is None or not in_process or not getattr(backend, "serves_owned_adapters", False):
        raise PersonaConfigError(
            "a user's own adapter is trained for the local backend with a LoRA hub "
            "(LocalBackend(lora_hub=LoraHub.from_settings())): it is what serves it."
        )
    owned = owned or hub.owned
    data = data or training_data(log, user_id, embeddings=embeddings)
    examples = data.examples
    counts = {
        "examples": len(examples),
        "min_examples": min_examples,
        "left_out": dict(data.left_out),
    }
    if len(examples) < min_examples:
        return AdaptationResult(
            user_id,
            KIND,
            "skipped",
            f"{len(examples)} endorsed replies, fewer than {min_examples}",
            figures=counts,
        )
    train, held = split(examples, holdout)
    steps = steps or training_steps(len(train))
    counts |= {"train_examples": len(train), "heldout_examples": len(held), "steps": steps}
    if dry_run:
        return AdaptationResult(
            user_id,
            KIND,
            "planned",
            f"{len(examples)} endorsed replies (at least {min_examples}): would train "
            f"{steps} steps on {len(train)} and judge on the newest {len(held)}",
            figures=counts,
        )
    started = time.monotonic()
    reports: list[Any] = []

    def write_model(folder: Any) -> None:
        reports.append(
            train_lora(
                [_chat(e) for e in train],
                folder,
                model_dir=backend.model_path,  # the model the backend serves
                rank=RANK,
                alpha=2 * RANK,
                target_modules=TARGET_MODULES,
                steps=steps,
                save_dtype="float16",
            )
        )

    card = {
        "id": owned_id(user_id, KIND),
        "base_model": backend.model_name,
        "description": f"How user {user_id} likes to be answered, from their own feedback.",
        "kind": "preference",
        "rank": RANK,
        "target_modules": list(TARGET_MODULES),
        "owner": user_id,
        "training": {"status": "candidate"},
    }
    version = owned.add_version(
        user_id,
        KIND,
        card,
        write_model=write_model,
        model_suffix="",
        promote=False,
        versioned_id=True,
    )
    trained_seconds = time.monotonic() - started
    candidate = f"{owned_id(user_id, KIND)}-v{version}"
    gate = _Gate(backend, persona_of(store, user_id), hub)
    held_chats = [(e.prompt, _chat(e)) for e in held]
    try:
        serving = gate.loss(held_chats, None)
        with_candidate = gate.loss(held_chats, candidate)
    except BaseException as exc:
        # no candidate left behind to be found again: its card says why, its weights go
        failed = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500], **counts}
        owned.update_training(user_id, KIND, version, failed, promote=False)
        owned.remove_model(user_id, KIND, version)
        backend.unload(candidate)
        raise
    promote = with_candidate < serving
    status = "promoted" if promote else "rejected"
    report = reports[0]
    figures = counts | {
        "heldout_loss": round(with_candidate, 4),
        "serving_loss": round(serving, 4),
        "first_train_loss": round(report.first_loss, 4),
        "final_train_loss": round(report.final_loss, 4),
        "serving_version": owned.serving(user_id, KIND),
        "serving_adapters": gate.serving_ids,
        "trained_on": [train[0].created_at, train[-1].created_at],
        "judged_on": [held[0].created_at, held[-1].created_at],
        "train_seconds": round(trained_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    if log.count_turns(user_id) == 0:
        # the user was forgotten while this ran: nothing trained on their data may stay
        backend.unload(candidate)
        owned.delete_user(user_id)
        return AdaptationResult(user_id, KIND, "skipped", "the user was forgotten meanwhile")
    owned.update_training(user_id, KIND, version, {"status": status, **figures}, promote=promote)
    if not promote:
        owned.remove_model(user_id, KIND, version)
        backend.unload(candidate)
    verdict = "beat" if promote else "did not beat"
    reason = (
        f"held-out reply loss {with_candidate:.3f} {verdict} the serving {serving:.3f} "
        f"on the newest {len(held)} endorsed replies"
    )
    return AdaptationResult(user_id, KIND, status, reason, version, figures)


class _Gate:
    """The loss of held-out replies under the adapters serving the user now, or with a
    candidate in their own adapter's place, measured through the serving backend."""

    def __init__(self, backend: Any, persona: Any, hub: Any) -> None:
        self.backend, self.persona = backend, persona
        self.retriever = LoraRetriever(hub)
        self.serving_ids: list[str] = []

    def _mixture(self, prompt: str, candidate: str | None) -> list[tuple[str, float]]:
        served = self.backend.adapter_ids
        if candidate is not None:  # in the own adapter's place, as retrieval would serve it
            shared = self.retriever.retrieve(self.persona, prompt, allowed=served, owned=False)
            mine = [RetrievedAdapter(candidate, 1.0, 1.0, "preference")]
            return LoraMixture(mix_in_own(shared.adapters, mine, self.retriever.own_weight)).pairs()
        pairs = self.retriever.retrieve(self.persona, prompt, allowed=served).pairs()
        self.serving_ids = sorted(set(self.serving_ids) | {a for a, _ in pairs})
        return pairs

    def loss(self, held: list[tuple[str, TrainingExample]], candidate: str | None) -> float:
        total = 0.0
        for prompt, chat in held:
            with self.backend.serving(self._mixture(prompt, candidate)):
                total += reply_loss(self.backend.model, self.backend.tokenizer, [chat])
        return total / len(held)
