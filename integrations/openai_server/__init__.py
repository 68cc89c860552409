"""The OpenAI-compatible persona server as a deployable app; see README.md."""
