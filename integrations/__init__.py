"""App-facing adapters of persona-plugin (servers and bot templates); see README.md."""
