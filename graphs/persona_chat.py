"""Deployable persona chat graph (LangGraph CLI / Platform entry point).

Configured from PERSONA_* settings: store, memory, chat model (PERSONA_CHAT_MODEL),
reflection mode. The platform supplies the checkpointer; invoke with
``config={"configurable": {"user_id": ..., "thread_id": ...}}``.
"""

from persona_plugin.graph import build_persona_graph_from_settings

graph = build_persona_graph_from_settings()
