"""A device's sealed batches after the seal: upload marks, refused batches, the quota's drops.

A sealed batch is signed and never changes; what changes is whether the
ingest holds it (``uploaded``: 0 pending, 1 acknowledged, 2 refused for good
and set aside) and whether it is still kept.  The acknowledgements are not
signed state and get no commit of their own: they ride on the next
transaction that takes them (the seal's), or are written once ``ACKS_HELD``
wait.  A mark lost to a crash only re-posts a batch, which the ingest
answers with ``duplicate``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cngmrv.agent.store_file import StoreError, StoreFile

log = logging.getLogger("cngmrv.store")

ACKS_HELD = 32  # upload marks held in memory before they get a commit of their own


@dataclass(frozen=True)
class Dropped:
    """Unsent batches deleted to stay within the quota (they go into a STORAGE_FULL event)."""

    first_seq: int
    last_seq: int
    n_batches: int
    first_reading: int
    last_reading: int  # inclusive; below first_reading when the batches held no readings


class _UploadMarks:
    """Acknowledged batches not yet written: they ride on the next transaction that takes them."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self._writing: set[int] = set()

    def write(self, db: sqlite3.Connection) -> None:
        self._writing = set(self.held)
        if self._writing:
            db.executemany(
                "UPDATE batches SET uploaded=1 WHERE seq=?", [(s,) for s in sorted(self._writing)]
            )

    def committed(self) -> None:
        self.held -= self._writing
        self._writing = set()


class SealedBatches(StoreFile):
    """The ``batches`` table's life after each seal (the chain that fills it is
    :class:`cngmrv.agent.store.Store`'s).  Thread-safe under the file's lock."""

    def __init__(self, path: Path, quota_bytes: int | None = None, busy_timeout: float = 2.0):
        super().__init__(path, quota_bytes, busy_timeout)
        self._marks = _UploadMarks()  # upload marks not yet written (see mark_uploaded)

    def close(self) -> None:
        with self._lock:
            try:
                self.flush_acks()
            except StoreError as e:
                log.warning("event=acks_not_written reason=%r", str(e))
            super().close()

    def pending(self, after: int = -1, limit: int = 100) -> list[tuple[int, bytes]]:
        """Committed batches above ``after`` not yet acknowledged, in sequence order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, bytes FROM batches WHERE seq > ? AND uploaded = 0 ORDER BY seq LIMIT ?",
                (after, limit + len(self._marks.held)),
            ).fetchall()
            return [(int(s), bytes(b)) for s, b in rows if s not in self._marks.held][:limit]

    def mark_uploaded(self, seq: int) -> None:
        """Record that the ingest holds batch ``seq``.

        Not signed state, so it costs no commit of its own: the mark rides on
        the next seal (which rewrites the same B-tree pages anyway), or is written once
        ``ACKS_HELD`` marks wait.  A mark lost to a crash only re-posts a batch,
        which the ingest acknowledges as a duplicate.
        """
        with self._lock:
            self._marks.held.add(seq)
            if len(self._marks.held) >= ACKS_HELD:
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
            if self._marks.held:
                with self._tx(self._marks):
                    pass  # the transaction itself writes them

    # -- reading back ---------------------------------------------------------

    def batches(self) -> Iterator[tuple[int, bytes]]:
        """Every sealed batch still held, in sequence order, with its exact bytes."""
        with self._lock:
            rows = self._db.execute("SELECT seq, bytes FROM batches ORDER BY seq").fetchall()
        for seq, raw in rows:
            yield int(seq), bytes(raw)

    # -- pruning (the quota; the recorder decides when) ------------------------

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
