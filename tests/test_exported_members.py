"""The public face: ``persona_plugin.__all__`` is exactly its public names, each importable
(as httpx's tests/test_exported_members.py checks its own)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import persona_plugin

SUBPACKAGES = [
    "backends",
    "cards",
    "chat_models",
    "embeddings",
    "lora",
    "memory",
    "preferences",
    "reflection",
    "server",
]


def test_all_lists_every_public_name_of_the_root() -> None:
    public = {
        name
        for name, value in vars(persona_plugin).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("persona_plugin")
    }
    # submodules bound as attributes by importing them are packages, not exports
    public = {n for n in public if not hasattr(getattr(persona_plugin, n), "__path__")}
    lazy = set(persona_plugin._LAZY)  # imported on first use
    assert set(persona_plugin.__all__) - {"__version__"} == public | lazy


def test_importing_the_root_does_not_load_the_heavy_parts() -> None:
    code = (
        "import sys, persona_plugin; "
        "print(sorted(m for m in ('fastapi', 'langgraph', 'chromadb') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["", *SUBPACKAGES])
def test_every_exported_name_imports(name: str) -> None:
    module = importlib.import_module(f"persona_plugin.{name}" if name else "persona_plugin")
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    for member in exported:
        assert getattr(module, member) is not None, f"{module.__name__}.{member}"


def test_the_headline_features_are_on_the_public_face() -> None:
    for name in [
        "build_persona_graph",
        "LongTermMemory",
        "Reflector",
        "MultiLoraChatModel",
        "MBRChatModel",
        "create_app",
        "with_persona",
        "PersonaStore",
    ]:
        assert name in persona_plugin.__all__
