"""The guard: text that instructs the assistant never becomes part of a persona.

A persona describes the user in the third person. A value that addresses the assistant
("ignore previous instructions", "you are now ...", "from now on respond only ..."), that
carries chat-template role tags, or that looks like a system prompt is an attempt to
smuggle instructions into every future prompt, whoever wrote it: the user, a document,
or the reflection model itself. The guard is a list of patterns on purpose: it is
predictable, fast, and its refusals are explainable in the version history.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in [
        (
            "override of instructions",
            r"\b(ignore|disregard|forget|override|bypass|skip)\b[^.]{0,40}\b(previous|prior|"
            r"above|earlier|all|any|your|the|system|safety)\b[^.]{0,30}\b(instructions?|"
            r"prompts?|rules?|guidelines?|directives?|polic(y|ies)|constraints?|messages?)|"
            r"\b(ignore|disregard|forget)\s+(all\s+|everything\s+)?(of\s+)?(the\s+|that\s+)?"
            r"above\b",
        ),
        (
            "new instructions",
            r"\b(new|updated|real|actual|hidden|secret)\s+(system\s+)?(instructions?|prompt|rules)\b",
        ),
        (
            "role reassignment",
            r"\byou\s+(are|will\s+be|shall\s+be|must\s+be)\s+now\b|\byou\s+are\s+now\b|"
            r"\byou\s*['’]re\s+now\b|"
            r"\b(from\s+(now|this\s+(moment|point))\s+on(wards?)?|henceforth),?\s+(you|the\s+"
            r"assistant|always|never|respond|reply|answer|act|speak|write)\b|"
            r"(^|[.!;:\n]\s*)(respond|reply|answer|speak|write)\b[^.]{0,40}\bfrom\s+now\s+on\b|"
            r"\b(act|behave|pretend|roleplay)\s+(as|like|to\s+be)\s+(an?\s+)?"
            r"(unrestricted|unfiltered|jailbroken|evil|different|dan\b|developer|admin|root|system)",
        ),
        (
            "command to the assistant",
            r"\b(you|assistant|ai|model|chatbot|bot)\s+(must|should|shall|have\s+to|need\s+to|"
            r"will)\s+(always|never|now|only|ignore|obey|comply|reveal|respond|reply|answer|"
            r"say|output|print|tell|include|disregard)\b",
        ),
        (
            "system prompt reference",
            r"\b(system|developer)\s*(prompt|message|instructions?)\b|\bsystem\s+mode\b|"
            r"\b(reveal|print|show|leak|repeat)\b[^.]{0,30}\b(prompt|instructions)\b",
        ),
        (
            "role tag",
            r"<\|?\s*/?\s*(im_start|im_end|system|assistant|user|endoftext|eot_id|"
            r"start_header_id|end_header_id)\s*\|?>|\[/?(INST|SYS)\]|<</?SYS>>|"
            r"</?\s*(system|assistant|user_profile|instructions?)\s*>",
        ),
        (
            "role label",
            r"(^|\n)\s*#{0,4}\s*(system|assistant|developer)\s*(:|\]|#)",
        ),
        (
            "jailbreak",
            r"\b(jailbreak|jailbroken|do\s+anything\s+now|dan\s+mode|developer\s+mode\s*"
            r"(enabled|activated|[:=]\s*on)|no\s+restrictions|without\s+(any\s+)?restrictions|"
            r"unfiltered\s+mode)\b|(^|[.!;:\n]\s*)(enable|enter|activate|switch\s+to)\s+"
            r"(developer|dan|god)\s+mode\b|\b(you|assistant)\b[^.]{0,20}\bin\s+developer\s+mode\b",
        ),
    ]
]


def _normalise(text: str) -> str:
    # full-width and other compatibility forms must not slip past the patterns, nor must
    # invisible format characters (zero-width spaces and joiners, soft hyphens, bidi
    # controls, tag characters: Unicode category Cf) split a word
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if c != "\u034f" and unicodedata.category(c) != "Cf")


# Cyrillic and Greek letters drawn like Latin ones ("іgnore prеvious іnstructions" with
# Cyrillic і and е reads the same to a model). NFKC keeps them apart, so they are folded
# to Latin for matching only: Russian or Greek text folds to non-words and stays benign.
_HOMOGLYPHS = str.maketrans(
    "аеорсухіјѕԁԛԝӏвкмнтАВЕКМНОРСТУХІЈЅԌαβεικνορτυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "aeopcyxijsdqwlbkmhtABEKMHOPCTYXIJSGaBeikvoptuxABEZHIKMNOPTYX",
)


def instruction_reason(text: str) -> str | None:
    """Why ``text`` reads as an instruction to the assistant, or ``None`` if it does not."""
    clean = _normalise(text)
    variants = [clean]
    # keys such as "ignore_previous_instructions" are rendered as words ("Ignore previous
    # instructions"), so they are read as words too (role tags keep their underscores)
    for variant in (clean.replace("_", " "), clean.translate(_HOMOGLYPHS)):
        if variant not in variants:
            variants.append(variant)
    for name, pattern in _PATTERNS:
        if any(pattern.search(variant) for variant in variants):
            return name
    return None


def find_instruction(value: Any) -> str | None:
    """The guard's reason for the first instruction-like string anywhere in ``value``."""
    if isinstance(value, str):
        return instruction_reason(value)
    if isinstance(value, dict):
        for key, item in value.items():
            reason = find_instruction(key) or find_instruction(item)
            if reason:
                return reason
    if isinstance(value, list):
        for item in value:
            reason = find_instruction(item)
            if reason:
                return reason
    return None
