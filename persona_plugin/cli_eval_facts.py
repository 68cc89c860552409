"""``persona eval facts``: the fact-extraction benchmark on LoCoMo observations.

Mounted under the ``persona eval`` group by :func:`register`; the logic is in
:mod:`persona_plugin.fact_eval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)


def eval_facts(
    files: Annotated[list[Path], typer.Argument(help="LoCoMo conversation JSON files")],
    sessions: Annotated[
        int | None, typer.Option("--sessions", min=1, help="the first N sessions of each file")
    ] = None,
    turns: Annotated[
        int | None,
        typer.Option("--turns", min=1, help="the first N turns of each session (shorter runs)"),
    ] = None,
    base: Annotated[
        bool, typer.Option("--base/--no-base", help="also run the local model without adapter")
    ] = True,
    gate: Annotated[
        bool, typer.Option("--gate", help="also score the cost gate in front of the adapter")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Fact recall and precision of offline reflection against LoCoMo's observations.

    One reflection call per turn, on the local model with the reflection adapter and (in
    the same run) without it; extracted facts are matched to the speaker's gold
    observations of that session by embedding cosine (threshold 0.6; 0.5 and 0.7 shown).
    """
    from persona_plugin.cli_progress import progress_bar
    from persona_plugin.fact_eval import evaluate
    from persona_plugin.reflection_local import LocalReflector, bundled_backend

    backend = bundled_backend()
    reflectors = {"adapter": LocalReflector(backend)}
    if base:
        reflectors["base"] = LocalReflector(backend, adapter=None)
    the_gate = None
    if gate:
        from persona_plugin.reflection_gate import ReflectionGate

        the_gate = ReflectionGate.load()
    with progress_bar(err, "reflecting", "reflecting ({})", transient=as_json) as progress:
        result = evaluate(
            files,
            sessions=sessions,
            turns=turns,
            reflectors=reflectors,
            gate=the_gate,
            progress=progress,
        )
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(
        title=f"Fact extraction on LoCoMo observations ({result['sessions']} sessions, "
        f"{result['turns']} turns; one call per turn)"
    )
    table.add_column("figure")
    labels = list(result["results"])
    for label in labels:
        table.add_column(label, justify="right")
    rows = [
        (f"fact recall @{result['threshold']}", "fact_recall"),
        (f"fact precision @{result['threshold']}", "fact_precision"),
        *(
            (f"recall / precision @{t}", f"@{t}")
            for t in result["thresholds"]
            if t != result["threshold"]
        ),
        ("valid JSON", "valid_json"),
        ("turns sent to the LLM", "turns_sent"),
        ("LLM calls per turn", "calls_per_turn"),
        ("tokens per turn", "tokens_per_turn"),
        ("seconds per session", "seconds_per_session"),
        ("facts extracted / gold", "facts"),
    ]
    for name, key in rows:
        cells = []
        for label in labels:
            figures = result["results"][label]
            if key.startswith("@"):
                pair = figures["by_threshold"][key[1:]]
                cells.append(f"{pair['recall']:.3f} / {pair['precision']:.3f}")
            elif key == "facts":
                cells.append(f"{figures['facts_extracted']} / {figures['gold_facts']}")
            else:
                value = figures[key]
                cells.append("-" if value is None else str(value))
        table.add_row(name, *cells)
    out.print(table)


def register(eval_app: typer.Typer) -> None:
    """Add ``facts`` to the ``persona eval`` group."""
    eval_app.command("facts")(eval_facts)
