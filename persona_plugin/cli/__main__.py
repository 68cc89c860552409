"""``python -m persona_plugin.cli``: the ``persona`` command, for a process a client launches
by interpreter path (an MCP client's stdio server, a test's subprocess)."""

from persona_plugin.cli.app import main

main()
