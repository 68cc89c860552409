"""A LangGraph Platform client of the deployed persona graph (``langgraph dev`` or a
deployment): one turn and its turn id, then a streamed turn in ``messages`` mode.

Run: PERSONA_CHAT_MODEL=echo langgraph dev --no-browser --allow-blocking
then: .venv/bin/python examples/langgraph_platform_client.py [http://127.0.0.1:2024]
"""

from __future__ import annotations

import sys

from langgraph_sdk import get_sync_client


def main(url: str = "http://127.0.0.1:2024") -> None:
    client = get_sync_client(url=url)
    thread = client.threads.create()
    out = client.runs.wait(
        thread["thread_id"],
        "persona_chat",
        input={"messages": [{"role": "user", "content": "I live in Porto."}]},
        context={"user_id": "ana"},  # whose persona: every run names its user
    )
    print("reply:", out["messages"][-1]["content"])
    print("turn id given:", out["turn_id"].startswith("t"))
    print("output keys:", sorted(out))
    streamed = []
    for part in client.runs.stream(
        thread["thread_id"],
        "persona_chat",
        input={"messages": [{"role": "user", "content": "Any plans for the weekend?"}]},
        context={"user_id": "ana"},
        stream_mode="messages-tuple",
    ):
        if part.event == "messages":
            streamed.append(part.data[0]["content"])
    print("streamed:", streamed)


if __name__ == "__main__":
    main(*sys.argv[1:])
