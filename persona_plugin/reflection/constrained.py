"""JSON-schema-constrained generation on a local transformers model (lm-format-enforcer).

At every step the model may only pick tokens that keep the output a valid prefix of a
document of the schema, so the answer always parses. The schema's bounds (``maxItems``,
``maxLength``, enums) bound the answer's size; :func:`token_budget` turns them into a
``max_new_tokens`` the answer can never need more of, so generation always ends on a closed
document rather than being cut mid-string.

The enforcer's token table (every vocabulary entry decoded; ~2 s for SmolLM2) is built
once per tokenizer and cached.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: whitespace the enforcer allows between JSON tokens: one space (the trained format)
_MAX_WHITESPACE = 1
#: output bytes a schema string character can take: ``\uXXXX`` is six
_BYTES_PER_CHAR = 6

_tables: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_banned: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def _enforcer_modules() -> tuple[Any, Any]:
    """lm-format-enforcer's JSON schema parser and its transformers integration."""
    name = "transformers.tokenization_utils"
    try:
        module: Any = importlib.import_module(name)
    except ImportError:
        module = None
    swapped = not hasattr(module, "PreTrainedTokenizerBase")
    if swapped:
        # lm-format-enforcer 0.11 imports PreTrainedTokenizerBase from
        # transformers.tokenization_utils, which transformers 5 no longer has there (the
        # class lives in tokenization_utils_base). The alias stands only while the
        # integration is imported, so no other code mistakes it for the real module.
        import transformers.tokenization_utils_base as base

        sys.modules[name] = base
    try:
        from lmformatenforcer import JsonSchemaParser
        from lmformatenforcer.integrations import transformers as integration
    finally:
        if swapped:
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return JsonSchemaParser, integration


def tokenizer_table(tokenizer: Any) -> Any:
    """The enforcer's token table for ``tokenizer``, built once per tokenizer object."""
    with _tables_lock:
        table = _tables.get(tokenizer)
        if table is None:
            _, integration = _enforcer_modules()
            table = integration.build_token_enforcer_tokenizer_data(tokenizer)
            _tables[tokenizer] = table
        return table


def token_budget(schema: Mapping[str, Any]) -> int:
    """The most tokens any document of ``schema`` can take (every token is >= 1 byte).

    Raises ValueError for a schema without bounds: an unbounded string or array could
    grow until the budget cuts it, and a cut answer does not parse.
    """

    def size(node: Mapping[str, Any]) -> int:
        if "enum" in node:
            return max(len(str(v)) for v in node["enum"]) * _BYTES_PER_CHAR + 2
        kind = node.get("type")
        gap = 2 * _MAX_WHITESPACE
        if kind == "object":
            props = node.get("properties", {})
            inner = sum(len(k) + 4 + gap + 1 + size(v) for k, v in props.items())
            return 2 + gap + inner
        if kind == "array":
            if "maxItems" not in node:
                raise ValueError("an array in the schema has no maxItems")
            return 2 + gap + node["maxItems"] * (size(node["items"]) + 1 + gap)
        if kind == "string":
            if "maxLength" not in node:
                raise ValueError("a string in the schema has no maxLength")
            return node["maxLength"] * _BYTES_PER_CHAR + 2
        if kind in ("integer", "number"):
            return 32
        if kind in ("boolean", "null"):
            return 5
        raise ValueError(f"token_budget does not know the schema node {dict(node)!r}")

    return size(schema)


class _WithoutControlTokens:
    """The enforcer's allowed tokens minus those that decode to control characters.

    Inside a string the enforcer's free-text shortcut allows every token but quotes and
    backslashes, raw control characters included, and a raw tab or newline inside a string
    is not valid JSON. Without those tokens, whitespace between JSON tokens is spaces only,
    which JSON does not mind.
    """

    def __init__(self, allowed: Any, banned: frozenset[int]) -> None:
        self.allowed, self.banned = allowed, banned
        self.token_enforcer = allowed.token_enforcer

    def __call__(self, batch_id: int, sent: Any) -> list[int]:
        return [t for t in self.allowed(batch_id, sent) if t not in self.banned]


def _control_tokens(tokenizer: Any) -> frozenset[int]:
    table = tokenizer_table(tokenizer)  # holds every token already decoded
    with _tables_lock:
        banned = _banned.get(tokenizer)
        if banned is None:
            banned = frozenset(
                index
                for index, text, _ in table.regular_tokens
                if any(c < " " or c == "\x7f" for c in text)
            )
            _banned[tokenizer] = banned
        return banned


def allowed_tokens_fn(tokenizer: Any, schema: Mapping[str, Any]) -> Any:
    """A fresh ``prefix_allowed_tokens_fn`` for one generation constrained to ``schema``."""
    parser_cls, integration = _enforcer_modules()
    allowed = integration.build_transformers_prefix_allowed_tokens_fn(
        tokenizer_table(tokenizer), parser_cls(dict(schema))
    )
    # the token enforcer replaces the parser's config with its own (12 whitespaces allowed
    # between JSON tokens); the budget counts on this bound instead
    allowed.token_enforcer.root_parser.config.max_consecutive_whitespaces = _MAX_WHITESPACE
    return _WithoutControlTokens(allowed, _control_tokens(tokenizer))


@dataclass
class ConstrainedResult:
    """One constrained generation: the text (a complete document) and its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


def generate_json(
    model: Any,
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    schema: Mapping[str, Any],
    *,
    max_new_tokens: int | None = None,
) -> ConstrainedResult:
    """Greedy generation from a chat, constrained to ``schema``.

    ``model``/``tokenizer``: a loaded transformers causal LM (a peft model is fine; the
    caller activates the adapter). ``max_new_tokens`` defaults to :func:`token_budget`.
    """
    import torch
    from transformers import GenerationConfig

    allowed = allowed_tokens_fn(tokenizer, schema)
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
    )
    encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    encoded = encoded.to(next(model.parameters()).device)
    prompt_len = int(encoded["input_ids"].shape[1])
    base = model.generation_config
    config = GenerationConfig(
        max_new_tokens=max_new_tokens or token_budget(schema),
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id if base.pad_token_id is not None else tokenizer.eos_token_id,
    )
    started = time.monotonic()
    with torch.inference_mode():
        output = model.generate(
            **encoded, generation_config=config, prefix_allowed_tokens_fn=allowed
        )
    new = output[0][prompt_len:].tolist()
    return ConstrainedResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=prompt_len,
        completion_tokens=len(new),
        seconds=time.monotonic() - started,
    )
