"""``persona lora``: the LoRA hub's adapter cards (list, add, show)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from persona_plugin.cli._common import FormatOpt, check_format, err, out, state

lora_app = typer.Typer(
    help="The LoRA hub: adapter cards (what each adapter is, where, which servers load it).",
    no_args_is_help=True,
)


def _lora_hub() -> Any:
    from persona_plugin.lora.hub import LoraHub

    return LoraHub.from_settings(state.settings())


@lora_app.command("list")
def lora_list(
    kind: Annotated[str | None, typer.Option(help="only adapters of this kind")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the cards as JSON")] = False,
) -> None:
    """List the adapter cards in the hub (PERSONA_LORA_DIR, default $PERSONA_HOME/lora)."""
    from persona_plugin.lora.hub import ADAPTER_KINDS

    if kind is not None and kind not in ADAPTER_KINDS:
        raise typer.BadParameter(
            f"{kind!r} is not a kind; use one of {', '.join(ADAPTER_KINDS)}", param_hint="--kind"
        )
    hub = _lora_hub()
    cards = [c for c in hub.cards() if kind is None or c.kind == kind]
    if as_json:
        typer.echo(json.dumps([c.to_dict() for c in cards], indent=2, ensure_ascii=False))
        return
    if not cards:
        err.print(f"no adapter cards in {hub.directory}", markup=False)
        return
    table = Table(title=f"LoRA hub {hub.directory}")
    for column in ("id", "kind", "base model", "rank", "servers", "description"):
        table.add_column(column, overflow="fold")
    for card in cards:
        servers = ", ".join(
            name if served == card.id else f"{name} (as {served})"
            for name, served in card.servers.items()
        )
        merged = f" [merge of {', '.join(c.id for c in card.merge_of)}]" if card.merge_of else ""
        table.add_row(
            Text(card.id),
            card.kind,
            Text(card.base_model),
            str(card.rank),
            Text(servers),
            Text(card.description + merged),
        )
    out.print(table)


@lora_app.command("add")
def lora_add(
    file: Annotated[Path, typer.Argument(help="adapter card, YAML or JSON")],
    replace: Annotated[bool, typer.Option(help="overwrite a card with the same id")] = False,
) -> None:
    """Validate an adapter card and copy it into the hub as <id>.yaml."""
    hub = _lora_hub()
    card = hub.add(file, replace=replace)
    out.print(f"added adapter '{card.id}' ({card.kind}) to {hub.directory}", markup=False)


@lora_app.command("show")
def lora_show(
    adapter_id: Annotated[str, typer.Argument(help="the adapter's id", show_default=False)],
    fmt: FormatOpt = "yaml",
) -> None:
    """Print one adapter card."""
    fmt = check_format(fmt)
    card = _lora_hub().get(adapter_id)
    if fmt == "json":
        typer.echo(json.dumps(card.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(card.to_yaml().rstrip("\n"))
