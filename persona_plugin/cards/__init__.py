"""What the LoRA and preference-model hubs share: card folders and retrieval.

:class:`CardFolder` reads a hub's directories of YAML/JSON cards (per-file cache, unique
ids, a size cap); :class:`CardRetriever` turns a persona's text into a softmax mixture of
cards by embedding similarity, cached per persona version (:class:`LRUCache`).
"""

from persona_plugin.cards.folder import ID_PATTERN, MAX_CARD_BYTES, CardFolder
from persona_plugin.cards.retrieval import (
    CardRetriever,
    LRUCache,
    TextEmbedder,
    compact_persona_text,
)

__all__ = [
    "ID_PATTERN",
    "MAX_CARD_BYTES",
    "CardFolder",
    "CardRetriever",
    "LRUCache",
    "TextEmbedder",
    "compact_persona_text",
]
