"""Discord bot template: every Discord user gets a persona; see README.md."""
