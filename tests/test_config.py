"""Settings from PERSONA_* variables, a config file, and arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from persona_plugin import PersonaConfigError, Settings
from persona_plugin.config import DEFAULT_SECTION_PRIORITIES


def test_defaults_live_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv("PERSONA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings.load()
    assert settings.home == tmp_path / ".persona-plugin"
    assert (
        settings.resolved_store_url == f"sqlite:///{tmp_path / '.persona-plugin' / 'personas.db'}"
    )
    assert settings.limits.max_value_chars == 2000
    assert settings.limits.max_document_bytes == 65536
    assert settings.section_priorities == DEFAULT_SECTION_PRIORITIES


def test_one_variable_moves_all_data(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "data"))
    assert Settings.load().resolved_store_url == f"sqlite:///{tmp_path / 'data' / 'personas.db'}"


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("PERSONA_STORE_URL", "postgresql+psycopg://h/db")
    monkeypatch.setenv("PERSONA_MAX_VALUE_CHARS", "300")
    monkeypatch.setenv("PERSONA_TOKEN_BUDGET", "200")
    monkeypatch.setenv("PERSONA_COLD_START", "true")
    monkeypatch.setenv("PERSONA_SECTION_PRIORITIES", '{"memory": 99}')
    settings = Settings.load()
    assert settings.resolved_store_url == "postgresql+psycopg://h/db"
    assert settings.limits.max_value_chars == 300
    assert settings.token_budget == 200
    assert settings.cold_start is True
    assert settings.section_priorities["memory"] == 99
    assert settings.section_priorities["identity"] == DEFAULT_SECTION_PRIORITIES["identity"]
    assert settings.mbr_n == 0  # MBR decoding is off unless asked for
    monkeypatch.setenv("PERSONA_MBR_N", "8")
    monkeypatch.setenv("PERSONA_PREFS_DIR", "~/prefs-here")
    settings = Settings.load()
    assert settings.mbr_n == 8
    assert settings.prefs_dir == Path("~/prefs-here").expanduser()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("config.toml", '[persona]\ntoken_budget = 300\nstore_url = "sqlite:///x.db"\n'),
        ("config.yaml", "token_budget: 300\nstore_url: sqlite:///x.db\n"),
    ],
)
def test_config_file_in_home_and_env_precedence(monkeypatch, name, text):
    home = Path(Settings.load().home)
    (home / name).write_text(text)
    settings = Settings.load()
    assert settings.token_budget == 300 and settings.store_url == "sqlite:///x.db"
    monkeypatch.setenv("PERSONA_TOKEN_BUDGET", "400")
    assert Settings.load().token_budget == 400
    assert Settings.load(token_budget=500).token_budget == 500


def test_explicit_config_file(monkeypatch, tmp_path):
    file = tmp_path / "custom.toml"
    file.write_text("max_document_bytes = 4096\n")
    assert Settings.load(file).max_document_bytes == 4096
    monkeypatch.setenv("PERSONA_CONFIG", str(file))
    assert Settings.load().max_document_bytes == 4096


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("PERSONA_MAX_VALUE_CHARS", "lots", "max_value_chars"),
        ("PERSONA_TOKEN_BUDGET", "3", "token_budget"),
        ("PERSONA_SECTION_PRIORITIES", '{"memroy": 1}', "memroy"),
        ("PERSONA_MBR_N", "100", "mbr_n"),
    ],
)
def test_bad_settings_are_clear_errors(monkeypatch, env, value, needle):
    monkeypatch.setenv(env, value)
    with pytest.raises(PersonaConfigError, match=needle) as info:
        Settings.load()
    assert env in str(info.value)


def test_bad_config_files(tmp_path, monkeypatch):
    with pytest.raises(PersonaConfigError, match="does not exist"):
        Settings.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("token_budget = \n")
    with pytest.raises(PersonaConfigError, match="cannot be read"):
        Settings.load(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("tokn_budget: 3\n")
    with pytest.raises(PersonaConfigError, match="tokn_budget"):
        Settings.load(unknown)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n")
    with pytest.raises(PersonaConfigError, match="mapping"):
        Settings.load(listing)


def test_unrelated_persona_variables_are_ignored(monkeypatch):
    monkeypatch.setenv("PERSONA_CONFIG", "")
    monkeypatch.setenv("PERSONA_TEST_SOMETHING", "x")
    assert Settings.load().token_budget == 1024
