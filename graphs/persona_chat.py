"""Deployable persona chat graph (LangGraph CLI / Platform entry point).

Configured from PERSONA_* settings: store, memory, chat model (PERSONA_CHAT_MODEL),
reflection mode. The platform supplies the checkpointer; invoke with
``context={"user_id": ...}`` (or ``config={"configurable": {"user_id": ...}}``);
see graphs/README.md for the input, output and context schemas.
"""

from persona_plugin import build_persona_graph_from_settings

#: the graph and its parts: ``persona_graph.forget(user_id)``, ``persona_graph.close()``
persona_graph = build_persona_graph_from_settings()
#: what LangGraph's CLI and Platform load: the compiled graph itself
graph = persona_graph.compiled
