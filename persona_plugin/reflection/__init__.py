"""Fast adaptation: reflection on a finished turn edits the persona as a new version.

A *language loss* judges the turn, *language gradients* say what each field should change,
and the code-side optimizer applies typed operations (agent symbolic learning, Zhou et al.
2024). Reflectors: :class:`Reflector` on any chat model, :class:`LocalReflector` on the
local model (its reflection adapter, schema-bounded decoding); :func:`reflector_for` picks
one. :func:`reflect_and_save` applies and saves; :class:`ReflectionWorker` runs it after
the reply, on the turns and feedback queued in the interaction log; :class:`ReflectionGate`
skips turns that teach nothing; :class:`FeedbackReader` reads what a comment or an edit on
a reply asks for (how the local reflector reads feedback); :func:`build_reflection_graph`
is a graph of its own.
"""

from persona_plugin.reflection.apply import ReflectionJob, reflect_and_save
from persona_plugin.reflection.feedback_reader import FeedbackReader
from persona_plugin.reflection.gate import ReflectionGate
from persona_plugin.reflection.graph import build_reflection_graph
from persona_plugin.reflection.local import LocalReflector
from persona_plugin.reflection.reflector import Reflector, reflector_for
from persona_plugin.reflection.types import (
    FeedbackNote,
    Gradient,
    LanguageLoss,
    MemoryFact,
    ReflectionOutcome,
    ReflectionOutput,
    ReflectionTurn,
)
from persona_plugin.reflection.worker import ReflectionWorker

__all__ = [
    "FeedbackNote",
    "FeedbackReader",
    "Gradient",
    "LanguageLoss",
    "LocalReflector",
    "MemoryFact",
    "ReflectionGate",
    "ReflectionJob",
    "ReflectionOutcome",
    "ReflectionOutput",
    "ReflectionTurn",
    "ReflectionWorker",
    "Reflector",
    "build_reflection_graph",
    "reflect_and_save",
    "reflector_for",
]
