"""Preference (reward) models: cards, scorers, their hub, retrieval from a persona, MBR.

:class:`PreferenceHub` (``from_settings``) holds the cards; scorers are an embedding
Bradley-Terry head, a sequence classifier, an LLM judge, or :class:`PersonaScorer` (the
persona's own stated likes and avoids, bound to each request's persona);
:class:`PreferenceRetriever`
weighs them for a persona (signed weights: a card's ``opposite``); :class:`MBRSelector`
picks the candidate with the best weighted score (minimum-Bayes-risk decoding).
"""

from persona_plugin.preferences.cards import PREFERENCE_KINDS, PreferenceCard, load_card, parse_card
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.mbr import MBRResult, MBRSelector
from persona_plugin.preferences.retrieval import PreferenceMixture, PreferenceRetriever
from persona_plugin.preferences.scorers import (
    EmbeddingHeadScorer,
    LLMJudgeScorer,
    PersonaConditioned,
    PersonaScorer,
    PreferenceHead,
    PreferenceScoreError,
    PreferenceScorer,
    SequenceClassifierScorer,
    persona_stances,
)

__all__ = [
    "PREFERENCE_KINDS",
    "EmbeddingHeadScorer",
    "LLMJudgeScorer",
    "MBRResult",
    "MBRSelector",
    "PersonaConditioned",
    "PersonaScorer",
    "PreferenceCard",
    "PreferenceHead",
    "PreferenceHub",
    "PreferenceMixture",
    "PreferenceRetriever",
    "PreferenceScoreError",
    "PreferenceScorer",
    "SequenceClassifierScorer",
    "load_card",
    "parse_card",
    "persona_stances",
]
