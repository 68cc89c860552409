"""Building a model into the cache folder, once, safely between processes.

:func:`cache_build` is the preamble every model the project builds into its cache shares
(the fast embedder, the local model's conversion): create and check the folder, take an
exclusive lock, look again (another process may have built it meanwhile), remove dead
builds' leftovers. :func:`write_atomically` and :func:`fsync` make what a build writes
durable before it is trusted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from persona_plugin.errors import PersonaConfigError

logger = logging.getLogger(__name__)


def default_model_cache_dir() -> Path:
    """Where the fast model is cached unless told otherwise: ``$PERSONA_CACHE_DIR/models``,
    else ``$PERSONA_HOME/cache/models``."""
    from persona_plugin.config import DEFAULT_HOME

    if os.environ.get("PERSONA_CACHE_DIR"):
        return Path(os.environ["PERSONA_CACHE_DIR"]).expanduser() / "models"
    return Path(os.environ.get("PERSONA_HOME") or DEFAULT_HOME).expanduser() / "cache" / "models"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes (and threads: one open file each)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: builds may race; os.replace is atomic
        yield
        return
    with path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(path: Path, text: str, *, exclusive: bool = False) -> bool:
    """Write ``path`` whole (a reader never sees half of it), as UTF-8; whether it was
    written. ``exclusive``: only if it does not exist yet (two writers of one new file: one
    wins, the other is told), else it is replaced."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _remove_leftovers(cache: Path, name: str) -> None:
    """Temp files and work folders of builds of ``name`` that died (the caller holds the lock)."""
    for leftover in cache.iterdir():
        if leftover.name.startswith(f".{name}.") and leftover.suffix in (".tmp", ".build"):
            logger.info("removing %s, left over by an interrupted build", leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def cache_build(
    target: Path, is_complete: Callable[[Path], bool], *, what: str, hint: str
) -> Iterator[bool]:
    """Whether ``target``, a model in its cache folder, must be built now.

    Yields False when it is complete (at once, or once another process's build it waited
    for is done); True while holding the build lock, with dead builds' leftovers removed:
    build it then. Shared by every model the project builds into its cache. ``what`` and
    ``hint`` word the error of a cache folder that cannot be created or written.
    """
    if is_complete(target):
        yield False
        return
    cache = target.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PersonaConfigError(f"cannot create {what} {cache} ({exc.strerror}): {hint}") from None
    if not os.access(cache, os.W_OK):
        raise PersonaConfigError(f"{what} {cache} is not writable: {hint}")
    with _exclusive_lock(cache / f"{target.name}.lock"):
        if is_complete(target):  # another process built it while this one waited
            yield False
            return
        _remove_leftovers(cache, target.name)
        yield True
