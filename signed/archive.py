"""Batches read back from where they are kept: a device store or an ingest database.

Both are SQLite files with a ``batches`` table.  A device store holds one
device's chain (its id in ``meta``); an ingest database holds many devices
(``batches.device_id``) and their registered keys (``devices``).  This module
is the one place that tells them apart, so ``cngmrv export``, ``cngmrv verify``
and the office's reports read both the same way.

Every open is read-only: an auditor's copy, or a store on read-only media,
must never be changed by reading it.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Literal

Kind = Literal["store", "ingest"]


class ArchiveError(Exception):
    """The file cannot be read as a store or an ingest database; the message says why."""


class _ScratchConnection(sqlite3.Connection):
    """A connection to a private copy, which goes away with the connection."""

    scratch: str | None = None

    def close(self) -> None:
        super().close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open an existing store or ingest database for reading, never creating or changing it.

    The path goes into SQLite's URI in percent-encoded form: a ``#`` or ``%``
    in a folder name must not cut the URI short (a cut ``?mode=ro`` would
    create a new, empty file) or name another file.

    A WAL database on read-only media (an auditor's copy) cannot be opened
    with ``mode=ro`` alone: SQLite needs to create its ``-shm`` file.  Then,
    without a ``-wal`` file (a store after a clean stop), it is opened with
    ``immutable=1``, which is exact only because nothing can change the file
    while it is read; with a non-empty ``-wal`` (a store after a crash), whose
    last transactions ``immutable=1`` would silently miss, the database and
    its WAL are copied to a private temporary folder and the copy is read
    (costing its size in temporary space), which goes away on ``close()``.
    """
    if not path.is_file():
        raise ArchiveError(f"no such database file: {path}")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=0.5)
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        name = getattr(e, "sqlite_errorname", "")
        if name == "SQLITE_BUSY" or "locked" in str(e):
            raise ArchiveError(
                f"store {path} is in use by a running agent; stop it first, "
                "or export the batches from the ingest"
            ) from None
        if name in ("SQLITE_CANTOPEN", "SQLITE_READONLY") or "unable to open" in str(e):
            return _open_on_readonly_media(path, e)
        raise ArchiveError(f"cannot read database {path}: {e}") from None
    return db


def _open_on_readonly_media(path: Path, first: sqlite3.Error) -> sqlite3.Connection:
    wal = Path(f"{path}-wal")
    db: sqlite3.Connection
    try:
        if wal.is_file() and wal.stat().st_size > 0:
            scratch = tempfile.mkdtemp(prefix="cngmrv-ro-")
            try:
                copy = Path(scratch) / "db"
                shutil.copyfile(path, copy)
                shutil.copyfile(wal, Path(f"{copy}-wal"))
                scratch_db = sqlite3.connect(copy, factory=_ScratchConnection, timeout=0.5)
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
            scratch_db.scratch = scratch
            db = scratch_db
        else:
            db = sqlite3.connect(
                path.resolve().as_uri() + "?mode=ro&immutable=1", uri=True, timeout=0.5
            )
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except (sqlite3.Error, OSError) as e:
        raise ArchiveError(f"cannot read database {path}: {first}; read-only copy: {e}") from None
    return db


def classify(tables: set[str], batch_columns: set[str], where: str | Path) -> Kind:
    """Ingest database or device store: the one rule, for SQLite and PostgreSQL alike.

    ``"ingest"`` when the ``batches`` table is keyed by device, ``"store"``
    otherwise; :class:`ArchiveError` when there is no ``batches`` table.
    ``where`` names the database in the error (a URL already redacted).
    """
    if "batches" not in tables:
        raise ArchiveError(f"{where} is neither an ingest database nor a device store")
    return "ingest" if "device_id" in batch_columns else "store"


def kind_of(db: sqlite3.Connection, path: Path) -> Kind:
    """What an SQLite file opened with :func:`open_readonly` is (:func:`classify`)."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    cols = {r[1] for r in db.execute("PRAGMA table_info(batches)")}
    return classify(tables, cols, path)


def store_device_id(db: sqlite3.Connection, path: Path) -> str:
    """The device id a device store was made for."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key='device_id'").fetchone()
    except sqlite3.Error:
        row = None
    if row is None:
        raise ArchiveError(f"{path}: device store without a device id (no meta.device_id)")
    return str(row[0])


def read_batches(path: Path, device: str | None = None) -> list[tuple[str, int, bytes]]:
    """(device, seq, bytes) of every batch held, ordered by device and sequence.

    ``device`` narrows an ingest database to one device; for a device store of
    another device it gives an empty list.
    """
    db = open_readonly(path)
    try:
        if kind_of(db, path) == "ingest":
            rows = db.execute(
                "SELECT device_id, seq, bytes FROM batches "
                "WHERE ? IS NULL OR device_id = ? ORDER BY device_id, seq",
                (device, device),
            ).fetchall()
            return [(str(d), int(s), bytes(b)) for d, s, b in rows]
        dev = store_device_id(db, path)
        if device is not None and device != dev:
            return []
        rows = db.execute("SELECT seq, bytes FROM batches ORDER BY seq").fetchall()
        return [(dev, int(s), bytes(b)) for s, b in rows]
    except sqlite3.Error as e:
        raise ArchiveError(f"cannot read batches from {path}: {e}") from None
    finally:
        db.close()


def registered_key_ranges(path: Path) -> list[tuple[str, bytes, int, int | None]]:
    """Every key an ingest database trusts: (device id, PEM, first seq, last seq or None).

    Keys rotated to or registered from a sequence on are in ``device_keys``;
    a database from before it existed has only each device's first key.
    """
    db = open_readonly(path)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "devices" not in tables:
            raise ArchiveError(f"{path} has no device registry")
        rows: dict[tuple[str, bytes], tuple[int, int | None]] = {
            (str(d), bytes(k)): (0, None)
            for d, k in db.execute("SELECT device_id, pubkey_pem FROM devices")
        }
        if "device_keys" in tables:
            for d, k, first, last in db.execute(
                "SELECT device_id, pubkey_pem, valid_from, valid_until FROM device_keys"
            ):
                rows[(str(d), bytes(k))] = (int(first), None if last is None else int(last))
        return [(d, k, first, last) for (d, k), (first, last) in rows.items()]
    except sqlite3.Error as e:
        raise ArchiveError(f"{path} has no device registry: {e}") from None
    finally:
        db.close()


def ingest_alarms(path: Path) -> list[dict[str, object]]:
    """The tamper alarms an ingest database holds (empty for a device store)."""
    db = open_readonly(path)
    try:
        if kind_of(db, path) != "ingest":
            return []
        cols = {r[1] for r in db.execute("PRAGMA table_info(alarms)")}
        if not cols:
            return []
        repeats = "repeats" if "repeats" in cols else "1"
        rows = db.execute(
            f"SELECT device_id, seq, kind, detail, {repeats} FROM alarms ORDER BY at"
        ).fetchall()
    except sqlite3.Error as e:
        raise ArchiveError(f"cannot read the alarms of {path}: {e}") from None
    finally:
        db.close()
    return [
        {"device_id": str(d), "seq": s, "kind": str(k), "detail": str(t), "repeats": int(r)}
        for d, s, k, t, r in rows
    ]
