"""Batches read back from where they are kept: a device store or an ingest database.

Both are SQLite files with a ``batches`` table.  A device store holds one
device's chain (its id in ``meta``); an ingest database holds many devices
(``batches.device_id``) and their registered keys (``devices``).  This module
is the one place that tells them apart, so ``cngmrv export``, ``cngmrv verify``
and the office's reports read both the same way: :class:`Holdings` is the one
reader of what either holds (devices, their registered keys, their batches),
over any :class:`Queries`; :class:`ReadOnlySQLite` is the SQLite one, and the
office adds PostgreSQL (``cngmrv.office.fleetdb.ReadOnlyDB``), whose driver the
bus does not install.

Every open is read-only: an auditor's copy, or a store on read-only media,
must never be changed by reading it.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Protocol

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


KeyRange = tuple[bytes, int, int | None]  # a key's PEM, first seq, last seq or None


class Queries(Protocol):
    """A read-only connection to a store or an ingest database: SQL with ``?`` markers."""

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]: ...

    def tables(self) -> set[str]: ...

    def kind(self) -> Kind: ...


class ReadOnlySQLite:
    """A store or an ingest database in an SQLite file, opened by :func:`open_readonly`.

    SQLite errors come out as :class:`ArchiveError` naming the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_readonly(path)

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot read {self.path}: {e}") from None

    def tables(self) -> set[str]:
        return {str(r[0]) for r in self.all("SELECT name FROM sqlite_master WHERE type='table'")}

    def kind(self) -> Kind:
        try:
            return kind_of(self._db, self.path)
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot read {self.path}: {e}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ReadOnlySQLite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Holdings:
    """What a store or an ingest database holds: the one reader, for every backend.

    An ingest database: the devices that have batches or a registered key,
    their keys (``devices``: the first; ``device_keys``: each with its range
    of sequences, where the table exists) and their batches.  A device store:
    its one device (``meta.device_id``), no keys, its batches.  ``where``
    names the database in errors (a URL already redacted).  One report's
    reading: the registered keys are read once.
    """

    def __init__(self, db: Queries, where: str | Path) -> None:
        self.db = db
        self.where = str(where)
        self.kind: Kind = db.kind()
        self._tables = db.tables()
        self._keys: dict[str, bytes] | None = None

    def devices(self) -> list[str]:
        """Every device held, sorted (in Python: a PostgreSQL collation may order ids unlike
        SQLite)."""
        if self.kind == "store":
            rows = []
            if "meta" in self._tables:
                rows = self.db.all("SELECT value FROM meta WHERE key='device_id'")
            if not rows:
                raise ArchiveError(
                    f"{self.where}: device store without a device id (no meta.device_id)"
                )
            return [str(rows[0][0])]
        held = {str(r[0]) for r in self.db.all("SELECT DISTINCT device_id FROM batches")}
        return sorted(held | set(self.keys()))

    def has_registry(self) -> bool:
        """Whether the database registers device keys (an ingest database's ``devices``)."""
        return self.kind == "ingest" and "devices" in self._tables

    def keys(self) -> dict[str, bytes]:
        """Each registered device's first key (PEM); empty for a device store."""
        if self._keys is None:
            rows = []
            if self.has_registry():
                rows = self.db.all("SELECT device_id, pubkey_pem FROM devices")
            self._keys = {str(d): bytes(k) for d, k in rows}
        return dict(self._keys)

    def key_ranges(self) -> dict[str, list[KeyRange]]:
        """Per device, the keys registered from a sequence on (``device_keys``), if any."""
        out: dict[str, list[KeyRange]] = {}
        if self.kind != "ingest" or "device_keys" not in self._tables:
            return out
        for dev, pem, first, last in self.db.all(
            "SELECT device_id, pubkey_pem, valid_from, valid_until FROM device_keys"
        ):
            out.setdefault(str(dev), []).append(
                (bytes(pem), int(first), None if last is None else int(last))
            )
        return out

    def batches(self, device: str) -> list[tuple[int, bytes]]:
        """(seq, bytes) of ``device``'s batches, in sequence order; empty for a device
        store of another device."""
        if self.kind == "ingest":
            rows = self.db.all(
                "SELECT seq, bytes FROM batches WHERE device_id=? ORDER BY seq", (device,)
            )
        elif device in self.devices():
            rows = self.db.all("SELECT seq, bytes FROM batches ORDER BY seq")
        else:
            rows = []
        return [(int(s), bytes(b)) for s, b in rows]


def read_batches(path: Path, device: str | None = None) -> list[tuple[str, int, bytes]]:
    """(device, seq, bytes) of every batch held, ordered by device and sequence.

    ``device`` narrows an ingest database to one device; for a device store of
    another device it gives an empty list.
    """
    with ReadOnlySQLite(path) as db:
        held = Holdings(db, path)
        devices = held.devices() if device is None else [device]
        return [(dev, seq, raw) for dev in devices for seq, raw in held.batches(dev)]


def registered_key_ranges(path: Path) -> list[tuple[str, bytes, int, int | None]]:
    """Every key an ingest database trusts: (device id, PEM, first seq, last seq or None).

    Keys rotated to or registered from a sequence on are in ``device_keys``;
    a database from before it existed has only each device's first key.
    """
    with ReadOnlySQLite(path) as db:
        held = Holdings(db, path)
        if not held.has_registry():
            raise ArchiveError(f"{path} has no device registry")
        rows: dict[tuple[str, bytes], tuple[int, int | None]] = {
            (d, k): (0, None) for d, k in held.keys().items()
        }
        for d, ranges in held.key_ranges().items():
            for k, first, last in ranges:
                rows[(d, k)] = (first, last)
        return [(d, k, first, last) for (d, k), (first, last) in rows.items()]


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
