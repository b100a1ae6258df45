"""CAN sources: any python-can bus or a recorded log, read by a supervised thread into a bounded queue.

The agent only sees :class:`CanSource`, which hands out frames as
``(timestamp, can_id, data, mono)`` tuples: ``timestamp`` is the bus's own
(kernel receive time on SocketCAN, the sender's time on a ``virtual`` bus with
``preserve_timestamps``, the recorded time on a replay), never the time the
agent got round to reading it; ``mono`` is ``time.monotonic()`` at receive (the
recorded time on a replay), the clock protocol timers must use because the
bus timestamps are wall-clock time and jump when NTP or GPS steps it.

What the source survives, and how it shows it:

* **A failing bus.**  Any exception from ``recv`` (python-can raises
  ``CanError``, ``OSError``, and after a socket closes even ``ValueError``), an
  interface the kernel reports down, or a controller in bus-off: the bus is
  shut down, a ``CAN_DOWN`` event is recorded, and the bus is reopened with
  exponential backoff (``backoff_s`` doubling up to ``backoff_max_s``) until it
  works again, when a ``CAN_UP`` event records the outage's length.  Frames on
  the wire while no bus is open are lost; that is the outage, and it is
  recorded.  A source built from an already open bus (not an opener) cannot
  reopen it: it records the failure and stops.
* **Load.**  The queue is bounded (``queue_size``); when full the newest frame
  is dropped and counted in ``stats["queue_dropped"]``.  On SocketCAN the
  frames the kernel drops on the socket's full receive queue are counted in
  ``stats["kernel_dropped"]`` and recorded as ``CAN_RX_OVERFLOW`` events
  (:mod:`cngmrv.drivers.socketcan_drops`); the interface's own counters
  (controller FIFO overflow) are polled and reported in ``stats["kernel"]``.  A replay is not a live bus and is never dropped: its
  reader waits for room instead.
* **Kernel state.**  On SocketCAN a monitor thread reads the interface's state
  from the kernel (:mod:`cngmrv.drivers.canlink`) every ``link_poll_s``;
  python-can's own ``state`` always says "active".

Listen-only: SocketCAN has no per-socket listen-only switch (it is a property of
the interface, ``ip link set can0 type can listen-only on``); the source never
transmits unless it was given a :class:`RequestPlan`, which it refuses in
listen-only mode, and it reports whether the kernel has the interface in
listen-only mode.  The same holds for a source's :class:`Talker` (the OBD-II
source's requests): given one, the source refuses listen-only mode.

11-bit frames: J1939 is 29-bit only, so 11-bit frames are ignored (counted in
``stats["ignored"]``) unless their identifier is in ``standard_ids``; those
come out as ``(timestamp, can_id | STANDARD_ID_FLAG, data, mono)``
(:data:`~cngmrv.drivers.j1939.STANDARD_ID_FLAG`), so no J1939 decoder can take
them for a PGN.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import can

from cngmrv.drivers import j1939
from cngmrv.drivers.address import AddressClaimer
from cngmrv.drivers.can_logs import Frame, ReplayBus
from cngmrv.drivers.canlink import LinkState, read_link
from cngmrv.drivers.j1939 import STANDARD_ID_FLAG
from cngmrv.drivers.socketcan_drops import OverflowCountingBus

__all__ = [
    "DEFAULT_PGNS",
    "INTERFACES",
    "REPLAY",
    "CanSource",
    "Frame",
    "RequestPlan",
    "SourceSettings",
    "Talker",
    "j1939_filters",
    "make_source",
    "open_bus",
]

log = logging.getLogger("cngmrv.can")

BusOpener = Callable[[], can.BusABC]

#: Every PGN the agent reads: the signal table, DM1, transport protocol, address claims.
DEFAULT_PGNS: frozenset[int] = frozenset(
    {
        *j1939.SIGNALS,
        j1939.PGN_DM1,
        j1939.PGN_TP_CM,
        j1939.PGN_TP_DT,
        j1939.PGN_ADDRESS_CLAIMED,
    }
)

REPLAY = "replay"
#: Every value ``interface`` may take: python-can's interfaces and ``"replay"``.
INTERFACES: frozenset[str] = frozenset(can.interfaces.VALID_INTERFACES) | {REPLAY}
#: A listening reader's longest wait in ``recv``: on a silent bus it wakes this often, and
#: notices a stop or an outage this late (the bare python-can loop of bench/vm_full_load.py
#: waits about as long).  At 0.05 s its 20 wake-ups a second were most of an idle agent's.
LISTEN_POLL_S = 0.25


class Talker(Protocol):
    """Frames a source sends on the bus, when its config says so (never in listen-only mode).

    Called by the reader thread after every receive attempt (``msg`` is the
    frame received, or None after a timeout) with ``now`` on ``time.monotonic()``;
    returns ``(can_id, data, extended)`` frames to send now.  It must be quick
    and must not raise: it runs on the hot path.  A frame that fails to send is
    counted in ``stats["send_errors"]`` and not retried by the source.
    """

    def frames(self, now: float, msg: can.Message | None) -> list[tuple[int, bytes, bool]]: ...


def j1939_filters(pgns: Iterable[int], standard_ids: Iterable[int] = ()) -> list[dict[str, Any]]:
    """python-can ``can_filters`` that accept the 29-bit frames of ``pgns`` from any source.

    For PDU1 PGNs (PF < 240) the PS byte is a destination, so every destination
    is accepted.  11-bit frames match only when their identifier is one of
    ``standard_ids``.
    """
    out = [{"can_id": i, "can_mask": 0x7FF, "extended": False} for i in sorted(set(standard_ids))]
    for pgn in sorted(set(pgns)):
        if not 0 <= pgn <= 0x3FFFF:
            raise ValueError(f"PGN {pgn} out of range")
        if (pgn >> 8) & 0xFF < 240:
            out.append({"can_id": (pgn & 0x3FF00) << 8, "can_mask": 0x3FF0000, "extended": True})
        else:
            out.append({"can_id": pgn << 8, "can_mask": 0x3FFFF00, "extended": True})
    return out


def open_bus(
    interface: str,
    channel: str,
    listen_only: bool = True,
    pgns: Iterable[int] | None = None,
    standard_ids: Iterable[int] = (),
    **kwargs: Any,
) -> can.BusABC:
    """Open a python-can bus, or a :class:`~cngmrv.drivers.can_logs.ReplayBus` for ``"replay"``.

    ``pgns`` become kernel acceptance filters on SocketCAN, so the frames the
    agent ignores never cost a system call.  Other interfaces get no filters:
    python-can would apply them in Python, which costs more per frame than
    the pipeline's own dispatch.
    """
    if interface == REPLAY:
        return ReplayBus(channel, **kwargs)
    if interface == "socketcan":
        if pgns is not None:
            kwargs.setdefault("can_filters", j1939_filters(pgns, standard_ids))
        if listen_only:
            kwargs.setdefault("receive_own_messages", False)
        # python-can's socketcan bus, also counting the kernel's receive-queue drops.
        return OverflowCountingBus(channel, **kwargs)
    return can.Bus(interface=interface, channel=channel, **kwargs)


@dataclass(frozen=True)
class RequestPlan:
    """Requests the agent may send when the config enables them (never in listen-only mode).

    The agent first claims ``address`` with ``name`` (J1939-81) and sends
    Request (PGN 59904) for each of ``pgns`` to ``destination`` every
    ``period_s`` seconds while it holds the address.
    """

    name: int
    address: int
    pgns: tuple[int, ...] = (j1939.PGN_HOURS, j1939.PGN_LFC)
    period_s: float = 10.0
    destination: int = j1939.GLOBAL


@dataclass(frozen=True)
class SourceSettings:
    """How to build a :class:`CanSource` (the agent's ``[can]`` config maps onto this)."""

    interface: str = "socketcan"
    channel: str = "can0"
    listen_only: bool = True
    pgns: frozenset[int] | None = DEFAULT_PGNS  # kernel filters on SocketCAN; None: all
    queue_size: int = 65536
    replay_speed: float = 0.0
    backoff_s: float = 0.1
    backoff_max_s: float = 5.0
    link_poll_s: float = 1.0
    requests: RequestPlan | None = None
    wake_after: int = 64  # see CanSource
    # 11-bit identifiers passed on (plug-in sources: OBD-II answers), and their senders.
    standard_ids: frozenset[int] = frozenset()
    talkers: tuple[Talker, ...] = ()

    @property
    def filter_pgns(self) -> frozenset[int] | None:
        """The PGNs the kernel lets through (``None``: everything)."""
        if self.pgns is None or self.requests is None:
            return self.pgns
        # Defending a claimed address means hearing Requests for Address Claimed.
        return self.pgns | {j1939.PGN_REQUEST, j1939.PGN_ADDRESS_CLAIMED}


def make_source(s: SourceSettings) -> CanSource:
    """Build the source the settings describe; the bus is opened by :meth:`CanSource.start`.

    Raises ``ValueError`` for an interface python-can does not know and for
    requests in listen-only mode.
    """
    if s.interface == REPLAY:
        return CanSource(
            ReplayBus(s.channel, speed=s.replay_speed),
            s.queue_size,
            listen_only=True,
            block_when_full=True,
            mono_from_timestamp=True,
            wake_after=min(s.wake_after, s.queue_size),
            standard_ids=s.standard_ids,
        )
    if s.interface not in INTERFACES:
        raise ValueError(f"unknown CAN interface {s.interface!r}")

    pgns = s.filter_pgns

    def opener() -> can.BusABC:
        return open_bus(s.interface, s.channel, s.listen_only, pgns, s.standard_ids)

    return CanSource(
        opener,
        s.queue_size,
        listen_only=s.listen_only,
        backoff_s=s.backoff_s,
        backoff_max_s=s.backoff_max_s,
        link=(lambda: read_link(s.channel)) if s.interface == "socketcan" else None,
        link_poll_s=s.link_poll_s,
        requests=s.requests,
        wake_after=min(s.wake_after, s.queue_size),
        standard_ids=s.standard_ids,
        talkers=s.talkers,
    )


class CanSource:
    """Reads J1939 frames (29-bit data frames) from a bus into a bounded queue, reopening it on failure.

    ``bus`` is either an open bus (not reopenable) or a zero-argument callable that
    opens one.  Frames come out of :meth:`drain`/:meth:`wait`, events (outages,
    controller state changes) out of :meth:`events`, both oldest first.  Counters
    are in :attr:`stats`.

    ``wake_after``: a consumer blocked in :meth:`wait` is woken once this many
    frames are queued; fewer wait for its timeout.  Waking it per frame costs
    a thread switch (and a GIL hand-over) per frame, which on a full bus is
    thousands a second for nothing; the price of batching is latency, at most
    the consumer's timeout.

    ``poll_s`` is the reader's longest wait in ``recv``: how late it notices
    :meth:`stop` or an outage on a silent bus, and how often it wakes with no
    frame.  By default 0.05 s when it transmits (requests and talkers are timed
    on those wake-ups), else ``LISTEN_POLL_S``.
    """

    def __init__(
        self,
        bus: can.BusABC | BusOpener,
        queue_size: int = 65536,
        poll_s: float | None = None,
        *,
        listen_only: bool = True,
        backoff_s: float = 0.1,
        backoff_max_s: float = 5.0,
        link: Callable[[], LinkState] | None = None,
        link_poll_s: float = 1.0,
        block_when_full: bool = False,
        mono_from_timestamp: bool = False,
        requests: RequestPlan | None = None,
        wake_after: int = 1,
        standard_ids: Iterable[int] = (),
        talkers: Iterable[Talker] = (),
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if not 1 <= wake_after <= queue_size:
            raise ValueError("wake_after must be 1..queue_size")
        if requests is not None and listen_only:
            raise ValueError("requests need listen_only=False: a listen-only source never sends")
        self._talkers = tuple(talkers)
        if self._talkers and listen_only:
            raise ValueError("talkers need listen_only=False: a listen-only source never sends")
        self._standard_ids = frozenset(standard_ids)
        if isinstance(bus, can.BusABC):
            self._bus: can.BusABC | None = bus
            self._opener: BusOpener | None = None
        else:
            self._bus = None
            self._opener = bus
        self._max = queue_size
        self._queue: deque[Frame] = deque()
        self._ready = threading.Event()
        self._waiting = False
        self._wake_after = wake_after
        self._events: deque[dict[str, Any]] = deque(maxlen=10000)
        transmits = requests is not None or bool(self._talkers)
        self._poll_s = poll_s if poll_s is not None else 0.05 if transmits else LISTEN_POLL_S
        self._backoff = (backoff_s, backoff_max_s)
        self._link = link
        self._link_poll_s = link_poll_s
        self._link_bad: str | None = None
        self._block = block_when_full
        self._mono_from_ts = mono_from_timestamp
        self._requests = requests
        self._claimer = AddressClaimer(requests.name, requests.address) if requests else None
        self._next_request = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="can-source", daemon=True)
        self._monitor = threading.Thread(target=self._watch_link, name="can-link", daemon=True)
        self._down_since: float | None = None
        self._attempts = 0
        self.link_state: LinkState | None = None
        self.stats: dict[str, Any] = {
            "frames": 0,
            "queue_dropped": 0,
            "ignored": 0,
            "outages": 0,
            "reopen_failures": 0,
            "sent": 0,
            "send_errors": 0,
            "kernel_dropped": 0,
            "kernel": {},
        }
        self.error: str | None = None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Open the bus (unless given open) and start reading.

        An opener that fails with ``OSError`` or ``CanError`` (interface absent or
        down) does not stop the start: the failure is the first outage and the
        source keeps trying.  Other exceptions (an unknown interface, a missing
        driver) are configuration errors and propagate.
        """
        if self._bus is None and self._opener is not None:
            try:
                self._bus = self._opener()
            except can.CanInterfaceNotImplementedError:
                raise  # a driver or its library is missing: no amount of retrying helps
            except (OSError, can.CanError) as e:
                self._outage_begins(f"open failed: {type(e).__name__}: {e}")
        self._thread.start()
        if self._link is not None:
            self._monitor.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reading and shut the bus down; frames already queued stay drainable."""
        self._stop.set()
        self._ready.set()
        self._thread.join(timeout)
        if self._monitor.is_alive():
            self._monitor.join(timeout)
        self._close_bus()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def bus(self) -> can.BusABC | None:
        """The bus open right now (``None`` during an outage); for diagnostics and tests."""
        return self._bus

    @property
    def finished(self) -> bool:
        """True when no frame will ever come again: a replay at its end, or a failed unreopenable bus."""
        return not self._thread.is_alive() and self._thread.ident is not None

    # -- consumer side --------------------------------------------------------

    def drain(self, max_items: int = 100000) -> list[Frame]:
        """Every queued frame (up to ``max_items``), oldest first, without blocking."""
        q = self._queue
        n = min(len(q), max_items)
        popleft = q.popleft
        return [popleft() for _ in range(n)]

    def wait(self, timeout: float) -> list[Frame]:
        """Block up to ``timeout`` until ``wake_after`` frames are queued, then drain them all.

        Returns early, with what is queued, when the source stops or a replay
        is waiting for room.
        """
        q, enough = self._queue, self._wake_after
        if len(q) < enough:
            # The reader sets the event only while someone waits; clearing before
            # the second check means frames queued in between are not missed.
            self._waiting = True
            self._ready.clear()
            if len(q) < enough:
                self._ready.wait(timeout)
            self._waiting = False
        return self.drain()

    def pending(self) -> int:
        return len(self._queue)

    def events(self) -> list[dict[str, Any]]:
        """Source events since the last call (``CAN_DOWN``, ``CAN_UP``, ``CAN_STATE``,
        ``CAN_RX_OVERFLOW``), oldest first.

        Each has ``t`` (wall clock), ``mono``, ``kind``, ``frames`` (frames queued
        before it) and the kind's own fields (``reason``; ``outage_s``,
        ``attempts``; ``exists``, ``up``, ``state``, ``listen_only``; ``dropped``,
        ``socket_dropped``).
        """
        ev = self._events
        return [ev.popleft() for _ in range(len(ev))]

    # -- reader thread --------------------------------------------------------

    def _event(self, kind: str, mono: float, **body: Any) -> None:
        # ``frames``: how many frames were queued before it, so a consumer can put
        # the event in its place in the frame stream.
        self._events.append(
            {"t": time.time(), "mono": mono, "kind": kind, "frames": self.stats["frames"], **body}
        )

    def _close_bus(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            try:
                bus.shutdown()
            except Exception as e:  # a half-dead bus may fail to close; it is gone either way
                log.debug("event=can_shutdown_failed reason=%r", str(e))

    def _outage_begins(self, reason: str) -> None:
        mono = time.monotonic()
        self._close_bus()
        self.error = reason
        self.stats["outages"] += 1
        self._down_since = mono
        self._attempts = 0
        self._event("CAN_DOWN", mono, reason=reason)
        log.error("event=can_down reason=%r", reason)

    def _reopen(self) -> bool:
        """Reopen with backoff until it works (True) or the source is stopped (False)."""
        delay, cap = self._backoff
        while not self._stop.wait(delay):
            delay = min(delay * 2, cap)
            self._attempts += 1
            bad = self._link_bad
            if bad is None:
                try:
                    assert self._opener is not None
                    self._bus = self._opener()
                except Exception as e:  # whatever the driver raises, the answer is to retry
                    bad = f"{type(e).__name__}: {e}"
            if bad is not None:
                self.stats["reopen_failures"] += 1
                if self._attempts == 1 or self._attempts % 10 == 0:
                    log.warning("event=can_reopen_failed attempt=%d reason=%r", self._attempts, bad)
                continue
            mono = time.monotonic()
            since = self._down_since if self._down_since is not None else mono
            self._event("CAN_UP", mono, outage_s=mono - since, attempts=self._attempts)
            log.warning("event=can_up outage_s=%.3f attempts=%d", mono - since, self._attempts)
            self._down_since = None
            self.error = None
            self._claim(mono)
            return True
        return False

    def _claim(self, now: float) -> None:
        if self._claimer is not None:
            self._send(self._claimer.claim(now))

    def _send(self, frames: list[tuple[int, bytes]], extended: bool = True) -> None:
        bus = self._bus
        if bus is None:
            return
        for can_id, data in frames:
            try:
                bus.send(can.Message(arbitration_id=can_id, data=data, is_extended_id=extended))
                self.stats["sent"] += 1
            except Exception as e:  # a failed request is retried next period
                self.stats["send_errors"] += 1
                log.debug("event=can_send_failed reason=%r", str(e))

    def _run(self) -> None:
        q, stats, maxlen = self._queue, self.stats, self._max
        monotonic = time.monotonic
        stopped = self._stop.is_set
        mono_from_ts = self._mono_from_ts
        claimer = self._claimer
        talkers = self._talkers
        standard_ids = self._standard_ids
        wake_after = self._wake_after
        self._claim(monotonic())
        while not stopped():
            bus = self._bus
            if bus is None:
                if self._opener is None or not self._reopen():
                    return
                continue
            recv, poll_s = bus.recv, self._poll_s
            if isinstance(bus, OverflowCountingBus):
                bus.on_drops = self._kernel_dropped
            # The inner loop is the hot path: one iteration per frame.
            while not stopped():
                try:
                    msg = recv(poll_s)
                except Exception as e:  # see the module docstring: anything ends this bus
                    self._outage_begins(f"{type(e).__name__}: {e}")
                    break
                if self._link_bad is not None:
                    self._outage_begins(self._link_bad)
                    break
                if claimer is not None:
                    self._transmit(monotonic(), msg)
                if talkers:
                    self._talk(monotonic(), msg)
                if msg is None:
                    if getattr(bus, "finished", False):
                        self._ready.set()  # the end of a replayed log: no more to wait for
                        return
                    continue
                # J1939 uses 29-bit data frames only; remote and error frames, and
                # 11-bit frames no source asked for, are other protocols' traffic,
                # not decode errors.
                can_id = msg.arbitration_id
                if not msg.is_extended_id or msg.is_remote_frame or msg.is_error_frame:
                    if (
                        msg.is_extended_id
                        or msg.is_remote_frame
                        or msg.is_error_frame
                        or can_id not in standard_ids
                    ):
                        stats["ignored"] += 1
                        continue
                    can_id |= STANDARD_ID_FLAG
                t = msg.timestamp
                frame = (t, can_id, bytes(msg.data), t if mono_from_ts else monotonic())
                if len(q) >= maxlen:
                    if not self._block:
                        stats["queue_dropped"] += 1
                        continue
                    while len(q) >= maxlen and not stopped():
                        self._ready.set()
                        time.sleep(0.001)
                q.append(frame)
                stats["frames"] += 1
                if self._waiting and len(q) >= wake_after:
                    self._ready.set()

    def _talk(self, now: float, msg: can.Message | None) -> None:
        for talker in self._talkers:
            for can_id, data, extended in talker.frames(now, msg):
                self._send([(can_id, data)], extended)

    def _kernel_dropped(self, new: int, total: int) -> None:
        # Called inside recv, before the frame that brought the count: the drops'
        # place in the frame stream.
        self.stats["kernel_dropped"] += new
        self._event("CAN_RX_OVERFLOW", time.monotonic(), dropped=new, socket_dropped=total)
        log.warning("event=can_rx_overflow dropped=%d socket_dropped=%d", new, total)

    def _transmit(self, now: float, msg: can.Message | None) -> None:
        claimer, plan = self._claimer, self._requests
        assert claimer is not None and plan is not None
        if msg is not None and msg.is_extended_id and not msg.is_error_frame:
            jid = j1939.parse_id(msg.arbitration_id)
            self._send(claimer.on_frame(now, jid.pgn, jid.source, jid.destination, bytes(msg.data)))
        if now >= self._next_request and claimer.ready(now):
            self._next_request = now + plan.period_s
            self._send(
                [
                    (
                        j1939.make_id(j1939.PGN_REQUEST, plan.address, 6, plan.destination),
                        j1939.encode_request(pgn),
                    )
                    for pgn in plan.pgns
                ]
            )

    # -- link monitor thread --------------------------------------------------

    def _watch_link(self) -> None:
        assert self._link is not None
        last_state: tuple[Any, ...] | None = None
        while not self._stop.is_set():
            try:
                st = self._link()
            except Exception as e:  # the monitor must never die; the reader carries on
                log.warning("event=can_link_read_failed reason=%r", str(e))
                self._stop.wait(self._link_poll_s)
                continue
            self.link_state = st
            self.stats["kernel"] = dict(st.counters)
            self._link_bad = None if st.ok else st.reason
            key = (st.exists, st.up, st.can_state, st.listen_only)
            if key != last_state:
                self._event(
                    "CAN_STATE",
                    time.monotonic(),
                    exists=st.exists,
                    up=st.up,
                    state=st.can_state,
                    listen_only=st.listen_only,
                )
                if st.exists and st.listen_only is False:
                    log.warning(
                        "event=can_not_listen_only interface=%s hint=%r",
                        st.name,
                        "ip link set DEV type can listen-only on",
                    )
                last_state = key
            self._stop.wait(self._link_poll_s)
