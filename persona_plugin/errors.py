"""Exceptions raised by persona-plugin.

Every message says what went wrong, where (the source and the field path), and what
to do about it, so that the CLI can print it as is and a caller can log it as is.
"""

from __future__ import annotations


class PersonaError(Exception):
    """Base class of every error this package raises on purpose."""

    #: exit status the CLI uses for this error (2: the input was rejected, 1: it failed)
    exit_code: int = 1


class PersonaValidationError(PersonaError, ValueError):
    """A persona document (or a value for one) was rejected.

    ``source`` names where the input came from (a file path, ``"<stdin>"``, ``"store"``,
    ...), ``path`` the field (``"demographics.age"``; empty for the whole document) and
    ``hint`` what to do. ``problems`` holds every ``(path, message)`` found, the first of
    which is also in ``path``.
    """

    exit_code = 2

    def __init__(
        self,
        source: str,
        path: str,
        problem: str,
        hint: str,
        problems: list[tuple[str, str]] | None = None,
    ) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        self.hint = hint
        self.problems = problems or [(path, problem)]
        where = f"{source}: " + (f"field '{path}'" if path else "document")
        lines = [f"{where}: {problem}. {hint}"]
        for other_path, other_problem in self.problems[1:]:
            lines.append(f"  also field '{other_path or '<document>'}': {other_problem}")
        super().__init__("\n".join(lines))


class PersonaNotFoundError(PersonaError, LookupError):
    """The user (or the requested version of their persona) does not exist."""


class PersonaConflictError(PersonaError):
    """A compare-and-set save lost: the persona changed since it was read."""

    def __init__(self, user_id: str, expected: int, actual: int) -> None:
        self.user_id = user_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"persona of user '{user_id}' is at version {actual}, not the expected "
            f"version {expected}: someone saved in between. Re-read it and apply your "
            f"change again, or use PersonaStore.update(user_id, fn), which retries."
        )


class PersonaConfigError(PersonaError, ValueError):
    """Settings or a call's configuration are missing or wrong (a ValueError too: hosts
    such as LangGraph Platform show a ValueError's message to the client)."""

    exit_code = 2
