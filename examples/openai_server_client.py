"""The persona server behind the official ``openai`` client: only ``base_url`` changes.

Run: .venv/bin/python examples/openai_server_client.py
Starts the OpenAI-compatible persona server in-process (uvicorn in a thread, on a free
127.0.0.1 port, the offline echo model, one bearer token), asks it once plainly and once
streaming, patches the persona over HTTP (compare-and-set with If-Match), then shuts it
down. Data goes to a temporary directory.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time

import httpx
import uvicorn
from openai import OpenAI

from persona_plugin import Persona, PersonaStore, create_app
from persona_plugin.chat_models import EchoChatModel

TOKEN = "example-token-for-alice"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, PersonaStore(f"sqlite:///{tmp}/p.db") as store:
        alice = Persona.new("alice", name="Alice")
        alice.personality.interests.append("hiking")
        store.create("alice", alice)
        app = create_app(
            models={"persona-echo": EchoChatModel()},
            store=store,
            tokens={TOKEN: {"users": ["alice"]}},  # this token may act for alice only
            reflection="off",  # the echo model is no language model: nothing to learn
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes it over
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.05)
        try:
            # the app's code, as it would talk to OpenAI; only base_url (and the key) differ
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
            messages = [{"role": "user", "content": "Plan my weekend."}]
            reply = client.chat.completions.create(
                model="persona-echo", messages=messages, user="alice"
            )
            print("reply:", reply.choices[0].message.content)
            stream = client.chat.completions.create(
                model="persona-echo", messages=messages, user="alice", stream=True
            )
            text = "".join(
                chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
            )
            print("streamed:", text)
            # the persona itself, over HTTP: a merge patch, against the version read
            base, auth = (
                f"http://127.0.0.1:{port}/v1/personas/alice",
                {"Authorization": f"Bearer {TOKEN}"},
            )
            etag = httpx.get(base, headers=auth).headers["etag"]
            patch = {"patch": {"demographics": {"location": "Porto"}}, "reason": "moved"}
            done = httpx.patch(base, json=patch, headers={**auth, "If-Match": etag})
            print("patched to version", done.json()["version"], "ETag", done.headers["etag"])
            stale = httpx.patch(base, json=patch, headers={**auth, "If-Match": etag})
            print("again with the old ETag:", stale.status_code, stale.json()["error"]["code"])
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            sock.close()
        print("server stopped")


if __name__ == "__main__":
    main()
