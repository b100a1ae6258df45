"""The device store: readings, events and sealed batches in one SQLite file.

WAL mode with ``synchronous=FULL`` for every commit: in WAL mode ``NORMAL``
can lose the last committed transactions on power loss, and a device that
forgot it sealed batch N could sign a different batch N after uploading the
first one.  The uploader's acknowledgements are not signed state and get no
commit of their own: they ride on the next seal (a lost one only re-posts a
batch, which the ingest answers with ``duplicate``).

Readings are stored one row per commit, in the payload's column layout, with
1 KiB pages: each commit appends about a page to the WAL.  With the
recorder's 10-second buffer that is ~3.6 MB of kernel-counted writes per
bus-hour (``bench/store_writes.py``); at 5 seconds it would be ~5.7 MB, because every
fsync'd commit costs at least one 4 KiB page however little it holds.

The store is opened with ``locking_mode=EXCLUSIVE``: one process holds it
for as long as it runs, so two agents can never sign into one chain, and
SQLite keeps its WAL index in memory instead of a ``-shm`` file that the
kernel would write back after every commit.  The price: ``cngmrv export`` of
a running agent's store is refused as "in use"; stop the agent, or export
from the ingest.  Threads of one process share the connection through a lock.

Sealing (select unsealed rows, build, sign, insert, advance the chain) is one
transaction, so a crash leaves either no batch or a complete one.  The chain
position (next batch sequence, previous hash, next reading to seal) lives in
``meta``, never derived from the rows that are left, so pruning old batches
cannot make a sequence come round again.  The same position is mirrored after
every seal into a small side file (``<store>.head``, written atomically): if
the database is lost, corrupted or rolled back to an old copy, the next start
continues the chain from there instead of re-signing sequences the ingest
already holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from cngmrv.signed import batch
from cngmrv.signed.keys import Signer

log = logging.getLogger("cngmrv.store")

SCHEMA_VERSION = 2
CACHE_KIB = 256  # the store's page cache
PAGE_SIZE = 1024  # small pages: a commit of a few readings appends ~1 KiB of WAL, not 4
ACKS_HELD = 32  # upload marks held in memory before they get a commit of their own

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


@dataclass(frozen=True)
class ChainState:
    """Where the chain stands: what the next seal will be."""

    device_id: str
    boot_epoch: int
    next_seq: int
    prev_hash: bytes
    next_reading: int  # the first reading the next batch will hold
    next_event: int  # the first event the next batch will hold

    def to_json(self) -> str:
        d = asdict(self)
        d["prev_hash"] = self.prev_hash.hex()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChainState:
        d = json.loads(text)
        state = cls(
            device_id=str(d["device_id"]),
            boot_epoch=int(d["boot_epoch"]),
            next_seq=int(d["next_seq"]),
            prev_hash=bytes.fromhex(d["prev_hash"]),
            next_reading=int(d["next_reading"]),
            next_event=int(d["next_event"]),
        )
        if len(state.prev_hash) != 32 or min(state.boot_epoch, state.next_seq) < 0:
            raise ValueError("head values out of range")
        return state


def head_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".head")


def read_head(store_path: Path) -> ChainState | None:
    """The chain position mirrored beside the store, or None if absent or unreadable."""
    p = head_path(store_path)
    try:
        return ChainState.from_json(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("event=head_unreadable path=%s reason=%r", p, str(e))
        return None


def write_head(store_path: Path, state: ChainState) -> None:
    """Replace the head file atomically (write, fsync, rename, fsync the folder)."""
    p = head_path(store_path)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            os.write(fd, state.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError:
        # A full disk: leave the old head as it was, and no empty .tmp beside it.
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


RESERVE_BYTES = 2 << 20  # disk space set aside for the writes a full disk would refuse


def reserve_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".reserve")


def make_reserve(store_path: Path, size: int = RESERVE_BYTES) -> bool:
    """Set ``size`` bytes of disk aside beside the store (really written, not sparse).

    When the disk fills up, :func:`release_reserve` frees them for the store's
    last writes (the readings buffered in memory, the seals, the STOP event).
    Returns False, leaving nothing behind, when the disk has not that much room.
    """
    p = reserve_path(store_path)
    if p.exists() and p.stat().st_size >= size:
        return True
    try:
        with open(p, "wb") as f:
            block = bytes(64 * 1024)
            for _ in range(size // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        p.unlink(missing_ok=True)
        log.warning("event=reserve_not_made reason=%r", str(e))
        return False
    return True


def release_reserve(store_path: Path) -> bool:
    """Free the reserve (the disk is full); True if there was one to free."""
    try:
        reserve_path(store_path).unlink()
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class Sealed:
    """One committed batch."""

    seq: int
    raw: bytes
    first_reading: int
    n_readings: int
    n_events: int


@dataclass(frozen=True)
class Dropped:
    """Unsent batches deleted to stay within the quota (they go into a STORAGE_FULL event)."""

    first_seq: int
    last_seq: int
    n_batches: int
    first_reading: int
    last_reading: int  # inclusive; below first_reading when the batches held no readings


class Store:
    """One device's durable state.  Thread-safe: every method holds one lock.

    ``quota_bytes`` caps the database through SQLite's ``max_page_count``: a
    write that would grow past it fails with :class:`StoreFull` and changes
    nothing.  The agent's policy (prune early, drop oldest unsent batches
    with a signed event) lives in :class:`cngmrv.agent.recorder.Recorder`.
    """

    def __init__(
        self,
        path: Path,
        device_id: str,
        quota_bytes: int | None = None,
        busy_timeout: float = 2.0,
    ) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._acked: set[int] = set()  # upload marks not yet written (see mark_uploaded)
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
            stored = self._meta("device_id")
        except sqlite3.Error as e:
            self._db.close()
            raise _classify(path, "opening", e) from None
        except StoreError:
            self._db.close()
            raise
        if stored is None:
            with self._tx():
                self._set_meta("device_id", device_id)
        elif stored != device_id:
            self._db.close()
            raise StoreError(
                f"store {path} belongs to device {stored!r}, not {device_id!r}; "
                "refusing to mix two devices' chains"
            )
        self.device_id = device_id
        self._next_reading, self._next_event = self._counters()

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
            try:
                self.flush_acks()
            except StoreError as e:
                log.warning("event=acks_not_written reason=%r", str(e))
            self._db.close()

    # -- small helpers ----------------------------------------------------

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def _tx(self, acks: bool = False) -> _Transaction:
        return _Transaction(self, acks)

    def _write_acks(self) -> set[int]:
        acked = set(self._acked)
        if acked:
            self._db.executemany(
                "UPDATE batches SET uploaded=1 WHERE seq=?", [(s,) for s in sorted(acked)]
            )
        return acked

    def _counters(self) -> tuple[int, int]:
        # Sealed rows may have been pruned: the meta boundaries keep the numbering going.
        q = self._db.execute
        row = q("SELECT first_seq + n - 1 FROM readings ORDER BY first_seq DESC LIMIT 1").fetchone()
        last_r = None if row is None else row[0]
        last_e = q("SELECT max(seq) FROM events").fetchone()[0]
        sealed_r = int(self._meta("sealed_reading") or 0)
        sealed_e = int(self._meta("sealed_event") or 0)
        return (
            max(sealed_r, -1 if last_r is None else last_r + 1),
            max(sealed_e, -1 if last_e is None else last_e + 1),
        )

    # -- start-up -----------------------------------------------------------

    def state(self) -> ChainState:
        """The current chain position (what the next seal continues from)."""
        with self._lock:
            prev = self._meta("prev_hash")
            return ChainState(
                device_id=self.device_id,
                boot_epoch=int(self._meta("boot_epoch") or 0),
                next_seq=int(self._meta("next_seq") or 0),
                prev_hash=batch.ZERO_HASH if prev is None else bytes(prev),
                next_reading=int(self._meta("sealed_reading") or 0),
                next_event=int(self._meta("sealed_event") or 0),
            )

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

    def begin_boot(
        self,
        at_least: int = 0,
        events: Callable[[int, bool], Sequence[tuple[float, str, Mapping[str, Any]]]] | None = None,
    ) -> tuple[int, bool]:
        """Increment the persisted boot epoch; returns it and whether the last stop was clean.

        ``at_least``: an epoch known from elsewhere (the head file); the new
        epoch is above both, so epochs never repeat even if the store did.
        ``events(epoch, clean)`` gives the events (the BOOT event) to commit in
        the same transaction, so no epoch is ever used without its signed event,
        whenever the process dies.
        """
        with self._lock:
            with self._tx():
                epoch = max(int(self._meta("boot_epoch") or 0), at_least) + 1
                clean = not self._meta("running")
                self._set_meta("boot_epoch", epoch)
                self._set_meta("running", 1)
                rows = list(events(epoch, clean)) if events else []
                for i, (t, kind, body) in enumerate(rows):
                    self._db.execute(
                        "INSERT INTO events(seq, t, kind, body) VALUES(?, ?, ?, ?)",
                        (self._next_event + i, t, kind, batch.packb(dict(body))),
                    )
            self._next_event += len(rows)
        return epoch, clean

    def mark_running(self) -> None:
        """Record that an agent runs on this store (a store replaced mid-run needs it)."""
        with self._tx():
            self._set_meta("running", 1)

    def adopt_chain(self, state: ChainState) -> None:
        """Continue the chain from ``state``: a head file ahead of this (rolled-back) store.

        Readings and events below the adopted boundaries were sealed into the
        batches this copy lost; they count as sealed and are never signed twice.
        """
        with self._tx():
            self._set_meta("next_seq", state.next_seq)
            self._set_meta("prev_hash", state.prev_hash)
            for key, value in (
                ("sealed_reading", state.next_reading),
                ("sealed_event", state.next_event),
                ("boot_epoch", state.boot_epoch),
            ):
                self._set_meta(key, max(int(self._meta(key) or 0), value))
        self._next_reading, self._next_event = self._counters()

    # -- writing ------------------------------------------------------------

    def add_readings(self, readings: Sequence[Mapping[str, Any]]) -> int:
        """Commit readings as one row in one transaction, numbering them; returns the first.

        The row holds the readings in the batch payload's column layout, so a
        commit of a few readings changes one B-tree page, not one per reading.
        """
        if not readings:
            return self._next_reading
        with self._lock:
            with self._tx():
                first = self._next_reading
                self._db.execute(
                    "INSERT INTO readings(first_seq, n, body) VALUES(?, ?, ?)",
                    (first, len(readings), batch.packb(batch.encode_readings(readings))),
                )
            # Only once committed: a refused write must not leave a hole in the numbering.
            self._next_reading = first + len(readings)
        return first

    def _unsealed_rows(self, start: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` numbered readings from ``start`` on, stopping at a hole."""
        out: list[tuple[int, dict[str, Any]]] = []
        # From the row holding ``start`` on, found through the primary key: sealed rows
        # may pile up until the quota prunes them, and a seal must not scan them all.
        holder = self._db.execute(
            "SELECT ifnull(max(first_seq), ?) FROM readings WHERE first_seq <= ?", (start, start)
        ).fetchone()[0]
        cur = self._db.execute(
            "SELECT first_seq, n, body FROM readings WHERE first_seq >= ? ORDER BY first_seq",
            (holder,),
        )
        for first, n, body in cur:
            if first + n <= start:
                continue
            if out and first != out[-1][0] + 1:
                break
            for i, r in enumerate(batch.decode_readings(batch.unpackb(body))):
                if first + i >= start and len(out) < limit:
                    out.append((first + i, r))
            if len(out) >= limit:
                break
        cur.close()
        return out

    def add_event(self, t: float, kind: str, body: Mapping[str, Any]) -> None:
        """Commit an event; it travels in the next sealed batch, signed."""
        with self._lock:
            with self._tx():
                seq = self._next_event
                self._db.execute(
                    "INSERT INTO events(seq, t, kind, body) VALUES(?, ?, ?, ?)",
                    (seq, t, kind, batch.packb(dict(body))),
                )
            self._next_event = seq + 1

    def unsealed(self) -> tuple[int, int]:
        """(readings, events) committed but not yet sealed."""
        with self._lock:
            r = int(self._meta("sealed_reading") or 0)
            e = int(self._meta("sealed_event") or 0)
            return self._next_reading - r, self._next_event - e

    def seal(
        self,
        signer: Signer,
        max_readings: int,
        extra_header: Mapping[str, Any] | None = None,
        clean_stop: bool = False,
    ) -> Sealed | None:
        """Seal up to ``max_readings`` unsealed readings plus pending events into one batch.

        Returns the committed batch, or None when there was nothing to seal.
        Build, sign, store and advance happen in one transaction;
        ``clean_stop`` also records, in it, that the agent stopped cleanly.
        """
        with self._tx(acks=True):
            state = self.state()
            readings = self._unsealed_rows(state.next_reading, max_readings)
            # Only a contiguous run: a hole (salvaged rows) ends this batch.
            first = readings[0][0] if readings else state.next_reading
            readings = [r for i, r in enumerate(readings) if r[0] == first + i]
            events = self._db.execute(
                "SELECT seq, t, kind, body FROM events WHERE seq >= ? ORDER BY seq",
                (state.next_event,),
            ).fetchall()
            if not readings and not events:
                if clean_stop:
                    self._set_meta("running", 0)
                return None
            payload = {
                "readings": [r for _, r in readings],
                "events": [{"t": t, "kind": k, **batch.unpackb(b)} for _, t, k, b in events],
            }
            header = dict(extra_header or {})
            header["first_reading_seq"] = first
            raw = batch.build(
                signer, self.device_id, state.next_seq, state.prev_hash, payload, header
            )
            self._db.execute(
                "INSERT INTO batches(seq, first_reading, n_readings, sha256, bytes) "
                "VALUES(?, ?, ?, ?, ?)",
                (state.next_seq, first, len(readings), batch.sha256(raw), raw),
            )
            self._set_meta("next_seq", state.next_seq + 1)
            # The next batch links to this one's chain id (its batch id), never to its file.
            self._set_meta("prev_hash", batch.parse(raw).chain_id)
            self._set_meta("sealed_reading", first + len(readings))
            if events:
                self._set_meta("sealed_event", events[-1][0] + 1)
            if clean_stop:
                self._set_meta("running", 0)
        return Sealed(state.next_seq, raw, first, len(readings), len(events))

    # -- upload bookkeeping -------------------------------------------------

    def pending(self, after: int = -1, limit: int = 100) -> list[tuple[int, bytes]]:
        """Committed batches above ``after`` not yet acknowledged, in sequence order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, bytes FROM batches WHERE seq > ? AND uploaded = 0 ORDER BY seq LIMIT ?",
                (after, limit + len(self._acked)),
            ).fetchall()
            return [(int(s), bytes(b)) for s, b in rows if s not in self._acked][:limit]

    def mark_uploaded(self, seq: int) -> None:
        """Record that the ingest holds batch ``seq``.

        Not signed state, so it costs no commit of its own: the mark rides on
        the next seal (which rewrites the same B-tree pages anyway), or is written once
        ``ACKS_HELD`` marks wait.  A mark lost to a crash only re-posts a batch,
        which the ingest acknowledges as a duplicate.
        """
        with self._lock:
            self._acked.add(seq)
            if len(self._acked) >= ACKS_HELD:
                self.flush_acks()

    def park_refused(self, seq: int) -> None:
        """Set aside a batch the ingest refused for good: kept, no longer pending.

        ``uploaded`` = 2 marks it (0 pending, 1 acknowledged); the quota's
        :meth:`drop_unsent` treats it as unsent.
        """
        with self._tx():
            self._db.execute("UPDATE batches SET uploaded = 2 WHERE seq = ?", (seq,))

    def requeue_refused(self) -> int:
        """Make parked batches pending again (at each start); returns how many."""
        with self._tx():
            return int(
                self._db.execute("UPDATE batches SET uploaded = 0 WHERE uploaded = 2").rowcount
            )

    def flush_acks(self) -> None:
        """Write the upload marks held in memory now."""
        with self._lock:
            if self._acked:
                with self._tx(acks=True):
                    pass  # the transaction itself writes them

    # -- reading back ---------------------------------------------------------

    def batches(self) -> Iterator[tuple[int, bytes]]:
        """Every sealed batch still held, in sequence order, with its exact bytes."""
        with self._lock:
            rows = self._db.execute("SELECT seq, bytes FROM batches ORDER BY seq").fetchall()
        for seq, raw in rows:
            yield int(seq), bytes(raw)

    def counts(self) -> dict[str, int]:
        with self._lock:
            q = self._db.execute
            unsealed_r, unsealed_e = self.unsealed()
            return {
                "readings": int(q("SELECT ifnull(sum(n), 0) FROM readings").fetchone()[0]),
                "readings_unsealed": unsealed_r,
                "events_unsealed": unsealed_e,
                "batches": int(q("SELECT count(*) FROM batches").fetchone()[0]),
                "batches_pending": int(
                    q("SELECT count(*) FROM batches WHERE uploaded = 0").fetchone()[0]
                )
                - len(self._acked),
                "batches_refused": int(
                    q("SELECT count(*) FROM batches WHERE uploaded = 2").fetchone()[0]
                ),
            }

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

    # -- pruning (the quota) ----------------------------------------------------

    def drop_sealed_rows(self) -> int:
        """Delete readings and events already sealed into batches; returns readings deleted.

        They are optional: every one of them is inside a signed batch.
        """
        with self._tx():
            state = self.state()
            n = self._db.execute(
                "SELECT ifnull(sum(n), 0) FROM readings WHERE first_seq < ? AND first_seq + n <= ?",
                (state.next_reading, state.next_reading),
            ).fetchone()[0]
            self._db.execute(
                "DELETE FROM readings WHERE first_seq < ? AND first_seq + n <= ?",
                (state.next_reading, state.next_reading),
            )
            self._db.execute("DELETE FROM events WHERE seq < ?", (state.next_event,))
        return int(n)

    def drop_uploaded(self, n: int) -> int:
        """Delete the ``n`` oldest batches the ingest acknowledged; returns how many went."""
        with self._tx():
            return int(
                self._db.execute(
                    "DELETE FROM batches WHERE seq IN "
                    "(SELECT seq FROM batches WHERE uploaded = 1 ORDER BY seq LIMIT ?)",
                    (n,),
                ).rowcount
            )

    def drop_unsent(self, n: int) -> Dropped | None:
        """Delete the ``n`` oldest unsent batches; the caller must sign a STORAGE_FULL event."""
        with self._tx():
            rows = self._db.execute(
                "SELECT seq, first_reading, n_readings FROM batches WHERE uploaded != 1 "
                "ORDER BY seq LIMIT ?",
                (n,),
            ).fetchall()
            if not rows:
                return None
            self._db.execute(
                "DELETE FROM batches WHERE uploaded != 1 AND seq BETWEEN ? AND ?",
                (rows[0][0], rows[-1][0]),
            )
        return Dropped(
            rows[0][0], rows[-1][0], len(rows), rows[0][1], rows[-1][1] + rows[-1][2] - 1
        )

    # -- salvage -------------------------------------------------------------------

    def import_batch(self, seq: int, raw: bytes, uploaded: bool) -> None:
        """Take over a verified batch from a damaged store, advancing the chain past it."""
        b = batch.parse(raw)
        first = b.first_reading_seq or 0
        n = b.n_readings or 0
        with self._tx():
            self._db.execute(
                "INSERT INTO batches(seq, uploaded, first_reading, n_readings, sha256, bytes) "
                "VALUES(?, ?, ?, ?, ?, ?)",
                (seq, int(uploaded), first, n, b.file_hash, raw),
            )
            if seq >= int(self._meta("next_seq") or 0):
                self._set_meta("next_seq", seq + 1)
                self._set_meta("prev_hash", b.chain_id)
                self._set_meta("sealed_reading", first + n)
        self._next_reading = max(self._next_reading, first + n)

    def import_readings(self, rows: Sequence[tuple[int, dict[str, Any]]]) -> int:
        """Take over unsealed readings (numbered, contiguous) from a damaged store."""
        boundary = self.state().next_reading
        rows = [(s, r) for s, r in rows if s >= boundary]
        if rows:
            with self._tx():
                self._db.execute(
                    "INSERT INTO readings(first_seq, n, body) VALUES(?, ?, ?)",
                    (
                        rows[0][0],
                        len(rows),
                        batch.packb(batch.encode_readings([r for _, r in rows])),
                    ),
                )
            self._next_reading = max(self._next_reading, rows[-1][0] + 1)
        return len(rows)


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _open_for_salvage(copy: Path) -> sqlite3.Connection:
    """Open the scratch copy; if its 100-byte header is damaged, rebuild the header first.

    SQLite refuses the whole file ("not a database") when the first bytes are
    wrong, even with every data page intact.  Those bytes hold little that
    cannot be known: the magic string, the page size (tried from 512 to
    65536, keeping the one whose schema reads), the WAL/rollback versions
    (from whether a ``-wal`` file is there) and three fixed payload fractions.
    Only the copy is changed; what reads back is verified batch by batch.
    """
    db = sqlite3.connect(copy, isolation_level=None)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.DatabaseError:
        db.close()
    raw = bytearray(copy.read_bytes()[:100])
    if len(raw) < 100:
        raise sqlite3.DatabaseError("too short to hold a database header")
    wal = Path(f"{copy}-wal").exists()
    for size in (PAGE_SIZE, 4096, 512, 2048, 8192, 16384, 32768, 65536):
        raw[0:16] = _SQLITE_MAGIC
        raw[16:18] = (1 if size == 65536 else size).to_bytes(2, "big")
        raw[18:20] = b"\x02\x02" if wal else b"\x01\x01"
        raw[20:24] = bytes([0, 64, 32, 32])
        with open(copy, "r+b") as f:
            f.write(raw)
        db = sqlite3.connect(copy, isolation_level=None)
        try:
            db.execute("SELECT count(*) FROM batches").fetchone()
            log.warning("event=store_header_rebuilt page_size=%d", size)
            return db
        except sqlite3.DatabaseError:
            db.close()
    raise sqlite3.DatabaseError("the header could not be rebuilt for any page size")


@dataclass(frozen=True)
class Salvage:
    """What could be read back from a damaged store."""

    batches: list[tuple[int, bytes, bool]]  # seq, bytes, uploaded
    readings: list[tuple[int, dict[str, Any]]]  # unsealed, numbered
    boot_epoch: int
    problem: str | None  # why reading stopped early, if it did


def salvage(path: Path, device_id: str, public_key: ec.EllipticCurvePublicKey) -> Salvage:
    """Read what is still readable from a (moved-aside) damaged store.

    Works on a scratch copy so the forensic copy stays byte for byte as it
    was found.  Only batches of this device that verify with its key and
    chain to each other from the lowest one read are kept (a rotted batch
    taken over would block the upload forever); reading stops at the first
    error.
    """
    scratch = path.with_name(path.name + ".salvage")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    out_b: list[tuple[int, bytes, bool]] = []
    out_r: list[tuple[int, dict[str, Any]]] = []
    epoch = 0
    problem: str | None = None
    try:
        for suffix in ("", "-wal"):
            src = Path(str(path) + suffix)
            if src.exists():
                shutil.copyfile(src, scratch / ("db" + suffix))
        db = _open_for_salvage(scratch / "db")
        try:
            try:
                epoch = int(
                    db.execute("SELECT value FROM meta WHERE key='boot_epoch'").fetchone()[0]
                )
            except (sqlite3.Error, TypeError, ValueError):
                pass
            prev: batch.Batch | None = None
            columns = {r[1] for r in db.execute("PRAGMA table_info(batches)")}
            # Layout 1 stores had an upload time instead of a flag.
            flag = "uploaded = 1" if "uploaded" in columns else "uploaded_at IS NOT NULL"
            for seq, raw, uploaded in db.execute(
                f"SELECT seq, bytes, {flag} FROM batches ORDER BY seq"
            ):
                raw = bytes(raw)
                try:
                    b = batch.parse(raw)
                except batch.BatchFormatError as e:
                    problem = f"batch {seq}: {e}"
                    break
                if b.seq != seq or b.device_id != device_id:
                    problem = f"batch {seq} is not this device's"
                    break
                bad = batch.check(b, public_key)
                if bad:
                    problem = f"batch {seq}: {bad[0]}"
                    break
                if prev is not None and not batch.links(prev, b.header["prev_hash"]):
                    problem = f"batch {seq} does not chain to the one before"
                    break
                out_b.append((seq, raw, bool(uploaded)))
                prev = b
            boundary = out_b[-1] if out_b else None
            start = 0
            if boundary is not None:
                bb = batch.parse(boundary[1])
                start = (bb.first_reading_seq or 0) + (bb.n_readings or 0)
            for first, body in db.execute(
                "SELECT first_seq, body FROM readings WHERE first_seq + n > ? ORDER BY first_seq",
                (start,),
            ):
                try:
                    rows = batch.decode_readings(batch.unpackb(bytes(body)))
                except (ValueError, TypeError) as e:
                    problem = f"readings from {first}: {e}"
                    break
                out_r.extend((first + i, r) for i, r in enumerate(rows) if first + i >= start)
        except sqlite3.Error as e:
            problem = problem or f"read stopped: {e}"
        finally:
            db.close()
    except (sqlite3.Error, OSError) as e:
        problem = problem or f"cannot open the damaged copy: {e}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Unsealed readings must continue straight from the last salvaged batch.
    kept: list[tuple[int, dict[str, Any]]] = []
    for seq, body in out_r:
        if kept and seq != kept[-1][0] + 1:
            break
        kept.append((seq, body))
    return Salvage(out_b, kept, epoch, problem)


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on error), holding the store's lock.

    SQLite errors come out as :class:`StoreError` subclasses (corrupt, full, other).
    """

    def __init__(self, store: Store, acks: bool) -> None:
        self._store = store
        self._with_acks = acks
        self._acks: set[int] = set()

    def __enter__(self) -> None:
        self._store._lock.acquire()
        try:
            self._store._db.execute("BEGIN IMMEDIATE")
            if self._with_acks:
                self._acks = self._store._write_acks()
        except sqlite3.Error as e:
            if self._store._db.in_transaction:
                self._store._db.execute("ROLLBACK")
            self._store._lock.release()
            raise _classify(self._store.path, "begin", e) from None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        db = self._store._db
        try:
            if exc_type is None:
                try:
                    db.execute("COMMIT")
                    self._store._acked -= self._acks
                    return
                except sqlite3.Error as e:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise _classify(self._store.path, "commit", e) from None
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _classify(self._store.path, "write", exc) from None
        finally:
            self._store._lock.release()
