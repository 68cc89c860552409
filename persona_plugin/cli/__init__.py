"""The ``persona`` command (Typer + Rich), one module per command group.

:mod:`~persona_plugin.cli.app` holds the persona commands and ``main`` (the console
script); :mod:`~persona_plugin.cli.lora`, :mod:`~persona_plugin.cli.prefs` and
:mod:`~persona_plugin.cli.eval` the ``lora``, ``prefs`` and ``eval`` groups;
:mod:`~persona_plugin.cli._common` what they share (consoles, state, the one error
reporter); :mod:`~persona_plugin.cli.progress` the Rich progress bar of long runs.
"""

from persona_plugin.cli.app import main

__all__ = ["main"]
