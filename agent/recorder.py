"""The recorder: readings in, sealed signed batches out, whatever happens to the disk.

It sits between the pipeline and the :class:`~cngmrv.agent.store.Store` and
owns the policies the store only provides the means for:

- **Buffering.**  Readings wait in memory until ``buffer_s`` of them (by their
  own period) have gathered, or the oldest has waited ``buffer_s`` of wall
  time, then go to disk in one transaction.  A kill loses at most that
  window; in exchange a bus-hour at 1 Hz writes a few hundred commits, not
  thousands (see ``bench/store_writes.py``).
- **Start-up.**  Open the store; ``quick_check`` (before the first write, so
  a damaged file is kept as found); increment the boot epoch, committing the
  ``BOOT`` event (was the last stop clean?) in the same transaction; seal
  what the last run left together with it.  A store that cannot be opened or
  fails the check, at start or later, is moved aside (kept for forensics), a
  new one continues the chain from the head file, whatever batches can be
  read back are taken over, and a signed ``STORE_REPLACED`` event says what
  happened; :attr:`Recorder.store` then names the new store.  A store older than its head
  file (restored from a backup, or rolled back by a lying disk) continues
  from the head with a ``STORE_ROLLED_BACK`` event, so no sequence is ever
  signed twice.
- **The quota.**  Above ``alarm_fraction`` of the quota: an alarm (log and a
  signed ``STORAGE_ALARM``), then optional data goes first: readings and
  events already inside batches, then batches the ingest acknowledged.
  Above ``drop_fraction``: the oldest *unsent* batches go, and a signed
  ``STORAGE_FULL`` event names their range.  Nothing unsent disappears
  silently.

Not thread-safe; the agent's acquisition loop is its only caller (the store
itself may be shared with the uploader thread).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cngmrv.agent.store import (
    ChainState,
    Sealed,
    Store,
    StoreCorrupt,
    StoreFull,
    make_reserve,
    read_head,
    release_reserve,
    salvage,
    write_head,
)
from cngmrv.signed import batch
from cngmrv.signed.keys import Signer, SignerError, public_key_from_pem

log = logging.getLogger("cngmrv.recorder")


@dataclass(frozen=True)
class RecorderConfig:
    """The ``[store]`` and ``[batch]`` settings the recorder works with."""

    readings_per_batch: int = 60
    buffer_s: float = 10.0
    period_s: float = 1.0
    quota_bytes: int = 1 << 30
    alarm_fraction: float = 0.8
    drop_fraction: float = 0.95
    max_buffered: int = 3600  # readings kept in memory while the disk refuses them

    @property
    def buffer_readings(self) -> int:
        """Readings that fill the buffer window (at least one)."""
        return max(1, int(self.buffer_s / self.period_s + 1e-9))


@dataclass
class BootReport:
    """What the start-up sequence found and did."""

    epoch: int
    clean_stop: bool
    store: str  # "new", "ok", "replaced" or "rolled_back"
    leftover_readings: int
    leftover_batches: int
    events: list[str] = field(default_factory=list)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


class Recorder:
    """Buffers readings, seals batches, keeps the store healthy and within its quota."""

    def __init__(
        self,
        store_path: Path,
        device_id: str,
        signer: Signer,
        config: RecorderConfig | None = None,
        clock: str = "unknown",
        on_sealed: Callable[[Sealed], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = store_path
        self.device_id = device_id
        self.signer = signer
        self.config = config or RecorderConfig()
        self.clock = clock
        self.on_sealed = on_sealed
        self._monotonic = monotonic
        self._wall = wall
        self._buffer: list[Mapping[str, Any]] = []
        self._events: list[tuple[float, str, Mapping[str, Any]]] = []  # not yet written
        self._buffer_since: float | None = None
        self._store: Store | None = None
        self._alarmed = False
        self._in_quota = False
        self._unreported_drops = 0
        self.boot_epoch = 0
        self.sealed: list[int] = []
        self.stats = {
            "readings": 0,  # committed this run
            "readings_dropped": 0,  # buffered readings the disk never took
            "events_dropped": 0,
            "flushes": 0,
            "pruned_readings": 0,
            "pruned_batches": 0,
            "dropped_unsent_batches": 0,
            "store_replaced": 0,
        }

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("Recorder.start() has not run")
        return self._store

    # -- start-up -------------------------------------------------------------

    def start(self) -> BootReport:
        """The start-up sequence (see the module docstring); returns what it found."""
        head = read_head(self.path)
        if head is not None and head.device_id != self.device_id:
            log.warning("event=head_ignored reason='another device' device=%s", head.device_id)
            head = None
        status = "ok" if self.path.exists() else "new"
        events: list[tuple[str, dict[str, Any]]] = []
        salvaged_epoch = 0
        try:
            self._store = self._open()
            # Check before the first write: a damaged file is kept as it was found.
            problem = self._store.quick_check()
            if problem != "ok":
                raise StoreCorrupt(f"quick_check: {problem}")
        except StoreCorrupt as e:
            self._store, event = self._replace(str(e), head)
            salvaged_epoch = event.pop("epoch")
            events.append(("STORE_REPLACED", event))
            status = "replaced"
        state = self._store.state()
        if head is not None and head.next_seq > state.next_seq:
            lost = [state.next_seq, head.next_seq - 1]
            log.error(
                "event=store_rolled_back store_next_seq=%d head_next_seq=%d",
                state.next_seq,
                head.next_seq,
            )
            self._store.adopt_chain(head)
            events.append(("STORE_ROLLED_BACK", {"lost_batches": lost}))
            status = "rolled_back" if status != "replaced" else status
        leftover, _ = self._store.unsealed()
        now = self._wall()

        def boot_events(epoch: int, clean: bool) -> list[tuple[float, str, dict[str, Any]]]:
            boot = {
                "epoch": epoch,
                "clean_stop": clean and status != "replaced",
                "kid": self.signer.kid,
                "clock": self.clock,
                "store": status,
                "leftover_readings": leftover,
            }
            return [(now, k, {**b, "epoch": epoch}) for k, b in events] + [(now, "BOOT", boot)]

        make_reserve(self.path)
        at_least = max(head.boot_epoch if head else 0, salvaged_epoch)
        epoch, clean = self._store.begin_boot(at_least, boot_events)
        clean = clean and status != "replaced"
        self.boot_epoch = epoch
        self._write_head()
        # The BOOT event travels in the first batch sealed now, with any leftovers.
        before = len(self.sealed)
        while self._seal() is not None:
            pass
        log.info(
            "event=boot epoch=%d clean_stop=%s store=%s leftover_readings=%d",
            epoch,
            clean,
            status,
            leftover,
        )
        self._check_quota()
        return BootReport(
            epoch, clean, status, leftover, len(self.sealed) - before, [k for k, _ in events]
        )

    def _open(self) -> Store:
        return Store(self.path, self.device_id, self.config.quota_bytes)

    def _replace(self, reason: str, head: ChainState | None) -> tuple[Store, dict[str, Any]]:
        """Move the damaged store aside, start a new one, take over what can be read."""
        if self._store is not None:
            try:
                self._store.close()
            except Exception:  # a damaged connection may fail to close; it is discarded anyway
                pass
            self._store = None
        moved = self.path.with_name(f"{self.path.name}.corrupt-{_stamp()}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(moved) + suffix))
        log.error("event=store_replaced reason=%r moved_to=%s", reason, moved.name)
        self.stats["store_replaced"] += 1
        found = salvage(moved, self.device_id, public_key_from_pem(self.signer.public_pem()))
        store = self._open()
        for seq, raw, uploaded in found.batches:
            store.import_batch(seq, raw, uploaded)
        readings = store.import_readings(found.readings)
        event: dict[str, Any] = {
            "reason": reason[:500],
            "moved_to": moved.name,
            "salvaged_batches": (
                [found.batches[0][0], found.batches[-1][0]] if found.batches else None
            ),
            "salvaged_readings": readings,
            "salvage_stopped": found.problem,
            "epoch": found.boot_epoch,
        }
        state = store.state()
        if head is not None and head.next_seq > state.next_seq:
            event["lost_batches"] = [state.next_seq, head.next_seq - 1]
            store.adopt_chain(head)
        elif head is None and not found.batches:
            log.error(
                "event=chain_restarted reason='no head file and nothing salvaged': "
                "the ingest will report the new batches as conflicts"
            )
        return store, event

    def _write_head(self) -> None:
        try:
            write_head(self.path, self.store.state())
        except OSError as e:
            # The store stays the authority; a stale head only weakens rollback detection.
            log.error("event=head_write_failed reason=%r", str(e))

    # -- readings and events ------------------------------------------------------

    def add(self, readings: Sequence[Mapping[str, Any]]) -> None:
        """Buffer readings; write them once the buffer window is full."""
        for r in readings:
            if not self._buffer:
                self._buffer_since = self._monotonic()
            self._buffer.append(r)
            if len(self._buffer) >= self.config.buffer_readings:
                self.flush()

    def add_event(self, t: float, kind: str, body: Mapping[str, Any]) -> None:
        """Commit an event now; it is signed into the next batch.

        If the disk refuses it, it waits in memory (up to ``max_buffered``
        events) and is written before the next readings.
        """
        self._events.append((t, kind, body))
        self._write_events()

    def _write_events(self) -> None:
        while self._events:
            t, kind, body = self._events[0]

            def write(t: float = t, kind: str = kind, body: Mapping[str, Any] = body) -> None:
                # self.store looked up on each call: _guarded may have replaced it.
                self.store.add_event(t, kind, body)

            try:
                self._guarded(write)
            except StoreFull as e:
                log.error("event=event_not_written kind=%s reason=%r", kind, str(e))
                excess = len(self._events) - self.config.max_buffered
                if excess > 0:
                    del self._events[:excess]
                    self.stats["events_dropped"] += excess
                return
            self._events.pop(0)

    def tick(self) -> None:
        """Flush if the oldest buffered reading has waited ``buffer_s`` of wall time."""
        since = self._buffer_since
        if since is not None and self._monotonic() - since >= self.config.buffer_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffer in one transaction, then seal every full batch."""
        self._write_events()
        if not self._buffer:
            return
        batch_ = list(self._buffer)
        try:
            self._guarded(lambda: self.store.add_readings(batch_))
        except StoreFull as e:
            self._refused(str(e))
            return
        self._buffer.clear()
        self._buffer_since = None
        self.stats["readings"] += len(batch_)
        self.stats["flushes"] += 1
        if self._unreported_drops:
            self.add_event(self._wall(), "READINGS_DROPPED", {"count": self._unreported_drops})
            self._unreported_drops = 0
        while self.store.unsealed()[0] >= self.config.readings_per_batch:
            if self._seal() is None:
                break

    def _refused(self, reason: str) -> None:
        # The disk took nothing: keep the readings while memory allows, drop the oldest beyond.
        log.error("event=readings_not_written reason=%r buffered=%d", reason, len(self._buffer))
        excess = len(self._buffer) - self.config.max_buffered
        if excess > 0:
            del self._buffer[:excess]
            self.stats["readings_dropped"] += excess
            self._unreported_drops += excess

    def _guarded(self, action: Callable[[], Any]) -> Any:
        """Run a store action; on a full store prune and retry; on corruption replace the store.

        A full *disk* first frees the reserve set aside at start, so the
        readings and seals go on for a while (and a stop still seals its last
        readings) before the quota policy has to drop anything.
        """
        try:
            return action()
        except StoreFull as e:
            if release_reserve(self.path):
                log.error("event=disk_full action=reserve_released reason=%r", str(e))
                try:
                    return action()
                except StoreFull:
                    pass
            self._check_quota(force=True)
            return action()
        except StoreCorrupt as e:
            # The head file is current to the last seal; the damaged store may not answer.
            head = read_head(self.path)
            self._store, event = self._replace(str(e), head)
            self._store.mark_running()
            self._store.add_event(
                self._wall(), "STORE_REPLACED", {**event, "epoch": self.boot_epoch}
            )
            self._write_head()
            return action()

    def _seal(self, clean_stop: bool = False) -> Sealed | None:
        def seal() -> Sealed | None:
            return self.store.seal(
                self.signer,
                self.config.readings_per_batch,
                {"boot_epoch": self.boot_epoch},
                clean_stop=clean_stop,
            )

        try:
            sealed: Sealed | None = self._guarded(seal)
        except StoreFull as e:
            log.error("event=seal_failed reason=%r", str(e))
            return None
        except SignerError as e:
            # A token that stopped answering: the readings stay committed and unsealed,
            # and the next seal tries again (a PKCS#11 signer reopens its session).
            log.error("event=seal_failed reason=signer detail=%r", str(e))
            return None
        if sealed is None:
            return None
        self.sealed.append(sealed.seq)
        self._write_head()
        if self.on_sealed is not None:
            self.on_sealed(sealed)
        self._check_quota()
        return sealed

    # -- the quota --------------------------------------------------------------------

    def _check_quota(self, force: bool = False) -> None:
        """Apply the quota policy; ``force`` when SQLite has already refused a write."""
        if self._in_quota:
            return
        self._in_quota = True
        try:
            self._enforce_quota(force)
        finally:
            self._in_quota = False

    def _enforce_quota(self, force: bool) -> None:
        store, cfg = self.store, self.config
        used = store.used_bytes()
        # The levels are fractions of what the database may really hold (the quota less
        # the WAL's share), so "above the drop level" is always reachable before SQLite's
        # own limit refuses a write.
        capacity = min(cfg.quota_bytes, store.capacity_bytes())
        alarm = capacity * cfg.alarm_fraction
        if used < alarm and not force:
            if self._alarmed and used < alarm * 0.9:
                self._alarmed = False
                log.warning("event=storage_ok used=%d quota=%d", used, cfg.quota_bytes)
            return
        events: list[tuple[str, dict[str, Any]]] = []
        if not self._alarmed:
            self._alarmed = True
            log.warning("event=storage_alarm used=%d quota=%d", used, cfg.quota_bytes)
            events.append(("STORAGE_ALARM", {"used": used, "quota": cfg.quota_bytes}))
        # Optional data first: rows already inside batches, then acknowledged batches.
        self.stats["pruned_readings"] += store.drop_sealed_rows()
        used = store.used_bytes()
        while used >= alarm * 0.9 and (n := store.drop_uploaded(16)):
            self.stats["pruned_batches"] += n
            used = store.used_bytes()
        lost: list[int] = []
        lost_r: list[int] = []
        if used >= capacity * cfg.drop_fraction or force:
            while used >= alarm * 0.9 and (d := store.drop_unsent(8)) is not None:
                lost = [lost[0] if lost else d.first_seq, d.last_seq]
                if d.last_reading >= d.first_reading:
                    lost_r = [lost_r[0] if lost_r else d.first_reading, d.last_reading]
                self.stats["dropped_unsent_batches"] += d.n_batches
                used = store.used_bytes()
        if lost:
            log.error(
                "event=storage_full dropped_unsent_batches=%d..%d used=%d quota=%d",
                lost[0],
                lost[1],
                used,
                cfg.quota_bytes,
            )
            body: dict[str, Any] = {"lost_batches": lost, "used": used, "quota": cfg.quota_bytes}
            if lost_r:
                body["lost_readings"] = lost_r
            events.append(("STORAGE_FULL", body))
        try:
            for kind, body in events:
                store.add_event(self._wall(), kind, body)
        except StoreFull as e:
            log.error("event=storage_event_not_written reason=%r", str(e))
            return
        if lost:
            self._seal()

    # -- key rotation -----------------------------------------------------------------

    def rotate(self, new_signer: Signer) -> Sealed:
        """Hand the device's chain to ``new_signer``; returns the old key's last batch.

        Commits what is buffered, then seals, with the current key, a batch
        holding the signed ``KEY_ROTATION`` event (the new public key and its
        kid); every later batch is signed by ``new_signer``.  The ingest and
        ``verify`` follow the chain through that batch.  Raises SignerError,
        keeping the current key, when the announcement could not be sealed.
        """
        if new_signer.kid == self.signer.kid:
            raise SignerError("the new key is the current key")
        self.flush()
        while self.store.unsealed()[0] > 0:
            if self._seal() is None:
                break
        # Sealed last and alone, so the announcing batch is the old key's last.
        self.store.add_event(self._wall(), batch.ROTATION_EVENT, batch.rotation_event(new_signer))
        sealed = self._seal()
        if sealed is None or batch.rotation_of(batch.parse(sealed.raw)) is None:
            raise SignerError("the KEY_ROTATION event could not be sealed; keeping the current key")
        log.warning(
            "event=key_rotated seq=%d old_kid=%s new_kid=%s",
            sealed.seq,
            self.signer.kid[:16],
            new_signer.kid[:16],
        )
        self.signer = new_signer
        return sealed

    # -- stopping ----------------------------------------------------------------------

    def stop(self) -> None:
        """Flush, seal everything, and sign a STOP event that marks the stop as clean."""
        self.flush()
        while self.store.unsealed()[0] > 0:
            if self._seal() is None:
                break
        self.store.add_event(
            self._wall(),
            "STOP",
            {"epoch": self.boot_epoch, "clean": True, "readings": self.stats["readings"]},
        )
        self._seal(clean_stop=True)

    def close(self) -> None:
        """Close the store (after :meth:`stop`, and after the uploader stopped using it)."""
        if self._store is not None:
            self._store.close()
            self._store = None
