"""The guard's patterns: chat-template markup, role labels, overrides, jailbreak words.

Predictable and explainable: a pattern's name is the reason written into the version
history. Text is normalised first (NFKC, invisible format characters removed) and read
again with Cyrillic and Greek look-alike letters folded to Latin, so "іgnore prеvious
іnstructions" spelled with Cyrillic letters is still read.
"""

from __future__ import annotations

import re
import unicodedata

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


def normalise(text: str) -> str:
    """NFKC, without invisible format characters: what the patterns and features read."""
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


PATTERN_NAMES: tuple[str, ...] = tuple(name for name, _ in _PATTERNS)
#: patterns that refuse on their own: chat-template markup is never data about a user
DECISIVE = {"role tag"}


def as_read(text: str) -> str:
    """The text as the classifier reads it: normalised, ``_`` read as a space (keys such as
    "ignore_previous_instructions" render as words)."""
    return normalise(text).replace("_", " ")


def pattern_flags(text: str) -> tuple[list[float], str | None]:
    """One flag per pattern (1.0 where it matches), and a decisive reason if there is one."""
    clean = normalise(text)
    # role tags keep their underscores, so the raw normalised text is read as well
    plain_texts = (clean, clean.replace("_", " "))
    folded_text = clean.translate(_HOMOGLYPHS)
    flags: list[float] = []
    decisive: str | None = None
    for name, pattern in _PATTERNS:
        plain = any(pattern.search(t) for t in plain_texts)
        folded = not plain and folded_text != clean and bool(pattern.search(folded_text))
        flags.append(1.0 if plain or folded else 0.0)
        if decisive is None and (folded or (plain and name in DECISIVE)):
            # Latin words spelled with Cyrillic or Greek letters are written to slip by
            decisive = f"{name} (look-alike letters)" if folded else name
    return flags, decisive
