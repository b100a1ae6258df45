"""CAN sources: one python-can bus, read by a background thread into a bounded queue.

Every interface python-can offers is reachable through :func:`open_bus`; the
agent only sees :class:`CanSource`, which hands out ``(timestamp, can_id, data)``
tuples.  Timestamps are the bus's own (kernel receive time on SocketCAN, the
sender's time on a virtual bus with ``preserve_timestamps``), never the time
the agent got round to reading them.

Limits: when the queue is full the newest frame is dropped and counted in
``stats["queue_dropped"]``; the bus itself may drop frames before that
(socket buffer), which this class cannot see.  Reopening after a bus failure
is the supervisor's job (a later issue); here a failed ``recv`` ends the
thread with the error recorded in ``stats`` and ``error``.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import can

log = logging.getLogger("cngmrv.can")

Frame = tuple[float, int, bytes]


def open_bus(interface: str, channel: str, listen_only: bool = True, **kwargs: Any) -> can.BusABC:
    """Open a python-can bus.  SocketCAN is opened listen-only unless told otherwise.

    Listen-only matters on a vehicle: a gateway that ACKs or sends frames can
    disturb the engine's bus, so we never transmit unless the config says so.
    """
    if interface == "socketcan" and listen_only:
        # The kernel only honours this when the interface was configured with
        # `ip link set can0 type can listen-only on`; python-can has no per-socket
        # listen-only flag, so we also never call send().
        kwargs.setdefault("receive_own_messages", False)
    return can.Bus(interface=interface, channel=channel, **kwargs)


class CanSource:
    """Reads extended-id data frames from ``bus`` into a bounded queue."""

    def __init__(self, bus: can.BusABC, queue_size: int = 65536, poll_s: float = 0.05) -> None:
        self._bus = bus
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize=queue_size)
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="can-source", daemon=True)
        self.stats = {"frames": 0, "queue_dropped": 0, "ignored": 0}
        self.error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reading and shut the bus down; frames already queued stay drainable."""
        self._stop.set()
        self._thread.join(timeout)
        self._bus.shutdown()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        q, stats = self._queue, self.stats
        while not self._stop.is_set():
            try:
                msg = self._bus.recv(self._poll_s)
            except (can.CanError, OSError) as e:
                self.error = f"CAN receive failed: {e}"
                log.error("event=can_recv_failed reason=%r", str(e))
                return
            if msg is None:
                continue
            # J1939 uses 29-bit data frames only; 11-bit, remote and error frames are
            # other protocols' traffic, not decode errors.
            if not msg.is_extended_id or msg.is_remote_frame or msg.is_error_frame:
                stats["ignored"] += 1
                continue
            try:
                q.put_nowait((msg.timestamp, msg.arbitration_id, bytes(msg.data)))
                stats["frames"] += 1
            except queue.Full:
                stats["queue_dropped"] += 1

    def drain(self, max_items: int = 100000) -> list[Frame]:
        """Every queued frame (up to ``max_items``), oldest first, without blocking."""
        out: list[Frame] = []
        get = self._queue.get_nowait
        try:
            while len(out) < max_items:
                out.append(get())
        except queue.Empty:
            pass
        return out

    def wait(self, timeout: float) -> list[Frame]:
        """Block up to ``timeout`` for the first frame, then drain the rest."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        return [first, *self.drain()]

    def pending(self) -> int:
        return self._queue.qsize()
