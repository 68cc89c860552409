"""Slack bot template: every Slack user gets a persona; see README.md."""
