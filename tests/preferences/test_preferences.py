"""Preference models: cards, the hub, the scorer types, retrieval, training, the CLI.

Real parts throughout: the bundled demo heads on the local MiniLM embedder, a tiny
randomly initialised transformers reward model saved by the test, a LangChain fake chat
model scripting an LLM judge's replies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from langchain_core.language_models import FakeListChatModel
from typer.testing import CliRunner

from persona_plugin.errors import PersonaNotFoundError, PersonaValidationError
from persona_plugin.lab.training.preferences import demo_pairs
from persona_plugin.persona import PatternItem, Persona
from persona_plugin.preferences.cards import BUNDLED_DIR, load_card, parse_card
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.retrieval import PreferenceRetriever, normalize_preferences
from persona_plugin.preferences.scorers import (
    SURFACE_FEATURES,
    CandidateEmbeddings,
    EmbeddingHeadScorer,
    PersonaScorer,
    PreferenceHead,
    PreferenceScoreError,
    check_scores,
)
from persona_plugin.preferences.training import load_pairs, train_head
from persona_plugin.store import PersonaStore

#: the bundled cards: three demo heads, and the persona-conditioned scorer (no model file)
BUNDLED_IDS = ["brevity", "formality", "persona", "warmth"]
DEMO_IDS = ["brevity", "formality", "warmth"]


@pytest.fixture(scope="module")
def embeddings() -> CandidateEmbeddings:
    """One embedder (and its text cache) for the module: loading it is the slow part."""
    return CandidateEmbeddings()


@pytest.fixture
def hub(tmp_path: Path, embeddings: CandidateEmbeddings) -> PreferenceHub:
    return PreferenceHub(tmp_path / "prefs", embedder=embeddings)


def head_card(tmp_path: Path, model_id: str, location: str, **extra: object) -> Path:
    data = {
        "id": model_id,
        "description": "Short answers.",
        "kind": "style",
        "scorer": "embedding_head",
        "location": location,
        **extra,
    }
    path = tmp_path / f"{model_id}-card.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- the bundled demo models --------------------------------------------------------------


def test_the_bundled_demo_models_prefer_what_their_cards_say(hub: PreferenceHub) -> None:
    """Held-out texts, written here and not in the training material."""
    assert hub.ids() == BUNDLED_IDS and all(hub.is_bundled(c) for c in hub.cards())
    scorers = hub.load()
    assert all(isinstance(scorers[i], EmbeddingHeadScorer) for i in DEMO_IDS)
    assert isinstance(scorers["persona"], PersonaScorer)
    prompt = "How do I reset my password?"
    short = "Click 'Forgot password' on the login page."
    long = (
        "Click 'Forgot password' on the login page, type the email address you signed up "
        "with and wait for the message. The link in it is valid for one hour; if nothing "
        "arrives, check the spam folder, and make sure the address is the one on your "
        "account. Choose a new password that you do not use anywhere else."
    )
    formal = "Kindly select 'Forgot password' on the sign-in page and follow the instructions."
    casual = "Just hit 'forgot password' on the login screen, easy peasy, you'll get an email."
    warm = "No worries, it happens to all of us! Just click 'Forgot password' and you're set."
    cold = "Select 'Forgot password' on the login page. Follow the emailed instructions."
    for model_id, good, bad in (
        ("brevity", short, long),
        ("formality", formal, casual),
        ("warmth", warm, cold),
    ):
        first, second = scorers[model_id].score(prompt, [good, bad])
        assert first > second, model_id


def test_embedding_heads_share_one_embedding_pass(tmp_path: Path) -> None:
    class CountingEmbedder:
        """A LangChain-style embedder that counts the texts it embeds."""

        def __init__(self) -> None:
            self.texts: list[str] = []
            self.inner = CandidateEmbeddings().embed_texts

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            self.texts += texts
            return self.inner(texts).tolist()

    counting = CountingEmbedder()
    hub = PreferenceHub(tmp_path, embedder=counting)
    candidates = ["Yes.", "No, not today.", "Maybe tomorrow, if it stops raining."]
    scorers = hub.load()  # a non-default embedder is probed once for its dimension
    assert counting.texts == ["dimension probe"]
    counting.texts.clear()
    for scorer in scorers.values():
        scorer.score("Shall we go out?", candidates)
    assert sorted(counting.texts) == sorted([*candidates, "Shall we go out?"])


# -- cards --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"scorer": "embedding_head"}, "location", "needs a location"),
        ({"scorer": "llm_judge"}, "rubric", "needs a rubric"),
        ({"scorer": "regex", "location": "x"}, "scorer", "not allowed"),
        ({"kind": "mood", "scorer": "llm_judge", "rubric": "r"}, "kind", "not allowed"),
        ({"scorer": "llm_judge", "rubric": "r", "scale": [5, 1]}, "scale", "low < high"),
        ({"scorer": "llm_judge", "rubric": "r", "colour": "red"}, "colour", "unknown key"),
        ({"id": "a b", "scorer": "llm_judge", "rubric": "r"}, "id", "not a valid id"),
    ],
)
def test_bad_cards_name_the_field(data: dict[str, object], field: str, words: str) -> None:
    card = {"id": "x", "description": "d", "kind": "style", **data}
    with pytest.raises(PersonaValidationError) as exc:
        parse_card(card, source="x.yaml")
    assert exc.value.path == field and words in str(exc.value) and "x.yaml" in str(exc.value)


def test_a_missing_model_fails_at_load_not_at_first_use(tmp_path: Path, hub: PreferenceHub) -> None:
    assert hub.directory is not None
    hub.directory.mkdir(parents=True)
    (hub.directory / "ghost.yaml").write_text(
        yaml.safe_dump(
            {
                "id": "ghost",
                "description": "d",
                "kind": "style",
                "scorer": "embedding_head",
                "location": "ghost.npz",
            }
        )
    )
    assert "ghost" in hub.ids()  # the card itself is valid
    with pytest.raises(PersonaValidationError) as exc:
        hub.load()
    assert exc.value.path == "location" and "ghost.yaml" in exc.value.source
    assert "does not exist" in str(exc.value)


def test_an_incompatible_head_is_refused_at_load(tmp_path: Path, hub: PreferenceHub) -> None:
    wide = PreferenceHead(
        embedding_dim=512,  # another embedder's size
        surface_mean=np.zeros(len(SURFACE_FEATURES), np.float32),
        surface_std=np.ones(len(SURFACE_FEATURES), np.float32),
        weights={"w": np.ones(512 + 1 + len(SURFACE_FEATURES), np.float32), "b": np.zeros(())},
        info={},
    )
    wide.save(tmp_path / "wide.npz")
    with pytest.raises(PersonaValidationError) as exc:
        hub.add(head_card(tmp_path, "wide", "wide.npz"))
    assert "512" in str(exc.value) and "384" in str(exc.value)
    assert exc.value.path == "location"
    assert not (tmp_path / "prefs" / "wide.yaml").exists()  # nothing half-added

    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(PersonaValidationError, match="not a head file"):
        hub.add(head_card(tmp_path, "junk", "junk.npz"))

    broken = PreferenceHead.load(BUNDLED_DIR / "brevity.npz")
    broken.weights["w"][3] = np.nan
    broken.save(tmp_path / "nan.npz")
    with pytest.raises(PersonaValidationError, match="NaN"):
        hub.add(head_card(tmp_path, "nan", "nan.npz"))


def test_hub_add_resolves_paths_and_user_cards_replace_bundled_ones(
    tmp_path: Path, hub: PreferenceHub
) -> None:
    (tmp_path / "models").mkdir()
    PreferenceHead.load(BUNDLED_DIR / "brevity.npz").save(tmp_path / "models" / "b.npz")
    card = hub.add(head_card(tmp_path, "brevity", "models/b.npz", description="Mine."))
    assert card.location == str(tmp_path / "models" / "b.npz")  # absolute in the hub
    assert hub.get("brevity").description == "Mine." and not hub.is_bundled(hub.get("brevity"))
    assert hub.ids() == BUNDLED_IDS
    with pytest.raises(PersonaValidationError, match="already in the hub"):
        hub.add(head_card(tmp_path, "brevity", "models/b.npz"))
    assert hub.add(head_card(tmp_path, "brevity", "models/b.npz"), replace=True)
    with pytest.raises(PersonaNotFoundError, match="prefs add"):
        hub.get("nope")
    assert PreferenceHub(tmp_path / "prefs", bundled=False).ids() == ["brevity"]


# -- the other scorer types ---------------------------------------------------------------


def save_tiny_reward_model(folder: Path, num_labels: int = 1) -> None:
    """A randomly initialised 1-layer BERT reward model with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = "the a is it you answer short long yes no please thanks hello sure maybe".split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_sequence_classifier_reward_model_from_a_local_folder(
    tmp_path: Path, hub: PreferenceHub
) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    save_tiny_reward_model(tmp_path / "rm")
    card = {"id": "rm", "description": "d", "kind": "content", "scorer": "sequence_classifier"}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump({**card, "location": "rm"}))
    scorer = hub.scorer(hub.add(tmp_path / "rm.yaml"))
    candidates = ["yes please", "no thanks", "maybe a long answer"]
    scores = scorer.score("hello you", candidates)
    assert len(scores) == 3 and len(set(scores)) == 3
    # the same logits transformers computes for (prompt, candidate) pairs
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        logit = model(**tok("hello you", "no thanks", return_tensors="pt")).logits[0, 0]
    assert scores[1] == pytest.approx(float(logit), abs=1e-5)

    save_tiny_reward_model(tmp_path / "three", num_labels=3)
    (tmp_path / "three.yaml").write_text(
        yaml.safe_dump({**card, "id": "three", "location": "three"})
    )
    with pytest.raises(PersonaValidationError, match="3 labels"):
        hub.add(tmp_path / "three.yaml")
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({**card, "id": "none", "location": "no"}))
    with pytest.raises(PersonaValidationError, match=r"no config\.json"):
        hub.add(tmp_path / "none.yaml")


def judge_card(tmp_path: Path, hub: PreferenceHub) -> None:
    data = {
        "id": "polite",
        "description": "Polite answers.",
        "kind": "behaviour",
        "scorer": "llm_judge",
        "rubric": "Is the answer polite?",
        "scale": [0, 10],
    }
    assert hub.directory is not None
    hub.directory.mkdir(parents=True, exist_ok=True)
    (hub.directory / "polite.yaml").write_text(yaml.safe_dump(data))


def test_an_llm_judge_scores_against_the_rubric(
    tmp_path: Path, embeddings: CandidateEmbeddings
) -> None:
    judge = FakeListChatModel(responses=["7", "Score: 2.5", "10 - very polite"])
    hub = PreferenceHub(tmp_path / "prefs", embedder=embeddings, judge=judge, bundled=False)
    judge_card(tmp_path, hub)
    scorer = hub.scorer("polite")
    assert scorer.score("Hi", ["a", "b", "c"]) == [7.0, 2.5, 10.0]

    rambling = FakeListChatModel(responses=["It is quite polite."])
    hub = PreferenceHub(tmp_path / "prefs", embedder=embeddings, judge=rambling, bundled=False)
    with pytest.raises(PreferenceScoreError, match="not a number from 0 to 10"):
        hub.scorer("polite").score("Hi", ["a"])
    too_high = FakeListChatModel(responses=["42"])
    hub = PreferenceHub(tmp_path / "prefs", embedder=embeddings, judge=too_high, bundled=False)
    with pytest.raises(PreferenceScoreError, match="'42'"):
        hub.scorer("polite").score("Hi", ["a"])
    no_judge = PreferenceHub(tmp_path / "prefs", embedder=embeddings, bundled=False)
    with pytest.raises(PersonaValidationError, match="needs a judge chat model"):
        no_judge.load()


def test_non_finite_scores_are_rejected() -> None:
    assert check_scores("m", np.array([1, 2.5]), 2) == [1.0, 2.5]
    with pytest.raises(PreferenceScoreError, match=r"'m' returned nan for candidate 1"):
        check_scores("m", [0.3, float("nan")], 2)
    with pytest.raises(PreferenceScoreError, match="2 scores for 3 candidates"):
        check_scores("m", [0.3, 1.0], 3)


# -- mixtures and retrieval ---------------------------------------------------------------


def test_weights_are_normalised_and_bad_weights_rejected() -> None:
    assert normalize_preferences({"a": 2, "b": -2, "c": 0}) == (("a", 0.5), ("b", -0.5))
    assert normalize_preferences([("a", 1), ("b", 3)]) == (("b", 0.75), ("a", 0.25))
    assert normalize_preferences(["a"]) == (("a", 1.0),)
    assert normalize_preferences(None) == ()
    with pytest.raises(PersonaValidationError, match="not finite"):
        normalize_preferences({"a": float("nan")})
    with pytest.raises(PersonaValidationError, match="listed twice"):
        normalize_preferences([("a", 1), ("a", 2)])
    with pytest.raises(PersonaValidationError, match="not a number"):
        normalize_preferences({"a": "high"})


def persona(version: int, **preference: list[str]) -> Persona:
    p = Persona.new("alice")
    for key, value in preference.items():
        setattr(p.preference, key, value)
    return p.with_meta(version=version, user_id="alice")


def test_retrieval_signs_follow_the_persona_and_are_cached_per_version(
    hub: PreferenceHub,
) -> None:
    retriever = PreferenceRetriever(hub)
    brief = retriever.retrieve(persona(1, style=["concise", "short answers"]), "What is DNS?")
    assert brief.ids[0] == "brevity" and brief.weight("brevity") > 0.5
    assert sum(abs(w) for _, w in brief.pairs()) == pytest.approx(1.0)
    assert retriever.retrieve(persona(1, style=["concise", "short answers"]), "What is DNS?").cached
    detailed = retriever.retrieve(persona(2, style=["detailed, thorough explanations"]), "x")
    assert detailed.ids[0] == "brevity" and detailed.weight("brevity") < -0.5
    assert not detailed.cached
    casual = retriever.retrieve(persona(3, style=["casual", "slang"]), "")
    assert casual.weight("formality") < 0
    # the pattern section counts too
    p = Persona.new("bob")
    p.pattern.items = [
        PatternItem(description="Always asks for warm, friendly, encouraging replies")
    ]
    assert retriever.retrieve(p, "").ids[0] == "warmth"
    assert retriever.retrieve(None, "").models == ()


# -- training -----------------------------------------------------------------------------


def test_training_generalises_to_held_out_topics(embeddings: CandidateEmbeddings) -> None:
    pairs = demo_pairs()
    assert {k: len(v) for k, v in pairs.items()} == {"brevity": 60, "formality": 80, "warmth": 80}
    head, report = train_head(pairs["formality"], embeddings)
    assert report.heldout_accuracy is not None and report.heldout_accuracy >= 0.85
    assert report.seconds < 30 and head.type == "linear"


def test_pairs_files_are_validated(tmp_path: Path) -> None:
    good = [{"prompt": "q", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(4)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in good) + "\n")
    assert len(load_pairs(path)) == 4
    path.write_text(json.dumps(good[0]) + "\n{oops\n")
    with pytest.raises(PersonaValidationError, match="line 2"):
        load_pairs(path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump([*good, {"prompt": "q", "chosen": "a"}]))
    with pytest.raises(PersonaValidationError) as exc:
        load_pairs(tmp_path / "p.yaml")
    assert exc.value.path == "[4].rejected"


# -- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    from persona_plugin.cli.app import state
    from persona_plugin.cli.prefs import prefs_app

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(state, "config_file", None)
    monkeypatch.setattr(state, "store_url", None)
    runner = CliRunner()
    return lambda *args: runner.invoke(prefs_app, [str(a) for a in args])


def test_cli_list_show_add_and_exit_codes(cli, tmp_path: Path) -> None:
    listed = cli("list", "--json")
    assert listed.exit_code == 0
    assert [c["id"] for c in json.loads(listed.output)] == BUNDLED_IDS
    shown = cli("show", "warmth", "--format", "json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["scorer"] == "embedding_head"
    assert cli("show", "nope").exit_code == 1
    assert cli("list", "--kind", "mood").exit_code == 2
    bad = head_card(tmp_path, "ghost", "missing.npz")
    result = cli("add", bad)
    assert result.exit_code == 2 and "does not exist" in result.output
    assert "ghost" not in cli("list").output


def test_cli_train_adds_a_working_model(cli, tmp_path: Path) -> None:
    pairs = [
        {"prompt": f"q{i}", "chosen": f"Sure thing, item {i}!", "rejected": f"No. Item {i}."}
        for i in range(8)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in pairs))
    result = cli("train", path, "--id", "upbeat", "--description", "Upbeat replies.")
    assert result.exit_code == 0, result.output
    assert "trained 'upbeat' on 8 pairs" in result.output
    home_hub = PreferenceHub.from_settings()
    assert "upbeat" in home_hub.ids()
    up, down = home_hub.scorer("upbeat").score("q9", ["Sure thing, item 9!", "No. Item 9."])
    assert up > down
    assert cli("train", path, "--id", "upbeat", "--description", "x").exit_code == 2
    assert cli("train").exit_code == 2


def test_cli_list_shows_the_weights_for_a_user(cli) -> None:
    with PersonaStore.from_settings() as store:
        store.create("alice", persona(0, style=["formal", "professional"]))
    result = cli("list", "--for", "alice", "--json")
    assert result.exit_code == 0, result.output
    weights = {c["id"]: c["weight"] for c in json.loads(result.output)}
    assert max(weights, key=lambda k: abs(weights[k])) == "formality"
    assert weights["formality"] > 0
    assert cli("list", "--for", "nobody").exit_code == 1


def test_card_files_round_trip(tmp_path: Path) -> None:
    card = load_card(BUNDLED_DIR / "brevity.yaml")
    (tmp_path / "copy.yaml").write_text(card.to_yaml())
    assert load_card(tmp_path / "copy.yaml").to_dict() == card.to_dict()
