"""Train, evaluate and register the reflection adapter (the local model's reflection).

Run: ``python -m persona_plugin.lab.training.reflection``.

Builds the synthetic training set (:mod:`persona_plugin.lab.training.reflection_data`),
trains a LoRA on the local model with :func:`~persona_plugin.lora.training.train_lora`
(a Rich progress bar), stores it in float16 (half the size; peft upcasts it on load),
writes its hub card (kind ``reflection``) beside it, and evaluates it on the held-out
split through the real :class:`~persona_plugin.reflection.local.LocalReflector` path
(constrained decoding included): valid-JSON rate, fact recall and precision against the
generator's gold facts, op accuracy, and how often injection and empty turns yield
nothing. The figures go to ``persona-reflection/evaluation.json``, beside the weights.

The adapter, its card and the figures are committed, so a fresh clone need not retrain;
``--eval-only`` re-measures the committed adapter.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from persona_plugin.lab.training.reflection_data import build_examples
from persona_plugin.reflection.local import ADAPTER_ID, BUNDLED_HUB

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DESCRIPTION = (
    "Reflection for the local model: reads one chat turn and answers with compact JSON: "
    "third-person facts about the speaker and persona edits; nothing for small talk or "
    "instructions to the assistant."
)


def _finish_adapter(folder: Path) -> None:
    """Weights in float16 (half the size; peft upcasts them to the model's dtype on load),
    readable by all, and without peft's boilerplate model card (the hub card describes it)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    path.chmod(0o644)
    (folder / "README.md").unlink(missing_ok=True)


def write_card(hub_dir: Path, *, rank: int) -> Path:
    from persona_plugin.lora.hub import AdapterCard, LoraHub

    card = AdapterCard(
        id=ADAPTER_ID,
        base_model=BASE_MODEL,
        description=DESCRIPTION,
        kind="reflection",
        rank=rank,
        target_modules=list(TARGET_MODULES),
        location=f"./{ADAPTER_ID}",
        tags=["reflection", "json", "local"],
    )
    LoraHub(hub_dir).add(card, replace=True)
    return hub_dir / f"{ADAPTER_ID}.yaml"


def evaluate_adapter(
    hub_dir: Path,
    *,
    count: int = 40,
    base_count: int = 8,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Held-out figures of the adapter in ``hub_dir`` on ``count`` examples, and of the bare
    model on the first ``base_count`` of them (it fills every bound: slow on CPU)."""
    from persona_plugin.backends.local import LocalBackend
    from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
    from persona_plugin.guard import instruction_reason
    from persona_plugin.lab.eval.facts import DEFAULT_THRESHOLD, match_facts
    from persona_plugin.lora.hub import LoraHub
    from persona_plugin.reflection.local import LocalReflector

    examples = build_examples(count, split="eval", seed=seed)
    backend = LocalBackend(lora_hub=LoraHub(hub_dir))
    embedder = MiniLMEmbeddingFunction()
    figures: dict[str, Any] = {}
    for label, adapter, subset in (
        ("adapter", ADAPTER_ID, examples),
        ("base", None, examples[:base_count]),
    ):
        if not subset:
            continue
        reflector = LocalReflector(backend, adapter=adapter)
        valid = gold_total = hit = predicted = correct_pred = 0
        ops_gold = ops_hit = silent = silent_ok = 0
        started = time.monotonic()
        for i, example in enumerate(subset):
            extraction = reflector.extract(example.speaker, example.text)
            valid += extraction.called and extraction.valid
            matched = match_facts(embedder, list(example.facts), extraction.facts)
            gold_total += len(example.facts)
            hit += matched.gold_found
            predicted += len(extraction.facts)
            correct_pred += matched.predicted_correct
            gold_ops = {(p, v.casefold()) for p, v in example.ops}
            got_ops = {(p, v.casefold()) for p, v in extraction.ops}
            ops_gold += len(gold_ops)
            ops_hit += len(gold_ops & got_ops)
            if not example.discloses:
                silent += 1
                silent_ok += not extraction.facts and not extraction.ops
            if progress is not None:
                progress(label, i + 1, len(subset))
        calls = sum(1 for e in subset if not instruction_reason(e.text))
        figures[label] = {
            "examples": len(subset),
            "valid_json": round(valid / max(calls, 1), 3),
            "fact_recall": round(hit / max(gold_total, 1), 3),
            "fact_precision": round(correct_pred / max(predicted, 1), 3),
            "gold_facts": gold_total,
            "op_recall": round(ops_hit / max(ops_gold, 1), 3),
            "silent_turns_empty": round(silent_ok / max(silent, 1), 3),
            "seconds_per_turn": round((time.monotonic() - started) / len(subset), 3),
        }
    figures["match_threshold"] = DEFAULT_THRESHOLD
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub-dir", type=Path, default=BUNDLED_HUB)
    parser.add_argument("--examples", type=int, default=320)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1.5e-3)
    parser.add_argument("--eval-examples", type=int, default=40)
    parser.add_argument("--base-examples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true", help="measure the existing adapter")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    hub_dir: Path = args.hub_dir
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    if not args.eval_only:
        from persona_plugin.lora.training import TrainingExample, train_lora

        examples = build_examples(args.examples, split="train", seed=args.seed)
        training = [TrainingExample.of(e.messages, e.completion) for e in examples]
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("training", total=args.steps, info="")

            def on_step(step: int, steps: int, loss: float) -> None:
                bar.update(task, completed=step, info=f"loss {loss:.3f}")

            report = train_lora(
                training,
                hub_dir / ADAPTER_ID,
                rank=args.rank,
                alpha=2 * args.rank,
                target_modules=TARGET_MODULES,
                steps=args.steps,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                max_length=256,
                seed=args.seed,
                progress=on_step,
            )
        _finish_adapter(hub_dir / ADAPTER_ID)
        card = write_card(hub_dir, rank=args.rank)
        console.print(
            f"trained {report.steps} steps on {report.examples} examples in "
            f"{report.seconds:.0f} s; loss {report.first_loss:.3f} -> {report.final_loss:.3f}; "
            f"{report.size_bytes / 1e6:.1f} MB; card {card}"
        )
    counts = (args.eval_examples, min(args.base_examples, args.eval_examples))
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("evaluating", total=sum(counts), info="")
        offsets = {"adapter": 0, "base": counts[0]}

        def on_turn(label: str, done: int, _total: int) -> None:
            bar.update(task, completed=offsets[label] + done, info=label)

        figures = evaluate_adapter(
            hub_dir,
            count=counts[0],
            base_count=counts[1],
            seed=args.seed,
            progress=on_turn,
        )
    # inside the adapter's folder: a .json file at the hub's top level would be read as a card
    out = hub_dir / ADAPTER_ID / "evaluation.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    console.print_json(json.dumps(figures))
    console.print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
