"""Routing each user to the model they prefer: stated at cold start, measured from their
ratings in the real interaction log, exploring the others; the graph serves and logs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from persona_plugin.adaptation.routing import EXPLORE_EVERY, MIN_RATINGS
from persona_plugin.errors import PersonaConfigError
from persona_plugin.graph import build_persona_graph
from persona_plugin.persona import Persona
from persona_plugin.store import PersonaStore


def model(name: str) -> FakeListChatModel:
    return FakeListChatModel(responses=[f"{name} says hi"] * 200)


class Chat:
    def __init__(self, tmp_path: Path, names: tuple[str, ...] = ("small", "big")) -> None:
        self.store = PersonaStore(f"sqlite:///{tmp_path / 'personas.db'}")
        models = {name: model(name) for name in names}
        self.graph = build_persona_graph(
            next(iter(models.values())),
            store=self.store,
            models=models,
            reflection="off",
            routing=True,
        )
        self.n = 0

    def turn(self, user: str, rating: int | None = None, **configurable: Any) -> dict:
        self.n += 1
        config = {"configurable": {"user_id": user, "thread_id": f"{user}-t", **configurable}}
        reply = self.graph.invoke({"messages": [("user", f"question {self.n}")]}, config)
        message = reply["messages"][-1]
        turn_id = message.response_metadata["persona"]["turn_id"]
        if rating is not None:
            self.graph.record_feedback(user, turn_id, "rating", rating=rating)
        route = message.response_metadata.get("route") or {}
        return {
            "model": route.get("model"),
            "reason": route.get("reason"),
            "turn": turn_id,
            "text": message.content,
        }


def test_stated_then_measured_then_the_better_one(tmp_path: Path) -> None:
    chat = Chat(tmp_path)
    first = chat.turn("cy")  # no persona yet, nothing stated: the first configured model
    assert (first["model"], first["reason"]) == ("small", "default")
    assert first["text"] == "small says hi"
    persona = Persona.new("ana")
    persona.preference.models = ["big"]
    chat.store.create("ana", persona)
    for _ in range(MIN_RATINGS):
        got = chat.turn("ana", rating=-1)  # she asked for big, and rates it down
        assert (got["model"], got["reason"]) == ("big", "stated")
    assert chat.graph.interactions.turn("ana", got["turn"]).model == "big"  # logged as routed
    tried = chat.turn("ana", rating=1)
    assert (tried["model"], tried["reason"]) == ("small", "explore")  # big is measured poor
    for _ in range(MIN_RATINGS - 1):
        chat.turn("ana", rating=1)
    settled = chat.turn("ana")
    assert (settled["model"], settled["reason"]) == ("small", "measured")
    assert chat.graph.router.route("ana").ratings == {"big": [5.0, -1.0], "small": [5.0, 1.0]}
    # bob's own ratings are his: ana's say nothing about him
    assert chat.turn("bob")["reason"] == "default"
    # a call that names its model is not routed
    named = chat.turn("ana", model="big")
    assert named["model"] is None and named["text"] == "big says hi"


def test_every_tenth_turn_explores_a_model_not_measured_yet(tmp_path: Path) -> None:
    chat = Chat(tmp_path, ("old", "new"))
    persona = Persona.new("ana")
    persona.preference.models = ["old"]
    chat.store.create("ana", persona)
    routes = [chat.turn("ana", rating=1)["reason"] for _ in range(2 * EXPLORE_EVERY)]
    assert routes.count("explore") == 2 and routes[EXPLORE_EVERY - 1] == "explore"
    assert routes[MIN_RATINGS] == "measured"  # old got its 5 ratings and a good mean


def test_routing_needs_models_and_the_log(tmp_path: Path) -> None:
    store = PersonaStore(f"sqlite:///{tmp_path / 'personas.db'}")
    with pytest.raises(PersonaConfigError, match="models="):
        build_persona_graph(model("a"), store=store, reflection="off", routing=True)
    with pytest.raises(PersonaConfigError, match="log on"):
        build_persona_graph(
            model("a"),
            store=store,
            models={"a": model("a")},
            reflection="off",
            interactions=None,
            routing=True,
        )


def test_the_server_routes_model_auto_and_says_where(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from persona_plugin.server.app import create_app

    token = "tok-routing-0123456789"
    store = PersonaStore(f"sqlite:///{tmp_path / 'personas.db'}")
    app = create_app(
        models={"small": model("small"), "big": model("big")},
        store=store,
        tokens={token: {"users": ["ana"]}},
        reflection="off",
        default_model="small",
        routing=True,
    )
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        listed = [m["id"] for m in client.get("/v1/models", headers=headers).json()["data"]]
        assert listed == ["small", "big", "auto"]

        def ask() -> dict:
            body = {"model": "auto", "user": "ana", "messages": [{"role": "user", "content": "hi"}]}
            reply = client.post("/v1/chat/completions", headers=headers, json=body)
            assert reply.status_code == 200, reply.text
            return reply.json()

        first = ask()
        assert first["model"] == "small" and first["persona_route"]["reason"] == "default"
        assert first["choices"][0]["message"]["content"] == "small says hi"
        for _ in range(MIN_RATINGS):
            turn = ask()["id"]
            rated = client.post(
                "/v1/feedback",
                headers=headers,
                json={"user": "ana", "turn_id": turn, "kind": "rating", "rating": -1},
            )
            assert rated.status_code == 200, rated.text
        moved = ask()
        assert (moved["model"], moved["persona_route"]["reason"]) == ("big", "explore")
        assert store.exists("ana")
    store.close()
