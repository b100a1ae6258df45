"""The device store: readings, events and sealed batches in one SQLite file.

WAL mode with ``synchronous=FULL``: in WAL mode ``NORMAL`` can lose the last
committed transactions on power loss, and a device that forgot it sealed
batch N could sign a different batch N after uploading the first one.

Sealing (select unbatched rows, build, sign, insert, mark rows) is one
transaction, so a crash leaves either no batch or a complete one, and a
batch sequence is never reused.  Only committed batches are handed to the
uploader.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cngmrv.agent import batch
from cngmrv.agent.keys import Signer

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t0 REAL NOT NULL,
    body BLOB NOT NULL,
    batch_seq INTEGER
);
CREATE INDEX IF NOT EXISTS readings_batch ON readings (batch_seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t REAL NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    batch_seq INTEGER
);
CREATE INDEX IF NOT EXISTS events_batch ON events (batch_seq);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    bytes BLOB NOT NULL,
    sha256 BLOB NOT NULL,
    n_readings INTEGER NOT NULL,
    uploaded_at REAL
);
"""


class StoreError(Exception):
    """The store cannot be opened or used; the message names the file and the cause."""


class Store:
    """One device's durable state.  Not thread-safe: use it from one thread at a time."""

    def __init__(self, path: Path, device_id: str) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # One thread at a time (the agent may be built in one thread and run in another).
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            stored = self._meta("device_id")
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open store {path}: {e}") from None
        if stored is None:
            self._set_meta("device_id", device_id)
        elif stored != device_id:
            raise StoreError(
                f"store {path} belongs to device {stored!r}, not {device_id!r}; "
                "refusing to mix two devices' chains"
            )
        self.device_id = device_id

    def close(self) -> None:
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

    def begin_boot(self) -> int:
        """Increment and return the persisted boot epoch."""
        with self._tx():
            epoch = int(self._meta("boot_epoch") or 0) + 1
            self._set_meta("boot_epoch", epoch)
        return epoch

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def add_readings(self, readings: Sequence[Mapping[str, Any]]) -> None:
        """Commit readings in one transaction (each needs a ``t0``)."""
        if not readings:
            return
        with self._tx():
            self._db.executemany(
                "INSERT INTO readings(t0, body) VALUES(?, ?)",
                [(float(r["t0"]), batch.packb(dict(r))) for r in readings],
            )

    def add_event(self, t: float, kind: str, body: Mapping[str, Any]) -> None:
        """Commit an event; it travels in the next sealed batch, signed."""
        with self._tx():
            self._db.execute(
                "INSERT INTO events(t, kind, body) VALUES(?, ?, ?)",
                (t, kind, batch.packb(dict(body))),
            )

    def unbatched_count(self) -> int:
        row = self._db.execute("SELECT count(*) FROM readings WHERE batch_seq IS NULL").fetchone()
        return int(row[0])

    def seal(
        self, signer: Signer, max_readings: int, extra_header: Mapping[str, Any] | None = None
    ) -> int | None:
        """Seal up to ``max_readings`` unbatched readings plus pending events into one batch.

        Returns the new batch sequence, or None when there was nothing to seal.
        Build, sign, store and mark happen in one transaction.
        """
        with self._tx():
            readings = self._db.execute(
                "SELECT id, body FROM readings WHERE batch_seq IS NULL ORDER BY id LIMIT ?",
                (max_readings,),
            ).fetchall()
            events = self._db.execute(
                "SELECT id, t, kind, body FROM events WHERE batch_seq IS NULL ORDER BY id"
            ).fetchall()
            if not readings and not events:
                return None
            last = self._db.execute(
                "SELECT seq, sha256 FROM batches ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, prev = (0, batch.ZERO_HASH) if last is None else (last[0] + 1, bytes(last[1]))
            body = [batch.unpackb(r[1]) for r in readings]
            payload = {
                "readings": body,
                "events": [{"t": t, "kind": kind, **batch.unpackb(b)} for _, t, kind, b in events],
            }
            header = dict(extra_header or {})
            header["n_readings"] = len(body)
            if body:
                header["first_t0"] = body[0]["t0"]
                header["last_t0"] = body[-1]["t0"]
            raw = batch.build(signer, self.device_id, seq, prev, payload, header)
            self._db.execute(
                "INSERT INTO batches(seq, bytes, sha256, n_readings) VALUES(?, ?, ?, ?)",
                (seq, raw, batch.sha256(raw), len(body)),
            )
            if readings:
                self._db.execute(
                    "UPDATE readings SET batch_seq=? WHERE id BETWEEN ? AND ? AND batch_seq IS NULL",
                    (seq, readings[0][0], readings[-1][0]),
                )
            if events:
                self._db.execute(
                    "UPDATE events SET batch_seq=? WHERE id BETWEEN ? AND ? AND batch_seq IS NULL",
                    (seq, events[0][0], events[-1][0]),
                )
        return seq

    def pending(self, limit: int = 100) -> list[tuple[int, bytes]]:
        """Committed batches not yet acknowledged by the ingest, in sequence order."""
        rows = self._db.execute(
            "SELECT seq, bytes FROM batches WHERE uploaded_at IS NULL ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [(int(s), bytes(b)) for s, b in rows]

    def mark_uploaded(self, seq: int) -> None:
        with self._tx():
            self._db.execute("UPDATE batches SET uploaded_at=? WHERE seq=?", (time.time(), seq))

    def batches(self) -> Iterator[tuple[int, bytes]]:
        """Every sealed batch, in sequence order, with its exact bytes."""
        for seq, raw in self._db.execute("SELECT seq, bytes FROM batches ORDER BY seq"):
            yield int(seq), bytes(raw)

    def counts(self) -> dict[str, int]:
        q = self._db.execute
        return {
            "readings": int(q("SELECT count(*) FROM readings").fetchone()[0]),
            "batches": int(q("SELECT count(*) FROM batches").fetchone()[0]),
            "batches_pending": int(
                q("SELECT count(*) FROM batches WHERE uploaded_at IS NULL").fetchone()[0]
            ),
        }


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open an existing store (or ingest database) for reading, with a clear error."""
    if not path.is_file():
        raise StoreError(f"no such database file: {path}")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise StoreError(f"cannot read database {path}: {e}") from None
    return db


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on error)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
