"""The deployable graph under a real ``langgraph dev`` (langgraph-cli[inmem]), driven by
``langgraph_sdk`` as a LangGraph Platform client would: the schemas a client sees, the
user from the run's context, threads, ``runs.wait``, ``runs.stream`` in ``messages``
mode (the reflection call must not stream), and errors a client can read."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.paths import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("langgraph-dev")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # the graphs import this tree's code
        "PERSONA_HOME": str(home),
        "PERSONA_CHAT_MODEL": "echo",
        "PERSONA_REFLECTION": "inline",
        "LANGSMITH_TRACING": "false",
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
    }
    log = (home / "server.log").open("wb")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("langgraph")),
            "dev",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-browser",
            "--no-reload",
            # the graph's nodes are sync (SQLAlchemy, Chroma); LangGraph runs them in threads
            "--allow-blocking",
            "--config",
            str(REPO / "langgraph.json"),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"langgraph dev exited: {(home / 'server.log').read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"langgraph dev did not start: {(home / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_the_client_sees_the_public_schemas(server: str) -> None:
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server)
    (assistant,) = client.assistants.search(graph_id="persona_chat")
    schemas = client.assistants.get_schemas(assistant["assistant_id"])
    assert set(schemas["input_schema"]["properties"]) == {"messages"}
    assert set(schemas["output_schema"]["properties"]) == {"messages", "turn_id", "reflection"}
    context = schemas.get("context_schema") or schemas.get("config_schema") or {}
    assert {"user_id", "thread_id", "reflection", "mbr_n", "model"} <= set(
        context.get("properties", {})
    )


def test_a_thread_runs_turns_for_the_user_in_the_context(server: str) -> None:
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server)
    thread = client.threads.create()
    out = client.runs.wait(
        thread["thread_id"],
        "persona_chat",
        input={"messages": [{"role": "user", "content": "I live in Porto."}]},
        context={"user_id": "ana"},
    )
    assert out["messages"][-1]["content"].startswith('You said: "I live in Porto."')
    assert out["turn_id"].startswith("t")
    assert not {"persona", "system_prompt", "context", "user_id"} & set(out)
    # the second turn of the thread sees the first in its messages
    out = client.runs.wait(
        thread["thread_id"],
        "persona_chat",
        input={"messages": [{"role": "user", "content": "And you?"}]},
        config={"configurable": {"user_id": "ana"}},
    )
    assert [m["content"] for m in out["messages"] if m["type"] == "human"] == [
        "I live in Porto.",
        "And you?",
    ]


def test_messages_mode_streams_the_reply_and_not_the_reflection(server: str) -> None:
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server)
    thread = client.threads.create()
    texts = []
    for part in client.runs.stream(
        thread["thread_id"],
        "persona_chat",
        input={"messages": [{"role": "user", "content": "I love hiking."}]},
        context={"user_id": "bea", "reflection": "inline"},
        stream_mode="messages-tuple",
    ):
        if part.event == "messages":
            chunk, _metadata = part.data
            texts.append(chunk.get("content") or "")
    assert any(t.startswith('You said: "I love hiking."') for t in texts)
    # the echo model, reflecting, echoes the reflection prompt: none of it reaches the client
    assert not any("Current persona" in t or "persona (JSON)" in t for t in texts)


def test_a_missing_user_id_reads_as_such(server: str) -> None:
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server)
    thread = client.threads.create()
    out = client.runs.wait(
        thread["thread_id"],
        "persona_chat",
        input={"messages": [{"role": "user", "content": "hello"}]},
        raise_error=False,
    )
    assert "user_id" in str(out) and "internal error" not in str(out).lower()


def test_the_platform_client_example_runs_against_it(server: str) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "langgraph_platform_client.py"), server],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith('reply: You said: "I live in Porto."')
    assert lines[1:3] == [
        "turn id given: True",
        "output keys: ['messages', 'reflection', 'turn_id']",
    ]
    assert lines[3].startswith('streamed: [\'You said: "Any plans for the weekend?"')
    assert "Current persona" not in lines[3]


def test_the_platform_store_is_the_graphs_memory(server: str) -> None:
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server)
    thread = client.threads.create()
    client.runs.wait(
        thread["thread_id"],
        "persona_chat",
        input={"messages": [{"role": "user", "content": "My cat is called Miso."}]},
        context={"user_id": "cleo"},
    )
    # what the graph remembered of the turn, through the platform's store API
    found = client.store.search_items(("memories", "cleo"), query="the cat's name", limit=5)
    assert any("Miso" in str(item["value"]) for item in found["items"])
    assert client.store.search_items(("memories", "dora"), query="cat")["items"] == []

    # what a client puts there, the graph recalls: the echo model counts the facts its
    # prompt held; cleo's memory holds her one turn (2 items) and, now, the allergy
    def facts(user: str, text: str) -> int:
        out = client.runs.wait(
            client.threads.create()["thread_id"],
            "persona_chat",
            input={"messages": [{"role": "user", "content": text}]},
            context={"user_id": user, "reflection": "off"},
        )
        reply = out["messages"][-1]["content"]
        return int(reply.split("(echo model; ")[1].split(" facts")[0])

    client.store.put_item(("memories", "cleo"), "allergy", {"text": "Cleo is allergic to nuts"})
    assert facts("cleo", "Any snack ideas with nuts?") == 3
    # the same history without the stored item: one fact fewer
    client.runs.wait(
        client.threads.create()["thread_id"],
        "persona_chat",
        input={"messages": [{"role": "user", "content": "My cat is called Miso."}]},
        context={"user_id": "dora"},
    )
    assert facts("dora", "Any snack ideas with nuts?") == 2
