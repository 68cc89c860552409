"""The scripts in examples/ run as documented."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import ModuleType

from tests.paths import REPO

EXAMPLES = REPO / "examples"


def test_drop_in_chat_model_example_shows_the_injected_persona():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "drop_in_chat_model.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    # the app's system text first, then the persona block with Alice's data
    assert lines[0] == "You are a travel assistant."
    assert "<user_profile>" in lines and "</user_profile>" in lines
    assert '- Name: "Alice"' in lines and '- Style: "concise"' in lines


def run_example(
    name: str, *args: str, drop: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run examples/<name> as documented, with ``args``; ``drop`` leaves those variables out
    of its env."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_openai_without_a_key_prints_the_notice(monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    example = load_example("quickstart_openai")
    example.main()
    assert capsys.readouterr().out.strip() == example.NOTICE


def test_persona_graph_example_prints_what_two_turns_taught():
    lines = run_example("persona_graph.py").stdout.splitlines()
    assert lines[:4] == [
        "user: Hi, I'm Ana and I live in Lisbon.",
        "assistant: Welcome, Ana!",
        "user: I love fado. Where can I hear it?",
        "assistant: Try Lisbon's Alfama.",
    ]
    assert lines[4:] == [
        "persona diff, version 1 -> 3:",
        '  + demographics.location: "Lisbon"',
        '  + personality.interests[0]: "fado"',
        "long-term memories: lives in Lisbon, loves fado music",
    ]


def test_openai_server_client_example_talks_through_the_openai_client():
    lines = run_example("openai_server_client.py").stdout.splitlines()
    reply = 'You said: "Plan my weekend.". (echo model; 2 facts about you in my prompt)'
    assert lines == [
        f"reply: {reply}",
        f"streamed: {reply}",
        'patched to version 2 ETag "2"',
        "again with the old ETag: 409 version_conflict",
        "server stopped",
    ]


SLACK_VARS = ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN")


def test_slack_example_without_tokens_says_what_to_set():
    out = run_example("slack_bot.py", drop=SLACK_VARS).stdout
    assert out.startswith("Set SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET to run the Slack bot")


def test_discord_example_without_a_token_says_what_to_set():
    out = run_example("discord_bot.py", drop=("DISCORD_BOT_TOKEN",)).stdout
    assert out == "Set DISCORD_BOT_TOKEN to run the Discord bot (see the docstring).\n"


def test_bot_examples_build_from_settings_and_tokens():
    """What the examples run with real tokens, built offline (no connection is made)."""
    from slack_bolt import App

    from integrations.discord.bot import PersonaBot
    from persona_plugin.config import Settings

    settings = Settings.load()  # PERSONA_HOME is a temporary directory here (conftest)
    app = load_example("slack_bot").build_app(
        settings, "xoxb-not-a-token", "not-a-secret", token_verification_enabled=False
    )
    assert isinstance(app, App)
    bot = load_example("discord_bot").build_bot(settings, guild_id=123)
    assert isinstance(bot, PersonaBot) and bot.guild_id == 123
    bot.graph.close()


def test_local_multi_lora_graph_example_shows_each_personas_adapters():
    # a few tokens: the answers only need to be there and differ
    lines = run_example("local_multi_lora_graph.py", "--max-new-tokens", "8").stdout.splitlines()
    assert len(lines) == 4, lines
    mixtures = {}
    for line in lines[0::2]:
        user, _, rest = line.partition(": adapters ")
        assert rest.endswith("(served merged)"), line
        pairs = [p.rsplit(" ", 1) for p in rest.removesuffix(" (served merged)").split(", ")]
        assert len(pairs) == 2 and abs(sum(float(w) for _, w in pairs) - 1) < 0.02, line
        mixtures[user] = [a for a, _ in pairs]
    # the top adapter follows the persona: Bo wants brief answers, Cleo fun ones
    assert mixtures["bo"][0] == "concise" and mixtures["cleo"][0] == "playful"
    answers = [line.split(": ", 1) for line in lines[1::2]]
    assert [user for user, _ in answers] == ["bo", "cleo"]
    assert all(text.strip() for _, text in answers) and answers[0][1] != answers[1][1]


def test_memory_ecosystem_example_shows_each_view_of_one_memory(capsys):
    # in-process: the example's imports resolve to this checkout, as the suite's do
    load_example("memory_ecosystem").main()
    assert capsys.readouterr().out.splitlines() == [
        "search: Ana is vegetarian (fact)",
        "history: [('ADD', 'Ana is vegetarian'), ('UPDATE', 'Ana is vegan')]",
        "retriever: user: I just moved to Porto.",
        "remember: ['created', 'memory']",
        "search_memory: Ana's cat is called Miso",
        "store: trip Ana plans a trip to Kyoto in May",
        "namespaces: [('memories', 'ana'), ('memories', 'bob')]",
    ]


def test_mcp_client_example_uses_the_persona_through_persona_mcp():
    # PYTHONPATH: the server the example launches runs this tree's code
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lines = subprocess.run(
        [sys.executable, str(EXAMPLES / "mcp_client.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    ).stdout.splitlines()
    assert lines[0].startswith("tools: add_memory, get_persona_block, get_persona_sections")
    assert lines[1:4] == [
        'persona block v1: - Location: "Lisbon"',
        "turn logged and rated +1",
        'edit saved as version 2: ~ demographics.location: "Lisbon" -> "Porto"',
    ]
    assert lines[4].startswith("refused: operations[0] (append preference.style): guard: ")
    assert lines[5:] == ["memory: Ana plays the cello"]


def test_agent_middleware_example_answers_with_a_tool_and_learns():
    lines = run_example("agent_middleware.py").stdout.splitlines()
    assert lines == [
        "reply: Sunny in Porto: a good day to cycle in.",
        "tool steps: 1",
        "served by persona version 1",
        "learned: ['cycling'] as version 2",
    ]


def test_agent_with_persona_model_example_has_the_persona_at_every_step():
    lines = run_example("agent_with_persona_model.py").stdout.splitlines()
    assert lines == [
        "reply: Rain in Porto: take the bus.",
        "step 1: persona in prompt: True",
        "step 2: persona in prompt: True",
    ]
