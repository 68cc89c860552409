"""The demo style adapters: project-written data, trained on the local model, with hub cards.

Three LoRA adapters change *how* the local model (SmolLM2-135M-Instruct) answers, not what
it knows: ``concise`` (one plain sentence), ``formal`` (a formal, courteous register) and
``playful`` (cheerful, exclamations and emoji). Their training data is written here: one
short factual answer per question (hand-written), dressed by each style's own openers
and closers (template lists), so the three sets share their facts and differ only in
style, which is what the adapters learn.

The trained adapters ship in ``persona_plugin/assets/lora/`` (cards ``<id>.yaml``, peft
folders ``<id>/``, weights stored as float16), so nothing is trained at run time. Rebuild
them with::

    python -m persona_plugin.lab.training.demo_adapters [--out DIR] [--steps N]

The LoRA hub lists the bundled cards next to the user's own (see
:meth:`persona_plugin.lora.hub.LoraHub.from_settings`).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from persona_plugin.lora.hub import BUNDLED_LORA_DIR, AdapterCard, LoraHub, parse_card
from persona_plugin.lora.training import TrainingExample, TrainingReport, train_lora

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_STEPS = 40
RANK = 8
TARGET_MODULES = ("q_proj", "v_proj")

# (question, a one-sentence answer): the facts every style shares
QA: tuple[tuple[str, str], ...] = (
    ("Why is the sky blue?", "Air scatters blue sunlight more than red, so the sky looks blue."),
    ("How do plants make food?", "Plants turn sunlight, water and carbon dioxide into sugar."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How far away is the Moon?", "The Moon is about 384,000 kilometres from Earth."),
    ("What causes rain?", "Water vapour cools into droplets that grow heavy enough to fall."),
    ("How does a rainbow form?", "Raindrops bend and split sunlight into its colours."),
    ("What is photosynthesis?", "Photosynthesis is how plants make sugar from light."),
    ("Why do we have seasons?", "Earth's tilted axis changes how directly sunlight hits us."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the largest ocean?", "The Pacific is the largest ocean on Earth."),
    ("How do vaccines work?", "Vaccines train the immune system to recognise a germ early."),
    ("What is gravity?", "Gravity is the pull that masses exert on each other."),
    ("Why do cats purr?", "Cats purr to show comfort and sometimes to soothe themselves."),
    (
        "How should I start learning to code?",
        "Pick one language, like Python, and build tiny projects every day.",
    ),
    ("How can I sleep better?", "Keep a regular bedtime and avoid screens for the last hour."),
    ("What is a healthy breakfast?", "Oats with fruit and some yoghurt make a healthy breakfast."),
    ("How do I make a cup of tea?", "Steep a tea bag in freshly boiled water for three minutes."),
    ("What is the tallest mountain?", "Mount Everest is the tallest mountain above sea level."),
    ("How do airplanes fly?", "Wings push air down, and the air pushes the plane up."),
    ("What is DNA?", "DNA is the molecule that carries the instructions for living things."),
    ("How do magnets work?", "Aligned electrons in a magnet create a field that pulls iron."),
    ("What is the speed of light?", "Light travels about 300,000 kilometres per second."),
    ("Why is the ocean salty?", "Rivers carry dissolved minerals into the sea, and they stay."),
    ("How do I save money?", "Set aside a fixed share of each pay cheque before spending."),
    ("What is a black hole?", "A black hole is a region where gravity lets nothing escape."),
    ("How do bees make honey?", "Bees swallow nectar, dry it in the hive and store it as honey."),
    ("What is the smallest planet?", "Mercury is the smallest planet in the solar system."),
    ("How can I stay focused?", "Work in short timed blocks with your phone out of reach."),
    ("What language is spoken in Brazil?", "People in Brazil speak Portuguese."),
    ("How does the heart work?", "The heart is a muscle that pumps blood around the body."),
    ("Why do leaves change colour?", "Leaves lose chlorophyll in autumn, revealing other colours."),
    ("What is the internet?", "The internet is a global network of connected computers."),
    ("How do I cook rice?", "Simmer one cup of rice in two cups of water for about 15 minutes."),
    (
        "What is climate change?",
        "Climate change is the long-term warming caused by greenhouse gases.",
    ),
    ("How many continents are there?", "There are seven continents."),
    ("What do pandas eat?", "Pandas eat almost nothing but bamboo."),
    (
        "How do I learn a new language?",
        "Practise a little every day and speak it as early as you can.",
    ),
    ("What is an atom?", "An atom is the smallest unit of a chemical element."),
    ("Why do we dream?", "Dreams likely help the brain sort memories and emotions."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("How do I write a good email?", "State your request in the first line and keep it short."),
    ("What is a volcano?", "A volcano is an opening where molten rock reaches the surface."),
    ("Can you recommend a good book?", "Try The Little Prince; it is short and wise."),
    ("What should I do this weekend?", "Go for a walk somewhere new and try a local cafe."),
    (
        "How do I stay motivated to exercise?",
        "Choose an activity you enjoy and book it like a meeting.",
    ),
    ("What is machine learning?", "Machine learning is software that learns patterns from data."),
)

# ways a user asks the same thing
_ASKS: tuple[Callable[[str], str], ...] = (
    lambda q: q,
    lambda q: f"Quick question: {q[0].lower()}{q[1:]}",
    lambda q: f"Can you tell me: {q[0].lower()}{q[1:]}",
    lambda q: f"I was wondering. {q}",
    lambda q: f"{q} Please explain.",
)

_SYSTEMS: tuple[str | None, ...] = (
    None,
    "You are a helpful assistant.",
    "You are a helpful assistant. Use what you know about the user.\n<user_profile>\n"
    '- Name: "Sam"\n</user_profile>',
)

_FORMAL_OPEN = (
    "Thank you for your enquiry.",
    "Certainly.",
    "I would be pleased to assist.",
    "Thank you for your question.",
    "Allow me to explain.",
    "Good day.",
)
_FORMAL_CLOSE = (
    "I trust this answers your question.",
    "Should you require further details, I would be glad to provide them.",
    "Please do not hesitate to ask if anything remains unclear.",
    "I hope this information proves useful.",
    "Kind regards.",
)
_PLAYFUL_OPEN = (
    "Ooh, great question! 🎉",
    "Oh, I love this one! 😄",
    "Yay, fun fact time! ✨",
    "Woohoo, let's go! 🚀",
    "Ha, you picked a good one! 🤩",
    "Hey hey! 🌈",
)
_PLAYFUL_CLOSE = (
    "Isn't that awesome?! 🙌",
    "How cool is that?! 😎",
    "Pretty amazing, right?! 🥳",
    "Mind blown! 🤯",
    "Science is so much fun! 💫",
)


def _formal(answer: str, rng: random.Random) -> str:
    body = answer.replace("don't", "do not").replace("it's", "it is")
    return f"{rng.choice(_FORMAL_OPEN)} {body} {rng.choice(_FORMAL_CLOSE)}"


def _playful(answer: str, rng: random.Random) -> str:
    body = answer.rstrip(".") + "!"
    return f"{rng.choice(_PLAYFUL_OPEN)} {body} {rng.choice(_PLAYFUL_CLOSE)}"


def _concise(answer: str, rng: random.Random) -> str:
    return answer


@dataclass(frozen=True)
class StyleSpec:
    """One demo adapter: its card fields and how it dresses an answer."""

    id: str
    description: str
    tags: tuple[str, ...]
    sample_inputs: tuple[str, ...]
    dress: Callable[[str, random.Random], str]


STYLES: tuple[StyleSpec, ...] = (
    StyleSpec(
        "concise",
        "Concise, brief answers: one short plain sentence, straight to the point, no "
        "preamble and no filler. For users who want short, terse, to-the-point replies.",
        ("concise", "brief", "short", "direct", "to the point"),
        ("Keep it short.", "Just the answer, please.", "Give me a one-line answer."),
        _concise,
    ),
    StyleSpec(
        "formal",
        "Formal, polite and professional register: courteous, complete sentences, no slang, "
        "like a business letter. For users who want formal, respectful, professional replies.",
        ("formal", "polite", "professional", "business", "courteous"),
        (
            "Could you kindly explain this in a professional manner?",
            "Please draft a formal reply.",
            "I would appreciate a courteous, professional answer.",
        ),
        _formal,
    ),
    StyleSpec(
        "playful",
        "Playful, cheerful and enthusiastic tone: exclamation marks, emoji, fun and casual "
        "humour. For users who want friendly, funny, upbeat, casual replies.",
        ("playful", "fun", "cheerful", "emoji", "casual", "humorous", "enthusiastic"),
        ("Make it fun!", "Tell me something cool with emoji!", "Cheer me up with a fun answer."),
        _playful,
    ),
)
STYLE_IDS: tuple[str, ...] = tuple(s.id for s in STYLES)


def style(style_id: str) -> StyleSpec:
    for spec in STYLES:
        if spec.id == style_id:
            return spec
    raise KeyError(f"{style_id!r} is not a demo style; known: {', '.join(STYLE_IDS)}")


def training_examples(style_id: str, *, seed: int = 0) -> list[TrainingExample]:
    """The chats one style adapter learns from: every question, asked one of several ways,
    with or without a system prompt, answered in that style."""
    spec = style(style_id)
    # the seed mixes in the style so each style asks its questions in its own ways
    rng = random.Random(f"{seed}:{style_id}")
    examples = []
    for question, answer in QA:
        messages: list[dict[str, str]] = []
        system = rng.choice(_SYSTEMS)
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": rng.choice(_ASKS)(question)})
        examples.append(TrainingExample.of(messages, spec.dress(answer, rng)))
    return examples


def card_for(spec: StyleSpec) -> AdapterCard:
    """The hub card of a style adapter whose folder sits next to the card."""
    data = {
        "id": spec.id,
        "base_model": BASE_MODEL,
        "description": spec.description,
        "kind": "style",
        "tags": list(spec.tags),
        "rank": RANK,
        "target_modules": list(TARGET_MODULES),
        "location": f"./{spec.id}",
        "sample_inputs": list(spec.sample_inputs),
    }
    return parse_card(data, source=f"demo style {spec.id!r}")


def halve_weights(adapter_dir: Path) -> int:
    """Store the adapter's tensors as float16 (half the bytes; peft casts them back to the
    model's dtype on load). Returns the new file size."""
    import torch
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(path).items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # shipped in the package: readable by every user
    tmp.replace(path)
    return path.stat().st_size


def build_adapters(
    out_dir: Path,
    *,
    styles: Sequence[str] = STYLE_IDS,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 4,
    examples_per_style: int | None = None,
    model_dir: Path | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, TrainingReport]:
    """Train each style adapter into ``out_dir/<id>/`` and write ``out_dir/<id>.yaml``.

    ``examples_per_style`` trims the data (for quick test runs). The card is written after
    its weights, so a card never points at a missing folder.
    """
    hub = LoraHub(out_dir)
    reports = {}
    for style_id in styles:
        spec = style(style_id)
        examples = training_examples(style_id)[:examples_per_style]
        report = train_lora(
            examples,
            out_dir / style_id,
            model_dir=model_dir,
            rank=RANK,
            target_modules=TARGET_MODULES,
            steps=steps,
            batch_size=batch_size,
            progress=(lambda s, n, loss, i=style_id: progress(i, s, n, loss)) if progress else None,
        )
        halve_weights(report.output_dir)
        hub.add(card_for(spec), replace=True)
        reports[style_id] = report
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    parser = argparse.ArgumentParser(
        prog="python -m persona_plugin.lab.training.demo_adapters",
        description="Train the demo style LoRA adapters on the local model and write their "
        "hub cards.",
    )
    parser.add_argument("--out", type=Path, default=BUNDLED_LORA_DIR, help="output directory")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per adapter")
    parser.add_argument(
        "--style", action="append", choices=STYLE_IDS, help="train only this style (repeatable)"
    )
    parser.add_argument("--examples", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1 (got {args.steps})")
    styles = tuple(args.style or STYLE_IDS)
    console = Console()
    started = time.monotonic()
    with Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks = {s: bar.add_task(s, total=args.steps, loss=float("nan")) for s in styles}

        def on_step(style_id: str, step: int, steps: int, loss: float) -> None:
            bar.update(tasks[style_id], completed=step, loss=loss)

        reports = build_adapters(
            args.out,
            styles=styles,
            steps=args.steps,
            examples_per_style=args.examples,
            progress=on_step,
        )
    for style_id, report in reports.items():
        console.print(
            f"{style_id}: {report.examples} examples, loss {report.first_loss:.3f} -> "
            f"{report.final_loss:.3f}, {report.seconds:.0f} s, "
            f"{report.size_bytes / 1e6:.2f} MB -> {args.out / style_id}"
        )
    console.print(f"done in {time.monotonic() - started:.0f} s; cards in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
