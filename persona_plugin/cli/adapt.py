"""``persona adapt``: slow adaptation on the command line.

``persona adapt USER`` (or ``--all``: every user with feedback) trains the user's own
preference model from their interaction log and promotes it if the gate says it beats
what serves them now (``--dry-run``: what would train and why, counts against
thresholds); ``persona adapt history USER`` lists the versions with their figures;
``persona adapt rollback USER KIND N`` serves version N again (0: none). Exit status as
for every ``persona`` command.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from persona_plugin.cli._common import out, reports_errors, state
from persona_plugin.errors import PersonaValidationError


class _AdaptGroup(TyperGroup):
    """``persona adapt USER`` runs ``persona adapt run USER``: the group's commands are
    ``run``, ``history`` and ``rollback``, and anything else first is a user (or --all)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


adapt_app = typer.Typer(
    cls=_AdaptGroup,
    help="Slow adaptation: train each user's own preference model from their feedback.",
    no_args_is_help=True,
)


def _parts() -> tuple[Any, Any, Any]:
    from persona_plugin.interactions import InteractionLog
    from persona_plugin.preferences.hub import PreferenceHub

    settings = state.settings()
    store = state.store(create=False)
    return store, InteractionLog.on(store), PreferenceHub.from_settings(settings)


@adapt_app.command("run")
@reports_errors
def adapt_run(
    user_id: Annotated[str | None, typer.Argument(help="the user (or --all)")] = None,
    all_users: Annotated[
        bool, typer.Option("--all", help="every user with feedback in the log")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would train and why; change nothing")
    ] = False,
    min_pairs: Annotated[
        int | None,
        typer.Option(help="pairs a user needs for a model (default PERSONA_ADAPT_MIN_PAIRS)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", help="run as a worker: adapt users with new feedback every --interval"
        ),
    ] = False,
    interval: Annotated[
        float | None,
        typer.Option(
            help="seconds between rounds of --watch (default PERSONA_ADAPT_INTERVAL_S or 300)"
        ),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="preference, adapter or all (default: all when PERSONA_CHAT_MODEL is "
            "local, whose backend serves users' own adapters; else preference)"
        ),
    ] = None,
) -> None:
    """Train, gate and version USER's own preference model and adapter (or every user's
    with --all)."""
    settings = state.settings()
    min_pairs = settings.adapt_min_pairs if min_pairs is None else min_pairs
    kind = kind or ("all" if settings.chat_model == "local" else "preference")
    if kind not in ("preference", "adapter", "all"):
        raise PersonaValidationError(
            "command line", "--kind", f"{kind!r}", "Use preference, adapter or all."
        )
    kinds = ("preference", "adapter") if kind == "all" else (kind,)
    if min_pairs < 6:
        raise PersonaValidationError(
            "command line",
            "--min-pairs",
            f"{min_pairs}",
            "A model needs at least 6 pairs: 4 to train on, 2 held out to judge it by.",
        )
    if watch:
        if user_id is not None or all_users or dry_run:
            raise PersonaValidationError(
                "command line",
                "--watch",
                "--watch adapts every user with new feedback",
                "Drop USER, --all and --dry-run.",
            )
        every = interval if interval is not None else settings.adapt_interval_s or 300.0
        _watch(every, min_pairs, kinds)
        return
    if (user_id is None) == (not all_users):
        raise PersonaValidationError(
            "command line", "USER", "name one user or pass --all", "e.g. `persona adapt ana`."
        )
    store, log, hub = _parts()
    with store:
        backend = _backend() if "adapter" in kinds else None
        users = log.users_with_feedback() if all_users else [user_id]
        for user in users:
            for result in _adapt(user, kinds, log, hub, store, backend, min_pairs, dry_run):
                if as_json:
                    out.print(json.dumps(result.to_dict()), markup=False, soft_wrap=True)
                else:
                    version = f" v{result.version}" if result.version else ""
                    out.print(
                        f"{user}: {result.kind} {result.status}{version}: {result.reason}",
                        markup=False,
                        soft_wrap=True,
                    )
        if all_users and not users:
            out.print("no user has feedback in the log yet", markup=False)


def _backend() -> Any:
    from persona_plugin.chat_models.registry import shared_local_backend

    return shared_local_backend(state.settings())


def _adapt(
    user: str,
    kinds: tuple[str, ...],
    log: Any,
    hub: Any,
    store: Any,
    backend: Any,
    min_pairs: int,
    dry_run: bool,
) -> list[Any]:
    from persona_plugin.adaptation import adapt_preference_model
    from persona_plugin.adaptation.adapter import adapt_adapter

    results = []
    if "preference" in kinds:
        results.append(
            adapt_preference_model(
                user, log=log, hub=hub, store=store, min_pairs=min_pairs, dry_run=dry_run
            )
        )
    if "adapter" in kinds:
        results.append(
            adapt_adapter(
                user,
                log=log,
                backend=backend,
                store=store,
                min_examples=state.settings().adapt_min_examples,
                dry_run=dry_run,
                embeddings=hub.embeddings,
            )
        )
    return results


def _watch(interval: float, min_pairs: int, kinds: tuple[str, ...]) -> None:
    """The adaptation worker: rounds every ``interval`` s until SIGTERM or Ctrl-C."""
    import signal

    from persona_plugin.adaptation.schedule import AdaptationScheduler

    if interval <= 0:
        raise PersonaValidationError(
            "command line", "--interval", f"{interval}", "Give a positive number of seconds."
        )
    store, log, hub = _parts()
    with store:
        scheduler = AdaptationScheduler(
            store=store,
            log=log,
            hub=hub,
            interval_s=interval,
            min_pairs=min_pairs,
            on_result=lambda r: out.print(
                f"{r.user_id}: {r.kind} {r.status}: {r.reason}", markup=False, soft_wrap=True
            ),
            backend=_backend() if "adapter" in kinds else None,
            min_examples=state.settings().adapt_min_examples,
        )
        scheduler.kinds = kinds
        signal.signal(signal.SIGTERM, lambda *_: scheduler.stop(timeout=0))
        out.print(
            f"adapting users with new feedback every {interval:g} s as {scheduler.holder}",
            markup=False,
        )
        try:
            scheduler.run_forever()
        except KeyboardInterrupt:
            scheduler.stop(timeout=0)


@adapt_app.command("history")
@reports_errors
def adapt_history(
    user_id: Annotated[str, typer.Argument(help="the user")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The versions of USER's own models: the gate's verdict and figures, which serves."""
    from persona_plugin.cards.owned import OWNED_KINDS, OwnedCards

    owned = OwnedCards.from_settings(state.settings())
    if as_json:
        out.print(json.dumps(owned.export_user(user_id), indent=2), markup=False)
        return
    table = Table(
        "kind", "version", "status", "held-out", "serving was", "train+held", "trained on"
    )
    rows = 0
    for kind in OWNED_KINDS:
        serving = owned.serving(user_id, kind)
        for card in owned.versions(user_id, kind):
            t = card.get("training") or {}
            span = t.get("trained_on") or ["", ""]
            mark = " (serving)" if card["version"] == serving else ""
            table.add_row(
                kind,
                f"{card['version']}{mark}",
                str(t.get("status", "")),
                # accuracy on pairs (a preference model; higher is better) or the loss of
                # endorsed replies (an adapter; lower is better)
                str(t.get("heldout_accuracy", t.get("heldout_loss", ""))),
                str(t.get("serving_accuracy", t.get("serving_loss", ""))),
                f"{t.get('train_pairs', t.get('train_examples', ''))}+"
                f"{t.get('heldout_pairs', t.get('heldout_examples', ''))}",
                f"{span[0][:19]} .. {span[1][:19]}",
            )
            rows += 1
    if rows:
        out.print(table)
    else:
        out.print(f"user '{user_id}' has no models of their own yet", markup=False)


@adapt_app.command("rollback")
@reports_errors
def adapt_rollback(
    user_id: Annotated[str, typer.Argument(help="the user")],
    kind: Annotated[str, typer.Argument(help="preference or adapter")],
    version: Annotated[int, typer.Argument(help="the version to serve; 0: none of their own")],
) -> None:
    """Serve version N of USER's own KIND model again (0: serve none of their own)."""
    from persona_plugin.cards.owned import OwnedCards

    OwnedCards.from_settings(state.settings()).rollback(user_id, kind, version)
    served = f"version {version}" if version else "no model of their own"
    out.print(f"user '{user_id}' is now served {served} ({kind})", markup=False)
