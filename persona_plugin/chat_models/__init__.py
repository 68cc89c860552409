"""LangChain chat models over the backends: multi-LoRA, MBR, and the registry by name.

:class:`MultiLoraChatModel` serves any :mod:`~persona_plugin.backends` backend with the
adapter mixture a persona retrieves; :class:`MBRChatModel` wraps any chat model with
minimum-Bayes-risk decoding over the persona's preference models;
:func:`resolve_chat_model` builds one by name (``local``, ``echo``, ``provider:model``);
:func:`local_chat_model` is the embedded default.
"""

from persona_plugin.chat_models.mbr import MBRChatModel, describe_mbr
from persona_plugin.chat_models.multi_lora import MultiLoraChatModel
from persona_plugin.chat_models.persona_aware import takes_persona
from persona_plugin.chat_models.registry import EchoChatModel, local_chat_model, resolve_chat_model

__all__ = [
    "EchoChatModel",
    "MBRChatModel",
    "MultiLoraChatModel",
    "describe_mbr",
    "local_chat_model",
    "resolve_chat_model",
    "takes_persona",
]
