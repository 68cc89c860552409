"""``persona eval``: benchmarks of the plugin's parts on public data sets.

``locomo`` measures long-term memory's recall of evidence turns against the naive vector
baseline; ``facts`` measures fact extraction by reflection against LoCoMo's observations;
``prefeval`` measures whether a stated preference is still in the system prompt after 10 to
300 unrelated turns (PrefEval's explicit preferences), and whether the persona scorer picks
the option that follows it (the mcq options).
The logic lives in :mod:`persona_plugin.lab.eval`; these commands parse, show progress and
print tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from persona_plugin.cli._common import err, out

eval_app = typer.Typer(help="Benchmarks of the plugin's parts, on public data sets.")


def _numbers(text: str, *, option: str, example: str, minimum: int, empty: str) -> list[int]:
    """The sorted, distinct numbers of a comma-separated option, each at least ``minimum``."""
    try:
        numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a list of numbers like {example}", param_hint=option
        ) from None
    if not numbers or numbers[0] < minimum:
        raise typer.BadParameter(empty, param_hint=option)
    return numbers


def _parse_ks(text: str) -> list[int]:
    return _numbers(
        text,
        option="--k",
        example="1,5,10",
        minimum=1,
        empty="k values must be positive, e.g. 1,5,10,20",
    )


@eval_app.command("locomo")
def eval_locomo(
    files: Annotated[list[Path], typer.Argument(help="LoCoMo conversation JSON files")],
    k: Annotated[str, typer.Option("--k", help="comma-separated k values")] = "1,5,10,20",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Recall@k of evidence turns: long-term memory vs the naive vector baseline."""
    from persona_plugin.cli.progress import progress_bar
    from persona_plugin.lab.eval.locomo import evaluate

    ks = _parse_ks(k)
    with progress_bar(err, "ingesting", "conversation {}", transient=as_json) as progress:
        result = evaluate(files, ks, progress=progress)
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"LoCoMo recall@k of evidence turns ({result['questions']} questions)")
    table.add_column("k", justify="right")
    for column in ("memory (hybrid)", "naive baseline", "difference"):
        table.add_column(column, justify="right")
    for kk in ks:
        ours, base = result["memory"][kk], result["baseline"][kk]
        table.add_row(str(kk), f"{ours:.3f}", f"{base:.3f}", f"{(ours - base) * 100:+.1f} pts")
    out.print(table)


@eval_app.command("facts")
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
    from persona_plugin.cli.progress import progress_bar
    from persona_plugin.lab.eval.facts import evaluate
    from persona_plugin.reflection.local import LocalReflector, bundled_backend

    backend = bundled_backend()
    reflectors = {"adapter": LocalReflector(backend)}
    if base:
        reflectors["base"] = LocalReflector(backend, adapter=None)
    the_gate = None
    if gate:
        from persona_plugin.reflection.gate import ReflectionGate

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


def _parse_counts(text: str) -> list[int]:
    return _numbers(
        text,
        option="--inter-turns",
        example="10,100,300",
        minimum=0,
        empty="give turn counts such as 10,100,300",
    )


@eval_app.command("prefeval")
def eval_prefeval(
    folder: Annotated[
        Path, typer.Argument(help="PrefEval data: explicit_preference/, filtered_inter_turns.json")
    ],
    topics: Annotated[
        str | None, typer.Option("--topics", help="comma-separated topics (default: all)")
    ] = None,
    inter_turns: Annotated[
        str, typer.Option("--inter-turns", help="comma-separated distractor turn counts")
    ] = "10,100,300",
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="the first N items of each topic")
    ] = None,
    reflector: Annotated[
        str, typer.Option("--reflector", help="none (memory only) or local (the local model)")
    ] = "none",
    gate: Annotated[
        bool, typer.Option("--gate/--no-gate", help="the cost gate in front of the local reflector")
    ] = True,
    choice: Annotated[
        bool,
        typer.Option(
            "--choice/--no-choice",
            help="also pick among the mcq_options with the persona scorer (and the oracle)",
        ),
    ] = True,
    seed: Annotated[int, typer.Option("--seed", help="the mcq options' shuffle")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Preference retention: after 10 to 300 unrelated turns, is the stated preference in the
    system prompt the model would receive (persona block plus recalled memories)? And
    choice accuracy: does the persona scorer pick the option that follows it?

    Each item: a fresh user, the history imported turn by turn (guard, memory, reflection),
    then the question assembled by the persona graph; nothing is generated. Retention:
    a persona value or recalled memory with MiniLM cosine >= 0.8 to the preference (0.7
    and 0.9 shown), and the preference verbatim. Choice (mcq_options/, shuffled with
    --seed): the persona-conditioned preference scorer bound to the persona and the user's
    recalled messages the prompt holds, beside chance (0.25) and the oracle (the same
    scorer given the preference verbatim).
    """
    from persona_plugin.cli.progress import progress_bar
    from persona_plugin.lab.eval.prefeval import REFLECTORS, THRESHOLDS, evaluate

    if reflector not in REFLECTORS:
        raise typer.BadParameter(f"use one of {', '.join(REFLECTORS)}", param_hint="--reflector")
    counts = _parse_counts(inter_turns)
    chosen = [t.strip() for t in topics.split(",") if t.strip()] if topics else None
    with progress_bar(err, "importing", "{}", transient=as_json) as progress:
        result = evaluate(
            folder,
            topics=chosen,
            inter_turns=counts,
            limit=limit,
            reflector=reflector,
            gate=gate,
            choice=choice,
            seed=seed,
            progress=progress,
        )
    if as_json:
        typer.echo(json.dumps(result))
        return
    for n in counts:
        figures = result["results"][str(n)]["all"]
        table = Table(
            title=f"PrefEval retention after {n} distractor turns ({figures['items']} items, "
            f"reflector {result['reflector']})"
        )
        table.add_column("prompt", justify="left", no_wrap=True)
        for t in THRESHOLDS:
            table.add_column(f"cos≥{t}", justify="right")
        columns = ("verbatim", "recalled", "mem cut", "calls", "gate sends", "s/item")
        for column in columns:
            table.add_column(column, justify="right")
        table.add_row(
            "no persona",
            *["0.000"] * (len(THRESHOLDS) + 1),
            "-",
            "-",
            "0",
            "-",
            "-",
        )
        gate_sends = figures["gate_sends_per_item"]
        table.add_row(
            "persona+memory",
            *(f"{figures['retention'][str(t)]:.3f}" for t in THRESHOLDS),
            f"{figures['verbatim']:.3f}",
            f"{figures['preference_recalled']:.3f}",
            f"{figures['memory_dropped_by_budget']:.3f}",
            f"{figures['reflection_calls_per_item']:g}",
            "-" if gate_sends is None else f"{gate_sends:g}/{figures['user_turns_per_item']:g}",
            f"{figures['median_seconds_per_item']:.1f}",
        )
        table.add_row(
            "(items fit)",
            *(f"{figures['item_fit_retention'][str(t)]:.3f}" for t in THRESHOLDS),
            *["" for _ in columns],
        )
        out.print(table)
    if choice:
        _choice_table(result, counts)
    out.print(
        "no persona: the question alone reaches the model. recalled: the preference turn is "
        "among the recalled memories (before the budget); mem cut: the token budget left the "
        "recalled-memory block out; (items fit): a counterfactual assembly keeping recalled "
        "memories one by one within the budget (not the product's); calls: reflection calls "
        "per item; s/item: median"
    )


def _choice_table(result: dict, counts: list[int]) -> None:
    table = Table(
        title=f"PrefEval choice accuracy on the mcq options (shuffled, seed "
        f"{result['choice']['seed']}; persona scorer)"
    )
    for column in ("turns", "items", "system", "oracle", "system/oracle", "chance", "no signal"):
        table.add_column(column, justify="right")
    for n in counts:
        figures = result["results"][str(n)]["all"]["choice"]
        if not figures["items"]:
            table.add_row(str(n), "0", *["-"] * 5)
            continue
        system, oracle = figures["accuracy"], figures["oracle"]
        table.add_row(
            str(n),
            str(figures["items"]),
            f"{system:.3f}",
            f"{oracle:.3f}",
            f"{system / oracle:.2f}" if oracle else "-",
            f"{figures['chance']:.2f}",
            f"{figures['no_signal']:.3f}",
        )
    out.print(table)
    out.print(
        "system: the persona scorer bound to the persona and the user's recalled messages the "
        "prompt holds; oracle: the same scorer given the preference verbatim; no signal: "
        "items where nothing held told the options apart (a pick at chance)"
    )
