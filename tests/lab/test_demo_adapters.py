"""The demo style adapters: their data, the bundled cards and weights, and training them.

Training runs on the real local model (SmolLM2-135M-Instruct, CPU), kept to a few steps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("peft")

from persona_plugin.backends import SERVED_ADAPTER, SERVED_MERGED
from persona_plugin.backends.local import LocalBackend
from persona_plugin.backends.types import GenerationRequest
from persona_plugin.errors import PersonaConfigError
from persona_plugin.lab.training.demo_adapters import (
    QA,
    STYLE_IDS,
    STYLES,
    card_for,
    main,
    training_examples,
)
from persona_plugin.lora.hub import BUNDLED_LORA_DIR, LoraHub
from persona_plugin.lora.training import TrainingExample, train_lora
from tests.paths import MODEL_CACHE

EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")
MODELS = MODEL_CACHE / "models"
QUESTION = ({"role": "user", "content": "How do fish breathe underwater?"},)


# -- the data -----------------------------------------------------------------------------


def test_each_style_has_one_example_per_question_and_no_empty_reply() -> None:
    for style_id in STYLE_IDS:
        examples = training_examples(style_id)
        assert len(examples) == len(QA) >= 40
        for example in examples:
            assert example.completion.strip()
            assert example.messages[-1]["role"] == "user" and example.messages[-1]["content"]
        asked = {e.messages[-1]["content"] for e in examples}
        assert len(asked) == len(QA)  # every question asked, none twice
        assert len({len(e.messages) for e in examples}) == 2  # with and without a system


def test_the_styles_differ_in_the_way_the_adapters_should_learn() -> None:
    by_style = {s: [e.completion for e in training_examples(s)] for s in STYLE_IDS}
    for replies in zip(*by_style.values(), strict=True):
        assert len(set(replies)) == len(STYLE_IDS)  # the same fact, dressed three ways
    for reply in by_style["concise"]:
        assert len(re.findall(r"[.!?](\s|$)", reply)) == 1 and not EMOJI.search(reply)
    for reply in by_style["formal"]:
        assert "!" not in reply and not EMOJI.search(reply)
        # an opener, the answer and a closer
        assert len(re.findall(r"[.!?](\s|$)", reply)) >= 3
    for reply in by_style["playful"]:
        assert "!" in reply and EMOJI.search(reply)
    assert len(set(by_style["playful"])) == len(QA)


def test_training_data_is_reproducible_per_seed() -> None:
    assert training_examples("formal") == training_examples("formal")
    assert training_examples("formal", seed=1) != training_examples("formal")
    with pytest.raises(KeyError, match="concise, formal, playful"):
        training_examples("grumpy")


# -- the bundled adapters -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled() -> LoraHub:
    return LoraHub(BUNDLED_LORA_DIR)


def test_bundled_cards_describe_their_adapters(bundled: LoraHub) -> None:
    cards = {c.id: c for c in bundled.cards() if c.kind == "style"}
    assert set(STYLE_IDS) <= set(cards)
    for spec in STYLES:
        card = cards[spec.id]
        assert card.to_dict() == card_for(spec).to_dict()  # what the script writes
        folder = Path(card.resolved_location)
        assert folder == BUNDLED_LORA_DIR / spec.id
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == card.rank
        assert sorted(config["target_modules"]) == sorted(card.target_modules)
        # no path of the machine that trained it
        assert "/" not in config["base_model_name_or_path"]
        assert not (folder / "README.md").exists()


def test_bundled_weights_are_float16_and_small(bundled: LoraHub) -> None:
    from safetensors import safe_open

    for style_id in STYLE_IDS:
        path = Path(bundled.get(style_id).resolved_location) / "adapter_model.safetensors"
        assert path.stat().st_size < 1.2e6
        with safe_open(str(path), "pt") as f:
            dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118
        assert dtypes == {"torch.float16"}


@pytest.fixture(scope="module")
def backend(bundled: LoraHub) -> LocalBackend:
    # the suite's model cache: a module fixture runs before conftest sets PERSONA_CACHE_DIR
    return LocalBackend(lora_hub=bundled, cache_dir=MODELS).load()


def test_the_local_backend_serves_the_bundled_adapters(backend: LocalBackend) -> None:
    base = backend.generate(GenerationRequest(messages=QUESTION, max_new_tokens=6))
    texts = {"base": base.text}
    for style_id in STYLE_IDS:
        request = GenerationRequest(messages=QUESTION, adapters=[(style_id, 1.0)], max_new_tokens=6)
        result = backend.generate(request)
        assert result.served_by == SERVED_ADAPTER and result.adapters == ((style_id, 1.0),)
        texts[style_id] = result.text
    # each adapter changes what the model says
    assert len(set(texts.values())) == len(texts), texts
    mixed = backend.generate(
        GenerationRequest(
            messages=QUESTION, adapters=[("concise", 0.7), ("playful", 0.3)], max_new_tokens=1
        )
    )
    assert mixed.served_by == SERVED_MERGED


# -- training -----------------------------------------------------------------------------


def test_a_short_training_run_writes_an_adapter_the_backend_serves(tmp_path: Path) -> None:
    out = tmp_path / "hub"
    assert main(["--out", str(out), "--steps", "1", "--style", "playful", "--examples", "2"]) == 0
    hub = LoraHub(out)
    assert hub.ids() == ["playful"]
    card = hub.get("playful")
    assert card.location == "./playful" and Path(card.resolved_location) == out / "playful"
    report = json.loads((out / "playful" / "training.json").read_text())
    assert report["steps"] == 1 and report["examples"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no leftovers
    result = LocalBackend(lora_hub=hub).generate(
        GenerationRequest(messages=QUESTION, adapters=[("playful", 1.0)], max_new_tokens=2)
    )
    assert result.served_by == SERVED_ADAPTER and result.completion_tokens


def test_the_script_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path), "--steps", "0"])
    assert info.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--style", "grumpy"])
    assert not any(tmp_path.iterdir())


def test_train_lora_lowers_the_loss(tmp_path: Path) -> None:
    examples = [
        TrainingExample.of([{"role": "user", "content": q}], f"Yay! {a} 🎉") for q, a in QA[:2]
    ]
    steps: list[tuple[int, int, float]] = []
    report = train_lora(
        examples,
        tmp_path / "a",
        steps=6,
        batch_size=2,
        learning_rate=2e-3,
        progress=lambda s, n, loss: steps.append((s, n, loss)),
    )
    assert [s for s, _, _ in steps] == list(range(1, 7)) and {n for _, n, _ in steps} == {6}
    assert report.losses == [loss for *_, loss in steps]
    # the same two examples every step: the loss falls
    assert report.losses[-1] < 0.8 * report.losses[0], report.losses
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_train_lora_refuses_bad_arguments(tmp_path: Path) -> None:
    one = [TrainingExample.of([{"role": "user", "content": "hi"}], "hello")]
    with pytest.raises(PersonaConfigError, match="at least one example"):
        train_lora([], tmp_path / "a")
    for bad in ({"steps": 0}, {"batch_size": 0}, {"rank": 0}):
        with pytest.raises(PersonaConfigError, match=r"must be >= 1"):
            train_lora(one, tmp_path / "a", **bad)
    long = [TrainingExample.of([{"role": "user", "content": "word " * 600}], "ok")]
    with pytest.raises(PersonaConfigError, match="max_length"):
        train_lora(long, tmp_path / "a", max_length=64)
    assert not (tmp_path / "a").exists()
