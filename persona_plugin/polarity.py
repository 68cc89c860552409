"""Polarity: what a statement of preference says the user likes, and what it says they avoid.

"I strongly dislike mobile games and prefer board games" holds two stances: *avoid* "mobile
games", *like* "board games". A persona that keeps only the words "mobile games" keeps the
opposite of what the user meant, so every path that grounds a persona edit or a preference
score in the user's words reads them through :func:`read_polarity` first:

* the optimizer (:mod:`persona_plugin.reflection.optimizer`) refuses a value that drops a
  negation its evidence holds (:func:`contradiction`), and lets it into
  ``preference.avoid`` instead;
* the persona-conditioned preference scorer (``scorer: persona``,
  :class:`~persona_plugin.preferences.scorers.PersonaScorer`) rewards candidates close to
  the likes and penalises those close to the avoids.

How it reads, deterministically (regular expressions, no model; about 5 µs a character on a
loaded 2-core machine, linear in the length): the text is cut into sentences (``.``, ``!``,
``?``, ``;``, new lines); in each, *cues* are found left to right, longest first. A cue
opens a stance whose object is the text after it, up to the next cue or clause boundary
(", so I", " because", " but", " due to", ...), cleaned of connectives ("to", "and",
"whenever possible"). Cues (:data:`AVOID_CUES`, :data:`LIKE_CUES`, :data:`CONTRAST_CUES`):

* avoid: avoid, stay away from, steer clear of, dislike, hate, can't stand, detest, loathe,
  aversion to, opposed to, allergic to, intolerant of, phobia of, afraid of, tired of, not
  a fan of, prefer not to, would rather not, refuse to, no longer, never, without, lack,
  free of, no (at a clause's start or after "with", "want", "strictly", ...), and a
  negation before a like-verb ("don't enjoy", "do not really like") or before any verb
  ("I don't eat meat": avoid "eat meat");
* like: like (as a verb: after "I", "really", "would", ...), love, enjoy, prefer, want, a
  preference for, learn best through, fond of, fan of, keen on, interested in, passionate
  about, only, strictly, always, stick to, favourite, and negated idioms that mean a like
  ("can't live without", "can't get enough of", "don't mind", "never miss");
* contrast: rather than, instead of, as opposed to, in place of, and "over" after a
  "prefer" ("than" after a "rather"): the object is avoided, and what precedes it (if no
  cue does) is liked;
* evaluation: "I find flashcards ineffective" (avoid "flashcards"), "I find podcasts
  helpful" (like), "I find it tedious to queue" (avoid "queue"), "... is not for me",
  "... is a dealbreaker".

An avoidance of what a relative clause negates is a like ("I avoid shops that do not
accept cards": like "accept cards"), and a pronoun in a short object names the stance just
read ("I find crowded gyms intimidating and prefer not to visit them").

Idioms with a negation that state nothing ("not only", "no matter", "I don't know", "not
sure", ...) are read as no stance. A sentence without a cue is no stance, unless the caller
says what its field means (``default="like"`` for ``preference.content``, ``"avoid"`` for
``preference.avoid``): then it is one stance of that polarity, and the text before its first
cue is one too ("recipes without nuts" in a like-field: like "recipes", avoid "nuts").

Limits, on purpose (a reader this small cannot do better, and says so): whose stance it is
is not read ("my son hates broccoli" is read as the speaker's avoid); sarcasm,
hypotheticals and questions are read literally ("would you avoid X?" reads as avoid "X");
the scope of a negation is the rest of its clause ("I don't like X and Y" avoids "X and Y"
as one object), and a double negation is read only in the relative-clause form above;
identities that imply an avoidance ("I'm vegan") and comparatives ("more than", "prefer X
to Y") are not read; "-free" words stay inside their object ("gluten-free bread" is one
like); what things are is not known ("I avoid gory games" cannot tell that a survival
horror title is gory). English only.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Polarity = Literal["like", "avoid"]

# -- the lexicon ---------------------------------------------------------------------------

#: a negation: "do not", "don't", "never", "no longer", ...
_NOT = (
    r"(?:do\s+not|don'?t|does\s+not|doesn'?t|did\s+not|didn'?t|is\s+not|isn'?t|"
    r"are\s+not|aren'?t|was\s+not|wasn'?t|will\s+not|won'?t|would\s+not|wouldn'?t|"
    r"can\s*not|can'?t|could\s+not|couldn'?t|never|no\s+longer|not|hardly|rarely)"
)
#: words a negation may stand apart from its verb by ("don't really like")
_FILLER = r"(?:\s+(?:really|particularly|very|much|exactly|actually|even|always|usually))*"
#: negated phrases that mean a like (read before any negation)
LIKE_IDIOMS = (
    r"(?:can'?t|cannot|couldn'?t)\s+(?:live|do)\s+without",
    r"(?:can'?t|cannot)\s+get\s+enough\s+of",
    r"(?:can'?t|cannot)\s+resist",
    r"never\s+(?:get\s+tired|tire)\s+of",
    r"never\s+say\s+no\s+to",
    r"(?:do\s+not|don'?t)\s+mind",
    r"(?:never|wouldn'?t)\s+miss",
    r"(?:can'?t|cannot)\s+wait\s+(?:to|for)",
)
#: like-phrases that hold a "not" or a "rather": read before "rather" and "not" alone
AVOID_IDIOMS = (
    r"(?:(?:i|we|they|you|he|she)'d|would)\s+(?:much\s+)?rather\s+not",
    r"rather\s+not",
    r"prefer(?:s)?\s+not\s+to",
    r"not\s+(?:really\s+|very\s+|much\s+)?into",
)
#: phrases that state a like when nothing negates them (regular expressions)
LIKE_CUES = (
    r"(?:a\s+)?(?:strong\s+|clear\s+|real\s+|definite\s+)?preference\s+(?:for|towards?)",
    r"(?:learn|learns|work|works|study|studies)\s+best\s+(?:through|with|by|in|from|when)",
    r"(?:(?:i|we|they|you|he|she)'d|would)\s+(?:much\s+)?rather",
    r"(?:(?:i|we|they|you|he|she)'d|would)\s+(?:really\s+)?(?:like|love)",
    r"(?:a\s+(?:big\s+|huge\s+|great\s+)?)?fan\s+of",
    r"fond\s+of",
    r"keen\s+on",
    r"(?:i'm|we're|they're|am|are|really|very)\s+into",
    r"interested\s+in",
    r"passionate\s+about",
    r"crazy\s+about",
    r"stick(?:s)?\s+(?:to|with)",
    r"go\s+for",
    r"opt\s+for",
    r"(?:my\s+)?favou?rites?(?:\s+[\w-]+){0,2}?\s+(?:is|are)",
    r"(?:my\s+)?favou?rites?",
    r"prefer(?:s|red|ring)?",
    r"enjoy(?:s|ed|ing)?",
    r"lov(?:e|es|ed|ing)",
    r"like(?:s|d)?",
    r"adore(?:s|d)?",
    r"appreciate(?:s|d)?",
    r"favou?r(?:s|ed)?",
    r"want(?:s|ed)?",
    r"wish(?:es)?\s+for",
    r"only",
    r"strictly",
    r"exclusively",
    r"always",
)
#: phrases that state an avoidance (regular expressions)
AVOID_CUES = (
    r"stay(?:s|ing)?\s+away\s+from",
    r"keep(?:s|ing)?\s+away\s+from",
    r"steer(?:s|ing)?\s+clear\s+of",
    r"(?:can'?t|cannot)\s+(?:stand|bear|tolerate|handle|abide)",
    r"(?:a\s+|an\s+)?(?:strong\s+|real\s+|deep\s+)?aversion\s+(?:to|towards)",
    r"averse\s+to",
    r"opposed\s+to",
    r"(?:i'm|am|is|are)\s+against",
    r"allergic\s+to",
    r"(?:an\s+)?allerg(?:y|ies)\s+to",
    r"intoleran(?:t|ce)\s+(?:to|of)",
    r"(?:a\s+)?phobia\s+of",
    r"(?:afraid|scared|terrified|frightened|fearful)\s+of",
    r"(?:a\s+)?fear\s+of",
    r"(?:tired|sick|weary)\s+of",
    r"fed\s+up\s+with",
    r"bored\s+(?:of|by|with)",
    r"uncomfortable\s+with",
    r"(?:put|turned)\s+off\s+by",
    r"(?:annoyed|irritated|frustrated|disgusted)\s+(?:by|with)",
    r"refuse(?:s)?\s+to",
    r"cut(?:ting)?\s+out",
    r"g(?:a|i)ve\s+up(?:\s+on)?",
    r"anything\s+but",
    r"no\s+more",
    r"no\s+longer",
    r"free\s+(?:of|from)",
    r"without",
    r"avoid(?:s|ed|ing)?",
    r"dislik(?:e|es|ed|ing)",
    r"hat(?:e|es|ed|ing)",
    r"detest(?:s|ed)?",
    r"loath(?:e|es|ed)",
    r"despis(?:e|es|ed)",
    r"abhor(?:s|red)?",
    r"shun(?:s|ned)?",
    r"exclud(?:e|es|ing)",
    r"skip(?:s|ping)?",
    r"lack(?:s|ing)?",
    r"no",
)
#: the object after these is avoided; what comes before them is liked
CONTRAST_CUES = (
    r"rather\s+than",
    r"instead\s+of",
    r"as\s+opposed\s+to",
    r"in\s+place\s+of",
    r"over",
    r"than",
)
#: idioms with a negation or a cue word that state no preference: consumed, read as nothing
NEUTRAL_CUES = (
    r"not\s+only",
    r"not\s+just",
    r"not\s+(?:sure|certain)",
    r"no\s+(?:matter|idea|problem|worries|doubt|one|way\s+to\s+know)",
    r"never\s+mind",
    r"not\s+yet",
    r"(?:do\s+not|don'?t|did\s+not|didn'?t)\s+(?:know|remember|understand|think|forget|have\s+to|need\s+to)",
    r"(?:can'?t|cannot)\s+(?:remember|find|figure|decide|tell|understand)",
)
_NEG_ADJECTIVES = (
    "ineffective|boring|tedious|dull|annoying|irritating|frustrating|overwhelming|"
    "unpleasant|off-putting|distracting|useless|pointless|overrated|unbearable|"
    "disgusting|gross|stressful|exhausting|draining|tiring|confusing|unhelpful|"
    "disorienting|nauseating|intimidating|unappealing|unappetizing|repetitive|monotonous|"
    "uninspiring|unnecessary|impractical|inconvenient|unreliable|unsettling|creepy|scary|"
    "a\\s+waste\\s+of\\s+time|not\\s+for\\s+me|a\\s+(?:deal-?breaker|no-go|turn-off)"
)
_POS_ADJECTIVES = (
    "effective|helpful|useful|engaging|enjoyable|fun|relaxing|inspiring|fascinating|"
    "motivating|rewarding|great|wonderful|indispensable|essential|interesting|exciting|"
    "calming|soothing|satisfying|valuable|beneficial|productive"
)
_INTENSIFIER = (
    r"(?:(?:really|very|quite|so|rather|pretty|extremely|incredibly|utterly|totally)\s+)?"
)
#: "I find X ineffective", "I consider X helpful"
_FIND = re.compile(
    rf"\b(?:i|we|the\s+user|(?:he|she|they))\s+(?:(?:usually|generally|often|always)\s+)?"
    rf"(?:find|finds|found|consider|considers)\s+(?!it\s)(?P<obj>[^,;:]+?)\s+(?:to\s+be\s+)?"
    rf"{_INTENSIFIER}(?:(?P<neg>{_NEG_ADJECTIVES})|(?P<pos>{_POS_ADJECTIVES}))\b",
    re.IGNORECASE,
)
#: "X is not for me", "X are a dealbreaker" (the object: back to the clause's start)
_VERDICT = re.compile(
    r"\s+(?:is|are|was|were)\s+(?:just\s+)?(?P<neg>not\s+for\s+me|"
    r"a\s+(?:deal-?breaker|no-go|turn-off)|off\s+limits|out\s+of\s+the\s+question)\b",
    re.IGNORECASE,
)
_CLAUSE_START = re.compile(r"[,;:(]")
#: an object that ends in one of these is restricted by the clause after it ("products
#: that do not offer X"): an avoidance there turns the clause's negation into a like
_RELATIVE_END = re.compile(r"\b(?:that|which|who|where)\s*$", re.IGNORECASE)
#: a short object naming a thing already said by a pronoun ("prefer not to use them")
_PRONOUN = re.compile(r"\b(?:them|it|they|those|these)\b", re.IGNORECASE)

#: a "like" counts as the verb after these words (else it is "games like Sudoku")
_LIKE_SUBJECTS = frozenset(
    "i we you they he she user really also just do does did would 'd i'd we'd they'd "
    "generally usually actually always still truly absolutely definitely mostly much "
    "only and or but to".split()
)
#: "no" is a cue at a clause's start or after these ("with no sugar", "strictly no")
_NO_AFTER = frozenset(
    "with and or but want wants prefer prefers please absolutely strictly definitely "
    "means say says".split()
)
#: "only" is not a cue after a determiner ("the only option")
_DETERMINERS = frozenset("the a an my our your his her their this that its".split())
_PREFER = re.compile(r"\bprefer|\brather\b|\bfavou?r", re.IGNORECASE)

#: "I find it tedious to ...", "I find it relaxing when ...": the object follows
_FIND_IT = (
    rf"finds?\s+it\s+{_INTENSIFIER}(?:{_NEG_ADJECTIVES})\s+(?:to|when|that)",
    rf"finds?\s+it\s+{_INTENSIFIER}(?:{_POS_ADJECTIVES})\s+(?:to|when|that)",
)

_CUE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("avoid", _FIND_IT[:1]),
    ("like", _FIND_IT[1:]),
    ("neutral", NEUTRAL_CUES),
    ("like", LIKE_IDIOMS),
    ("avoid", AVOID_IDIOMS),
    ("negated", tuple(rf"{_NOT}{_FILLER}\s+(?:{c})" for c in LIKE_CUES)),
    ("contrast", CONTRAST_CUES),
    ("avoid", AVOID_CUES),
    ("like", LIKE_CUES),
    ("avoid", (rf"{_NOT}(?=\s+[a-z])",)),  # a negated verb: "don't eat", "never fly"
)


def _compile() -> tuple[re.Pattern[str], list[str]]:
    parts, kinds = [], []
    for kind, cues in _CUE_GROUPS:
        for cue in cues:
            parts.append(f"(?P<c{len(parts)}>{cue})")
            kinds.append(kind)
    return re.compile(rf"(?<![\w'-])(?:{'|'.join(parts)})(?![\w'-])", re.IGNORECASE), kinds


_CUES, _KINDS = _compile()
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n+|;\s*")
#: where an object ends though no cue follows: a new clause with its own subject, or a
#: connective that starts a reason or a contrast
_BOUNDARY = re.compile(
    r",?\s+(?:and|but|so|because|since|as|while|whereas|although|though|yet|which)\s+"
    r"(?=(?:i|we|i'm|i'd|i've|my|it|that|they|this)\b)|,\s*(?:but|so|because|since|whereas|"
    r"although|though|yet|which|as)\b|\s+(?:but|because|whereas|although)\s+|"
    r"\s+(?:due|owing)\s+to\s+|\s+because\s+of\s+|\s+-+\s+|:\s",
    re.IGNORECASE,
)
#: connectives cut from the end of an object ("... and", "... whenever possible")
_TAIL_WORDS = frozenset(
    "and or but so as because since while then i we my please too also really strongly "
    "very much generally usually actually definitely absolutely the a an to of with "
    "whenever when if that which who".split()
)
_TAIL_PHRASES = (
    "whenever possible",
    "wherever possible",
    "when possible",
    "if possible",
    "as much as possible",
    "as much as i can",
    "if i can",
    "in general",
    "at all",
    "for me",
)
#: connectives cut from the start of an object ("to adopt", "that ...")
_HEAD_WORDS = frozenset("i we to that of about being when any all".split())
_PUNCTUATION = " \t\n,.;:!?()[]\"'-"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
#: words that carry no content: an object made only of these is no object
STOPWORDS = frozenset(
    "i me my mine we us our you your he him his she her they them their it its this that "
    "these those a an the and or but so as of to in on at for with by from about into "
    "is are was were be been being am do does did have has had having will would shall "
    "should can could may might must 'd 'm 's 're 've 'll very really just also too much "
    "more most some any all each every other such than then there here what which who whom "
    "when where why how not no nor only own same both few many lot lots things thing stuff "
    "kind kinds sort type types way ways one ones something anything everything nothing "
    "please like strongly generally usually always often".split()
)


# -- reading -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stance:
    """One thing the statement says the user likes or avoids."""

    #: the object, as the statement words it, cue words left out ("mobile games")
    text: str
    polarity: Polarity
    #: the words that decided it ("strongly dislike" -> "dislike"); "" for a field's default
    cue: str = ""


@dataclass(frozen=True, slots=True)
class PolarityReading:
    """What :func:`read_polarity` found in one text, in the text's order."""

    stances: tuple[Stance, ...] = ()

    @property
    def likes(self) -> tuple[str, ...]:
        return tuple(s.text for s in self.stances if s.polarity == "like")

    @property
    def avoids(self) -> tuple[str, ...]:
        return tuple(s.text for s in self.stances if s.polarity == "avoid")

    def __bool__(self) -> bool:
        return bool(self.stances)


def content_words(text: str) -> frozenset[str]:
    """The words of ``text`` that carry content, lower-cased and lightly stemmed ("games"
    and "game" are one word), for matching an object against another."""
    return frozenset(_stem(w) for w in _WORD.findall(text.casefold()) if w not in STOPWORDS)


def _stem(word: str) -> str:
    word = word.removesuffix("'s")
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _clean(text: str) -> str:
    """An object without the connectives around it (see :data:`_TAIL_WORDS`)."""
    while True:
        before = text
        text = text.strip(_PUNCTUATION)
        lowered = text.casefold()
        phrase = next((p for p in _TAIL_PHRASES if lowered == p or lowered.endswith(" " + p)), None)
        if phrase is not None:
            text = text[: len(text) - len(phrase)]
            continue
        last = text.rsplit(None, 1)
        if len(last) == 2 and last[1].casefold() in _TAIL_WORDS:
            text = last[0]
        first = text.split(None, 1)
        if len(first) == 2 and first[0].casefold() in _HEAD_WORDS:
            text = first[1]
        if text == before:
            return text


_LAST_WORD = re.compile(r"(?:[\w']+|[,;:(])\s*$")


def _word_before(sentence: str, start: int) -> str:
    found = _LAST_WORD.search(sentence, max(0, start - 40), start)
    return found.group().strip().casefold() if found else ""


def _accept(kind: str, cue: str, sentence: str, start: int, seen_prefer: bool) -> bool:
    """Whether a match of an ambiguous word is the cue (``like``, ``no``, ``only``,
    ``over``, ``always``) here."""
    word = cue.casefold()
    before = _word_before(sentence, start)
    if kind == "like" and word == "like":
        return before in _LIKE_SUBJECTS or before.endswith(("'d",))
    if kind == "avoid" and word == "no":
        return before in ("", ",", ";", ":", "(") or before in _NO_AFTER
    if kind == "like" and word in ("only", "always", "strictly"):
        return before not in _DETERMINERS
    if kind == "contrast" and word in ("over", "than"):
        return seen_prefer
    return True


def _cues(sentence: str) -> list[tuple[int, int, str, str]]:
    """(start, end, kind, cue) of every cue of ``sentence``, left to right."""
    found: list[tuple[int, int, str, str]] = []
    for match in _FIND.finditer(sentence):
        kind = "find-avoid" if match.group("neg") else "find-like"
        found.append((match.start(), match.end(), kind, match.group("neg") or match.group("pos")))
    for match in _VERDICT.finditer(sentence):
        starts = [m.end() for m in _CLAUSE_START.finditer(sentence, 0, match.start())]
        start = starts[-1] if starts else 0
        if not any(s <= start < e for s, e, _, _ in found):
            found.append((start, match.end(), "verdict", match.group("neg")))
    taken = sorted(found)
    prefer = _PREFER.search(sentence)
    first_prefer = prefer.start() if prefer else len(sentence)
    for match in _CUES.finditer(sentence):
        if taken and any(s <= match.start() < e for s, e, _, _ in taken):
            continue
        kind = _KINDS[(match.lastindex or 1) - 1]  # one group per cue
        cue = match.group().strip()
        if _accept(kind, cue, sentence, match.start(), first_prefer < match.start()):
            found.append((match.start(), match.end(), kind, cue))
    return sorted(found)


def _bare_cue(cue: str) -> str:
    """The cue's telling words, negation kept ("do not really like" stays whole)."""
    return re.sub(r"\s+", " ", cue.strip())


def read_polarity(text: str, *, default: Polarity | None = None) -> PolarityReading:
    """The stances ``text`` states: what it says the user likes and avoids (see the module).

    ``default``: what a text without cues means (its field's polarity: ``"like"`` for a
    preference or an interest, ``"avoid"`` for ``preference.avoid``); None (a free
    statement, a recalled message): nothing.
    """
    stances: list[Stance] = []
    for sentence in _SENTENCE.split(text.replace("\u2019", "'").replace("\u2018", "'")):
        sentence = sentence.strip()
        if not sentence:
            continue
        cues = _cues(sentence)
        boundaries = [m.start() for m in _BOUNDARY.finditer(sentence)]
        if not cues:
            if default is not None:
                _add(stances, sentence, default, "")
            continue
        lead = sentence[: cues[0][0]]
        lead_end = next((b for b in boundaries if b < cues[0][0]), None)
        if default is not None and cues[0][2] != "contrast":
            # "recipes without nuts" in a like-field: the recipes are liked
            _add(stances, lead[:lead_end] if lead_end is not None else lead, default, "")
        flipped = False
        for i, (start, end, kind, cue) in enumerate(cues):
            if kind == "verdict":
                _add(stances, _VERDICT.split(sentence[start:end])[0], "avoid", cue)
                continue
            if kind.startswith("find-"):
                # the object sits between the verb and the adjective
                match = _FIND.match(sentence, start)
                obj = match.group("obj") if match else ""
                _add(stances, obj, "avoid" if kind == "find-avoid" else "like", cue)
                continue
            following = cues[i + 1] if i + 1 < len(cues) else None
            stop = following[0] if following else len(sentence)
            after = bisect.bisect_left(boundaries, end)
            if after < len(boundaries):
                stop = min(stop, boundaries[after])
            obj = sentence[end:stop]
            if kind == "neutral":
                continue
            if kind == "contrast":
                previous = cues[i - 1] if i else None
                if previous is None or previous[2] == "neutral":
                    # "tea rather than coffee": what precedes is the like
                    begin = max([0, *(b for b in boundaries if b < start)])
                    _add(stances, sentence[begin:start], "like", cue)
                _add(stances, obj, "avoid", cue)
                continue
            polarity: Polarity = "like" if kind == "like" else "avoid"
            if flipped:
                # "I avoid products that do not offer X": X is what they want
                polarity, cue, flipped = "like", f"avoid ... {_bare_cue(cue)}", False
            elif (
                polarity == "avoid"
                and following is not None
                and following[2] in ("avoid", "negated")
                and stop == following[0]
                and _RELATIVE_END.search(obj)
            ):
                flipped = True  # the head ("products") is avoided only with the clause
                continue
            _add(stances, obj, polarity, _bare_cue(cue))
    return PolarityReading(tuple(stances))


def _add(stances: list[Stance], raw: str, polarity: Polarity, cue: str) -> None:
    obj = _clean(raw)
    if stances and len(obj.split()) <= 6 and _PRONOUN.search(obj):
        # "I find X disorienting and prefer not to use them": them is X
        obj = _PRONOUN.sub(lambda _: stances[-1].text, obj, count=1)
    if obj and _WORD.search(obj.casefold()) and content_words(obj):
        stance = Stance(obj, polarity, cue)
        if stance not in stances[-8:]:  # a repeat of the last few (not all: long texts)
            stances.append(stance)


# -- checks --------------------------------------------------------------------------------


def _matches(a: frozenset[str], b: frozenset[str]) -> bool:
    """One object names the other: every content word of one is in the other."""
    return bool(a) and bool(b) and (a <= b or b <= a)


def contradiction(
    value: str, evidence: Iterable[str], *, polarity: Polarity = "like"
) -> Stance | None:
    """The stance of ``evidence`` that ``value`` turns around, or None.

    ``value`` is read with ``polarity`` as its default (what its field means: ``"avoid"``
    for ``preference.avoid``, ``"like"`` for the other preference and interest fields), so
    a value that carries its own cue keeps it ("dislikes mobile games" is an avoid
    anywhere). A value stance contradicts the evidence when an evidence stance of the other
    polarity names the same thing (one's content words all in the other's) and no evidence
    stance of the same polarity does: "mobile games" in a like-field, from "I strongly
    dislike mobile games", returns the avoid stance ``dislike`` "mobile games".
    """
    said = [s for text in evidence for s in read_polarity(text).stances]
    if not said:
        return None
    for stance in read_polarity(value, default=polarity).stances:
        words = content_words(stance.text)
        agree = [s for s in said if s.polarity == stance.polarity]
        if any(_matches(words, content_words(s.text)) for s in agree):
            continue
        against = [s for s in said if s.polarity != stance.polarity]
        found = next((s for s in against if _matches(words, content_words(s.text))), None)
        if found is not None:
            return found
    return None
