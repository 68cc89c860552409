"""The LoRA hub (adapter cards) and the retrieval of a weighted adapter mixture from a persona.

Factories: :meth:`LoraHub.from_settings`; :class:`LoraRetriever` (LoraRetriever, Zhao et
al. 2024: the persona's text retrieves a weighted mixture, merged by weight to serve).
"""

from persona_plugin.lora.hub import (
    ADAPTER_KINDS,
    BUNDLED_LORA_DIR,
    AdapterCard,
    LoraHub,
    load_card,
    loads_card,
    parse_card,
)
from persona_plugin.lora.retrieval import LoraMixture, LoraRetriever, RetrievedAdapter

__all__ = [
    "ADAPTER_KINDS",
    "BUNDLED_LORA_DIR",
    "AdapterCard",
    "LoraHub",
    "LoraMixture",
    "LoraRetriever",
    "RetrievedAdapter",
    "load_card",
    "loads_card",
    "parse_card",
]
