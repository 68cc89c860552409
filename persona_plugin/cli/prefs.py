"""``persona prefs``: the preference-model hub on the command line (list, add, train, show).

Mounted by :mod:`persona_plugin.cli` (``app.add_typer(prefs_app, name="prefs")``) and sharing
its settings (``--config``, ``--store``). Exit status as for every ``persona`` command: 2 the
input was rejected (a bad card, pairs file or option), 1 the operation failed (an unknown
model or user). Errors print one line, never a traceback (PERSONA_DEBUG=1 shows one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table
from rich.text import Text

from persona_plugin.cli._common import err, out, reports_errors, state
from persona_plugin.errors import PersonaValidationError

F = TypeVar("F", bound=Callable[..., Any])

prefs_app = typer.Typer(
    help="Preference models for MBR decoding: cards (what each model prefers, where it is).",
    no_args_is_help=True,
)


def _hub() -> Any:
    from persona_plugin.preferences.hub import PreferenceHub

    return PreferenceHub.from_settings(state.settings())


def _reject(option: str, problem: str, hint: str) -> PersonaValidationError:
    return PersonaValidationError("command line", option, problem, hint)


@prefs_app.command("list")
@reports_errors
def prefs_list(
    kind: Annotated[str | None, typer.Option(help="only models of this kind")] = None,
    for_user: Annotated[
        str | None,
        typer.Option("--for", help="also show the weights retrieved for this user's persona"),
    ] = None,
    input_text: Annotated[str, typer.Option("--input", help="the turn's input, for --for")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="print the cards as JSON")] = False,
) -> None:
    """List the preference models: the bundled demo ones and $PERSONA_HOME/prefs."""
    from persona_plugin.preferences.cards import PREFERENCE_KINDS
    from persona_plugin.preferences.retrieval import PreferenceRetriever

    if kind is not None and kind not in PREFERENCE_KINDS:
        raise _reject("--kind", f"{kind!r} is not a kind", f"Use {', '.join(PREFERENCE_KINDS)}.")
    hub = _hub()
    cards = [c for c in hub.cards() if kind is None or c.kind == kind]
    weights: dict[str, float] = {}
    if for_user is not None:
        with state.store() as store:
            persona = store.get(for_user)
        weights = dict(PreferenceRetriever(hub).retrieve(persona, input_text).pairs())
    if as_json:
        rows = [
            {**c.to_dict(), "bundled": hub.is_bundled(c)}
            | ({"weight": round(weights.get(c.id, 0.0), 4)} if for_user else {})
            for c in cards
        ]
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not cards:
        err.print(f"no preference models in {', '.join(map(str, hub.directories))}", markup=False)
        return
    table = Table(title="Preference models" + (f" for {for_user}" if for_user else ""))
    columns = ["id", "kind", "scorer", "from", "description"]
    if for_user:
        columns.insert(1, "weight")
    for column in columns:
        table.add_column(column, overflow="fold")
    for card in cards:
        row = [
            Text(card.id),
            card.kind,
            card.scorer,
            "bundled" if hub.is_bundled(card) else "hub",
            Text(card.description + (f" (low: {card.opposite})" if card.opposite else "")),
        ]
        if for_user:
            row.insert(1, f"{weights[card.id]:+.2f}" if card.id in weights else "-")
        table.add_row(*row)
    out.print(table)


@prefs_app.command("add")
@reports_errors
def prefs_add(
    file: Annotated[Path, typer.Argument(help="preference card, YAML or JSON")],
    replace: Annotated[bool, typer.Option(help="overwrite a card with the same id")] = False,
) -> None:
    """Validate a card, check that its model loads, and copy it into the hub as <id>.yaml."""
    hub = _hub()
    card = hub.add(file, replace=replace)
    out.print(
        f"added preference model '{card.id}' ({card.kind}, {card.scorer}) to {hub.directory}",
        markup=False,
    )


@prefs_app.command("show")
@reports_errors
def prefs_show(
    model_id: Annotated[str, typer.Argument(help="the model's id", show_default=False)],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="output format: yaml or json")
    ] = "yaml",
) -> None:
    """Print one preference card (and, on stderr, what its model is)."""
    from persona_plugin.preferences.scorers import EmbeddingHeadScorer

    fmt = fmt.lower()
    if fmt not in ("yaml", "json"):
        raise _reject("--format", f"{fmt!r} is not a format", "Use yaml or json.")
    hub = _hub()
    card = hub.get(model_id)
    scorer = hub.scorer(card)  # loading checks the model
    if fmt == "json":
        typer.echo(json.dumps(card.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(card.to_yaml().rstrip("\n"))
    where = card.path if card.path is not None else "memory"
    line = f"# {card.id}: {card.scorer} from {where}"
    if isinstance(scorer, EmbeddingHeadScorer):
        info = scorer.head.info
        line += (
            f"; {scorer.head.type} head, {scorer.head.input_dim} inputs, trained on "
            f"{info.get('pairs', '?')} pairs (held-out accuracy {info.get('heldout_accuracy')})"
        )
    err.print(line, markup=False)


@prefs_app.command("train")
@reports_errors
def prefs_train(
    pairs: Annotated[
        Path | None,
        typer.Argument(help="preference pairs, JSONL or YAML: prompt, chosen, rejected"),
    ] = None,
    model_id: Annotated[str | None, typer.Option("--id", help="the new model's id")] = None,
    description: Annotated[
        str | None, typer.Option(help="what a high score means (retrieval reads it)")
    ] = None,
    opposite: Annotated[str | None, typer.Option(help="what a low score means")] = None,
    kind: Annotated[str, typer.Option(help="behaviour, style, content, ...")] = "style",
    head: Annotated[str, typer.Option(help="linear or mlp")] = "linear",
    demo: Annotated[
        bool, typer.Option("--demo", help="retrain the demo models (brevity, formality, warmth)")
    ] = False,
    replace: Annotated[bool, typer.Option(help="overwrite a model with the same id")] = False,
) -> None:
    """Train an embedding-head model from preference pairs into the hub (seconds, on CPU)."""
    from persona_plugin.lab.training.preferences import DEMO_CARDS, demo_pairs
    from persona_plugin.preferences.training import load_pairs, train_model

    if head not in ("linear", "mlp"):
        raise _reject("--head", f"{head!r} is not a head type", "Use linear or mlp.")
    hub = _hub()
    assert hub.directory is not None
    if demo:
        if pairs is not None or model_id is not None:
            raise _reject("--demo", "--demo trains the demo models", "Drop PAIRS and --id.")
        all_pairs = demo_pairs()
        jobs = [({"id": i, **card}, all_pairs[i]) for i, card in DEMO_CARDS.items()]
    else:
        if pairs is None or not model_id or not description:
            raise _reject(
                "PAIRS",
                "training a model needs PAIRS, --id and --description",
                "Or pass --demo to retrain the demo models.",
            )
        existing = next((c for c in hub.cards() if c.id == model_id), None)
        if existing is not None and not replace and not hub.is_bundled(existing):
            raise _reject(
                "--id", f"{model_id!r} is already in the hub ({existing.path})", "Pass --replace."
            )
        card: dict[str, Any] = {"id": model_id, "description": description, "kind": kind}
        if opposite:
            card["opposite"] = opposite
        jobs = [(card, load_pairs(pairs))]
    for card_data, job_pairs in jobs:
        trained, report = train_model(
            card_data,
            job_pairs,
            hub.directory,
            hub.embeddings,
            head=head,  # type: ignore[arg-type]
        )
        held = "-" if report.heldout_accuracy is None else f"{report.heldout_accuracy:.2f}"
        out.print(
            f"trained '{trained.id}' on {report.pairs} pairs in {report.seconds:.1f} s "
            f"(train accuracy {report.train_accuracy:.2f}, held-out {held}) -> {hub.directory}",
            markup=False,
        )
