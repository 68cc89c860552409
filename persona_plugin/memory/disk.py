"""What embedded Chroma leaves on disk that it should not, and how it is cleaned.

Two leaks, both Chroma's, both found by the privacy tests reading every byte under the
data directory:

- Deleting rows or a collection leaves their text in SQLite's free pages and in the
  full-text index's old segments, and leaves the collection's vector-index folder behind
  (chroma-core/chroma #5520). :func:`purge_deleted` merges, vacuums and removes them.
- A new vector index writes its whole ``length.bin`` and ``data_level0.bin`` from
  ``malloc`` without zeroing them (hnswlib's ``initPersistentIndex``), so whatever the
  process freed last lands in the new user's files: another user's message text, once
  in a CI run. Later writes only ever touch the slots of elements the header counts, so
  zeroing what lies past them once, after the index is made, keeps it clean for good.
  :func:`scrub_index_tails` does that.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# hnswlib's header.bin starts: int version, size_t offsetLevel0, size_t max_elements,
# size_t cur_element_count, size_t size_data_per_element (native byte order)
_HEADER = struct.Struct("=iQQQQ")
_LENGTH_SLOT = 4  # one float per element in length.bin
_CHUNK = 1 << 20

#: held while Chroma writes an embedded store's vector index and while its files are
#: scrubbed, so a scrub never zeroes a slot Chroma has just written (one per process:
#: Chroma shares one system per path, whichever LongTermMemory opened it)
INDEX_FILES_LOCK = threading.Lock()


def vector_folder(path: Path, collection_id: str) -> Path | None:
    """The folder of the collection's vector index in the embedded store at ``path``."""
    conn = sqlite3.connect(str(path / "chroma.sqlite3"), timeout=60)
    try:
        row = conn.execute(
            "SELECT id FROM segments WHERE collection = ? AND scope = 'VECTOR'",
            (str(collection_id),),
        ).fetchone()
    finally:
        conn.close()
    return None if row is None else path / row[0]


def _zero_from(file: Path, start: int) -> bool:
    """Zero ``file`` from byte ``start`` to its end where anything is not zero already."""
    with open(file, "r+b") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        wrote = False
        for offset in range(start, size, _CHUNK):
            chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
            if chunk.count(0) != len(chunk):
                os.pwrite(fd, bytes(len(chunk)), offset)
                wrote = True
        if wrote:
            os.fsync(fd)
        return wrote


def scrub_index_tails(folder: Path) -> bool:
    """Zero the slots past the elements a vector index holds; whether its files were
    there to scrub. Call with :data:`INDEX_FILES_LOCK` held."""
    try:
        header = (folder / "header.bin").read_bytes()[: _HEADER.size]
        _, _, _, count, per_element = _HEADER.unpack(header)
        _zero_from(folder / "length.bin", count * _LENGTH_SLOT)
        _zero_from(folder / "data_level0.bin", count * per_element)
    except (OSError, struct.error) as exc:
        log.debug("vector index in %s not scrubbed (not written yet?): %s", folder, exc)
        return False
    return True


def purge_deleted(path: Path, *, scrubbed: set[str] | None = None) -> None:
    """Make what Chroma deleted from the embedded store at ``path`` unreadable on disk.

    Chroma deletes rows without zeroing their pages, so the text stays in the file's free
    pages, and its full-text index keeps the deleted documents' trigrams until its segments
    are merged: merge them, then vacuum. Dropping a collection leaves its vector-index
    folder behind: remove the folders no segment names. The folders that stay are
    scrubbed (:func:`scrub_index_tails`) unless named in ``scrubbed``, which gains them:
    one made before this process started may hold the deleted user's text.
    """
    database = path / "chroma.sqlite3"
    if not database.is_file():
        return
    # folders first, segments after: a collection created meanwhile has its segment row
    # before its folder, so a folder listed here and not in the table is truly orphaned
    folders = [e for e in path.iterdir() if e.is_dir() and _UUID.fullmatch(e.name)]
    conn = sqlite3.connect(str(database), timeout=60)
    try:
        # the full-text index keeps deleted documents' trigrams in its old segments until
        # they are merged: merge them, then vacuum the freed pages
        conn.execute(
            "INSERT INTO embedding_fulltext_search(embedding_fulltext_search) VALUES('optimize')"
        )
        conn.commit()
        conn.execute("VACUUM")
        segments = {row[0] for row in conn.execute("SELECT id FROM segments")}
    except sqlite3.Error as exc:
        log.warning("could not vacuum %s after a delete: %s", database, exc)
        return
    finally:
        conn.close()
    for entry in folders:
        if entry.name not in segments:
            shutil.rmtree(entry, ignore_errors=True)
    scrub_all(
        (e for e in folders if e.name in segments and e.name not in (scrubbed or ())), scrubbed
    )


def scrub_all(folders: Iterable[Path], scrubbed: set[str] | None = None) -> None:
    """Scrub each folder (:func:`scrub_index_tails`), adding those done to ``scrubbed``."""
    with INDEX_FILES_LOCK:
        for folder in folders:
            if scrub_index_tails(folder) and scrubbed is not None:
                scrubbed.add(folder.name)
