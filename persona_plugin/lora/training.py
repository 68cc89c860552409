"""Training small LoRA adapters on the local model, on CPU, from project-written examples.

``train_lora(examples, output_dir)`` fine-tunes a peft LoRA on the local model
(SmolLM2-135M-Instruct by default) and saves a peft adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) that the local backend and the
LoRA hub load by path. An example is a chat (``messages``) and the assistant's reply
(``completion``); the loss counts only the reply's tokens, so the adapter learns how to
answer, not to repeat the prompt.

Used by slow adaptation (a user's own adapter, :mod:`persona_plugin.adaptation.adapter`),
the demo style adapters (``persona_plugin.lab.training.demo_adapters``) and the reflection
adapter. Deterministic for a given seed on one machine. ``save_dtype="float16"`` halves
the adapter's file (the local backend casts it back to the model's dtype when it loads).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_plugin.errors import PersonaConfigError

#: (step, steps, loss) after each optimizer step
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainingExample:
    """One chat (``messages``: role/content dicts) and the assistant reply to learn."""

    messages: tuple[dict[str, str], ...]
    completion: str

    @classmethod
    def of(cls, messages: Sequence[dict[str, str]], completion: str) -> TrainingExample:
        return cls(tuple(dict(m) for m in messages), completion)


@dataclass
class TrainingReport:
    output_dir: Path
    steps: int
    examples: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def final_loss(self) -> float:
        """Mean of the last few steps' losses (one step's loss is noisy)."""
        tail = self.losses[-5:]
        return sum(tail) / len(tail) if tail else math.nan

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.output_dir.iterdir() if p.is_file())


def encode_example(
    tokenizer: Any, example: TrainingExample, max_length: int = 512
) -> tuple[list[int], int]:
    """Token ids of prompt + reply, and where the reply starts."""
    prompt = tokenizer.apply_chat_template(
        list(example.messages), add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token or ""
    reply_ids = tokenizer(example.completion + end, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + 1 > max_length:
        raise PersonaConfigError(
            f"a training example's prompt is {len(prompt_ids)} tokens, over max_length="
            f"{max_length}: shorten it or raise max_length."
        )
    ids = (prompt_ids + reply_ids)[:max_length]
    return ids, len(prompt_ids)


def reply_loss(
    model: Any, tokenizer: Any, examples: Sequence[TrainingExample], max_length: int = 512
) -> float:
    """The mean per-token loss (negative log-likelihood) of the examples' replies under
    ``model``: how likely it finds what the user wanted; the gate of a user's adapter."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, start in (encode_example(tokenizer, e, max_length) for e in examples):
            scored = len(ids) - start  # reply tokens, each predicted from the one before
            if scored < 1:
                continue
            out = model(**_batch([(ids, start)], pad_id))
            total += float(out.loss) * scored
            tokens += scored
    return total / tokens if tokens else math.nan


def _batch(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids, labels, mask = [], [], []
    for ids, start in rows:
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        # -100: not scored (the prompt and the padding)
        labels.append([-100] * start + ids[start:] + [-100] * pad)
        mask.append([1] * len(ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def train_lora(
    examples: Sequence[TrainingExample],
    output_dir: str | os.PathLike[str],
    *,
    model_dir: str | os.PathLike[str] | None = None,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    steps: int = 20,
    batch_size: int = 4,
    learning_rate: float = 1e-3,
    max_length: int = 512,
    seed: int = 0,
    progress: Progress | None = None,
    save_dtype: str = "float32",
) -> TrainingReport:
    """Train a LoRA adapter on ``examples`` and save it to ``output_dir``.

    ``model_dir``: the base model (default: the local SmolLM2 conversion). Batches are
    drawn without replacement, reshuffled each epoch. The folder is written under a temp
    name and renamed into place, so an interrupted run leaves no half-written adapter.
    """
    if not examples:
        raise PersonaConfigError("train_lora needs at least one example.")
    if save_dtype not in ("float32", "float16", "bfloat16"):
        raise PersonaConfigError(f"save_dtype {save_dtype!r} is not float32, float16 or bfloat16.")
    if steps < 1 or batch_size < 1 or rank < 1:
        raise PersonaConfigError(
            f"steps, batch_size and rank must be >= 1 (got {steps}, {batch_size}, {rank})."
        )
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_plugin.backends.local_model import ensure_local_model

    started = time.monotonic()
    base_dir = Path(model_dir) if model_dir is not None else ensure_local_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [encode_example(tokenizer, e, max_length) for e in examples]

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate
    )
    # linear decay to 10%: a short run should not end on a big step
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - 0.9 * step / max(1, steps)
    )

    report = TrainingReport(Path(output_dir), steps=steps, examples=len(rows))
    order: list[int] = []
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            more = list(range(len(rows)))
            rng.shuffle(more)
            order.extend(more)
        picked, order = order[:batch_size], order[batch_size:]
        batch = _batch([rows[i] for i in picked], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        report.losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, steps, report.losses[-1])

    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".train"))
    # the card names the base model; an absolute path of this machine means nothing elsewhere
    model.peft_config["default"].base_model_name_or_path = base_dir.name
    if save_dtype != "float32":
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(getattr(torch, save_dtype))
    try:
        # peft's "auto" looks the base model's name up on the Hugging Face hub (a network
        # call, and the name is a local folder's); only a targeted embedding needs saving
        model.save_pretrained(work, save_embedding_layers=any("embed" in m for m in target_modules))
        # peft's generated model card is an empty template naming this machine's model path
        (work / "README.md").unlink(missing_ok=True)
        (work / "training.json").write_text(
            json.dumps(
                {
                    "examples": len(rows),
                    "steps": steps,
                    "batch_size": batch_size,
                    "learning_rate": learning_rate,
                    "rank": rank,
                    "alpha": alpha,
                    "target_modules": list(target_modules),
                    "seed": seed,
                    "save_dtype": save_dtype,
                    "first_loss": round(report.first_loss, 4),
                    "final_loss": round(report.final_loss, 4),
                },
                indent=2,
            )
            + "\n"
        )
        os.chmod(work, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report.seconds = time.monotonic() - started
    return report
