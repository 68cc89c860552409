"""The ``persona`` command line (Typer + Rich).

Exit status: 0 ok; 2 the input was rejected (an invalid document, argument or setting);
1 the operation failed (unknown user or version, a conflicting save, a database error).
Errors print one clear message, never a traceback (set PERSONA_DEBUG=1 to see one).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from persona_plugin.cli._common import (
    FormatOpt,
    UserArg,
    check_format,
    err,
    out,
    read_document,
    report_error,
    state,
)
from persona_plugin.cli.adapt import adapt_app
from persona_plugin.cli.eval import eval_app
from persona_plugin.cli.lora import lora_app
from persona_plugin.cli.prefs import prefs_app
from persona_plugin.errors import PersonaConfigError, PersonaError, PersonaNotFoundError
from persona_plugin.persona import Persona, json_schema

app = typer.Typer(
    name="persona",
    help="Manage persona documents: create, inspect, edit, version, export and delete.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(adapt_app, name="adapt")
app.add_typer(eval_app, name="eval")
app.add_typer(lora_app, name="lora")
app.add_typer(prefs_app, name="prefs")


@app.callback()
def _main(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="config file (TOML or YAML); default PERSONA_CONFIG"),
    ] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="store URL; default PERSONA_STORE_URL")
    ] = None,
) -> None:
    state.config_file = config
    state.store_url = store


@app.command()
def init(
    user_id: UserArg,
    name: Annotated[str | None, typer.Option(help="the user's name")] = None,
    from_file: Annotated[
        str | None, typer.Option("--from", help="start from this persona file (- for stdin)")
    ] = None,
) -> None:
    """Create USER's persona (version 1), empty or from a file."""
    settings = state.settings()
    persona = read_document(from_file, settings) if from_file else Persona.new(user_id)
    if name:
        persona.identity.name = name
    if persona.identity.user_id is None:
        persona.identity.user_id = user_id
    with state.store() as store:
        record = store.create(user_id, persona, reason="persona init")
    out.print(f"created persona of '{user_id}' at version {record.version}")


@app.command()
def show(
    user_id: UserArg,
    version: Annotated[int | None, typer.Option("--version", help="an older version")] = None,
    fmt: FormatOpt = "yaml",
) -> None:
    """Print USER's persona (the current version unless --version)."""
    fmt = check_format(fmt)
    with state.store(create=False) as store:
        persona = store.get(user_id, version)
    typer.echo(persona.dump(fmt).rstrip("\n"))


@app.command()
def validate(
    file: Annotated[str, typer.Argument(help="persona file, YAML or JSON (- for stdin)")],
) -> None:
    """Check a persona file; print what is wrong (exit 2) or 'valid'."""
    persona = read_document(file, state.settings())
    sections = [
        s for s in Persona.SECTIONS if getattr(persona, s).model_dump(exclude_defaults=True)
    ]
    # markup=False: a file name such as "alice[draft].yaml" is not Rich markup
    out.print(f"{file}: valid (sections: {', '.join(sections) or 'none'})", markup=False)


@app.command("set")
def set_(
    user_id: UserArg,
    file: Annotated[str, typer.Argument(help="persona file, YAML or JSON (- for stdin)")],
    reason: Annotated[str, typer.Option(help="why it changed (kept in history)")] = "",
    expect_version: Annotated[
        int | None,
        typer.Option(help="refuse unless the store is at this version (compare-and-set)"),
    ] = None,
) -> None:
    """Validate FILE and save it as USER's next version."""
    settings = state.settings()
    persona = read_document(file, settings)
    with state.store() as store:
        expected = store.current_version(user_id) if expect_version is None else expect_version
        record = store.save(
            user_id, persona, expected_version=expected, source="user edit", reason=reason
        )
    out.print(
        f"saved persona of '{user_id}' as version {record.version} ({len(record.change)} changes)"
    )


@app.command()
def schema() -> None:
    """Print the persona's JSON Schema."""
    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def history(
    user_id: UserArg,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="only the latest N versions")
    ] = None,
    show_all: Annotated[
        bool,
        typer.Option("--all", help="also versions that changed nothing (older stores have them)"),
    ] = False,
) -> None:
    """List USER's versions: when, by what, why, and what changed."""
    with state.store(create=False) as store:
        records = store.history(user_id)
    if not show_all:  # the first version is always shown: it is where the persona began
        records = [r for r in records if r.change or r.version == 1]
    if limit is not None:
        records = records[-limit:]
    table = Table(title=f"persona history of '{user_id}'")
    for column in ("version", "time (UTC)", "source", "reason", "changes", "tokens"):
        table.add_column(column, overflow="fold")
    for record in records:
        usage = record.details.get("token_usage")
        tokens = str(usage.get("total_tokens", "")) if isinstance(usage, dict) else ""
        table.add_row(
            str(record.version),
            record.created_at[:19].replace("T", " "),
            record.source,
            record.reason,
            "\n".join(c.describe() for c in record.change[:5])
            + (f"\n... {len(record.change) - 5} more" if len(record.change) > 5 else ""),
            tokens,
        )
    out.print(table)


_STYLES = {"add": "green", "remove": "red", "replace": "yellow"}


@app.command()
def diff(
    user_id: UserArg,
    old: Annotated[int, typer.Argument(help="older version")],
    new: Annotated[int, typer.Argument(help="newer version")],
) -> None:
    """Show field-level changes from version OLD to NEW (coloured)."""
    with state.store(create=False) as store:
        changes = store.diff(user_id, old, new)
    if not changes:
        out.print(f"versions {old} and {new} of '{user_id}' have the same content")
        return
    for change in changes:
        out.print(Text(change.describe(), style=_STYLES[change.op]))


@app.command()
def rollback(
    user_id: UserArg,
    version: Annotated[int, typer.Argument(help="the version to restore")],
    reason: Annotated[str, typer.Option(help="why (kept in history)")] = "",
) -> None:
    """Save a new version of USER equal to VERSION (history is kept); the facts that the
    rolled-back reflections stored in long-term memory are marked superseded."""
    from persona_plugin.reflection.apply import roll_back

    with state.store(create=False) as store:
        record = roll_back(user_id, version, store=store, memory=state.memory(), reason=reason)
    out.print(f"restored version {version} of '{user_id}' as version {record.version}")


@app.command()
def export(
    user_id: UserArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write to this file instead of stdout")
    ] = None,
) -> None:
    """Export everything kept about USER as JSON: every persona version with its history,
    long-term memory, and the messages of their conversations."""
    from persona_plugin.cards.owned import OwnedCards
    from persona_plugin.privacy import export_user

    with state.store(create=False) as store:
        data = export_user(
            user_id,
            store=store,
            memory=state.memory(),
            checkpointer=state.checkpointer(),
            owned=OwnedCards.from_settings(state.settings()),
        )
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")
        err.print(
            f"wrote {len(data['versions'])} versions of '{user_id}' to {output}", markup=False
        )


@app.command()
def delete(
    user_id: UserArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Delete everything kept about USER, for good: every persona version, long-term memory
    and the checkpoints of their conversations."""
    from persona_plugin.cards.owned import OwnedCards
    from persona_plugin.privacy import forget_user

    if not yes:
        if not sys.stdin.isatty():
            raise typer.BadParameter("refusing to delete without --yes when not interactive")
        typer.confirm(f"Delete everything kept about '{user_id}'?", abort=True)
    with state.store(create=False) as store:
        gone = forget_user(
            user_id,
            store=store,
            memory=state.memory(),
            checkpointer=state.checkpointer(),
            owned=OwnedCards.from_settings(state.settings()),
        )
    if not gone:
        raise PersonaNotFoundError(f"user '{user_id}' has no persona to delete.")
    out.print(
        f"deleted persona of '{user_id}' ({gone.versions} versions), "
        f"{gone.memory_items} long-term memories, {gone.threads} conversations and "
        f"{gone.owned} versions of their own models"
    )


@app.command()
def demo(
    home: Annotated[
        Path | None,
        typer.Option(help="keep the demo's data here (default: a temporary directory)"),
    ] = None,
) -> None:
    """Run the offline demo conversation on the embedded defaults."""
    from persona_plugin.lab.demo import run_demo

    run_demo(home=home, console=out)


@app.command()
def chat(
    user_id: UserArg,
    thread: Annotated[str, typer.Option(help="conversation id (kept by the checkpointer)")] = (
        "terminal"
    ),
    reflection: Annotated[
        str | None,
        typer.Option(help="inline, background, every_n_turns or off (default: the setting)"),
    ] = None,
    mbr: Annotated[
        int | None,
        typer.Option(
            help="MBR decoding: candidates per reply, scored by the persona's preference "
            "models; 0 = off (default: the mbr_n setting)",
            min=0,
            max=32,
        ),
    ] = None,
) -> None:
    """Chat as USER with the configured model; after each turn, the persona diff.

    Type /quit (or end the input) to leave. Feedback on the last reply goes to the
    interaction log: /good [comment], /bad [comment], /edit [the better reply] (asked for
    when not given), /again (asks again; the last reply counts as lost). Offline by
    default: PERSONA_CHAT_MODEL=echo,
    which cannot reflect, so reflection is off unless another model is configured
    (PERSONA_CHAT_MODEL=local: the local model with LoRA adapters chosen from the persona).
    After each reply: the adapters retrieved for it and, with MBR on, the preference
    models used and the chosen candidate's scores.
    """
    from persona_plugin.graph import MODES, build_persona_graph_from_settings, make_checkpointer

    settings = state.settings()
    if mbr is not None:
        settings = settings.model_copy(update={"mbr_n": mbr})
    mode = reflection or ("off" if settings.chat_model == "echo" else settings.reflection)
    if mode not in MODES:
        raise typer.BadParameter(
            f"{mode!r} is not one of {', '.join(MODES)}", param_hint="--reflection"
        )
    graph = build_persona_graph_from_settings(
        settings, checkpointer=make_checkpointer(settings.resolved_checkpointer_url)
    )
    store = graph.store
    config = {"configurable": {"user_id": user_id, "thread_id": thread, "reflection": mode}}
    out.print(
        f"chatting as '{user_id}' with {settings.chat_model} (reflection: {mode}); "
        "/good /bad /edit /again on a reply; /quit"
    )
    last: tuple[str, str] | None = None  # (turn id, what the user said)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if line.strip() in ("/quit", "/exit"):
                break
            if not line.strip():
                continue
            command, _, rest = line.strip().partition(" ")
            if command in _FEEDBACK_COMMANDS:
                again = _chat_feedback(graph, user_id, last, command, rest.strip())
                if again is None:
                    continue
                line = again
            before = store.current_version(user_id)
            result = graph.invoke({"messages": [("user", line)]}, config)
            reply = result["messages"][-1]
            turn_id = (reply.response_metadata.get("persona") or {}).get("turn_id")
            last = (turn_id, line) if turn_id else None
            out.print(Text(f"assistant> {reply.text}", style="magenta"))
            for line in describe_reply(reply.response_metadata):
                out.print(Text(f"  {line}", style="dim"))
            if mode == "background":
                graph.background.drain()
            after = store.current_version(user_id)
            if after > before:
                changes = [
                    c
                    for c in (store.diff(user_id, before, after) if before else [])
                    if not c.path.startswith("memory.short_term")
                ]
                out.print(f"persona v{before} -> v{after}" + (":" if changes else ""))
                for change in changes:
                    out.print(Text(f"  {change.describe()}", style=_STYLES[change.op]))
    finally:
        graph.close()


_FEEDBACK_COMMANDS = ("/good", "/bad", "/edit", "/again")


def _chat_feedback(
    graph: Any, user_id: str, last: tuple[str, str] | None, command: str, rest: str
) -> str | None:
    """Record ``command`` on the last reply; the message to send again for ``/again``."""
    if last is None or graph.interactions is None:
        out.print(Text("no reply to give feedback on yet", style="yellow"))
        return None
    turn_id, said = last
    if command in ("/good", "/bad"):
        rating = 1 if command == "/good" else -1
        graph.record_feedback(user_id, turn_id, "rating", rating=rating, comment=rest or None)
        out.print(Text(f"noted: {'good' if rating > 0 else 'bad'} ({turn_id})", style="dim"))
        return None
    if command == "/edit":
        text = rest
        if not text:
            try:
                text = input("better reply> ").strip()
            except EOFError:
                text = ""
        if not text:
            out.print(Text("nothing recorded: /edit needs the better reply", style="yellow"))
            return None
        graph.record_feedback(user_id, turn_id, "edit", text=text)
        out.print(Text(f"noted: your edit of {turn_id}", style="dim"))
        return None
    graph.record_feedback(user_id, turn_id, "regenerate")
    return said


def describe_reply(metadata: dict[str, Any]) -> list[str]:
    """What chose a reply: the LoRA adapters retrieved for it, and MBR's choice."""
    from persona_plugin.chat_models.mbr import describe_mbr

    lines = []
    if metadata.get("retrieved"):
        weights = ", ".join(f"{a} {w:.2f}" for a, w, *_ in metadata["retrieved"])
        lines.append(f"adapters: {weights} (served: {metadata.get('served_by', '?')})")
    if mbr_line := describe_mbr(metadata):
        lines.append(mbr_line)
    return lines


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on", min=1, max=65535)] = 8000,
) -> None:
    """Run the OpenAI-compatible persona server (tokens: PERSONA_SERVER_TOKENS)."""
    import uvicorn

    from persona_plugin.server.app import create_app_from_settings

    uvicorn.run(create_app_from_settings(state.settings()), host=host, port=port)


@app.command("mcp")
def mcp_(
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            envvar="PERSONA_MCP_USER",
            help="stdio: the one user this server acts for (the local user of the client "
            "that launches it)",
        ),
    ] = None,
    transport: Annotated[
        str, typer.Option(help="stdio (launched by a local client) or http (streamable HTTP)")
    ] = "stdio",
    host: Annotated[str, typer.Option(help="http: address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="http: port to listen on", min=1, max=65535)] = 8001,
) -> None:
    """Run the MCP server: USER's persona and memory as tools for MCP clients.

    Over stdio (what desktop chat apps and IDE assistants launch) it acts for --user
    only. Over streamable HTTP (http://HOST:PORT/mcp) it takes the bearer tokens of
    `persona serve` (PERSONA_SERVER_TOKENS), each acting on the users its grant holds.
    """
    from persona_plugin.server.mcp import serve_mcp

    if transport not in ("stdio", "http"):
        raise typer.BadParameter(f"{transport!r} is not stdio or http", param_hint="--transport")
    # stdout is the stdio transport's: nothing else may be printed there
    serve_mcp(state.settings(), transport=transport, user=user, host=host, port=port)  # type: ignore[arg-type]


@app.command()
def worker(
    until_idle: Annotated[
        bool,
        typer.Option("--until-idle", help="reflect on what is queued now, then exit"),
    ] = False,
) -> None:
    """Reflect on the turns and feedback queued in the interaction log (background mode).

    Runs until interrupted (Ctrl-C, SIGTERM), finishing the reflection in hand. Any number
    of workers may share one PostgreSQL database: none reflects a turn another has taken.
    The servers' own workers do the same work; extra workers add capacity.
    """
    import signal
    import threading

    from persona_plugin.chat_models.registry import resolve_chat_model
    from persona_plugin.interactions import InteractionLog
    from persona_plugin.reflection.apply import ReflectionJob
    from persona_plugin.reflection.reflector import reflector_for
    from persona_plugin.reflection.worker import ReflectionWorker

    settings = state.settings()
    if settings.chat_model == "echo":
        raise PersonaConfigError(
            "the echo model cannot reflect: set PERSONA_CHAT_MODEL (e.g. 'local' or "
            "'openai:gpt-4o-mini') for the worker."
        )
    model = resolve_chat_model(settings.chat_model, settings)
    with state.store(create=False) as store:
        log = InteractionLog.on(store, retention_days=settings.log_retention_days)
        job = ReflectionJob(
            store=store, reflector=reflector_for(model, limits=store.limits), memory=state.memory()
        )
        reflecting = ReflectionWorker(log, job, debounce_s=settings.reflection_debounce_s)
        if until_idle:
            reflecting.drain()
        else:
            stop = threading.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
            reflecting.start()
            err.print("reflection worker running; Ctrl-C to stop")
            stop.wait()
            reflecting.stop()
    done = [o for o in reflecting.outcomes if not o.error]
    out.print(
        f"reflected {sum(len(o.turn_ids) for o in done)} turns and "
        f"{sum(len(o.feedback_ids) for o in done)} feedback events in {len(done)} "
        f"reflections; {len(reflecting.outcomes) - len(done)} failed"
    )


@app.command("import")
def import_(
    user_id: UserArg,
    file: Annotated[Path, typer.Argument(help="the chat history: JSON, JSONL or a ChatGPT export")],
    batch: Annotated[int, typer.Option(help="turns per reflection call")] = 1,
    gate: Annotated[
        bool,
        typer.Option(
            "--gate/--no-gate",
            help="the local reflector skips turns its cost gate finds nothing to learn in",
        ),
    ] = True,
) -> None:
    """Bootstrap USER's persona and memory from a chat history (a chat export), turn by
    turn, through the guard, memory and reflection; no chat model answers. Re-running
    skips the turns already imported."""
    from persona_plugin.chat_models.registry import resolve_chat_model
    from persona_plugin.cli.progress import progress_bar
    from persona_plugin.history import import_history, read_history
    from persona_plugin.memory.long_term import LongTermMemory
    from persona_plugin.reflection.reflector import reflector_for

    settings = state.settings()
    if settings.chat_model == "echo":
        raise PersonaConfigError(
            "the echo model cannot reflect: set PERSONA_CHAT_MODEL (e.g. 'local' or "
            "'openai:gpt-4o-mini') for the import's reflection."
        )
    messages = read_history(file)  # a bad file is refused before anything is opened
    model = resolve_chat_model(settings.chat_model, settings)
    with state.store() as store:
        reflector = reflector_for(model, limits=store.limits, gate=gate)
        with progress_bar(err, "reading the history", "importing {}") as report:
            result = import_history(
                user_id,
                messages,
                store=store,
                reflector=reflector,
                memory=LongTermMemory.from_settings(settings),
                interactions=True if settings.log else None,
                batch=batch,
                progress=lambda done, total: report(f"turn {done}", done, total),
            )
    out.print(
        f"imported {result.imported} of {result.turns} turns into '{user_id}' "
        f"({result.skipped_done} done before, {result.withheld} withheld by the guard, "
        f"{result.failed} failed, {len(result.versions)} new versions)",
        markup=False,
    )
    if result.failed:
        raise PersonaError(f"{result.failed} turns were not reflected on; run the import again")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except PersonaError as exc:
        sys.exit(report_error(exc))
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except Exception as exc:
        # a usage error (bad option, bad value): click's exceptions know how to show
        # themselves; matched by shape because typer now vendors click privately
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        if os.environ.get("PERSONA_DEBUG"):
            raise
        err.print(Text(f"error: {type(exc).__name__}: {exc}", style="red"))
        sys.exit(1)
    sys.exit(0)
