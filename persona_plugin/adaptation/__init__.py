"""Slow adaptation: what a user's feedback trains for them, gated and versioned.

:func:`training_data` draws preference pairs and supervised examples from a user's
interaction log; :func:`adapt_preference_model` trains the user's own preference model from
them and promotes it only if it beats what serves them now on their newest pairs. Versions
live in :class:`~persona_plugin.cards.owned.OwnedCards`; ``persona adapt`` runs it.
"""

from persona_plugin.adaptation.data import (
    LoggedPair,
    SupervisedExample,
    TrainingData,
    training_data,
)
from persona_plugin.adaptation.preference import (
    HOLDOUT,
    MIN_PAIRS,
    AdaptationResult,
    adapt_preference_model,
)

__all__ = [
    "HOLDOUT",
    "MIN_PAIRS",
    "AdaptationResult",
    "LoggedPair",
    "SupervisedExample",
    "TrainingData",
    "adapt_preference_model",
    "training_data",
]
