"""J1939-21 transport protocol: passive reassembly of BAM and RTS/CTS transfers.

A listener on the bus, not a participant: it never answers an RTS, never sends
a CTS, and reassembles what others send to each other as well as what is
broadcast.  Pure logic over ``(now, id fields, payload)``: no I/O, no clock of
its own, standard library only.

Contract and limits:

* **Time** is whatever monotonic ``now`` the caller passes with each frame
  (``time.monotonic()`` at receive on a live bus, the frame timestamp on a
  replay).  It must never be the wall clock: an NTP or GPS step would then
  expire or keep alive every session at once.  ``now`` going backwards is
  treated as no time passing.
* **Timers** (J1939-21 5.12.3): T1 = 750 ms between data packets, T2 = 1,250 ms
  from a CTS to its first data packet, T3 = 1,250 ms from an RTS or the end of
  a CTS block to the next CTS, T4 = 1,050 ms after a "hold" CTS (0 packets).
  A session whose deadline has passed when its next frame arrives, or when
  :meth:`TpReassembler.expire` runs, is dropped and counted as ``timeout``.
* **Sessions** are identified by (source address, PGN) in what
  :meth:`TpReassembler.feed` returns, but TP.DT frames carry no PGN, so they are
  routed by (source, destination).  A new announcement (BAM or RTS) on a
  (source, destination) pair whose session is still open replaces it and the
  old one is counted as ``replaced``: that, together with the strict sequence
  check, is what keeps fragments of two messages from being stitched into one
  (python-can-j1939 issue 72).  Different sources, and one source's BAM and
  its RTS/CTS transfers to other addresses, run concurrently.
* **Sequence**: data packets must arrive numbered 1, 2, 3, ... A packet whose
  number was already received drops the session as ``duplicate``; one that
  skips ahead drops it as ``sequence_gap``.  In RTS/CTS a CTS may ask for
  packets again from an earlier number (a retransmission); the listener then
  accepts them again from that number.
* A message is delivered when its last byte arrives (the End-of-Message ACK is
  not waited for, a listener cannot do anything with it).  Its ``data`` is
  exactly the announced size; the 0xFF padding of the last packet is cut off.
* **Bounded**: at most ``max_sessions`` open sessions; opening one more evicts
  the one with the earliest deadline (counted as ``evicted``).  Frames of the
  wrong length or announcements with impossible sizes are counted and
  ignored, never raised.

Every way a frame or a session can be dropped has its own counter in
:attr:`TpReassembler.counters`, so a noisy bus is visible, not silent.
"""

from __future__ import annotations

from typing import NamedTuple

from cngmrv.drivers.j1939 import GLOBAL, PGN_TP_CM, PGN_TP_DT

__all__ = [
    "ABORT",
    "BAM",
    "CTS",
    "EOM_ACK",
    "MAX_SIZE",
    "RTS",
    "T1",
    "T2",
    "T3",
    "T4",
    "TpMessage",
    "TpReassembler",
]

RTS = 16
CTS = 17
EOM_ACK = 19
BAM = 32
ABORT = 255

MAX_SIZE = 1785  # 255 packets x 7 bytes

T1 = 0.750
T2 = 1.250
T3 = 1.250
T4 = 1.050

COUNTERS = (
    "completed",  # messages delivered
    "bam",  # BAM announcements accepted
    "rts",  # RTS announcements accepted
    "sequence_gap",  # session dropped: a packet number was skipped
    "duplicate",  # session dropped: a packet number came again
    "timeout",  # session dropped: T1/T2/T3/T4 passed
    "aborted",  # session dropped: Connection Abort seen
    "incomplete",  # session dropped: End-of-Message ACK before the last packet was seen
    "replaced",  # session dropped: a new announcement on the same (source, destination)
    "evicted",  # session dropped: too many open sessions
    "orphan_dt",  # data packet with no open session
    "orphan_cts",  # CTS/EOM ACK/Abort with no open session
    "bad_cm",  # connection-management frame that is malformed or inconsistent
    "short_frame",  # TP frame with too few bytes (a data packet's session is dropped too)
)


class TpMessage(NamedTuple):
    """A reassembled message: ``data`` has exactly the announced size."""

    pgn: int
    source: int
    destination: int
    data: bytes
    t: float  # the ``now`` of the frame that completed it


class _Session:
    __slots__ = (
        "pgn",
        "source",
        "dest",
        "size",
        "packets",
        "buf",
        "next_seq",
        "block_end",
        "deadline",
        "bam",
    )

    def __init__(
        self, pgn: int, source: int, dest: int, size: int, packets: int, deadline: float, bam: bool
    ) -> None:
        self.pgn = pgn
        self.source = source
        self.dest = dest
        self.size = size
        self.packets = packets
        self.buf = bytearray()
        self.next_seq = 1
        # Last packet number of the current CTS block (all packets for BAM).
        self.block_end = packets
        self.deadline = deadline
        self.bam = bam


class TpReassembler:
    """Reassembles TP.CM/TP.DT traffic into :class:`TpMessage` objects."""

    def __init__(self, max_sessions: int = 64) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # (originator, destination) -> session; destination 255 for BAM.
        self._sessions: dict[tuple[int, int], _Session] = {}
        self._now = float("-inf")

    @property
    def open_sessions(self) -> dict[tuple[int, int], int]:
        """Open sessions as ``{(source, pgn): packets received}`` (for stats and tests)."""
        return {(s.source, s.pgn): s.next_seq - 1 for s in self._sessions.values()}

    def feed(
        self, now: float, pgn: int, source: int, destination: int, data: bytes
    ) -> TpMessage | None:
        """One TP.CM or TP.DT frame; returns the message it completes, if any.

        ``pgn``, ``source`` and ``destination`` come from the frame's identifier
        (:func:`cngmrv.drivers.j1939.parse_id`).  Frames of other PGNs are ignored.
        Never raises for any payload.
        """
        if now > self._now:
            self._now = now
        now = self._now
        if pgn == PGN_TP_DT:
            return self._data(now, source, destination, data)
        if pgn == PGN_TP_CM:
            self._control(now, source, destination, data)
        return None

    def expire(self, now: float) -> int:
        """Drop every session whose deadline has passed; returns how many."""
        if now > self._now:
            self._now = now
        late = [k for k, s in self._sessions.items() if self._now > s.deadline]
        for k in late:
            del self._sessions[k]
        self.counters["timeout"] += len(late)
        return len(late)

    # -- internals --------------------------------------------------------

    def _drop(self, key: tuple[int, int], reason: str) -> None:
        del self._sessions[key]
        self.counters[reason] += 1

    def _live(self, key: tuple[int, int], now: float) -> _Session | None:
        s = self._sessions.get(key)
        if s is not None and now > s.deadline:
            self._drop(key, "timeout")
            return None
        return s

    def _open(self, key: tuple[int, int], session: _Session, now: float) -> None:
        if key in self._sessions:
            self._drop(key, "replaced")
        elif len(self._sessions) >= self.max_sessions:
            self.expire(now)
            if len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].deadline)
                self._drop(oldest, "evicted")
        self._sessions[key] = session

    def _control(self, now: float, source: int, dest: int, data: bytes) -> None:
        if len(data) < 8:
            self.counters["short_frame"] += 1
            return
        control = data[0]
        pgn = data[5] | data[6] << 8 | data[7] << 16
        if control in (BAM, RTS):
            size = data[1] | data[2] << 8
            packets = data[3]
            bam = control == BAM
            if (
                not 1 <= size <= MAX_SIZE
                or packets != (size + 6) // 7
                or bam != (dest == GLOBAL)
                or pgn > 0x3FFFF
            ):
                self.counters["bad_cm"] += 1
                return
            self.counters["bam" if bam else "rts"] += 1
            deadline = now + (T1 if bam else T3)
            self._open(
                (source, dest), _Session(pgn, source, dest, size, packets, deadline, bam), now
            )
            return
        if control in (CTS, EOM_ACK):
            # Sent by the responder (``source``) to the originator (``dest``).
            key = (dest, source)
            s = self._live(key, now)
            if s is None or s.bam or s.pgn != pgn:
                self.counters["orphan_cts"] += 1
                return
            if control == EOM_ACK:
                # Complete sessions are delivered (and closed) at their last packet, so
                # an open one here lost its end on the way to us.
                self._drop(key, "incomplete")
                return
            count, next_seq = data[1], data[2]
            if count == 0:
                s.deadline = now + T4
                return
            if not 1 <= next_seq <= s.packets:
                self._drop(key, "sequence_gap")
                return
            if next_seq > s.next_seq:
                self._drop(key, "sequence_gap")
                return
            # A retransmission request: forget what came from that packet on.
            s.next_seq = next_seq
            s.block_end = min(next_seq + count - 1, s.packets)
            del s.buf[(next_seq - 1) * 7 :]
            s.deadline = now + T2
            return
        if control == ABORT:
            for key in ((source, dest), (dest, source)):
                s = self._sessions.get(key)
                if s is not None and not s.bam and s.pgn == pgn:
                    self._drop(key, "aborted")
                    return
            self.counters["orphan_cts"] += 1
            return
        self.counters["bad_cm"] += 1

    def _data(self, now: float, source: int, dest: int, data: bytes) -> TpMessage | None:
        key = (source, dest)
        s = self._live(key, now)
        if s is None:
            self.counters["orphan_dt"] += 1
            return None
        if not data:
            self.counters["short_frame"] += 1
            return None
        seq = data[0]
        if seq != s.next_seq:
            self._drop(key, "duplicate" if seq < s.next_seq else "sequence_gap")
            return None
        need = min(7, s.size - len(s.buf))
        if len(data) < 1 + need:
            self.counters["short_frame"] += 1
            del self._sessions[key]
            return None
        s.buf += data[1 : 1 + need]
        s.next_seq = seq + 1
        if len(s.buf) >= s.size:
            del self._sessions[key]
            self.counters["completed"] += 1
            return TpMessage(s.pgn, s.source, s.dest, bytes(s.buf), now)
        # At the end of a CTS block the next thing due is a CTS (T3), not data (T1).
        s.deadline = now + (T3 if seq == s.block_end and not s.bam else T1)
        return None
