"""The device store: readings, events and sealed batches in one SQLite file.

The file itself (its layout, WAL and ``synchronous=FULL``, the exclusive
lock, transactions, the quota's page limit) is :mod:`cngmrv.agent.store_file`;
a sealed batch's life after the seal (upload marks, the quota's drops) is
:mod:`cngmrv.agent.store_batches`; the chain's mirror beside the store is
:mod:`cngmrv.agent.store_head`; reading a damaged store back is
:mod:`cngmrv.agent.store_salvage`.  This module holds the chain: numbering,
sealing, boot epochs, and taking over what a salvage found.

Sealing (select unsealed rows, build, sign, insert, advance the chain) is one
transaction, so a crash leaves either no batch or a complete one.  The chain
position (next batch sequence, previous hash, next reading to seal) lives in
``meta``, never derived from the rows that are left, so pruning old batches
cannot make a sequence come round again; it is mirrored after every seal into
``<store>.head`` (:func:`write_head`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cngmrv.agent.store_batches import ACKS_HELD, Dropped, SealedBatches
from cngmrv.agent.store_file import SCHEMA_VERSION, StoreCorrupt, StoreError, StoreFull, _classify
from cngmrv.agent.store_head import ChainState, head_path, read_head, write_head
from cngmrv.agent.store_salvage import Salvage, salvage
from cngmrv.signed import batch
from cngmrv.signed.keys import Signer

# The names callers import from here, wherever they are defined.
__all__ = [
    "ACKS_HELD",
    "RESERVE_BYTES",
    "SCHEMA_VERSION",
    "ChainState",
    "Dropped",
    "Salvage",
    "Sealed",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "head_path",
    "make_reserve",
    "read_head",
    "release_reserve",
    "reserve_path",
    "salvage",
    "write_head",
]

log = logging.getLogger("cngmrv.store")

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


class Store(SealedBatches):
    """One device's durable state.  Thread-safe: every method holds one lock.

    ``quota_bytes`` caps the database (:class:`~cngmrv.agent.store_file.StoreFile`).
    The agent's policy (prune early, drop oldest unsent batches with a signed
    event) lives in :class:`cngmrv.agent.recorder.Recorder`.
    """

    def __init__(
        self,
        path: Path,
        device_id: str,
        quota_bytes: int | None = None,
        busy_timeout: float = 2.0,
    ) -> None:
        super().__init__(path, quota_bytes, busy_timeout)
        try:
            stored = self._meta("device_id")
        except sqlite3.Error as e:
            self._db.close()
            raise _classify(path, "opening", e) from None
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
        with self._tx(self._marks):
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

    # -- reading back ---------------------------------------------------------

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
                - len(self._marks.held),
                "batches_refused": int(
                    q("SELECT count(*) FROM batches WHERE uploaded = 2").fetchone()[0]
                ),
            }

    # -- pruning (the quota; sealed batches: store_batches.py) -------------------

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

    # -- salvage (reading the damaged store: store_salvage.py) ---------------------

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
