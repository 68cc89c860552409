"""The cost gate: a logistic regression on sentence embeddings, in front of reflection."""

from __future__ import annotations

import numpy as np
import pytest

from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.errors import PersonaConfigError
from persona_plugin.lab.training.gate import training_set
from persona_plugin.reflection.gate import GATE_FILE, ReflectionGate


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbeddingFunction:
    return MiniLMEmbeddingFunction()


def test_the_shipped_gate_sends_disclosures_and_skips_small_talk(embedder) -> None:
    gate = ReflectionGate.load(embedder=embedder)
    texts, labels = training_set(200, split="eval")  # held-out names and phrasings
    sent = gate.probabilities(texts) >= gate.threshold
    truth = np.asarray(labels)
    assert sent[truth].mean() >= 0.85  # few facts lost
    assert (~sent[~truth]).mean() >= 0.25  # some calls saved
    assert gate.should_reflect("I just moved to Leeds and I work as an architect.")
    assert not gate.should_reflect("Thanks a lot, see you tomorrow.")


def test_training_separates_the_classes(embedder, tmp_path) -> None:
    texts = ["I live in Porto.", "I'm a nurse.", "I love chess.", "Hi!", "Thanks!", "Bye now."]
    labels = [True, True, True, False, False, False]
    gate = ReflectionGate.train(texts, labels, embedder=embedder, threshold=0.5)
    assert [gate.should_reflect(t) for t in texts] == labels
    saved = ReflectionGate.load(gate.save(tmp_path / "gate.json"), embedder=embedder)
    assert np.allclose(saved.probabilities(texts), gate.probabilities(texts), atol=1e-4)


def test_bad_inputs_say_what_to_do(tmp_path) -> None:
    with pytest.raises(ValueError, match="both"):
        ReflectionGate.train(["a", "b"], [True, True])
    broken = tmp_path / "gate.json"
    broken.write_text("{not json")
    with pytest.raises(PersonaConfigError, match=r"lab\.training\.gate"):
        ReflectionGate.load(broken)
    assert GATE_FILE.is_file()
