"""The device store's SQLite file: its layout, its settings, its transactions.

WAL mode with ``synchronous=FULL`` for every commit: in WAL mode ``NORMAL``
can lose the last committed transactions on power loss, and a device that
forgot it sealed batch N could sign a different batch N after uploading the
first one.

Readings are stored one row per commit, in the payload's column layout, with
1 KiB pages: each commit appends about a page to the WAL.  With the
recorder's 10-second buffer that is ~3.6 MB of kernel-counted writes per
bus-hour (``bench/store_writes.py``); at 5 seconds it would be ~5.7 MB, because every
fsync'd commit costs at least one 4 KiB page however little it holds.

The file is opened with ``locking_mode=EXCLUSIVE``: one process holds it
for as long as it runs, so two agents can never sign into one chain, and
SQLite keeps its WAL index in memory instead of a ``-shm`` file that the
kernel would write back after every commit.  The price: ``cngmrv export`` of
a running agent's store is refused as "in use"; stop the agent, or export
from the ingest.  Threads of one process share the connection through a lock.

What the rows mean (the chain, sealing, uploads, the quota's pruning) is
:class:`cngmrv.agent.store.Store`'s; this module knows only the file.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("cngmrv.store")

SCHEMA_VERSION = 2
CACHE_KIB = 256  # the store's page cache
PAGE_SIZE = 1024  # small pages: a commit of a few readings appends ~1 KiB of WAL, not 4

# Small columns first: SQLite reads a row's columns in order, so a scan for
# pending batches never walks the batch bytes.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS readings (
    first_seq INTEGER PRIMARY KEY, n INTEGER NOT NULL, body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, t REAL NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    uploaded INTEGER NOT NULL DEFAULT 0,
    first_reading INTEGER NOT NULL,
    n_readings INTEGER NOT NULL,
    sha256 BLOB NOT NULL,  -- of the whole file; the chain runs over batch ids (signed/batch.py)
    bytes BLOB NOT NULL
);
"""

_CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}


class StoreError(Exception):
    """The store cannot be opened or used; the message names the file and the cause."""


class StoreCorrupt(StoreError):
    """The file is damaged or of an unknown layout: move it aside and start a new one."""


class StoreFull(StoreError):
    """The store reached its quota (SQLite's ``max_page_count``) or the disk is full."""


def _classify(path: Path, what: str, e: sqlite3.Error) -> StoreError:
    name = getattr(e, "sqlite_errorname", "")
    if name in _CORRUPT or "malformed" in str(e):
        return StoreCorrupt(f"store {path} is corrupt ({what}): {e}")
    if name == "SQLITE_FULL" or "disk is full" in str(e):
        return StoreFull(f"store {path} is full ({what}): {e}")
    if name == "SQLITE_BUSY" or "locked" in str(e):
        return StoreError(f"store {path} is in use by another process (a running agent?)")
    return StoreError(f"cannot use store {path} ({what}): {e}")


class Rider(Protocol):
    """Writes that cost no commit of their own: they ride on the next transaction."""

    def write(self, db: sqlite3.Connection) -> None:
        """Write them, inside the transaction just begun."""

    def committed(self) -> None:
        """That transaction committed: what :meth:`write` wrote is durable."""


class StoreFile:
    """The open SQLite file, of this layout, with its settings; thread-safe under one lock.

    ``quota_bytes`` caps the database through SQLite's ``max_page_count``: a
    write that would grow past it fails with :class:`StoreFull` and changes
    nothing.  A file of another layout, or of unknown tables, is refused as
    :class:`StoreCorrupt` and kept exactly as found.
    """

    def __init__(self, path: Path, quota_bytes: int | None = None, busy_timeout: float = 2.0):
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not path.exists() or path.stat().st_size == 0
            # One connection shared by the agent's threads, under self._lock.
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open store {path}: {e}") from None
        try:
            self._setup(fresh, quota_bytes)
        except sqlite3.Error as e:
            self._db.close()
            raise _classify(path, "opening", e) from None
        except StoreError:
            self._db.close()
            raise

    def _setup(self, fresh: bool, quota_bytes: int | None) -> None:
        db = self._db
        if fresh:
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        # Look before writing anything: a file of another layout is kept exactly as found.
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" in tables:
            version = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if version is None or version[0] != SCHEMA_VERSION:
                found = None if version is None else version[0]
                raise StoreCorrupt(
                    f"store {self.path} has layout {found or 1}, expected {SCHEMA_VERSION}"
                )
        elif tables:
            raise StoreCorrupt(f"store {self.path} holds unknown tables {sorted(tables)}")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise StoreError(f"store {self.path}: cannot switch to WAL mode")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA journal_size_limit=1048576")  # a checkpointed WAL shrinks back
        # Appends, and reads near the end (sealing, upload) need few pages in
        # memory.  SQLite's default 2 MB cache would keep filling for the first
        # hour of a run (the store grows about 1.8 MB a bus-hour): memory that grows.
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # Take the write lock now: a second agent on the same store fails here, at once.
        db.execute("BEGIN IMMEDIATE")
        db.execute("COMMIT")
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('schema', ?)", (SCHEMA_VERSION,))
        if quota_bytes is not None:
            # The quota covers the database and its WAL: the WAL is checkpointed (and
            # truncated) at a sixteenth of the quota, at most 1000 pages, and the
            # database may grow into the rest.
            page = int(db.execute("PRAGMA page_size").fetchone()[0])
            pages = quota_bytes // page
            wal = max(16, min(1000, pages // 16))
            db.execute(f"PRAGMA wal_autocheckpoint={wal}")
            db.execute(f"PRAGMA journal_size_limit={wal * (page + 24)}")
            db.execute(f"PRAGMA max_page_count={max(64, pages - wal)}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def _tx(self, rider: Rider | None = None) -> _Transaction:
        return _Transaction(self, rider)

    def quick_check(self) -> str:
        """SQLite's ``quick_check``: "ok" or the first problem it found."""
        with self._lock:
            try:
                rows = self._db.execute("PRAGMA quick_check(5)").fetchall()
            except sqlite3.Error as e:
                return f"quick_check failed: {e}"
        return "; ".join(str(r[0]) for r in rows)

    def integrity_check(self) -> str:
        with self._lock:
            rows = self._db.execute("PRAGMA integrity_check(5)").fetchall()
        return "; ".join(str(r[0]) for r in rows)

    def capacity_bytes(self) -> int:
        """What the database may grow to: the quota less the WAL's share (SQLite's hard limit)."""
        with self._lock:
            q = self._db.execute
            return int(q("PRAGMA max_page_count").fetchone()[0]) * int(
                q("PRAGMA page_size").fetchone()[0]
            )

    def used_bytes(self) -> int:
        """Bytes of live database pages (free pages are reused before the file grows)."""
        with self._lock:
            q = self._db.execute
            pages = int(q("PRAGMA page_count").fetchone()[0])
            free = int(q("PRAGMA freelist_count").fetchone()[0])
            size = int(q("PRAGMA page_size").fetchone()[0])
        return (pages - free) * size


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on error), holding the file's lock.

    SQLite errors come out as :class:`StoreError` subclasses (corrupt, full, other).
    """

    def __init__(self, file: StoreFile, rider: Rider | None) -> None:
        self._file = file
        self._rider = rider

    def __enter__(self) -> None:
        self._file._lock.acquire()
        try:
            self._file._db.execute("BEGIN IMMEDIATE")
            if self._rider is not None:
                self._rider.write(self._file._db)
        except sqlite3.Error as e:
            if self._file._db.in_transaction:
                self._file._db.execute("ROLLBACK")
            self._file._lock.release()
            raise _classify(self._file.path, "begin", e) from None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        db = self._file._db
        try:
            if exc_type is None:
                try:
                    db.execute("COMMIT")
                    if self._rider is not None:
                        self._rider.committed()
                    return
                except sqlite3.Error as e:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise _classify(self._file.path, "commit", e) from None
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _classify(self._file.path, "write", exc) from None
        finally:
            self._file._lock.release()
