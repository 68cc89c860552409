"""The LoCoMo long-term-memory benchmark: recall@k of evidence turns, with no LLM judge.

For each conversation (Maharana et al. 2024; format of ../shared/data/locomo-dev/), all
sessions are ingested into one fresh memory, every QA question of categories 1-4 is asked,
and recall@k is the share of a question's evidence turns found in the provenance of the
top-k recalled items, averaged over questions. The same run scores the naive baseline:
every raw turn, prefixed with its session date and speaker, embedded with the same
embedder into a plain Chroma collection and queried by pure vector search.

Honesty rules: ingest sees only the dialogue (turns, speakers, dates, shared-image
captions), never the QA items, their answers or evidence, nor the dataset's own
observations and summaries; nothing is tuned per question.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from persona_plugin.errors import PersonaValidationError
from persona_plugin.memory.long_term import DialogueTurn, LongTermMemory

CATEGORIES = (1, 2, 3, 4)
_SESSION_KEY = re.compile(r"session_(\d+)")
_TURN_ID = re.compile(r"D\d+:\d+")


@dataclass
class Question:
    text: str
    evidence: list[str]
    category: int


@dataclass
class Conversation:
    name: str
    turns: list[DialogueTurn]
    questions: list[Question]
    #: turn id -> the naive baseline's text: "[<session date>] <speaker>: <text>"
    baseline_texts: dict[str, str] = field(default_factory=dict)


def parse_session_time(text: str) -> datetime:
    """LoCoMo's "1:56 pm on 8 May, 2023"."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y")


def load_conversation(path: str | Path) -> Conversation:
    """Read one LoCoMo conversation file (raises a clear error for anything else)."""
    file = Path(path)
    try:
        data = json.loads(file.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PersonaValidationError(
            str(file), "", f"cannot read a LoCoMo conversation: {exc}", "Pass a LoCoMo JSON file."
        ) from None
    if not isinstance(data, dict) or "qa" not in data:
        raise PersonaValidationError(
            str(file), "qa", "no 'qa' list: not a LoCoMo conversation", "Pass a LoCoMo JSON file."
        )
    turns: list[DialogueTurn] = []
    baseline_texts: dict[str, str] = {}
    sessions = sorted((int(m.group(1)), key) for key in data if (m := _SESSION_KEY.fullmatch(key)))
    for number, key in sessions:
        when = parse_session_time(data[f"{key}_date_time"])
        for raw in data[key]:
            text = raw["text"]
            baseline_texts[raw["dia_id"]] = f"[{data[f'{key}_date_time']}] {raw['speaker']}: {text}"
            if raw.get("blip_caption"):
                # the image the speaker shared is part of what they said
                text = f"{text} [shares a photo: {raw['blip_caption']}]"
            turns.append(
                DialogueTurn(
                    turn_id=raw["dia_id"],
                    speaker=raw["speaker"],
                    text=text,
                    timestamp=when,
                    session=str(number),
                )
            )
    questions = []
    for item in data["qa"]:
        if item.get("category") not in CATEGORIES:
            continue
        # a few evidence fields hold several ids in one string ("D8:6; D9:17")
        evidence = [e for raw in item.get("evidence", []) for e in _TURN_ID.findall(raw)]
        if evidence:
            questions.append(Question(str(item["question"]), evidence, int(item["category"])))
    return Conversation(file.stem, turns, questions, baseline_texts)


@dataclass
class Scores:
    """recall@k per k, averaged over questions."""

    hits: dict[int, float] = field(default_factory=dict)
    questions: int = 0

    def add(self, found_per_k: dict[int, float]) -> None:
        for k, value in found_per_k.items():
            self.hits[k] = self.hits.get(k, 0.0) + value
        self.questions += 1

    def recall(self) -> dict[int, float]:
        return {k: v / max(self.questions, 1) for k, v in sorted(self.hits.items())}


def _recall_at(evidence: Sequence[str], ranked_turn_ids: Sequence[list[str]], k: int) -> float:
    covered = {t for ids in ranked_turn_ids[:k] for t in ids}
    return sum(1 for e in evidence if e in covered) / len(evidence)


def evaluate(
    files: Sequence[str | Path],
    ks: Sequence[int] = (1, 5, 10, 20),
    *,
    embedding_function: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Recall@k of the memory and of the naive baseline over the given conversations."""
    import chromadb

    from persona_plugin.embeddings.minilm import as_embedding_function

    ef = as_embedding_function(embedding_function)
    depth = max(ks)
    ours, base = Scores(), Scores()
    per_file = []
    conversations = [load_conversation(f) for f in files]
    total = sum(len(c.questions) for c in conversations)
    done = 0
    for conv in conversations:
        conv_ours, conv_base = Scores(), Scores()
        with tempfile.TemporaryDirectory(prefix="locomo-") as tmp:
            memory = LongTermMemory(Path(tmp) / "memory", embedding_function=ef)
            user = "locomo"
            memory.remember(user, conv.turns)

            client = chromadb.PersistentClient(path=str(Path(tmp) / "baseline"))
            plain = client.create_collection(
                "baseline", embedding_function=ef, configuration={"hnsw": {"space": "cosine"}}
            )
            plain.add(
                ids=[t.turn_id for t in conv.turns],
                documents=[conv.baseline_texts[t.turn_id] for t in conv.turns],
            )
            for question in conv.questions:
                # asked once per k, as an app asking for k memories would
                found = {}
                for k in ks:
                    items = memory.recall(user, question.text, k=k)
                    found[k] = _recall_at(question.evidence, [i.source_turn_ids for i in items], k)
                ours.add(found)
                conv_ours.add(found)

                hits = plain.query(query_texts=[question.text], n_results=depth, include=[])
                ranked_base = [[turn_id] for turn_id in hits["ids"][0]]
                found_base = {k: _recall_at(question.evidence, ranked_base, k) for k in ks}
                base.add(found_base)
                conv_base.add(found_base)
                done += 1
                if progress:
                    progress(conv.name, done, total)
        per_file.append(
            {
                "conversation": conv.name,
                "turns": len(conv.turns),
                "questions": len(conv.questions),
                "memory": conv_ours.recall(),
                "baseline": conv_base.recall(),
            }
        )
    return {
        "questions": ours.questions,
        "ks": list(ks),
        "memory": ours.recall(),
        "baseline": base.recall(),
        "conversations": per_file,
    }
