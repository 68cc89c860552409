"""Deployable reflection graph: reflect on one finished turn and save the persona.

Input: ``{"user_id": ..., "turn_id": ..., "user": <user message>, "assistant": <reply>}``.
Output adds ``outcome``: the loss, gradients, applied and refused operations, the new
version. For apps that generate replies elsewhere and want only the learning step.
"""

from persona_plugin.reflection.graph import build_reflection_graph_from_settings

graph = build_reflection_graph_from_settings()
