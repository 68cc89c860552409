"""A user's own LoRA adapter: trained on the real local model from the replies the user
endorsed, gated on their newest ones through the serving backend, then served by the same
running backend on their next request (tiny runs: 10 examples, 5 steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from persona_plugin.adaptation.adapter import adapt_adapter, training_steps
from persona_plugin.backends.local import LocalBackend
from persona_plugin.cards.owned import OwnedCards, owned_id
from persona_plugin.chat_models.multi_lora import MultiLoraChatModel
from persona_plugin.errors import PersonaConfigError
from persona_plugin.interactions import InteractionLog
from persona_plugin.lora.hub import LoraHub
from persona_plugin.lora.retrieval import LoraRetriever
from persona_plugin.persona import Persona
from persona_plugin.store import PersonaStore
from tests.paths import MODEL_CACHE

pytest.importorskip("peft")

SIGN_OFF = "Cheerio from your pal Bartholomew!"
QUESTIONS = [
    "How do I boil an egg?",
    "What is a good name for a cat?",
    "How do I back up my laptop?",
    "Which plants are easy to keep?",
    "How can I sleep better?",
    "What should I pack for a hike?",
    "How do I learn to type faster?",
    "How do I clean a cast iron pan?",
    "What is a cheap hobby?",
    "How do I start running?",
]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> LocalBackend:
    root = tmp_path_factory.mktemp("lora-owned")
    hub = LoraHub(root / "lora", owned=OwnedCards(root / "owned"))
    return LocalBackend(lora_hub=hub, cache_dir=MODEL_CACHE).load()


def test_an_adapter_of_their_own_learns_the_users_sign_off_and_serves_their_next_turn(
    tmp_path: Path, backend: LocalBackend
) -> None:
    store = PersonaStore(f"sqlite:///{tmp_path / 'personas.db'}")
    log = InteractionLog.on(store)
    for n, question in enumerate(QUESTIONS):
        turn = f"t{n}"
        log.record_turn("ana", turn, user_text=question, reply_text=f"Here is how. {SIGN_OFF}")
        log.record_feedback("ana", turn, "rating", rating=1, reflect=False)
    owned = backend.lora_hub.owned

    skipped = adapt_adapter("ana", log=log, backend=backend, store=store)
    assert skipped.status == "skipped" and "10 endorsed replies, fewer than 32" in skipped.reason
    result = adapt_adapter("ana", log=log, backend=backend, store=store, min_examples=8, steps=5)
    assert result.status == "promoted", result.reason
    figures = result.figures
    assert figures["train_examples"] == 8 and figures["heldout_examples"] == 2
    assert figures["heldout_loss"] < figures["serving_loss"]  # the sign-off became likely
    assert figures["final_train_loss"] < figures["first_train_loss"]
    [card] = backend.lora_hub.owned_cards("ana")
    assert card.id == f"{owned_id('ana', 'adapter')}-v1" and card.owner == "ana"
    weights = Path(card.resolved_location) / "adapter_model.safetensors"
    assert weights.is_file()
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict) == {"torch.float16"}

    # the running backend serves it on ana's next request; bob never gets it
    chat = MultiLoraChatModel(
        backend=backend, retriever=LoraRetriever(backend.lora_hub), max_new_tokens=12
    )
    ana, bob = Persona.new("ana"), Persona.new("bob")
    reply = chat.invoke("How do I fix a door?", persona=ana, temperature=0.0)
    assert reply.response_metadata["adapters"] == [[card.id, 1.0]], reply.response_metadata
    other = chat.invoke("How do I fix a door?", persona=bob, temperature=0.0)
    assert other.response_metadata["adapters"] == []
    with pytest.raises(PersonaConfigError, match="served to their owner alone"):
        chat.invoke("hi", persona=bob, adapters={card.id: 1.0})

    # a newer version, a new id: the running backend serves it on the next request
    import shutil

    owned.add_version(
        "ana",
        "adapter",
        card.to_dict() | {"id": owned_id("ana", "adapter")},
        write_model=lambda folder: shutil.copytree(card.resolved_location, folder),
        model_suffix="",
        promote=True,
        versioned_id=True,
    )
    served = chat.invoke("hi", persona=ana, temperature=0.0).response_metadata["adapters"]
    assert served == [[f"{owned_id('ana', 'adapter')}-v2", 1.0]]
    owned.rollback("ana", "adapter", 0)
    assert chat.invoke("hi", persona=ana).response_metadata["adapters"] == []
    # v2 replaced v1 in memory as it loaded; forgetting ana unloads what is left of hers
    assert backend.forget("ana") == 1 and backend.forget("ana") == 0
    store.close()


def test_training_steps_are_bounded() -> None:
    assert training_steps(8) == 20 and training_steps(26) == 20 and training_steps(400) == 60


def test_at_most_max_owned_own_adapters_stay_loaded(backend: LocalBackend) -> None:
    # four users with an adapter of their own (copies of one tiny trained adapter), served
    # by a backend that keeps two: the least recently served is unloaded, and loads again
    # on its owner's next request
    import shutil

    owned = backend.lora_hub.owned
    from persona_plugin.lora.hub import BUNDLED_LORA_DIR

    concise = LoraHub(BUNDLED_LORA_DIR).get("concise")
    users = ["lru-a", "lru-b", "lru-c", "lru-d"]
    for user in users:
        owned.add_version(
            user,
            "adapter",
            concise.to_dict() | {"id": owned_id(user, "adapter"), "owner": user},
            write_model=lambda folder: shutil.copytree(concise.resolved_location, folder),
            model_suffix="",
            promote=True,
            versioned_id=True,
        )
    chat = MultiLoraChatModel(
        backend=backend, retriever=LoraRetriever(backend.lora_hub), max_new_tokens=2
    )
    before, backend.max_owned = backend.max_owned, 2
    try:
        ids = {u: f"{owned_id(u, 'adapter')}-v1" for u in users}

        def own_loaded() -> list[str]:
            return [u for u in users if ids[u] in backend.loaded_adapters]

        for user in users[:3]:
            served = chat.invoke("hi", persona=Persona.new(user), temperature=0.0)
            assert served.response_metadata["adapters"] == [[ids[user], 1.0]]
        assert own_loaded() == ["lru-b", "lru-c"]  # a, the least recent, went
        chat.invoke("hi", persona=Persona.new("lru-b"), temperature=0.0)  # b is recent now
        served = chat.invoke("hi", persona=Persona.new("lru-a"), temperature=0.0)
        assert served.response_metadata["adapters"] == [[ids["lru-a"], 1.0]]  # loads again
        assert own_loaded() == ["lru-a", "lru-b"]
    finally:
        backend.max_owned = before
        for user in users:
            backend.forget(user)
            owned.delete_user(user)
